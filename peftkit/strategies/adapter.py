"""Bottleneck adapters (Houlsby et al. 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al.
2020, https://arxiv.org/abs/2005.00247), implemented here because peft has none.

A small module is inserted after a sub-layer's output projection, inside the residual branch::

    h = proj(x);  h = h + up(act(down(h)))

``down`` projects the hidden size d to d / reduction_factor, ``up`` projects back and is
initialised at zero, so at step 0 the model computes exactly the pretrained function and training
starts from it. Houlsby puts one adapter after the attention sub-layer and one after the
feed-forward sub-layer of every block; Pfeiffer only the latter (half the parameters, about the
same accuracy in their study). The pretrained weights stay frozen; the adapters and the new task
head train, and optionally the blocks' layer norms (Houlsby trained them).

Injected by structure (``peftkit.structure``) into BERT-style encoders, RoBERTa, DistilBERT, GPT-2
and Llama-style decoders. Per adapter: 2 * d * (d / rf) + d / rf + d parameters; on a
RoBERTa-base-shaped model (d = 768, 12 blocks), Pfeiffer at rf 16 adds 12 * 74,544 = 894,528.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PeftkitError
from ..registry import register_strategy
from ..structure import set_submodule, sublayer_outputs, transformer_blocks
from .base import Strategy, TaskSpec, TrainingDefaults

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class AdapterOptions:
    variant: Literal["pfeiffer", "houlsby"] = "pfeiffer"
    """pfeiffer: one adapter per block, after the feed-forward sub-layer; houlsby: also one after
    the attention sub-layer."""
    reduction_factor: int = 16
    """Bottleneck width is hidden_size / reduction_factor (must divide the hidden size)."""
    non_linearity: Literal["relu", "gelu", "swish", "tanh"] = "relu"
    """Activation between the down- and up-projection."""
    train_layernorms: bool = False
    """Also train the blocks' layer norms (as Houlsby et al. did)."""

    def __post_init__(self) -> None:
        if self.reduction_factor < 1:
            raise PeftkitError(
                f"adapter option reduction_factor must be a positive integer, got {self.reduction_factor}"
            )


def _activation(name: str) -> nn.Module:
    from torch import nn

    return {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "tanh": nn.Tanh}[name]()


def _with_adapter(projection: nn.Module, hidden: int, bottleneck: int, non_linearity: str) -> nn.Module:
    """``projection`` followed by a residual bottleneck adapter."""
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.Linear(hidden, bottleneck)
            self.act = _activation(non_linearity)
            self.up = nn.Linear(bottleneck, hidden)
            # zero up-projection: the adapter starts as the identity, the model as pretrained
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

        def forward(self, h: torch.Tensor) -> torch.Tensor:
            return h + self.up(self.act(self.down(h)))

    class ProjectionWithAdapter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.projection = projection
            self.adapter = Bottleneck().to(device=projection.weight.device, dtype=projection.weight.dtype)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.adapter(self.projection(x))

    return ProjectionWithAdapter()


@register_strategy
class BottleneckAdapter(Strategy):
    name = "adapter"
    aliases = ("bottleneck", "bottleneck_adapter")
    description = "Bottleneck adapters (Houlsby / Pfeiffer) after each block's sub-layers; the head trains too."
    Options = AdapterOptions
    # adapters start at the identity and are small: they need a large step. On the embedded default,
    # Pfeiffer at 3e-3 for 2 epochs matched full (0.835); 1 epoch at 1e-3 was 5 points short.
    defaults = TrainingDefaults(lr=3e-3, epochs=2, batch_size=32)

    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The training settings, plus the variant and a reduction factor of 4..32 (powers of two,
        which divide the hidden sizes in use: 384, 768, 1024, ...; one that does not divide the
        model's is a failed trial, said in its error)."""
        return {
            **cls.training_space(trial, defaults),
            "variant": trial.suggest_categorical("variant", ["pfeiffer", "houlsby"]),
            "reduction_factor": trial.suggest_categorical("reduction_factor", [4, 8, 16, 32]),
        }

    supports_quantized_base = True  # the base stays frozen; only the bottlenecks and the head train

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        opts: AdapterOptions = self.options
        model_type = getattr(model.config, "model_type", type(model).__name__)
        hidden = getattr(model.config, "hidden_size", None)
        found = transformer_blocks(model)
        if hidden is None or found is None:
            raise PeftkitError(
                f"strategy 'adapter' cannot handle model type {model_type!r}: "
                "no transformer blocks with a hidden size found"
            )
        if hidden % opts.reduction_factor:
            raise PeftkitError(
                f"adapter option reduction_factor {opts.reduction_factor} does not divide the "
                f"hidden size {hidden} of model type {model_type!r}"
            )
        model.requires_grad_(False)
        prefix, blocks = found
        for block in blocks:
            attn_out, ffn_out = sublayer_outputs(block, hidden)
            targets = [ffn_out] if opts.variant == "pfeiffer" else [attn_out, ffn_out]
            if any(t is None for t in targets):
                raise PeftkitError(
                    f"strategy 'adapter' cannot handle model type {model_type!r}: "
                    "no output projection of width hidden_size found in its blocks"
                )
            for name in targets:
                wrapped = _with_adapter(
                    block.get_submodule(name), hidden, hidden // opts.reduction_factor, opts.non_linearity
                )
                set_submodule(block, name, wrapped.requires_grad_(False))
                wrapped.adapter.requires_grad_(True)
            if opts.train_layernorms:
                for module in block.modules():
                    if "norm" in type(module).__name__.lower():
                        module.requires_grad_(True)
        for name in task.heads(model):
            getattr(model, name).requires_grad_(True)
        return model
