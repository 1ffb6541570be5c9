"""What a run measured: one ``RunMetrics`` dataclass, the single list of the figures in metrics.json.

Every reader (the benchmark's rows and summary, the adapter's recorded metrics, the command line's
summary) takes its names from these fields, so a new figure is declared once, here, with where
it goes (``row``: copied into a benchmark row; ``adapter``: recorded in the adapter's metadata;
``summary``: how a benchmark summarises it over seeds). Task metrics differ per task
(accuracy, perplexity, exact match, ...), so they are dicts that flatten to ``test_<name>`` and
``validation_<name>``, the keys metrics.json has always had.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .errors import PeftkitError

Summarise = Callable[[list[Any]], Any]


def format_rate(per_second: float) -> str:
    """A rate as a reader needs it: whole numbers from 10 up (115), two significant digits below
    (6.1, 0.62, 0.048), so a slow run's 0.6 examples/s does not read as 1."""
    if per_second > 0:
        text = f"{per_second:.{max(0, 1 - math.floor(math.log10(per_second)))}f}"
        if float(text) < 10:  # 9.96 rounds to 10.0: from there, whole numbers
            return text
    return f"{per_second:.0f}"


def _first(values: list[Any]) -> Any:
    return values[0]


def _max_or_none(values: list[Any]) -> Any:
    # a CPU run reserves nothing (None): the worst of what was measured, None if nothing was
    return max((v or 0) for v in values) or None


def _mean_or_zero(values: list[Any]) -> Any:
    return statistics.mean((v or 0) for v in values)


def _figure(
    *, row: bool, adapter: bool = False, summary: tuple[str, Summarise] | None = None, default: Any = MISSING
) -> Any:
    """A field of ``RunMetrics``; ``row`` must be decided for each (no default), so a new figure
    cannot silently miss the benchmark's rows."""
    return field(default=default, metadata={"row": row, "adapter": adapter, "summary": summary})


def _task_figures(prefix: str, *, row: tuple[str, ...], adapter: tuple[str, ...]) -> Any:
    """A dict of task metrics, flattened to ``<prefix><name>``; ``row`` and ``adapter`` name the
    metrics (of any task) that rows and adapters carry, None where a task does not measure one."""
    return field(metadata={"prefix": prefix, "row": row, "adapter": adapter, "summary": None})


