"""peftkit: fine-tune pretrained models with interchangeable strategies.

Importing peftkit is cheap (no torch); the heavy parts load when used. The commands' functions
(run, bench, plan, predict, merge) are in ``peftkit.api``; strategy and task plugins subclass
``Strategy`` / ``Task`` and register with ``register_strategy`` / ``register_task``.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import PeftkitError
from .registry import available as available_strategies
from .registry import get_strategy, register_strategy
from .strategies.base import ParamGroup, Strategy, TaskSpec, TrainingDefaults
from .tasks import Task, TaskData, register_task

__all__ = [
    "ParamGroup",
    "PeftkitError",
    "Strategy",
    "Task",
    "TaskData",
    "TaskSpec",
    "TrainingDefaults",
    "available_strategies",
    "get_strategy",
    "load_adapter",
    "predict_texts",
    "save_adapter",
    "register_strategy",
    "register_task",
]


def __getattr__(name: str) -> Any:  # lazy: these import torch
    if name in ("load_adapter", "predict_texts"):
        from . import predict

        return getattr(predict, name)
    if name == "save_adapter":
        from .adapter_io import save_adapter

        return save_adapter
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")
