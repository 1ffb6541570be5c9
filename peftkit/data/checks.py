"""What a user should be told about their data before training on it: which columns were used
(and whether they were guessed), how many rows were dropped and why, and labels that will not
train well (a label column of free text, classes badly out of balance).

The loaders record the facts (``split_info["columns"]`` and ``split_info["rows"]``) and hand on
the lines of ``data_line`` and ``dropped_warning`` as ``TaskData.notes``; ``label_warnings`` is
called by the tasks that classify (a causal LM's answers may well be free text).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from .base import TaskData
from .columns import LABEL_COLUMN_GUESSES

#: the run setting that names the column of each role (an image is named with --text-column, and
#: so is a causal LM's prompt and the one column of plain text)
COLUMN_SETTINGS = {
    "text": "text_column",
    "prompt": "text_column",
    "image": "text_column",
    "label": "label_column",
    "response": "response_column",
}

#: a label column reads as free text, not classes, when it has more distinct values than this share
#: of the rows (and more than ``FREE_TEXT_MIN_CLASSES``: 30 rows of 5 classes are classes), ...
FREE_TEXT_SHARE = 0.1
FREE_TEXT_MIN_CLASSES = 20
#: ... or when its values average more words than this (class names are a word or two)
FREE_TEXT_WORDS = 4
#: a class holding this share of the training rows makes accuracy a poor measure
IMBALANCE_SHARE = 0.8
#: fewer training rows than this say too little about balance to warn
IMBALANCE_MIN_ROWS = 20


@dataclass(frozen=True)
class ColumnUse:
    """One column a loader used: its role (``text``, ``label``, ...), its name in the source, and
    whether it was guessed (not named by the user)."""

    role: str
    column: str
    guessed: bool

    @property
    def flag(self) -> str:
        """The command-line flag that names this role's column."""
        return "--" + COLUMN_SETTINGS[self.role].replace("_", "-")


def data_line(source: str, rows: int, used: list[ColumnUse]) -> str:
    """``data: my.csv: 300 rows; text column 'review', label column 'sentiment' (guessed; ...)``."""
    said = ", ".join(f"{u.role} column {u.column!r}" for u in used)
    guessed = [u for u in used if u.guessed]
    flags = "/".join(dict.fromkeys(u.flag for u in guessed))
    if guessed and len(guessed) == len(used):
        said += f" (guessed; {flags} to choose)"
    elif guessed:
        said += f" ({' and '.join(u.role for u in guessed)} guessed; {flags} to choose)"
    return f"data: {source}: {rows:,} rows; {said}"


def dropped_warning(rows: int, dropped: dict[str, int], columns: dict[str, str | None]) -> str | None:
    """``warning: 20 of 300 rows dropped: empty text 'review' (12) or label 'sentiment' (8)``, or
    None when nothing was dropped. ``dropped``: rows per role whose cell was empty."""
    parts = [f"{role} {columns[role]!r} ({n:,})" for role, n in dropped.items() if n]
    if not parts:
        return None
    total = sum(dropped.values())
    return f"warning: {total:,} of {rows:,} rows dropped: empty {' or '.join(parts)}"


def resolved_columns(data: TaskData) -> dict[str, str]:
    """The run settings (``text_column``, ``label_column``, ``response_column``) that name the
    columns ``data`` was read from: recorded with a run, they load the same columns again."""
    used = (data.split_info or {}).get("columns") or {}
    return {
        COLUMN_SETTINGS[role]: column for role, column in used.items() if column is not None and role in COLUMN_SETTINGS
    }


def label_warnings(data: TaskData) -> list[str]:
    """Warnings for labelled data that would train a poor classifier without an error: a label
    column that looks like free text (likely the wrong column), and a class that dominates."""
    found = [_free_text_warning(data), _imbalance_warning(data)]
    return [line for line in found if line]


def label_column_problem(data: Any) -> str | None:
    """The finding that the label column holds free text, not classes (with the flags that would
    fix it), without the ``warning:`` prefix; None where it holds classes or the task has no labels.
    A run that then learns nothing names this as its cause before any learning-rate advice."""
    if not isinstance(data, TaskData) or not data.label_names or "train" not in data.splits:
        return None
    line = _free_text_warning(data)
    return line.removeprefix("warning: ") if line else None


def _rows_used(data: TaskData) -> int:
    rows = data.split_info.get("rows") or {}
    return int(rows.get("used") or sum(len(ds) for ds in data.splits.values()))


def _free_text_warning(data: TaskData) -> str | None:
    names = list(data.label_names or ())
    rows = _rows_used(data)
    many = len(names) > max(FREE_TEXT_MIN_CLASSES, FREE_TEXT_SHARE * rows)
    wordy = bool(names) and sum(len(n.split()) for n in names) / len(names) > FREE_TEXT_WORDS
    if not (many or wordy):
        return None
    columns = data.split_info.get("columns") or {}
    label = columns.get("label", "label")
    return (
        f"warning: label column {label!r} has {len(names):,} distinct values in {rows:,} rows and "
        f"looks like free text, not classes; {_label_fix(data, label, rows)}"
    )


def _label_fix(data: TaskData, label: str, rows: int) -> str:
    """What to do about a label column of free text: swap with the text column where that one
    holds few distinct values, else name an unused column that is called like a label."""
    text = (data.split_info.get("columns") or {}).get("text")
    if text is not None and "text" in data.splits["train"].column_names:
        distinct = len(set(data.splits["train"]["text"]))
        if distinct <= max(FREE_TEXT_MIN_CLASSES, FREE_TEXT_SHARE * rows):
            return f"did you mean --text-column {label} --label-column {text}?"
    spare = [c for c in data.source_columns if c in LABEL_COLUMN_GUESSES and c not in (label, text)]
    if spare:
        return f"did you mean --label-column {spare[0]}?"
    others = ", ".join(c for c in data.source_columns if c not in (label, text)) or "none"
    return f"name the column that holds the classes with --label-column (other columns: {others})"


def _imbalance_warning(data: TaskData) -> str | None:
    labels: list[Any] = data.splits["train"]["label"]
    if len(labels) < IMBALANCE_MIN_ROWS or not data.label_names:
        return None
    label_id, count = Counter(labels).most_common(1)[0]
    share = count / len(labels)
    if share < IMBALANCE_SHARE:
        return None
    name = data.label_names[label_id]
    return (
        f"warning: class {name!r} is {share:.0%} of the training rows; accuracy alone will mislead, "
        f"read macro-F1 (majority baseline {share:.2f})"
    )


__all__ = [
    "COLUMN_SETTINGS",
    "ColumnUse",
    "FREE_TEXT_MIN_CLASSES",
    "FREE_TEXT_SHARE",
    "FREE_TEXT_WORDS",
    "IMBALANCE_SHARE",
    "data_line",
    "dropped_warning",
    "label_warnings",
    "resolved_columns",
]
