"""Applying a saved adapter to its base model: loading with every check, predicting, merging."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .adapter_io import (
    PEFT_TENSORS_FILE,
    check_adapter_dir,
    read_metadata,
    read_peft_config,
    read_safetensors,
    resolve_adapter_dir,
)
from .errors import PeftkitError, set_context
from .fingerprint import cached_backbone_digests, fingerprint
from .predict_io import GenerationOptions
from .registry import available, get_strategy, strategy_families
from .strategies.base import options_from_dict, options_to_dict
from .tasks import TaskData, declared_task, get_task


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

    def probabilities(self, batch: dict[str, Any]) -> Any:
        """Each example's label probabilities (a float32 tensor, batch x labels) for a model batch
        (``Task.serving_batch``): what ``predict`` answers and ``peftkit export`` checks against."""
        import torch

        with torch.no_grad():
            return torch.softmax(self.strategy.forward(self.model, batch).float(), dim=-1)


def _plain_peft_metadata(directory: str, model: str | None) -> dict[str, Any]:
    """Metadata for a peft adapter directory that peftkit did not write: the strategy from peft's
    ``peft_type``, its options from ``adapter_config.json``, labels as ids (their names are not
    recorded), the number of labels from the head's output layer."""
    config = read_peft_config(directory)
    if config is None:
        raise PeftkitError(
            f"{directory!r} is not an adapter directory (no peftkit_adapter.json or adapter_config.json)"
        )
    peft_type = config.get("peft_type")
    cls = strategy_of_peft_type(str(peft_type))
    if cls is None:
        kinds = sorted({c.peft_type for c in available().values() if getattr(c, "peft_type", None)})
        families = ", ".join(f"{p}NAME ({f.description})" for p, f in strategy_families().items())
        raise PeftkitError(
            f"peft adapter type {peft_type!r} in {directory!r} is not supported; supported: {', '.join(kinds)}"
            + (f", and the families' {families}" if families else "")
        )
    if config.get("task_type") not in (None, "SEQ_CLS"):
        raise PeftkitError(
            f"peft adapter in {directory!r} is for task {config.get('task_type')!r}; "
            "peftkit predict handles sequence classification (SEQ_CLS)"
        )
    base = model or config.get("base_model_name_or_path")
    if not base:
        raise PeftkitError(f"plain peft adapter {directory!r} names no base model; give --model")
    tensors = read_safetensors(os.path.join(directory, PEFT_TENSORS_FILE))
    heads = [
        t
        for k, t in tensors.items()
        if t.ndim == 2 and any(f".{m}." in f".{k}" for m in config.get("modules_to_save") or [])
    ]
    if not heads:
        raise PeftkitError(f"plain peft adapter {directory!r} holds no classification head; cannot tell the labels")
    num_labels = min(int(t.shape[0]) for t in heads)  # the output layer is the narrowest head matrix
    return {
        "strategy": cls.name,
        "strategy_options": options_to_dict(cls.options_from_peft_config(config)),
        "base_model": base,
        "label_names": [str(i) for i in range(num_labels)],
        "format": "peft",
    }


def strategy_of_peft_type(peft_type: str) -> Any | None:
    """The strategy that writes peft adapters of ``peft_type``: a registered one (``lora`` for
    ``LORA``), else a family's member of that name in lower case whose ``peft_type`` it is (``IA3``
    -> ``peft:ia3``): a family resolves its names only when asked, so ``available`` lacks them."""
    for cls in available().values():
        if getattr(cls, "peft_type", None) == peft_type:
            return cls
    for prefix in strategy_families():
        try:
            member = get_strategy(prefix + peft_type.lower())
        except PeftkitError:  # not one of this family's names (or one it does not offer)
            continue
        if getattr(member, "peft_type", None) == peft_type:
            return member
    return None


def check_model_task(task: Any, model: str, adapter_dir: str, trained_on: str) -> None:
    """Refuse, before it loads, a ``--model`` made for inputs or outputs the adapter's ``task``
    cannot use (a text adapter on an image model, a causal-lm adapter on a classifier): loading it
    would fail later with a message about something else (a missing tokenizer)."""
    made_for = declared_task(model)
    if made_for is None or task.accepts_model(get_task(made_for)):
        return
    raise PeftkitError(
        f"adapter {adapter_dir!r} is a {task.name} adapter, but model {model!r} is made for "
        f"{made_for}; give a {task.name} base (it was trained on {trained_on!r}), or leave out "
        "--model to use that one"
    )


def adapter_task(adapter_dir: str) -> Any:
    """The task of the adapter in ``adapter_dir`` (a run directory means its ``adapter/``), read
    from its metadata without loading anything (a plain peft adapter: sequence-classification)."""

    adapter_dir = resolve_adapter_dir(adapter_dir)
    check_adapter_dir(adapter_dir)
    return get_task((read_metadata(adapter_dir) or {}).get("task") or "sequence-classification")


