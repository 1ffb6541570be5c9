"""What ``peftkit recommend`` was asked to do: ``RecommendConfig``, and the suite settings every
run of its search shares (``bench_config``: each run is a bench row, fitted into the memory budget
the way ``bench --auto-fit`` fits one).
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from ..benchmark.config import BenchConfig
from ..config import DataSettings, Levers, check_positive, data_settings, flat_dict
from ..durations import parse_duration
from ..errors import PeftkitError
from ..memory import parse_size
from ..settings import setting


@dataclass
class RecommendConfig(DataSettings):
    """What ``peftkit recommend`` was asked to do. The model and data settings are ``DataSettings``'
    (every run gets them; ``max_train_samples`` caps the largest rung's training set); ``None`` in
    ``task``, ``model``, ``dataset`` and ``max_length`` means the task's default."""

    strategies: list[str] = setting("recommend:strategies")
    _: KW_ONLY
    time_budget: str | float = setting("time_budget")
    """The whole command's wall time: seconds (from Python) or a duration (20m, 1h30m)."""
    memory_budget: str | None = setting("recommend:memory_budget")
    seeds: list[int] = setting("seeds")
    batch_size: int = setting("bench:batch_size")
    eval_batch_size: int = setting("eval_batch_size")
    levers: Levers = field(default_factory=Levers)
    eta: int = setting("eta")
    finalists: int = setting("finalists")
    output_dir: str | None = setting("recommend:output_dir")
    overwrite: bool = setting("recommend:overwrite")
    command: str = ""
    """The command line that asked for it, recorded in results.json (the CLI fills it in)."""

    @property
    def budget_seconds(self) -> float:
        """``time_budget`` in seconds."""
        return parse_duration(self.time_budget, flag="--time-budget")

    def validate(self) -> None:
        """Raise ``PeftkitError`` for settings no recommend could use."""
        check_positive(self, ("batch_size", "eval_batch_size", "max_train_samples", "max_eval_samples"))
        self.budget_seconds  # noqa: B018 - parsed for its error
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        if not isinstance(self.eta, int) or isinstance(self.eta, bool) or self.eta < 2:
            raise PeftkitError(f"--eta must be an integer of at least 2 (3 keeps a third per rung), got {self.eta!r}")
        if not isinstance(self.finalists, int) or isinstance(self.finalists, bool) or self.finalists < 1:
            raise PeftkitError(f"--finalists must be a positive integer, got {self.finalists!r}")
        if not self.seeds:
            raise PeftkitError("--seeds needs at least one seed, such as 0 or 0,1,2")

    def bench_config(self, **changes: Any) -> BenchConfig:
        """The suite settings every run of the search shares: a bench of these strategies, fitted
        into the memory budget with the levers and micro-batches ``bench --auto-fit`` tries."""
        bench = BenchConfig(
            strategies=list(self.strategies),
            seeds=list(self.seeds),
            **data_settings(self),
            batch_size=self.batch_size,
            eval_batch_size=self.eval_batch_size,
            levers=self.levers,
            memory_budget=self.memory_budget,
            auto_fit=self.memory_budget is not None,
            command=self.command,
        )
        return dataclasses.replace(bench, **changes)

    def identity(self) -> dict[str, Any]:
        """What a search was made for: a continued recommend must ask for the same (its runs were
        measured on this data, at these settings). The budgets and seeds may change between calls."""
        keep = {"time_budget", "seeds", "output_dir", "overwrite", "command", "finalists"}
        return {k: v for k, v in self.to_dict().items() if k not in keep}

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, levers flat (results.json records them)."""
        return flat_dict(self, lead=("strategies",))
