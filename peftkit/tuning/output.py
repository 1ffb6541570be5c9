"""A tune's output directory, and how a tune ends.

``prepare_output`` makes (or finds) the output directory; it holds the study by default
(``study.db``), which is written as trials finish and so cannot be staged like a run directory. The
reports are made in a staging folder and moved in when the tune ends (``staged_reports``).
``finish_tune`` ends a tune: the best configuration trained once more as a normal run (best-run/,
the only run evaluated on test; kept when an earlier call made it for the same best trial), then
best.yaml, trials.csv / .json and the plots (``peftkit.tuning.report``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from ..config import RunConfig
from ..errors import PeftkitError
from ..files import private_dir, publish_modes, write_json
from ..metrics import RunMetrics
from ..rundir import continued_dir
from ..runs import RunResult
from .config import MARKER, TunePlan
from .report import defaults_won, versus_defaults, write_reports
from .storage import masked
from .trial import TrialCounts, best_config

if TYPE_CHECKING:  # pragma: no cover
    import optuna

Echo = Callable[[str], None]


class FinishedTune(NamedTuple):
    """What ``finish_tune`` leaves: the best configuration (best.yaml's), its run and the plots."""

    best: RunConfig
    run_dir: str
    metrics: RunMetrics
    plots: list[str]


def prepare_output(plan: TunePlan) -> None:
    """Make (or find) the output directory. One that holds another tune's study, or anything but a
    tune, is refused unless ``overwrite`` (then it is emptied: its study and reports go)."""
    out = plan.output_dir
    recorded = continued_dir(out, plan.config.overwrite, MARKER, "peftkit tune")
    if recorded is not None:
        if recorded.get("study_name") != plan.study_name or recorded.get("storage") != masked(plan.storage):
            raise PeftkitError(
                f"output directory {out!r} holds the tune of study {recorded.get('study_name')!r} in "
                f"{recorded.get('storage')}, not {plan.study_name!r} in {masked(plan.storage)}; "
                "give the same --storage and --study-name to continue it, another --output-dir, "
                "or --overwrite"
            )
        return
    record = {"study_name": plan.study_name, "storage": masked(plan.storage), **plan.identity}
    write_json(os.path.join(out, MARKER), record)


@contextlib.contextmanager
def staged_reports(out: str) -> Any:
    """A staging folder in ``out`` for this tune's reports, moved into ``out`` when done (each file
    replaced whole; best-run/ swapped), removed if the tune stops first."""
    stage = private_dir(".reports.partial-", out)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    publish_modes(stage)
    for name in sorted(os.listdir(stage)):
        source, target = os.path.join(stage, name), os.path.join(out, name)
        if os.path.isdir(source) and os.path.exists(target):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=out)
            os.rename(target, os.path.join(old, name))
            os.rename(source, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(source, target)
    os.rmdir(stage)


def finish_tune(
    plan: TunePlan, study: optuna.Study, echo: Echo, train: Callable[[RunConfig], RunMetrics | None]
) -> FinishedTune:
    """Train the best configuration once more as a run (``train`` runs a ``RunConfig`` into its
    output directory; test evaluated there only, unless the previous call already did it for the
    same trial) and move the reports into place."""
    try:
        best_number = study.best_trial.number
    except ValueError:
        raise PeftkitError(
            f"no trial of study {plan.study_name!r} completed; each trial's worker.log in "
            f"{os.path.join(plan.output_dir, 'trials')} says why"
        ) from None
    best = best_config(plan, study)
    previous = previous_best_run(plan.output_dir, best_number)
    with staged_reports(plan.output_dir) as stage:
        if previous is None:
            who = f"#{best_number} (the defaults)" if defaults_won(study) else f"#{best_number}"
            echo(
                f"tune: best trial {who} ({plan.metric} {study.best_value:.4f}); training it once more "
                "as peftkit run --config best.yaml would, the only run evaluated on test ..."
            )
            best.output_dir = os.path.join(stage, "best-run")
            metrics = train(dataclasses.replace(best))
            best.output_dir = None
            previous = best_run_record(plan, study, metrics, echo)
        plots = write_reports(stage, plan, study, best, previous)
    run_dir = os.path.join(plan.output_dir, "best-run")
    return FinishedTune(best, run_dir, RunMetrics.from_dict(_read_json(os.path.join(run_dir, "metrics.json"))), plots)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def previous_best_run(out: str, best_number: int) -> dict[str, Any] | None:
    """The record of best-run/ when an earlier call made it for the same best trial (then it
    stands: training it again would give the same run)."""
    path = os.path.join(out, "trials.json")
    if not os.path.exists(path) or not os.path.exists(os.path.join(out, "best-run", "metrics.json")):
        return None
    record = _read_json(path).get("best_run") or {}
    return record if record.get("trial") == best_number else None


def best_run_record(plan: TunePlan, study: optuna.Study, metrics: RunMetrics | None, echo: Echo) -> dict[str, Any]:
    """What trials.json says of best-run/: its trial, validation (which should be the trial's) and test."""
    validation = (metrics.validation if metrics else {}).get(plan.metric)
    if validation is not None and abs(validation - study.best_value) > 1e-9:
        echo(
            f"warning: the best configuration trained again reached validation {plan.metric} {validation:.6g}, "
            f"its trial {study.best_value:.6g}: training is not bit-for-bit repeatable on this device"
        )
    return {
        "trial": study.best_trial.number,
        "dir": "best-run",
        "validation": metrics.validation if metrics else {},
        "test": metrics.test if metrics else {},
    }


@dataclass
class TuneResult:
    """A finished tune: the study, its best trial, and the best configuration's run (the only one
    whose test split was evaluated)."""

    output_dir: str
    """Holds study.db (by default), best.yaml, trials.csv, trials.json, plots, best-run/ and trials/."""
    study_name: str
    storage: str
    """The study's storage URL, its password hidden."""
    metric: str
    trials: int
    """Trials the study has started (this call's and earlier ones', every process's): ``counts.total``."""
    ran: int
    """Trials this call ran."""
    best_trial: int
    best_value: float
    """The best trial's validation ``metric`` (its best epoch's)."""
    best_params: dict[str, Any]
    best_config: RunConfig
    """What best.yaml holds: ``peftkit run --config best.yaml`` trains it again."""
    best_run: RunResult
    """The best configuration trained once more as a normal run (DIR/best-run): its test metrics."""
    plots: list[str]
    versus_defaults: dict[str, Any] | None = None
    """The best trial against the defaults on the same validation examples
    (``peftkit.tuning.report.versus_defaults``: difference, 95% interval, p-value,
    ``distinguishable``); None where it cannot be said."""
    counts: TrialCounts = field(default_factory=TrialCounts)
    """How the study's trials stand (complete, pruned, failed, interrupted, running), the figures
    every line of the tune gives."""
    defaults_best: bool = False
    """The defaults won the study: no tuned setting beat them on validation."""


def tune_result(plan: TunePlan, study: optuna.Study, ran: int, done: FinishedTune) -> TuneResult:
    """What ``api.tune`` gives back: the study as it stands, its best trial and the best run."""
    counts = TrialCounts.of(study)
    return TuneResult(
        plan.output_dir,
        plan.study_name,
        masked(plan.storage),
        plan.metric,
        counts.total,
        ran,
        study.best_trial.number,
        study.best_value,
        dict(study.best_trial.params),
        done.best,
        RunResult(done.run_dir, done.metrics),
        done.plots,
        versus_defaults(study),
        counts,
        defaults_won(study),
    )
