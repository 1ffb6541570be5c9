"""The output layer and its cross-entropy in chunks of tokens (``--loss chunked``, the causal-LM default).

A language model's loss is computed from vocabulary-wide logits: batch x positions x vocabulary
numbers (16 x 512 x 49,152 floats is 1.6 GB in fp32), kept for the backward pass, copied to fp32 for
the softmax, and matched by a gradient of the same size. At a few thousand tokens a step they are
most of a LoRA run's peak, which no weight lever (4-bit base, 8-bit optimizer) touches.

Here the output layer's *input* (the last hidden states) is kept instead, and the loss is computed
a chunk of tokens at a time by ``LinearCrossEntropy``: each chunk's logits are made, turned into
its loss and at once into its gradients (with respect to the hidden states, and to the output
layer's weight and bias where they train), then dropped. Only one chunk of logits exists at any
time, in the forward pass and in the backward pass alike; the backward pass just scales the
gradients already computed. The arithmetic is the plain loss's: the same matrix products, so the
step costs no more (Liger's fused linear cross-entropy and torchtune's chunked output loss do the
same; Wijmans et al. 2024, "Cut your losses in large-vocabulary language models").

How the hidden states are caught without touching any strategy: for the duration of one forward
pass a pre-hook on the output layer (``model.get_output_embeddings()``) keeps its input and hands
the layer an empty slice of it, so the model returns logits for no position at all
(``captured_output_input``). Where that cannot reproduce the model's own logits (an output layer
that is not a plain ``nn.Linear``, such as a LoRA-wrapped one; logit soft-capping or scaling in the
model's forward; parameters sharded by ``--fsdp``), ``unsupported`` says why and a run uses the
plain loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

# One chunk's fp32 logits: 64 MiB (341 tokens of a 49,152-token vocabulary, 128 of a 128k one).
# Smaller chunks save nothing that matters beside the model and cost matrix-product efficiency.
CHUNK_BYTES = 64 * 2**20
# config keys of models whose forward changes the logits after the output layer: the chunks, made
# from the layer alone, would not be those logits
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_layer(model: nn.Module) -> nn.Module | None:
    """The model's output layer (the linear map to the vocabulary), or None where it has none."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else None


def unsupported(model: nn.Module, sharded: bool = False) -> str | None:
    """Why the chunked loss cannot stand in for this model's own logits, or None when it can."""
    from torch import nn

    layer = output_layer(model)
    if layer is None:
        return "the model has no output layer (get_output_embeddings) to chunk"
    if type(layer) is not nn.Linear:  # noqa: E721 - a subclass (a LoRA or quantized layer) computes more
        return (
            f"its output layer is a {type(layer).__name__}, not a plain linear layer (a strategy or "
            "quantization changed it), whose chunks would not be its logits"
        )
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _LOGIT_TRANSFORMS:
        if getattr(text, key, None) not in (None, 1, 1.0):
            return f"the model's forward transforms its logits after the output layer ({key})"
    if sharded:
        return "--fsdp shards the output layer, which is gathered only inside the model's forward"
    return None


@dataclass
class Captured:
    """What the output layer was given during the forward pass (``captured_output_input``)."""

    layer: nn.Module
    hidden: torch.Tensor | None = None


