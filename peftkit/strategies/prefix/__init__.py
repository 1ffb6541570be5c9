"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190), injected by structure.

Learned key/value vectors for ``num_virtual_tokens`` virtual tokens are prepended to the keys and
values of every self-attention layer; the model's weights stay frozen, and the new task head trains
too. With ``prefix_projection`` the prefixes are produced by a small MLP from a shorter embedding
(the paper's reparametrisation), which trains more stably at the cost of more parameters while
training (only its output is needed at inference, and only its output is saved).

How it is injected, and why not through peft: peft passes the prefixes to the model as
``past_key_values``, so it only works where a model's ``forward`` takes a key/value cache. It never
did for DistilBERT, and from transformers 5.24 BERT, RoBERTa, GPT-2 and Llama classifiers take none
either. Here nothing depends on the cache API:

* every self-attention module is found by structure (the innermost attention module of each
  transformer block, ``peftkit.structure``) and routed, through its own view of the config, to an
  attention function registered with transformers' ``AttentionInterface``. That function prepends
  the layer's prefix to the keys and values that reach it (after rotary embeddings and the cache:
  prefixes are position-free, exactly like a pre-filled cache in peft), extends the 4D attention
  mask by columns every query may see (padding and causal masks alike, left padding included), and
  calls the implementation the model was configured with (``sdpa`` or ``eager``);
* real tokens sit at positions ``num_virtual_tokens ...``, as they do behind a cache of that length
  in peft: a pre-hook adds the offset to what the absolute position table (BERT, RoBERTa,
  DistilBERT, GPT-2) or the rotary embedding (Llama) receives.

* attention modules that compute their scores themselves (MPNet, Megatron-BERT, RemBERT: no
  attention function to route) are found by structure too: an attention module owning query, key
  and value projections, whose forward takes nothing of the sequence but masks and biases added to
  its scores. The module runs on P extra rows whose key and value projections are replaced by the
  prefix, masks and biases get P visible columns, and the extra rows are dropped from its output.
  A probe on random inputs checks, once per model, that a masked prefix changes nothing (positions
  meet only in the scores: not so in ConvBERT) and that both prefixes matter. Plain peft cannot
  apply such an adapter (those models take no cache), which its metadata says.

The result is peft's computation: the same prefix weights give the same logits where peft's own
prefix tuning runs (tested), and adapters are saved in peft's format (``adapter_config.json`` and
``adapter_model.safetensors`` with ``prompt_embeddings`` and ``base_model.<head>...``), so plain peft
loads them where it runs, and peftkit loads them on any model it supports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ...adapter_io import PEFT_TENSORS_FILE, read_peft_adapter, write_safetensors
from ...errors import PeftkitError
from ...registry import register_strategy
from ...structure import transformer_blocks
from ..base import Strategy, TaskSpec, TrainingDefaults, check_tensors_match
from .attention import (
    ATTENTION_NAME,
    SUPPORTED_ATTENTION,
    PrefixedConfig,
    position_modules,
    prefixed_attention,
    register_attention,
    self_attention_modules,
    shift_rotary_positions,
    shift_table_positions,
)
from .encoder import prefix_encoder
from .scores import ScoresPrefix, probe_scoring_attention, projections, scoring_attention_modules

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: peft's key of the saved prefixes: [num_virtual_tokens, num_layers * 2 * heads * head_dim]
PROMPT_KEY = "prompt_embeddings"


@dataclass
class PrefixOptions:
    num_virtual_tokens: int = 20
    """Virtual tokens prepended to the keys and values of every layer."""
    prefix_projection: bool = False
    """Produce the prefixes through a two-layer MLP (the paper's reparametrisation)."""
    projection_hidden_size: int | None = None
    """Hidden width of that MLP (default: the model's hidden size)."""

    def __post_init__(self) -> None:
        if self.num_virtual_tokens < 1:
            raise PeftkitError(
                f"prefix option num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}"
            )
        if self.projection_hidden_size is not None and self.projection_hidden_size < 1:
            raise PeftkitError(
                f"prefix option projection_hidden_size must be positive, got {self.projection_hidden_size}"
            )


# -- the strategy -----------------------------------------------------------------------------

