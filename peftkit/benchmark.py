"""``peftkit bench``: every strategy on the same model and data, measured side by side.

Each (strategy, seed) runs in a fresh worker process (``peftkit.bench_worker``), so one run's
memory (caches, allocator pools, a head's feature cache) cannot leak into the next one's figures,
and a crash or an out-of-memory in one run is a row in the table, not the end of the suite.

Every run gets the same data, split (per seed), sequence length and *effective* batch size. Under a
memory budget the micro-batch is halved on out-of-memory and gradient accumulation makes up the
difference, so a strategy that needs a smaller micro-batch still takes the same optimizer steps.
A strategy that does not fit even at micro-batch 1 is reported as ``does not fit`` with what was
tried.

The suite writes into a staging directory renamed into place at the end, like a run: results.json
(every row, a summary per strategy, versions, plugins, machine), results.md (the table a person
reads; rendered from results.json by ``peftkit.bench_report``), three PNG plots, and
runs/<strategy>-seed<N>/ (each run's directory, adapter included).
With ``--train-sizes`` every strategy and seed runs at each training-set size (nested seeded
subsets, runs/<strategy>-n<size>-seed<N>/), and the report adds a table per size and
learning_curve.png (``plan_train_sizes``, ``size_results``; ``bench_report.sizes_report``).

Beside the runs stands an input-blind baseline on the same test splits (``Task.baseline``: the
majority class, the most frequent answer), and a strategy that does not beat it is flagged: a
short run can look like learning while it only answers the most frequent label.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .bench_report import QUALITY, SECOND, _minutes, _seconds, markdown_report, shown_rows
from .config import Levers, RunConfig, check_positive, flat_dict
from .errors import PeftkitError
from .files import write_json
from .memory import format_size, parse_size
from .metrics import ROW_METRICS, summarize_figures
from .stats import LEVEL, RESAMPLES, from_bits, mean_interval, paired_bootstrap


@dataclass
class BenchConfig:
    """What ``peftkit bench`` was asked to do; every run of the suite shares all of it.

    ``None`` in ``task``, ``model``, ``dataset`` and ``max_length`` means the task's default (the
    task itself: what the model is made for), filled in by ``peftkit.api.bench``."""

    strategies: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    task: str | None = None
    model: str | None = None
    dataset: str | None = None
    text_column: str | None = None
    label_column: str | None = None
    response_column: str | None = None
    epochs: int | None = None
    """None: each strategy trains for its own default number of epochs."""
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int = 32
    """The effective batch (micro-batch x gradient accumulation), the same for every strategy."""
    max_length: int | None = None
    eval_batch_size: int = 128
    early_stopping_patience: int | None = None
    levers: Levers = field(default_factory=Levers)
    memory_budget: str | None = None
    auto_fit: bool = False
    """Under a budget, try the memory levers (see ``AUTO_FIT_LADDER``) before giving up."""
    output_dir: str | None = None
    """Where the results go (default: runs/bench-<timestamp>)."""
    command: str = ""
    tune: int | None = None
    """Tune every strategy first (``peftkit tune``, this many trials each, on validation) and run its
    best configuration over the seeds beside its defaults."""
    tune_timeout: str | None = None
    """With ``tune``: start no trial of a strategy's study after this long (each gets the same)."""
    tune_storage: str | None = None
    """With ``tune``: keep each strategy's study (``tune-STRATEGY``) in this Optuna storage (an
    SQLAlchemy URL) rather than in the output directory, so that a bench run again after an
    interruption continues its studies (their finished trials count toward ``tune``) instead of
    tuning from the start: the studies are most of a tuned bench's time."""
    train_sizes: list[int | str] | None = None
    """Run every strategy and seed at each of these training-set sizes (``"all"``: the whole
    training split; see ``parse_train_sizes``), on nested seeded subsets, instead of at one."""

    def validate(self) -> None:
        """Raise ``PeftkitError`` for settings no suite could use (each run's own are checked by
        ``RunConfig.validate`` through ``run_config``)."""
        check_positive(self, ("batch_size", "eval_batch_size"))
        if self.auto_fit and not self.memory_budget:
            raise PeftkitError("--auto-fit needs --memory-budget SIZE: it fits each strategy into that budget")
        if self.tune is not None and (not isinstance(self.tune, int) or isinstance(self.tune, bool) or self.tune < 1):
            raise PeftkitError(f"--tune must be a positive number of trials per strategy, got {self.tune!r}")
        if self.tune_timeout is not None and self.tune is None:
            raise PeftkitError("--tune-timeout needs --tune N: it bounds each strategy's study of N trials")
        if self.tune_storage is not None and self.tune is None:
            raise PeftkitError("--tune-storage needs --tune N: it keeps each strategy's study of N trials")
        if self.train_sizes is not None:
            parse_train_sizes(self.train_sizes)
            # each size is a --max-train-samples of its own, and a study is made at one size
            if self.max_train_samples is not None:
                raise PeftkitError(
                    "--train-sizes sets each run's training examples; drop --max-train-samples "
                    f"{self.max_train_samples}"
                )
            if self.tune is not None:
                raise PeftkitError(
                    "--train-sizes cannot be combined with --tune: drop --tune (to tune at one size: "
                    "--max-train-samples N --tune T)"
                )

    def run_config(
        self,
        strategy: str,
        seed: int,
        micro_batch: int,
        output_dir: str,
        levers: Levers | None = None,
        settings: dict[str, Any] | None = None,
    ) -> RunConfig:
        """The ``RunConfig`` of one run at one micro-batch size (``levers`` replace the suite's;
        ``settings``: a tuned configuration's run settings (lr, epochs, ...) and strategy options)."""
        from .strategies.base import TUNED_SETTINGS

        tuned = {k: v for k, v in (settings or {}).items() if k in TUNED_SETTINGS}
        options = {k: v for k, v in (settings or {}).items() if k not in TUNED_SETTINGS}
        cfg = RunConfig(
            strategy=strategy,
            task=self.task,
            model=self.model,
            dataset=self.dataset,
            text_column=self.text_column,
            label_column=self.label_column,
            response_column=self.response_column,
            max_eval_samples=self.max_eval_samples,
            epochs=self.epochs,
            batch_size=micro_batch,
            grad_accumulation=self.batch_size // micro_batch,
            max_length=self.max_length,
            max_train_samples=self.max_train_samples,
            # evaluation batches shrink with the micro-batch, or evaluation would break the budget
            eval_batch_size=max(1, self.eval_batch_size * micro_batch // self.batch_size),
            early_stopping_patience=self.early_stopping_patience,
            memory_budget=self.memory_budget,
            seed=seed,
            output_dir=output_dir,
            levers=levers or self.levers,
        )
        cfg = dataclasses.replace(cfg, **tuned, strategy_options=options)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, levers flat (a suite's ``results.json`` records them)."""
        return flat_dict(self)


@dataclass
class Attempt:
    """One worker process's outcome: ``ok`` with metrics, ``oom`` or ``failed`` with an error."""

    status: str
    batch_size: int
    error: str | None = None
    metrics: dict[str, Any] | None = None
    seconds: float = 0.0


Runner = Callable[[RunConfig, str], Attempt]


# -- parsing --------------------------------------------------------------------------------


def parse_strategies(text: str) -> list[str]:
    """``all`` -> every registered strategy; ``a,b`` -> those (aliases allowed), checked, in order."""
    from . import registry

    if text.strip().lower() == "all":
        return list(registry.available())
    names: list[str] = []
    for item in text.split(","):
        if not item.strip():
            continue
        name = registry.get_strategy(item).name
        if name not in names:
            names.append(name)
    if not names:
        raise PeftkitError(
            f"--strategies got {text!r}; give 'all' or names such as lora,full "
            f"(available: {', '.join(registry.available())})"
        )
    return names


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (non-negative integers, no repeats)."""
    seeds: list[int] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit():
            raise PeftkitError(f"--seeds expects comma-separated non-negative integers such as 0,1,2; got {item!r}")
        if int(item) not in seeds:
            seeds.append(int(item))
    if not seeds:
        raise PeftkitError(f"--seeds expects comma-separated non-negative integers such as 0,1,2; got {text!r}")
    return seeds


SIZES_EXPECTED = "comma-separated positive integers or 'all' (the whole training split), such as 250,500,1000,all"


def parse_train_sizes(value: str | list[int | str]) -> list[int | str]:
    """``"250,500,all"`` (or the same as a list) -> ``[250, 500, "all"]``: positive integers or
    ``all``, each once, in the order given. Every front door (flag, YAML, Python) goes through here."""
    items = value.split(",") if isinstance(value, str) else list(value)
    sizes: list[int | str] = []
    for item in items:
        text = str(item).strip().lower()
        if text == "all":
            size: int | str = "all"
        elif text.isdigit() and int(text) > 0 and not isinstance(item, bool):
            size = int(text)
        else:
            raise PeftkitError(f"--train-sizes expects {SIZES_EXPECTED}; got {str(item).strip()!r}")
        if size in sizes:
            raise PeftkitError(f"--train-sizes lists {size} twice; give each size once")
        sizes.append(size)
    if not sizes:
        raise PeftkitError(f"--train-sizes expects {SIZES_EXPECTED}; got nothing")
    return sizes


def plan_train_sizes(requested: list[int | str], whole: int) -> dict[str, Any]:
    """The sizes a ``--train-sizes`` suite runs, given the training split's ``whole`` size: ``all``
    and every size at or above it are the whole set, run once; ascending. Returns what results.json
    records under ``train_sizes`` (before the figures) and the ``note`` to say once (or None)."""
    over = [s for s in requested if s != "all" and int(s) >= whole]
    sizes = sorted({whole if s == "all" else min(int(s), whole) for s in requested})
    note = None
    if over:
        listed = ", ".join(f"{int(s):,}" for s in over)
        note = (
            f"--train-sizes: {listed} {'is' if len(over) == 1 else 'are'} at or above the training split's "
            f"{whole:,} examples: the whole set, run once as {whole:,}"
        )
    return {"requested": list(requested), "sizes": sizes, "whole": whole, "note": note}


def micro_batches(effective: int) -> list[int]:
    """Micro-batch sizes to try, largest first, each about half the last and each dividing the
    effective batch exactly (so accumulation keeps it): 32 -> 32,16,8,4,2,1; 24 -> 24,12,6,3,1."""
    sizes = [effective]
    while sizes[-1] > 1:
        sizes.append(max(d for d in range(1, sizes[-1] // 2 + 1) if effective % d == 0))
    return sizes


# -- one run, in its own process ------------------------------------------------------------


def spawn_worker(cfg: RunConfig, log_path: str) -> Attempt:
    """Run ``cfg`` in a fresh Python process; its progress goes to our stderr.

    The worker runs in a session of its own, so a Ctrl-C at the terminal reaches only this
    process: it stops the worker (``stop_worker``) and reports the interruption once, instead of
    the worker printing its own traceback (or a library's noise) over it."""
    with tempfile.TemporaryDirectory(prefix="peftkit-bench-") as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        result_path = os.path.join(tmp, "result.json")
        write_json(spec_path, {"config": cfg.to_dict(), "result_path": result_path, "log_path": log_path}, indent=None)
        start = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "peftkit.bench_worker", spec_path], stdin=subprocess.DEVNULL, start_new_session=True
        )
        try:
            code = proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM (a KeyboardInterrupt here): the worker goes too
            stop_worker(proc)
            raise
        if os.path.exists(result_path):
            with open(result_path, encoding="utf-8") as fh:
                return Attempt(**json.load(fh))
    why = (
        f"killed by signal {-code}" + (" (the system ran out of memory?)" if code == -9 else "")
        if code < 0
        else f"exited with status {code}"
    )
    return Attempt(
        "failed",
        cfg.batch_size or 0,
        f"worker process {why} before reporting; see {log_path}",
        seconds=time.perf_counter() - start,
    )


def stop_worker(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """Terminate a worker and wait until it is gone (SIGKILL after ``grace`` seconds, or at once
    on a second Ctrl-C), so the suite's staged output is removed only when nothing writes there."""
    proc.terminate()
    deadline = time.monotonic() + grace
    while proc.poll() is None:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        except KeyboardInterrupt:  # impatient: no more grace
            proc.kill()


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


def lever_rungs(bench: BenchConfig, strategy_cls: Any) -> list[Levers]:
    """The lever combinations to try, fewest first: the suite's own, then (with ``auto_fit`` and a
    budget) each rung of ``AUTO_FIT_LADDER`` added on top. Rungs that change nothing, or that the
    strategy cannot take (a quantized base under a full fine-tune), are left out."""
    from .levers import check_levers

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
    from .registry import get_strategy

    named = named or (f"{strategy}-tuned" if settings is not None else strategy)
    run_dir = os.path.join(stage, "runs", f"{named}-seed{seed}")
    tried: list[dict[str, Any]] = []
    row: dict[str, Any] = {"strategy": strategy, "seed": seed, "status": "does not fit", "error": None}
    cls = get_strategy(strategy)
    rungs = lever_rungs(bench, cls)
    refusal = _refusal(bench, strategy, rungs[0], check_model=predict is not None)
    if refusal is not None:
        return {**row, "status": "not applicable", "error": refusal, "tried": []}
    candidates = [
        (i, levers, micro)
        for i, levers in enumerate(rungs)
        for micro in micro_batches(bench.batch_size)
        if (i, -micro) >= (start[0], -start[1])
    ]
    budget = parse_size(bench.memory_budget) if bench.memory_budget else None
    for n, (rung, levers, micro) in enumerate(candidates):
        predicted = predict(strategy, levers, micro) if predict is not None else None
        last = n == len(candidates) - 1
        if budget is not None and predicted is not None and predicted > budget and not last:
            tried.append(
                {
                    "batch_size": micro,
                    "grad_accumulation": bench.batch_size // micro,
                    "levers": describe_levers(levers),
                    "outcome": "skipped",
                    "predicted_peak_bytes": predicted,
                    "error": f"predicted {format_size(predicted)} > budget {format_size(budget)}",
                }
            )
            continue
        cfg = bench.run_config(strategy, seed, micro, run_dir, levers, settings)
        log_path = os.path.join(stage, "logs", f"{named}-seed{seed}-batch{micro}-rung{rung}.log")
        attempt = runner(cfg, log_path)
        tried.append(
            {
                "batch_size": micro,
                "grad_accumulation": cfg.grad_accumulation,
                "levers": describe_levers(levers),
                "outcome": attempt.status,
                "error": attempt.error,
                "predicted_peak_bytes": predicted,
                "seconds": round(attempt.seconds, 1),
            }
        )
        if attempt.status == "oom":
            echo(
                f"  {strategy} seed {seed}: micro-batch {micro} ({describe_levers(levers)}) does not fit "
                f"({attempt.error}); trying less"
            )
            continue
        row["status"] = attempt.status
        row["error"] = attempt.error
        row["rung"] = rung
        row["levers"] = describe_levers(levers)
        row["predicted_peak_bytes"] = predicted
        if attempt.status == "ok" and attempt.metrics:
            m = attempt.metrics
            row.update({k: m.get(k) for k in ROW_METRICS})
            row["history"] = [
                {
                    k: e.get(k)
                    for k in (
                        "epoch",
                        "train_loss",
                        "validation_accuracy",
                        "validation_loss",
                        "validation_perplexity",
                        "epoch_seconds",
                    )
                }
                for e in m.get("history", [])
            ]
            row["run_dir"] = os.path.relpath(run_dir, stage)
            row["versions"] = m.get("versions", {})
        break
    else:
        row["error"] = _over_budget(bench.memory_budget, tried, named_levers=len(rungs) > 1)
    row["tried"] = tried
    return row


def not_applicable(bench: BenchConfig, strategy: str) -> str | None:
    """Why ``strategy`` cannot run in this suite at all (its levers, this model and task), or None:
    such a strategy is neither tuned nor run."""
    return _refusal(bench, strategy, bench.levers, check_model=True)


def _refusal(bench: BenchConfig, strategy: str, levers: Levers, check_model: bool) -> str | None:
    """Why ``strategy`` cannot run in this suite at all, or None: the suite's own levers may not
    apply to it (a quantized base under full), nor (``check_model``; a stand-in runner in tests has
    no real model to look at) the strategy to this model and task (prefix tuning on a ViT)."""
    from .levers import check_levers
    from .registry import get_strategy

    try:
        check_levers(levers, get_strategy(strategy)())
        if check_model:
            from .planner import check_applicable

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


# -- the suite ------------------------------------------------------------------------------


def _spread(values: list[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def quality_of(rows: list[dict[str, Any]], choices: tuple = QUALITY) -> tuple[str, str, bool]:
    """The first of ``choices`` that every successful row measured (QUALITY[0] if none ran)."""
    ok = [r for r in rows if r.get("status") == "ok"]
    for key, label, higher in choices:
        if ok and all(r.get(key) is not None for r in ok):
            return key, label, higher
    return choices[0]


def summarize(rows: list[dict[str, Any]], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """Per strategy: mean and spread over the seeds that ran, the worst peak, the usual time."""
    quality = quality_of(rows)[0]
    second = quality_of(rows, SECOND)[0]
    out: dict[str, dict[str, Any]] = {}
    for name in strategies:
        mine = [r for r in rows if r["strategy"] == name]
        ok = [r for r in mine if r["status"] == "ok"]
        if not ok:
            statuses = {r["status"] for r in mine}
            status = next(iter(statuses)) if len(statuses) == 1 else "failed"
            out[name] = {
                "status": status if status in ("does not fit", "not applicable") else "failed",
                "error": next((r["error"] for r in mine if r["error"]), None),
                "seeds": [],
            }
            continue
        acc = [r[quality] for r in ok]
        first = [r["history"][0]["epoch_seconds"] for r in ok if r.get("history")]
        later = [e["epoch_seconds"] for r in ok for e in r.get("history", [])[1:]]
        out[name] = {
            "status": "ok" if len(ok) == len(mine) else "partly failed",
            "seeds": [r["seed"] for r in ok],
            f"{quality}_mean": statistics.mean(acc),
            f"{quality}_std": _spread(acc),
            # the mean's 95% interval over seeds (t-based; None with one seed: no spread to measure)
            f"{quality}_ci95": _as_list(mean_interval(acc)),
            f"{quality}_min": min(acc),
            f"{quality}_max": max(acc),
            f"{second}_mean": (
                statistics.mean(r[second] for r in ok) if all(r.get(second) is not None for r in ok) else None
            ),
            **summarize_figures(ok),
            "first_epoch_seconds_mean": statistics.mean(first) if first else None,
            "later_epoch_seconds_mean": statistics.mean(later) if later else None,
            "levers": ok[0].get("levers", "-"),
            "predicted_peak_bytes": ok[0].get("predicted_peak_bytes"),
            # the seeds whose run learned nothing (each run's own verdict, metrics.json `learned`)
            "learned_nothing": [r["seed"] for r in ok if r.get("learned") is False],
        }
        predicted, measured = out[name]["predicted_peak_bytes"], ok[0]["peak_memory_bytes"]
        # how far the planner was from the measured peak of the same run (issue target: within 20%)
        out[name]["prediction_error"] = predicted / measured - 1 if predicted and measured else None
    return out


def _as_list(interval: tuple[float, float] | None) -> list[float] | None:
    return list(interval) if interval is not None else None


def _correct_by_seed(rows: list[dict[str, Any]], key: str) -> dict[str, dict[int, list[int]]]:
    """Per strategy and seed, each test example's correctness (1/0, the split's order), from the
    successful rows that recorded one whose mean is the row's ``key`` (so the paired test is on
    the figure the table ranks by, and never on a record of something else)."""
    out: dict[str, dict[int, list[int]]] = {}
    for r in rows:
        text = r.get("per_example_correct") if r.get("status") == "ok" else None
        if text and r.get(key) is not None and abs(text.count("1") / len(text) - r[key]) < 1e-4:
            out.setdefault(r["strategy"], {})[r["seed"]] = from_bits(text)
    return out


def _against_best(best: dict[int, list[int]], other: dict[int, list[int]]) -> dict[str, Any]:
    """One strategy's paired test against the best on the seeds both recorded, on the same test
    examples (same seed, same split); the verdict ``not distinguishable`` or ``distinguishable``
    at ``LEVEL``, or ``no per-example record`` when no seed pairs up."""
    seeds = sorted(s for s in set(best) & set(other) if len(best[s]) == len(other[s]))
    if not seeds:
        return {"verdict": "no per-example record", "seeds": []}
    c = paired_bootstrap([other[s] for s in seeds], [best[s] for s in seeds], RESAMPLES, seed=0, level=LEVEL)
    return {
        "difference": c.difference,
        "ci95": [c.low, c.high],
        "p_value": c.p_value,
        "bootstrap_p": c.bootstrap_p,
        "mcnemar_p": c.mcnemar_p,
        "examples": c.examples,
        "only_this_right": c.a_only,
        "only_best_right": c.b_only,
        "seeds": seeds,
        "verdict": "distinguishable" if c.distinguishable() else "not distinguishable",
    }


def compare_to_best(
    rows: list[dict[str, Any]], summary: dict[str, dict[str, Any]], quality: tuple[str, str, bool]
) -> dict[str, Any] | None:
    """Every strategy against the best one (by mean quality over seeds): the paired bootstrap over
    the test examples both answered (``peftkit.stats.paired_bootstrap``), its difference (this
    minus the best), 95% interval, p-value and verdict. None when no strategy has a quality."""
    key, _label, higher = quality
    means = {n: v[f"{key}_mean"] for n, v in summary.items() if v.get(f"{key}_mean") is not None}
    if not means:
        return None
    best = (max if higher else min)(means, key=means.__getitem__)
    correct = _correct_by_seed(rows, key)
    return {
        "best": best,
        "metric": key,
        "level": LEVEL,
        "resamples": RESAMPLES,
        "method": "paired bootstrap over test examples, stratified by seed; p_value: the larger of its "
        "p and exact McNemar's on the pooled pairs",
        "strategies": {n: _against_best(correct.get(best, {}), correct.get(n, {})) for n in means if n != best},
    }


def summarize_baseline(per_seed: dict[int, dict[str, Any] | None] | None) -> dict[str, Any] | None:
    """The input-blind baseline of each seed's test split (``Task.baseline``) as one entry of
    results.json: its name, what it predicts, each metric's mean over the seeds, and each seed's own."""
    known = {seed: b for seed, b in (per_seed or {}).items() if b}
    if not known:
        return None
    first = next(iter(known.values()))
    metrics = [k for k, v in first.items() if isinstance(v, (int, float)) and all(k in b for b in known.values())]
    predicts = sorted({str(b["predicts"]) for b in known.values()})
    return {
        "name": first["name"],
        "predicts": " / ".join(predicts),
        **{k: statistics.mean(b[k] for b in known.values()) for k in metrics},
        "seeds": {str(seed): b for seed, b in known.items()},
    }


def run_suite(
    bench: BenchConfig,
    stage: str,
    echo: Callable[[str], None],
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
    from .plots import write_learning_curve, write_plots

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
    echo: Callable[[str], None],
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
        elapsed = time.perf_counter() - start
        # the time left counts only what will run: not the tuned rows that are their defaults' runs
        left = _seconds_left(
            rows,
            [(s, z) for s, c, z, _n in todo[i - 1 :] if not _tuned_not_run(s, c, tuning)],
            functools.partial(_work, bench),
        )
        eta = f", about {_minutes(left)} left" if left is not None else ""
        label = f"{strategy} (tuned)" if conf == "tuned" else strategy
        seeded = f"seed {seed}" + (f", {size:,} examples" if size else "")
        row = _unrun_tuned_row(strategy, seed, rows, tuning) if conf == "tuned" and tuning else None
        if row is not None and row.get("same_as_default"):
            echo(
                f"[{i}/{len(todo)}] {label}, {seeded}: the defaults won its study, so this is their run of seed {seed}"
            )
        else:
            echo(f"[{i}/{len(todo)}] {label}, {seeded} ({_minutes(elapsed)} elapsed{eta})")
        if row is None:
            settings = tuning["strategies"][strategy]["settings"] if conf == "tuned" and tuning else None
            sized = (
                bench
                if size is None
                else dataclasses.replace(bench, max_train_samples=None if size >= sizes["whole"] else size)
            )  # the whole set: uncapped
            row = bench_one(
                sized,
                strategy,
                seed,
                stage,
                fits.get((strategy, conf), (0, bench.batch_size)),
                runner,
                echo,
                predict,
                settings=settings,
                named=f"{strategy}-n{size}" if size else None,
            )
        if conf is not None:
            row = {"strategy": strategy, "seed": seed, "configuration": conf, **row}
        if size is not None:
            row = {"strategy": strategy, "seed": seed, "train_size": size, **row}
        if row["status"] == "ok":
            fits[(strategy, conf)] = (row["rung"], row["batch_size"])
            key, q_label, _ = quality_of([row])
            echo(
                f"  {label} {seeded}: {q_label} {row[key]:.4f}, train "
                f"{_seconds(row['train_seconds'])}, peak memory {format_size(row['peak_memory_bytes'])} "
                f"(micro-batch {row['batch_size']} x {row['grad_accumulation']})"
                + (f"; learned nothing: {row.get('learned_note')}" if row.get("learned") is False else "")
            )
        else:
            echo(f"  {label} {seeded}: {row['status']}: {row['error']}")
        rows.append(row)
    return rows


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
    from .registry import get_strategy

    epochs = get_strategy(strategy)().schedule(size, bench.batch_size, epochs=bench.epochs).epochs
    return float(epochs * size)


def _seconds_left(
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


def suite_results(
    bench: BenchConfig,
    rows: list[dict[str, Any]],
    seconds: float,
    baselines: dict[int, dict[str, Any] | None] | None,
    tuning: dict[str, Any] | None = None,
    sizes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What results.json holds: settings, provenance, the summary of the shown rows (the tuned ones
    when tuned, the largest size's with ``sizes``), the paired comparison with the best, the
    baseline, every row; with ``tuning``, also what it found and the default configuration's
    summary and its paired test against the tuned; with ``sizes``, the figures at every size."""
    from . import registry
    from .env import machine_description, package_versions

    versions = next((r["versions"] for r in rows if r.get("versions")), None) or package_versions()
    for r in rows:
        r.pop("versions", None)  # the same for every row: kept once, at the top
    shown = shown_rows({"rows": rows})
    quality = quality_of(shown)
    results = {
        "command": bench.command,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "suite_seconds": seconds,
        "settings": bench.to_dict(),
        "machine": machine_description(),
        "device": next((r["device"] for r in rows if r.get("device")), None),
        "versions": versions,
        "plugins": registry.loaded_plugins(),
        "memory_method": next((r["peak_memory_method"] for r in rows if r.get("peak_memory_method")), None),
        "summary": (summary := summarize(shown, bench.strategies)),
        "quality": quality,
        "comparison": compare_to_best(shown, summary, quality),  # each strategy vs the best
        "second": quality_of(shown, SECOND),
        "baseline": summarize_baseline(baselines),  # None: no baseline given, or none means anything
    }
    if tuning:
        results["tuning"] = tuning_results(rows, tuning, bench.strategies, quality)
    if sizes:
        results["train_sizes"] = size_results(rows, sizes, bench.strategies, quality)
    results["rows"] = rows
    return results


def tuning_results(
    rows: list[dict[str, Any]], tuning: dict[str, Any], strategies: list[str], quality: tuple[str, str, bool]
) -> dict[str, Any]:
    """``tuning`` with the default configuration's summary over the seeds and, per strategy, the
    paired test of its tuned rows against its default ones on the same test examples (the
    difference is tuned minus default)."""
    defaults = [r for r in rows if r.get("configuration") == "default"]
    key = quality[0]
    by_default, by_tuned = _correct_by_seed(defaults, key), _correct_by_seed(shown_rows({"rows": rows}), key)
    versus = {s: _against_best(by_default[s], by_tuned[s]) for s in strategies if s in by_default and s in by_tuned}
    return {**tuning, "default_summary": summarize(defaults, strategies), "versus_default": versus}


def size_results(
    rows: list[dict[str, Any]], sizes: dict[str, Any], strategies: list[str], quality: tuple[str, str, bool]
) -> dict[str, Any]:
    """The ``train_sizes`` block of results.json: the plan (sizes asked for, run, the whole split's
    size, the one the main table shows) and per strategy and size (keys are strings: JSON's) the
    ``quality`` metric's mean over the seeds, its 95% interval (None with one seed), sd, the seeds
    and the run directories."""
    key = quality[0]
    per: dict[str, dict[str, Any]] = {}
    for name in strategies:
        per[name] = {}
        for size in sizes["sizes"]:
            mine = [r for r in rows if r["strategy"] == name and r.get("train_size") == size]
            ok = [r for r in mine if r["status"] == "ok" and r.get(key) is not None]
            values = [r[key] for r in ok]
            status = (
                ("ok" if len(ok) == len(mine) else "partly failed")
                if ok
                else next((r["status"] for r in mine), "failed")
            )
            per[name][str(size)] = {
                "status": status,
                "seeds": [r["seed"] for r in ok],
                "mean": statistics.mean(values) if values else None,
                "sd": _spread(values),
                "ci95": _as_list(mean_interval(values)),
                "runs": [r["run_dir"] for r in ok if r.get("run_dir")],
            }
    return {
        "requested": sizes["requested"],
        "sizes": sizes["sizes"],
        "whole": sizes["whole"],
        "shown": max(sizes["sizes"]),
        "metric": key,
        "strategies": per,
    }
