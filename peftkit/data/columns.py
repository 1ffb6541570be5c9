"""Which columns hold the text, the label, the prompt, the response or the image: named by the user
(``--text-column``, ``--label-column``, ``--response-column``) or guessed from common names; and
what shape that makes the data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..errors import PeftkitError
from .base import Shape, TaskData

TEXT_COLUMN_GUESSES = ("text", "sentence", "review", "content", "document", "utterance", "query")
LABEL_COLUMN_GUESSES = ("label", "labels", "class", "category", "target", "sentiment")
PROMPT_COLUMN_GUESSES = ("prompt", "instruction", "question", "input", "text")
RESPONSE_COLUMN_GUESSES = ("response", "output", "completion", "answer", "target_text")
IMAGE_COLUMN_GUESSES = ("image", "img", "picture", "photo", "pixels")


def pick_column(columns: list[str], wanted: str | None, guesses: tuple[str, ...], kind: str) -> str:
    """``wanted`` if given (an error when missing), else the first of ``guesses`` in ``columns``."""
    if wanted is not None:
        if wanted not in columns:
            raise PeftkitError(f"{kind} column {wanted!r} not found; columns: {', '.join(columns)}")
        return wanted
    for guess in guesses:
        if guess in columns:
            return guess
    # images are named with --text-column too: the column holding each example's input
    flag = {"text": "--text-column", "image": "--text-column", "label": "--label-column"}.get(kind, f"--{kind}-column")
    raise PeftkitError(
        f"no {kind} column found (tried {', '.join(guesses)}); name it with {flag}; columns: {', '.join(columns)}"
    )


def has_response(columns: list[str], response_column: str | None) -> bool:
    """Whether the data pairs prompts with responses: a response column named or guessed."""
    return response_column is not None or any(g in columns for g in RESPONSE_COLUMN_GUESSES)


def text_shape(
    columns: list[str], text_column: str | None, label_column: str | None, response_column: str | None
) -> Shape:
    """The shape of text data with these columns: prompt and response where there is a response
    column, else labelled where there is a label column, else plain text. A text column is needed
    unless there is a response (its absence is the error it always was)."""
    if has_response(columns, response_column):
        return Shape.PROMPT_RESPONSE
    pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
    if label_column is not None or any(g in columns for g in LABEL_COLUMN_GUESSES):
        return Shape.LABELLED
    return Shape.PLAIN_TEXT


def label_mapping(
    splits: dict[str, Any], class_names: list[str] | None, label_col: str
) -> tuple[list[str], Callable[[Any], int]]:
    """Label names in id order, and the function from a ``label`` value to its id. A datasets
    ``ClassLabel`` gives both; otherwise the values of every split, sorted, are the classes."""
    values: set[Any] = set()
    for ds in splits.values():
        values.update(ds.unique("label"))
    if class_names is not None:  # a datasets ClassLabel: ids and names are given
        return list(class_names), int
    if all(isinstance(v, bool) for v in values):
        ordered: list[Any] = sorted(values)
    elif all(isinstance(v, int) for v in values):
        ordered = sorted(values)
    elif all(isinstance(v, str) for v in values):
        ordered = sorted(values)
    elif all(isinstance(v, float) and float(v).is_integer() for v in values):
        ordered = sorted(values)
    else:
        kinds = sorted({type(v).__name__ for v in values})
        raise PeftkitError(
            f"label column {label_col!r} holds {', '.join(kinds)} values; classification needs integer or string labels"
        )
    index = {v: i for i, v in enumerate(ordered)}
    return [str(int(v)) if isinstance(v, float) else str(v) for v in ordered], index.__getitem__


def relabel(data: Any, names: list[str] | None, source: object) -> Any:
    """``data`` (a ``TaskData``) with its labels renumbered as ``names`` numbers them (an adapter's
    labels: a file's own are numbered in sorted order, which need not be the adapter's), matched
    by name. A label not among ``names`` is refused, naming them. ``names`` None (an adapter that
    learned no labels) or data without labels: ``data`` as it is."""
    import datasets

    if not names or not data.label_names:
        return data
    unknown = [n for n in data.label_names if n not in names]
    if unknown:
        raise PeftkitError(
            f"label {unknown[0]!r} of {source!r} is not one the adapter was trained on; its labels: {', '.join(names)}"
        )
    new_id = [list(names).index(n) for n in data.label_names]
    splits = {}
    for split, ds in data.splits.items():
        if "label" in ds.column_names:
            features = ds.features.copy()
            features["label"] = datasets.ClassLabel(names=list(names))
            ds = ds.map(lambda r: {"label": new_id[r["label"]]}, features=features)
        splits[split] = ds
    return TaskData(datasets.DatasetDict(splits), list(names), data.split_info, data.shape)


__all__ = [
    "IMAGE_COLUMN_GUESSES",
    "LABEL_COLUMN_GUESSES",
    "PROMPT_COLUMN_GUESSES",
    "RESPONSE_COLUMN_GUESSES",
    "TEXT_COLUMN_GUESSES",
    "has_response",
    "label_mapping",
    "pick_column",
    "relabel",
    "text_shape",
]
