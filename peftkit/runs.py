"""A run as the library gives it: ``RunResult``, and ``run_config`` / ``resumed_config``, which run
(or continue) one into its staged directory with the caller's config left as it was.

``peftkit.api.run`` and ``api.resume`` check their input and call these; tune's best run is one too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import yaml

from . import train  # execute_run looked up when called (tests patch peftkit.train.execute_run)
from .config import FIELDS, RunConfig, default_output_dir
from .data.sources import IN_MEMORY_PREFIX as DATA_IN_MEMORY
from .env import quiet_libraries_in_own_process
from .errors import LearnedNothingWarning, PeftkitError, set_context
from .metrics import RunMetrics
from .models import IN_MEMORY_PREFIX as MODEL_IN_MEMORY
from .rundir import open_stage, stage_path, staged_run
from .train import load_data_early, resolve

if TYPE_CHECKING:  # pragma: no cover
    from collections.abc import Callable

    from .train import ResolvedRun


@dataclass
class RunResult:
    """A finished run: where it is and what it measured."""

    run_dir: str
    """The run directory (config.yaml, metrics.json, train.log, adapter/)."""
    metrics: RunMetrics | None
    """What metrics.json holds (``metrics.to_dict()`` is the file); None in the other processes of
    a data-parallel run (only the main process writes and reports)."""
    config: RunConfig | None = None
    """The settings the run trained with, every default filled in (what its config.yaml records:
    ``run(result.config)`` trains the same run again). The config given to ``run`` is left as it was."""

    @property
    def adapter_dir(self) -> str:
        """The trained adapter (``run_dir/adapter``): what ``predict`` and ``load_adapter`` take."""
        return os.path.join(self.run_dir, "adapter")


def resumed_config(run_dir: str) -> RunConfig:
    """The settings an interrupted run recorded (its config.yaml) as a ``RunConfig``."""
    path = os.path.join(stage_path(run_dir), "config.yaml")
    if not os.path.exists(path):
        open_stage(run_dir, overwrite=False, resume=True)  # says why there is nothing to resume
        raise PeftkitError(f"interrupted run {run_dir!r} has no config.yaml; it cannot be resumed")
    with open(path, encoding="utf-8") as fh:
        recorded = yaml.safe_load(fh)
    config = RunConfig.from_dict({k: v for k, v in recorded.items() if k in FIELDS})
    config.validate()
    for what, name, prefix in (("a model", config.model, MODEL_IN_MEMORY), ("data", config.dataset, DATA_IN_MEMORY)):
        if isinstance(name, str) and name.startswith(prefix):
            # what it trained on lived in the Python process that started it, and went with it
            raise PeftkitError(
                f"run {run_dir!r} was started from Python with {what} held in memory ({name}), which is "
                "gone with that process; it cannot be resumed: run it again with peftkit.run"
            )
    return config


def run_config(config: RunConfig, resume: bool, echo: Callable[[str], None]) -> RunResult:
    """Train and evaluate as ``config`` says (checked by the caller) into its output directory,
    staged: it appears only when the run succeeded. ``config`` itself is not changed."""
    # resolving fills defaults into the config it is given: a copy, so the caller's stays as given
    resolved = resolve(_copy_config(config))  # unknown strategy or bad options fail here, before anything heavy loads
    set_context(strategy=resolved.strategy.name, model=resolved.config.model)
    out = config.output_dir or default_output_dir(resolved.strategy.name)
    resolved.config.output_dir = out
    started = time.perf_counter()
    quiet_libraries_in_own_process()  # (imports datasets and transformers)
    early = load_data_early(resolved, echo)  # bad data refused before torch and the model load
    with staged_run(out, resolved.config.overwrite, resume, echo) as stage:  # (imports torch and accelerate)
        # those imports are start-up the run's stage_seconds must show: all but the data's reading
        early.imports_before = time.perf_counter() - started - early.seconds
        metrics = train.execute_run(resolved, stage.path, echo, resume=resume, early=early)
    # only the main process writes and reports
    return RunResult(out, RunMetrics.from_dict(metrics) if stage.main else None, _recorded_config(resolved))


def _copy_config(config: RunConfig) -> RunConfig:
    """``config`` with its own copies of the mutable fields (the levers are frozen), so that nothing
    a run fills in reaches the caller's object."""
    return dataclasses.replace(
        config, report_to=list(config.report_to), strategy_options=copy.deepcopy(config.strategy_options)
    )


def _recorded_config(resolved: ResolvedRun) -> RunConfig:
    """The run's settings as its config.yaml records them (the strategy's epochs, batch size and
    learning rate, the schedule the data gave), as a ``RunConfig``."""
    recorded = {k: v for k, v in resolved.as_dict().items() if k in FIELDS}
    return RunConfig.from_dict({**recorded, "overwrite": resolved.config.overwrite})


def warn_if_learned_nothing(result: RunResult) -> RunResult:
    """``LearnedNothingWarning`` for a run that learned nothing, pointing at the caller of ``run`` or
    ``resume``: a library user reads no log line (the CLI prints its own line instead; tune's best
    run is reported by tune)."""
    if result.metrics is not None and result.metrics.learned is False:
        warnings.warn(
            f"run {result.run_dir} learned nothing: {result.metrics.learned_note}", LearnedNothingWarning, stacklevel=3
        )
    return result
