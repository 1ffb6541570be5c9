"""Sequence classification: a label for each text (the embedded default: MiniLM on Rotten Tomatoes).

Also the base of ``image-classification``: both train with cross-entropy on one label per example
and report accuracy and macro-F1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..data import label_warnings, load_labelled_data
from ..models import load_classifier, load_tokenizer
from ..stats import above_rate_p
from . import register_task
from .base import Evaluation, Task, TaskData, TaskSpec, Verdict, in_split_order, map_splits

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..config import RunConfig


def classification_metrics(preds: Any, labels: Any, num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 (the mean over classes of each class's F1; a class never predicted
    nor present counts as 0, as in scikit-learn with zero_division=0)."""
    acc = (preds == labels).float().mean().item() if len(labels) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = ((preds == c) & (labels == c)).sum().item()
        fp = ((preds == c) & (labels != c)).sum().item()
        fn = ((preds != c) & (labels == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": acc, "f1_macro": sum(f1s) / len(f1s)}


class ClassificationTask(Task):
    """What every task with one label per example shares: loss, metrics, the task spec."""

    selection_metric = "accuracy"
    headline_metrics = ("accuracy", "f1_macro")
    exports_onnx = True

    def spec(self, model: nn.Module, data: TaskData) -> TaskSpec:
        names = tuple(data.label_names or ())
        return TaskSpec(num_labels=len(names), label_names=names, kind=self.name)

    def data_warnings(self, data: TaskData) -> list[str]:
        """A label column that looks like free text (the wrong column?) and a class that dominates:
        a classifier trains on either without an error, to a figure that means little. Warnings,
        not errors: 150 intents on 15,000 rows is a real task, and there is no flag to insist."""
        return label_warnings(data)

    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        import torch.nn.functional as F

        return F.cross_entropy(logits.float(), batch["labels"])

    def evaluate(
        self,
        strategy: Any,
        model: nn.Module,
        loader: Any,
        accelerator: Any,
        after_batch: Callable[[], None] | None = None,
        final: bool = False,
        context: Any = None,
        data: TaskData | None = None,
    ) -> dict[str, float]:
        preds, labels, loss_sum, num_labels, _keys = self._outputs(strategy, model, loader, accelerator, after_batch)
        return {**classification_metrics(preds, labels, num_labels), "loss": loss_sum / max(1, len(labels))}

    def evaluate_test(
        self,
        strategy: Any,
        model: nn.Module,
        loader: Any,
        accelerator: Any,
        after_batch: Callable[[], None] | None = None,
        context: Any = None,
        data: TaskData | None = None,
    ) -> tuple[dict[str, float], list[int] | None]:
        """The test metrics and, per test example in the split's order, whether the predicted
        label is the true one (None where the batches carry no ``example_key`` to order them by)."""
        if self._measures_its_own_way():
            return Task.evaluate_test(self, strategy, model, loader, accelerator, after_batch, context, data)
        preds, labels, loss_sum, num_labels, keys = self._outputs(strategy, model, loader, accelerator, after_batch)
        metrics = {**classification_metrics(preds, labels, num_labels), "loss": loss_sum / max(1, len(labels))}
        return metrics, in_split_order(keys.tolist(), (preds == labels).tolist()) if keys is not None else None

    def _measures_its_own_way(self) -> bool:
        """A subclass (a plugin's task, e.g. text regression) that overrides ``evaluate`` measures
        something else than predicted labels: its ``evaluate`` is then the truth for the final and
        detailed evaluations too, and no per-example correctness is claimed for it."""
        return type(self).evaluate is not ClassificationTask.evaluate

    def _outputs(
        self, strategy: Any, model: nn.Module, loader: Any, accelerator: Any, after_batch: Callable[[], None] | None
    ) -> tuple[Any, Any, float, int, Any]:
        """Over ``loader``, gathered from every process: predicted and true label ids, summed loss,
        the number of labels (the model's outputs), and each example's ``example_key`` (None when
        the batches carry none: a plugin's own collate)."""
        import torch
        import torch.nn.functional as F

        model.eval()
        preds, labels, losses, keys = [], [], [], []
        num_labels = 0
        with torch.no_grad():
            for batch in loader:
                logits = strategy.forward(model, batch)
                num_labels = int(logits.shape[-1])
                loss = F.cross_entropy(logits.float(), batch["labels"], reduction="none")
                # gather_for_metrics drops the examples that fill up a last uneven batch across processes
                p, y, per_example = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"], loss))
                preds.append(p.cpu())
                labels.append(y.cpu())
                losses.append(per_example.cpu())
                if keys is not None and "example_key" in batch:
                    keys.append(accelerator.gather_for_metrics(batch["example_key"]).cpu())
                else:
                    keys = None
                if after_batch is not None:
                    after_batch()
        return (
            torch.cat(preds),
            torch.cat(labels),
            float(torch.cat(losses).sum()),
            num_labels,
            torch.cat(keys) if keys else None,
        )

    def evaluate_in_detail(
        self,
        strategy: Any,
        model: nn.Module,
        loader: Any,
        accelerator: Any,
        after_batch: Callable[[], None] | None = None,
        context: Any = None,
        data: TaskData | None = None,
    ) -> Evaluation:
        """The metrics, scikit-learn's per-class precision / recall / F1 / support and the confusion
        matrix (rows true, columns predicted), every label of the model counted, from one pass."""
        from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

        if self._measures_its_own_way():
            return Task.evaluate_in_detail(self, strategy, model, loader, accelerator, after_batch, context, data)
        preds, labels, loss_sum, num_labels, _keys = self._outputs(strategy, model, loader, accelerator, after_batch)
        metrics = {**classification_metrics(preds, labels, num_labels), "loss": loss_sum / max(1, len(labels))}
        ids = list(range(num_labels))
        names = list(data.label_names) if data is not None and data.label_names else [str(i) for i in ids]
        y, p = labels.numpy(), preds.numpy()
        precision, recall, f1, support = precision_recall_fscore_support(y, p, labels=ids, zero_division=0)
        per_class = [
            {
                "label": names[i],
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i in ids
        ]
        matrix = confusion_matrix(y, p, labels=ids).tolist()
        return Evaluation(metrics, per_class, [[int(c) for c in row] for row in matrix])

    def baseline(self, data: TaskData) -> dict[str, Any] | None:
        """Always the most frequent label of the test split (the lowest id on a tie), scored with
        the same accuracy and macro-F1 over every label as a model."""
        return majority_baseline(list(data.splits["test"]["label"]), list(data.label_names or ()))

    def learned(
        self, measured: dict[str, dict[str, float]], data: TaskData, zero_shot: dict[str, float] | None = None
    ) -> Verdict | None:
        """Judged on the test split (``judge_against_majority``), or on validation where no test
        was evaluated. Validation is recorded beside it but does not decide: its figure is the best
        of the epochs (picked on it, so optimistic), and a split of a few dozen examples can miss
        real learning by chance, while test is the unbiased figure the summary leads with. None
        for a subclass that measures its own way (no accuracy) or data without label names."""
        names = list(data.label_names or ())
        judged = "test" if measured.get("test") else "validation"
        if self._measures_its_own_way() or not names or "accuracy" not in measured.get(judged, {}):
            return None
        verdicts = {}
        for split in ("test", "validation"):
            figures = measured.get(split) or {}
            base = majority_baseline(list(data.splits[split]["label"]), names) if "accuracy" in figures else None
            if base is not None:
                verdicts[split] = judge_against_majority(figures, base, len(data.splits[split]), split)
        if judged not in verdicts:
            return None
        verdict = verdicts[judged]
        for split, other in verdicts.items():
            verdict.baseline[split] = other.baseline[split]
        return verdict


#: accuracy counts as better than the majority-class rate only when a one-sided exact binomial test
#: says so at this level: a tolerance in points would be too strict on 50 test examples and too lax
#: on 5,000 (0.590 against a rate of 0.588 on 1,000 examples is p = 0.47: it learned nothing)
BETTER_THAN_MAJORITY_P = 0.05
#: macro-F1 within this of the majority class's own (the highest a one-class predictor gets) is a
#: model that answers one class for all but a handful of examples, whatever its accuracy
ONE_CLASS_F1_MARGIN = 0.01


def majority_baseline(labels: list[int], names: list[str]) -> dict[str, Any] | None:
    """Always the most frequent of ``labels`` (ids into ``names``; the lowest id on a tie): what it
    predicts and its accuracy and macro-F1 over every label. None without labels or names."""
    import torch

    if not labels or not names:
        return None
    ids = torch.as_tensor(labels, dtype=torch.long)
    majority = int(torch.bincount(ids, minlength=len(names)).argmax())  # the first maximum: the lowest id
    scores = classification_metrics(torch.full_like(ids, majority), ids, len(names))
    return {"name": "majority class", "predicts": names[majority], **scores}


def judge_against_majority(metrics: dict[str, float], baseline: dict[str, Any], examples: int, split: str) -> Verdict:
    """Whether ``metrics`` (accuracy, macro-F1 of ``examples`` examples of ``split``) show learning
    beyond always answering the majority class (``baseline``): accuracy clearly above its rate
    (``BETTER_THAN_MAJORITY_P``) and macro-F1 above a one-class predictor's (``ONE_CLASS_F1_MARGIN``)."""
    acc, f1, rate = metrics["accuracy"], metrics.get("f1_macro"), baseline["accuracy"]
    correct = round(acc * examples)  # counts, not float32 means: 0.584 against 0.58399999 is the same 292
    p = above_rate_p(correct, examples, rate)
    one_class_f1 = baseline.get("f1_macro")
    one_class = f1 is not None and one_class_f1 is not None and f1 <= one_class_f1 + ONE_CLASS_F1_MARGIN
    record = {
        "name": baseline["name"],
        "judged_on": split,
        split: {k: baseline[k] for k in ("predicts", "accuracy", "f1_macro") if k in baseline}
        | {"examples": examples, "p_value": p},
    }
    where = f"(always {baseline['predicts']!r}, {examples:,} examples)"
    f1_text = f", macro-F1 {f1:.3f}" if f1 is not None else ""
    if correct <= round(rate * examples):
        reason = f"{split} accuracy {acc:.3f} is not better than the majority-class rate {rate:.3f} {where}{f1_text}"
    elif p >= BETTER_THAN_MAJORITY_P:
        reason = (
            f"{split} accuracy {acc:.3f} is not clearly above the majority-class rate {rate:.3f} {where}; "
            f"one-sided binomial p = {p:.2f}{f1_text}"
        )
    elif one_class:
        reason = (
            f"{split} macro-F1 {f1:.3f} is what always answering one class gets "
            f"({baseline['f1_macro']:.3f} for {baseline['predicts']!r}), at accuracy {acc:.3f}"
        )
    else:
        reason = f"{split} accuracy {acc:.3f} is above the majority-class rate {rate:.3f} {where}{f1_text}"
    return Verdict(p < BETTER_THAN_MAJORITY_P and not one_class, record, reason)


def predict_rows(loaded: Any, batches: Any, inputs: list[Any]) -> list[dict[str, Any]]:
    """Classification answers: one dict per input (``batches`` yields model batches of inputs).
    ``loaded`` is anything with ``label_names`` and ``probabilities(batch)``: an adapter on its
    base (``inference.LoadedAdapter``) or an exported model (``export.OnnxModel``)."""
    names = list(loaded.label_names)
    out: list[dict[str, Any]] = []
    for chunk, batch in batches:
        for item, p in zip(chunk, loaded.probabilities(batch)):
            p = [float(x) for x in p]
            label_id = max(range(len(p)), key=p.__getitem__)
            out.append(
                {"text": item, "label": names[label_id], "label_id": label_id, "score": p[label_id], "probabilities": p}
            )
    return out


@register_task
class SequenceClassification(ClassificationTask):
    name = "sequence-classification"
    description = "A label per text (AutoModelForSequenceClassification); accuracy and macro-F1."
    default_model = "minilm"
    default_dataset = "rotten_tomatoes"
    default_max_length = 64
    serving_axes = {0: "batch", 1: "sequence"}

    def load_data(self, cfg: RunConfig) -> TaskData:
        return load_labelled_data(cfg.dataset, cfg.text_column, cfg.label_column, cfg.seed, cfg.max_train_samples)

    def load_processor(self, model: str) -> Any:
        return load_tokenizer(model)

    def load_model(self, model: str, data: TaskData, processor: Any, quantize: str | None, precision: str) -> nn.Module:
        return load_classifier(
            model, list(data.label_names or ()), processor.pad_token_id, quantize=quantize, precision=precision
        )

    def encode(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        """Tokenize every split (no padding yet: batches are padded to their longest example)."""

        def encode(batch: dict[str, list], idx: list[int], start: int) -> dict[str, Any]:
            enc = processor(batch["text"], truncation=True, max_length=cfg.max_length)
            enc["example_key"] = [start + i for i in idx]
            enc["length"] = [len(ids) for ids in enc["input_ids"]]
            return enc

        return {
            name: ds.rename_column("label", "labels")
            for name, ds in map_splits(data.splits, encode, keep=("label",)).items()
        }

    def collate(self, processor: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        from transformers import DataCollatorWithPadding

        pad = DataCollatorWithPadding(processor)

        def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
            return pad([{k: v for k, v in r.items() if k != "length"} for r in rows])

        return collate

    def metadata(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        return {"label_names": data.label_names, "max_length": cfg.max_length}

    def model_from_config(self, config: Any) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification.from_config(config)

    def dummy_batch(
        self, config: Any, batch_size: int, max_length: int | None, device: str, loss_positions: int | None = None
    ) -> dict[str, Any]:
        import torch

        gen = torch.Generator().manual_seed(0)
        vocab = int(getattr(config, "vocab_size", 1000))
        b, length = batch_size, max_length or 64
        mask = torch.ones(b, length, dtype=torch.long)
        # real batches are padded to their longest example, so attention takes the masked path (which
        # can keep more for the backward pass than the unmasked one): pad one position of every other row
        mask[1::2, -1] = 0
        return {
            "input_ids": torch.randint(5, max(6, vocab), (b, length), generator=gen).to(device),
            "attention_mask": mask.to(device),
            "labels": torch.zeros(b, dtype=torch.long, device=device),
        }

    def serving_batch(self, processor: Any, metadata: dict[str, Any], inputs: list[Any]) -> dict[str, torch.Tensor]:
        return dict(
            processor(
                list(inputs),
                truncation=True,
                max_length=int(metadata.get("max_length") or 512),
                padding=True,
                return_tensors="pt",
            )
        )

    def predict(self, loaded: Any, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        def batches() -> Any:
            for i in range(0, len(texts), batch_size):
                chunk = texts[i : i + batch_size]
                yield chunk, self.serving_batch(loaded.tokenizer, loaded.metadata, chunk)

        return predict_rows(loaded, batches(), texts)
