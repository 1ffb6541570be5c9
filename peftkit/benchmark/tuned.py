"""``bench --tune N``: every strategy tuned first, its best configuration then run over the seeds
beside its defaults.

Each strategy gets a study of N trials (and at most ``--tune-timeout``) with the suite's data
settings and its first seed, in ``tuning/STRATEGY/`` of the staging directory (or in
``--tune-storage``, so that a bench run again continues its studies): the ``peftkit tune``
machinery (``peftkit.tuning``: trial 0 the defaults, trials in workers, pruning), selecting on
validation only. What was found goes into results.json under ``tuning``; the suite
(``peftkit.benchmark.suite``) runs the tuned rows from it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

from ..config import path_name
from ..errors import PeftkitError, RunInterrupted
from ..strategies.base import TUNED_SETTINGS
from ..tuning.config import STUDY_FILE, TuneConfig, plan_tune
from ..tuning.output import prepare_output
from ..tuning.report import defaults_won, versus_defaults, write_reports
from ..tuning.search import StudyMismatch, open_study, optimize
from ..tuning.storage import masked, open_storage
from ..tuning.trial import TrialCounts, best_config
from .config import BenchConfig
from .ladder import not_applicable

Echo = Callable[[str], None]


def bench_tuning(config: BenchConfig, stage: str, echo: Echo) -> dict[str, Any]:
    """``bench --tune N``: a study of N trials (and at most ``tune_timeout`` each) for every
    strategy, with the suite's data settings and its first seed, into ``stage``/tuning/STRATEGY
    (the ``peftkit tune`` machinery: trial 0 the defaults, trials in workers, pruning). Returns
    what results.json records under ``tuning``: per strategy its status, tuned settings, best
    validation and the defaults' (trial 0's). A strategy that cannot run in the suite is not tuned."""
    start = time.perf_counter()
    found: dict[str, dict[str, Any]] = {}
    metric = None
    for strategy in config.strategies:
        why = not_applicable(config, strategy)
        if why is not None:
            found[strategy] = {"status": "not applicable", "error": why}
            continue
        metric, found[strategy] = _tune_one(config, strategy, stage, echo)
    return {
        "trials": config.tune,
        "timeout": config.tune_timeout,
        "seed": config.seeds[0],
        "storage": masked(config.tune_storage) if config.tune_storage else None,
        "metric": metric or "-",
        "seconds": time.perf_counter() - start,
        "strategies": found,
    }


def _tune_one(config: BenchConfig, strategy: str, stage: str, echo: Echo) -> tuple[str, dict[str, Any]]:
    """One strategy's study (see ``bench_tuning``): its metric and what it found."""

    def said(line: str) -> None:
        echo(f"tuning {strategy}: {line.removeprefix('tune: ')}")

    run = config.run_config(strategy, config.seeds[0], config.batch_size, "unused")
    folder = os.path.join("tuning", path_name(strategy))
    tc = TuneConfig(
        run=run,
        trials=config.tune or 1,
        timeout=config.tune_timeout,
        output_dir=os.path.join(stage, folder),
        storage=config.tune_storage,
    )
    plan = plan_tune(tc, echo=lambda _line: None)  # the data's notes were said once already
    prepare_output(plan)
    try:
        study = open_study(plan, open_storage(plan.storage), said)
    except StudyMismatch as exc:  # a study of that name made for other settings: tune's advice is not the bench's
        raise PeftkitError(f"--tune-storage: {exc.mismatch}; give another --tune-storage for these settings") from None
    try:
        optimize(study, plan, said)
    except RunInterrupted:  # its advice (run tune again) does not hold: the bench and its studies go
        raise KeyboardInterrupt from None
    try:
        best = best_config(plan, study)
    except ValueError:  # no trial completed
        return plan.metric, {
            "status": "failed",
            "error": f"no trial of its study completed; see {folder}/trials/*/worker.log",
        }
    settings = {k: getattr(best, k) for k in TUNED_SETTINGS} | dict(best.strategy_options)
    # the reports name the study where it ends up, not the staging directory it was made in
    shown = plan if config.tune_storage else dataclasses.replace(plan, storage=f"sqlite:///{folder}/{STUDY_FILE}")
    write_reports(plan.output_dir, shown, study, best, {"bench_rows": f"runs/{path_name(strategy)}-tuned-seedN"})
    # the finished defaults trial (an interrupted one was queued again, and failed trials have no value)
    defaults = next((t.value for t in study.trials if t.user_attrs.get("defaults") and t.value is not None), None)
    said(
        f"best trial #{study.best_trial.number}, validation {plan.metric} {study.best_value:.4f} "
        f"(defaults: {'-' if defaults is None else f'{defaults:.4f}'}); of {TrialCounts.of(study).describe()}"
        + ("; the defaults were best: no tuned setting beat them" if defaults_won(study) else "")
    )
    # trials as tune's own lines count them: every one that started (not those queued and never run)
    return plan.metric, {
        "status": "ok",
        "error": None,
        "trials": TrialCounts.of(study).total,
        "best_trial": study.best_trial.number,
        "best_validation": study.best_value,
        "default_validation": defaults,
        "settings": settings,
        "same_as_default": bool(study.best_trial.user_attrs.get("defaults")),
        "dir": folder,
        # whether the validation gain is more than the split's noise (paired)
        "validation_versus_defaults": versus_defaults(study),
    }
