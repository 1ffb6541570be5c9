"""Applying a saved adapter to its base model: loading with every check, predicting, merging."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import PeftkitError


@dataclass
class LoadedAdapter:
    """A base model with an adapter applied, ready to predict."""

    model: Any
    tokenizer: Any
    strategy: Any
    metadata: dict[str, Any]

    @property
    def label_names(self) -> list[str]:
        return list(self.metadata["label_names"])


def _plain_peft_metadata(directory: str, model: str | None) -> dict[str, Any]:
    """Metadata for a peft adapter directory that peftkit did not write: the strategy from peft's
    ``peft_type``, its options from ``adapter_config.json``, labels as ids (their names are not
    recorded), the number of labels from the head's output layer."""
    from .adapter_io import PEFT_TENSORS_FILE, read_peft_config, read_safetensors
    from .registry import available
    from .strategies.base import options_to_dict

    config = read_peft_config(directory)
    if config is None:
        raise PeftkitError(f"{directory!r} is not an adapter directory (no peftkit_adapter.json or adapter_config.json)")
    peft_type = config.get("peft_type")
    matches = [cls for cls in available().values() if getattr(cls, "peft_type", None) == peft_type]
    if not matches:
        kinds = sorted({c.peft_type for c in available().values() if getattr(c, "peft_type", None)})
        raise PeftkitError(f"peft adapter type {peft_type!r} in {directory!r} is not supported; supported: {', '.join(kinds)}")
    if config.get("task_type") not in (None, "SEQ_CLS"):
        raise PeftkitError(f"peft adapter in {directory!r} is for task {config.get('task_type')!r}; "
                           "peftkit predict handles sequence classification (SEQ_CLS)")
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise PeftkitError(f"plain peft adapter {directory!r} names no base model; give --model")
    tensors = read_safetensors(os.path.join(directory, PEFT_TENSORS_FILE))
    heads = [t for k, t in tensors.items() if t.ndim == 2 and any(f".{m}." in f".{k}" for m in config.get("modules_to_save") or [])]
    if not heads:
        raise PeftkitError(f"plain peft adapter {directory!r} holds no classification head; cannot tell the labels")
    num_labels = min(int(t.shape[0]) for t in heads)  # the output layer is the narrowest head matrix
    cls = matches[0]
    return {"strategy": cls.name, "strategy_options": options_to_dict(cls.options_from_peft_config(config)),
            "base_model": base, "label_names": [str(i) for i in range(num_labels)], "format": "peft"}


def load_adapter(adapter_dir: str, model: str | None = None, force: bool = False) -> LoadedAdapter:
    """Load the base model named in the adapter's metadata (or ``model``) and apply the adapter.

    The strategy re-prepares a fresh base exactly as in training, then loads the saved tensors.
    Refused: pickle files, keys or shapes that do not match, and (unless ``force``) a base whose
    weights differ from those the adapter was trained on.
    """
    from transformers import set_seed

    from .adapter_io import check_adapter_dir, read_metadata
    from .fingerprint import backbone_digests, fingerprint
    from .models import load_classifier, load_tokenizer
    from .registry import get_strategy
    from .strategies.base import TaskSpec, options_from_dict

    check_adapter_dir(adapter_dir)
    meta = read_metadata(adapter_dir) or _plain_peft_metadata(adapter_dir, model)
    for key in ("strategy", "label_names", "base_model"):
        if key not in meta:
            raise PeftkitError(f"adapter metadata in {adapter_dir!r} lacks {key!r}")
    cls = get_strategy(meta["strategy"])
    strategy = cls(options_from_dict(cls, meta.get("strategy_options", {})))
    base_name = model or meta["base_model"]
    tokenizer = load_tokenizer(base_name)
    set_seed(0)  # fresh heads are overwritten by the adapter; seeding keeps any leftover repeatable
    # an adapter trained on a quantized base is applied to the same quantized base (and fingerprinted so)
    base = load_classifier(base_name, list(meta["label_names"]), tokenizer.pad_token_id,
                           quantize=meta.get("base_quantization"))
    expected = meta.get("base_fingerprint")
    if expected:
        actual = fingerprint(backbone_digests(base))
        if actual != expected and not force:
            raise PeftkitError(
                f"adapter {adapter_dir!r} was trained on base {meta['base_model']!r} ({expected[:19]}), but "
                f"{base_name!r} has other weights ({actual[:19]}); use --force to apply it anyway"
            )
    task = TaskSpec(num_labels=len(meta["label_names"]), label_names=tuple(meta["label_names"]))
    prepared = strategy.prepare(base, task)
    strategy.load_adapter(prepared, adapter_dir, meta)
    prepared.eval()
    return LoadedAdapter(prepared, tokenizer, strategy, meta)


def predict_texts(loaded: LoadedAdapter, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """One dict per text: ``text, label, label_id, score, probabilities`` (aligned with label ids)."""
    import torch

    max_length = int(loaded.metadata.get("max_length", 512))
    names = loaded.label_names
    out: list[dict[str, Any]] = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            batch = dict(loaded.tokenizer(chunk, truncation=True, max_length=max_length,
                                          padding=True, return_tensors="pt"))
            probs = torch.softmax(loaded.strategy.forward(loaded.model, batch).float(), dim=-1)
            for text, p in zip(chunk, probs):
                label_id = int(p.argmax())
                out.append({"text": text, "label": names[label_id], "label_id": label_id,
                            "score": float(p[label_id]), "probabilities": [float(x) for x in p]})
    return out


def merge_to_directory(loaded: LoadedAdapter, directory: str) -> None:
    """Write base + adapter as one standard transformers model directory (safetensors + tokenizer)
    that ``AutoModelForSequenceClassification.from_pretrained`` loads."""
    merged = loaded.strategy.merge(loaded.model)
    merged.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
