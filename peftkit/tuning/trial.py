"""One trial: what it runs and how it stands.

A trial's settings come from the strategy's own search space (``Strategy.search_space``) asked
through ``SearchTrial``, which answers the user's fixed settings without searching them and takes
``--space``'s values where given; trial 0 of every study is the strategy's defaults
(``trial_zero``). ``trial_config`` makes the run of a trial, ``best_config`` that of the best one.

Each trial trains in a worker process of its own (``python -m peftkit.tuning.worker``, started and
stopped by ``peftkit.workers`` like a bench's runs), so a crash or an out-of-memory is a failed
trial, not the end. After each epoch's validation the worker sends the tuned metric up a pipe; the
parent reports it to the study and answers ``go`` or ``prune`` (``run_trial``). A trial's value is
its best epoch's validation value.

``trial_state`` and ``TrialCounts`` are the words and figures every line, trials.csv and trials.json
use for how trials stand.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .. import workers
from ..config import RunConfig
from ..files import write_json
from ..strategies.base import TUNED_SETTINGS, default_point
from .config import TunePlan

if TYPE_CHECKING:  # pragma: no cover
    import optuna


def trial_zero(plan: TunePlan) -> dict[str, Any]:
    """The strategy's defaults as the study's parameters (the fixed settings are not parameters;
    where ``--space`` leaves a default out, its first value)."""
    point = default_point(plan.strategy, plan.defaults, overrides=plan.fixed)
    space = plan.config.space
    return {k: (v if k not in space or v in space[k] else space[k][0]) for k, v in point.items() if k not in plan.fixed}


class SearchTrial:
    """The optuna trial as a search space sees it: the user's fixed settings answer without being
    searched, and ``--space`` replaces a setting's range by its values."""

    def __init__(self, trial: Any, fixed: dict[str, Any], space: dict[str, list[Any]]) -> None:
        self.trial, self.fixed, self.space = trial, fixed, space

    def _pick(self, name: str, suggest: Callable[[], Any]) -> Any:
        if name in self.fixed:
            return self.fixed[name]
        if name in self.space:
            return self.trial.suggest_categorical(name, self.space[name])
        return suggest()

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        return self._pick(name, lambda: self.trial.suggest_float(name, low, high, step=step, log=log))

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        return self._pick(name, lambda: self.trial.suggest_int(name, low, high, step=step, log=log))

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._pick(name, lambda: self.trial.suggest_categorical(name, choices))


def trial_config(plan: TunePlan, values: dict[str, Any], workdir: str) -> RunConfig:
    """The run of one trial: the shared settings with the trial's values (run settings and
    options apart)."""
    settings = {k: v for k, v in values.items() if k in TUNED_SETTINGS}
    options = {**plan.base.strategy_options, **{k: v for k, v in values.items() if k not in TUNED_SETTINGS}}
    cfg = dataclasses.replace(plan.base, **settings, strategy_options=options, output_dir=workdir, overwrite=False)
    if cfg.early_stopping_patience is None and plan.schedule is not None and plan.schedule.how == "raised":
        # a plain run raises epochs on this small training set and stops early: so do the trials,
        # whose epochs are searched around the raised ones (the patience counts the same steps)
        cfg.early_stopping_patience = plan.schedule.early_stopping_patience
    cfg.validate()
    return cfg


def best_config(plan: TunePlan, study: optuna.Study) -> RunConfig:
    """The best trial's run settings, every default resolved, ready for ``peftkit run``."""
    best = study.best_trial
    values = plan.strategy.search_space(ReplayTrial(best.params, plan.fixed), plan.defaults)
    cfg = trial_config(plan, values, "unused")
    cfg.output_dir = None
    return cfg


class ReplayTrial(SearchTrial):
    """A finished trial's parameters answered again (fixed settings as before)."""

    def __init__(self, params: dict[str, Any], fixed: dict[str, Any]) -> None:
        super().__init__(None, fixed, {})
        self.params = params

    def _pick(self, name: str, suggest: Callable[[], Any]) -> Any:
        return self.fixed[name] if name in self.fixed else self.params[name]


# -- one trial, in its own process ----------------------------------------------------------------


@dataclass
class TrialOutcome:
    """How a trial ended: ``ok`` (value: its best epoch's), ``pruned``, ``failed``, ``oom`` or
    ``refused`` (with ``error``), and the values reported after each epoch."""

    status: str
    value: float | None = None
    epochs: list[float] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    correct: str | None = None
    """Which validation examples the selected epoch got right (``stats.bits``), where measured."""


