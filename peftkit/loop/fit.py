"""``fit``: the one training loop every strategy runs through, from a resolved run (``ResolvedRun``)
to its figures (``TrainOutcome``), and whether the run learned anything (``judge_learning``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import RunConfig
from ..data import label_column_problem
from ..errors import PeftkitError
from ..metrics import RunMetrics
from ..sharding import gather_full_model
from ..strategies.base import Schedule, Strategy, TaskSpec, TrainingDefaults, options_to_dict
from ..tasks.base import Task
from .trainer import Trainer


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
    _train_epochs(trainer, run.hparams.epochs, resume_epoch, on_validation)
    trainer.restore_best()
    correct = _validation_correct(trainer, validation_correct, log) if validation_correct else None
    test = trainer.test() if evaluate_test else {}
    metrics = trainer.metrics(test, resumed=resume_from is not None)
    if evaluate_test:
        judge_learning(run, data, metrics, trainer.state.history, trainer.state.zero_shot)
        if metrics.learned is not None:
            note = f": {metrics.learned_note}" if metrics.learned_note else ""
            log(f"learned: {str(metrics.learned).lower()}{note}")
    return TrainOutcome(metrics, trainer.state.history, _trained_model(trainer, rebuild), correct)


def _train_epochs(
    trainer: Trainer,
    epochs: int,
    resume_epoch: int | None,
    on_validation: Callable[[int, dict[str, float]], None] | None,
) -> None:
    """The epochs from the trainer's current one to ``epochs``, each trained, validated (then
    ``on_validation``, which may raise) and judged, until they end or early stopping ends them."""
    trainer.open_bar()
    try:
        for epoch in range(trainer.state.epoch, epochs):
            seconds = trainer.train_epoch(epoch, resuming=epoch == resume_epoch)
            validation = trainer.validate(epoch, seconds)
            if on_validation is not None:
                on_validation(epoch + 1, validation)
            if trainer.select(epoch, validation):
                break
    finally:  # the trained model goes back to its caller without peftkit's hooks
        if trainer.heap_trims is not None:
            trainer.heap_trims.remove()
    trainer.bar.close()


def _trained_model(trainer: Trainer, rebuild: Callable[[], Any] | None) -> Any:
    """The trained model, unwrapped; under ``--fsdp`` over several processes its shards gathered into
    a fresh copy (``rebuild()``) on the main process."""
    model = trainer.inner
    if trainer.sharded:
        if rebuild is None:
            raise PeftkitError("a sharded (--fsdp) run needs a way to rebuild its model to gather it into")
        model = gather_full_model(model, rebuild, trainer.accelerator.is_main_process)
    return model


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
