"""``peftkit eval``: how well a trained adapter does on a labelled file it has not seen.

The file is read with the adapter's own task (its loaders, columns and shapes), every example of
it (no split), its labels matched to the adapter's by name. The task measures it as it measures a
run's test split (``Task.evaluate_in_detail``: accuracy and macro-F1, or perplexity and exact
match), adds what it can break down (per-class precision / recall / F1, the confusion matrix),
and sets an input-blind baseline beside it (``Task.baseline``: the majority class, the most
frequent answer). An adapter that does not beat the baseline has likely learned to say one thing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import KW_ONLY, asdict, dataclass, field
from typing import Any

from .adapter_io import check_adapter_dir, read_metadata, resolve_adapter_dir
from .config import ColumnSettings, RunConfig, check_positive
from .data import cap_eval_splits
from .files import write_json
from .inference import load_adapter
from .loop import make_accelerator, make_loader
from .plots import write_confusion_matrix
from .settings import setting
from .tasks import get_task

METRICS_FILE = "metrics.json"
CONFUSION_FILE = "confusion_matrix.png"


@dataclass
class EvalConfig(ColumnSettings):
    """What ``peftkit eval`` was asked (a field per flag). The columns are ``ColumnSettings``'
    (inherited, as a run's); ``model`` (the adapter's base), ``dataset`` (required) and
    ``max_eval_samples`` are worded for eval, so declared here."""

    adapter: str = setting("eval:adapter")
    dataset: str = setting("eval:dataset")
    _: KW_ONLY  # the positions after the dataset were the columns': refused, not read anew
    model: str | object | None = setting("base_model")  # from Python also a loaded model (RunConfig.model)
    force: bool = setting("force")
    max_eval_samples: int | None = setting("eval:max_eval_samples")
    batch_size: int = setting("eval:batch_size")
    output: str | None = setting("eval:output")
    overwrite: bool = setting("overwrite")

    def validate(self) -> None:
        """Refuse counts below 1."""
        check_positive(self, ("batch_size", "max_eval_samples"))


@dataclass
class EvalResult:
    """An adapter's figures on a file, the baseline's beside them."""

    adapter: str
    dataset: str
    task: str
    strategy: str
    examples: int
    label_names: list[str] | None
    metrics: dict[str, float]
    """The task's metrics (``accuracy``, ``f1_macro``, ``loss``; causal-lm ``perplexity``, ``exact_match``)."""
    baseline: dict[str, Any] | None
    """``Task.baseline`` on the same examples (None: no meaningful one, e.g. plain text)."""
    per_class: list[dict[str, Any]] | None = None
    confusion_matrix: list[list[int]] | None = None
    headline: list[str] = field(default_factory=list)
    """The task's headline metrics, in the order it reports them."""
    output_dir: str | None = None
    trained_on_it: bool = False
    """The adapter was trained on this dataset: its training examples are among those evaluated."""

    @property
    def compared_on(self) -> str | None:
        """The first headline metric the baseline also has (higher is better), if any."""
        return next((m for m in self.headline if self.baseline and m in self.baseline and m in self.metrics), None)

    @property
    def warning(self) -> str | None:
        """One line when the adapter does no better than the baseline, else None."""
        metric = self.compared_on
        if metric is None or self.baseline is None or self.metrics[metric] > self.baseline[metric]:
            return None
        b = self.baseline
        return (
            f"the adapter is not better than the {b['name']} baseline on {metric.replace('_', ' ')} "
            f"({self.metrics[metric]:.4f} vs {b[metric]:.4f} for always answering {b['predicts']!r})"
        )

    def to_dict(self) -> dict[str, Any]:
        """What ``metrics.json`` and ``peftkit eval --json`` hold."""
        return {**asdict(self), "warning": self.warning}


