"""Head-only: the pretrained backbone is frozen; only a new classification head trains.

Because the backbone is frozen (and kept in eval mode, so dropout is off), it maps each example to
the same features every epoch. We compute them once, the first time an example is seen, and train
the head on the cached features: epochs after the first never run the backbone and take seconds.

Pooling matters: sentence-embedding models such as all-MiniLM-L6-v2 were trained with mean pooling,
and a head on their mean-pooled states beats one on the [CLS]/pooler output by a wide margin when
the backbone cannot adapt. ``pooling`` offers mean (default), the model's own pooler (BERT's
dense+tanh on [CLS]), the first token (cls) and the last non-padding token (decoders). Images
(ViT) pool their patch states the same way.

For a causal language model the head is the output layer (hidden state -> vocabulary): it is untied
from the input embeddings and trained alone on the frozen model.

Under ``--fsdp`` (the backbone sharded over processes) the processes decide together whether a
batch's features are cached, and share the features they compute, so every process's cache holds
every example and no process ever runs the sharded backbone alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import PeftkitError
from ..registry import register_strategy
from ..spec import model_inputs
from .base import Strategy, TaskSpec, TrainingDefaults

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class HeadOnlyOptions:
    pooling: Literal["mean", "pooler", "cls", "last"] = "mean"
    """How token states become one vector: mean (sentence encoders), pooler (the model's own
    pooler, e.g. BERT), cls (first token) or last (last non-padding token, for decoders)."""
    dropout: float = 0.1
    """Dropout on the pooled features before the linear head."""

    def __post_init__(self) -> None:
        if not 0 <= self.dropout < 1:
            raise PeftkitError(f"head_only option dropout must be in [0, 1), got {self.dropout}")


def _pool(outputs, attention_mask: torch.Tensor | None, pooling: str) -> torch.Tensor:
    import torch

    hidden = outputs.last_hidden_state
    if pooling == "pooler":
        return outputs.pooler_output
    if pooling == "cls":
        return hidden[:, 0]
    if attention_mask is None:  # images: every position (patch) is real
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    if pooling == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    # last: position of the last real token, whether padding is on the right or the left
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def build_head_classifier(
    backbone: nn.Module, hidden_size: int, num_labels: int, pooling: str, dropout: float
) -> nn.Module:
    """A frozen backbone with a pooled linear head and a per-example feature cache."""
    import torch
    from torch import nn
    from transformers.modeling_outputs import SequenceClassifierOutput

    class PooledHeadClassifier(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone = backbone.requires_grad_(False)
            self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, num_labels))
            # example key -> pooled features; not a buffer: it is never saved
            self.feature_cache: dict[int, torch.Tensor] = {}
            self.backbone_calls = 0  # how often the backbone ran (the cache is tested by it)

        def train(self, mode: bool = True) -> PooledHeadClassifier:
            super().train(mode)
            self.backbone.eval()  # frozen features must be the same every epoch: no dropout
            return self

        @torch.no_grad()
        def features(self, **inputs: torch.Tensor) -> torch.Tensor:
            self.backbone_calls += 1
            outputs = self.backbone(**inputs)
            if pooling == "pooler" and getattr(outputs, "pooler_output", None) is None:
                raise PeftkitError(
                    f"head_only pooling 'pooler' needs a model with a pooler; model type "
                    f"{getattr(self.backbone.config, 'model_type', '?')!r} has none (use mean, cls or last)"
                )
            return _pool(outputs, inputs.get("attention_mask"), pooling)

        def forward(self, example_key: torch.Tensor | None = None, **inputs: torch.Tensor):
            keys = example_key.tolist() if example_key is not None else None
            sharded = _is_sharded(self)
            cached = keys is not None and all(k in self.feature_cache for k in keys)
            if sharded:  # every process runs the sharded backbone or none does
                cached = _on_every_process(cached, example_key.device if example_key is not None else None)
            if cached:
                feats = torch.stack([self.feature_cache[k] for k in keys])
            else:
                feats = self.features(**inputs)
                if keys is not None:
                    # sharded: every process caches every process's features, so the caches stay
                    # alike and the next epoch finds each batch cached on all processes at once
                    pairs = _gathered(example_key, feats) if sharded else (keys, feats)
                    self.feature_cache.update(zip(*pairs))
            return SequenceClassifierOutput(logits=self.head(feats))

    return PooledHeadClassifier()


# -- under --fsdp ---------------------------------------------------------------------------------
# A sharded backbone's blocks gather their weights over all processes at once, so one process
# cannot skip the backbone (its batch cached) while another runs it: they would wait for each
# other forever. Under FSDP the decision is taken together, and the features are shared.


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _on_every_process(cached: bool, device: Any) -> bool:
    """True only where every process's batch is cached."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(cached)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _gathered(keys: torch.Tensor, feats: torch.Tensor) -> tuple[list[int], torch.Tensor]:
    """Every process's example keys and features. The last batches may differ in size: they are
    padded to the longest (keys with -1, never a real key) and the padding dropped after."""
    from accelerate.utils import gather, pad_across_processes

    all_keys = gather(pad_across_processes(keys, pad_index=-1))
    all_feats = gather(pad_across_processes(feats))
    real = all_keys != -1
    return all_keys[real].tolist(), all_feats[real]


