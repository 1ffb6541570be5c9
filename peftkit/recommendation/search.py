"""``peftkit recommend``'s search: successive halving over strategy x configuration, within a time
budget, every run recorded in an optuna study per strategy so that the same command continues.

- **Rungs** are training-set sizes: the whole (capped) training set and each 1/eta of the one
  above, down to ``RUNG_MIN_EXAMPLES`` (nested seeded subsets, as ``bench --train-sizes``; each run
  trains the epochs a plain run gets at its size, raised on a small one). At most ``MAX_RUNGS``.
- **Rung 0** runs each candidate's defaults first (its configuration 0), then configurations
  sampled from each strategy's own search space (its study's TPE sampler: ``Strategy.search_space``,
  the space ``peftkit tune`` searches, epochs left to the run's schedule so that every rung trains
  as a plain run would), a strategy at a time in turn, for as long as the time the rest of the
  search is projected to need (from the measured runs) still fits the budget.
- **Each later rung** trains the best 1/eta of the rung below (by validation only) on eta times the
  examples, plus the best configuration of each of the ``finalists`` best strategies not among
  them, so that the last rung compares strategies, not only configurations of one.
- **Finalists**: the best configuration of each of the ``finalists`` best strategies at the last
  rung reached, run on every further seed while the budget allows; ``peftkit.recommendation.decide``
  compares them on the test split.

Each run is a bench row (``benchmark.ladder.bench_one``: a worker process, fitted into the memory
budget with levers and micro-batches). A run that would not finish before the deadline, by its
strategy's measured pace, is not started.
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import path_name
from ..durations import format_duration
from ..errors import RunInterrupted
from ..registry import get_strategy
from ..strategies.base import TUNED_SETTINGS, default_point
from ..tuning.trial import ReplayTrial, SearchTrial
from .config import RecommendConfig

Echo = Callable[[str], None]
# one bench row: (bench config, strategy, seed, settings, run name) -> row
RowRunner = Callable[[Any, str, int, dict[str, Any], str], dict[str, Any]]

RUNG_MIN_EXAMPLES = 400
"""The smallest training set a rung trains on: below a few hundred examples a run's validation says
little about how the configuration does on the whole set."""
MAX_RUNGS = 3
MAX_CONFIGS = 12
"""Rung 0's configurations per strategy at most, however large the budget."""
VALIDATION = (
    ("validation_accuracy", "validation accuracy", True),
    ("validation_perplexity", "validation perplexity", False),
    ("validation_loss", "validation loss", False),
)
# epochs are the run's own schedule at every rung (raised on a small training set), never searched:
# a configuration promoted to more examples then trains as a plain run on them would
_FIXED = {"epochs": None}


def rung_sizes(whole: int, eta: int, work: Callable[[int], float] | None = None) -> list[int]:
    """Training-set sizes of the rungs, smallest first, the last the whole set:
    10,201 examples at eta 3 -> [1133, 3400, 10201]; 600 -> [600].

    ``work(size)``: the training examples a run at ``size`` processes (its epochs x the size). A
    smaller rung is added only where it costs at most half the one above: a run on a small training
    set trains more epochs (a strategy's minimum optimizer steps), so 500 examples cost a plain run
    as much as 1,000, and a rung that saves nothing only delays the comparison."""
    sizes = [whole]
    while len(sizes) < MAX_RUNGS and sizes[0] // eta >= RUNG_MIN_EXAMPLES:
        smaller = sizes[0] // eta
        if work is not None and work(smaller) > work(sizes[0]) / 2:
            break
        sizes.insert(0, smaller)
    return sizes


def validation_value(row: dict[str, Any]) -> float | None:
    """The figure the search selects on, higher better: validation accuracy, or minus the
    validation perplexity (loss) of a language model. None for a run that has none."""
    if row.get("status") != "ok":
        return None
    for key, _label, higher in VALIDATION:
        if row.get(key) is not None:
            return float(row[key]) if higher else -float(row[key])
    return None


@dataclass
class Run:
    """One run of the search: configuration ``number`` of ``strategy`` at ``size`` examples, ``seed``."""

    strategy: str
    number: int
    size: int
    seed: int
    row: dict[str, Any]
    seconds: float

    @property
    def value(self) -> float | None:
        return validation_value(self.row)


@dataclass
class Config:
    """A configuration of one strategy: its settings and options (``values``; epochs left to the
    run), the optuna parameters they were drawn as, and its number (0: the strategy's defaults)."""

    strategy: str
    number: int
    values: dict[str, Any]
    params: dict[str, Any]
    distributions: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> dict[str, Any]:
        """What the run is given: the searched settings and options, epochs left to its schedule."""
        return {k: v for k, v in self.values.items() if not (k in TUNED_SETTINGS and v is None)}