#: the two ways a prefix goes in (recorded in a saved adapter's metadata as ``prefix_injection``)
INTERFACE, SCORES = "attention-interface", "own-scores"
#: the models strategy 'prefix' covers, in words (``peftkit list -v`` shows it; refusals name it)
COVERS = (
    "self-attention that calls transformers' attention functions (BERT, RoBERTa, DistilBERT, GPT-2, Llama "
    "and the like) or that computes its scores from its own query, key and value projections (MPNet, "
    "Megatron-BERT, RemBERT); not DeBERTa, ConvBERT, Funnel, XLNet or RoFormer"
)


def _refusal(model: nn.Module, reason: str) -> PeftkitError:
    """The one-line refusal of a model: its type, why, and what is covered."""
    model_type = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    return PeftkitError(
        f"strategy 'prefix' cannot handle model type {model_type!r}: {reason}; prefix tuning covers {COVERS}"
    )


def _find_attention(model: nn.Module, hidden: int, width: int, num_prefix: int) -> tuple[str, list[nn.Module]]:
    """How the prefix goes into this model, and the self-attention module of every block:
    ``INTERFACE`` where the modules call transformers' attention functions, else ``SCORES`` where
    they compute their scores from their own projections and the probe finds the prefix acts as
    one. Refused in one line otherwise (before the model is changed)."""
    found = transformer_blocks(model)
    if not found:
        raise _refusal(model, "no transformer blocks found")
    dispatching = self_attention_modules(found[1])
    if dispatching:
        return INTERFACE, dispatching
    scoring, reason = scoring_attention_modules(found[1], hidden, width)
    if scoring:
        hooks = ScoresPrefix(scoring[0], *projections(scoring[0], hidden, width)[1:], num_prefix)
        try:
            reason = probe_scoring_attention(hooks, hidden)
        finally:
            hooks.remove()
        if reason is None:
            return SCORES, scoring
    raise _refusal(model, reason or "no self-attention module found in its blocks")


def _encoder_of(model: nn.Module) -> nn.Module:
    encoder = getattr(model, "prefix_encoder", None)
    if encoder is None:
        raise PeftkitError("this model was not prepared by strategy 'prefix'")
    return encoder


