"""``TaskSpec``: what a task tells a strategy about the model being fine-tuned.

It lives in this low-level module (no peftkit imports at import time, no torch) because both sides
use it: tasks build it, strategies read it, and neither should import the other's package for it.
``peftkit.strategies.base`` re-exports it, where third-party strategies have always imported it from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .structure import head_module_names

if TYPE_CHECKING:  # pragma: no cover - imports for annotations only
    from torch import nn


# Keys of a batch that are not model inputs: what the loss (``labels``), strategies that cache
# (``example_key``) and the loop's counts (``real_tokens``: a packed batch's examples' tokens) read.
NOT_MODEL_INPUTS = ("labels", "example_key", "real_tokens")


def model_inputs(batch: dict, keep: tuple[str, ...] = ()) -> dict:
    """What of ``batch`` a model's forward takes (``keep``: bookkeeping keys a strategy's own
    forward takes too)."""
    return {k: v for k, v in batch.items() if k not in NOT_MODEL_INPUTS or k in keep}


@dataclass(frozen=True)
class TaskSpec:
    """What the model is being fine-tuned for, as far as a strategy needs to know.

    ``kind`` is the task type (``sequence-classification``, ``causal-lm``, ``image-classification``);
    ``head_modules`` the top-level modules that are a *new*, randomly initialised head, which must
    train whatever the strategy (None: find them by structure, ``structure.head_module_names``; empty
    for a language model, whose output layer is pretrained); ``peft_task_type`` peft's name for the
    task (``SEQ_CLS``, ``CAUSAL_LM``) or None where peft has none.
    """

    num_labels: int
    label_names: tuple[str, ...]
    kind: str = "sequence-classification"
    head_modules: tuple[str, ...] | None = None
    peft_task_type: str | None = "SEQ_CLS"

    def heads(self, model: nn.Module) -> list[str]:
        """Names of ``model``'s new head modules (see ``head_modules``)."""
        if self.head_modules is not None:
            return list(self.head_modules)
        return head_module_names(model)


__all__ = ["TaskSpec"]
