"""The one split pipeline every loader uses: split names normalised, missing validation / test
carved out of train with a seeded (stratified where possible) split to 80/10/10, the training set
and the evaluation sets capped by seeded samples. ``split_info`` records what was done."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from ..errors import PeftkitError

VALIDATION_NAMES = ("validation", "valid", "val", "dev")
SPLIT_NAMES = ("train", "validation", "test")

_WHOLE: ContextVar[bool] = ContextVar("peftkit_whole_data", default=False)


@contextlib.contextmanager
def whole_data() -> Iterator[None]:
    """Within it, data is read to be evaluated, not trained on (``peftkit eval``): the pipeline
    keeps every example, in ``test`` (train and validation empty), in the source's order, and a
    file of a single class is allowed. A context rather than a parameter, so that every task's
    ``load_data`` (plugins' too) reads a whole file through the pipeline it already uses."""
    token = _WHOLE.set(True)
    try:
        yield
    finally:
        _WHOLE.reset(token)


def keeping_whole() -> bool:
    """Whether data is being read whole (inside ``whole_data``)."""
    return _WHOLE.get()


def standard_splits(raw: Any, source: str) -> dict[str, Any]:
    """``raw`` (a Dataset or DatasetDict) as a dict of its ``train`` / ``validation`` / ``test``
    splits in their own order: validation/valid/val/dev count as validation, other splits are
    dropped, a single Dataset is the train split, and a train split is required."""
    import datasets

    if isinstance(raw, datasets.Dataset):
        raw = datasets.DatasetDict({"train": raw})
    splits = {("validation" if n in VALIDATION_NAMES else n): ds for n, ds in raw.items()}
    if "train" not in splits:
        raise PeftkitError(f"dataset {source!r} has no train split; splits: {', '.join(raw)}")
    return {name: ds for name, ds in splits.items() if name in SPLIT_NAMES}


def finish_splits(splits: dict[str, Any], seed: int, max_train_samples: int | None) -> tuple[Any, dict[str, Any]]:
    """Complete ``splits`` to train/validation/test (``complete_splits``), keep a seeded sample of
    ``max_train_samples`` training examples, and record the sizes: a DatasetDict and split_info."""
    import datasets

    splits, info = complete_splits(splits, seed)
    if max_train_samples is not None and max_train_samples < len(splits["train"]):
        splits["train"] = splits["train"].shuffle(seed=seed).select(range(max_train_samples))
        info["max_train_samples"] = max_train_samples
    info["sizes"] = {k: len(v) for k, v in splits.items()}
    return datasets.DatasetDict(splits), info


def complete_splits(splits: dict[str, Any], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Carve what is missing out of train: 80/10/10 of the whole when validation and test both
    are, else 1/9 of train (10% of the whole when train was 90% of it)."""
    info: dict[str, Any] = {"seed": seed}
    if keeping_whole():
        import datasets

        whole = datasets.concatenate_datasets([splits[n] for n in SPLIT_NAMES if n in splits])
        info["method"] = "every example (no split)"
        return {"train": whole.select([]), "validation": whole.select([]), "test": whole}, info
    have_val, have_test = "validation" in splits, "test" in splits
    if have_val and have_test:
        info["method"] = "splits given by the dataset"
        return splits, info
    train = splits["train"]
    if not have_val and not have_test:
        first = _split(train, 0.2, seed)
        rest = _split(first["test"], 0.5, seed)
        splits.update(train=first["train"], validation=rest["train"], test=rest["test"])
        info["method"] = "seeded stratified 80/10/10 split of the train split"
    else:
        missing = "test" if have_val else "validation"
        parts = _split(train, 1 / 9, seed)
        splits.update(train=parts["train"], **{missing: parts["test"]})
        info["method"] = f"seeded stratified split: {missing} carved out of train (1/9)"
    return splits, info


def _split(ds: Any, fraction: float, seed: int) -> Any:
    if len(ds) < 3:
        raise PeftkitError(f"too few examples ({len(ds)}) to make a train/validation/test split")
    try:
        return ds.train_test_split(test_size=fraction, seed=seed, stratify_by_column="label")
    except ValueError:  # no class label column, or a class too rare to stratify: a plain seeded split
        return ds.train_test_split(test_size=fraction, seed=seed)


def cap_eval_splits(data: Any, cap: int | None, seed: int) -> None:
    """Keep at most ``cap`` examples (seeded sample) of validation and test, in place."""
    if cap is None:
        return
    for name in ("validation", "test"):
        if len(data.splits[name]) > cap:
            data.splits[name] = data.splits[name].shuffle(seed=seed).select(range(cap))
            data.split_info["max_eval_samples"] = cap
    data.split_info["sizes"] = {k: len(v) for k, v in data.splits.items()}


__all__ = [
    "SPLIT_NAMES",
    "VALIDATION_NAMES",
    "cap_eval_splits",
    "complete_splits",
    "finish_splits",
    "keeping_whole",
    "standard_splits",
    "whole_data",
]
