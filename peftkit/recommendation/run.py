"""``peftkit recommend`` from checked settings to the answer: the candidates planned against the
memory budget, the budget refused in one line when it cannot pay for one run, the output directory
made or continued, the search (``peftkit.recommendation.search``), the decision
(``peftkit.recommendation.decide``) and the report (``peftkit.recommendation.report``).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..benchmark.config import parse_strategies
from ..benchmark.ladder import bench_one, describe_levers, lever_rungs, not_applicable
from ..benchmark.preflight import load_once, preflight_bench
from ..benchmark.results import suite_results
from ..benchmark.worker import Runner, spawn_worker
from ..config import default_output_dir
from ..durations import format_duration
from ..errors import PeftkitError
from ..files import write_json
from ..memory import format_size, parse_size
from ..planner import rough_run_seconds
from ..registry import get_strategy
from ..rundir import continued_dir
from ..tasks import with_task_defaults
from .config import RecommendConfig
from .decide import Decision
from .report import write_report
from .search import Clock, Config, Ledger, Search, rung_sizes

Echo = Callable[[str], None]
MARKER = "recommend.json"
STUDY_FILE = "recommend.db"
RUN_OVERHEAD = 10.0
"""Seconds a run spends besides its matmuls before its first measurement (a worker's start, imports,
loading the model): what the rough estimate of the smallest budget adds."""


@dataclass
class RecommendResult:
    """A finished recommend: where its report is, what results.json holds, and the answer."""

    output_dir: str
    results: dict[str, Any]
    decision: Decision


def check_recommend(config: RecommendConfig) -> RecommendConfig:
    """``config`` completed and checked in milliseconds, before any data or model loads: the
    strategies (names, aliases, ``all``), the task's defaults, every setting a run could refuse."""
    names = parse_strategies(",".join(config.strategies) or "all")
    _, filled = with_task_defaults(config)
    config = dataclasses.replace(config, strategies=names, **filled)
    config.validate()
    preflight_bench(config.bench_config())
    return config


def plan_candidates(config: RecommendConfig, predict: Any, echo: Echo) -> tuple[list[str], dict[str, dict[str, Any]]]:
    """The strategies the search tries, and those dropped with why: one that cannot run on this
    model and task, or (with a memory budget) whose planned peak is over it even with every lever
    and a micro-batch of 1."""
    bench = config.bench_config()
    budget = parse_size(config.memory_budget) if config.memory_budget else None
    kept: list[str] = []
    dropped: dict[str, dict[str, Any]] = {}
    for strategy in config.strategies:
        why = not_applicable(bench, strategy)
        if why is not None:
            dropped[strategy] = {"reason": "not applicable", "error": why}
            continue
        if budget is not None and predict is not None:
            planned = [
                (p, levers)
                for levers in lever_rungs(bench, get_strategy(strategy))
                if (p := predict(strategy, levers, 1)) is not None
            ]
            if planned and min(p for p, _ in planned) > budget:
                least, levers = min(planned, key=lambda pl: pl[0])
                named = describe_levers(levers)
                dropped[strategy] = {
                    "reason": "does not fit",
                    "planned_peak_bytes": least,
                    "error": f"planned {format_size(least)} at micro-batch 1 with "
                    f"{'no lever' if named == '-' else named} (the least of {len(planned)} lever combinations "
                    f"planned), over the memory budget {config.memory_budget}",
                }
                continue
        kept.append(strategy)
    for strategy, d in dropped.items():
        echo(f"recommend: {strategy} dropped: {d['error']}")
    return kept, dropped