def load_adapter(adapter_dir: str, model: str | None = None, force: bool = False) -> LoadedAdapter:
    """Load the base model named in the adapter's metadata (or ``model``) and apply the adapter.

    The strategy re-prepares a fresh base exactly as in training, then loads the saved tensors.
    Refused: pickle files, keys or shapes that do not match, and (unless ``force``) a base whose
    weights differ from those the adapter was trained on.
    """
    from transformers import set_seed

    adapter_dir = resolve_adapter_dir(adapter_dir)  # a run directory means its adapter/
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
    if model is not None:
        check_model_task(task, model, adapter_dir, meta["base_model"])
    processor = task.load_processor(base_name)
    set_seed(0)  # fresh heads are overwritten by the adapter; seeding keeps any leftover repeatable
    # an adapter trained on a quantized base is applied to the same quantized base (and fingerprinted so)
    data = TaskData(None, meta.get("label_names"), {"prompt_template": meta.get("prompt_template")})
    base = task.load_model(base_name, data, processor, meta.get("base_quantization"), "fp32")
    set_context(model_type=getattr(getattr(base, "config", None), "model_type", None))
    expected = meta.get("base_fingerprint")
    if expected:
        actual = fingerprint(cached_backbone_digests(base, base_name, 0))
        if actual != expected and not force:
            raise PeftkitError(
                f"adapter {adapter_dir!r} was trained on base {meta['base_model']!r} ({expected[:19]}), but "
                f"{base_name!r} has other weights ({actual[:19]}); use --force to apply it anyway"
            )
    prepared = strategy.prepare(base, task.spec(base, data))
    strategy.load_adapter(prepared, adapter_dir, meta)
    prepared.eval()
    return LoadedAdapter(prepared, processor, strategy, meta, task)


def predict_texts(
    loaded: LoadedAdapter,
    texts: list[str],
    batch_size: int | None = None,
    generation: GenerationOptions | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """One dict per input, as the adapter's task answers it: for classification ``text, label,
    label_id, score, probabilities``; for causal-lm ``text, prompt, completion`` (and ``label``);
    for images the inputs are image files. See ``iter_predictions`` for the other arguments."""
    return list(iter_predictions(loaded, texts, batch_size, generation, progress))


def check_prediction_settings(task: Any, batch_size: int | None, generation: GenerationOptions) -> None:
    """Refuse settings ``task`` cannot honour, before anything loads: a batch size that is no
    positive integer, bad generation values, and generation settings where nothing generates."""
    generation.validate()
    if generation.given() and not task.generates:
        flags = ", ".join("--" + name.replace("_", "-") for name in generation.given())
        raise PeftkitError(
            f"{flags}: only for adapters that generate text (causal-lm); this adapter is a {task.name} adapter"
        )
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise PeftkitError(f"batch_size must be a positive integer, got {batch_size!r}")


def iter_predictions(
    loaded: LoadedAdapter,
    texts: list[str],
    batch_size: int | None = None,
    generation: GenerationOptions | None = None,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """The answers of ``predict_texts``, yielded a batch at a time (so they can be written as
    they come). ``batch_size``: inputs per forward pass (None: the task's own default);
    ``generation``: how a task that generates answers (refused, if given, for one that does not);
    ``progress``: a progress bar on stderr (in a terminal)."""
    from tqdm.auto import tqdm

    task, generation = loaded.task, generation or GenerationOptions()
    check_prediction_settings(task, batch_size, generation)
    texts = list(texts)
    kwargs: dict[str, Any] = {"generation": generation} if task.generates else {}
    if batch_size is not None:
        kwargs["batch_size"] = batch_size
    if generation.do_sample:
        from transformers import set_seed

        set_seed(generation.seed)  # once, before the first batch: the same command samples the same answers
    step = batch_size or 64
    with tqdm(
        total=len(texts),
        desc="predict",
        unit="input",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=None if progress else True,
    ) as bar:
        for start in range(0, len(texts), step):
            chunk = texts[start : start + step]
            yield from task.predict(loaded, chunk, **kwargs)
            bar.update(len(chunk))


def merge_to_directory(loaded: LoadedAdapter, directory: str) -> None:
    """Write base + adapter as one standard transformers model directory (safetensors + tokenizer)
    that ``AutoModelForSequenceClassification.from_pretrained`` loads."""
    merged = loaded.strategy.merge(loaded.model)
    merged.save_pretrained(directory)
    getattr(loaded.tokenizer, "processor", loaded.tokenizer).save_pretrained(directory)


@dataclass
class MergeResult:
    """A merged model directory and what went into it."""

    output_dir: str
    strategy: str
    base_model: str
