"""``peftkit bench``'s suite: every (strategy, seed) run, one row each, into a staging directory.

Each (strategy, seed) runs in a fresh worker process (``peftkit.benchmark.worker``), so one run's
memory (caches, allocator pools, a head's feature cache) cannot leak into the next one's figures,
and a crash or an out-of-memory in one run is a row in the table, not the end of the suite.

``run_bench`` is the whole of a bench after its settings were checked (``preflight``): the data and
model loaded once, ``--tune``'s studies (``peftkit.benchmark.tuned``), then ``run_suite``, which runs
every row (``bench_one``: fitted into the budget) with a progress line and a time-left estimate
(``seconds_left``) each, and writes results.json (``peftkit.benchmark.results``), results.md
(``peftkit.benchmark.report``), the plots and runs/<strategy>-seed<N>/ (each run's directory, adapter
included). The staging directory is renamed into place at the end, like a run's. With
``--train-sizes`` every strategy and seed runs at each training-set size (nested seeded subsets,
runs/<strategy>-n<size>-seed<N>/).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from ..config import path_name
from ..durations import format_duration, format_seconds
from ..files import write_json
from ..memory import format_size
from ..plots import write_learning_curve, write_plots
from ..registry import get_strategy
from ..rundir import staged_dir
from .config import BenchConfig, plan_train_sizes
from .ladder import Predictor, bench_one
from .preflight import load_once
from .report import first_table, markdown_report
from .results import suite_results
from .summary import quality_of, shown_rows
from .tuned import bench_tuning
from .worker import Runner, spawn_worker

Echo = Callable[[str], None]


def run_bench(config: BenchConfig, overwrite: bool, echo: Echo) -> tuple[dict[str, Any], str]:
    """Run the suite ``config`` says (checked by ``preflight_bench``, its ``output_dir`` set) into
    a staging directory renamed to ``config.output_dir`` when done: the data and model loaded once
    (the planner's predictions, each seed's baseline), ``--tune``'s studies, then every row. Returns
    what results.json holds and the main table of results.md."""
    out = config.output_dir
    config, predict_peak, baselines, whole = load_once(config, echo)
    sizes = plan_train_sizes(config.train_sizes, whole) if config.train_sizes else None
    if sizes and sizes["note"]:
        echo(sizes["note"])
    per_size = f" x {len(sizes['sizes'])} training-set sizes" if sizes else ""
    n = len(config.strategies)
    echo(
        f"bench: {n} {'strategy' if n == 1 else 'strategies'}{per_size} x {len(config.seeds)} seed(s) on "
        f"{config.model!r} / "
        f"{config.dataset!r}, each run in its own process; results in {out}"
    )
    with staged_dir(out, overwrite) as stage:
        # the studies go into the staging directory too: an interrupted bench leaves none behind
        tuning = bench_tuning(config, stage, echo) if config.tune else None
        results = run_suite(config, stage, echo, predict=predict_peak, baselines=baselines, tuning=tuning, sizes=sizes)
        with open(os.path.join(stage, "results.md"), encoding="utf-8") as fh:
            table = first_table(fh.read())
    return results, table


def run_suite(
    bench: BenchConfig,
    stage: str,
    echo: Echo,
    runner: Runner = spawn_worker,
    predict: Predictor | None = None,
    baselines: dict[int, dict[str, Any] | None] | None = None,
    tuning: dict[str, Any] | None = None,
    sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every (strategy, seed) into ``stage`` and write results.json, results.md and the plots.
    ``baselines``: each seed's input-blind baseline on its test split (``Task.baseline``).
    ``tuning``: what ``bench --tune`` found (``strategies``: per strategy its ``status`` and tuned
    ``settings``); then each strategy runs over the seeds in its default and its tuned
    configuration (rows tagged ``configuration``), and the table, plots and paired tests are of the
    tuned rows. ``sizes``: ``plan_train_sizes``'s plan; then each strategy and seed runs at every
    size (rows tagged ``train_size``), the table, plots and paired tests are of the largest, and
    the report adds accuracy against size and ``learning_curve.png``."""
    start = time.perf_counter()
    rows = _run_rows(bench, stage, echo, runner, predict, tuning, sizes)
    results = suite_results(bench, rows, time.perf_counter() - start, baselines, tuning, sizes)
    write_json(os.path.join(stage, "results.json"), results)
    plots = write_plots({**results, "rows": shown_rows(results)}, stage)
    if sizes and write_learning_curve(results, stage):
        plots.append("learning_curve.png")
    with open(os.path.join(stage, "results.md"), "w", encoding="utf-8") as fh:
        fh.write(markdown_report(results, plots))
    return results


