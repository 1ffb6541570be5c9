"""Reading and writing what a strategy trained: safetensors plus a JSON metadata file.

Layout of an adapter directory::

    adapter.safetensors     the strategy's tensors (Strategy.adapter_state), nothing else
    peftkit_adapter.json    strategy and options, base model, label names, max length, versions

Only safetensors are ever read: a pickle file (``.bin``, ``.pt``, ``.pth``, ``.pkl``) can run code
when loaded, and adapters are made to be shared.
"""

from __future__ import annotations

import json
import os
import platform
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from .errors import PeftkitError

TENSORS_FILE = "adapter.safetensors"
METADATA_FILE = "peftkit_adapter.json"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
VERSIONED_PACKAGES = ("peftkit", "torch", "transformers", "peft", "accelerate", "datasets",
                      "safetensors", "bitsandbytes")


def package_versions() -> dict[str, str]:
    """Versions of Python and of every package a result depends on (for metadata and benchmarks)."""
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def save_adapter_files(directory: str, tensors: dict[str, Any], metadata: dict[str, Any]) -> int:
    """Write ``tensors`` and ``metadata`` into ``directory`` (created); return the tensor file's size."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    # clone+contiguous: safetensors refuses views and tensors that share storage
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    tensor_path = os.path.join(directory, TENSORS_FILE)
    save_file(plain, tensor_path, metadata={"format": "pt", "peftkit_strategy": str(metadata.get("strategy"))})
    meta = {"format_version": FORMAT_VERSION, **metadata}
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as fh:
        json.dump(meta, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    return os.path.getsize(tensor_path)


def read_adapter_files(directory: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Return ``(tensors, metadata)`` of an adapter directory, refusing anything but safetensors."""
    if not os.path.exists(directory):
        raise PeftkitError(f"adapter directory not found: {directory}")
    if not os.path.isdir(directory):
        raise PeftkitError(f"adapter path {directory!r} is a file; give the adapter directory")
    meta_path = os.path.join(directory, METADATA_FILE)
    tensor_path = os.path.join(directory, TENSORS_FILE)
    if not os.path.exists(tensor_path):
        pickles = [f for f in os.listdir(directory) if f.endswith(_PICKLE_SUFFIXES)]
        if pickles:
            raise PeftkitError(
                f"refusing {os.path.join(directory, pickles[0])!r}: pickle files can run code when "
                "loaded; peftkit only loads safetensors"
            )
        raise PeftkitError(f"{directory!r} is not a peftkit adapter (no {TENSORS_FILE})")
    if not os.path.exists(meta_path):
        raise PeftkitError(f"{directory!r} is not a peftkit adapter (no {METADATA_FILE})")
    try:
        with open(meta_path, encoding="utf-8") as fh:
            metadata = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftkitError(f"adapter metadata {meta_path!r} is not valid JSON: {exc}") from None
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise PeftkitError(f"adapter file {tensor_path!r} is truncated or corrupt: {exc}") from None
    return tensors, metadata
