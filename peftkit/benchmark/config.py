"""What ``peftkit bench`` was asked to do: ``BenchConfig``, and the parsers of its list flags
(``--strategies``, ``--seeds``, ``--train-sizes``) that every front door (flag, YAML, Python) shares.

``plan_train_sizes`` turns the sizes asked for into those a suite runs, once the training split's
size is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from .. import registry
from ..config import DataSettings, Levers, RunConfig, check_positive, data_settings, flat_dict
from ..errors import PeftkitError
from ..settings import setting
from ..strategies.base import TUNED_SETTINGS


@dataclass
class BenchConfig(DataSettings):
    """What ``peftkit bench`` was asked to do; every run of the suite shares all of it.

    The model and data settings are ``DataSettings``' (inherited; each run's ``RunConfig`` gets them
    all), but for data in memory, which ``api.bench`` refuses: each run is a process of its own.
    ``None`` in ``task``, ``model``, ``dataset`` and ``max_length`` means the task's default (the
    task itself: what the model is made for), filled in by ``peftkit.benchmark.preflight.preflight_bench``."""

    strategies: list[str] = setting("strategies")
    seeds: list[int] = setting("seeds")
    _: KW_ONLY  # the positions after the seeds were the data settings': refused, not read anew
    epochs: int | None = setting("epochs")
    batch_size: int = setting("bench:batch_size")
    eval_batch_size: int = setting("eval_batch_size")
    early_stopping_patience: int | None = setting("early_stopping_patience")
    levers: Levers = field(default_factory=Levers)
    memory_budget: str | None = setting("bench:memory_budget")
    auto_fit: bool = setting("auto_fit")
    output_dir: str | None = setting("bench:output_dir")
    command: str = ""
    """The command line that asked for it, recorded in results.json (no flag: the CLI fills it in)."""
    tune: int | None = setting("tune")
    tune_timeout: str | None = setting("tune_timeout")
    tune_storage: str | None = setting("tune_storage")
    train_sizes: list[int | str] | None = setting("train_sizes")

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
        tuned = {k: v for k, v in (settings or {}).items() if k in TUNED_SETTINGS}
        options = {k: v for k, v in (settings or {}).items() if k not in TUNED_SETTINGS}
        cfg = RunConfig(
            strategy=strategy,
            **data_settings(self),
            epochs=self.epochs,
            batch_size=micro_batch,
            grad_accumulation=self.batch_size // micro_batch,
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
        return flat_dict(self, lead=("strategies", "seeds"))


# -- parsing --------------------------------------------------------------------------------


def parse_strategies(text: str) -> list[str]:
    """``all`` -> every registered strategy (not peft's ``peft:`` methods, 38 of them: named one by
    one); ``a,b`` -> those (aliases and ``peft:NAME`` allowed), checked, in order."""
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