class Ledger:
    """Every configuration and run of a search, kept in one optuna study per strategy
    (``recommend-<strategy>`` in ``storage``): a configuration is the trial that drew it, each run a
    trial with its figures in ``user_attrs`` (``config``, ``size``, ``seed``, ``row``, ``seconds``). A
    continued recommend reads them back and reruns nothing already recorded."""

    def __init__(self, storage: str, strategies: list[str], seed: int) -> None:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.studies = {
            s: optuna.create_study(
                storage=storage, study_name=f"recommend-{s}", direction="maximize", load_if_exists=True
            )
            for s in strategies
        }
        for i, study in enumerate(self.studies.values()):
            # seeded, and differently after each call's trials: a continued search draws new points,
            # not the ones its first call drew again
            study.sampler = optuna.samplers.TPESampler(seed=seed * 100_003 + i * 1_009 + len(study.trials))
        self.configs: dict[str, list[Config]] = {s: [] for s in strategies}
        finished: list[tuple[Any, int, Run]] = []
        for strategy, study in self.studies.items():
            for t in study.get_trials(deepcopy=False):
                if t.state.name not in ("COMPLETE", "FAIL") or "config" not in t.user_attrs:
                    continue
                a = t.user_attrs
                if a.get("draws"):
                    values = _replay(strategy, t.params)
                    self.configs[strategy].append(Config(strategy, a["config"], values, t.params, t.distributions))
                if "row" in a:
                    run = Run(strategy, a["config"], a["size"], a["seed"], a["row"], a["seconds"])
                    finished.append((t.datetime_complete, len(finished), run))
            self.configs[strategy].sort(key=lambda c: c.number)
        # in the order they finished, as the first call listed them (not study by study): the
        # report's history reads the same after a continued call
        finished.sort(key=lambda f: (f[0] is None, f[0] or 0, f[1]))
        self.runs: list[Run] = [run for _when, _i, run in finished]

    @property
    def spent(self) -> float:
        """Seconds the recorded runs took: what an earlier call of the same search spent."""
        return sum(r.seconds for r in self.runs)

    def find(self, config: Config, size: int, seed: int) -> Run | None:
        return next(
            (
                r
                for r in self.runs
                if (r.strategy, r.number, r.size, r.seed) == (config.strategy, config.number, size, seed)
            ),
            None,
        )

    def next_config(self, strategy: str) -> tuple[Config, Any]:
        """A new configuration of ``strategy`` (its defaults first), drawn by its study: the config
        and the optuna trial that drew it (told when its first run ends)."""
        study = self.studies[strategy]
        number = len(self.configs[strategy])
        cls = get_strategy(strategy)
        if number == 0:
            point = default_point(cls)
            study.enqueue_trial({k: v for k, v in point.items() if k not in _FIXED}, skip_if_exists=False)
        trial = study.ask()
        values = cls.search_space(SearchTrial(trial, dict(_FIXED), {}), cls.defaults)
        return Config(strategy, number, values, dict(trial.params), dict(trial.distributions)), trial

    def record(self, config: Config, size: int, seed: int, row: dict[str, Any], seconds: float, trial: Any) -> Run:
        """Keep one finished run: told to the trial that drew its configuration (its first run), or
        added as a trial of its own."""
        import optuna

        run = Run(config.strategy, config.number, size, seed, _storable(row), seconds)
        attrs = {"config": config.number, "size": size, "seed": seed, "row": run.row, "seconds": round(seconds, 2)}
        study = self.studies[config.strategy]
        state = optuna.trial.TrialState.COMPLETE if run.value is not None else optuna.trial.TrialState.FAIL
        if trial is not None:
            for k, v in {**attrs, "draws": True}.items():
                trial.set_user_attr(k, v)
            study.tell(trial, run.value if run.value is not None else None, state=state)
            self.configs[config.strategy].append(config)
        else:
            study.add_trial(
                optuna.trial.create_trial(
                    params=config.params,
                    distributions=config.distributions,
                    value=run.value,
                    state=state,
                    user_attrs=attrs,
                )
            )
        self.runs.append(run)
        return run

    def abandon(self, trial: Any) -> None:
        """The drawing trial of a run that was interrupted: failed, so a continued search draws anew."""
        import optuna

        if trial is not None:
            trial.set_user_attr("interrupted", True)
            trial.study.tell(trial, state=optuna.trial.TrialState.FAIL)


def _replay(strategy: str, params: dict[str, Any]) -> dict[str, Any]:
    cls = get_strategy(strategy)
    return cls.search_space(ReplayTrial(params, dict(_FIXED)), cls.defaults)


def _storable(row: dict[str, Any]) -> dict[str, Any]:
    """A bench row as a study keeps it (plain data: the ``versions`` are kept once, elsewhere)."""
    return {k: v for k, v in row.items() if k != "versions"}


