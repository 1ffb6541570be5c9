"""Every setting of every command, declared once: its flag(s), type, default, help and closed set.

The command line (``peftkit.cli_spec``: a command lists its settings by key, ``"run": _keys("task ...")``),
the config classes' fields (``RunConfig``, ``Levers``, ``BenchConfig``, ``TuneConfig``,
``PlanSettings``, ``EvalConfig``: ``field: int | None = setting("epochs")``), the YAML check (its
keys are ``RunConfig``'s fields) and ``docs/cli.md`` (``scripts/cli_docs.py``) are all read from
``SETTINGS``; ``tests/test_settings.py`` fails when a flag and a field disagree.

A key is a setting's name (the config field and YAML key), or ``COMMAND:NAME`` where a setting
means something else in one command and is worded (or defaulted) for it there: ``bench:batch_size``
is the effective batch of every strategy, 32 unless given.

Two defaults are kept apart on purpose: ``default`` is the config field's (what Python and YAML get
when they leave it out), ``cli_default`` what click fills in for a flag not given, almost always
None ("not given": the config, the strategy or the task decides, and ``--resume`` can tell a flag
given from one left out).

Values are checked where every front door (flags, YAML, Python) meets, not here: counts by the
config classes' ``validate``, the task by ``peftkit.tasks.get_task`` (so plugin tasks are
accepted). Imports nothing of peftkit's and no heavy library: the lowest layer.
"""

from __future__ import annotations

# the table's two halves fill SETTINGS when they are imported: first the run's, then the commands'
from . import commands, run  # noqa: F401
from .base import (
    DEVICES,
    EXPORT_FORMATS,
    EXPORT_QUANTIZATIONS,
    KERNELS,
    LEVERS,
    LOSSES,
    OPTIMIZERS,
    PRECISIONS,
    PRUNERS,
    QUANTIZATIONS,
    REPORTERS,
    REQUIRED,
    SETTINGS,
    KernelsName,
    LossName,
    OptimizerName,
    Precision,
    Quantization,
    Setting,
    setting,
)

__all__ = [
    "DEVICES",
    "EXPORT_FORMATS",
    "EXPORT_QUANTIZATIONS",
    "KERNELS",
    "LEVERS",
    "LOSSES",
    "OPTIMIZERS",
    "PRECISIONS",
    "PRUNERS",
    "QUANTIZATIONS",
    "REPORTERS",
    "REQUIRED",
    "SETTINGS",
    "KernelsName",
    "LossName",
    "OptimizerName",
    "Precision",
    "Quantization",
    "Setting",
    "setting",
]