def evaluate_adapter(cfg: EvalConfig, echo: Callable[[str], None]) -> EvalResult:
    """Evaluate ``cfg.adapter`` on every example of ``cfg.dataset`` (see the module's docstring).
    The data is read (and its labels checked) before the model loads, where the adapter's
    metadata allows: a wrong file fails in seconds."""
    adapter_dir = resolve_adapter_dir(cfg.adapter)
    check_adapter_dir(adapter_dir)
    meta = read_metadata(adapter_dir)
    loaded = None
    if meta is None:  # a plain peft adapter: its labels are known once it is loaded
        loaded = load_adapter(adapter_dir, cfg.model, force=cfg.force)
        meta = loaded.metadata
    task = get_task(meta.get("task") or "sequence-classification")
    run_cfg = RunConfig(
        strategy=meta["strategy"],
        task=task.name,
        model=cfg.model or meta.get("base_model"),
        dataset=cfg.dataset,
        text_column=cfg.text_column,
        label_column=cfg.label_column,
        response_column=cfg.response_column,
        eval_batch_size=cfg.batch_size,
        max_length=meta.get("max_length") or task.default_max_length,
    )
    echo(f"loading data {cfg.dataset!r} for {task.name} ...")
    trained_on_it = same_dataset(cfg.dataset, meta.get("dataset"))
    if trained_on_it:
        echo(
            f"warning: the adapter was trained on {cfg.dataset!r}; evaluated whole, its training examples are "
            "among these, so the figures overstate how it does on new data (give a file it has not seen)"
        )
    data = task.evaluation_data(run_cfg, meta)
    cap_eval_splits(data, cfg.max_eval_samples, run_cfg.seed)
    if loaded is None:
        echo(f"loading adapter {adapter_dir!r} ({meta['strategy']} on {run_cfg.model!r}) ...")
        loaded = load_adapter(adapter_dir, cfg.model, force=cfg.force)
    examples = len(data.splits["test"])
    echo(f"evaluating {examples:,} examples ...")
    evaluation = _measure(task, loaded, data, run_cfg)
    return EvalResult(
        adapter_dir,
        cfg.dataset,
        task.name,
        meta["strategy"],
        examples,
        list(data.label_names) if data.label_names else None,
        evaluation.metrics,
        task.baseline(data),
        evaluation.per_class,
        evaluation.confusion_matrix,
        list(task.headline_metrics),
        trained_on_it=trained_on_it,
    )


def same_dataset(given: str, recorded: str | None) -> bool:
    """Whether ``given`` names the dataset an adapter recorded it was trained on: the same short
    name or hub id, or the same file (paths compared resolved)."""
    if not recorded:
        return False
    if given == recorded:
        return True
    return os.path.exists(given) and os.path.exists(recorded) and os.path.samefile(given, recorded)


def _measure(task: Any, loaded: Any, data: Any, run_cfg: RunConfig) -> Any:
    """The task's evaluation of the loaded adapter on ``data``'s test split, as a run evaluates its
    own (the loop's loader and accelerator), with a progress bar of batches on stderr."""
    from tqdm.auto import tqdm

    accelerator, _ = make_accelerator(run_cfg, None)
    encoded = task.encode(data, loaded.tokenizer, run_cfg)["test"]
    loader, _ = make_loader(encoded, task.collate(loaded.tokenizer), run_cfg.eval_batch_size, None)
    model = accelerator.prepare_model(loaded.model, evaluation_mode=True)
    loader = accelerator.prepare_data_loader(loader)
    with tqdm(
        total=len(loader), desc="evaluating", unit="batch", file=sys.stderr, dynamic_ncols=True, disable=None
    ) as bar:
        return task.evaluate_in_detail(
            loaded.strategy, model, loader, accelerator, after_batch=bar.update, context=loaded.tokenizer, data=data
        )


def write_evaluation(result: EvalResult, directory: str) -> list[str]:
    """``metrics.json`` (``result.to_dict()``) and, for classification, ``confusion_matrix.png``
    into ``directory``; the names of the files written."""
    write_json(os.path.join(directory, METRICS_FILE), result.to_dict())
    written = [METRICS_FILE]
    if result.confusion_matrix is not None:
        names = result.label_names or [str(i) for i in range(len(result.confusion_matrix))]
        title = f"{result.strategy} adapter on {os.path.basename(result.dataset)} ({result.examples:,} examples)"
        write_confusion_matrix(result.confusion_matrix, names, os.path.join(directory, CONFUSION_FILE), title)
        written.append(CONFUSION_FILE)
    return written


def confusion_table(matrix: list[list[int]], names: list[str]) -> str:
    """The confusion matrix as aligned text: a row per true label, a column per predicted one."""
    corner = "true \\ predicted"
    width = max([len(corner)] + [len(n) for n in names])
    cell = max([len(n) for n in names] + [len(str(c)) for row in matrix for c in row])
    lines = [f"{corner:<{width}}  " + "  ".join(f"{n:>{cell}}" for n in names)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{c:>{cell}}" for c in row) for name, row in zip(names, matrix)]
    return "\n".join(lines)


def per_class_table(rows: list[dict[str, Any]]) -> str:
    """Per-class precision, recall, F1 and support as aligned text."""
    width = max([5] + [len(r["label"]) for r in rows])
    lines = [f"{'label':<{width}}  precision  recall      f1  support"]
    lines += [
        f"{r['label']:<{width}}  {r['precision']:>9.4f}  {r['recall']:>6.4f}  {r['f1']:>6.4f}  {r['support']:>7,}"
        for r in rows
    ]
    return "\n".join(lines)


__all__ = ["EvalConfig", "EvalResult", "confusion_table", "evaluate_adapter", "per_class_table", "write_evaluation"]
