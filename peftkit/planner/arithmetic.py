"""Weights, gradients and optimizer state: the plan's arithmetic, from a model built on the
meta device (each parameter at the precision it is stored in, see ``peftkit.planner``)."""

from __future__ import annotations

import math
from typing import Any

from ..levers import half_dtype
from ..structure import transformer_blocks
from .estimate import Estimate, PlanSettings

_NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
_BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer state below this many elements


def _quantized_weight_ids(model: Any, skip: list[str]) -> dict[int, tuple[int, int]]:
    """id(weight) -> (numel, out_features) for every linear weight bitsandbytes would quantize."""
    from torch import nn

    out = {}
    for name, module in model.named_modules():
        top = name.split(".", 1)[0]
        if isinstance(module, nn.Linear) and top not in skip and name.rsplit(".", 1)[-1] not in skip:
            out[id(module.weight)] = (module.weight.numel(), module.weight.shape[0])
    return out


def parameter_memory(
    model: Any, trainable: dict[str, Any], settings: PlanSettings, skip: list[str]
) -> tuple[int, int, int, list[str]]:
    """Bytes of weights, gradients and optimizer state of a prepared (meta-device) model."""
    half = half_dtype(settings.levers.precision)
    trainable_ids = {id(p) for p in trainable.values()}
    quantized = _quantized_weight_ids(model, skip) if settings.levers.quantize else {}
    weights = grads = opt = 0
    notes: list[str] = []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields each shared (tied) tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if id(p) in trainable_ids:
            weights += 4 * n
            grads += 4 * n
            if settings.levers.optimizer == "adamw" or n < _BNB_MIN_8BIT_SIZE:
                opt += 8 * n
            else:  # two 8-bit moments plus an fp32 scale per 256-element block each
                opt += 2 * n + 2 * 4 * math.ceil(n / 256)
        elif id(p) in quantized:
            numel, rows = quantized[id(p)]
            weights += int(numel * _NF4_BYTES) if settings.levers.quantize == "4bit" else numel + 4 * rows
        elif half is not None and p.is_floating_point():
            weights += 2 * n
        else:
            weights += p.element_size() * n
    if settings.levers.optimizer == "paged_adamw8bit" and settings.device == "cuda":
        opt = 0  # the allocator never sees it, so neither does its peak
        notes.append("paged optimizer state lives in CUDA managed memory, outside the allocator's count")
    return weights, grads, opt, notes


def per_process_memory(
    est: Estimate, model: Any, trainable: dict[str, Any], settings: PlanSettings, skip: list[str]
) -> None:
    """Turn ``est``'s weights, gradients and optimizer state (one process's whole model) into one
    device's share of ``settings.processes``, and set what the processes add (``communication``).

    - Data parallel (DDP): every process holds everything; DistributedDataParallel also keeps a
      bucket copy of every gradient to all-reduce (``gradient_as_bucket_view`` is off in accelerate
      and here), so ``communication`` is the gradients again.
    - FSDP2 (``fully_shard`` on each transformer block, then the root): weights, gradients and
      optimizer state are split evenly (each parameter's first dimension over the processes). To
      compute, FSDP gathers whole parameters: the root's own (embeddings, head) for the pass, and
      a block at a time, the next one prefetched, with a block's gradients before they are
      reduce-scattered; ``communication`` is that: the root's weights, two of the largest block's
      weights and its gradients. Activations are not divided: each device runs its own micro-batch.
    """
    n = settings.processes
    if n == 1:
        return
    if not settings.fsdp:
        est.communication = est.gradients
        est.notes.append(
            f"data parallel over {n} processes: each holds the whole model, plus a bucket copy of "
            "its gradients for the all-reduce"
        )
        return
    found = transformer_blocks(model)
    blocks = found[1] if found else []
    block_weights, block_grads = 0, 0
    in_blocks = 0
    for block in blocks:
        ids = {id(p) for p in block.parameters()}
        weights, grads, _, _ = parameter_memory(
            block, {k: p for k, p in trainable.items() if id(p) in ids}, settings, skip
        )
        in_blocks += weights
        block_weights, block_grads = max(block_weights, weights), max(block_grads, grads)
    root = est.weights - in_blocks
    est.weights, est.gradients, est.optimizer = (math.ceil(x / n) for x in (est.weights, est.gradients, est.optimizer))
    est.communication = root + 2 * block_weights + block_grads
    est.notes.append(
        f"FSDP over {n} processes: weights, gradients and optimizer state split {n} ways; "
        f"communication: the parameters gathered at once (the root's own, two blocks) and one "
        f"block's gradients"
        + ("" if blocks else "; no transformer blocks found: the whole model is one unit, gathered whole")
    )
