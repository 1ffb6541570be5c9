"""The contract every fine-tuning strategy implements.

A strategy is everything that differs between fine-tuning methods, and nothing else:

1. ``prepare``: turn a freshly loaded classifier into the model to train (freeze, inject, wrap);
2. ``trainable_parameters``: name every parameter that may receive gradients during the run;
3. ``param_groups`` and the event hooks ``on_epoch_start`` / ``on_step_end``: what the optimizer
   starts with, and parameter groups that join it later (gradual unfreezing);
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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import PeftkitError, did_you_mean
# TaskSpec lives in the neutral peftkit.spec (tasks build it, strategies read it); it is re-exported
# here because third-party strategies import it from peftkit.strategies.base.
from ..spec import TaskSpec

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
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    aliases: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    defaults: ClassVar[TrainingDefaults] = TrainingDefaults(lr=5e-5, epochs=1)
    supports_quantized_base: ClassVar[bool] = False

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

    def lr_factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        """Multiplier of every group's learning rate at ``step``: linear warmup, then linear decay."""
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        remaining = max(1, total_steps - warmup_steps)
        return max(0.0, (total_steps - step) / remaining)

    # -- computation -------------------------------------------------------------------------
    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits for a batch. ``batch`` also holds ``labels`` and ``example_key`` (a unique id of
        each example across splits, for strategies that cache), which models do not take."""
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "example_key")}
        return model(**inputs).logits

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
        from ..adapter_io import save_changed_tensors

        return save_changed_tensors(self.adapter_state(model), directory, base_digests)

    def load_adapter(self, model: nn.Module, directory: str, metadata: dict[str, Any]) -> None:
        """Load what ``save_adapter`` wrote onto a model ``prepare`` produced with the same options."""
        from ..adapter_io import read_changed_tensors

        self.load_adapter_state(model, read_changed_tensors(self.adapter_state(model), directory, metadata))

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Tensors besides the trained parameters that a checkpoint must keep for the run to go on
        exactly as it would have (default: none; head_only keeps its feature cache)."""
        return {}

    def load_extra_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """Put back what ``extra_state`` returned, when a run resumes from a checkpoint."""

    def merge(self, model: nn.Module) -> nn.Module:
        """A plain transformers model that computes what ``model`` computes (``peftkit merge``).

        Strategies that add modules of their own cannot give one; they say so.
        """
        raise PeftkitError(
            f"strategy {self.name!r} cannot be merged into a plain model: it adds modules of its own; "
            "ship its adapter with the base model instead"
        )

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


def check_tensors_match(
    expected: dict[str, Any], given: dict[str, Any], what: str = "adapter"
) -> None:
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
            f"the {what} does not match the model: " + ", ".join(parts)
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
    from ..typing_utils import coerce

    cls = strategy.Options
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    hints = _type_hints(cls)
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
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {}


def option_help(strategy: type[Strategy]) -> list[tuple[str, str, str]]:
    """(name, type, default) of each option, for ``peftkit list --verbose``."""
    from ..typing_utils import type_name

    hints = _type_hints(strategy.Options)
    rows = []
    for f in dataclasses.fields(strategy.Options):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"
        )
        rows.append((f.name, type_name(hints[f.name]), repr(default)))
    return rows


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    return typing.get_type_hints(cls)


__all__ = [
    "NoOptions",
    "ParamGroup",
    "Strategy",
    "TaskSpec",
    "TrainingDefaults",
    "check_tensors_match",
    "option_help",
    "options_from_dict",
    "options_to_dict",
]
