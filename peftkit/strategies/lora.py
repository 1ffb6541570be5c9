"""LoRA: low-rank updates to frozen weights (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

Each targeted linear layer ``W`` is frozen and learns ``W + (alpha / r) * B @ A`` with ``A`` (r x in)
and ``B`` (out x r, initialised at zero, so training starts from the pretrained function). Only A, B
and the new classification head train: a few hundred thousand parameters instead of millions.

Implemented through peft (``LoraConfig`` / ``get_peft_model``), which also gives us rsLoRA and DoRA.
Targets default to peft's table for the architecture; where peft has none, the linear layers inside
attention blocks, found by structure.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import PeftkitError, first_line
from ..registry import register_strategy
from .base import TaskSpec, TrainingDefaults
from .peft_common import PeftStrategy

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@dataclass
class LoraOptions:
    r: int = 16
    """Rank of the update: capacity (and adapter size) grows linearly with it."""
    alpha: float = 16
    """Scale of the update is alpha / r (alpha / sqrt(r) with use_rslora)."""
    dropout: float = 0.1
    """Dropout on the LoRA branch input; 0.1 regularises small datasets."""
    target_modules: list[str] | None = None
    """Module names to adapt (e.g. [query, value]); default: peft's choice for the architecture."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023): helps at large r."""
    use_dora: bool = False
    """Weight-decomposed LoRA (Liu et al. 2024): magnitude and direction trained apart."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise PeftkitError(f"lora option r must be a positive integer, got {self.r}")
        if self.alpha <= 0:
            raise PeftkitError(f"lora option alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise PeftkitError(f"lora option dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None and not self.target_modules:
            raise PeftkitError("lora option target_modules must name at least one module")


def attention_linear_names(model: nn.Module) -> list[str]:
    """Names of linear layers inside attention blocks, for architectures peft has no table for."""
    from torch import nn as tnn

    names: set[str] = set()
    for _, module in model.named_modules():
        if "attention" in type(module).__name__.lower():
            for child_name, child in module.named_children():
                if isinstance(child, tnn.Linear) or type(child).__name__ == "Conv1D":
                    names.add(child_name)
    return sorted(names)


@register_strategy
class Lora(PeftStrategy):
    name = "lora"
    description = "LoRA via peft: low-rank updates to frozen attention weights; the head trains too."
    Options = LoraOptions
    # LoRA's zero-initialised B needs a much larger step than a full fine-tune to move in one epoch;
    # on the embedded default r=16 at 2e-3 came within half a point of full (r=8 at 1e-3: 2 below).
    defaults = TrainingDefaults(lr=2e-3, epochs=1, batch_size=32)
    supports_quantized_base = True  # the base stays frozen: LoRA on a 4-bit base is QLoRA (Dettmers et al. 2023)
    peft_type = "LORA"

    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The training settings, plus rank 4..32 and alpha 8..64 (powers of two: capacity and
        scale move by factors, and alpha/r from 1/4 to 16 covers the ratios in use) and dropout."""
        return {
            **cls.training_space(trial, defaults),
            "r": trial.suggest_categorical("r", [4, 8, 16, 32]),
            "alpha": trial.suggest_categorical("alpha", [8, 16, 32, 64]),
            "dropout": trial.suggest_float("dropout", 0.0, 0.2),
        }

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> LoraOptions:
        targets = config.get("target_modules")
        return LoraOptions(
            r=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            dropout=float(config.get("lora_dropout", 0.0)),
            target_modules=sorted(targets) if isinstance(targets, (list, set)) else None,
            use_rslora=bool(config.get("use_rslora")),
            use_dora=bool(config.get("use_dora")),
        )

    merges = True

    def merge(self, model: nn.Module) -> nn.Module:
        # W + (alpha / r) * B @ A folded into W: a plain model, as fast as the base at inference
        return model.merge_and_unload()

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        from peft import LoraConfig, get_peft_model
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as TABLE

        opts: LoraOptions = self.options
        model_type = getattr(model.config, "model_type", "")
        targets = opts.target_modules or TABLE.get(model_type) or attention_linear_names(model)
        if not targets:
            raise PeftkitError(
                f"strategy 'lora' cannot handle model type {model_type!r}: no attention linear "
                "layers found; name them with --set target_modules=[name,...]"
            )
        # GPT-2 style Conv1D layers store weights transposed; tell peft instead of letting it warn
        conv1d = any(
            type(m).__name__ == "Conv1D" and name.rsplit(".", 1)[-1] in targets for name, m in model.named_modules()
        )
        config = LoraConfig(
            fan_in_fan_out=conv1d,
            task_type=task.peft_task_type,
            r=opts.r,
            lora_alpha=opts.alpha,
            lora_dropout=opts.dropout,
            target_modules=list(targets),
            modules_to_save=task.heads(model),
            use_rslora=opts.use_rslora,
            use_dora=opts.use_dora,
        )
        try:
            with warnings.catch_warnings():
                # peft 0.21's PeftModel reads transformers 5's deprecated `is_gradient_checkpointing`
                # (a FutureWarning on every LoRA model); nothing we pass avoids it, and it is not for our users
                warnings.filterwarnings(
                    "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
                )
                return get_peft_model(model, config)
        except ValueError as exc:  # peft's message names the missing target modules
            raise PeftkitError(f"strategy 'lora' cannot adapt model type {model_type!r}: {first_line(exc)}") from None