@contextlib.contextmanager
def captured_output_input(layer: nn.Module) -> Iterator[Captured]:
    """While open, every call of ``layer`` keeps its input (``Captured.hidden``) and computes on an
    empty slice of it instead: the model's logits then cover no position, and cost nothing."""
    captured = Captured(layer)

    def keep(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        captured.hidden = hidden
        return (hidden[..., :0, :], *args[1:])

    handle = layer.register_forward_pre_hook(keep)
    try:
        yield captured
    finally:
        handle.remove()


def chunk_tokens(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Tokens per chunk, so that one chunk's fp32 logits take about ``chunk_bytes``."""
    return max(1, chunk_bytes // (4 * max(1, vocab)))


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """The summed cross-entropy of ``targets`` (N) under the logits ``hidden @ weight.T + bias`` of
    ``hidden`` (N x d), computed ``chunk`` tokens at a time (default: ``chunk_tokens``), with
    gradients for whichever of ``hidden``, ``weight`` and ``bias`` need them."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    return _function().apply(hidden, weight, bias, targets, chunk)


def _loss_and_gradients(
    hidden: Any, weight: Any, bias: Any, targets: Any, chunk: int, wanted: tuple[bool, bool, bool]
) -> tuple[Any, Any, Any, Any]:
    """``LinearCrossEntropy``'s forward pass, ``chunk`` rows of logits at a time: the summed loss,
    and the gradients of hidden, weight and bias that are ``wanted`` (None for the others), each
    chunk's made while its logits exist and dropped with them."""
    import torch
    import torch.nn.functional as F

    want_hidden, want_weight, want_bias = wanted
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    # accumulated over chunks in fp32, whatever the weight is stored in
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        # (under autocast this product runs in 16 bits, as the model's own output layer would)
        logits = F.linear(h, weight, bias).float()
        lse = torch.logsumexp(logits, dim=-1)
        total += (lse - logits.gather(1, t.unsqueeze(1)).squeeze(1)).sum()
        if not (want_hidden or want_weight or want_bias):
            continue
        # d(loss sum)/d(logits) = softmax - one-hot, made in the logits' own memory
        grad = logits.sub_(lse.unsqueeze(1)).exp_()
        grad[torch.arange(len(t), device=grad.device), t] -= 1.0
        if want_hidden:
            grad_hidden[start : start + chunk] = grad.to(weight.dtype) @ weight
        if want_weight:
            grad_weight.addmm_(grad.t(), h.to(torch.float32))
        if want_bias:
            grad_bias += grad.sum(0)
        del logits, grad
    return total, grad_hidden, grad_weight, grad_bias


_FUNCTION: list[Any] = []


def _function() -> Any:
    """``LinearCrossEntropy``, built on first use (torch is imported only by commands that train)."""
    if _FUNCTION:
        return _FUNCTION[0]
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """Forward: the loss, and each chunk's gradients at once (its logits are dropped right
        after). Backward: those gradients times the incoming one (the loss is a scalar)."""

        @staticmethod
        def forward(
            ctx: Any,
            hidden: torch.Tensor,
            weight: torch.Tensor,
            bias: torch.Tensor | None,
            targets: torch.Tensor,
            chunk: int,
        ) -> torch.Tensor:
            want_hidden, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            want_bias = bias is not None and ctx.needs_input_grad[2]
            total, grad_hidden, grad_weight, grad_bias = _loss_and_gradients(
                hidden, weight, bias, targets, chunk, (want_hidden, want_weight, want_bias)
            )
            ctx.save_for_backward(*(g for g in (grad_hidden, grad_weight, grad_bias) if g is not None))
            ctx.wanted = (want_hidden, want_weight, want_bias)
            ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
            return total

        @staticmethod
        def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[Any, ...]:
            saved = iter(ctx.saved_tensors)
            out = [
                (next(saved) * grad_total).to(dtype) if wanted else None
                for wanted, dtype in zip(ctx.wanted, ctx.dtypes)
            ]
            return (*out, None, None)

    _FUNCTION.append(LinearCrossEntropy)
    return LinearCrossEntropy


def _labelled(
    captured: Captured, labels: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The hidden states of the positions that predict a labelled token (N x d), those tokens (N),
    and which of the batch's positions they are (batch x positions, True where labelled): position
    t predicts token t+1, and ``captured.hidden`` covers the last positions only where the model
    kept fewer logits (``logits_to_keep``), exactly as its logits would have."""
    hidden = captured.hidden
    if hidden is None:
        raise RuntimeError("the output layer was not called during the forward pass")
    target = labels[:, labels.shape[1] - hidden.shape[1] :][:, 1:]
    keep = target != ignore_index
    return hidden[:, :-1][keep], target[keep], keep


def chunked_token_loss(
    captured: Captured, labels: torch.Tensor, ignore_index: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, labelled tokens) of a causal LM's batch from the output layer's captured input."""
    hidden, targets, keep = _labelled(captured, labels, ignore_index)
    layer = captured.layer
    return linear_cross_entropy(hidden, layer.weight, layer.bias, targets, chunk), keep.sum()


def chunked_example_losses(
    captured: Captured, labels: torch.Tensor, ignore_index: int, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example of a causal LM's batch: (summed loss, labelled tokens), from the output layer's
    captured input a chunk of tokens at a time, without gradients (evaluation)."""
    import torch
    import torch.nn.functional as F

    hidden, targets, keep = _labelled(captured, labels, ignore_index)
    layer = captured.layer
    rows = torch.arange(len(labels), device=labels.device).unsqueeze(1).expand_as(keep)[keep]
    chunk = chunk or chunk_tokens(layer.weight.shape[0])
    sums = torch.zeros(len(labels), device=hidden.device)
    for start in range(0, len(targets), chunk):
        logits = F.linear(hidden[start : start + chunk], layer.weight, layer.bias).float()
        losses = F.cross_entropy(logits, targets[start : start + chunk], reduction="none")
        sums.index_add_(0, rows[start : start + chunk], losses)
    return sums, keep.sum(1)


def chunked_step_loss(
    forward: Callable[[Any, dict[str, Any]], Any], layer: nn.Module, ignore_index: int, chunk: int | None = None
) -> Callable[[Any, dict[str, Any]], Any]:
    """A training step's loss function: ``forward(model, batch)`` (the strategy's) run with the
    output layer's input caught, then the mean cross-entropy over the labelled tokens in chunks."""

    def step_loss(model: Any, batch: dict[str, Any]) -> Any:
        with captured_output_input(layer) as captured:
            forward(model, batch)
        total, count = chunked_token_loss(captured, batch["labels"], ignore_index, chunk)
        return total / count.clamp(min=1)

    return step_loss