@register_strategy
class PrefixTuning(Strategy):
    name = "prefix"
    aliases = ("prefix_tuning", "prefix-tuning")
    description = "Prefix tuning: learned key/value prefixes in every self-attention layer; the head trains too."
    covers = COVERS
    Options = PrefixOptions
    # prefixes start random and only steer attention: they need a large step, and more steps than
    # the others: on 250 Rotten Tomatoes examples the general 150 steps ended at 0.634, 300 at
    # 0.670 (on 500: 0.676 and 0.678, the training loss then at 0.28: the rest is lr and length,
    # for `peftkit tune`); bench --train-sizes, seed 0. 300 stays under one epoch of the embedded
    # default (319 steps), so that run is unchanged; 250 examples take 38 epochs of 8 steps
    defaults = TrainingDefaults(lr=1e-2, epochs=1, batch_size=32, weight_decay=0.0, min_steps=300, max_epochs=40)

    @classmethod
    def search_space(cls, trial: Any, defaults: TrainingDefaults) -> dict[str, Any]:
        """The training settings, plus 5..40 virtual tokens (log scale: 5 or 10 differ more than 35
        or 40). The projection stays off: it multiplies what trains and the time per step."""
        return {
            **cls.training_space(trial, defaults),
            "num_virtual_tokens": trial.suggest_int("num_virtual_tokens", 5, 40, log=True),
        }

    supports_quantized_base = True  # the base stays frozen; only the prefixes and the head train
    #: a plain peft adapter directory is matched to this strategy by peft's ``peft_type``
    peft_type = "PREFIX_TUNING"

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> PrefixOptions:
        """This strategy's options from a peft ``adapter_config.json`` (for plain peft adapters)."""
        return PrefixOptions(
            num_virtual_tokens=int(config["num_virtual_tokens"]),
            prefix_projection=bool(config.get("prefix_projection")),
            projection_hidden_size=config.get("encoder_hidden_size") if config.get("prefix_projection") else None,
        )

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        opts: PrefixOptions = self.options
        if task.peft_task_type is None:
            # the saved format is peft's, which knows prefix tuning for text tasks only
            raise PeftkitError(
                f"strategy 'prefix' cannot handle task {task.kind!r}: prefix tuning needs a "
                "text model that takes past keys and values; use lora or adapter"
            )
        config = model.config
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if hidden is None or heads is None:
            raise _refusal(model, "no hidden size or number of attention heads in its config")
        # grouped-query attention keeps fewer key/value heads: the prefix has as many (as in peft)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        injection, attentions = _find_attention(model, hidden, kv_heads * head_dim, opts.num_virtual_tokens)
        head_names = task.heads(model)
        model.requires_grad_(False)
        param = next(model.parameters())
        encoder = prefix_encoder(
            opts.num_virtual_tokens,
            len(attentions),
            kv_heads,
            head_dim,
            (opts.projection_hidden_size or hidden) if opts.prefix_projection else None,
            task.peft_task_type,
            head_names,
            param.device,
        )
        encoder.injection = injection
        tables, rotary = position_modules(model, exclude=None)
        for table in tables:
            table.register_forward_pre_hook(shift_table_positions(opts.num_virtual_tokens))
        for module in rotary:
            module.register_forward_pre_hook(shift_rotary_positions(opts.num_virtual_tokens), with_kwargs=True)
        if injection == INTERFACE:
            register_attention()
            for index, attention in enumerate(attentions):
                attention.config = PrefixedConfig(attention.config, encoder, index)
        else:
            for index, attention in enumerate(attentions):
                ScoresPrefix(
                    attention,
                    *projections(attention, hidden, kv_heads * head_dim)[1:],
                    opts.num_virtual_tokens,
                    encoder,
                    index,
                )
        model.add_module("prefix_encoder", encoder)
        for head in head_names:
            getattr(model, head).requires_grad_(True)
        return model

    # -- saving in peft's format -------------------------------------------------------------
    def _peft_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The adapter under peft's saved key names: the prefixes as peft computes them, and the
        head's parameters as ``base_model.<name>...``."""
        encoder = _encoder_of(model)
        tensors = {PROMPT_KEY: encoder.table().detach()}
        for head in encoder.head_names:
            for name, param in getattr(model, head).named_parameters():
                tensors[f"base_model.{head}.{name}"] = param.detach()
        return tensors

    def save_adapter(self, model: nn.Module, directory: str, base_digests: dict[str, str]) -> dict[str, Any]:
        from peft import PrefixTuningConfig

        encoder = _encoder_of(model)
        opts: PrefixOptions = self.options
        config = PrefixTuningConfig(
            task_type=encoder.task_type,
            num_virtual_tokens=encoder.num_virtual_tokens,
            num_layers=encoder.num_layers,
            token_dim=encoder.token_dim,
            num_attention_heads=encoder.heads,
            num_transformer_submodules=1,
            prefix_projection=opts.prefix_projection,
            encoder_hidden_size=encoder.projection_hidden_size or getattr(model.config, "hidden_size", None),
            modules_to_save=encoder.head_names or None,
            base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
            inference_mode=True,
        )
        config.save_pretrained(directory)
        write_safetensors(self._peft_tensors(model), os.path.join(directory, PEFT_TENSORS_FILE))
        facts = {"format": "peft", "peft_type": self.peft_type, "prefix_injection": encoder.injection}
        if encoder.injection == SCORES:
            # the file holds the same per-layer keys and values peft's would; but peft hands them to
            # the model as past_key_values, which an attention that scores itself never takes
            facts["peft_compatibility"] = (
                "prefixes in peft's format, but peft's PrefixTuning cannot apply them "
                "to this model (its attention takes no past_key_values): load with peftkit"
            )
        return facts

    def load_adapter(self, model: nn.Module, directory: str, metadata: dict[str, Any]) -> None:
        import torch

        tensors = read_peft_adapter(directory, self.name, self.peft_type)
        expected = self._peft_tensors(model)
        check_tensors_match(expected, tensors, what=f"adapter (strategy {self.name!r})")
        _encoder_of(model).load_table(tensors[PROMPT_KEY])
        with torch.no_grad():
            for key, target in expected.items():
                if key != PROMPT_KEY:
                    target.copy_(tensors[key].to(dtype=target.dtype, device=target.device))


# what the module prefix.py was: its public names, read from here still
__all__ = [
    "ATTENTION_NAME",
    "PROMPT_KEY",
    "SUPPORTED_ATTENTION",
    "PrefixOptions",
    "PrefixTuning",
    "prefixed_attention",
    "probe_scoring_attention",
    "scoring_attention_modules",
    "self_attention_modules",
]
