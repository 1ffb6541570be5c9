"""A run: its settings resolved (``resolve``) and a whole run into a directory (``execute_run``):
data and model loaded, the strategy's ``prepare``, the one training loop (``peftkit.loop.fit``),
the adapter and metrics.json written; a tuning trial's run without test (``train_and_validate``).

The loop branches only on what a strategy returns: its parameter groups, its event hooks, its
forward and its adapter state. A difference between two strategies in a benchmark is therefore a
difference between the strategies, not between two copies of a loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from . import checkpoint as ckpt
from .adapter_io import save_adapter
from .config import RunConfig
from .data import cap_eval_splits, resolved_columns
from .env import freeze_imported_objects, package_versions
from .errors import PeftkitError, set_context
from .files import write_json
from .fingerprint import cached_backbone_digests, fingerprint
from .kernels import apply_kernels
from .levers import check_levers, cuda_available, prepare_base

# fit is called from here (and patched here by tests); ResolvedRun, make_loader and torch_param_groups live
# in loop and stay importable from here as before (api, benchmarks use them)
from .loop import ResolvedRun, TrainOutcome, fit, make_loader, torch_param_groups  # noqa: F401
from .models import recorded_base
from .registry import get_strategy
from .strategies.base import Schedule, TaskSpec, options_from_dict, options_to_dict
from .tasks import with_task_defaults


def resolve(cfg: RunConfig) -> ResolvedRun:
    """Look up the strategy and the task, check the options, fill unset values from their defaults
    (the task: from the model when not given; model, data and length: the task's own)."""
    cls = get_strategy(cfg.strategy)
    strategy = cls(options_from_dict(cls, cfg.strategy_options))
    task, filled = with_task_defaults(cfg)
    check_levers(cfg.levers, strategy, task=task)
    for key, value in filled.items():
        setattr(cfg, key, value)
    check_trackers(cfg.report_to)
    d = cls.defaults
    # the strategy's own fields (min_steps, max_epochs, max_warmup_steps) come along
    hp = dataclasses.replace(
        d,
        lr=cfg.lr if cfg.lr is not None else d.lr,
        epochs=cfg.epochs if cfg.epochs is not None else d.epochs,
        batch_size=cfg.batch_size if cfg.batch_size is not None else d.batch_size,
        weight_decay=cfg.weight_decay if cfg.weight_decay is not None else d.weight_decay,
        warmup_ratio=cfg.warmup_ratio if cfg.warmup_ratio is not None else d.warmup_ratio,
    )
    return ResolvedRun(cfg, strategy, hp, task)


def size_schedule(run: ResolvedRun, train_examples: int) -> Schedule:
    """Epochs and early stopping for a training set of ``train_examples`` (``Strategy.schedule``),
    put into ``run``: ``hparams.epochs`` and ``config.early_stopping_patience``. Called once the data
    is loaded and before config.yaml is written, so config.yaml records them and a resumed run (or
    a rerun of config.yaml) trains exactly the same."""
    cfg = run.config
    schedule = run.strategy.schedule(
        train_examples,
        run.hparams.batch_size,
        cfg.grad_accumulation,
        epochs=cfg.epochs,
        patience=cfg.early_stopping_patience,
    )
    run.hparams = dataclasses.replace(run.hparams, epochs=schedule.epochs)
    cfg.early_stopping_patience = schedule.early_stopping_patience
    run.schedule = schedule
    return schedule


def check_trackers(report_to: list[str]) -> None:
    """Refuse a tracker whose package is missing now, not after an hour of training."""
    packages = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
    for tracker in report_to:
        module, hint = packages[tracker]
        if importlib.util.find_spec(module) is None:
            raise PeftkitError(f"--report-to {tracker} needs the {module} package, which is not installed: {hint}")


@dataclass
class _Loaded:
    """What a run loads before training: its data, processor and prepared model."""

    data: Any
    processor: Any
    base_digests: dict[str, Any]  # the backbone before training: what "unchanged" means, and the fingerprint
    spec: TaskSpec
    model: Any
    seconds: dict[str, float]  # what each loading stage took (RunMetrics.stage_seconds)
    kernels: str = "none"  # what --kernels put into the model (peftkit.kernels.apply_kernels)


@contextlib.contextmanager
def _train_log(path: str | None) -> Iterator[Callable[[str], None]]:
    """``log(message)`` appending timestamped lines to train.log (``path``; None: nothing is written)."""
    fh = open(path, "a", encoding="utf-8") if path else None

    def log(message: str) -> None:
        if fh is not None:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            fh.flush()

    try:
        yield log
    finally:
        if fh is not None:
            fh.close()


@dataclass
class EarlyData:
    """A run's data read before torch, transformers and peft are imported (``load_data_early``),
    so that bad data is refused in about a second instead of after the seconds those imports take."""

    data: Any  # the task's TaskData
    seconds: float  # what reading it took (the run's stage_seconds["load_data"])
    # what the caller imported around it before the run began (datasets, transformers, torch,
    # accelerate: ``runs.run_config``), counted in the run's stage_seconds["imports"]
    imports_before: float = 0.0


def load_data_early(run: ResolvedRun, echo: Callable[[str], None]) -> EarlyData:
    """Read ``run``'s data (``Task.load_data``: only ``datasets`` is imported), saying so on the
    first process only (torchrun and accelerate set ``RANK``; every process reads its own copy).
    An empty file, a missing column or a single class raises ``PeftkitError`` here."""
    cfg = run.config
    if os.environ.get("RANK", "0") == "0":
        echo(f"loading data {cfg.dataset!r} for {run.task.name} ...")
    start = time.perf_counter()
    data = run.task.load_data(cfg)
    return EarlyData(data, time.perf_counter() - start)


def execute_run(
    run: ResolvedRun,
    workdir: str,
    echo: Callable[[str], None],
    resume: bool = False,
    data_said: bool = False,
    early: EarlyData | None = None,
) -> dict[str, Any]:
    """Do a whole run into ``workdir``: load data and model, prepare, fit, save adapter and metrics.

    ``workdir`` is a staging directory; the caller moves it into place only when this returns.
    With ``resume`` the run continues from the newest checkpoint in ``workdir``. Under several
    processes every process calls this; only the main one writes. ``data_said``: what loading the
    data found (columns, dropped rows, label warnings) was said already (a bench says it once, not
    once per run); it still goes into train.log. ``early``: the data as ``load_data_early`` read it
    (None: read here).
    """
    from accelerate import PartialState

    main = PartialState().is_main_process
    say = echo if main else (lambda message: None)
    # a run's wall time includes what its caller did first for it (reading the data early, importing)
    wall_start = time.perf_counter() - (early.seconds + early.imports_before if early is not None else 0.0)
    with _train_log(os.path.join(workdir, "train.log") if main else None) as log:
        resume_from = ckpt.latest(workdir) if resume else None
        if resume and resume_from is None:
            raise PeftkitError(f"run {run.config.output_dir!r} has no complete checkpoint to resume from")
        loaded = _load(run, workdir, say, log, write_config=main and not resume, data_said=data_said, early=early)
        _announce(run, loaded.data.split_info["sizes"], resume_from, say)
        fitting = time.perf_counter()
        outcome = fit(
            run,
            loaded.model,
            loaded.processor,
            loaded.data,
            loaded.spec,
            log,
            workdir=workdir,
            resume_from=resume_from,
            rebuild=lambda: _prepared(run, loaded.data, loaded.processor, loaded.spec),
        )
        m = outcome.metrics
        # fit's own work around training and evaluation: the accelerator, tokenizing, the loaders
        loaded.seconds["setup"] = round(max(0.0, time.perf_counter() - fitting - m.train_seconds - m.eval_seconds), 3)
        if not main:
            return outcome.metrics.to_dict()
        return _finish(run, workdir, loaded, outcome, wall_start)


def train_and_validate(
    run: ResolvedRun,
    workdir: str,
    echo: Callable[[str], None],
    on_validation: Callable[[int, dict[str, float]], None],
    validation_correct: str | None = None,
) -> TrainOutcome:
    """A tuning trial: load, prepare and train as a run does, validating after each epoch
    (``on_validation``, which may raise to stop), but never evaluate the test split nor save an
    adapter. ``workdir`` receives config.yaml and train.log. One process only.
    ``validation_correct``: see ``fit``."""
    with _train_log(os.path.join(workdir, "train.log")) as log:
        loaded = _load(run, workdir, echo, log, write_config=True, data_said=True)
        _announce(run, loaded.data.split_info["sizes"], None, echo)
        return fit(
            run,
            loaded.model,
            loaded.processor,
            loaded.data,
            loaded.spec,
            log,
            on_validation=on_validation,
            evaluate_test=False,
            validation_correct=validation_correct,
        )


def _load(
    run: ResolvedRun,
    workdir: str,
    say: Callable[[str], None],
    log: Callable[[str], None],
    write_config: bool,
    data_said: bool = False,
    early: EarlyData | None = None,
) -> _Loaded:
    """Load the data (config.yaml records the split actually made; ``early``: read already) and the
    model, and prepare it."""
    clock = _StageClock()
    from transformers import set_seed

    freeze_imported_objects()  # each phase's garbage collection then skips the libraries' objects
    cfg, task = run.config, run.task
    resolved = run.as_dict()
    log(f"run: {json.dumps(resolved, default=str)}")
    clock.lap("imports")  # (those of a fresh process: a bench worker's, a trial's)
    set_seed(cfg.seed)
    if early is None:
        say(f"loading data {cfg.dataset!r} for {task.name} ...")
    data = early.data if early is not None else task.load_data(cfg)
    cap_eval_splits(data, cfg.max_eval_samples, cfg.seed)
    _say_data(run, data, resolved, (lambda message: None) if data_said else say, log)
    log(f"data: {data.split_info['method']}; sizes {data.split_info['sizes']}; labels {data.label_names}")
    _schedule_and_record(run, data, resolved, workdir if write_config else None, say, log)
    clock.lap("load_data")
    if early is not None:  # read before the imports: its own time, not the moment it took here
        clock.seconds["load_data"] = round(clock.seconds["load_data"] + early.seconds, 3)
        clock.seconds["imports"] = round(clock.seconds["imports"] + early.imports_before, 3)
    say(f"loading model {cfg.model!r} ...")
    processor = task.load_processor(cfg.model)
    set_seed(cfg.seed)  # the new head's initialisation depends on it
    base = task.load_model(cfg.model, data, processor, cfg.levers.quantize, cfg.levers.precision)
    # a library failing from here on is reported with the model's type (errors.library_error_line)
    set_context(model_type=getattr(getattr(base, "config", None), "model_type", None))
    clock.lap("load_model")
    base_digests = cached_backbone_digests(base, cfg.model, cfg.seed)
    clock.lap("fingerprint")
    base = prepare_base(base, cfg.levers.quantize, cfg.levers.gradient_checkpointing)
    kernels = apply_kernels(base, cfg.levers.kernels, cuda_available())
    spec = task.spec(base, data)
    model = run.strategy.prepare(base, spec)
    clock.lap("prepare")
    return _Loaded(data, processor, base_digests, spec, model, clock.seconds, kernels)


def _schedule_and_record(
    run: ResolvedRun,
    data: Any,
    resolved: dict[str, Any],
    workdir: str | None,
    say: Callable[[str], None],
    log: Callable[[str], None],
) -> None:
    """Size the run's epochs to its data (``size_schedule``) and, with ``workdir`` (a run's first
    start, on the main process), write config.yaml: the settings as resolved, with the schedule,
    the split actually made and the label names."""
    schedule = size_schedule(run, data.split_info["sizes"]["train"])
    resolved.update(
        epochs=run.hparams.epochs,
        early_stopping_patience=run.config.early_stopping_patience,
        schedule=schedule.to_dict(),
    )
    log(schedule.reason)
    if schedule.worth_saying and workdir:  # a resumed run's epochs were chosen (and said) at its start
        say(schedule.reason)
    resolved["split"] = data.split_info
    resolved["label_names"] = data.label_names
    if workdir:
        with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(resolved, fh, sort_keys=False)


def _prepared(run: ResolvedRun, data: Any, processor: Any, spec: TaskSpec) -> Any:
    """The base loaded and prepared again, as ``_load`` did, by a new strategy object with the
    run's options (the run's own, which training may have changed, is left untouched)."""
    cfg = run.config
    base = run.task.load_model(cfg.model, data, processor, cfg.levers.quantize, cfg.levers.precision)
    base = prepare_base(base, cfg.levers.quantize, cfg.levers.gradient_checkpointing)
    apply_kernels(base, cfg.levers.kernels, cuda_available())
    return type(run.strategy)(run.strategy.options).prepare(base, spec)


class _StageClock:
    """Seconds between successive ``lap(name)`` calls, by name."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


def _say_data(
    run: ResolvedRun, data: Any, resolved: dict[str, Any], say: Callable[[str], None], log: Callable[[str], None]
) -> None:
    """Record the columns the data was read from as the run's settings (config.yaml then names
    them, and a resumed run reads the same ones), and say what loading found and what the task
    warns about, before any training."""
    for key, column in resolved_columns(data).items():
        setattr(run.config, key, column)
        resolved[key] = column
    for line in [*data.notes, *run.task.data_warnings(data)]:
        say(line)
        log(line)


def _announce(run: ResolvedRun, sizes: dict[str, int], resume_from: str | None, say: Callable[[str], None]) -> None:
    """Say what is about to be trained (and how to continue it if it stops)."""
    cfg = run.config
    if resume_from:
        say(f"resuming {run.strategy.name} from {os.path.basename(resume_from)} ...")
    else:
        say(
            f"training {run.strategy.name} for {run.hparams.epochs} epoch(s) on {sizes['train']:,} examples "
            f"(validation {sizes['validation']:,}, test {sizes['test']:,}) ..."
        )
    if cfg.checkpoint_every and not resume_from:
        say(
            f"checkpoints every {cfg.checkpoint_every} steps; if the run stops, continue it with: "
            f"peftkit run --resume {cfg.output_dir}"
        )


def _recorded_schedule(run: ResolvedRun, workdir: str) -> dict[str, Any] | None:
    """How the epochs were chosen, for metrics.json: a resumed run reads its config.yaml (which
    recorded the first start's choice; this start only saw the recorded epochs as set)."""
    path = os.path.join(workdir, "config.yaml")
    if run.config.epochs is not None and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            recorded = (yaml.safe_load(fh) or {}).get("schedule")
        if recorded:
            return recorded
    return run.schedule.to_dict() if run.schedule is not None else None


def _finish(
    run: ResolvedRun, workdir: str, loaded: _Loaded, outcome: TrainOutcome, wall_start: float
) -> dict[str, Any]:
    """Save the adapter (with its metadata) and metrics.json; drop the checkpoints (main process)."""
    cfg, task, data, metrics = run.config, run.task, loaded.data, outcome.metrics
    versions = package_versions()
    metadata = {
        "strategy": run.strategy.name,
        "strategy_options": options_to_dict(run.strategy.options),
        # a loaded model's own name_or_path, where it names one: a saved copy's directory is gone
        "base_model": recorded_base(cfg.model),
        "base_fingerprint": fingerprint(loaded.base_digests),
        "task": task.name,
        # a quantized base is fingerprinted quantized: loading applies the same quantization
        "base_quantization": cfg.levers.quantize,
        **task.metadata(data, loaded.processor, cfg),
        "dataset": cfg.dataset,
        "split": data.split_info,
        "metrics": metrics.adapter_record(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions,
    }
    saving = time.perf_counter()
    metrics.adapter_bytes = save_adapter(
        os.path.join(workdir, "adapter"), run.strategy, outcome.model, metadata, loaded.base_digests
    )
    metrics.wall_seconds = time.perf_counter() - wall_start
    metrics.stage_seconds = {
        **loaded.seconds,
        "train": round(metrics.train_seconds, 3),
        "evaluate": round(metrics.eval_seconds, 3),
        "save": round(time.perf_counter() - saving, 3),
    }
    metrics.split, metrics.label_names, metrics.history, metrics.versions = (
        data.split_info,
        data.label_names,
        outcome.history,
        versions,
    )
    metrics.kernels = loaded.kernels
    metrics.schedule = _recorded_schedule(run, workdir)
    out = metrics.to_dict()
    write_json(os.path.join(workdir, "metrics.json"), out)
    # the checkpoints served their purpose: a finished run ships its adapter, not its optimizer
    shutil.rmtree(os.path.join(workdir, ckpt.CHECKPOINTS), ignore_errors=True)
    return out