class Clock:
    """The time budget: what is left, counting what an earlier call of the same search spent.
    ``now`` is the time source (``time.monotonic``; a test's own clock), ``started`` when the command
    started (its loading and planning count too)."""

    def __init__(
        self, budget: float, spent: float, now: Callable[[], float] = time.monotonic, started: float | None = None
    ) -> None:
        self.now = now
        self.budget, self.started, self.spent_before = budget, now() if started is None else started, spent

    @property
    def elapsed(self) -> float:
        return self.now() - self.started

    def left(self) -> float:
        return self.budget - self.spent_before - self.elapsed


@dataclass
class Search:
    """One recommend's search: its settings, candidates, rungs, ledger and clock, and how to run a row."""

    config: RecommendConfig
    candidates: list[str]
    sizes: list[int]
    ledger: Ledger
    clock: Clock
    run_row: RowRunner
    echo: Echo
    work: Callable[[str, int], float]
    """Training examples a run of a strategy at a size processes (its schedule's epochs x the size)."""
    skipped: list[str] = field(default_factory=list)
    """What the budget left out, one line each, for the report."""

    # -- estimates ----------------------------------------------------------------------------

    def estimate(self, strategy: str, size: int) -> float | None:
        """Seconds a run of ``strategy`` at ``size`` should take: its measured runs' start-up and
        evaluation (their seconds less training) plus their training pace scaled by ``work``. For a
        strategy with no run yet, the mean time of the other strategies' runs at this size (else at
        another, scaled by the sizes' ratio): not their pace times its epochs, which says nothing of
        a strategy whose later epochs cost little (head_only's cached features). None before any run."""
        timed = [r for r in self.ledger.runs if r.row.get("train_seconds")]
        mine = [r for r in timed if r.strategy == strategy]
        if mine:
            fixed = statistics.mean(max(0.0, r.seconds - r.row["train_seconds"]) for r in mine)
            pace = statistics.mean(r.row["train_seconds"] / max(1.0, self.work(r.strategy, r.size)) for r in mine)
            return fixed + pace * self.work(strategy, size)
        if not timed:
            return None
        same = [r.seconds for r in timed if r.size == size]
        return statistics.mean(same) if same else statistics.mean(r.seconds * size / r.size for r in timed)

    def _mean_estimate(self, strategies: list[str], size: int) -> float:
        known = [e for s in strategies if (e := self.estimate(s, size)) is not None]
        return statistics.mean(known) if known else 0.0

    def projected_rest(self, rung0: int) -> float:
        """Seconds the later rungs and the finalists' other seeds should take when rung 0 holds
        ``rung0`` configurations (each rung keeps 1/eta, at least the finalists' strategies)."""
        alive = self.alive()
        keep = min(self.config.finalists, len(alive))
        total, n = 0.0, rung0
        for size in self.sizes[1:]:
            n = max(keep, math.ceil(n / self.config.eta))
            total += n * self._mean_estimate(alive, size)
        total += (len(self.config.seeds) - 1) * keep * self._mean_estimate(alive, self.sizes[-1])
        return total

    def alive(self) -> list[str]:
        """Candidates whose defaults ran (or have not yet): a strategy whose every run failed is out."""
        out = []
        for s in self.candidates:
            runs = [r for r in self.ledger.runs if r.strategy == s]
            if not runs or any(r.value is not None for r in runs):
                out.append(s)
        return out

    # -- running ------------------------------------------------------------------------------

    def run(self, config: Config, size: int, seed: int, trial: Any = None, why: str = "") -> Run | None:
        """``config`` at ``size`` examples and ``seed``: the recorded run, or a new one when the
        budget allows it by the strategy's pace (else None, and the skip is said)."""
        done = self.ledger.find(config, size, seed)
        if done is not None:
            return done
        guess = self.estimate(config.strategy, size)
        name = f"{config.strategy} #{config.number}" + (" (defaults)" if config.number == 0 else "")
        if guess is not None and guess > self.clock.left():
            self.ledger.abandon(trial)
            self.skipped.append(
                f"{name} at {size:,} examples, seed {seed}: about {format_duration(guess, hours=False)} "
                f"by its pace, {format_duration(max(0.0, self.clock.left()), hours=False)} of the budget left"
            )
            self.echo(f"recommend: not starting {self.skipped[-1]}")
            return None
        shown = ", ".join(f"{k}={_short(v)}" for k, v in config.settings.items())
        self.echo(
            f"[{format_duration(self.clock.elapsed + self.clock.spent_before, hours=False)} of "
            f"{format_duration(self.clock.budget, hours=False)}] {name}{why} at {size:,} examples, seed {seed}"
            + (f": {shown}" if shown and config.number else "")
        )
        named = f"{path_name(config.strategy)}-c{config.number}-n{size}"
        run_dir = os.path.join(self.config.output_dir or "", "runs", f"{named}-seed{seed}")
        if os.path.isdir(run_dir):  # a run that finished but was not recorded (stopped in between)
            shutil.rmtree(run_dir)
        start = self.clock.now()
        try:
            row = self.run_row(
                self.config.bench_config(max_train_samples=size), config.strategy, seed, config.settings, named
            )
        except KeyboardInterrupt:
            self.ledger.abandon(trial)
            raise RunInterrupted(
                f"stopped during {name} at {size:,} examples; every finished run is kept in "
                f"{self.config.output_dir}: run the same peftkit recommend command (same --output-dir) to continue"
            ) from None
        run = self.ledger.record(config, size, seed, row, self.clock.now() - start, trial)
        self.echo(f"  {_outcome(run)}")
        return run

    def rung0(self) -> None:
        """Each candidate's defaults, then configurations drawn in turn while the rest fits."""
        first = self.sizes[0]
        for strategy in self.candidates:
            self._run_config_number(strategy, 0, first)
        while True:
            alive = [s for s in self.alive() if len(self.ledger.configs[s]) < MAX_CONFIGS]
            if not alive:
                return
            strategy = min(alive, key=lambda s: (len(self.ledger.configs[s]), -self._best(s, first)))
            n = sum(len(c) for c in self.ledger.configs.values())
            guess = self.estimate(strategy, first) or 0.0
            if guess + self.projected_rest(n + 1) > self.clock.left():
                return
            if self._run_config_number(strategy, len(self.ledger.configs[strategy]), first) is None:
                return

    def _run_config_number(self, strategy: str, number: int, size: int) -> Run | None:
        configs = self.ledger.configs[strategy]
        if number < len(configs):
            return self.run(configs[number], size, self.config.seeds[0])
        config, trial = self.ledger.next_config(strategy)
        return self.run(config, size, self.config.seeds[0], trial)

    def _best(self, strategy: str, size: int) -> float:
        values = [
            r.value for r in self.ledger.runs if r.strategy == strategy and r.size == size and r.value is not None
        ]
        return max(values) if values else -math.inf

    def ranked(self, size: int) -> list[tuple[Config, float]]:
        """The configurations run at ``size`` (first seed), best validation first."""
        seed = self.config.seeds[0]
        out = []
        for configs in self.ledger.configs.values():
            for c in configs:
                run = self.ledger.find(c, size, seed)
                if run is not None and run.value is not None:
                    out.append((c, run.value))
        return sorted(out, key=lambda cv: -cv[1])

    def promote(self, size: int) -> list[Config]:
        """The configurations the next rung trains: the best 1/eta at ``size``, and the best of each
        of the ``finalists`` best strategies there."""
        ranked = self.ranked(size)
        chosen = [c for c, _v in ranked[: math.ceil(len(ranked) / self.config.eta)]]
        best_of: dict[str, Config] = {}
        for c, _v in ranked:
            best_of.setdefault(c.strategy, c)
        for c in list(best_of.values())[: self.config.finalists]:
            if c not in chosen:
                chosen.append(c)
        return chosen

    def later_rungs(self) -> int:
        """Rungs 1.. in turn; returns the index of the last rung any configuration reached."""
        reached = 0
        for i in range(1, len(self.sizes)):
            promoted = self.promote(self.sizes[i - 1])
            ran = [self.run(c, self.sizes[i], self.config.seeds[0], why=f" (rung {i + 1})") for c in promoted]
            if not any(r is not None and r.value is not None for r in ran):
                break
            reached = i
        return reached

    def finalists(self, rung: int) -> list[Config]:
        """The best configuration of each of the ``finalists`` best strategies at ``rung``."""
        best_of: dict[str, Config] = {}
        for c, _v in self.ranked(self.sizes[rung]):
            best_of.setdefault(c.strategy, c)
        return list(best_of.values())[: self.config.finalists]

    def seed_finalists(self, finalists: list[Config], size: int) -> None:
        """Every further seed of each finalist, seed by seed, while the budget allows."""
        for seed in self.config.seeds[1:]:
            for c in finalists:
                self.run(c, size, seed, why=" (finalist)")


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _outcome(run: Run) -> str:
    row = run.row
    if run.value is None:
        return f"{row.get('status', 'failed')}: {row.get('error')}"
    key = next(k for k, _label, _h in VALIDATION if row.get(k) is not None)
    return (
        f"{key.replace('_', ' ')} {row[key]:.4f}, {row.get('epochs_run', '?')} epoch(s), "
        f"{format_duration(run.seconds, hours=False)}"
    )
