"""Full fine-tuning: every parameter of the pretrained model and the new head trains.

The reference the other strategies are measured against: usually the most accurate, and the most
expensive in memory (gradients and two Adam moments for every weight) and in adapter size (the whole
model). Its learning rate is small because every pretrained weight moves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..registry import register_strategy
from .base import Strategy, TaskSpec, TrainingDefaults

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


@register_strategy
class FullFineTune(Strategy):
    name = "full"
    description = "Full fine-tune: every parameter trains (most accurate reference, most memory)."
    # 1e-4 rather than BERT-base's usual 2e-5..5e-5: MiniLM is small and the default run is one
    # epoch (a full pass over 10k examples takes minutes on two cores), so it must move quickly.
    defaults = TrainingDefaults(lr=1e-4, epochs=1, batch_size=32)

    merges = True

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the result already is a complete transformers model

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        model.requires_grad_(True)
        return model
