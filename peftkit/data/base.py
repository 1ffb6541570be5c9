"""What every data source becomes: ``TaskData``, splits plus what a task needs to know about them.

The data's ``shape`` says what its columns hold (a prompt and a response, a labelled text, plain
text, a labelled image). It is decided from the columns when the data is read, and carried on the
data, so a task reads it from there instead of remembering it (tasks keep no state between calls).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class Shape(str, Enum):
    """What a dataset's columns hold, as read from its column names."""

    PROMPT_RESPONSE = "prompt and response"  #: ``prompt`` (maybe empty) and ``response`` columns
    LABELLED = "labelled"  #: ``text`` and ``label`` (a class id) columns
    PLAIN_TEXT = "plain text"  #: one text, every token learned: stored as an empty prompt and a response
    IMAGE = "image"  #: ``image`` and ``label`` (a class id) columns


@dataclass
class TaskData:
    """A task's splits (``train``, ``validation``, ``test``), label names where the data is
    labelled, how the split was made (recorded with the run), and the data's shape.

    ``shape`` is a ``Shape`` for the built-in loaders; a third-party task may put its own string
    there (or None where it does not matter, as for an adapter being applied).

    ``split_info["columns"]`` (the built-in loaders) names the source column behind each role
    (``text``, ``label``, ``prompt``, ``response``, ``image``): what a run records and resumes with.
    ``notes`` are lines a run says before training (which columns were used, rows dropped): the
    data layer has no console, so it hands them on. ``source_columns`` are the columns the source
    had, for messages that suggest another one."""

    splits: Any  # datasets.DatasetDict
    label_names: list[str] | None
    split_info: dict[str, Any] = field(default_factory=dict)
    shape: Shape | str | None = None
    notes: list[str] = field(default_factory=list)
    source_columns: tuple[str, ...] = ()


#: The name this class had when only labelled text existed (``load_labelled_data`` returns one).
LabelledData = TaskData

__all__ = ["LabelledData", "Shape", "TaskData"]
