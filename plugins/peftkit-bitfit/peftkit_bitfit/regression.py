"""Text regression as a peftkit task plugin: a number per text (``peftkit run --task text-regression``).

A separate distribution adds a task exactly as it adds a strategy: a ``Task`` subclass named by an
entry point in the group ``peftkit.tasks`` (see this package's ``pyproject.toml``). Data goes
through ``peftkit.data`` (the same sources and the same seeded 80/10/10 split as every built-in
task); the model is a sequence classifier with one output, trained with mean squared error.
Metrics: ``mse``, ``mae`` and ``pearson``; the best epoch is the one with the lowest validation mse.
"""

from __future__ import annotations

import math
from typing import Any

from peftkit.data import TEXT_COLUMN_GUESSES, TaskData, finish_splits, load_raw, pick_column, standard_splits
from peftkit.errors import PeftkitError
from peftkit.spec import TaskSpec
from peftkit.tasks.sequence_classification import SequenceClassification

#: where the number is looked for when --label-column does not name it
TARGET_COLUMN_GUESSES = ("target", "score", "value", "label", "y")
SHAPE = "text and number"


def regression_metrics(preds: list[float], targets: list[float]) -> dict[str, float]:
    """Mean squared and absolute error, and Pearson's correlation (0 where either side is constant)."""
    n = max(1, len(targets))
    mse = sum((p - t) ** 2 for p, t in zip(preds, targets)) / n
    mae = sum(abs(p - t) for p, t in zip(preds, targets)) / n
    mp, mt = sum(preds) / n, sum(targets) / n
    cov = sum((p - mp) * (t - mt) for p, t in zip(preds, targets))
    sp = math.sqrt(sum((p - mp) ** 2 for p in preds))
    st = math.sqrt(sum((t - mt) ** 2 for t in targets))
    return {"mse": mse, "mae": mae, "pearson": cov / (sp * st) if sp and st else 0.0}


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class TextRegression(SequenceClassification):
    """Encoding, batching and the model's body are sequence classification's; one output."""

    name = "text-regression"
    description = "A number per text (plugin; sequence classifier with one output); mse, mae, pearson."
    default_dataset = ""  # no embedded regression set: --dataset is needed
    selection_metric = "mse"  # lower is better: ``score`` negates it
    headline_metrics = ("mse", "pearson")

    def score(self, metrics: dict[str, float]) -> float:
        return -metrics["mse"]

    def load_data(self, cfg: Any) -> TaskData:
        if not cfg.dataset:
            raise PeftkitError("text-regression needs --dataset: a file or dataset with a text and a number column")
        splits = standard_splits(load_raw(cfg.dataset), cfg.dataset)
        columns = list(splits["train"].column_names)
        text = pick_column(columns, cfg.text_column, TEXT_COLUMN_GUESSES, "text")
        target = pick_column(columns, cfg.label_column, TARGET_COLUMN_GUESSES, "label")
        for name, ds in splits.items():
            ds = ds.map(lambda r: {"text": r[text], "label": _number(r[target])}, remove_columns=ds.column_names)
            splits[name] = ds.filter(
                lambda r: isinstance(r["text"], str) and r["text"].strip() != "" and r["label"] is not None
            )
        if len(splits["train"]) == 0:
            raise PeftkitError(f"dataset {cfg.dataset!r} has no rows with a text and a number in {target!r}")
        done, info = finish_splits(splits, cfg.seed, cfg.max_train_samples)
        info["columns"] = {"text": text, "target": target}
        return TaskData(done, None, info, SHAPE)

    def load_model(self, model: str, data: TaskData, processor: Any, quantize: str | None, precision: str) -> Any:
        from peftkit.models import load_classifier

        return load_classifier(model, ["target"], processor.pad_token_id, quantize=quantize, precision=precision)

    def spec(self, model: Any, data: TaskData) -> TaskSpec:
        return TaskSpec(num_labels=1, label_names=("target",), kind=self.name)

    def plan_spec(self, model: Any, num_labels: int) -> TaskSpec:
        return TaskSpec(num_labels=1, label_names=("target",), kind=self.name)

    def loss(self, logits: Any, batch: dict[str, Any]) -> Any:
        import torch.nn.functional as F

        return F.mse_loss(logits.float().squeeze(-1), batch["labels"].float())

    def evaluate(
        self,
        strategy: Any,
        model: Any,
        loader: Any,
        accelerator: Any,
        after_batch: Any = None,
        final: bool = False,
        context: Any = None,
        data: TaskData | None = None,
    ) -> dict[str, float]:
        import torch

        model.eval()
        preds: list[float] = []
        targets: list[float] = []
        with torch.no_grad():
            for batch in loader:
                out = strategy.forward(model, batch).float().squeeze(-1)
                # gathered over every process; the examples that fill a last uneven batch drop out
                p, y = accelerator.gather_for_metrics((out, batch["labels"].float()))
                preds += p.cpu().tolist()
                targets += y.cpu().tolist()
                if after_batch is not None:
                    after_batch()
        metrics = regression_metrics(preds, targets)
        metrics["loss"] = metrics["mse"]
        return metrics

    def metadata(self, data: TaskData, processor: Any, cfg: Any) -> dict[str, Any]:
        return {"label_names": ["target"], "max_length": cfg.max_length}

    def predict(self, loaded: Any, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        import torch

        max_length = int(loaded.metadata.get("max_length") or 512)
        out: list[dict[str, Any]] = []
        with torch.no_grad():
            for i in range(0, len(texts), batch_size):
                chunk = texts[i : i + batch_size]
                batch = dict(
                    loaded.tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
                )
                values = loaded.strategy.forward(loaded.model, batch).float().squeeze(-1)
                out += [{"text": t, "value": float(v)} for t, v in zip(chunk, values)]
        return out
