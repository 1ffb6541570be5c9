"""Applying a saved adapter to its base model: loading with every check, predicting, merging."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import PeftkitError, set_context


@dataclass
class LoadedAdapter:
    """A base model with an adapter applied, ready to predict."""

    model: Any
    tokenizer: Any  # the task's processor: a tokenizer, or the image processor for images
    strategy: Any
    metadata: dict[str, Any]
    task: Any = None

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
    from .registry import get_strategy
    from .strategies.base import options_from_dict
    from .tasks import TaskData, get_task

    check_adapter_dir(adapter_dir)
    meta = read_metadata(adapter_dir) or _plain_peft_metadata(adapter_dir, model)
    for key in ("strategy", "base_model"):
        if key not in meta:
            raise PeftkitError(f"adapter metadata in {adapter_dir!r} lacks {key!r}")
    cls = get_strategy(meta["strategy"])
    strategy = cls(options_from_dict(cls, meta.get("strategy_options", {})))
    base_name = model or meta["base_model"]
    set_context(strategy=meta["strategy"], model=base_name)
    task = get_task(meta.get("task") or "sequence-classification")
    processor = task.load_processor(base_name)
    set_seed(0)  # fresh heads are overwritten by the adapter; seeding keeps any leftover repeatable
    # an adapter trained on a quantized base is applied to the same quantized base (and fingerprinted so)
    data = TaskData(None, meta.get("label_names"), {"prompt_template": meta.get("prompt_template")})
    base = task.load_model(base_name, data, processor, meta.get("base_quantization"), "fp32")
    set_context(model_type=getattr(getattr(base, "config", None), "model_type", None))
    expected = meta.get("base_fingerprint")
    if expected:
        actual = fingerprint(backbone_digests(base))
        if actual != expected and not force:
            raise PeftkitError(
                f"adapter {adapter_dir!r} was trained on base {meta['base_model']!r} ({expected[:19]}), but "
                f"{base_name!r} has other weights ({actual[:19]}); use --force to apply it anyway"
            )
    prepared = strategy.prepare(base, task.spec(base, data))
    strategy.load_adapter(prepared, adapter_dir, meta)
    prepared.eval()
    return LoadedAdapter(prepared, processor, strategy, meta, task)


def predict_texts(loaded: LoadedAdapter, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
    """One dict per input, as the adapter's task answers it: for classification ``text, label,
    label_id, score, probabilities``; for causal-lm ``text, prompt, completion``; for images the
    inputs are image files."""
    return loaded.task.predict(loaded, list(texts), batch_size)


def merge_to_directory(loaded: LoadedAdapter, directory: str) -> None:
    """Write base + adapter as one standard transformers model directory (safetensors + tokenizer)
    that ``AutoModelForSequenceClassification.from_pretrained`` loads."""
    merged = loaded.strategy.merge(loaded.model)
    merged.save_pretrained(directory)
    getattr(loaded.tokenizer, "processor", loaded.tokenizer).save_pretrained(directory)