@dataclass
class RunMetrics:
    """Every figure of a run, in metrics.json's order (``to_dict`` writes it)."""

    strategy: str = _figure(row=False)
    model: str = _figure(row=False)
    dataset: str = _figure(row=False)
    seed: int = _figure(row=False, adapter=True)
    epochs: int = _figure(row=False, adapter=True)
    task: str = _figure(row=True)
    test: dict[str, float] = _task_figures(
        "test_",
        row=("accuracy", "f1_macro", "exact_match", "perplexity"),
        adapter=("accuracy", "f1_macro", "perplexity", "exact_match"),
    )
    validation: dict[str, float] = _task_figures(  # the selected (best) epoch's
        "validation_", row=("accuracy", "loss", "perplexity"), adapter=("accuracy",)
    )
    best_epoch: int | None = _figure(row=True, adapter=True)  # the epoch whose weights were kept
    epochs_run: int = _figure(row=True, adapter=True, summary=("epochs", max))  # fewer than epochs: stopped early
    trainable_params: int = _figure(row=True, adapter=True, summary=("trainable_params", max))
    total_params: int = _figure(row=True, adapter=True, summary=("total_params", _first))
    trainable_percent: float = _figure(row=True, summary=("trainable_percent", max))
    train_seconds: float = _figure(row=True, summary=("train_seconds_mean", statistics.mean))
    eval_seconds: float = _figure(row=True)
    train_examples: int = _figure(row=False)
    samples_per_second: float = _figure(row=True, summary=("samples_per_second_mean", statistics.mean))
    train_tokens: int = _figure(row=False)
    tokens_per_second: float = _figure(row=True, summary=("tokens_per_second_mean", _mean_or_zero))  # real tokens
    # the same without each epoch's first step (start-up, kernel selection): what a long run sees
    step_seconds_median: float | None = _figure(row=True)
    steady_tokens_per_second: float | None = _figure(row=True)
    batch_size: int = _figure(row=True, summary=("batch_size", min))
    grad_accumulation: int = _figure(row=True, summary=("grad_accumulation", max))
    effective_batch_size: int = _figure(row=True)
    processes: int = _figure(row=False)
    peak_memory_bytes: int = _figure(row=True, summary=("peak_memory_bytes", max))
    peak_memory_eval_bytes: int = _figure(row=True, summary=("peak_memory_eval_bytes", max))
    memory_loaded_bytes: int = _figure(row=True, summary=("memory_loaded_bytes", max))
    peak_memory_increase_bytes: int = _figure(row=True, summary=("peak_memory_increase_bytes", max))
    peak_reserved_bytes: int | None = _figure(row=True, summary=("peak_reserved_bytes", _max_or_none))
    peak_reserved_eval_bytes: int | None = _figure(row=True)
    peak_memory_method: str = _figure(row=True)
    memory_budget_bytes: int | None = _figure(row=False)
    device: str = _figure(row=True)
    torch_threads: int = _figure(row=True)
    precision: str = _figure(row=False)
    optimizer: str = _figure(row=False)
    quantize: str | None = _figure(row=False)
    gradient_checkpointing: bool = _figure(row=False)
    # the training loss: "plain" (from the model's logits) or "chunked" (peftkit.chunked_loss)
    loss: str = _figure(row=True)
    # whether training rows held several examples (peftkit.packing), and the share of training
    # batch positions that were padding (None for inputs without tokens)
    packing: bool = _figure(row=True)
    padding_fraction: float | None = _figure(row=True)
    # the run's first optimizer step (it pays for the loader's start and, with --compile, compiling)
    first_step_seconds: float | None = _figure(row=True)
    resumed: bool = _figure(row=False)
    # what --kernels put into the model: torch, liger or none (peftkit.kernels), known from loading
    kernels: str | None = _figure(row=True, default=None)
    # a CPU run with a memory budget: how often training returned the heap's free pages between
    # transformer blocks, and the time that took (memory.HeapTrimsBetweenBlocks); None where it did not
    heap_trims: int | None = _figure(row=False, default=None)
    heap_trim_seconds: float | None = _figure(row=False, default=None)
    # known once the adapter is saved (the run's own, after training)
    adapter_bytes: int | None = _figure(row=True, summary=("adapter_bytes", max), default=None)
    wall_seconds: float | None = _figure(row=True, default=None)
    # where wall_seconds went: imports, load_data, load_model, fingerprint, prepare (before
    # training), setup (fit's own: accelerator, tokenizing, loaders), train, evaluate (validation
    # and test), save (the adapter). Start-up was most of a short GPU run's time (35-45 s for 1-5 s
    # of training on the H200): these say which part of it.
    stage_seconds: dict[str, float] | None = _figure(row=True, default=None)
    # known once the test split is evaluated (train.judge_learning)
    optimizer_steps: int | None = _figure(row=True, default=None)  # over every epoch run
    # whether the run learned anything beyond an answer that needs no training (Task.learned: the
    # majority class; for a causal LM the untrained model's perplexity); None: the task cannot say
    learned: bool | None = _figure(row=True, default=None)
    # what it was judged against: name, judged_on (the split), and the reference's figures per split
    baseline: dict[str, Any] | None = _figure(row=False, default=None)
    # when it learned nothing: what the figures say and the likely cause, with the flag to try
    learned_note: str | None = _figure(row=True, default=None)
    # how the epochs were chosen for the training set's size, and why (Strategy.schedule)
    schedule: dict[str, Any] | None = _figure(row=False, default=None)
    split: dict[str, Any] | None = _figure(row=False, default=None)
    label_names: list[str] | None = _figure(row=False, default=None)
    history: list[dict[str, Any]] | None = _figure(row=False, default=None)
    versions: dict[str, str] | None = _figure(row=False, default=None)
    # "1"/"0" per test example in the test split's order: answered correctly or not (the task's
    # evaluate_test; None where it cannot say). A bench pairs strategies of one seed on it.
    per_example_correct: str | None = _figure(row=True, default=None)

    def to_dict(self) -> dict[str, Any]:
        """metrics.json: the fields in order, task metrics flattened to ``test_*`` / ``validation_*``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            prefix = f.metadata.get("prefix")
            if prefix:
                out.update({prefix + k: v for k, v in value.items()})
            else:
                out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, flat: dict[str, Any]) -> RunMetrics:
        """Read a metrics.json back (``to_dict``'s inverse); keys it does not know are refused."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {f.name: {} for f in known.values() if f.metadata.get("prefix")}
        for key, value in flat.items():
            dict_field = next(
                (f for f in known.values() if f.metadata.get("prefix") and key.startswith(f.metadata["prefix"])), None
            )
            if dict_field is not None:
                values[dict_field.name][key[len(dict_field.metadata["prefix"]) :]] = value
            elif key in known:
                values[key] = value
            else:
                raise PeftkitError(
                    f"metrics key {key!r} is not a figure peftkit records (see peftkit.metrics.RunMetrics)"
                )
        return cls(**values)

    def adapter_record(self) -> dict[str, Any]:
        """The figures an adapter's metadata records (``peftkit inspect`` shows them)."""
        return {k: v for k, v in self.to_dict().items() if k in ADAPTER_METRICS}


def _names(flag: str) -> tuple[str, ...]:
    """The flattened metrics.json keys of the fields marked ``flag`` (task metrics by their names)."""
    out: list[str] = []
    for f in fields(RunMetrics):
        marked = f.metadata[flag]
        if f.metadata.get("prefix"):
            out.extend(f.metadata["prefix"] + name for name in marked)
        elif marked:
            out.append(f.name)
    return tuple(out)


# What a benchmark row copies from a run's metrics.json (None where the run's task has no such figure).
ROW_METRICS: tuple[str, ...] = _names("row")
# What an adapter's metadata records under "metrics" (those of them the run measured).
ADAPTER_METRICS: tuple[str, ...] = _names("adapter")


def summarize_figures(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The figures a benchmark summarises over a strategy's successful runs (rows holding
    ``ROW_METRICS``), each with the rule its field declares (worst peak, mean time, ...)."""
    rows = list(rows)
    out: dict[str, Any] = {}
    for f in fields(RunMetrics):
        if f.metadata["summary"]:
            key, summarise = f.metadata["summary"]
            out[key] = summarise([r.get(f.name) for r in rows])
    return out
