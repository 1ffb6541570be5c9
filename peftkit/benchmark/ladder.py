"""Fitting one run into a memory budget: the lever ladder and the micro-batches, one row each.

Every run of a suite gets the same data, split (per seed), sequence length and *effective* batch
size. Under a memory budget the micro-batch is halved on out-of-memory and gradient accumulation
makes up the difference (``micro_batches``), so a strategy that needs a smaller micro-batch still
takes the same optimizer steps; with ``--auto-fit`` the memory levers are tried too, one rung of
``AUTO_FIT_LADDER`` at a time (``lever_rungs``). A strategy that does not fit even at micro-batch 1
is reported as ``does not fit`` with what was tried (``bench_one``). ``describe_levers`` names the
levers a row ran with, as the table and ``peftkit plan`` show them.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from ..config import Levers, path_name
from ..errors import PeftkitError
from ..levers import check_levers
from ..memory import format_size, parse_size
from ..metrics import ROW_METRICS
from ..planner import check_applicable
from ..registry import get_strategy
from .config import BenchConfig
from .worker import Attempt, Runner

# Levers tried in this order by --auto-fit, each on top of the ones before: first those that cost
# no accuracy and little speed, quantizing the base last (it changes what the model computes).
AUTO_FIT_LADDER: list[tuple[str, dict[str, Any]]] = [
    ("bf16", {"precision": "bf16"}),
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("8-bit AdamW", {"optimizer": "adamw8bit"}),
    ("4-bit base", {"quantize": "4bit"}),
]

# predicted peak bytes of (strategy, levers, micro-batch), or None when there is no prediction
Predictor = Callable[[str, Levers, int], "int | None"]


def micro_batches(effective: int) -> list[int]:
    """Micro-batch sizes to try, largest first, each about half the last and each dividing the
    effective batch exactly (so accumulation keeps it): 32 -> 32,16,8,4,2,1; 24 -> 24,12,6,3,1."""
    sizes = [effective]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if effective % d == 0))
    return sizes


def lever_rungs(bench: BenchConfig, strategy_cls: Any) -> list[Levers]:
    """The lever combinations to try, fewest first: the suite's own, then (with ``auto_fit`` and a
    budget) each rung of ``AUTO_FIT_LADDER`` added on top. Rungs that change nothing, or that the
    strategy cannot take (a quantized base under a full fine-tune), are left out."""
    current = bench.levers
    rungs = [current]
    if not (bench.auto_fit and bench.memory_budget):
        return rungs
    strategy = strategy_cls()
    for _name, change in AUTO_FIT_LADDER:
        if all(
            getattr(current, k) == v or (k == "precision" and current.precision != "fp32") for k, v in change.items()
        ):
            continue  # already on
        trial = dataclasses.replace(current, **change)
        try:
            check_levers(trial, strategy)
        except PeftkitError:
            continue
        current = trial
        rungs.append(current)
    return rungs


def describe_levers(levers: Levers) -> str:
    """``bf16 + checkpointing + adamw8bit + 4bit base`` (``-`` when none is on)."""
    parts = []
    if levers.precision != "fp32":
        parts.append(levers.precision)
    if levers.gradient_checkpointing:
        parts.append("checkpointing")
    if levers.optimizer != "adamw":
        parts.append(levers.optimizer)
    if levers.quantize:
        parts.append(f"{levers.quantize} base")
    if levers.loss is not None:  # the default (chunked where it applies) is not a lever the user added
        parts.append(f"{levers.loss} loss")
    if levers.packing:
        parts.append("packing")
    if levers.kernels is not None:
        parts.append(f"{levers.kernels} kernels")
    if levers.compile:
        parts.append("compile")
    return " + ".join(parts) or "-"


def bench_one(
    bench: BenchConfig,
    strategy: str,
    seed: int,
    stage: str,
    start: tuple[int, int],
    runner: Runner,
    echo: Callable[[str], None],
    predict: Predictor | None = None,
    settings: dict[str, Any] | None = None,
    named: str | None = None,
) -> dict[str, Any]:
    """One (strategy, seed) row: the first (levers, micro-batch) that fits, from ``start`` = (rung
    index, micro-batch) on. Candidates the planner predicts to be over the budget are skipped,
    except the very last one, which is always tried so that "does not fit" is measured.
    ``settings``: the strategy's tuned configuration (its runs and logs named ``<strategy>-tuned``);
    ``named``: what its runs and logs are named instead (``<strategy>-n<size>``)."""
    # runs and logs by the strategy's path name: ``peft:ia3``'s under runs/peft-ia3-seed0
    named = named or (f"{path_name(strategy)}-tuned" if settings is not None else path_name(strategy))
    run_dir = os.path.join(stage, "runs", f"{named}-seed{seed}")
    tried: list[dict[str, Any]] = []
    row: dict[str, Any] = {"strategy": strategy, "seed": seed, "status": "does not fit", "error": None}
    rungs = lever_rungs(bench, get_strategy(strategy))
    refusal = _refusal(bench, strategy, rungs[0], check_model=predict is not None)
    if refusal is not None:
        return {**row, "status": "not applicable", "error": refusal, "tried": []}
    candidates = _candidates(bench, rungs, start)
    budget = parse_size(bench.memory_budget) if bench.memory_budget else None
    for n, (rung, levers, micro) in enumerate(candidates):
        predicted = predict(strategy, levers, micro) if predict is not None else None
        last = n == len(candidates) - 1
        if budget is not None and predicted is not None and predicted > budget and not last:
            tried.append(_skipped(bench, levers, micro, predicted, budget))
            continue
        cfg = bench.run_config(strategy, seed, micro, run_dir, levers, settings)
        attempt = runner(cfg, os.path.join(stage, "logs", f"{named}-seed{seed}-batch{micro}-rung{rung}.log"))
        tried.append(_attempted(cfg.grad_accumulation, levers, micro, predicted, attempt))
        if attempt.status == "oom":
            echo(
                f"  {strategy} seed {seed}: micro-batch {micro} ({describe_levers(levers)}) does not fit "
                f"({attempt.error}); trying less"
            )
            continue
        row.update(status=attempt.status, error=attempt.error, rung=rung, levers=describe_levers(levers))
        row["predicted_peak_bytes"] = predicted
        if attempt.status == "ok" and attempt.metrics:
            row.update(_measured(attempt.metrics), run_dir=os.path.relpath(run_dir, stage))
            row["versions"] = attempt.metrics.get("versions", {})
        break
    else:
        row["error"] = _over_budget(bench.memory_budget, tried, named_levers=len(rungs) > 1)
    row["tried"] = tried
    return row


def _candidates(bench: BenchConfig, rungs: list[Levers], start: tuple[int, int]) -> list[tuple[int, Levers, int]]:
    """The (rung index, levers, micro-batch) to try in order, fewest levers and largest micro-batch
    first, from ``start`` = (rung index, micro-batch) on."""
    return [
        (i, levers, micro)
        for i, levers in enumerate(rungs)
        for micro in micro_batches(bench.batch_size)
        if (i, -micro) >= (start[0], -start[1])
    ]


def _skipped(bench: BenchConfig, levers: Levers, micro: int, predicted: int, budget: int) -> dict[str, Any]:
    """The ``tried`` entry of a candidate not run: the planner predicts it over the budget."""
    return {
        "batch_size": micro,
        "grad_accumulation": bench.batch_size // micro,
        "levers": describe_levers(levers),
        "outcome": "skipped",
        "predicted_peak_bytes": predicted,
        "error": f"predicted {format_size(predicted)} > budget {format_size(budget)}",
    }


def _attempted(
    grad_accumulation: int, levers: Levers, micro: int, predicted: int | None, attempt: Attempt
) -> dict[str, Any]:
    """The ``tried`` entry of a candidate run: its outcome (``ok``, ``oom``, ...) and how long it took."""
    return {
        "batch_size": micro,
        "grad_accumulation": grad_accumulation,
        "levers": describe_levers(levers),
        "outcome": attempt.status,
        "error": attempt.error,
        "predicted_peak_bytes": predicted,
        "seconds": round(attempt.seconds, 1),
    }


# what a row keeps of each epoch of its run's history
HISTORY_KEYS = (
    "epoch",
    "train_loss",
    "validation_accuracy",
    "validation_loss",
    "validation_perplexity",
    "epoch_seconds",
)


def _measured(metrics: dict[str, Any]) -> dict[str, Any]:
    """A successful run's figures for its row: the ``ROW_METRICS`` and the per-epoch history."""
    return {
        **{k: metrics.get(k) for k in ROW_METRICS},
        "history": [{k: e.get(k) for k in HISTORY_KEYS} for e in metrics.get("history", [])],
    }


