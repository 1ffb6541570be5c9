"""What results.json holds: ``suite_results`` puts a suite's rows, settings and provenance together
with their summaries (``peftkit.benchmark.summary``); ``tuning_results`` adds what ``bench --tune``
found and each strategy's tuned rows against its default ones; ``size_results`` the figures at every
size of a ``--train-sizes`` suite. The report (``peftkit.benchmark.report``) is rendered from it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from .. import registry
from ..env import machine_description, package_versions
from ..stats import mean_interval
from .config import BenchConfig
from .summary import (
    SECOND,
    against_best,
    as_list,
    compare_to_best,
    correct_by_seed,
    quality_of,
    shown_rows,
    spread,
    summarize,
    summarize_baseline,
)


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
    by_default, by_tuned = correct_by_seed(defaults, key), correct_by_seed(shown_rows({"rows": rows}), key)
    versus = {s: against_best(by_default[s], by_tuned[s]) for s in strategies if s in by_default and s in by_tuned}
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
                "sd": spread(values),
                "ci95": as_list(mean_interval(values)),
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


@dataclass
class BenchResult:
    """A finished suite: where its results are, what they hold, and the table a person reads."""

    output_dir: str
    results: dict[str, Any]
    """What results.json holds: every row, a summary per strategy, settings, versions, machine."""
    table: str
    """The table of results.md (markdown), best values in bold."""
