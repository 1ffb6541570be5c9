"""The contract every fine-tuning strategy implements.

A strategy is everything that differs between fine-tuning methods, and nothing else:

1. ``prepare``: turn a freshly loaded classifier into the model to train (freeze, inject, wrap);
2. ``trainable_parameters``: name every parameter that may receive gradients during the run;
3. ``param_groups`` and the event hooks ``on_epoch_start`` / ``on_step_end``: what the optimizer
   starts with, and parameter groups that join it later (gradual unfreezing); and
   ``after_optimizer_step`` and ``extra_loss``, for a method that acts on each step's gradients
   or trains with a regularizer of its own (AdaLoRA);
4. ``forward``: logits for a batch (a strategy may answer from a cache, as ``head_only`` does);
5. ``adapter_state`` / ``load_adapter_state``: the tensors that make up what it trained, and how to
   put them back onto a model prepared the same way.

The training loop, saving, loading and the command line call these methods and never branch on a
strategy's name. Defaults here fit the common case (train whatever ``prepare`` left trainable), so a
simple strategy such as BitFit is a ``prepare`` and two class attributes.

This module imports no torch at import time: ``peftkit list`` reads names and descriptions of every
strategy without paying for torch.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..adapter_io import read_changed_tensors, save_changed_tensors
from ..errors import PeftkitError, did_you_mean

# TaskSpec lives in the neutral peftkit.spec (tasks build it, strategies read it); it is re-exported
# here because third-party strategies import it from peftkit.strategies.base.
from ..spec import TaskSpec, model_inputs
from ..typing_utils import coerce, type_name

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    import torch
    from torch import nn


@dataclass(frozen=True)
class TrainingDefaults:
    """Hyper-parameters a strategy trains well with when the user gives none.

    They differ per strategy on purpose: a LoRA or head learning rate would wreck a full fine-tune,
    and a full fine-tune's learning rate barely moves a LoRA adapter.
    """

    lr: float
    epochs: int
    batch_size: int = 32
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    min_steps: int = 150
    """Optimizer steps the default epochs must reach: on a training set too small for that, a run
    that leaves epochs unset trains more epochs (``Strategy.schedule``). 150: on 640 Rotten Tomatoes
    examples LoRA's default 20 steps ended at the majority class, 120 steps reached 0.76."""
    max_epochs: int = 20
    """The most epochs ``min_steps`` may raise the default to (each epoch also validates)."""
    max_warmup_steps: int = 1000
    """Warmup is ``warmup_ratio`` of the run's optimizer steps, at most this many: a ratio keeps
    a short run's warmup short, and the cap keeps a long run from spending thousands of steps
    below its rate. Above the embedded default's largest warmup (head_only: 382), so it is
    unchanged there."""

    def warmup_steps(self, total_steps: int) -> int:
        """Optimizer steps of linear warmup in a run of ``total_steps``."""
        return min(self.max_warmup_steps, int(self.warmup_ratio * total_steps))