def smallest_budget(config: RecommendConfig, candidates: list[str], first_size: int) -> tuple[str, float]:
    """The candidate whose defaults at the first rung should take least, and that time: the budget a
    search needs to run anything (a rough estimate from this machine's matmul speed)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    best: tuple[str, float] | None = None
    for strategy in candidates:
        epochs = get_strategy(strategy)().schedule(first_size, config.batch_size).epochs
        seconds = RUN_OVERHEAD + rough_run_seconds(
            str(config.model), str(config.task), epochs * first_size, first_size // 2, config.max_length, device
        )
        if best is None or seconds < best[1]:
            best = (strategy, seconds)
    assert best is not None
    return best


def prepare_output(config: RecommendConfig, out: str) -> bool:
    """Make the output directory, or find the one an earlier call of the same recommend made (then
    True: the search continues). One holding anything else, or a recommend made for other settings,
    is refused unless ``overwrite`` (then replaced)."""
    recorded = continued_dir(out, config.overwrite, MARKER, "peftkit recommend")
    if recorded is not None:
        differs = {k: v for k, v in recorded.items() if config.identity().get(k) != v}
        if differs:
            said = ", ".join(f"{k} {v!r}" for k, v in differs.items())
            raise PeftkitError(
                f"output directory {out!r} holds a recommend made for {said}, not these settings; give the same "
                "settings to continue it, another --output-dir, or --overwrite to start afresh"
            )
        return True
    write_json(os.path.join(out, MARKER), config.identity())
    return False


def run_recommend(
    config: RecommendConfig, echo: Echo, runner: Runner = spawn_worker, now: Callable[[], float] = time.monotonic
) -> RecommendResult:
    """The whole of ``peftkit recommend`` after ``check_recommend``: ``config.output_dir`` set.
    ``runner`` runs one worker (a test's stand-in), ``now`` is the clock the budget is kept by."""
    out = str(config.output_dir)
    started = now()
    bench, predict, baselines, whole = load_once(config.bench_config(), echo)
    config = dataclasses.replace(config, **{k: getattr(bench, k) for k in ("text_column", "label_column")})
    if not config.memory_budget:
        predict = None  # nothing to fit: the planner's measurements would only cost time
    candidates, dropped = plan_candidates(config, predict, echo)
    if not candidates:
        raise PeftkitError("no strategy can run: " + "; ".join(f"{s}: {d['error']}" for s, d in dropped.items()))

    def work(strategy: str, size: int) -> float:
        return float(get_strategy(strategy)().schedule(size, config.batch_size).epochs * size)

    sizes = rung_sizes(whole, config.eta, lambda size: statistics.mean(work(s, size) for s in candidates))
    continued = os.path.exists(os.path.join(out, STUDY_FILE))
    if not continued:
        cheapest, seconds = smallest_budget(config, candidates, sizes[0])
        if seconds > config.budget_seconds:
            raise PeftkitError(
                f"--time-budget {config.time_budget} is too small to train even the defaults of the cheapest "
                f"strategy ({cheapest}, about {format_duration(seconds, hours=False)} on {sizes[0]:,} examples by a "
                f"rough estimate from this machine's matmul speed); give at least "
                f"{format_duration(seconds, hours=False)}, or fewer examples (--max-train-samples)"
            )
    continued = prepare_output(config, out) or continued
    ledger = Ledger(f"sqlite:///{os.path.abspath(out)}/{STUDY_FILE}", candidates, config.seeds[0])
    clock = Clock(config.budget_seconds, ledger.spent, now, started)
    if continued:
        echo(
            f"recommend: continuing the search in {out}: {len(ledger.runs)} runs kept "
            f"({format_duration(ledger.spent, hours=False)} of the budget spent)"
        )
    echo(
        f"recommend: {len(candidates)} candidates ({', '.join(candidates)}), rungs of "
        f"{', '.join(f'{s:,}' for s in sizes)} training examples, {format_duration(config.budget_seconds)} budget"
    )

    def run_row(b: Any, strategy: str, seed: int, settings: dict[str, Any], named: str) -> dict[str, Any]:
        return bench_one(b, strategy, seed, out, (0, b.batch_size), runner, echo, predict, settings, named)

    search = Search(config, candidates, sizes, ledger, clock, run_row, echo, work)
    search.rung0()
    reached = search.later_rungs()
    finalists = search.finalists(reached)
    search.seed_finalists(finalists, sizes[reached])
    rows = _final_rows(search, finalists, sizes[reached])
    results = suite_results(
        dataclasses.replace(bench, strategies=[c.strategy for c in finalists], max_train_samples=sizes[reached]),
        rows,
        now() - started,
        baselines,
    )
    decision, results = write_report(config, search, finalists, reached, dropped, results, out)
    echo(f"recommend: done in {format_duration(clock.elapsed, hours=False)}")
    return RecommendResult(out, results, decision)


def _final_rows(search: Search, finalists: list[Config], size: int) -> list[dict[str, Any]]:
    """Each finalist's rows at the final rung, one per seed that ran, tagged with its strategy."""
    rows = []
    for c in finalists:
        for seed in search.config.seeds:
            run = search.ledger.find(c, size, seed)
            if run is not None:
                rows.append({**run.row, "strategy": c.strategy, "seed": seed})
    return rows


def output_dir_for(config: RecommendConfig) -> str:
    """Where a recommend writes: ``--output-dir``, or runs/recommend-<timestamp>."""
    return config.output_dir or default_output_dir("recommend")
