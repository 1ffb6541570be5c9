"""From a source to ``TaskData``, one function per shape. Each reads the source (``sources``), keeps
its train / validation / test (``splits.standard_splits``), picks and renames its columns
(``columns``), and ends in the one split pipeline (``splits.finish_splits``)."""

from __future__ import annotations

from typing import Any

from ..errors import PeftkitError
from .base import Shape, TaskData
from .checks import ColumnUse, data_line, dropped_warning
from .columns import (
    IMAGE_COLUMN_GUESSES,
    LABEL_COLUMN_GUESSES,
    PROMPT_COLUMN_GUESSES,
    RESPONSE_COLUMN_GUESSES,
    TEXT_COLUMN_GUESSES,
    has_response,
    label_mapping,
    pick_column,
    text_shape,
)
from .sources import load_raw
from .splits import finish_splits, keeping_whole, standard_splits


def load_text_data(
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    response_column: str | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
) -> TaskData:
    """Text data in the shape its columns say (``columns.text_shape``): prompt and response,
    labelled text, or plain text (stored as an empty prompt and the text as response)."""
    splits = standard_splits(load_raw(source), source)
    columns = list(splits["train"].column_names)
    shape = text_shape(columns, text_column, label_column, response_column)
    if shape is Shape.PROMPT_RESPONSE:
        return _pairs(splits, source, text_column, response_column, seed, max_train_samples)
    if shape is Shape.LABELLED:
        return _labelled(splits, source, text_column, label_column, seed, max_train_samples)
    text = pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
    return _pairs(splits, source, None, text, seed, max_train_samples, no_prompt=True)


def load_labelled_data(
    source: str,
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
) -> TaskData:
    """Load ``source`` and return train/validation/test splits with ``text`` and ``label`` ids.

    Splits named validation/valid/val/dev count as validation. Where validation or test is
    missing, it is carved out of train with a seeded, stratified split (80/10/10 of the whole
    when both are missing), and ``split_info`` records how.
    """
    splits = standard_splits(load_raw(source), source)
    return _labelled(splits, source, text_column, label_column, seed, max_train_samples)


def load_prompt_response(
    source: str,
    prompt_column: str | None,
    response_column: str | None,
    seed: int = 0,
    max_train_samples: int | None = None,
    no_prompt: bool = False,
) -> TaskData | None:
    """Splits with ``prompt`` and ``response`` columns, if ``source`` has a response column
    (named, or one of ``RESPONSE_COLUMN_GUESSES``); else None. A ``response_column`` that is
    named but missing is an error. Without a prompt column the whole response is learned."""
    splits = standard_splits(load_raw(source), source)
    if not has_response(list(splits["train"].column_names), response_column):
        return None
    return _pairs(splits, source, prompt_column, response_column, seed, max_train_samples, no_prompt)


def load_image_data(
    source: str,
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
) -> TaskData:
    """Splits with ``image`` and ``label`` ids: from an embedded image set, a folder of class
    sub-folders, or any source whose columns hold images (or arrays) and labels."""
    splits = standard_splits(load_raw(source, images=True), source)
    columns = list(splits["train"].column_names)
    image_col = pick_column(columns, image_column, IMAGE_COLUMN_GUESSES, "image")
    label_col = pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label")
    used = [ColumnUse("image", image_col, image_column is None), ColumnUse("label", label_col, label_column is None)]
    rows = _rows(splits)
    class_names = getattr(splits["train"].features[label_col], "names", None)
    splits = {k: _renamed(ds, {image_col: "image", label_col: "label"}) for k, ds in splits.items()}
    names = _label_ids(splits, class_names, label_col)
    return _finished(splits, names, Shape.IMAGE, source, used, rows, {}, columns, seed, max_train_samples)


# -- one builder per shape, over splits already read ---------------------------------------------


def _pairs(
    splits: dict[str, Any],
    source: str,
    prompt_column: str | None,
    response_column: str | None,
    seed: int,
    max_train_samples: int | None,
    no_prompt: bool = False,
) -> TaskData:
    columns = list(splits["train"].column_names)
    resp = pick_column(columns, response_column, RESPONSE_COLUMN_GUESSES, "response")
    prompt = (
        None
        if no_prompt
        else (
            pick_column(columns, prompt_column, tuple(g for g in PROMPT_COLUMN_GUESSES if g != resp), "text")
            if prompt_column or any(g in columns and g != resp for g in PROMPT_COLUMN_GUESSES)
            else None
        )
    )
    # plain text is one text learned whole (stored as the response): its column is the text column
    used = [ColumnUse("text" if no_prompt else "response", resp, response_column is None)]
    if prompt is not None:
        used.insert(0, ColumnUse("prompt", prompt, prompt_column is None))
    rows = _rows(splits)
    import datasets

    # both as text whatever the file held: a CSV of numeric answers is read as integers, and a
    # mapped column keeping its input's name would otherwise keep its input's type too
    text_features = datasets.Features({"prompt": datasets.Value("string"), "response": datasets.Value("string")})
    for name, ds in splits.items():
        splits[name] = ds.map(
            lambda r: {"prompt": _text(r[prompt]) if prompt else "", "response": _text(r[resp])},
            remove_columns=ds.column_names,
            features=text_features,
        )
    dropped = {used[-1].role: _drop(splits, lambda r: r["response"].strip() != "")}
    if len(splits["train"]) == 0:
        raise PeftkitError(f"dataset {source!r} has no examples with a non-empty {resp!r}")
    shape = Shape.PLAIN_TEXT if no_prompt else Shape.PROMPT_RESPONSE
    return _finished(splits, None, shape, source, used, rows, dropped, columns, seed, max_train_samples)


