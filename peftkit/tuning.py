"""``peftkit tune``: a strategy's hyper-parameters searched with Optuna, selected on validation only.

The parent process holds the study (TPE sampler, seeded; a pruner) and asks it for each trial's
settings through the strategy's own search space (``Strategy.search_space``); each trial trains in
a worker process of its own (``peftkit.tune_worker``, started and stopped like a bench's), so a
crash or an out-of-memory is a failed trial, not the end. After each epoch's validation the worker
sends the tuned metric up a pipe; the parent reports it to the study and answers ``go`` or
``prune``. A trial's objective is its best epoch's validation value. Trial 0 of every study is the
strategy's defaults, and it is never pruned, so the tuned result is never worse on validation.

The study lives in a storage (an SQLite file ``study.db`` in the output directory by default, or
any database URL SQLAlchemy takes) that is written as trials finish: it is what a second ``tune``
into the same directory (or storage and study name) continues, and what several processes share.
It therefore cannot be staged like a run directory; the reports (best.yaml, trials.csv / .json,
plots, best-run/) are made in a staging folder and moved in when a tune ends.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .config import RunConfig
from .errors import PeftkitError, first_line
from .files import private_dir, write_json
from .strategies.base import TUNED_SETTINGS, Schedule, Strategy, TrainingDefaults, default_point, options_from_dict

if TYPE_CHECKING:  # pragma: no cover
    import optuna

Echo = Callable[[str], None]

PRUNERS = ("median", "hyperband", "none")
STUDY_FILE = "study.db"
MARKER = "tune.json"
# metrics where lower is better, when one other than the task's own selection metric is tuned
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae")
# While a trial runs, its process records a heartbeat in the study every HEARTBEAT_S seconds; a
# RUNNING trial whose last one is older than STALE_AFTER_S was left by a process that stopped
# without telling the study (SIGKILL, the OOM killer, a machine that went down). Each beat is a
# write to the shared database (an SQLite file every process on the study locks), so no more often
# than this; the grace is four beats, so a live process whose beats are late (a busy database, a
# loaded machine) is never taken for dead, while a dead one's trial is re-run within minutes,
# little next to a trial.
HEARTBEAT_S = 30
STALE_AFTER_S = 120
# what an interrupted trial means for the study, said alike wherever one is reported
REPLACED = "it does not count toward --trials; another trial takes its place"


@dataclass
class TuneConfig:
    """What ``peftkit tune`` was asked to do. ``run`` holds the settings every trial shares (a
    ``RunConfig``: strategy, data, model, lengths, seed, ...); the run settings and strategy options
    it sets (``lr``, ``epochs``, ``--set``) are fixed, never searched."""

    run: RunConfig
    trials: int = 20
    """How many trials the study should hold when this tune ends (those already there count)."""
    timeout: str | float | None = None
    """Start no trial after this long: seconds, or a duration such as 90s, 30m, 2h, 1h30m."""
    storage: str | None = None
    """An SQLAlchemy database URL (default: sqlite:///OUTPUT_DIR/study.db)."""
    study_name: str | None = None
    """Default: tune-<strategy>."""
    metric: str | None = None
    """The validation metric to optimise (default: the task's selection metric)."""
    pruner: Any = "median"
    """median, hyperband, none, or (from Python) any ``optuna.pruners.BasePruner``."""
    space: dict[str, list[Any]] = field(default_factory=dict)
    """Replace a searched setting's range by these values (``--space r=4,8,16``)."""
    output_dir: str | None = None
    """Default: runs/tune-<strategy>-<timestamp>."""
    overwrite: bool = False

    def validate(self) -> None:
        """Raise ``PeftkitError`` for settings no tune could use."""
        self.run.validate()
        if not isinstance(self.trials, int) or isinstance(self.trials, bool) or self.trials < 1:
            raise PeftkitError(f"--trials must be a positive integer, got {self.trials!r}")
        if self.timeout is not None:
            parse_duration(self.timeout)
        if isinstance(self.pruner, str) and self.pruner not in PRUNERS:
            raise PeftkitError(f"unknown pruner {self.pruner!r}; accepted: {', '.join(PRUNERS)}")


@dataclass
class TunePlan:
    """A tune, checked and resolved: what every trial shares and how the study is searched."""

    config: TuneConfig
    strategy: type[Strategy]
    base: RunConfig  # task, model, dataset, columns and length resolved
    fixed: dict[str, Any]  # settings and options the user set: not searched
    metric: str
    direction: str  # maximize or minimize
    output_dir: str
    storage: str
    study_name: str
    # the epochs and early stopping a plain run with the defaults gets on this training set
    schedule: Schedule | None = None

    @property
    def defaults(self) -> TrainingDefaults:
        """The strategy's defaults with the epochs a plain run trains on this training set (raised
        on a small one, ``Strategy.schedule``): trial 0's values and the centre of the searched
        epochs."""
        d = self.strategy.defaults
        return d if self.schedule is None else dataclasses.replace(d, epochs=self.schedule.epochs)

    @property
    def identity(self) -> dict[str, Any]:
        """What a study was made for: another tune is refused on it. The data settings are part of
        it because a trial's value depends on them: a study continued on another subset, split
        seed or length would rank trials measured on different data against each other."""
        b = self.base
        return {
            "strategy": self.strategy.name,
            "task": b.task,
            "model": b.model,
            "dataset": b.dataset,
            "metric": self.metric,
            "seed": b.seed,
            "max_train_samples": b.max_train_samples,
            "max_eval_samples": b.max_eval_samples,
            "max_length": b.max_length,
            "text_column": b.text_column,
            "label_column": b.label_column,
        }


# -- parsing ----------------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def parse_duration(value: str | float | int, flag: str = "--timeout") -> float:
    """``90s``, ``30m``, ``2h``, ``1h30m``, ``1d`` or plain seconds -> seconds (positive); ``flag``
    names the option in a refusal."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise PeftkitError(f"{flag} {value!r} is not a duration; give e.g. 90s, 30m, 2h or 1h30m") from None
        seconds = sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if not seconds > 0:
        raise PeftkitError(f"{flag} must be positive, got {value!r}; give e.g. 90s, 30m, 2h or 1h30m")
    return seconds


def parse_space(items: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """``["r=4,8,16", "lr=1e-4,1e-3"]`` -> ``{"r": [4, 8, 16], "lr": [0.0001, 0.001]}`` (values as YAML
    scalars)."""
    from .typing_utils import parse_scalar

    out: dict[str, list[Any]] = {}
    for item in items:
        name, sep, values = item.partition("=")
        choices = [parse_scalar(v.strip()) for v in values.split(",") if v.strip()]
        if not sep or not name.strip() or not choices:
            raise PeftkitError(f"--space expects NAME=VALUE,VALUE,..., got {item!r}")
        out[name.strip().replace("-", "_")] = choices
    return out


def metric_direction(task: Any, metric: str) -> str:
    """``maximize`` or ``minimize``: the task's selection metric goes the way its ``score`` does
    (losses are negated there); other metrics by name."""
    if metric == task.selection_metric:
        return "maximize" if task.score({metric: 1.0}) > task.score({metric: 0.0}) else "minimize"
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


def check_metric(task: Any, metric: str | None) -> str:
    """The metric to tune: ``metric``, or the task's selection metric; one the task does not
    report is refused with those it does."""
    known = list(dict.fromkeys((task.selection_metric, *task.headline_metrics, "loss")))
    if metric is None:
        return task.selection_metric
    if metric not in known:
        raise PeftkitError(f"--metric {metric!r} is not a metric of task {task.name!r}; accepted: {', '.join(known)}")
    return metric


def fixed_settings(run: RunConfig) -> dict[str, Any]:
    """The settings a search space could suggest that the user set: run settings and options."""
    fixed = {k: getattr(run, k) for k in TUNED_SETTINGS if getattr(run, k) is not None}
    return {**fixed, **run.strategy_options}


def check_space(strategy: type[Strategy], fixed: dict[str, Any], space: dict[str, list[Any]]) -> None:
    """Refuse a ``--space`` name the strategy does not search, one also fixed, and values its
    options or the run settings would refuse."""
    searched = [k for k in default_point(strategy, overrides=fixed) if k not in fixed]
    for name, choices in space.items():
        if name in fixed:
            raise PeftkitError(f"--space {name} and a fixed {name} ({fixed[name]!r}) were both given; drop one")
        if name not in searched:
            raise PeftkitError(
                f"--space {name!r}: strategy {strategy.name!r} does not search it; it searches: "
                f"{', '.join(searched)} (fix any option with --set)"
            )
        for value in choices:
            if name in TUNED_SETTINGS:
                RunConfig(**{name: value}).validate()
            else:
                options_from_dict(strategy, {name: value})


# -- the study ----------------------------------------------------------------------------------


def masked(url: str) -> str:
    """A storage URL with its password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: shown as given (it holds no password then)
        return url


def open_storage(url: str) -> Any:
    """An optuna ``RDBStorage`` on ``url``, with heartbeats (see ``HEARTBEAT_S``); a URL that is
    malformed, names a missing driver or cannot be reached is one line."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=STALE_AFTER_S)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's and the drivers' errors differ: one line each
        raise PeftkitError(
            f"cannot open storage {masked(url)!r}: {first_line(exc)}; give an SQLAlchemy "
            "database URL such as sqlite:///study.db or postgresql://user@host/db"
        ) from None


def pruning_grace(schedule: Schedule | None) -> int:
    """The first epoch after which a trial may be pruned: the first at which a plain run with the
    defaults could stop early (its patience + 1), or 1 where the defaults do not stop early.

    On a small training set validation sits at the majority rate for the first epochs and then
    rises (issue 19); a median pruner judging epoch 1 there pruned every trial that started like
    the defaults (bench --tune on 1,000 examples: 5 of the adapter's 8 trials, all at the defaults'
    own epoch-1 value)."""
    if schedule is None or not schedule.early_stopping_patience:
        return 1
    return schedule.early_stopping_patience + 1


def make_pruner(pruner: Any, grace: int = 1) -> Any:
    """The optuna pruner ``pruner`` names (an object is used as it is), judging no trial before
    epoch ``grace`` (``pruning_grace``)."""
    import optuna

    if not isinstance(pruner, str):
        return pruner
    return {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=grace),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=grace),
        "none": optuna.pruners.NopPruner,
    }[pruner]()


class StudyMismatch(PeftkitError):
    """The study exists and was made for other settings; ``mismatch`` says how, without tune's
    advice (a bench gives its own: another ``--tune-storage``)."""

    def __init__(self, message: str, mismatch: str) -> None:
        super().__init__(message)
        self.mismatch = mismatch


def open_study(plan: TunePlan, storage: Any, echo: Echo) -> optuna.Study:
    """Load the plan's study, or create it with trial 0 (the defaults) queued. A study made for
    another strategy, task, model, dataset or metric is refused unless ``overwrite`` (then it is
    deleted and made afresh)."""
    import optuna

    name = plan.study_name
    exists = name in optuna.get_all_study_names(storage)
    if exists:
        made_for = optuna.load_study(study_name=name, storage=storage).user_attrs.get("peftkit")
        differs = _differences(made_for, plan.identity)
        if differs is not None and not plan.config.overwrite:
            mine = {k: plan.identity.get(k) for k in differs} if differs else plan.identity
            mismatch = (
                f"study {name!r} in {masked(plan.storage)} was made for {_describe(differs)}, not {_describe(mine)}"
            )
            raise StudyMismatch(
                f"{mismatch}; choose another --study-name or --output-dir, or --overwrite to start it afresh", mismatch
            )
        if differs is not None:
            optuna.delete_study(study_name=name, storage=storage)
            exists = False
    trials_done = 0 if not exists else len(optuna.load_study(study_name=name, storage=storage).trials)
    # seeded, and different for each process joining the study at another point; constant_liar
    # keeps processes that run at the same time from trying the same point
    sampler = optuna.samplers.TPESampler(seed=plan.base.seed * 100_003 + trials_done, constant_liar=True)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=plan.direction,
        sampler=sampler,
        pruner=make_pruner(plan.config.pruner, pruning_grace(plan.schedule)),
        load_if_exists=True,
    )
    if not study.user_attrs.get("peftkit"):
        study.set_user_attr("peftkit", plan.identity)
        study.set_user_attr("settings", plan.base.to_dict())
    if not study.trials:
        study.enqueue_trial(trial_zero(plan), user_attrs={"defaults": True}, skip_if_exists=True)
        echo(
            f"tune: new study {name!r} in {masked(plan.storage)}; trial #0 is the defaults of "
            f"{plan.strategy.name}; it ends when {plan.config.trials} trials have finished (complete, pruned or "
            "failed; an interrupted one is replaced)"
        )
    else:
        echo(f"tune: continuing study {name!r} in {masked(plan.storage)}: {still_to_run(TrialCounts.of(study), plan)}")
    return study


def still_to_run(counts: TrialCounts, plan: TunePlan) -> str:
    """``6 trials: 4 complete, 1 pruned, 1 failed; 5 of --trials 8 finished, 3 to go``: where a study
    stands against ``--trials``, in the words every line uses."""
    goal = plan.config.trials
    left = f"{goal - counts.finished} to go" if counts.finished < goal else "none to go"
    return f"{counts.describe()}; {counts.finished} of --trials {goal} finished, {left}"


def _differences(made_for: dict[str, Any] | None, identity: dict[str, Any]) -> dict[str, Any] | None:
    """What of ``made_for`` (a study's record) ``identity`` does not match: None where it matches,
    ``{}`` for a study peftkit did not make. A record without a key (a study from a peftkit
    before the key was recorded) is not judged on it."""
    if not made_for:
        return {}
    differs = {k: v for k, v in made_for.items() if identity.get(k) != v}
    return differs or None


def _describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "something other than peftkit tune"
    return ", ".join(f"{k} {v}" for k, v in identity.items())


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
    from .benchmark import stop_worker

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
            stop_worker(proc)
            raise
        finally:
            events.close()
            with contextlib.suppress(OSError):
                verdicts.close()
        report = _read_report(result_path, proc.returncode, workdir)
    return _outcome(report, values, plan.direction, time.perf_counter() - start)


def _start_worker(cfg: RunConfig, plan: TunePlan, workdir: str, tmp: str, log: Any) -> tuple[Any, Any, Any, str]:
    """Start ``peftkit.tune_worker`` on ``cfg`` in a session of its own (a Ctrl-C at the terminal
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
        proc = subprocess.Popen(
            [sys.executable, "-m", "peftkit.tune_worker", spec_path],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            pass_fds=(ev_write, vd_read),
            start_new_session=True,
        )
    finally:
        os.close(ev_write)
        os.close(vd_read)
    return proc, os.fdopen(ev_read, "r"), os.fdopen(vd_write, "w"), result_path


def _read_report(result_path: str, code: int, workdir: str) -> dict[str, Any]:
    if os.path.exists(result_path):
        with open(result_path, encoding="utf-8") as fh:
            return json.load(fh)
    why = (
        f"killed by signal {-code}" + (" (the system ran out of memory?)" if code == -9 else "")
        if code < 0
        else f"exited with status {code}"
    )
    return {"status": "failed", "error": f"worker process {why} before reporting; see {workdir}/worker.log"}


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


# -- the search ---------------------------------------------------------------------------------


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


def fail_stale_trials(study: optuna.Study, echo: Echo) -> int:
    """Fail the trials a process that stopped (killed, out of memory, its machine down) left
    RUNNING: no heartbeat for ``STALE_AFTER_S``. They are marked ``interrupted`` as Ctrl-C marks a
    trial, so they do not count and the study runs others in their place (the defaults trial is
    queued again); a line each. Trials that live processes run keep beating and are left alone; a
    storage without heartbeats has none to fail. Returns how many this call failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    from .bench_report import _minutes

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return 0
    why = f"no heartbeat for over {_minutes(STALE_AFTER_S)}"
    failed = 0
    # optuna.storages.fail_stale_trials would fail them too, but its callback comes once a trial is
    # finished, when its attributes can no longer be written: so they are marked first, then failed
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_user_attr(trial_id, "error", f"interrupted: the process running it stopped ({why})")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process failed it first (and said so)
            continue
        trial = storage.get_trial(trial_id)
        _queue_defaults_again(study, trial)
        echo(
            f"tune: trial #{trial.number} was left running by a process that stopped ({why}): marked "
            f"interrupted ({REPLACED})"
        )
        failed += 1
    return failed


def _queue_defaults_again(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue the defaults again when ``trial``, the defaults trial, did not run its course: the
    tuned result is never worse than the defaults only if they do run."""
    if trial.user_attrs.get("defaults"):
        study.enqueue_trial(trial.system_attrs.get("fixed_params", trial.params), user_attrs={"defaults": True})


def optimize(study: optuna.Study, plan: TunePlan, echo: Echo) -> int:
    """Run trials until the study counts ``trials`` of them or the timeout passes; a line per
    trial. Before each, trials left running by a process that stopped are failed
    (``fail_stale_trials``); while one runs, its heartbeat is kept. Returns how many this call ran.
    Ctrl-C marks the running trial failed (``interrupted``) and raises ``RunInterrupted`` saying how
    to continue."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._heartbeat import get_heartbeat_thread

    from .errors import RunInterrupted

    cfg = plan.config
    deadline = time.monotonic() + parse_duration(cfg.timeout) if cfg.timeout is not None else None
    ran: list[float] = []
    while counted(study) < cfg.trials and (deadline is None or time.monotonic() < deadline):
        fail_stale_trials(study, echo)
        with warnings.catch_warnings():
            # optuna warns that heartbeats are meant for its optimize(): here they are kept below
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            trial = study.ask()
        try:
            # ask/tell: the asking process keeps the heartbeat, as optuna's own optimize does
            with get_heartbeat_thread(trial._trial_id, study._storage):
                values = plan.strategy.search_space(SearchTrial(trial, plan.fixed, cfg.space), plan.defaults)
                run_cfg = trial_config(plan, values, os.path.join(plan.output_dir, "trials", f"{trial.number:04d}"))
                outcome = run_trial(trial, run_cfg, plan, prunable=not trial.user_attrs.get("defaults"))
            _tell(study, trial, outcome)
        except UpdateFinishedTrialError:  # its heartbeat was late past the grace: another process failed it
            echo(
                f"tune: trial #{trial.number} was marked interrupted by another process while it ran (its "
                f"heartbeat was late): its result is dropped ({REPLACED})"
            )
            continue
        except KeyboardInterrupt:
            _mark_interrupted(study, trial)
            raise RunInterrupted(
                f"trial #{trial.number} was stopped and marked interrupted ({REPLACED}); study "
                f"{plan.study_name!r} in {masked(plan.storage)} keeps "
                f"{still_to_run(TrialCounts.of(study), plan)}: run the same peftkit tune command "
                "again to continue it"
            ) from None
        ran.append(outcome.seconds)
        name = f"#{trial.number} (the defaults)" if trial.user_attrs.get("defaults") else f"#{trial.number}"
        echo(progress_line(study, plan, name, values, outcome, ran, deadline))
        if outcome.status == "refused":
            raise PeftkitError(outcome.error or "the trial was refused")
    return len(ran)


def _mark_interrupted(study: optuna.Study, trial: Any) -> None:
    """Fail ``trial``, which Ctrl-C (or kill) stopped, as interrupted, with an error that says so
    (trials.csv would otherwise show an empty one); the defaults are queued again. A trial the
    study already holds as finished (the stop came just after it was told) stays as it is."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("error", "interrupted: the tune was stopped (Ctrl-C or kill) while it ran")
        study.tell(trial, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, RuntimeError, ValueError):
        return
    _queue_defaults_again(study, study._storage.get_trial(trial._trial_id))


def _tell(study: optuna.Study, trial: Any, outcome: TrialOutcome) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("seconds", round(outcome.seconds, 2))
    if outcome.correct:
        trial.set_user_attr("validation_correct", outcome.correct)
    if outcome.status == "ok":
        study.tell(trial, outcome.value)
        return
    if outcome.error:
        trial.set_user_attr("error", f"{outcome.status}: {outcome.error}")
    study.tell(trial, state=TrialState.PRUNED if outcome.status == "pruned" else TrialState.FAIL)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def progress_line(
    study: optuna.Study,
    plan: TunePlan,
    name: str,
    values: dict[str, Any],
    outcome: TrialOutcome,
    ran: list[float],
    deadline: float | None,
) -> str:
    """``trial #2: lr=0.0012, r=8 -> validation accuracy 0.8125 (best so far: trial #0, 0.8200); 12 s;
    3 of --trials 10 finished, about 1m24s left``. ``name`` is ``#N``, the trial's number in the study
    (trials.csv's ``number``, its folder trials/NNNN, trial #0 the defaults), the one way every
    message names a trial; the count says what it counts (finished: complete, pruned or failed)."""
    from .bench_report import _minutes

    done = counted(study)
    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items() if k not in plan.fixed)
    if outcome.status == "ok":
        result = f"validation {plan.metric} {outcome.value:.4f}"
    elif outcome.status == "pruned":
        result = f"pruned after epoch {len(outcome.epochs)} (validation {plan.metric} {outcome.epochs[-1]:.4f})"
    else:
        result = f"{outcome.status}: {outcome.error}"
    try:
        best = f"best so far: trial #{study.best_trial.number}, {study.best_value:.4f}"
    except ValueError:  # no complete trial yet
        best = "no trial complete yet"
    left = max(0, plan.config.trials - done) * (sum(ran) / len(ran))
    if deadline is not None:
        left = min(left, max(0.0, deadline - time.monotonic()))
    return (
        f"trial {name}: {shown or 'defaults'} -> {result} ({best}); {_minutes(outcome.seconds)}; "
        f"{done} of --trials {plan.config.trials} finished, about {_minutes(left)} left"
    )


# -- the output directory -------------------------------------------------------------------------


def prepare_output(plan: TunePlan) -> None:
    """Make (or find) the output directory. One that holds another tune's study, or anything but a
    tune, is refused unless ``overwrite`` (then it is emptied: its study and reports go)."""
    from .rundir import check_output_dir

    out, overwrite = plan.output_dir, plan.config.overwrite
    marker = os.path.join(out, MARKER)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        if not os.path.exists(marker):
            raise PeftkitError(
                f"output directory {out!r} exists and holds no peftkit tune ({MARKER}); use "
                "--overwrite to replace it or choose another --output-dir"
            )
        with open(marker, encoding="utf-8") as fh:
            recorded = json.load(fh)
        if recorded.get("study_name") != plan.study_name or recorded.get("storage") != masked(plan.storage):
            raise PeftkitError(
                f"output directory {out!r} holds the tune of study {recorded.get('study_name')!r} in "
                f"{recorded.get('storage')}, not {plan.study_name!r} in {masked(plan.storage)}; "
                "give the same --storage and --study-name to continue it, another --output-dir, "
                "or --overwrite"
            )
        return
    check_output_dir(out, overwrite=True)
    if os.path.isdir(out) and overwrite:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    write_json(marker, {"study_name": plan.study_name, "storage": masked(plan.storage), **plan.identity})


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
    from .files import publish_modes

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


def best_config(plan: TunePlan, study: optuna.Study) -> RunConfig:
    """The best trial's run settings, every default resolved, ready for ``peftkit run``."""
    best = study.best_trial
    values = plan.strategy.search_space(_Replay(best.params, plan.fixed), plan.defaults)
    cfg = trial_config(plan, values, "unused")
    cfg.output_dir = None
    return cfg


class _Replay(SearchTrial):
    """A finished trial's parameters answered again (fixed settings as before)."""

    def __init__(self, params: dict[str, Any], fixed: dict[str, Any]) -> None:
        super().__init__(None, fixed, {})
        self.params = params

    def _pick(self, name: str, suggest: Callable[[], Any]) -> Any:
        return self.fixed[name] if name in self.fixed else self.params[name]


# -- how sure the selection is ------------------------------------------------------------------


def versus_defaults(study: optuna.Study) -> dict[str, Any] | None:
    """The best trial against the defaults' (trial 0) on the same validation examples: the
    difference in accuracy points with its 95% interval and p-value (``stats.paired_bootstrap``
    and exact McNemar, as a bench compares strategies), and whether it is more than validation
    noise. None where either trial recorded no per-example validation (a metric other than
    accuracy, a study from before this was recorded, a defaults trial that did not complete) or
    the defaults are the best.

    Why: on a few hundred validation examples one example is a third of a point, and the best of N
    trials is the luckiest of N draws as much as the best configuration; a gain within the noise
    should not be taken for a better configuration."""
    from .stats import from_bits, paired_bootstrap

    try:
        best = study.best_trial
    except ValueError:
        return None
    defaults = next(
        (
            t
            for t in study.get_trials(deepcopy=False)
            if t.user_attrs.get("defaults") and t.user_attrs.get("validation_correct")
        ),
        None,
    )
    if defaults is None or best.user_attrs.get("defaults") or not best.user_attrs.get("validation_correct"):
        return None
    a, b = from_bits(best.user_attrs["validation_correct"]), from_bits(defaults.user_attrs["validation_correct"])
    if len(a) != len(b):
        return None
    c = paired_bootstrap([a], [b])
    return {
        "best_trial": best.number,
        "defaults_trial": defaults.number,
        "examples": c.examples,
        "best": sum(a) / len(a),
        "defaults": sum(b) / len(b),
        "difference": c.difference,
        "low": c.low,
        "high": c.high,
        "bootstrap_p": c.bootstrap_p,
        "mcnemar_p": c.mcnemar_p,
        "p_value": c.p_value,
        "best_only": c.a_only,
        "defaults_only": c.b_only,
        "distinguishable": c.distinguishable(),
    }


def describe_versus_defaults(v: dict[str, Any]) -> str:
    """``+1.8 points [-0.2, +3.9] over the defaults (trial #0) on 1,275 validation examples, p = 0.086:
    within validation noise: not distinguishable from the defaults at 95%`` (or ``...: beyond validation noise``)."""
    verdict = (
        "beyond validation noise"
        if v["distinguishable"]
        else "within validation noise: not distinguishable from the defaults at 95%"
    )
    return (
        f"{100 * v['difference']:+.1f} points [{100 * v['low']:+.1f}, {100 * v['high']:+.1f}] over the defaults "
        f"(trial #{v['defaults_trial']}) on {v['examples']:,} validation examples, p = {v['p_value']:.2g}: {verdict}"
    )


# -- reports ------------------------------------------------------------------------------------


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """Every trial as plain data: number, state (``trial_state``), value, parameters, each epoch's
    value, time, error (an interrupted trial's says so, also where a study from before this was
    recorded has none)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        interrupted = bool(t.user_attrs.get("interrupted"))
        rows.append(
            {
                "number": t.number,
                "state": trial_state(t),
                "value": t.value,
                "defaults": bool(t.user_attrs.get("defaults")),
                "params": dict(t.params),
                "epochs": {str(k): v for k, v in sorted(t.intermediate_values.items())},
                "seconds": t.user_attrs.get("seconds"),
                "error": t.user_attrs.get("error") or ("interrupted" if interrupted else None),
                "interrupted": interrupted,
                "validation_correct": t.user_attrs.get("validation_correct"),
            }
        )
    return rows


def defaults_won(study: optuna.Study) -> bool:
    """Whether the study's best trial is the defaults (trial #0, or the defaults queued again after
    it was interrupted): no tuned setting beat them on validation (a tie keeps the earlier trial)."""
    return bool(study.best_trial.user_attrs.get("defaults"))


def describe_best(
    counts: TrialCounts, number: int, metric: str, value: float, params: dict[str, Any], defaults_best: bool
) -> list[str]:
    """The end of a tune in words: ``best: trial #3, validation accuracy 0.8125 (lr=0.0012, r=8); of 6
    trials: 4 complete, 1 pruned, 1 failed``, and where the defaults won, a second line saying so
    (their settings are then no finding of the search, and should not be read as one)."""
    shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    shown = shown or "no searched setting"
    who = f"trial #{number} (the defaults)" if defaults_best else f"trial #{number}"
    lines = [f"best: {who}, validation {metric} {value:.4f} ({shown}); of {counts.describe()}"]
    if defaults_best:
        lines.append(
            f"the defaults were best: no tuned setting beat them on validation {metric} "
            f"(over {counts.complete} complete trial{'s' if counts.complete != 1 else ''})"
        )
    return lines


def write_reports(
    stage: str, plan: TunePlan, study: optuna.Study, best: RunConfig, best_run: dict[str, Any]
) -> list[str]:
    """best.yaml, trials.json, trials.csv and the plots into ``stage``; returns the plots' names."""
    rows = trial_rows(study)
    counts = TrialCounts.of(study)
    summary = {
        "study_name": plan.study_name,
        "storage": masked(plan.storage),
        **plan.identity,
        "direction": plan.direction,
        "trials": len(rows),
        "counted": counts.finished,
        "counts": {**dataclasses.asdict(counts), "finished": counts.finished, "total": counts.total},
        "best_trial": study.best_trial.number,
        "best_value": study.best_value,
        "best_params": study.best_trial.params,
        "defaults_best": defaults_won(study),
        "versus_defaults": versus_defaults(study),
        "best_run": best_run,
        "rows": rows,
    }
    write_json(os.path.join(stage, "trials.json"), summary)
    _write_csv(os.path.join(stage, "trials.csv"), rows)
    _write_best_yaml(os.path.join(stage, "best.yaml"), plan, study, best)
    return write_plots(study, stage, plan.metric)


def _csv_cell(value: Any) -> Any:
    """A number as a person reads it: six significant digits, so a float32 metric's
    0.7200000286102295 reads 0.72 (trials.json keeps every digit); None as an empty cell."""
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _write_csv(path: str, rows: list[dict[str, Any]]) -> None:
    params = list(dict.fromkeys(k for r in rows for k in r["params"]))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        # the per-epoch values have their own name: "epochs" is also a searched setting's
        writer.writerow(["number", "state", "value", "defaults", "seconds", "validation_per_epoch", *params, "error"])
        for r in rows:
            epochs = json.dumps({k: float(f"{v:.6g}") for k, v in r["epochs"].items()})
            writer.writerow(
                [
                    _csv_cell(x)
                    for x in (
                        r["number"],
                        r["state"],
                        r["value"],
                        r["defaults"],
                        r["seconds"],
                        epochs,
                        *(r["params"].get(p) for p in params),
                        r["error"],
                    )
                ]
            )


def _write_best_yaml(path: str, plan: TunePlan, study: optuna.Study, best: RunConfig) -> None:
    import yaml

    values = {k: v for k, v in best.to_dict().items() if k not in ("output_dir", "overwrite")}
    header = (
        f"# peftkit tune: trial #{study.best_trial.number}, the best of study {plan.study_name!r} "
        f"({TrialCounts.of(study).describe()}): validation {plan.metric} {study.best_value:.6g}\n"
        + ("# the defaults were best: no tuned setting beat them\n" if defaults_won(study) else "")
        + "# reproduce it: peftkit run --config best.yaml [--output-dir DIR]\n"
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(header)
        yaml.safe_dump(values, fh, sort_keys=False)


# how each kind of trial is drawn in optimization_history.png: (state, marker, colour, legend label)
HISTORY_MARKS = (
    ("complete", "o", "tab:blue", "complete"),
    ("pruned", "x", "tab:orange", "pruned (at its last epoch's value)"),
    ("failed", "v", "tab:red", "failed (at its last epoch's value)"),
    ("interrupted", "s", "tab:gray", "interrupted (at its last epoch's value)"),
)


def history_points(study: optuna.Study) -> dict[str, list[tuple[int, float | None]]]:
    """Each finished or interrupted trial as ``(number, value)`` by state: a complete trial's value,
    or the last epoch's validation a pruned, failed or interrupted one reported (None where it
    reported none: it is drawn on the x axis)."""
    points: dict[str, list[tuple[int, float | None]]] = {state: [] for state, *_ in HISTORY_MARKS}
    for t in study.get_trials(deepcopy=False):
        state = trial_state(t)
        if state not in points:  # running or waiting: no result yet
            continue
        last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
        points[state].append((t.number, t.value if state == "complete" else last))
    return points


def plot_history(study: optuna.Study, metric: str) -> Any:
    """The study's optimisation history as a matplotlib figure: every trial by number, each state
    marked differently with a legend, and the best complete value so far as a line. Optuna's own
    plot draws complete trials only, which hides how many trials the pruner and failures cost."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    points = history_points(study)
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    complete = sorted(points["complete"])
    if complete:  # the best so far, as a step line under the points
        pick = max if study.direction.name == "MAXIMIZE" else min
        best = [pick(v for _, v in complete[: i + 1]) for i in range(len(complete))]
        ax.step([n for n, _ in complete], best, where="post", color="tab:green", label="best so far")
    handles = []
    for state, marker, colour, label in HISTORY_MARKS:
        valued = [(n, v) for n, v in points[state] if v is not None]
        if valued:
            ax.scatter([n for n, _ in valued], [v for _, v in valued], marker=marker, color=colour, label=label)
        bare = [n for n, v in points[state] if v is None]
        if bare:  # no value to place it by: on the x axis, in axes coordinates, so it is seen
            ax.scatter(
                bare,
                [0.0] * len(bare),
                marker=marker,
                color=colour,
                clip_on=False,
                zorder=3,
                transform=ax.get_xaxis_transform(),
            )
            handles.append(
                Line2D(
                    [], [], linestyle="", marker=marker, color=colour, label=f"{state} (no validation: on the x axis)"
                )
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # trial numbers: no trial 2.5
    ax.set_xlabel("trial #")
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"Optimisation history: {TrialCounts.of(study).describe()}")
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, fontsize="small")
    return fig


def write_plots(study: optuna.Study, stage: str, metric: str = "value") -> list[str]:
    """optimization_history.png (every trial, ``plot_history``), and param_importances.png when at
    least two parameters vary over at least three complete trials (importance needs some spread to
    mean anything)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none assumed
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    written = []
    figures = [("optimization_history.png", lambda: plot_history(study, metric))]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len({k for t in complete for k in t.params}) >= 2 and len(complete) >= 3:
        figures.append(("param_importances.png", lambda: _figure(ovm.plot_param_importances(study))))
    for name, make in figures:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # optuna's ExperimentalWarning for its matplotlib plots
            try:
                fig = make()
            except (ValueError, RuntimeError, ZeroDivisionError):  # e.g. every value equal: no importance
                continue
        fig.tight_layout()
        fig.savefig(os.path.join(stage, name), dpi=110)
        plt.close(fig)
        written.append(name)
    return written


def _figure(ax: Any) -> Any:
    """The figure of what an optuna matplotlib plot returns (an axes, or an array of them)."""
    return ax.figure if hasattr(ax, "figure") else ax.flat[0].figure


__all__ = [
    "PRUNERS",
    "TunePlan",
    "SearchTrial",
    "TrialCounts",
    "TuneConfig",
    "best_config",
    "check_metric",
    "check_space",
    "counted",
    "defaults_won",
    "describe_best",
    "fail_stale_trials",
    "fixed_settings",
    "history_points",
    "metric_direction",
    "open_storage",
    "open_study",
    "optimize",
    "parse_duration",
    "parse_space",
    "plot_history",
    "prepare_output",
    "run_trial",
    "staged_reports",
    "trial_state",
    "trial_zero",
    "write_reports",
]