def _configurations(tuning: dict[str, Any] | None) -> list[str | None]:
    # the defaults first, so that a tuned configuration equal to them can reuse their rows
    return ["default", "tuned"] if tuning else [None]


def _run_rows(
    bench: BenchConfig,
    stage: str,
    echo: Echo,
    runner: Runner,
    predict: Predictor | None,
    tuning: dict[str, Any] | None,
    sizes: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Every row of the suite, a line on ``echo`` for each; later seeds (and sizes) of a strategy
    start at the (rung, micro-batch) that fitted the earlier ones: a step's memory does not depend
    on how many examples there are."""
    todo = [
        (s, c, z, n)
        for s in bench.strategies
        for c in _configurations(tuning)
        for z in (sizes["sizes"] if sizes else [None])
        for n in bench.seeds
    ]
    rows: list[dict[str, Any]] = []
    fits: dict[tuple[str, str | None], tuple[int, int]] = {}  # (strategy, configuration) -> (rung, micro-batch)
    start = time.perf_counter()
    for i, (strategy, conf, size, seed) in enumerate(todo, 1):
        label = f"{strategy} (tuned)" if conf == "tuned" else strategy
        seeded = f"seed {seed}" + (f", {size:,} examples" if size else "")
        row = _unrun_tuned_row(strategy, seed, rows, tuning) if conf == "tuned" and tuning else None
        if row is not None and row.get("same_as_default"):
            echo(
                f"[{i}/{len(todo)}] {label}, {seeded}: the defaults won its study, so this is their run of seed {seed}"
            )
        else:
            progress = _progress(bench, rows, todo[i - 1 :], tuning, time.perf_counter() - start)
            echo(f"[{i}/{len(todo)}] {label}, {seeded} ({progress})")
        if row is None:
            settings = tuning["strategies"][strategy]["settings"] if conf == "tuned" and tuning else None
            row = bench_one(
                _sized(bench, size, sizes),
                strategy,
                seed,
                stage,
                fits.get((strategy, conf), (0, bench.batch_size)),
                runner,
                echo,
                predict,
                settings=settings,
                named=f"{path_name(strategy)}-n{size}" if size else None,
            )
        row = _tagged(row, strategy, seed, conf, size)
        if row["status"] == "ok":
            fits[(strategy, conf)] = (row["rung"], row["batch_size"])
        echo(_outcome_line(row, f"{label} {seeded}"))
        rows.append(row)
    return rows


def _progress(
    bench: BenchConfig,
    rows: list[dict[str, Any]],
    todo: list[tuple[str, str | None, int | None, int]],
    tuning: dict[str, Any] | None,
    elapsed: float,
) -> str:
    """``3m10s elapsed, about 5m left``: the time so far and the time the rows still ``todo`` should
    take (``seconds_left``; none until a row succeeded)."""
    # the time left counts only what will run: not the tuned rows that are their defaults' runs
    left = seconds_left(
        rows,
        [(s, z) for s, c, z, _n in todo if not _tuned_not_run(s, c, tuning)],
        functools.partial(_work, bench),
    )
    eta = f", about {format_duration(left, hours=False)} left" if left is not None else ""
    return f"{format_duration(elapsed, hours=False)} elapsed{eta}"


def _sized(bench: BenchConfig, size: int | None, sizes: dict[str, Any] | None) -> BenchConfig:
    """The suite's config for a run at training-set ``size`` (``--train-sizes``; None: the suite's
    own): its training set capped at ``size``, or uncapped for the whole set."""
    if size is None or sizes is None:
        return bench
    return dataclasses.replace(bench, max_train_samples=None if size >= sizes["whole"] else size)


def _tagged(row: dict[str, Any], strategy: str, seed: int, conf: str | None, size: int | None) -> dict[str, Any]:
    """``row`` tagged, after its strategy and seed, with its ``configuration`` (``bench --tune``) and
    its ``train_size`` (``--train-sizes``) where the suite has them."""
    if conf is not None:
        row = {"strategy": strategy, "seed": seed, "configuration": conf, **row}
    if size is not None:
        row = {"strategy": strategy, "seed": seed, "train_size": size, **row}
    return row


def _outcome_line(row: dict[str, Any], name: str) -> str:
    """The line under a row's progress line: its quality, time, peak memory and micro-batch, or its
    status and error."""
    if row["status"] != "ok":
        return f"  {name}: {row['status']}: {row['error']}"
    key, q_label, _ = quality_of([row])
    return (
        f"  {name}: {q_label} {row[key]:.4f}, train "
        f"{format_seconds(row['train_seconds'])}, peak memory {format_size(row['peak_memory_bytes'])} "
        f"(micro-batch {row['batch_size']} x {row['grad_accumulation']})"
        + (f"; learned nothing: {row.get('learned_note')}" if row.get("learned") is False else "")
    )


def _row_seconds(row: dict[str, Any]) -> float | None:
    """How long a row's worker processes ran; None for a row that ran none (not applicable, or a
    tuned row that is its defaults' run)."""
    if row.get("same_as_default") or not row.get("tried"):
        return None
    return sum(t.get("seconds") or 0.0 for t in row["tried"])


