"""Reading and writing what a strategy trained: safetensors files plus peftkit's metadata.

An adapter directory holds the strategy's weights and ``peftkit_adapter.json``. The weights are
either peftkit's own file::

    adapter.safetensors     the strategy's tensors, minus those still equal to the pretrained ones

or, for ``lora`` (through peft) and ``prefix`` (peftkit's own, in the same layout), peft's format,
which ``peft.PeftModel.from_pretrained(base, directory)`` loads as it is::

    adapter_config.json         peft's configuration
    adapter_model.safetensors   peft's key names

``peftkit_adapter.json`` records the strategy and its options, the base model and the fingerprint
of its weights, label names, max length, metrics and package versions.

Only safetensors are ever read: a pickle file (``.bin``, ``.pt``, ``.pth``, ``.pkl``) can run code
when loaded, and adapters are made to be shared.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

from .env import package_versions  # the one version table (metrics.json, bench results too)
from .errors import PeftkitError
from .files import publish_file, write_json
from .fingerprint import fingerprint, tensor_digest
from .models import task_of_architectures

if TYPE_CHECKING:  # pragma: no cover
    import torch

TENSORS_FILE = "adapter.safetensors"
METADATA_FILE = "peftkit_adapter.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_TENSORS_FILE = "adapter_model.safetensors"
FORMAT_VERSION = 1
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


# -- safetensors files ------------------------------------------------------------------------


def write_safetensors(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Write tensors with safetensors (clone + contiguous: it refuses views and shared storage).

    safetensors writes through a private temporary file, so the file would be 0600 whatever the
    umask: it gets the mode a plain ``open`` gives instead (an adapter is made to be shared)."""
    from safetensors.torch import save_file

    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(plain, path, metadata={"format": "pt"})
    publish_file(path)


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning a truncated or corrupt file into a clear error."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PeftkitError(f"adapter file {path!r} is truncated or corrupt: {exc}") from None


def save_changed_tensors(
    tensors: dict[str, torch.Tensor], directory: str, base_digests: dict[str, str]
) -> dict[str, Any]:
    """Write ``tensors`` to ``adapter.safetensors``, leaving out those bit-identical to the
    pretrained weights (recorded by name, so loading can insist on exactly the rest)."""
    unchanged = sorted(n for n, t in tensors.items() if base_digests.get(n) == tensor_digest(t))
    write_safetensors(
        {n: t for n, t in tensors.items() if n not in set(unchanged)}, os.path.join(directory, TENSORS_FILE)
    )
    return {"format": "peftkit-safetensors", "unchanged_from_base": unchanged}


def read_changed_tensors(
    expected: dict[str, torch.Tensor], directory: str, metadata: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The inverse of ``save_changed_tensors``: the saved tensors, completed with the model's own
    (pretrained) values for those recorded as unchanged. Any other gap is an error."""
    path = os.path.join(directory, TENSORS_FILE)
    if not os.path.exists(path):
        raise PeftkitError(f"{directory!r} has no {TENSORS_FILE}; it is not a peftkit adapter of this strategy")
    tensors = read_safetensors(path)
    unchanged = set(metadata.get("unchanged_from_base", []))
    unknown = sorted(unchanged - set(expected))
    if unknown:
        raise PeftkitError(f"the adapter does not match the model: it names {unknown[0]!r}, which the model lacks")
    tensors.update({n: expected[n] for n in unchanged if n not in tensors})
    return tensors


# -- adapter directories ----------------------------------------------------------------------


def check_adapter_dir(directory: str) -> None:
    """Refuse a missing path, a file, or a directory whose weights are only pickles."""
    if not os.path.exists(directory):
        raise PeftkitError(f"adapter directory not found: {directory}")
    if not os.path.isdir(directory):
        raise PeftkitError(f"adapter path {directory!r} is a file; give the adapter directory")
    files = os.listdir(directory)
    if not any(f.endswith(".safetensors") for f in files):
        pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
        if pickles:
            raise PeftkitError(
                f"refusing {os.path.join(directory, pickles[0])!r}: pickle files can run code when "
                "loaded; peftkit only loads safetensors (convert it with safetensors first)"
            )
        raise PeftkitError(
            f"{directory!r} is not an adapter directory (no .safetensors file); give a run's "
            f"adapter/ folder, a run directory holding one, or a folder in adapters/"
        )


RUN_ADAPTER_SUBDIR = "adapter"


def resolve_adapter_dir(path: str) -> str:
    """The adapter directory ``path`` means: ``path`` itself, or, for a run directory (one whose
    own files are no adapter but whose ``adapter/`` is), its ``adapter/``. Everything else is
    returned as given, for ``check_adapter_dir`` to say what is wrong with it."""
    inner = os.path.join(path, RUN_ADAPTER_SUBDIR)
    if not os.path.isdir(path) or not os.path.isdir(inner):
        return path
    if any(f.endswith(".safetensors") for f in os.listdir(path)):
        return path  # an adapter folder that happens to hold a sub-folder of that name
    return inner


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PeftkitError(f"{path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"{path!r} must hold a JSON object")
    return data


def read_metadata(directory: str) -> dict[str, Any] | None:
    """peftkit's metadata of an adapter directory, or None for a plain peft adapter."""
    path = os.path.join(directory, METADATA_FILE)
    return _read_json(path) if os.path.exists(path) else None


def read_peft_config(directory: str) -> dict[str, Any] | None:
    """peft's ``adapter_config.json`` as a dict, or None when there is none."""
    path = os.path.join(directory, PEFT_CONFIG_FILE)
    return _read_json(path) if os.path.exists(path) else None


def read_peft_adapter(directory: str, strategy: str, peft_type: str) -> dict[str, torch.Tensor]:
    """The tensors of a peft-format adapter folder written for ``strategy`` (peft type
    ``peft_type``), after checking that the folder is one: a config of that type and its weights."""
    config = read_peft_config(directory)
    if config is None:
        raise PeftkitError(f"{directory!r} has no {PEFT_CONFIG_FILE}; it is not a {strategy} adapter")
    if config.get("peft_type") != peft_type:
        raise PeftkitError(
            f"{directory!r} holds a peft {config.get('peft_type')!r} adapter, "
            f"strategy {strategy!r} expects {peft_type!r}"
        )
    path = os.path.join(directory, PEFT_TENSORS_FILE)
    if not os.path.exists(path):
        raise PeftkitError(f"{directory!r} has no {PEFT_TENSORS_FILE}")
    return read_safetensors(path)


def adapter_bytes(directory: str) -> int:
    """Total size of the weight files (what shipping the adapter costs)."""
    return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(".safetensors"))


