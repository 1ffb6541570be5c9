"""The contract every task type implements.

A task type is everything that differs between *what* is being learned (a label for a text, the
next tokens of a response, a label for an image), and nothing about *how* (that is a strategy):

1. ``load_data``: a dataset from a short name, a file or the hub, as train / validation / test;
2. ``load_processor`` / ``load_model``: the tokenizer or image processor, and the pretrained model
   with the head the task needs;
3. ``encode`` / ``collate``: examples turned into model inputs, batches padded;
4. ``loss``: the training loss from a strategy's logits; ``step_loss`` the function a training step
   calls (a task may compute its loss another way: causal-lm's from the output layer's input, in
   chunks, ``peftkit.chunked_loss``);
5. ``evaluate``: the task's metrics over a split (gathered over every process), plus the one that
   picks the best epoch (``selection_metric``, higher is better); ``evaluate_test`` also says which
   test examples were answered correctly, where the task can (a benchmark pairs strategies on them).

The training loop calls these and never branches on the task's name; strategies see only the
``TaskSpec`` a task hands them (how many labels, which modules are a new head, peft's task type).

A task keeps no state: what it learns about the data while loading it (its ``shape``, its label
names) travels on the ``TaskData``, which later calls receive. Tasks register with
``peftkit.tasks.register_task`` (third parties: the entry-point group ``peftkit.tasks``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..data import TEXT_COLUMN_GUESSES, TaskData, relabel, whole_data
from ..spec import TaskSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

    from ..config import RunConfig


@dataclass
class Evaluation:
    """What ``peftkit eval`` reports of an adapter on a labelled file (``Task.evaluate_in_detail``)."""

    metrics: dict[str, float]
    """What ``Task.evaluate`` measures on a test split (accuracy, f1_macro; perplexity, exact_match)."""
    per_class: list[dict[str, Any]] | None = None
    """Per label: ``label``, ``precision``, ``recall``, ``f1``, ``support`` (classification)."""
    confusion_matrix: list[list[int]] | None = None
    """Counts, a row per true label, a column per predicted label, in the adapter's label order."""


@dataclass
class Verdict:
    """Whether a run learned anything beyond an answer that needs no training (``Task.learned``)."""

    learned: bool
    baseline: dict[str, Any]
    """What the run was judged against, as metrics.json records it: ``name`` (``majority class``,
    ``zero-shot``), ``split``, and that reference's figures on it."""
    reason: str
    """What the figures say, for a person: ``test accuracy 0.584 is not better than the
    majority-class rate 0.584 (always 'neg', 500 examples), macro-F1 0.369``."""
    worse: bool = False
    """The run ended worse than the reference, not merely at it (a language model whose perplexity
    rose): training undid something, which more steps would not mend (a learning rate too high)."""


@dataclass
class StepLoss:
    """A training step's loss function (``Task.step_loss``) and which loss it is: ``plain`` (from
    the model's logits) or ``chunked`` (from the output layer's input, ``peftkit.chunked_loss``),
    as metrics.json records it."""

    compute: Callable[[Any, dict[str, Any]], Any]
    kind: str

    def __call__(self, model: Any, batch: dict[str, Any]) -> Any:
        return self.compute(model, batch)