def _uncached_seconds(row: dict[str, Any]) -> float | None:
    """A row's seconds had every epoch taken as long as its slowest (``history``'s epoch_seconds):
    the pace of a run that computes every epoch, for guessing another strategy's time. A strategy
    that caches (head_only: epochs after the first skip the backbone) is far faster than that."""
    seconds = _row_seconds(row)
    epochs = [e.get("epoch_seconds") for e in row.get("history") or []]
    if seconds is None or not epochs or any(e is None for e in epochs):
        return seconds
    return seconds + sum(max(epochs) - e for e in epochs)


def _work(bench: BenchConfig, strategy: str, size: int) -> float:
    """Training examples a run of ``strategy`` on ``size`` examples processes: its epochs (as its
    schedule raises them on a small set, or ``--epochs``) times the size. What a run's time grows
    with, roughly; a small set's run is not a small fraction of a large one's when its epochs rise."""
    epochs = get_strategy(strategy)().schedule(size, bench.batch_size, epochs=bench.epochs).epochs
    return float(epochs * size)


def seconds_left(
    rows: list[dict[str, Any]], todo: list[tuple[str, int | None]], work: Callable[[str, int], float] | None = None
) -> float | None:
    """The time the runs still ``todo`` ((strategy, size) each) should take, from the rows done:
    each as long as the mean of those of its strategy and size, else of its size, else of the
    largest smaller size of the same strategy (else any) scaled by the ratio of ``work(strategy,
    size)`` (default: the sizes' ratio; a rough guess, corrected once one run of that size is done),
    else of every run. None until a run succeeded."""
    own = [(r["strategy"], r.get("train_size"), t) for r in rows if (t := _row_seconds(r)) is not None]
    if not own or not any(r["status"] == "ok" for r in rows):
        return None
    # another strategy's run stands in at its uncached pace: head_only's later epochs read cached
    # features in a fraction of a second, a pace no other strategy keeps (issue 32: "about 1m04s
    # left" after a head_only row of a 4m58s suite)
    uncached = {id(r): _uncached_seconds(r) for r in rows}
    other = [(r["strategy"], r.get("train_size"), uncached[id(r)]) for r in rows if _row_seconds(r) is not None]
    work = work or (lambda _strategy, size: float(size))

    def mean(picked: list[float]) -> float | None:
        return statistics.mean(picked) if picked else None

    def guess(strategy: str, size: int | None) -> float:
        same = mean([t for s, z, t in own if (s, z) == (strategy, size)])
        same = same if same is not None else mean([t for s, z, t in other if z == size])
        if same is None and size is not None:
            for mine in (True, False):  # the same strategy's smaller sizes say more than another's
                done = own if mine else other
                smaller = [(s, z) for s, z, _t in done if z is not None and z < size and (s == strategy or not mine)]
                if smaller:
                    s, z = max(smaller, key=lambda sz: sz[1])
                    return mean([t for s2, z2, t in done if (s2, z2) == (s, z)]) * work(strategy, size) / work(s, z)
        return same if same is not None else statistics.mean(t for _s, _z, t in other)

    return sum(guess(s, z) for s, z in todo)


def _tuned_not_run(strategy: str, conf: str | None, tuning: dict[str, Any] | None) -> bool:
    """A tuned row that runs nothing: tuning found no configuration, or the defaults won."""
    if conf != "tuned" or not tuning:
        return False
    entry = tuning["strategies"][strategy]
    return entry["status"] != "ok" or bool(entry.get("same_as_default"))


def _unrun_tuned_row(
    strategy: str, seed: int, rows: list[dict[str, Any]], tuning: dict[str, Any]
) -> dict[str, Any] | None:
    """The row of a strategy's tuned configuration at one seed when it is not run: tuning found
    none (the row says why), or the defaults won the study (their row at this seed stands for it:
    it is the same run). None: run it."""
    if not _tuned_not_run(strategy, "tuned", tuning):
        return None
    entry = tuning["strategies"][strategy]
    if entry["status"] != "ok":
        return {"strategy": strategy, "seed": seed, "status": entry["status"], "error": entry["error"], "tried": []}
    default = next(
        r for r in rows if r["strategy"] == strategy and r["seed"] == seed and r.get("configuration") == "default"
    )
    return {**default, "configuration": "tuned", "same_as_default": True}