def _text(value: Any) -> str:
    """A cell as text: missing is empty (and then dropped), 0 is "0"."""
    return "" if value is None else str(value)


def _labelled(
    splits: dict[str, Any],
    source: str,
    text_column: str | None,
    label_column: str | None,
    seed: int,
    max_train_samples: int | None,
) -> TaskData:
    columns = list(splits["train"].column_names)
    text_col = pick_column(columns, text_column, TEXT_COLUMN_GUESSES, "text")
    label_col = pick_column(columns, label_column, LABEL_COLUMN_GUESSES, "label")
    if text_col == label_col:
        raise PeftkitError(f"text and label column are the same column {text_col!r}")
    used = [ColumnUse("text", text_col, text_column is None), ColumnUse("label", label_col, label_column is None)]
    rows = _rows(splits)
    class_names = getattr(splits["train"].features[label_col], "names", None)
    for name, ds in splits.items():
        splits[name] = _renamed(ds, {text_col: "text", label_col: "label"})
    # counted one reason at a time, so that every dropped row is counted once
    dropped = {
        "text": _drop(splits, lambda r: isinstance(r["text"], str) and r["text"].strip() != ""),
        "label": _drop(
            splits, lambda r: r["label"] is not None and not (isinstance(r["label"], str) and r["label"].strip() == "")
        ),
    }
    if len(splits["train"]) == 0:
        raise PeftkitError(f"dataset {source!r} has no usable training examples (empty text or label)")
    names = _label_ids(splits, class_names, label_col)
    return _finished(splits, names, Shape.LABELLED, source, used, rows, dropped, columns, seed, max_train_samples)


def _rows(splits: dict[str, Any]) -> int:
    """Rows in every split together: what the source held, before any was dropped."""
    return sum(len(ds) for ds in splits.values())


def _drop(splits: dict[str, Any], keep: Any) -> int:
    """Keep the rows of every split for which ``keep(row)`` holds, in place; how many went."""
    before = _rows(splits)
    for name, ds in splits.items():
        splits[name] = ds.filter(keep)
    return before - _rows(splits)


def _finished(
    splits: dict[str, Any],
    names: list[str] | None,
    shape: Shape,
    source: str,
    used: list[ColumnUse],
    rows: int,
    dropped: dict[str, int],
    columns: list[str],
    seed: int,
    max_train_samples: int | None,
) -> TaskData:
    """The one ending of every loader: the split pipeline, and what was used and dropped recorded
    (``split_info["columns"]`` and ``["rows"]``) and said (``notes``)."""
    done, info = finish_splits(splits, seed, max_train_samples)
    roles = {u.role: u.column for u in used}
    info["columns"] = roles
    info["rows"] = {"read": rows, "used": rows - sum(dropped.values())}
    if any(dropped.values()):  # by role: rows whose text, label, ... was empty
        info["rows"]["dropped_empty"] = {role: n for role, n in dropped.items() if n}
    notes = [data_line(source, rows, used)]
    warning = dropped_warning(rows, dropped, roles)
    if warning:
        notes.append(warning)
    return TaskData(done, names, info, shape, notes, tuple(columns))


def _renamed(ds: Any, names: dict[str, str]) -> Any:
    """``ds`` with only the columns of ``names`` (old -> new), renamed."""
    ds = ds.select_columns(list(names))
    renames = {old: new for old, new in names.items() if old != new}
    return ds.rename_columns(renames) if renames else ds


def _label_ids(splits: dict[str, Any], class_names: list[str] | None, label_col: str) -> list[str]:
    """Turn every split's ``label`` into a ``ClassLabel`` id, in place; the label names."""
    import datasets

    names, to_id = label_mapping(splits, class_names, label_col)
    if len(names) < 2 and not keeping_whole():  # evaluating on one class is fine; learning it is not
        raise PeftkitError(
            f"label column {label_col!r} has a single class ({names[0]!r}); classification needs at least two"
        )
    class_label = datasets.ClassLabel(names=names)
    for name, ds in splits.items():
        if class_names is None:  # ids are given by a ClassLabel column already
            ds = ds.map(lambda r: {"label": to_id(r["label"])})
        splits[name] = ds.cast_column("label", class_label)
    return list(names)


__all__ = ["load_image_data", "load_labelled_data", "load_prompt_response", "load_text_data"]
