"""One tuning trial in its own process: ``python -m peftkit.tuning.worker SPEC.json``.

Started by ``peftkit tune`` (``peftkit.tuning.trial.run_trial``), never by users. It trains one
``RunConfig`` as a run would, validating after each epoch, and never evaluates the test split nor
saves an adapter (a tune selects on validation only; the best configuration is trained once more
as a normal run at the end). After each epoch's validation it writes the tuned metric to the
parent on the ``events`` pipe and waits for the parent's verdict on the ``verdicts`` pipe: ``go``,
or ``prune`` (the parent holds the study and its pruner, so any optuna pruner and any storage
work, and this process never opens the study). Its report (JSON, like a bench worker's): ``ok``
with the history, ``pruned`` with the epoch, ``oom`` / ``failed`` / ``refused`` with one line.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import IO, Any

from .. import workers
from ..config import RunConfig
from ..env import own_process, quiet_libraries
from ..errors import set_context
from ..files import write_json
from ..stats import bits
from ..train import resolve, train_and_validate


class _Pruned(Exception):
    """The parent's pruner stopped this trial after ``epoch``."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"pruned after epoch {epoch}")
        self.epoch = epoch


class _MetricMissing(Exception):
    """The tuned metric is not among what validation measures: every trial would fail alike."""


def main(spec_path: str) -> int:
    """Run the spec's trial and write its report where the spec says; 0 unless the report itself
    cannot be written."""
    own_process()  # a worker's process is peftkit's (env.freeze_imported_objects)
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)

    cfg = RunConfig.from_dict(spec["config"])
    start = time.perf_counter()
    with os.fdopen(spec["events_fd"], "w", buffering=1) as events, os.fdopen(spec["verdicts_fd"], "r") as verdicts:
        report = _run(cfg, spec, events, verdicts)
    report["seconds"] = time.perf_counter() - start
    write_json(spec["result_path"], report, indent=None)
    return 0


def _run(cfg: Any, spec: dict[str, Any], events: IO[str], verdicts: IO[str]) -> dict[str, Any]:
    """``status`` and what goes with it, for one trial of ``cfg``."""
    metric = spec["metric"]

    def on_validation(epoch: int, metrics: dict[str, float]) -> None:
        if metric not in metrics:
            raise _MetricMissing(
                f"--metric {metric!r} is not measured on the validation split; "
                f"it measures: {', '.join(sorted(metrics))}"
            )
        events.write(json.dumps({"epoch": epoch, "value": metrics[metric]}) + "\n")
        events.flush()
        verdict = verdicts.readline().strip()
        if verdict == "prune":
            raise _Pruned(epoch)
        if verdict != "go":  # the parent is gone: nobody will read what comes next
            raise KeyboardInterrupt

    def echo(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        cfg.validate()
        run = resolve(cfg)
        set_context(command="tune", strategy=run.strategy.name, model=cfg.model)  # a trial of peftkit tune
        quiet_libraries()
        # which validation examples the selected epoch got right, where the metric is their mean
        # (accuracy): the study then says whether the best trial beats the defaults beyond noise
        outcome = train_and_validate(
            run, spec["workdir"], echo, on_validation, validation_correct=metric if metric == "accuracy" else None
        )
        return {
            "status": "ok",
            "history": outcome.history,
            "best_epoch": outcome.metrics.best_epoch,
            "validation_correct": bits(outcome.validation_correct),
        }
    except _Pruned as pruned:
        return {"status": "pruned", "epoch": pruned.epoch}
    except _MetricMissing as missing:
        return {"status": "refused", "error": str(missing)}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - a failed trial, not the end of the tune
        return workers.failure_report(exc, os.path.join(spec["workdir"], "traceback.log"))


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except KeyboardInterrupt:  # the parent reports an interruption, once
        sys.exit(130)
