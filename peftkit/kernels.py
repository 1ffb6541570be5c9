"""Implementations of a transformer block's pieces that keep less for the backward pass (``--kernels``).

``torch`` (the default where it applies): the gated MLP of Llama-style blocks (``down(silu(gate(x))
* up(x))``: Llama, Mistral, Qwen2, SmolLM2, ...) computes ``silu(gate) * up`` with a function of our
own, ``swiglu``, which keeps only its two inputs for the backward pass and recomputes the
activation there, where autograd would also keep ``silu(gate)``. That is one tensor of batch x length
x intermediate size less per block (a third of the MLP's saved activations, a quarter of a LoRA
run's on SmolLM2: 24 MiB per block at 8 x 512 tokens), for a few element-wise operations more. The
arithmetic is the same, so results are equal to float rounding (tests/test_kernels.py). Liger's
SwiGLU kernel saves the same tensor (on GPUs, in Triton); this one runs anywhere torch does.

``liger``: Liger's Triton kernels (``liger-kernel``: RMSNorm, RoPE, SwiGLU, fused linear
cross-entropy) patched into the model where Liger supports its architecture; CUDA only.

``none``: the model's own modules, as transformers wrote them.

Blocks are found by structure (a module with ``gate_proj``, ``up_proj`` and ``down_proj`` and a SiLU
``act_fn``), never by model type, so any architecture built that way gets it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PeftkitError
from .structure import transformer_blocks

LIGER_NEEDS_CUDA = (
    "--kernels liger: Liger's kernels are Triton kernels for CUDA GPUs; on CPU use --kernels torch "
    "(the default) or none"
)

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` for the backward pass."""
    return _function().apply(gate, up)


_FUNCTION: list[Any] = []


def _function() -> Any:
    if _FUNCTION:
        return _FUNCTION[0]
    import torch
    import torch.nn.functional as F

    class SwiGLU(torch.autograd.Function):
        @staticmethod
        def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
            ctx.save_for_backward(gate, up)
            return F.silu(gate) * up

        @staticmethod
        def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            gate, up = ctx.saved_tensors
            # aten's own SiLU derivative (s (1 + g (1 - s)), s = sigmoid(g)) in one fused pass: the
            # same arithmetic written out in torch took six passes over a batch x length x
            # intermediate tensor, 3.7x autograd's SwiGLU time on CPU; this is 1.26x, the one pass
            # more being silu(gate) made again (benchmarks/swiglu_backward.py).
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
            return grad_gate, grad * F.silu(gate)

    _FUNCTION.append(SwiGLU)
    return SwiGLU


def gated_mlps(model: nn.Module) -> list[nn.Module]:
    """The gated MLPs of ``model`` (``gate_proj``, ``up_proj``, ``down_proj`` and a SiLU ``act_fn``)."""
    from torch import nn

    out = []
    for module in model.modules():
        act = getattr(module, "act_fn", None)
        if (
            all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj"))
            and act is not None
            and _is_silu(act)
        ):
            out.append(module)
    return out


def _is_silu(act: Any) -> bool:
    from torch import nn

    # transformers' ACT2FN["silu"] is nn.SiLU; "swish" its SiLUActivation alias in some versions
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _swiglu_forward(mlp: nn.Module) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))

    return forward


def compile_blocks(model: nn.Module) -> int:
    """``--compile``: each transformer block's forward compiled by ``torch.compile`` (regional
    compilation: the blocks share their code, so it compiles once, not once per block, and the hooks
    around the output layer stay outside the graph), used while the block trains; evaluation and
    generation run the eager forward (a generation's growing lengths would recompile). Returns how
    many blocks."""
    import torch

    found = transformer_blocks(model)
    if not found:
        raise PeftkitError(
            f"--compile: no transformer blocks found in model type "
            f"{getattr(getattr(model, 'config', None), 'model_type', '?')!r}; drop --compile"
        )
    for block in found[1]:
        eager = block.forward
        compiled = torch.compile(eager)

        def forward(
            *args: Any, _block: Any = block, _eager: Any = eager, _compiled: Any = compiled, **kwargs: Any
        ) -> Any:
            return (_compiled if _block.training else _eager)(*args, **kwargs)

        block.forward = forward
    return len(found[1])


def apply_kernels(model: nn.Module, kernels: str | None, on_cuda: bool) -> str:
    """Put the ``--kernels`` choice into ``model`` (the base, before a strategy prepares it); returns
    what was applied: ``torch`` (N gated MLPs), ``liger``, or ``none``. ``None`` means ``torch``
    where the model has gated MLPs, else ``none``."""
    if kernels == "none":
        return "none"
    if kernels == "liger":
        return _apply_liger(model, on_cuda)
    mlps = gated_mlps(model)
    if not mlps:
        if kernels == "torch":
            raise PeftkitError(
                f"--kernels torch: model type {getattr(model.config, 'model_type', '?')!r} has no "
                "gated (SwiGLU) MLP to replace; drop --kernels"
            )
        return "none"
    for mlp in mlps:
        mlp.forward = _swiglu_forward(mlp)
    return "torch"


def _apply_liger(model: nn.Module, on_cuda: bool) -> str:
    """Liger's kernels, patched into this model instance (RMSNorm, RoPE, SwiGLU; the loss stays
    peftkit's chunked one, which Liger's fused cross-entropy would replace inside the model's
    forward, where logits_to_keep and the strategies' hooks expect plain logits)."""
    if not on_cuda:
        raise PeftkitError(LIGER_NEEDS_CUDA)
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN, _apply_liger_kernel_to_instance
    except ImportError:
        raise PeftkitError(
            "--kernels liger needs liger-kernel: pip install 'peftkit[liger]' (or pip install liger-kernel)"
        ) from None
    model_type = getattr(getattr(model, "config", None), "model_type", "?")
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:  # (Liger itself would only log and go on)
        raise PeftkitError(
            f"--kernels liger: Liger has no kernels for model type {model_type!r} (it has "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); use --kernels torch or none"
        )
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
    return "liger"
