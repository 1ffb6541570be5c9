"""The one training loop every strategy runs through (``fit``) and its pieces.

``Trainer.setup`` builds what is fixed for a run (accelerator, loaders, optimizer, memory meter);
``LoopState`` is everything that changes from step to step, which is also what a checkpoint
saves; ``train_step`` is one optimizer micro-step; ``BestEpoch`` decides which epoch is kept and
when training stops early. Built on accelerate (device placement, gradient accumulation, mixed
precision, multi-process), the loop branches only on what a strategy returns: its parameter
groups, its event hooks, its forward and its adapter state.

The modules: ``fit`` (the loop itself, and whether a run learned), ``trainer`` (``Trainer``: set-up,
epochs, steps, progress, checkpoints, evaluation), ``state`` (what a checkpoint saves), ``setup``
(loaders, parameter groups, accelerator, refusals) and ``step`` (``train_step``). A whole run into a
directory, loading included, is ``peftkit.train``'s.
"""

from .fit import ResolvedRun, TrainOutcome, fit, judge_learning, likely_cause
from .setup import check_distributed, make_accelerator, make_loader, torch_param_groups, trainable_groups
from .state import BestEpoch, LoopState, Peaks, StepTimes
from .step import train_step
from .trainer import HEARTBEAT_SECONDS, READ_EVERY, Trainer

__all__ = [
    "HEARTBEAT_SECONDS",
    "READ_EVERY",
    "BestEpoch",
    "LoopState",
    "Peaks",
    "ResolvedRun",
    "StepTimes",
    "TrainOutcome",
    "Trainer",
    "check_distributed",
    "fit",
    "judge_learning",
    "likely_cause",
    "make_accelerator",
    "make_loader",
    "torch_param_groups",
    "train_step",
    "trainable_groups",
]