def _train_output_layer_only(model: nn.Module) -> nn.Module:
    """A language model's head is its output layer (hidden state -> vocabulary). Many models tie it
    to the input embeddings (one matrix for both); training it tied would change the embeddings
    too, so it is untied first: a copy of its own trains, the embeddings stay frozen. No feature
    cache here: a language model's loss needs every answer position's state, and the frozen
    backbone keeps no activations for the backward pass anyway."""
    from torch import nn as tnn

    out = model.get_output_embeddings()
    if out is None:
        raise PeftkitError(f"strategy 'head_only' found no output layer in model type {model.config.model_type!r}")
    model.requires_grad_(False)
    if out.weight is model.get_input_embeddings().weight:
        out.weight = tnn.Parameter(out.weight.detach().clone())
        model.config.tie_word_embeddings = False
        if hasattr(model, "_tied_weights_keys"):
            model._tied_weights_keys = None  # transformers must not re-tie it on save or load
    out.requires_grad_(True)
    return model


@register_strategy
class HeadOnly(Strategy):
    name = "head_only"
    aliases = ("head-only",)
    description = "Head-only: frozen backbone, a linear head on pooled features (cached after epoch 1)."
    Options = HeadOnlyOptions
    # A linear head on fixed features is a convex problem: a large step and many (cheap) epochs.
    # On a small training set (Strategy.schedule) up to 100 epochs: after the first, an epoch runs
    # the head alone on cached features (milliseconds), so reaching the minimum steps costs nothing.
    defaults = TrainingDefaults(lr=3e-3, epochs=20, batch_size=32, weight_decay=0.0, max_epochs=100)

    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The training settings, plus pooling (mean, cls, last: every model has them; ``pooler``
        only some, so it is left to ``--set``) and the head's dropout."""
        return {
            **cls.training_space(trial, defaults),
            "pooling": trial.suggest_categorical("pooling", ["mean", "cls", "last"]),
            "dropout": trial.suggest_float("dropout", 0.0, 0.3),
        }

    supports_quantized_base = True  # the backbone only computes features
    # Under --fsdp the feature cache is decided and filled by all processes together (see above):
    # sharding holds a backbone too big for one device while the head trains.

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        opts: HeadOnlyOptions = self.options
        if task.kind == "causal-lm":
            return _train_output_layer_only(model)
        hidden = getattr(model.config, "hidden_size", None)
        if hidden is None:
            raise PeftkitError(
                f"strategy 'head_only' cannot handle model type {model.config.model_type!r}: "
                "its config has no hidden_size"
            )
        return build_head_classifier(model.base_model, hidden, task.num_labels, opts.pooling, opts.dropout)

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if not hasattr(model, "feature_cache"):  # a language model's output layer: a plain forward
            return super().forward(model, batch)
        # unlike the default, pass example_key on: it is what the feature cache is keyed by
        return model(**model_inputs(batch, keep=("example_key",))).logits

    def extra_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        # the cache is kept in checkpoints: recomputed features, padded in other batches, could
        # differ in the last bits, and a resumed run must end exactly as an uninterrupted one
        import torch

        cache = getattr(model, "feature_cache", None)
        if not cache:
            return {}
        keys = sorted(cache)
        return {
            "feature_cache.keys": torch.tensor(keys, dtype=torch.long),
            "feature_cache.values": torch.stack([cache[k] for k in keys]),
        }

    def load_extra_state(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        if "feature_cache.keys" in tensors:
            values = tensors["feature_cache.values"]
            device = next(model.head.parameters()).device
            model.feature_cache.update(zip(tensors["feature_cache.keys"].tolist(), values.to(device)))
