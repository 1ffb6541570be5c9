"""Data for every task: read from a short name, a file, a saved directory or the hub (``sources``,
``embedded``), columns picked by name or guess and the data's shape read from them (``columns``),
split by the one seeded pipeline every loader shares (``splits``), returned as ``TaskData``
(``loaders``).

Every source ends up as a ``DatasetDict`` with ``train``, ``validation`` and ``test`` splits whose
columns follow the shape: ``text`` + ``label`` (int id) with the label names, ``prompt`` +
``response``, or ``image`` + ``label``. Nothing here imports ``datasets`` until data is read.
"""

from __future__ import annotations

from .base import LabelledData, Shape, TaskData
from .checks import COLUMN_SETTINGS, ColumnUse, label_column_problem, label_warnings, resolved_columns
from .columns import (
    IMAGE_COLUMN_GUESSES,
    LABEL_COLUMN_GUESSES,
    PROMPT_COLUMN_GUESSES,
    RESPONSE_COLUMN_GUESSES,
    TEXT_COLUMN_GUESSES,
    label_mapping,
    pick_column,
    relabel,
    text_shape,
)
from .embedded import (
    DEFAULT_PROMPT_TEMPLATE,
    EMBEDDED_DATASETS,
    EMBEDDED_IMAGE_DATASETS,
    EmbeddedDataset,
    EmbeddedImageDataset,
    prompt_template_for,
)
from .loaders import load_image_data, load_labelled_data, load_prompt_response, load_text_data
from .sources import load_raw
from .splits import cap_eval_splits, complete_splits, finish_splits, keeping_whole, standard_splits, whole_data

__all__ = [
    "COLUMN_SETTINGS",
    "ColumnUse",
    "label_column_problem",
    "label_warnings",
    "resolved_columns",
    "DEFAULT_PROMPT_TEMPLATE",
    "EMBEDDED_DATASETS",
    "EMBEDDED_IMAGE_DATASETS",
    "IMAGE_COLUMN_GUESSES",
    "LABEL_COLUMN_GUESSES",
    "PROMPT_COLUMN_GUESSES",
    "RESPONSE_COLUMN_GUESSES",
    "TEXT_COLUMN_GUESSES",
    "EmbeddedDataset",
    "EmbeddedImageDataset",
    "LabelledData",
    "Shape",
    "TaskData",
    "cap_eval_splits",
    "complete_splits",
    "finish_splits",
    "keeping_whole",
    "label_mapping",
    "load_image_data",
    "load_labelled_data",
    "load_prompt_response",
    "load_raw",
    "load_text_data",
    "pick_column",
    "prompt_template_for",
    "relabel",
    "standard_splits",
    "text_shape",
    "whole_data",
]
