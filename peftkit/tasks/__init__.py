"""Task types: what a run learns (``--task``), each in a file of its own.

``--task`` may be left out: it is read from the model where the model says (a causal LM's or an
image classifier's config), and is sequence classification otherwise.
"""

from __future__ import annotations

import json
import os

from ..errors import PeftkitError
from .base import Task, TaskData


def _tasks() -> dict[str, type[Task]]:
    from .causal_lm import CausalLM
    from .image_classification import ImageClassification
    from .sequence_classification import SequenceClassification

    return {cls.name: cls for cls in (SequenceClassification, CausalLM, ImageClassification)}


TASK_NAMES = ("sequence-classification", "causal-lm", "image-classification")


def get_task(name: str) -> Task:
    """The task type called ``name`` (``-`` and ``_`` alike)."""
    tasks = _tasks()
    key = name.replace("_", "-").lower()
    if key not in tasks:
        raise PeftkitError(f"unknown task {name!r}; accepted: {', '.join(tasks)}")
    return tasks[key]()


def infer_task(model: str | None) -> str:
    """The task a model is made for: a short name's own task, else what the model directory's
    config says (``*ForCausalLM`` -> causal-lm, an image model -> image-classification), else
    sequence-classification. Never loads weights; hub ids are not looked up (offline machines)."""
    from ..models import EMBEDDED_MODELS, resolve_model_source

    if model is None:
        return "sequence-classification"
    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].task
    try:
        source = resolve_model_source(model)
    except PeftkitError:
        return "sequence-classification"  # the load will say what is wrong with it
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return "sequence-classification"
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    architectures = " ".join(config.get("architectures") or [])
    if "ForCausalLM" in architectures or "LMHeadModel" in architectures:
        return "causal-lm"
    if "ForImageClassification" in architectures or "num_channels" in config:
        return "image-classification"
    return "sequence-classification"


__all__ = ["TASK_NAMES", "Task", "TaskData", "get_task", "infer_task"]
