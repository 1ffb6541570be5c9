"""A run: its settings resolved (``resolve``), the one training loop every strategy runs through
(``fit``, from the pieces in ``peftkit.loop``) and a whole run into a directory (``execute_run``).

The loop branches only on what a strategy returns: its parameter groups, its event hooks, its
forward and its adapter state. A difference between two strategies in a benchmark is therefore a
difference between the strategies, not between two copies of a loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import RunConfig
from .data import label_column_problem
from .errors import PeftkitError, set_context
from .files import write_json

# make_loader and torch_param_groups live in loop; importable from here as before (plan, benchmarks use them)
from .loop import Trainer, make_loader, torch_param_groups  # noqa: F401
from .metrics import RunMetrics
from .sharding import gather_full_model
from .strategies.base import Schedule, Strategy, TaskSpec, TrainingDefaults, options_from_dict, options_to_dict
from .tasks import with_task_defaults
from .tasks.base import Task


@dataclass
class ResolvedRun:
    """A ``RunConfig`` with every default filled in, plus the strategy and task objects it names."""

    config: RunConfig
    strategy: Strategy
    hparams: TrainingDefaults
    task: Task
    schedule: Schedule | None = None  # set once the data is loaded (``size_schedule``)

    def as_dict(self) -> dict[str, Any]:
        d = self.config.to_dict()
        d.update(
            strategy=self.strategy.name,
            epochs=self.hparams.epochs,
            batch_size=self.hparams.batch_size,
            lr=self.hparams.lr,
            weight_decay=self.hparams.weight_decay,
            warmup_ratio=self.hparams.warmup_ratio,
            strategy_options=options_to_dict(self.strategy.options),
        )
        d.pop("overwrite", None)
        return d


def resolve(cfg: RunConfig) -> ResolvedRun:
    """Look up the strategy and the task, check the options, fill unset values from their defaults
    (the task: from the model when not given; model, data and length: the task's own)."""
    from .levers import check_levers
    from .registry import get_strategy

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
    import importlib.util

    packages = {"tensorboard": ("tensorboard", "pip install tensorboard"), "wandb": ("wandb", "pip install wandb")}
    for tracker in report_to:
        module, hint = packages[tracker]
        if importlib.util.find_spec(module) is None:
            raise PeftkitError(f"--report-to {tracker} needs the {module} package, which is not installed: {hint}")


# -- the loop ---------------------------------------------------------------------------------


@dataclass
class TrainOutcome:
    """What ``fit`` returns: the run's figures, the per-epoch history and the trained model."""

    metrics: RunMetrics  # without the run-level figures (adapter size, wall time, ...): execute_run adds them
    history: list[dict[str, Any]] = field(default_factory=list)
    model: Any = None  # the trained model, unwrapped from accelerate
    # the selected epoch's correctness per validation example (1/0, the split's order), when asked
    # for and the task can say (fit's ``validation_correct``)
    validation_correct: list[int] | None = None


def _scalar_config(run: ResolvedRun) -> dict[str, Any]:
    """The run's settings as flat scalars (what TensorBoard's hyper-parameter view accepts)."""
    out: dict[str, Any] = {}
    for key, value in run.as_dict().items():
        if isinstance(value, dict):
            out.update({f"{key}.{k}": v for k, v in value.items() if isinstance(v, (int, float, str, bool))})
        elif isinstance(value, (int, float, str, bool)):
            out[key] = value
        elif isinstance(value, list):
            out[key] = ",".join(map(str, value))
    return out


def fit(
    run: ResolvedRun,
    model: Any,
    processor: Any,
    data: Any,
    spec: TaskSpec,
    log: Callable[[str], None],
    workdir: str | None = None,
    resume_from: str | None = None,
    on_validation: Callable[[int, dict[str, float]], None] | None = None,
    evaluate_test: bool = True,
    validation_correct: str | None = None,
    rebuild: Callable[[], Any] | None = None,
) -> TrainOutcome:
    """Train ``model`` (already prepared by the strategy), validate each epoch, restore the best
    epoch, evaluate on test. Returns the metrics and the per-epoch history.

    With ``workdir`` and ``checkpoint_every`` the whole training state is written every N optimizer
    steps into ``workdir/checkpoints``; ``resume_from`` (a checkpoint directory) continues from one,
    ending with what an uninterrupted run would have ended with. Under ``accelerate launch`` or
    ``torchrun`` this runs data parallel; ``batch_size`` stays the global batch (split over the
    processes), so results match a one-process run.

    ``on_validation(epoch, metrics)`` is called after each epoch's validation (1-based epoch); it
    may raise to end the run there (a tuning trial that is pruned). Without ``evaluate_test`` the
    test split is never evaluated (``test`` stays empty): tuning selects on validation only.
    ``validation_correct`` (a metric, e.g. ``accuracy``): the selected epoch is evaluated on
    validation once more, example by example (``TrainOutcome.validation_correct``), when the task
    can say which examples were right and that pass gives the same ``validation_correct`` figure.

    ``rebuild()`` makes a fresh copy of the prepared model; under ``--fsdp`` with several processes
    the trained state is gathered into it on the main process (the outcome's model), since the
    trained model holds only each process's shard.
    """
    trainer = Trainer(run.config, run.strategy, run.hparams, run.task, log)
    trainer.setup(model, processor, data, workdir, tracker_config=lambda: _scalar_config(run))
    if resume_from is not None:
        trainer.resume(resume_from)
    resume_epoch = trainer.state.epoch if resume_from is not None else None
    if evaluate_test:  # a tuning trial is judged on validation alone, by the study: no reference needed
        trainer.measure_zero_shot()
    trainer.open_bar()
    for epoch in range(trainer.state.epoch, run.hparams.epochs):
        seconds = trainer.train_epoch(epoch, resuming=epoch == resume_epoch)
        validation = trainer.validate(epoch, seconds)
        if on_validation is not None:
            on_validation(epoch + 1, validation)
        if trainer.select(epoch, validation):
            break
    trainer.bar.close()
    trainer.restore_best()
    correct = _validation_correct(trainer, validation_correct, log) if validation_correct else None
    test = trainer.test() if evaluate_test else {}
    metrics = trainer.metrics(test, resumed=resume_from is not None)
    if evaluate_test:
        judge_learning(run, data, metrics, trainer.state.history, trainer.state.zero_shot)
        if metrics.learned is not None:
            note = f": {metrics.learned_note}" if metrics.learned_note else ""
            log(f"learned: {str(metrics.learned).lower()}{note}")
    model = trainer.inner
    if trainer.sharded:
        if rebuild is None:
            raise PeftkitError("a sharded (--fsdp) run needs a way to rebuild its model to gather it into")
        model = gather_full_model(model, rebuild, trainer.accelerator.is_main_process)
    return TrainOutcome(metrics, trainer.state.history, model, correct)


def _validation_correct(trainer: Any, metric: str, log: Callable[[str], None]) -> list[int] | None:
    """Per validation example, whether the selected epoch got it right; None where the task cannot
    say, or where the figure of that pass differs from the selected epoch's (then the examples
    would not be what the trial was judged on)."""
    figures, correct = trainer.validation_correct()
    selected = trainer.state.best.metrics.get(metric)
    if correct is None or selected is None or abs(figures.get(metric, float("nan")) - selected) > 1e-9:
        log(
            f"validation per example not recorded: {metric} {figures.get(metric)} on the second pass, "
            f"{selected} when the epoch was selected"
        )
        return None
    return correct


def judge_learning(
    run: ResolvedRun, data: Any, metrics: RunMetrics, history: list[dict[str, Any]], zero_shot: dict[str, float] | None
) -> None:
    """Record on ``metrics`` whether the run learned anything (``Task.learned``: ``learned``, the
    ``baseline`` it was judged against) and, when it learned nothing, ``learned_note``: what its
    figures say and the likely cause with the flag to try (``likely_cause``)."""
    verdict = run.task.learned({"test": metrics.test, "validation": metrics.validation}, data, zero_shot)
    if verdict is None:
        return
    metrics.learned, metrics.baseline = verdict.learned, verdict.baseline
    if not verdict.learned:
        # a cause the data check already found (a label column of free text) outranks any advice on
        # steps or learning rate: no setting learns classes from the wrong column
        cause = label_column_problem(data) or likely_cause(
            run.hparams.lr, metrics, history, verdict.worse, run.hparams.min_steps
        )
        metrics.learned_note = f"{verdict.reason}. {cause}"


def likely_cause(
    lr: float,
    metrics: RunMetrics,
    history: list[dict[str, Any]],
    worse: bool = False,
    enough_steps: int = TrainingDefaults.min_steps,
) -> str:
    """Why a run most likely learned nothing, from its own numbers, and the flag to try: a model
    that ended worse than its reference (``worse``: more steps would not mend it) had a learning
    rate too high; else too few optimizer steps (fewer than ``enough_steps``, the strategy's
    ``min_steps``: more epochs); else a training loss that did not fall from the first epoch to the
    last (too high: lower it); else one that fell too little (too low: raise it)."""
    steps = metrics.optimizer_steps or 0
    per_epoch = max(1, steps // max(1, metrics.epochs_run))
    losses = [e["train_loss"] for e in history if e.get("train_loss") is not None]
    if worse:
        return (
            f"training made it worse in {steps} optimizer steps: the learning rate {lr:g} is likely too high: "
            f"try --lr {lr / 3:.2g}"
        )
    if steps < enough_steps:
        epochs = max(metrics.epochs_run + 1, math.ceil(enough_steps / per_epoch))
        return f"{steps} optimizer steps is likely too few: try --epochs {epochs} (or a higher --lr)"
    if len(losses) >= 2 and losses[-1] >= losses[0]:
        return (
            f"the training loss did not fall ({losses[0]:.3f} in epoch 1, {losses[-1]:.3f} in epoch "
            f"{len(losses)}): the learning rate {lr:g} is likely too high: try --lr {lr / 3:.2g}"
        )
    more = "" if len(losses) >= 2 else " (or more --epochs)"
    return f"{steps} optimizer steps at learning rate {lr:g} moved it too little: try --lr {lr * 3:.2g}{more}"


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

    from . import checkpoint as ckpt

    main = PartialState().is_main_process
    say = echo if main else (lambda message: None)
    wall_start = time.perf_counter()
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
    import yaml
    from transformers import set_seed

    from .data import cap_eval_splits
    from .env import freeze_imported_objects
    from .fingerprint import cached_backbone_digests
    from .kernels import apply_kernels
    from .levers import cuda_available, prepare_base

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
    schedule = size_schedule(run, data.split_info["sizes"]["train"])
    resolved.update(
        epochs=run.hparams.epochs, early_stopping_patience=cfg.early_stopping_patience, schedule=schedule.to_dict()
    )
    log(schedule.reason)
    if schedule.worth_saying and write_config:  # a resumed run's epochs were chosen (and said) at its start
        say(schedule.reason)
    resolved["split"] = data.split_info
    resolved["label_names"] = data.label_names
    if write_config:
        with open(os.path.join(workdir, "config.yaml"), "w", encoding="utf-8") as fh:
            yaml.safe_dump(resolved, fh, sort_keys=False)
    clock.lap("load_data")
    if early is not None:  # read before the imports: its own time, not the moment it took here
        clock.seconds["load_data"] = round(clock.seconds["load_data"] + early.seconds, 3)
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


def _prepared(run: ResolvedRun, data: Any, processor: Any, spec: TaskSpec) -> Any:
    """The base loaded and prepared again, as ``_load`` did, by a new strategy object with the
    run's options (the run's own, which training may have changed, is left untouched)."""
    from .kernels import apply_kernels
    from .levers import cuda_available, prepare_base

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
    from .data import resolved_columns

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
    import yaml

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
    import shutil

    from . import checkpoint as ckpt
    from .adapter_io import save_adapter
    from .env import package_versions
    from .fingerprint import fingerprint

    cfg, task, data, metrics = run.config, run.task, loaded.data, outcome.metrics
    versions = package_versions()
    metadata = {
        "strategy": run.strategy.name,
        "strategy_options": options_to_dict(run.strategy.options),
        "base_model": cfg.model,
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