def not_applicable(bench: BenchConfig, strategy: str) -> str | None:
    """Why ``strategy`` cannot run in this suite at all (its levers, this model and task), or None:
    such a strategy is neither tuned nor run."""
    return _refusal(bench, strategy, bench.levers, check_model=True)


def _refusal(bench: BenchConfig, strategy: str, levers: Levers, check_model: bool) -> str | None:
    """Why ``strategy`` cannot run in this suite at all, or None: the suite's own levers may not
    apply to it (a quantized base under full), nor (``check_model``; a stand-in runner in tests has
    no real model to look at) the strategy to this model and task (prefix tuning on a ViT)."""
    try:
        check_levers(levers, get_strategy(strategy)())
        if check_model:
            check_applicable(bench.model, bench.task, strategy)
    except PeftkitError as exc:
        return str(exc)
    return None


def _over_budget(budget: str | None, tried: list[dict[str, Any]], named_levers: bool) -> str:
    """The error of a row that fitted nowhere: what ran over the budget, and how many were skipped."""
    ran = [t for t in tried if t["outcome"] != "skipped"]
    sizes = ", ".join(f"{t['batch_size']} ({t['levers']})" if named_levers else str(t["batch_size"]) for t in ran)
    skipped = len(tried) - len(ran)
    return f"over the budget {budget} in every run (micro-batch {sizes})" + (
        f"; {skipped} more predicted over it were skipped" if skipped else ""
    )
