"""peftkit: fine-tune pretrained models with interchangeable strategies.

    import peftkit

    result = peftkit.run(peftkit.RunConfig(strategy="lora", epochs=1, output_dir="runs/lora"))
    result.metrics.test["accuracy"], result.adapter_dir
    peftkit.predict(peftkit.PredictConfig(adapter=result.adapter_dir, inputs=["A quietly devastating film."]))

Importing peftkit is cheap (no torch); the heavy parts load when used. ``run``, ``bench``, ``plan``,
``predict`` (``predict_iter``), ``evaluate``, ``merge``, ``export``, ``inspect``, ``tune`` and ``resume`` are the
commands' functions (``peftkit.api``), with their settings ``RunConfig``, ``BenchConfig``, ``PlanSettings``,
``TuneConfig``, ``EvalConfig``, ``PredictConfig``, ``MergeConfig``, ``ExportConfig`` and ``Levers``,
and their results (``RunResult``, ``RunMetrics``, ``Plan``, ...);
``load_adapter`` / ``predict_texts`` / ``save_adapter`` work on adapters directly. Strategy and task
plugins subclass ``Strategy`` / ``Task`` and register with ``register_strategy`` / ``register_task``.
A run that learned nothing warns with ``LearnedNothingWarning`` (a ``PeftkitWarning``).

The functions ``plan``, ``bench``, ``predict``, ``tune`` and ``export`` are not shadowed by modules of
the same names: what runs them is in the modules ``peftkit.planner``, ``peftkit.inference`` and
``peftkit.exporter`` and the packages ``peftkit.benchmark`` and ``peftkit.tuning``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import LearnedNothingWarning, PeftkitError, PeftkitWarning, RunInterrupted
from .registry import available as available_strategies
from .registry import get_strategy, register_strategy
from .strategies.base import ParamGroup, Strategy, TaskSpec, TrainingDefaults
from .tasks import Task, TaskData, register_task

__version__ = "0.1.0"

# name -> module it is read from, on first use (these import more, some of them torch)
_LAZY = {
    "run": "api",
    "bench": "api",
    "plan": "api",
    "predict": "api",
    "merge": "api",
    "export": "api",
    "inspect": "api",
    "resume": "api",
    "evaluate": "api",
    "tune": "api",
    "recommend": "api",
    "RecommendConfig": "recommendation.config",
    "RecommendResult": "recommendation.run",
    "predict_iter": "api",
    "RunResult": "runs",
    "TuneResult": "tuning.output",
    "BenchResult": "benchmark.results",
    "Plan": "planner",
    "MergeResult": "inference",
    "MergeConfig": "export_config",
    "ExportConfig": "export_config",
    "EvalResult": "evaluation",
    "ExportResult": "exporter",
    "RunMetrics": "metrics",
    "TuneConfig": "tuning.config",
    "EvalConfig": "evaluation",
    "PredictConfig": "predict_io",
    "RunConfig": "config",
    "Levers": "config",
    "BenchConfig": "benchmark.config",
    "PlanSettings": "planner",
    "load_adapter": "inference",
    "predict_texts": "inference",
    "save_adapter": "adapter_io",
}

# the public surface: the commands' functions, their configs and results, the adapter functions, the
# errors and warnings a caller catches, and what a strategy or task plugin subclasses and registers
__all__ = [
    "BenchConfig",
    "BenchResult",
    "EvalConfig",
    "EvalResult",
    "ExportConfig",
    "ExportResult",
    "LearnedNothingWarning",
    "Levers",
    "MergeConfig",
    "MergeResult",
    "ParamGroup",
    "PeftkitError",
    "PeftkitWarning",
    "Plan",
    "PlanSettings",
    "PredictConfig",
    "RecommendConfig",
    "RecommendResult",
    "RunConfig",
    "RunInterrupted",
    "RunMetrics",
    "RunResult",
    "Strategy",
    "Task",
    "TaskData",
    "TaskSpec",
    "TrainingDefaults",
    "TuneConfig",
    "TuneResult",
    "available_strategies",
    "bench",
    "evaluate",
    "export",
    "get_strategy",
    "inspect",
    "load_adapter",
    "merge",
    "plan",
    "predict",
    "predict_iter",
    "predict_texts",
    "recommend",
    "register_strategy",
    "register_task",
    "resume",
    "run",
    "save_adapter",
    "tune",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module 'peftkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
