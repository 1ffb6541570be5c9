"""Applying a saved adapter to its base model and classifying texts."""

from __future__ import annotations

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


def load_adapter(adapter_dir: str, model: str | None = None) -> LoadedAdapter:
    """Load the base model named in the adapter's metadata (or ``model``) and apply the adapter.

    The strategy re-prepares a fresh base exactly as in training, then loads the saved tensors;
    keys or shapes that do not match are an error.
    """
    from transformers import set_seed

    from .adapter_io import read_adapter_files
    from .models import load_classifier, load_tokenizer
    from .registry import get_strategy
    from .strategies.base import TaskSpec, options_from_dict

    tensors, meta = read_adapter_files(adapter_dir)
    for key in ("strategy", "label_names", "base_model"):
        if key not in meta:
            raise PeftkitError(f"adapter metadata in {adapter_dir!r} lacks {key!r}")
    cls = get_strategy(meta["strategy"])
    strategy = cls(options_from_dict(cls, meta.get("strategy_options", {})))
    base_name = model or meta["base_model"]
    tokenizer = load_tokenizer(base_name)
    set_seed(0)  # fresh heads are overwritten by the adapter; seeding keeps any leftover repeatable
    base = load_classifier(base_name, list(meta["label_names"]), tokenizer.pad_token_id)
    task = TaskSpec(num_labels=len(meta["label_names"]), label_names=tuple(meta["label_names"]))
    prepared = strategy.prepare(base, task)
    strategy.load_adapter_state(prepared, tensors)
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
