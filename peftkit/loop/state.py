"""The state the training loop carries: what changes from step to step (``LoopState``, which is also
what a checkpoint saves), the best epoch so far (``BestEpoch``: selection and early stopping),
the memory peaks per phase and the step times (timing only, never checkpointed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from ..errors import PeftkitError


@dataclass
class Peaks:
    """The highest memory measured per phase (bytes): training and evaluation apart, because they
    answer different questions (what training needs vs what serving needs)."""

    train: int = 0
    eval: int = 0
    train_reserved: int = 0
    eval_reserved: int = 0

    def record(self, phase: Literal["train", "eval"], peak: int, reserved: int | None) -> None:
        """A phase ended with these peaks (``reserved``: None where nothing is reserved, on a CPU)."""
        setattr(self, phase, max(getattr(self, phase), peak))
        setattr(self, f"{phase}_reserved", max(getattr(self, f"{phase}_reserved"), reserved or 0))


@dataclass
class BestEpoch:
    """Epoch selection and early stopping in one place: the best validation so far, how many
    epochs passed without beating it, and the adapter state of that epoch (``snapshot``)."""

    score: float | None = None
    epoch: int | None = None  # 1-based
    metrics: dict[str, float] = field(default_factory=dict)
    epochs_without_gain: int = 0
    # tensors: saved apart (best.safetensors), never in the JSON state
    snapshot: dict[str, Any] = field(default_factory=dict, repr=False, metadata={"tensors": True})

    def judge(
        self,
        epoch: int,
        metrics: dict[str, float],
        score: float,
        patience: int | None,
        snapshot: Callable[[], dict[str, Any]],
    ) -> str:
        """Record epoch ``epoch`` (1-based) with its validation ``metrics`` and ``score`` (higher is
        better); ``snapshot`` is called only when it is the best so far. Returns ``"improved"``,
        ``"worse"``, or ``"stop"`` when ``patience`` epochs in a row brought no gain."""
        if self.score is None or score > self.score:
            self.score, self.epoch, self.metrics, self.epochs_without_gain = score, epoch, metrics, 0
            # the adapter state fully describes what was trained, so it is also the best snapshot
            self.snapshot = snapshot()
            return "improved"
        self.epochs_without_gain += 1
        return "stop" if patience and self.epochs_without_gain >= patience else "worse"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("tensors")}


@dataclass
class LoopState:
    """Everything the loop carries from step to step: what a checkpoint saves (``to_dict``) and
    restores (``from_dict``). Counters of the current epoch restart with ``start_epoch``."""

    epoch: int = 0  # 0-based, the epoch being trained
    batches_done: int = 0  # micro-batches of this epoch already trained
    step: int = 0  # optimizer steps, over all epochs
    train_examples: int = 0
    train_tokens: int = 0
    train_positions: int = 0  # batch positions, padding included: train_tokens / this is the real share
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    max_trainable: int = 0  # the most parameters trainable at once (gradual unfreezing grows them)
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per epoch
    # the untrained model's validation metrics, for a task that judges learning against them
    # (Task.needs_zero_shot_reference); None where it does not, or before they are measured
    zero_shot: dict[str, float] | None = None
    smooth_loss: float | None = None  # the progress bar's running loss
    epoch_examples: int = 0
    epoch_loss: float = 0.0  # this process's sum of micro-batch losses
    epoch_batches: int = 0
    epoch_tokens: int = 0
    epoch_positions: int = 0
    epoch_elapsed: float = 0.0  # seconds of this epoch before the checkpoint it resumed from
    peaks: Peaks = field(default_factory=Peaks)
    best: BestEpoch = field(default_factory=BestEpoch)

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.batches_done, self.epoch_examples, self.epoch_loss = epoch, 0, 0, 0.0
        self.epoch_batches, self.epoch_tokens, self.epoch_positions, self.epoch_elapsed = 0, 0, 0, 0.0

    def add_batch(self, index: int, examples: int, tokens: int, positions: int) -> None:
        """Count micro-batch ``index`` of the epoch (``positions``: its padded size)."""
        self.epoch_examples += examples
        self.epoch_tokens += tokens
        self.epoch_positions += positions
        self.epoch_batches += 1
        self.batches_done = index + 1

    def add_loss(self, loss: float) -> None:
        """A micro-batch's loss on this process, once read from the device (``Trainer.read_losses``)."""
        self.epoch_loss += loss
        self.smooth_loss = loss if self.smooth_loss is None else 0.9 * self.smooth_loss + 0.1 * loss

    def end_epoch(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.train_examples += self.epoch_examples
        self.train_tokens += self.epoch_tokens
        self.train_positions += self.epoch_positions

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out.update(peaks=asdict(self.peaks), best=self.best.to_dict())
        return out

    @classmethod
    def from_dict(cls, saved: dict[str, Any], best_snapshot: dict[str, Any]) -> LoopState:
        expected = {f.name for f in fields(cls)}
        # a checkpoint from before zero_shot (or the position counts) existed resumes as it was
        saved = {"zero_shot": None, "train_positions": 0, "epoch_positions": 0, **saved}
        if set(saved) != expected:
            # a checkpoint of another peftkit version (the layout changed when the loop became a
            # LoopState): a clear refusal, not a KeyError half-way through restoring
            raise PeftkitError(
                "this checkpoint was written by another version of peftkit and cannot be resumed "
                f"(its loop state has {', '.join(sorted(set(saved) ^ expected))} where this "
                "version differs); start the run again with --overwrite"
            )
        plain = {k: v for k, v in saved.items() if k not in ("peaks", "best")}
        return cls(**plain, peaks=Peaks(**saved["peaks"]), best=BestEpoch(**saved["best"], snapshot=best_snapshot))


@dataclass
class StepTimes:
    """Wall time and tokens of each optimizer step after its epoch's first (which pays for the
    loader's start and, on a GPU, kernel selection): the steady-state step time and speed.
    Timing only, so not checkpointed."""

    seconds: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    first: float | None = None  # the run's first step, from the start of its epoch (with --compile: compiling)
    last_mark: float | None = None
    last_tokens: int = 0

    def start_epoch(self) -> None:
        self.last_mark, self.last_tokens = None, 0

    def mark(self, now: float, epoch_tokens: int, steps: int = 1) -> None:
        """``steps`` optimizer steps ended since the last mark (the device waited for at both: a
        loss was read), each counted at their average."""
        if self.last_mark is not None:
            self.seconds += [(now - self.last_mark) / steps] * steps
            self.tokens += [(epoch_tokens - self.last_tokens) / steps] * steps
        self.last_mark, self.last_tokens = now, epoch_tokens
