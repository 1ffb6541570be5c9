"""Fingerprints of pretrained weights, so an adapter is never applied to the wrong checkpoint.

Two checkpoints of the same architecture accept the same adapter keys and shapes, so key checks
alone cannot tell them apart; an adapter trained on one and applied to the other silently gives
poor predictions. We hash the backbone's tensors (never the new, randomly initialised task head)
and record the digest in the adapter's metadata; loading compares it.

Per-tensor digests also tell which trained tensors still equal the pretrained ones, so a full
fine-tune or gradual-unfreezing adapter can leave those out.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (on CPU, contiguous)."""
    import torch

    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the raw 16-bit words
        t = t.view(torch.int16)
    h.update(t.numpy().tobytes())
    return h.hexdigest()


def backbone_digests(model: nn.Module) -> dict[str, str]:
    """Digest of every backbone tensor, by its name in ``model.named_parameters()``.

    Only ``model.base_model`` is hashed: the task head of a freshly loaded classifier is random.
    Tied weights are hashed once (``named_parameters`` yields a shared tensor once).
    """
    base = getattr(model, "base_model", model)
    prefix = getattr(model, "base_model_prefix", "")
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for name, param in base.named_parameters():
        full = names.get(id(param), f"{prefix}.{name}" if prefix else name)
        out[full] = tensor_digest(param)
    return out


def fingerprint(digests: dict[str, str]) -> str:
    """One digest for the whole backbone: ``sha256:`` + the hash of the sorted per-tensor digests."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]};".encode())
    return "sha256:" + h.hexdigest()
