"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190) through peft.

Learned key/value vectors for ``num_virtual_tokens`` virtual tokens are prepended to every
attention layer; the model's weights stay frozen, and the new task head trains too. With
``prefix_projection`` the prefixes are produced by a small MLP from a shorter embedding (the
paper's reparametrisation), which trains more stably at the cost of more parameters while training
(only its output would be needed at inference).

Works for encoder classifiers (BERT, RoBERTa, ...) and decoders (GPT-2, Llama) alike, as peft
supports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PeftkitError, first_line
from ..registry import register_strategy
from .base import TaskSpec, TrainingDefaults
from .peft_common import PeftStrategy

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = 20
    """Virtual tokens prepended to the keys and values of every layer."""
    prefix_projection: bool = False
    """Produce the prefixes through a two-layer MLP (the paper's reparametrisation)."""
    projection_hidden_size: int | None = None
    """Hidden width of that MLP (default: the model's hidden size)."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise PeftkitError(f"prefix option num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}")
        if self.projection_hidden_size is not None and self.projection_hidden_size < 1:
            raise PeftkitError(f"prefix option projection_hidden_size must be positive, got {self.projection_hidden_size}")


@register_strategy
class PrefixTuning(PeftStrategy):
    name = "prefix"
    aliases = ("prefix_tuning", "prefix-tuning")
    description = "Prefix tuning via peft: learned key/value prefixes in every layer; the head trains too."
    Options = PrefixOptions
    # prefixes start random and only steer attention: they need a large step
    defaults = TrainingDefaults(lr=1e-2, epochs=1, batch_size=32, weight_decay=0.0)
    supports_quantized_base = True  # the base stays frozen; only the prefixes and the head train
    peft_type = "PREFIX_TUNING"

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> PrefixOptions:
        return PrefixOptions(num_virtual_tokens=int(config["num_virtual_tokens"]),
                             prefix_projection=bool(config.get("prefix_projection")),
                             projection_hidden_size=config.get("encoder_hidden_size") if config.get("prefix_projection") else None)

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        from peft import PrefixTuningConfig, get_peft_model

        opts: PrefixOptions = self.options
        if task.peft_task_type is None:
            # prefixes are past keys/values: only text models that take a key/value cache have them
            raise PeftkitError(f"strategy 'prefix' cannot handle task {task.kind!r}: prefix tuning needs a "
                               "text model that takes past keys and values; use lora or adapter")
        config = PrefixTuningConfig(
            task_type=task.peft_task_type,
            num_virtual_tokens=opts.num_virtual_tokens,
            prefix_projection=opts.prefix_projection,
            encoder_hidden_size=opts.projection_hidden_size or getattr(model.config, "hidden_size", None),
            modules_to_save=task.heads(model),
        )
        try:
            return get_peft_model(model, config)
        except (ValueError, KeyError, AttributeError) as exc:
            model_type = getattr(model.config, "model_type", type(model).__name__)
            raise PeftkitError(f"strategy 'prefix' cannot handle model type {model_type!r}: "
                               f"{first_line(exc)}") from None