def run_trial(trial: Any, cfg: RunConfig, plan: TunePlan, prunable: bool) -> TrialOutcome:
    """Train ``cfg`` in a worker process, reporting each epoch's value to ``trial`` and pruning
    it when the study's pruner says so (never ``prunable=False`` trials, nor after the last epoch,
    when the trial is complete anyway). Ctrl-C stops the worker and re-raises."""
    workdir = cfg.output_dir
    os.makedirs(workdir, exist_ok=True)
    last_epoch = cfg.epochs or plan.defaults.epochs
    start = time.perf_counter()
    with (
        tempfile.TemporaryDirectory(prefix="peftkit-tune-") as tmp,
        open(os.path.join(workdir, "worker.log"), "a", encoding="utf-8") as log,
    ):
        proc, events, verdicts, result_path = _start_worker(cfg, plan, workdir, tmp, log)
        values: list[float] = []
        try:
            for line in events:
                epoch, value = (lambda e: (e["epoch"], float(e["value"])))(json.loads(line))
                values.append(value)
                trial.report(value, step=epoch)
                prune = prunable and epoch < last_epoch and trial.should_prune()
                verdicts.write("prune\n" if prune else "go\n")
                verdicts.flush()
            proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM: the worker goes too, before the study is told
            workers.stop(proc)
            raise
        finally:
            events.close()
            with contextlib.suppress(OSError):
                verdicts.close()
        report = workers.read_report(result_path, proc.returncode, f"{workdir}/worker.log")
    return _outcome(report, values, plan.direction, time.perf_counter() - start)


def _start_worker(cfg: RunConfig, plan: TunePlan, workdir: str, tmp: str, log: Any) -> tuple[Any, Any, Any, str]:
    """Start ``peftkit.tuning.worker`` on ``cfg`` in a session of its own (a Ctrl-C at the terminal
    reaches only us: we stop it), its output into the trial's ``worker.log``, with two pipes."""
    ev_read, ev_write = os.pipe()
    vd_read, vd_write = os.pipe()
    spec_path, result_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.json")
    write_json(
        spec_path,
        {
            "config": cfg.to_dict(),
            "workdir": workdir,
            "result_path": result_path,
            "metric": plan.metric,
            "events_fd": ev_write,
            "verdicts_fd": vd_read,
        },
        indent=None,
    )
    try:
        proc = workers.start("peftkit.tuning.worker", spec_path, stdout=log, stderr=log, pass_fds=(ev_write, vd_read))
    finally:
        os.close(ev_write)
        os.close(vd_read)
    return proc, os.fdopen(ev_read, "r"), os.fdopen(vd_write, "w"), result_path


def _outcome(report: dict[str, Any], values: list[float], direction: str, seconds: float) -> TrialOutcome:
    status = report["status"]
    if status == "ok" and not values:
        status, report["error"] = "failed", "the trial reported no validation"
    best = (max if direction == "maximize" else min)(values) if values else None
    return TrialOutcome(
        status,
        best if status == "ok" else None,
        values,
        report.get("error"),
        seconds,
        report.get("validation_correct") if status == "ok" else None,
    )


def trial_state(trial: optuna.trial.FrozenTrial) -> str:
    """The word every message, trials.csv and trials.json use for how ``trial`` stands: complete,
    pruned, failed, interrupted (failed by Ctrl-C, kill or a stopped process: it did not run its
    course, so it is not counted and another trial takes its place), running or waiting (queued,
    not started)."""
    if trial.user_attrs.get("interrupted"):
        return "interrupted"
    return {"FAIL": "failed"}.get(trial.state.name, trial.state.name.lower())


@dataclass(frozen=True)
class TrialCounts:
    """How a study's trials stand, counted once so that every line gives the same figures (a
    continued study's earlier trials included). ``finished`` (complete, pruned or failed) is what
    ``--trials`` counts; ``total`` is every trial that started (waiting ones are not)."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    interrupted: int = 0
    running: int = 0

    @classmethod
    def of(cls, study: optuna.Study) -> TrialCounts:
        """Count ``study``'s trials now (every process's)."""
        states = [trial_state(t) for t in study.get_trials(deepcopy=False)]
        return cls(**{f.name: states.count(f.name) for f in dataclasses.fields(cls)})

    @property
    def finished(self) -> int:
        """Complete, pruned or failed: the trials ``--trials`` counts."""
        return self.complete + self.pruned + self.failed

    @property
    def total(self) -> int:
        """Every trial that started: finished, interrupted or running."""
        return self.finished + self.interrupted + self.running

    def describe(self) -> str:
        """``6 trials: 4 complete, 1 pruned, 1 failed`` (states with none left out; the parts add
        up to the total)."""
        parts = [f"{n} {f.name}" for f in dataclasses.fields(self) if (n := getattr(self, f.name))]
        return f"{self.total} trial{'s' if self.total != 1 else ''}" + (f": {', '.join(parts)}" if parts else "")


def counted(study: optuna.Study) -> int:
    """Trials that count toward ``--trials``: finished ones (complete, pruned, failed), but not
    those an interruption ended (they did not run their course)."""
    return TrialCounts.of(study).finished


def still_to_run(counts: TrialCounts, plan: TunePlan) -> str:
    """``6 trials: 4 complete, 1 pruned, 1 failed; 5 of --trials 8 finished, 3 to go``: where a study
    stands against ``--trials``, in the words every line uses."""
    goal = plan.config.trials
    left = f"{goal - counts.finished} to go" if counts.finished < goal else "none to go"
    return f"{counts.describe()}; {counts.finished} of --trials {goal} finished, {left}"
