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
import json
import os
from typing import TYPE_CHECKING

from .files import write_json
from .gguf_convert import cache_dir
from .models import held_in_memory, resolve_model_source

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


# -- the digests of a model loaded before, from a cache ----------------------------------------

_CACHE_FORMAT = 1


def cached_backbone_digests(model: nn.Module, model_name: str, seed: int) -> dict[str, str]:
    """``backbone_digests(model)`` for ``model`` as loaded from ``model_name`` (with ``seed`` set
    before loading), read from peftkit's cache when the same files were loaded the same way before.

    Hashing reads every weight: 2.8 s of a 0.6B model's start-up on a 2-core CPU, paid again by every
    run, bench row and trial of the same base. The cache is keyed by what the digests depend on: the
    model directory's files (name, size, modification time), the loaded backbone's tensor names,
    shapes and dtypes (a quantized or half-precision load differs) and the seed (a tensor the files
    lack is initialised at random). A hit is checked against one tensor hashed afresh (the
    smallest), so a cache that does not match its model is never believed; a model that is no local
    directory (a hub id not downloaded) is hashed every time, as is a loaded model saved for one
    call (``models.in_memory_model``): its directory is gone once the call ends, so its entry could
    never be read again."""
    if held_in_memory(model_name):
        return backbone_digests(model)
    try:
        source = resolve_model_source(model_name)
    except Exception:  # noqa: BLE001 - whatever cannot be resolved is simply hashed
        source = None
    if not source or not os.path.isdir(source):
        return backbone_digests(model)
    files = sorted(
        (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in os.scandir(source) if entry.is_file()
    )
    base = getattr(model, "base_model", model)
    tensors = [(name, tuple(p.shape), str(p.dtype)) for name, p in base.named_parameters()]
    key = hashlib.sha256(
        json.dumps([_CACHE_FORMAT, os.path.realpath(source), files, type(model).__name__, tensors, seed]).encode()
    ).hexdigest()
    path = os.path.join(cache_dir(), "fingerprints", f"{key}.json")
    cached = _read_cached(path)
    if cached is not None and _still_matches(model, cached):
        return cached
    digests = backbone_digests(model)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, digests)
    except OSError:  # a read-only cache costs the next run the hashing, nothing else
        pass
    return digests


def _read_cached(path: str) -> dict[str, str] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()) else None


def _still_matches(model: nn.Module, cached: dict[str, str]) -> bool:
    """Whether the smallest backbone tensor's digest is the cached one (a cheap check that the cache
    describes these weights)."""
    names = {id(p): n for n, p in model.named_parameters()}
    base = getattr(model, "base_model", model)
    params = [(p.numel(), names.get(id(p))) for p in base.parameters()]
    if not params:
        return True
    _, name = min(params, key=lambda item: item[0])
    param = dict(model.named_parameters()).get(name) if name else None
    return param is not None and cached.get(name) == tensor_digest(param)