class Task:
    """Base class of task types (``peftkit run --task NAME``)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: other names ``--task`` accepts
    aliases: ClassVar[tuple[str, ...]] = ()
    #: what ``--model`` and ``--dataset`` default to for this task
    default_model: ClassVar[str] = ""
    default_dataset: ClassVar[str] = ""
    #: tokens per example when ``--max-length`` is not given (None: the task has no tokens)
    default_max_length: ClassVar[int | None] = None
    #: the validation metric that picks the best epoch; higher is better (losses are negated)
    selection_metric: ClassVar[str] = "accuracy"
    #: the test metrics a run's summary line and the benchmark table lead with
    headline_metrics: ClassVar[tuple[str, ...]] = ("accuracy",)
    #: what an input is ("text", "image"): an adapter is refused on a base model made for other inputs
    input_kind: ClassVar[str] = "text"
    #: columns ``predict --input FILE.csv|jsonl`` reads the inputs from when no column is named
    #: (the first that exists)
    input_columns: ClassVar[tuple[str, ...]] = (*TEXT_COLUMN_GUESSES, "prompt")
    #: whether ``predict`` generates text, and so takes ``generation`` (``GenerationOptions``:
    #: new tokens, sampling, chat template); a task that does not is never passed it
    generates: ClassVar[bool] = False
    #: whether ``learned`` judges a run against the untrained model: then a run measures the
    #: model's validation metrics once before its first step (one extra validation pass) and
    #: hands them to ``learned`` as ``zero_shot``
    needs_zero_shot_reference: ClassVar[bool] = False
    #: whether ``peftkit export --format onnx`` exports this task's adapters: one forward pass from
    #: the inputs (``serving_batch``) to the label probabilities; other tasks are refused
    exports_onnx: ClassVar[bool] = False
    #: the dimensions of every model input that vary from call to call, by position (the batch;
    #: for text also the sequence): the dynamic axes of an exported graph
    serving_axes: ClassVar[dict[int, str]] = {0: "batch"}
    #: the column of a loaded split that holds the inputs (``text``, ``image``)
    input_field: ClassVar[str] = "text"
    #: whether the task's loss can be computed in chunks from the output layer's input
    #: (``--loss chunked``, ``step_loss``): where its logits are vocabulary-wide, not a few classes
    supports_chunked_loss: ClassVar[bool] = False
    #: whether ``encode`` packs several training examples into a row (``--packing``)
    supports_packing: ClassVar[bool] = False

    # -- data and model ------------------------------------------------------------------------
    def load_data(self, cfg: RunConfig) -> TaskData:
        """Train / validation / test from ``cfg.dataset`` (through ``peftkit.data``), with the
        data's shape and label names on the ``TaskData``."""
        raise NotImplementedError

    def data_warnings(self, data: TaskData) -> list[str]:
        """Lines starting ``warning:`` about ``data`` (after ``load_data``) that loads but would
        train this task badly; a run says them before training starts. None by default."""
        return []

    def load_processor(self, model: str) -> Any:
        """The tokenizer (text) or image processor (images) of ``model``."""
        raise NotImplementedError

    def load_model(self, model: str, data: TaskData, processor: Any, quantize: str | None, precision: str) -> nn.Module:
        """The pretrained model with this task's head (new where the task needs one)."""
        raise NotImplementedError

    def spec(self, model: nn.Module, data: TaskData) -> TaskSpec:
        """What strategies need to know about this task, for a freshly loaded ``model``."""
        raise NotImplementedError

    # -- batches -------------------------------------------------------------------------------
    def encode(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        """Model-ready splits. Every example gets an ``example_key`` unique across splits (for
        strategies that cache per example) and a ``length`` where grouping by length saves padding."""
        raise NotImplementedError

    def collate(self, processor: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        raise NotImplementedError

    # -- learning and measuring ----------------------------------------------------------------
    def loss(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def step_loss(self, strategy: Any, model: nn.Module, loss: str | None = None, sharded: bool = False) -> StepLoss:
        """The loss a training step computes, ``(model, batch) -> loss``, for the prepared ``model``
        (the one strategies see; the step may call a wrapper of it) and the ``--loss`` lever
        (None: the task's choice; ``sharded``: under ``--fsdp``). The default: the strategy's
        logits and ``loss`` (``--loss chunked`` is refused earlier for a task without
        ``supports_chunked_loss``)."""

        def step_loss(wrapped: Any, batch: dict[str, Any]) -> Any:
            return self.loss(strategy.forward(wrapped, batch), batch)

        return StepLoss(step_loss, "plain")

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
        """Metrics of ``model`` over ``loader``, gathered over every process. ``final`` is the
        test evaluation, where a task may also do costlier things (generate answers). ``context``
        is the processor; ``data`` the ``TaskData`` the loader was encoded from (its ``shape``
        says what can be measured; None: the task's usual shape)."""
        raise NotImplementedError

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
        """The run's final evaluation: ``evaluate``'s test metrics (``final``) and, where the task
        can say, whether each test example was answered correctly (1/0, the mean is the headline
        accuracy or exact match), in the test split's own order (``in_split_order``), so that two
        strategies run with the same seed compare example by example (a benchmark's paired test).
        The default: the metrics only, None for the examples (the task cannot say)."""
        return self.evaluate(
            strategy, model, loader, accelerator, after_batch=after_batch, final=True, context=context, data=data
        ), None

    # -- evaluating an adapter on a new file (``peftkit eval``) --------------------------------
    def evaluation_data(self, cfg: RunConfig, metadata: dict[str, Any]) -> TaskData:
        """Every example of ``cfg.dataset`` as the test split (train and validation empty), its
        labels numbered as the adapter's (``metadata``: its peftkit_adapter.json) by name; a label
        the adapter does not know is refused."""
        with whole_data():
            data = self.load_data(cfg)
        return relabel(data, metadata.get("label_names"), cfg.dataset)

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
        """``evaluate``'s test metrics (``final``), and where the task has them, per-class figures
        and a confusion matrix, from one pass over ``loader``."""
        return Evaluation(
            self.evaluate(
                strategy, model, loader, accelerator, after_batch=after_batch, final=True, context=context, data=data
            )
        )

    def baseline(self, data: TaskData) -> dict[str, Any] | None:
        """What a predictor that ignores its input scores on ``data``'s test split (the majority
        class; the most frequent answer), as ``{"name", "predicts", <metric>: value, ...}`` with
        the keys ``evaluate`` uses; None where no such predictor means anything (plain text)."""
        return None

    def learned(
        self, measured: dict[str, dict[str, float]], data: TaskData, zero_shot: dict[str, float] | None = None
    ) -> Verdict | None:
        """Whether a run learned anything: ``measured`` holds its ``test`` metrics (empty when the
        test split was not evaluated) and its selected epoch's ``validation`` metrics, ``data`` the
        data it was trained and evaluated on, ``zero_shot`` the untrained model's validation
        metrics (only for a task with ``needs_zero_shot_reference``). None: the task cannot say
        (the default: a plugin task that measures its own way is never judged wrongly)."""
        return None

    # -- planning (``peftkit plan``: random weights, no data) -----------------------------------
    def model_from_config(self, config: Any) -> nn.Module:
        """This task's model built from ``config`` (random weights; on the meta device under
        ``accelerate.init_empty_weights``)."""
        raise NotImplementedError

    def plan_spec(self, model: nn.Module, num_labels: int) -> TaskSpec:
        """The ``TaskSpec`` a run would hand strategies, for a model built from a config."""
        names = tuple(f"label_{i}" for i in range(num_labels))
        return TaskSpec(num_labels=num_labels, label_names=names, kind=self.name)

    def dummy_batch(
        self, config: Any, batch_size: int, max_length: int | None, device: str, loss_positions: int | None = None
    ) -> dict[str, Any]:
        """A batch shaped like a real one (random content), for measuring a training step.
        ``loss_positions``: how many positions of each example carry the loss, where the task's
        memory depends on it (``loss_positions`` below); None: the task's usual case. A task with
        ``supports_packing`` also takes ``packed=True``: rows of packed examples (``--packing``)."""
        raise NotImplementedError

    def loss_positions(self, data: TaskData, processor: Any, cfg: RunConfig) -> int | None:
        """For the planner: positions per example whose outputs the loss needs, measured on ``data``
        (after ``load_data``), when that moves memory; None where it does not (one label per example)."""
        return None

    def score(self, metrics: dict[str, float]) -> float:
        """How good validation ``metrics`` are (higher is better): picks the best epoch."""
        return metrics[self.selection_metric]

    def predict(self, loaded: Any, inputs: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        """Answers of a loaded adapter (``predict.LoadedAdapter``) for ``inputs``, one dict each.
        A task with ``generates`` also takes ``generation=`` (a ``GenerationOptions``)."""
        raise NotImplementedError

    def serving_batch(self, processor: Any, metadata: dict[str, Any], inputs: list[Any]) -> dict[str, torch.Tensor]:
        """``inputs`` (texts; images as a split or Pillow holds them) as the model takes them: one
        padded, truncated batch of tensors, as ``predict`` and ``peftkit export`` both feed it.
        ``metadata`` is the adapter's (its ``max_length``). Only tasks that ``exports_onnx``."""
        raise NotImplementedError

    def accepts_model(self, model_task: Task) -> bool:
        """Whether an adapter of this task can be applied to a base model made for ``model_task``
        (what the model's config or short name says, ``tasks.declared_task``): checked before
        anything loads, so a text adapter on an image model is refused as such. The default: the
        same kind of input (a sequence classifier may sit on a causal LM's backbone)."""
        return model_task.input_kind == self.input_kind

    def metadata(self, data: TaskData, processor: Any, cfg: RunConfig) -> dict[str, Any]:
        """What an adapter records so that ``predict`` can use it (label names, lengths, ...)."""
        return {"label_names": data.label_names}


def map_splits(
    splits: Any, encode: Callable[[dict[str, list], list[int], int], dict[str, Any]], keep: tuple[str, ...] = ()
) -> dict[str, Any]:
    """``encode(batch, indices, start)`` over train, validation and test (batched), each example's
    ``start + index`` unique across the splits (it becomes the ``example_key`` strategies cache
    by). The splits' own columns are dropped, except ``keep``."""
    out, offset = {}, 0
    for name in ("train", "validation", "test"):
        ds = splits[name]
        out[name] = ds.map(
            encode,
            batched=True,
            with_indices=True,
            fn_kwargs={"start": offset},
            remove_columns=[c for c in ds.column_names if c not in keep],
        )
        offset += len(ds)
    return out


def in_split_order(keys: list[Any], correct: list[Any]) -> list[int]:
    """``correct`` (per example, in the order evaluation met them: by length, gathered over
    processes) put back in the split's order: by ``example_key``, which ``map_splits`` numbers
    ascending through each split. ``keys`` and ``correct``: tensors or lists, one entry each."""
    pairs = sorted(zip((int(k) for k in keys), (int(bool(c)) for c in correct)))
    return [c for _, c in pairs]


def gathered_sum(accelerator: Any, value: float) -> float:
    """``value`` summed over every process (evaluation loss sums are per process)."""
    import torch

    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


__all__ = ["Evaluation", "Task", "Verdict", "TaskData", "TaskSpec", "gathered_sum", "in_split_order", "map_splits"]
