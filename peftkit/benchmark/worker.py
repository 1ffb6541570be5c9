"""One run of a suite in its own process: ``spawn_worker`` (the suite's side) starts
``python -m peftkit.benchmark.worker SPEC.json`` (``main``, the worker's side), never run by users.

The worker runs one ``RunConfig`` into its run directory and writes a small JSON report: ``ok`` with
the run's metrics, ``oom`` when the run ran out of memory (CUDA) or over its budget (CPU), so the
suite can halve the micro-batch and try again, or ``failed`` with a one-line error (the traceback,
if any, goes to the log file the spec names). The suite reads it back as an ``Attempt``. Starting,
stopping and reading a worker are ``peftkit.workers``'s, shared with a tune's trials.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import workers
from ..config import RunConfig
from ..env import own_process, quiet_libraries
from ..errors import set_context
from ..files import write_json
from ..rundir import staged_dir
from ..train import execute_run, resolve


@dataclass
class Attempt:
    """One worker process's outcome: ``ok`` with metrics, ``oom`` or ``failed`` with an error."""

    status: str
    batch_size: int
    error: str | None = None
    metrics: dict[str, Any] | None = None
    seconds: float = 0.0


Runner = Callable[[RunConfig, str], Attempt]


def spawn_worker(cfg: RunConfig, log_path: str) -> Attempt:
    """Run ``cfg`` in a fresh Python process; its progress goes to our stderr.

    The worker runs in a session of its own, so a Ctrl-C at the terminal reaches only this
    process: it stops the worker (``workers.stop``) and reports the interruption once, instead of
    the worker printing its own traceback (or a library's noise) over it."""
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        result_path = os.path.join(tmp, "result.json")
        write_json(spec_path, {"config": cfg.to_dict(), "result_path": result_path, "log_path": log_path}, indent=None)
        start = time.perf_counter()
        code = workers.wait(workers.start("peftkit.benchmark.worker", spec_path))
        # the worker's report holds its own batch size and seconds; one that died has neither
        report = workers.read_report(result_path, code, log_path)
    return Attempt(**{"batch_size": cfg.batch_size or 0, "seconds": time.perf_counter() - start, **report})


# -- the worker's side ----------------------------------------------------------------------


def main(spec_path: str) -> int:
    """Run the spec's ``RunConfig`` and write the report where the spec says; 0 unless the report
    itself cannot be written (every failure of the run is in the report)."""
    own_process()  # a worker's process is peftkit's (env.freeze_imported_objects)
    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)

    cfg = RunConfig.from_dict(spec["config"])
    start = time.perf_counter()
    report = {"batch_size": cfg.batch_size, **_run(cfg, spec["log_path"])}
    report["seconds"] = time.perf_counter() - start
    write_json(spec["result_path"], report, indent=None)
    return 0


def _run(cfg: Any, log_path: str) -> dict[str, Any]:
    """``status`` and ``metrics`` or ``error`` of one run of ``cfg`` into its output directory."""

    def echo(message: str) -> None:
        print(f"  {message}", file=sys.stderr, flush=True)

    try:
        cfg.validate()
        run = resolve(cfg)
        set_context(command="bench", strategy=run.strategy.name, model=cfg.model)  # a worker of peftkit bench
        quiet_libraries()
        with staged_dir(cfg.output_dir, overwrite=False) as stage:
            metrics = execute_run(run, stage, echo, data_said=True)  # the bench said it, once
        return {"status": "ok", "metrics": metrics}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes a row of the suite
        return workers.failure_report(exc, log_path)


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except KeyboardInterrupt:  # the suite reports an interruption, once; the run's staging is gone
        sys.exit(130)
