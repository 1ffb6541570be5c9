"""A bench's checks and loading before any worker starts, so bad input fails in seconds.

``preflight_bench`` checks every setting any run of the suite could refuse (strategy names and
aliases, the task's defaults filled in, ``--train-sizes``, ``--tune-timeout``, ``--tune-storage``,
each strategy's run settings). ``load_once`` then loads the data and the model's processor
once: the planner's prediction of each run's peak (to skip what will not fit the budget), each
seed's input-blind baseline (``bench_baselines``), the columns every run reads and the training
split's size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..data import cap_eval_splits, resolved_columns
from ..durations import parse_duration
from ..errors import PeftkitError
from ..planner import bench_predictor
from ..tasks import get_task, with_task_defaults
from ..tuning.storage import open_storage
from .config import BenchConfig, parse_strategies, parse_train_sizes

Echo = Callable[[str], None]


def preflight_bench(config: BenchConfig) -> BenchConfig:
    """``config`` with its strategies checked (names and aliases), the task's defaults filled in,
    and every setting a run could refuse checked now, before any worker."""
    names = parse_strategies(",".join(config.strategies) or "all")
    _, filled = with_task_defaults(config)
    config = dataclasses.replace(config, strategies=names, **filled)
    if config.train_sizes is not None:  # a string from Python or YAML too: "250,500,all"
        config.train_sizes = parse_train_sizes(config.train_sizes)
    config.validate()
    if config.tune_timeout is not None:
        parse_duration(config.tune_timeout, flag="--tune-timeout")
    if config.tune_storage is not None:  # malformed or unreachable: said before any data loads
        try:
            open_storage(config.tune_storage)
        except PeftkitError as exc:
            raise PeftkitError(f"--tune-storage: {exc}") from None
    for name in config.strategies:
        config.run_config(name, config.seeds[0], config.batch_size, "unused")
    return config


def load_once(config: BenchConfig, echo: Echo) -> tuple[BenchConfig, Any, dict[int, dict[str, Any] | None], int]:
    """The planner's prediction of each run's peak, for skipping what will not fit, and each
    seed's input-blind baseline on the test split its runs are evaluated on. Loads the data and
    the model's processor once first: data or a model no run could load fails here, in seconds,
    and the data says how many labels and loss positions to plan for. Returned with ``config``
    naming the columns the data was read from (guessed ones too): results.json records them, and
    every run reads the same ones. What loading found (columns, dropped rows, label warnings) is
    said once here, before any worker starts. Last: the training split's size (``--train-sizes``'
    ``all``; the first seed's, as every seed's split has the same sizes)."""
    import torch

    cfg = config.run_config(config.strategies[0], config.seeds[0], config.batch_size, "unused")
    task = get_task(config.task)
    data = task.load_data(cfg)
    config = dataclasses.replace(config, **resolved_columns(data))
    for line in [*data.notes, *task.data_warnings(data)]:
        echo(line)
    processor = task.load_processor(config.model)
    num_labels = max(2, len(data.label_names or ()))
    predictor = bench_predictor(
        config.model,
        config.batch_size,
        config.max_length,
        num_labels,
        "cuda" if torch.cuda.is_available() else "cpu",
        task=config.task,
        loss_positions=task.loss_positions(data, processor, cfg),
    )
    return config, predictor, bench_baselines(config, task, data), len(data.splits["train"])


def bench_baselines(config: BenchConfig, task: Any, first: Any) -> dict[int, dict[str, Any] | None]:
    """``task.baseline`` on each seed's test split, made (and capped) as its runs make it: the
    seed changes the split. ``first``: the first seed's data, already loaded."""
    out: dict[int, dict[str, Any] | None] = {}
    for seed in config.seeds:
        data = (
            first
            if seed == config.seeds[0]
            else task.load_data(config.run_config(config.strategies[0], seed, config.batch_size, "unused"))
        )
        cap_eval_splits(data, config.max_eval_samples, seed)
        out[seed] = task.baseline(data)
    return out
