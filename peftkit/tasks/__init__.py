"""Task types: what a run learns (``--task``), each in a file of its own, registered like strategies.

Built-in tasks register with ``@register_task``; a third-party distribution adds one through the
entry-point group ``peftkit.tasks`` (see ``peftkit.registry``)::

    [project.entry-points."peftkit.tasks"]
    text-regression = "peftkit_bitfit.regression:TextRegression"

``--task`` may be left out: it is read from the model where the model says (a causal LM's or an
image classifier's config), and is sequence classification otherwise.
"""

from __future__ import annotations

import json
import os
from typing import Any, TypeVar

from ..config import ModelSettings
from ..errors import PeftkitError
from ..models import EMBEDDED_MODELS, resolve_model_source, task_of_architectures
from ..registry import Registry
from .base import Task, TaskData

TASK_ENTRY_POINT_GROUP = "peftkit.tasks"

# Modules of the built-in tasks; importing one runs its @register_task. Their order is the order
# ``task_names`` lists them in (the default task first).
BUILTIN_TASK_MODULES = (
    "peftkit.tasks.sequence_classification",
    "peftkit.tasks.causal_lm",
    "peftkit.tasks.image_classification",
)

TASKS: Registry[type[Task]] = Registry("task", Task, TASK_ENTRY_POINT_GROUP, BUILTIN_TASK_MODULES)

K = TypeVar("K", bound=type[Task])


def register_task(cls: K) -> K:
    """Class decorator: add a ``Task`` subclass under ``cls.name``; a name already taken is refused."""
    return TASKS.register(cls)


def task_names() -> tuple[str, ...]:
    """Every task's name: the built-ins in their usual order, then plugins' (sorted)."""
    tasks = TASKS.available()
    builtin = [cls.name for cls in tasks.values() if cls.__module__ in BUILTIN_TASK_MODULES]
    builtin.sort(key=lambda n: BUILTIN_TASK_MODULES.index(tasks[n].__module__))
    return (*builtin, *(n for n in tasks if n not in builtin))


def task_plugin_errors() -> list[str]:
    """One line per task plugin that failed to load."""
    return TASKS.plugin_errors()


def get_task(name: str) -> Task:
    """The task type called ``name`` (``-`` and ``_`` alike). Tasks keep no state: a fresh one each call."""
    return TASKS.get(name)()


def declared_task(model: str) -> str | None:
    """The task ``model`` says it is made for, or None where it does not say: a short name's own
    task, else what a local model directory's config names (``*ForCausalLM`` / ``*LMHeadModel`` ->
    causal-lm, an image model -> image-classification, ``*ForSequenceClassification`` ->
    sequence-classification). Never loads weights; hub ids are not looked up (offline machines)."""
    if model in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model].task
    try:
        source = resolve_model_source(model)
    except PeftkitError:
        return None  # the load will say what is wrong with it
    path = os.path.join(source, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as fh:
        config = json.load(fh)
    return task_of_architectures(" ".join(config.get("architectures") or []), image="num_channels" in config)


def infer_task(model: str | None) -> str:
    """The task a model is made for (``declared_task``), sequence-classification where it does not
    say. Never loads weights; hub ids are not looked up (offline machines)."""
    return (declared_task(model) if model is not None else None) or "sequence-classification"


def with_task_defaults(settings: ModelSettings) -> tuple[Task, dict[str, Any]]:
    """The task ``settings`` name (read from the model when not given) and the values its unset
    ``task``, ``model``, ``dataset`` and ``max_length`` take: the task's defaults. The one place
    where a run's, a bench's, a plan's and a tune's settings are completed from their task; only the
    fields ``settings`` has are returned (a plan's ``ModelSettings`` have no ``dataset``)."""
    task = get_task(settings.task or infer_task(settings.model))
    filled = {
        "task": task.name,
        "model": settings.model or task.default_model,
        "dataset": getattr(settings, "dataset", None) or task.default_dataset,
        "max_length": task.default_max_length if settings.max_length is None else settings.max_length,
    }
    return task, {k: v for k, v in filled.items() if hasattr(settings, k)}


__all__ = [
    "TASKS",
    "TASK_ENTRY_POINT_GROUP",
    "Task",
    "TaskData",
    "declared_task",
    "get_task",
    "infer_task",
    "register_task",
    "task_names",
    "task_plugin_errors",
    "with_task_defaults",
]
