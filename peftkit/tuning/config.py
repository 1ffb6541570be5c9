"""What ``peftkit tune`` was asked to do (``TuneConfig``), and the same checked and resolved
(``TunePlan``, made by ``plan_tune``): the strategy, the settings every trial shares and those the
user fixed, the metric and its direction, the output directory and the study's storage and name.

The checks of ``--metric`` and ``--space`` and the parser of ``--space`` are here too; durations
(``--timeout``) are read by ``peftkit.durations.parse_duration``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import RunConfig, default_output_dir
from ..data import resolved_columns
from ..durations import parse_duration
from ..env import quiet_libraries_in_own_process
from ..errors import PeftkitError
from ..registry import get_strategy
from ..settings import PRUNERS, setting
from ..strategies.base import TUNED_SETTINGS, Schedule, Strategy, TrainingDefaults, default_point, options_from_dict
from ..tasks import with_task_defaults
from ..train import resolve
from ..typing_utils import parse_scalar
from .storage import open_storage

Echo = Callable[[str], None]

STUDY_FILE = "study.db"
MARKER = "tune.json"
# metrics where lower is better, when one other than the task's own selection metric is tuned
LOWER_IS_BETTER = ("loss", "perplexity", "mse", "mae")


@dataclass
class TuneConfig:
    """What ``peftkit tune`` was asked to do. ``run`` holds the settings every trial shares (a
    ``RunConfig``: strategy, seed, ... and the model and data settings of ``DataSettings``, a run's
    and a bench's too); the run settings and strategy options it sets (``lr``, ``epochs``, ``--set``)
    are fixed, never searched."""

    run: RunConfig
    trials: int = setting("trials")
    timeout: str | float | None = setting("timeout")
    """Start no trial after this long: seconds (from Python), or a duration such as 90s, 30m, 2h, 1h30m."""
    storage: str | None = setting("storage")
    study_name: str | None = setting("study_name")
    metric: str | None = setting("metric")
    pruner: Any = setting("pruner")
    """median, hyperband, none, or (from Python) any ``optuna.pruners.BasePruner``."""
    space: dict[str, list[Any]] = setting("space")
    output_dir: str | None = setting("tune:output_dir")
    overwrite: bool = setting("tune:overwrite")

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


def parse_space(items: list[str] | tuple[str, ...]) -> dict[str, list[Any]]:
    """``["r=4,8,16", "lr=1e-4,1e-3"]`` -> ``{"r": [4, 8, 16], "lr": [0.0001, 0.001]}`` (values as YAML
    scalars)."""
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


# -- the plan -----------------------------------------------------------------------------------


def check_tune(config: TuneConfig) -> type[Strategy]:
    """Refuse what no tune could use, in milliseconds: the settings, the strategy (its class is
    returned) and the options it was given. ``plan_tune`` checks it again, cheaply."""
    config.validate()
    cls = get_strategy(config.run.strategy)
    options_from_dict(cls, config.run.strategy_options)
    return cls


def plan_tune(config: TuneConfig, echo: Echo) -> TunePlan:
    """``config`` checked and resolved, before anything is written or trained: the strategy and its
    fixed options (``check_tune``), the task's defaults, the metric, ``--space``, what a run would
    refuse, the storage, and the data's columns (read once here, said once). The model and dataset
    named are the caller's to check, between ``check_tune`` and this (``peftkit.api.check_inputs``)."""
    cls = check_tune(config)
    base = dataclasses.replace(config.run, strategy=cls.name, output_dir=None, overwrite=False)
    task, filled = with_task_defaults(base)
    base = dataclasses.replace(base, **filled)
    metric = check_metric(task, config.metric)
    fixed = fixed_settings(base)
    check_space(cls, fixed, config.space)
    resolve(dataclasses.replace(base))  # levers, trackers, options: what a run would refuse
    if config.storage:
        open_storage(config.storage)  # malformed or unreachable: said before the data loads
    quiet_libraries_in_own_process()
    data = task.load_data(base)
    base = dataclasses.replace(base, **resolved_columns(data))
    for line in [*data.notes, *task.data_warnings(data)]:
        echo(line)
    # the epochs (and early stopping) a plain run gets on this training set: trial 0 and the
    # searched range start from them, not from the strategy's figure for a large one
    schedule = cls(options_from_dict(cls, base.strategy_options)).schedule(
        data.split_info["sizes"]["train"],
        base.batch_size or cls.defaults.batch_size,
        base.grad_accumulation,
        epochs=base.epochs,
        patience=base.early_stopping_patience,
    )
    if schedule.how == "raised":
        echo(f"tune: {schedule.reason}; trials search epochs around {schedule.epochs}")
    out = config.output_dir or default_output_dir(f"tune-{cls.name}")
    storage = config.storage or f"sqlite:///{os.path.abspath(out)}/{STUDY_FILE}"
    return TunePlan(
        config,
        cls,
        base,
        fixed,
        metric,
        metric_direction(task, metric),
        out,
        storage,
        config.study_name or f"tune-{cls.name}",
        schedule,
    )