def optimizer_steps_per_epoch(train_examples: int, batch_size: int, grad_accumulation: int = 1) -> int:
    """Optimizer steps in one epoch, as the loop counts them: ``batch_size`` is the global batch
    (split over the processes), and a step takes ``grad_accumulation`` batches (the last one may
    take fewer)."""
    batches = -(-max(1, train_examples) // batch_size)
    return -(-batches // grad_accumulation)


@dataclass(frozen=True)
class Schedule:
    """How long a run trains on its training set, and why (``Strategy.schedule``)."""

    epochs: int
    early_stopping_patience: int | None
    steps_per_epoch: int
    default_epochs: int  # the strategy's default, before any raise
    how: str  # "set" (the user's epochs), "default" (enough steps), "raised" (a small training set)
    reason: str  # one line: what was chosen and why

    @property
    def worth_saying(self) -> bool:
        """Said on the console (always in train.log): epochs were raised, or the user's epochs
        give fewer optimizer steps than the strategy's defaults would train."""
        return self.how == "raised" or (self.how == "set" and self.reason.startswith("note:"))

    def to_dict(self) -> dict[str, Any]:
        """For config.yaml and metrics.json (``schedule``)."""
        return dataclasses.asdict(self)


@dataclass
class ParamGroup:
    """Parameters that share a learning rate: ``lr_scale`` multiplies the run's learning rate.

    ``params`` maps parameter names (as in ``model.named_parameters()``) to parameters, so the loop
    can split weight decay by shape and report what joined the optimizer.
    """

    params: dict[str, Any]
    lr_scale: float = 1.0


@dataclass
class NoOptions:
    """Options of a strategy that has none."""


class Strategy:
    """Base class of every fine-tuning strategy. Subclass it and decorate with ``@register_strategy``.

    Class attributes a subclass sets:
        name: the registry name (``peftkit run --strategy NAME``), lower case with underscores.
        description: one line shown by ``peftkit list``.
        aliases: other accepted spellings (``head-only`` for ``head_only``).
        Options: a dataclass of the strategy's typed options (``--set KEY=VALUE``); validate in
            ``__post_init__`` by raising ``PeftkitError``.
        defaults: ``TrainingDefaults`` used where the user sets nothing.
        supports_quantized_base: True if the strategy leaves the base model's weights frozen, so
            they may be loaded quantized (``--quantize 4bit|8bit``, QLoRA-style).
        merges: True if ``merge`` gives a plain transformers model (then ``peftkit merge`` works
            and ``peftkit export`` exports the merged model, as fast as the base).
        not_sharded: None if the strategy trains under ``--fsdp`` (every process runs every forward
            pass, so the sharded blocks gather together); else why not, in words, for the refusal.
        covers: the models the strategy handles, in words, where it is not every model (``peftkit
            list -v`` shows it); empty where it handles whatever loads.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[TrainingDefaults] = TrainingDefaults(lr=5e-5, epochs=1)
    supports_quantized_base: ClassVar[bool] = False
    merges: ClassVar[bool] = False
    not_sharded: ClassVar[str | None] = None
    covers: ClassVar[str] = ""

    def __init__(self, options: Any | None = None) -> None:
        self.options = options if options is not None else self.Options()

    # -- preparation --------------------------------------------------------------------------
    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        """Return the model to train, built from a freshly loaded sequence classifier.

        May freeze parameters, inject modules or wrap the model. Must be deterministic given the
        options and the random seed, because loading an adapter re-runs it on a fresh base model.
        """
        raise NotImplementedError(f"strategy {self.name!r} does not implement prepare()")

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.nn.Parameter]:
        """Every parameter that may receive a gradient at some point of the run, by name.

        The default is what ``prepare`` left with ``requires_grad``; strategies that unfreeze more
        as training goes on return the union.
        """
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    # -- optimisation ------------------------------------------------------------------------
    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        """The parameter groups the optimizer starts with (default: all trainable, one rate)."""
        return [ParamGroup({n: p for n, p in model.named_parameters() if p.requires_grad})]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[ParamGroup]:
        """Called before each epoch (0-based); returns groups that join the optimizer now."""
        return []

    def on_step_end(self, model: nn.Module, step: int) -> list[ParamGroup]:
        """Called after each optimizer step (1-based count); returns groups that join now."""
        return []

    def after_optimizer_step(self, model: nn.Module, step: int, total_steps: int) -> None:
        """Called right after optimizer step ``step`` (1-based) of the run's ``total_steps``, before
        the gradients are zeroed: for a method that reads the step's gradients or follows the run's
        length (AdaLoRA's rank allocation). ``on_step_end`` comes later, when they are gone, and is
        also replayed on resume; this one is not (default: nothing)."""

    def extra_loss(self, model: nn.Module) -> torch.Tensor | None:
        """A term added to each training micro-step's loss: a regularizer the method trains with
        (AdaLoRA's orthogonality penalty, which peft adds only to a loss the model computes itself,
        while peftkit's tasks compute theirs from the logits). Default: none."""
        return None

    def lr_factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        """Multiplier of every group's learning rate at ``step``: linear warmup, then linear decay."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, (total_steps - step) / remaining)

    # -- computation -------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch. ``batch`` also holds ``labels``, ``example_key`` (a unique id of
        each example across splits, for strategies that cache) and other bookkeeping
        (``spec.NOT_MODEL_INPUTS``), which models do not take."""
        return model(**model_inputs(batch)).logits

    # -- what gets saved ---------------------------------------------------------------------
    def adapter_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The tensors that make up what this strategy trained, by name (saved as safetensors)."""
        trainable = self.trainable_parameters(model)
        return {n: p.detach() for n, p in trainable.items()}

    def save_adapter(self, model: nn.Module, directory: str, base_digests: dict[str, str]) -> dict[str, Any]:
        """Write what this strategy trained into ``directory``; return facts for the metadata.

        Default: ``adapter.safetensors`` with ``adapter_state``, leaving out tensors that still
        equal the pretrained ones (``base_digests``), so a full fine-tune ships only what changed.
        peft-based strategies write peft's own format instead (``peft_common.PeftStrategy``).
        """
        return save_changed_tensors(self.adapter_state(model), directory, base_digests)

    def load_adapter(self, model: nn.Module, directory: str, metadata: dict[str, Any]) -> None:
        """Load what ``save_adapter`` wrote onto a model ``prepare`` produced with the same options."""
        self.load_adapter_state(model, read_changed_tensors(self.adapter_state(model), directory, metadata))

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors besides the trained parameters that a checkpoint must keep for the run to go on
        exactly as it would have (default: none; head_only keeps its feature cache)."""
        return {}

    def load_extra_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what ``extra_state`` returned, when a run resumes from a checkpoint."""

    # -- how long to train -------------------------------------------------------------------
    def schedule(
        self,
        train_examples: int,
        batch_size: int,
        grad_accumulation: int = 1,
        epochs: int | None = None,
        patience: int | None = None,
    ) -> Schedule:
        """Epochs and early-stopping patience for a training set of ``train_examples`` at a global
        ``batch_size`` and ``grad_accumulation``; ``epochs`` and ``patience`` are the user's (None:
        unset).

        The user's epochs are obeyed as given (no early stopping added). Otherwise the default
        epochs stand when they give at least ``defaults.min_steps`` optimizer steps (so a large
        training set trains as it always did); on a smaller one epochs are raised to reach
        ``min_steps`` (at most ``defaults.max_epochs``) and early stopping is switched on unless
        the user set a patience. Its patience covers at least 2 epochs and a third of
        ``min_steps``: on a few hundred examples validation often sits at the majority class for
        the first tiny epochs before it rises, and 2 such epochs must not end the run. (Where
        ``max_epochs`` capped the raise and that patience would outlast the run: half its epochs.)
        """
        d = type(self).defaults
        per_epoch = optimizer_steps_per_epoch(train_examples, batch_size, grad_accumulation)
        head = f"{train_examples:,} examples: {per_epoch} step{'s' if per_epoch != 1 else ''} per epoch"
        if epochs is not None:
            return self._schedule_as_set(epochs, patience, per_epoch, train_examples, head)
        if d.epochs * per_epoch >= d.min_steps:
            return Schedule(
                d.epochs,
                patience,
                per_epoch,
                d.epochs,
                "default",
                f"{head}; training {d.epochs} epoch(s), {self.name}'s default "
                f"({d.epochs * per_epoch} >= {d.min_steps} steps)",
            )
        raised = max(d.epochs, min(d.max_epochs, -(-d.min_steps // per_epoch)))
        steps = (
            f"at least {d.min_steps} steps"
            if raised * per_epoch >= d.min_steps
            else f"{raised * per_epoch} steps: {self.name} trains at most {d.max_epochs} epochs by default"
        )
        if patience is None:
            patience = max(2, -(-d.min_steps // (3 * per_epoch)))
            if patience >= raised:  # capped at max_epochs: a patience that could never end the run
                patience = max(2, raised // 2)
            stop = f"early stopping after {patience} epochs ({patience * per_epoch} steps) without gain"
        else:
            stop = f"early stopping after {patience} epochs without gain, as set"
        return Schedule(
            raised,
            patience,
            per_epoch,
            d.epochs,
            "raised",
            f"{head}; training {raised} epochs ({steps}), {stop} (--epochs N to choose)",
        )

    def _schedule_as_set(
        self, epochs: int, patience: int | None, per_epoch: int, train_examples: int, head: str
    ) -> Schedule:
        """``schedule`` where the user set the epochs: obeyed as given, with a note when they make
        fewer optimizer steps than the strategy's defaults train."""
        d = type(self).defaults
        reason = f"{head}; training {epochs} epoch(s) as set ({epochs * per_epoch} steps)"
        if epochs * per_epoch < d.min_steps:
            reason = (
                f"note: {epochs} epoch(s) as set, on {train_examples:,} examples, make "
                f"{epochs * per_epoch} optimizer steps; {self.name}'s defaults train at least "
                f"{d.min_steps} (leave epochs unset for them)"
            )
        return Schedule(epochs, patience, per_epoch, d.epochs, "set", reason)

    # -- tuning (peftkit tune) ----------------------------------------------------------------
    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The settings ``peftkit tune`` tries, suggested through ``trial`` (an optuna ``Trial``, or
        anything with its ``suggest_float`` / ``suggest_int`` / ``suggest_categorical``).

        Returns ``{name: value}``: names in ``TUNED_SETTINGS`` are run settings, every other name is
        one of this strategy's options. Each name must be suggested under its own name, and the
        strategy's default value must lie in its range (trial 0 of every study is the defaults).
        The default searches the shared training settings (``training_space``); a strategy with
        options worth tuning adds them in its own file.
        """
        return cls.training_space(trial, defaults)

    @classmethod
    def training_space(
        cls, trial: Any, defaults: TrainingDefaults, lr_range: tuple[float, float] | None = None
    ) -> dict[str, Any]:
        """The run settings every strategy tunes, around its own defaults.

        - ``lr``: log-uniform over a decade either side of the default (``lr_range`` overrides).
          The defaults were chosen on one model and data set; the best rate elsewhere is rarely
          more than 10x away, and a log scale gives each factor of the range the same weight.
        - ``epochs``: from half the default to twice it (at least 1..2): the schedule decays over
          the whole run, and the best epoch is kept anyway, so more is not always better.
        - ``warmup_ratio``: 0..0.2 (default 0.06); ``weight_decay``: 0..0.1 (default 0.01).
        """
        low, high = lr_range or (defaults.lr / 10, min(defaults.lr * 10, 0.5))
        return {
            "lr": trial.suggest_float("lr", low, high, log=True),
            "epochs": trial.suggest_int("epochs", max(1, defaults.epochs // 2), max(2, defaults.epochs * 2)),
            "warmup_ratio": trial.suggest_float("warmup_ratio", 0.0, 0.2),
            "weight_decay": trial.suggest_float("weight_decay", 0.0, 0.1),
        }

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain transformers model that computes what ``model`` computes (``peftkit merge``).

        Strategies that add modules of their own cannot give one; they say so.
        """
        raise PeftkitError(
            f"strategy {self.name!r} cannot be merged into a plain model: {self.not_merged_reason()}; "
            "ship its adapter with the base model instead"
        )

    def not_merged_reason(self) -> str:
        """Why ``merge`` cannot give a plain model (asked where ``merges`` is False): one clause,
        said by every command that needs a merged model (``merge``, ``export --format gguf``)."""
        return "it adds modules of its own"

    def serving_model(self, model: nn.Module) -> nn.Module:
        """The module to serve ``model`` with outside PyTorch (``peftkit export``): the merged model
        where the strategy ``merges`` (no adapter arithmetic left at inference), else ``model``
        itself, whose own modules (bottlenecks, prefixes, a pooled head) are then exported with it.
        ``forward`` is what runs it either way."""
        return self.merge(model) if self.merges else model

    def load_adapter_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into a model that ``prepare`` produced with the same options.

        Keys or shapes that do not match are an error, never a silent no-op: an adapter that loads
        nothing would make the model predict with its untrained head.
        """
        expected = self.adapter_state(model)
        check_tensors_match(expected, tensors, what=f"adapter (strategy {self.name!r})")
        import torch

        with torch.no_grad():
            for key, target in expected.items():
                target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))


def check_tensors_match(expected: dict[str, Any], given: dict[str, Any], what: str = "adapter") -> None:
    """Raise ``PeftkitError`` unless ``given`` has exactly the keys and shapes of ``expected``."""
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]!r})")
        raise PeftkitError(
            f"the {what} does not match the model: "
            + ", ".join(parts)
            + "; was it trained with another strategy, options or base model?"
        )
    for key, target in expected.items():
        if tuple(given[key].shape) != tuple(target.shape):
            raise PeftkitError(
                f"the {what} does not match the model: {key!r} has shape "
                f"{tuple(given[key].shape)}, the model expects {tuple(target.shape)}"
            )


def options_from_dict(strategy: type[Strategy], values: dict[str, Any]) -> Any:
    """Build ``strategy.Options`` from a mapping, checking names and coercing types.

    Values may come from YAML (already typed) or ``--set KEY=VALUE`` (strings parsed as YAML
    scalars), so ``r=16`` becomes an int and ``target_modules=[query,value]`` a list.
    """
    cls = strategy.Options
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        norm = key.replace("-", "_")
        if norm not in fields:
            accepted = ", ".join(sorted(fields)) or "none"
            raise PeftkitError(
                f"unknown option {key!r}{did_you_mean(key, fields)} for strategy {strategy.name!r}; "
                f"accepted: {accepted}"
            )
        kwargs[norm] = coerce(value, hints[norm], f"option {key!r} of strategy {strategy.name!r}")
    return cls(**kwargs)


def options_to_dict(options: Any) -> dict[str, Any]:
    """The options as plain data (for config.yaml and adapter metadata)."""
    is_instance = dataclasses.is_dataclass(options) and not isinstance(options, type)
    return dataclasses.asdict(options) if is_instance else {}


# The run settings a search space may suggest (``RunConfig`` fields); every other name it
# suggests is one of the strategy's options.
TUNED_SETTINGS = ("lr", "epochs", "warmup_ratio", "weight_decay")


class DefaultsTrial:
    """A stand-in for an optuna trial that answers every suggestion with the strategy's default
    (``defaults`` first, then the options dataclass), after checking that the default lies in the
    suggested range: ``default_point`` runs a search space on it to get trial 0 of a study.
    ``overrides`` (name -> value) answer first: settings the user fixed."""

    def __init__(
        self, strategy: type[Strategy], defaults: TrainingDefaults, overrides: dict[str, Any] | None = None
    ) -> None:
        self.strategy, self.overrides = strategy, dict(overrides or {})
        self.values = {**{k: getattr(defaults, k) for k in TUNED_SETTINGS}, **options_to_dict(strategy.Options())}

    def _default(self, name: str) -> Any:
        if name in self.overrides:
            return self.overrides[name]
        if name not in self.values:
            raise PeftkitError(
                f"the search space of strategy {self.strategy.name!r} suggests {name!r}, which is "
                f"neither a run setting ({', '.join(TUNED_SETTINGS)}) nor one of its options"
            )
        return self.values[name]

    def _check(self, name: str, ok: bool, where: str) -> Any:
        value = self._default(name)
        if not ok and name not in self.overrides:
            raise PeftkitError(
                f"the search space of strategy {self.strategy.name!r} leaves out its default "
                f"{name}={value!r} ({where}); trial 0 of a study is the defaults"
            )
        return value

    def suggest_float(
        self, name: str, low: float, high: float, *, step: float | None = None, log: bool = False
    ) -> float:
        value = self._default(name)
        return self._check(name, low <= value <= high, f"range {low:g}..{high:g}")

    def suggest_int(self, name: str, low: int, high: int, *, step: int = 1, log: bool = False) -> int:
        value = self._default(name)
        return self._check(name, low <= value <= high, f"range {low}..{high}")

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        return self._check(name, self._default(name) in list(choices), f"choices {list(choices)}")


def default_point(
    strategy: type[Strategy], defaults: TrainingDefaults | None = None, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What ``strategy.search_space`` suggests when every answer is the default: trial 0 of a
    study, so that the tuned result is never worse on validation than the defaults."""
    return strategy.search_space(
        DefaultsTrial(strategy, defaults or strategy.defaults, overrides), defaults or strategy.defaults
    )


def option_help(strategy: type[Strategy]) -> list[tuple[str, str, str]]:
    """(name, type, default) of each option, for ``peftkit list --verbose``."""
    hints = typing.get_type_hints(strategy.Options)
    rows = []
    for f in dataclasses.fields(strategy.Options):
        default = (
            f.default
            if f.default is not dataclasses.MISSING
            else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        )
        rows.append((f.name, type_name(hints[f.name]), repr(default)))
    return rows


__all__ = [
    "TUNED_SETTINGS",
    "DefaultsTrial",
    "NoOptions",
    "ParamGroup",
    "Schedule",
    "Strategy",
    "TaskSpec",
    "TrainingDefaults",
    "check_tensors_match",
    "default_point",
    "optimizer_steps_per_epoch",
    "option_help",
    "options_from_dict",
    "options_to_dict",
]