def save_adapter(
    directory: str,
    strategy: Any,
    model: Any,
    metadata: dict[str, Any] | None = None,
    base_digests: dict[str, str] | None = None,
) -> int:
    """Save ``model``'s adapter (as ``strategy`` trained it) and its metadata into ``directory``, so
    that ``load_adapter(directory)`` applies it again. Returns the weight files' size in bytes.

    ``save_adapter(directory, strategy, model)`` is enough: what loading needs is read from the
    strategy (name, options) and the model (``default_metadata``: base model, task, label names).
    ``metadata`` adds to or overrides that (a run also records its data, metrics, max length).
    ``base_digests`` (``fingerprint.backbone_digests`` of the base before training) records the
    base's fingerprint, which loading checks, and lets a full fine-tune leave out the tensors that
    did not change; without it every trained tensor is saved and no fingerprint is checked.
    """
    digests = base_digests or {}
    meta = {**default_metadata(strategy, model), **(metadata or {})}
    if digests and "base_fingerprint" not in meta:
        meta["base_fingerprint"] = fingerprint(digests)
    os.makedirs(directory, exist_ok=True)
    facts = strategy.save_adapter(model, directory, digests)
    size = adapter_bytes(directory)
    meta = {
        "format_version": FORMAT_VERSION,
        **meta,
        **facts,
        "adapter_bytes": size,
        "versions": meta.get("versions") or package_versions(),
    }
    write_json(os.path.join(directory, METADATA_FILE), meta)
    return size


def default_metadata(strategy: Any, model: Any) -> dict[str, Any]:
    """What ``load_adapter`` needs, read from a strategy and the model it prepared: the strategy's
    name and options, the base model (the name the model was loaded from), the task (from the
    model's class: ``...ForCausalLM``, ``...ForImageClassification``, else sequence
    classification) and, for a classifier, the label names in id order."""
    # a peft model hands on its base's config; a model of a strategy's own making (head_only's
    # pooled head) holds the base's backbone, whose config is the base's (labels included)
    config = next((m.config for m in model.modules() if hasattr(getattr(m, "config", None), "to_dict")), None)
    classes = " ".join(type(m).__name__ for m in (model, getattr(model, "base_model", None)))
    task = task_of_architectures(classes) or "sequence-classification"
    id2label = getattr(config, "id2label", None) or {}
    options = strategy.options
    return {
        "strategy": strategy.name,
        "strategy_options": dataclasses.asdict(options) if dataclasses.is_dataclass(options) else {},
        "base_model": getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None),
        "task": task,
        "label_names": None if task == "causal-lm" else [str(id2label[i]) for i in sorted(id2label, key=int)],
    }


def recorded_base_model(adapter_dir: str) -> str | None:
    """The base model an adapter folder names (peftkit's metadata, else peft's config), if any; a
    run directory names its base in adapter/."""
    adapter_dir = resolve_adapter_dir(adapter_dir)
    if not os.path.isdir(adapter_dir):
        return None
    meta = read_metadata(adapter_dir) or {}
    return meta.get("base_model") or (read_peft_config(adapter_dir) or {}).get("base_model_name_or_path")


def describe_adapter(adapter_dir: str) -> dict[str, Any]:
    """What ``peftkit inspect`` shows: an adapter's metadata with its size (``adapter_bytes``); for a
    plain peft adapter, what its config says. ``adapter_dir`` may be a run directory."""
    adapter_dir = resolve_adapter_dir(adapter_dir)
    check_adapter_dir(adapter_dir)
    meta = read_metadata(adapter_dir)
    if meta is None:
        peft_config = read_peft_config(adapter_dir)
        if peft_config is None:
            raise PeftkitError(
                f"{adapter_dir!r} is not an adapter directory (no peftkit_adapter.json or adapter_config.json)"
            )
        meta = {
            "format": "peft (no peftkit metadata)",
            "peft_type": peft_config.get("peft_type"),
            "base_model": peft_config.get("base_model_name_or_path"),
        }
    meta["adapter_bytes"] = adapter_bytes(adapter_dir)
    return meta
