"""The first check of every command: that what it names can be read, said in milliseconds, before
torch loads (a missing path, or a hub id while the hub cannot be reached and nothing of it is
cached: one line, instead of a minute of retries)."""

from __future__ import annotations

import os

from .adapter_io import recorded_base_model
from .data.sources import IN_MEMORY_PREFIX, check_dataset_source
from .errors import PeftkitError
from .models import check_model_name


def check_inputs(model: str | None = None, dataset: str | None = None, adapter_dir: str | None = None) -> None:
    """Refuse what names nothing that can be read: a dataset, adapter or model path that does not
    exist, or a hub id while the hub cannot be reached and nothing of it is cached. None: not given
    (the default, or the adapter's recorded base model, is used). Every command calls it first."""
    if adapter_dir is not None and not os.path.exists(adapter_dir):
        raise PeftkitError(
            f"adapter directory not found: {adapter_dir}; give a run's adapter/ folder, "
            "one in adapters/, or a plain peft adapter folder"
        )
    if dataset is not None:
        check_dataset_source(dataset)
    base = model if model is not None or adapter_dir is None else recorded_base_model(adapter_dir)
    if base is not None:
        check_model_name(base)


def names_only(command: str, each: str, model: object, dataset: object) -> tuple[str | None, str | None]:
    """``model`` and ``dataset``, refused in one line where they are what ``command``, which runs
    each ``each`` in a process of its own, cannot hand those processes: a loaded model or data held
    in memory (they read both by name)."""
    if not isinstance(model, str | None):
        raise PeftkitError(
            f"{command} runs each {each} in a process of its own, which cannot see a model loaded in this one: "
            "save it (model.save_pretrained(DIR) and its tokenizer's save_pretrained(DIR)) and give DIR"
        )
    if not isinstance(dataset, str | None):
        raise PeftkitError(
            f"{command} runs each {each} in a process of its own, which cannot see data held in memory: "
            "save it to a file (DataFrame.to_csv, Dataset.save_to_disk) and give its path"
        )
    return model, dataset


def check_resumable(checkpoint_every: int | None, model: object, dataset: object) -> None:
    """Refuse checkpoints for a run that could never be resumed: one on a loaded model or on data
    held in memory (``dataset``: its in-memory name), which live in this process only, so ``resume``
    refuses the run; a checkpoint would only promise what cannot be kept."""
    in_memory = not isinstance(model, str | None) or (isinstance(dataset, str) and dataset.startswith(IN_MEMORY_PREFIX))
    if checkpoint_every and in_memory:
        raise PeftkitError(
            f"checkpoint_every={checkpoint_every}: a run on a loaded model or on data in memory cannot be "
            "resumed (they live in this process only); drop checkpoint_every, or save them and give their paths"
        )
