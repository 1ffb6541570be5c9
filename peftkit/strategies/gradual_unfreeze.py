"""Gradual unfreezing with discriminative learning rates (ULMFiT: Howard & Ruder 2018,
https://arxiv.org/abs/1801.06146).

The model is cut into layer groups, from the top: the task head (with whatever sits above the
transformer blocks, e.g. BERT's pooler or GPT-2's final norm), then each transformer block from the
last to the first, then the embeddings. Only the head trains at first; one more group is unfrozen
at each epoch (or every K optimizer steps), and it joins the *running* optimizer, so the Adam state
of the groups already training is kept. Each group gets the learning rate of the group above it
divided by ``lr_decay`` (2.6 in the paper): lower layers hold general features and should move
least. The optional slanted triangular schedule warms up quickly, then decays slowly.

Unfreezing from the top limits catastrophic forgetting: the randomly initialised head settles
before its gradients reach, and disturb, the pretrained layers below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PeftkitError
from ..registry import register_strategy
from ..structure import transformer_blocks
from .base import ParamGroup, Strategy, TaskSpec, TrainingDefaults

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class GradualUnfreezeOptions:
    unfreeze_every_steps: int | None = 40
    """Unfreeze the next group every K optimizer steps; null = one group per epoch (ULMFiT). The
    default suits short runs: on the embedded default one epoch is 319 steps, so all 8 groups
    of MiniLM train from step 280 on."""
    lr_decay: float = 2.6
    """Each group's learning rate is the one above it divided by this (1 = one rate for all)."""
    schedule: Literal["linear", "slanted_triangular"] = "linear"
    """linear: warmup then linear decay (as every strategy); slanted_triangular: ULMFiT's STLR."""
    cut_frac: float = 0.1
    """Slanted triangular: the share of steps spent increasing the learning rate."""
    ratio: float = 32.0
    """Slanted triangular: how much smaller the lowest learning rate is than the peak."""

    def __post_init__(self) -> None:
        if self.unfreeze_every_steps is not None and self.unfreeze_every_steps < 1:
            raise PeftkitError(
                f"gradual_unfreeze option unfreeze_every_steps must be >= 1 or null, got {self.unfreeze_every_steps}"
            )
        if self.lr_decay < 1:
            raise PeftkitError(f"gradual_unfreeze option lr_decay must be >= 1, got {self.lr_decay}")
        if not 0 < self.cut_frac < 1:
            raise PeftkitError(f"gradual_unfreeze option cut_frac must be in (0, 1), got {self.cut_frac}")
        if self.ratio < 1:
            raise PeftkitError(f"gradual_unfreeze option ratio must be >= 1, got {self.ratio}")


def layer_groups(model: nn.Module) -> list[dict[str, torch.nn.Parameter]]:
    """Parameters in unfreezing order: [head and everything above the blocks], [last block], ...,
    [first block], [embeddings and everything below the blocks].

    Above/below is read from parameter registration order, which follows the forward pass in
    transformers models: a parameter registered before the first block's is below the blocks.
    """
    found = transformer_blocks(model)
    if found is None:
        raise PeftkitError(
            f"strategy 'gradual_unfreeze' cannot handle model type "
            f"{getattr(model.config, 'model_type', type(model).__name__)!r}: no list of transformer blocks found"
        )
    prefix, blocks = found
    block_of = {id(p): i for i, block in enumerate(blocks) for p in block.parameters()}
    below: dict[str, torch.nn.Parameter] = {}
    above: dict[str, torch.nn.Parameter] = {}
    per_block: list[dict[str, torch.nn.Parameter]] = [{} for _ in blocks]
    seen_block = False
    for name, param in model.named_parameters():
        if id(param) in block_of:
            per_block[block_of[id(param)]][name] = param
            seen_block = True
        elif seen_block:
            above[name] = param
        else:
            below[name] = param
    groups = [above, *reversed(per_block)]
    if below:
        groups.append(below)
    return [g for g in groups if g]


@register_strategy
class GradualUnfreeze(Strategy):
    name = "gradual_unfreeze"
    aliases = ("gradual-unfreeze", "ulmfit")
    description = (
        "Gradual unfreezing (ULMFiT): head first, then one layer group more from the top, discriminative rates."
    )
    Options = GradualUnfreezeOptions
    # the top group's rate; lower groups get lr / 2.6**depth, so the top must be well above a full
    # fine-tune's (on the embedded default, seed 0: 2e-4 0.804, 6e-4 0.827, 1e-3 0.831). Two epochs:
    # the first mostly spent unfreezing (8 groups every 40 steps on MiniLM), the second training all.
    # On a small training set (Strategy.schedule) at least 400 steps: unfreezing MiniLM's 8 groups
    # every 40 steps takes 320, and a run that ends as the last groups join trained them for nothing;
    # up to 30 epochs, so 500 examples (16 steps an epoch) still get there.
    defaults = TrainingDefaults(lr=1e-3, epochs=2, batch_size=32, min_steps=400, max_epochs=30)

    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The training settings, plus how often a group unfreezes (every 10..80 steps, or once per
        epoch: null), the decay between groups (1 = one rate, up to ULMFiT's 2.6 and a little
        beyond: the three-seed table in docs/benchmarking.md suggests below 2.6 on short runs) and the schedule."""
        return {
            **cls.training_space(trial, defaults),
            "unfreeze_every_steps": trial.suggest_categorical("unfreeze_every_steps", [10, 20, 40, 80, None]),
            "lr_decay": trial.suggest_float("lr_decay", 1.0, 3.0),
            "schedule": trial.suggest_categorical("schedule", ["linear", "slanted_triangular"]),
        }

    merges = True

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # the result already is a complete transformers model

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        self._groups = layer_groups(model)
        self._unfrozen = 1
        model.requires_grad_(False)
        for p in self._groups[0].values():
            p.requires_grad_(True)
        return model

    def _group(self, depth: int) -> ParamGroup:
        return ParamGroup(self._groups[depth], lr_scale=self.options.lr_decay**-depth)

    def _unfreeze_next(self) -> list[ParamGroup]:
        if self._unfrozen >= len(self._groups):
            return []
        depth = self._unfrozen
        self._unfrozen += 1
        for p in self._groups[depth].values():
            p.requires_grad_(True)
        return [self._group(depth)]

    def trainable_parameters(self, model: nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for group in self._groups for n, p in group.items()}

    def param_groups(self, model: nn.Module) -> list[ParamGroup]:
        return [self._group(d) for d in range(self._unfrozen)]

    def on_epoch_start(self, model: nn.Module, epoch: int) -> list[ParamGroup]:
        if self.options.unfreeze_every_steps is None and epoch > 0:
            return self._unfreeze_next()
        return []

    def on_step_end(self, model: nn.Module, step: int) -> list[ParamGroup]:
        k = self.options.unfreeze_every_steps
        if k is not None and step % k == 0:
            return self._unfreeze_next()
        return []

    def lr_factor(self, step: int, total_steps: int, warmup_steps: int) -> float:
        if self.options.schedule == "linear":
            return super().lr_factor(step, total_steps, warmup_steps)
        # slanted triangular learning rates (ULMFiT eq. 3)
        cut = max(1, int(total_steps * self.options.cut_frac))
        if step < cut:
            p = step / cut
        else:
            p = 1 - (step - cut) / max(1, cut * (1 / self.options.cut_frac - 1))
        ratio = self.options.ratio
        return (1 + max(0.0, p) * (ratio - 1)) / ratio
