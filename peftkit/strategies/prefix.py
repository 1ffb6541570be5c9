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

The result is peft's computation: the same prefix weights give the same logits where peft's own
prefix tuning runs (tested), and adapters are saved in peft's format (``adapter_config.json`` and
``adapter_model.safetensors`` with ``prompt_embeddings`` and ``base_model.<head>...``), so plain peft
loads them where it runs, and peftkit loads them on any model it supports.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..adapter_io import PEFT_TENSORS_FILE, read_peft_adapter, write_safetensors
from ..errors import PeftkitError
from ..registry import register_strategy
from .base import Strategy, TaskSpec, TrainingDefaults, check_tensors_match

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

#: the name under which the prefix-aware attention function is registered with transformers
ATTENTION_NAME = "peftkit_prefix"
#: attention implementations the prefix can be put in front of (both take an explicit 4D mask)
SUPPORTED_ATTENTION = ("sdpa", "eager")
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
            raise PeftkitError(f"prefix option num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}")
        if self.projection_hidden_size is not None and self.projection_hidden_size < 1:
            raise PeftkitError(f"prefix option projection_hidden_size must be positive, got {self.projection_hidden_size}")


# -- the prefixes -----------------------------------------------------------------------------

def _prefix_encoder(num_virtual_tokens: int, num_layers: int, heads: int, head_dim: int,
                    projection_hidden_size: int | None, task_type: str, head_names: list[str],
                    device: Any) -> nn.Module:
    """The module that holds (or computes) every layer's prefix, laid out as peft's
    ``PrefixEncoder``: one row per virtual token, ``num_layers * 2 * heads * head_dim`` wide, layer
    ``l``'s key at block ``2l`` and its value at ``2l + 1``. Built in peft's order (embedding, then
    the MLP), so a seed initialises it as peft would."""
    import torch
    from torch import nn

    token_dim = heads * head_dim
    width = num_layers * 2 * token_dim

    class PrefixEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
            self.heads, self.head_dim, self.token_dim = heads, head_dim, token_dim
            self.task_type, self.head_names = task_type, list(head_names)
            self.projection_hidden_size = projection_hidden_size
            if projection_hidden_size is None:
                self.embedding = nn.Embedding(num_virtual_tokens, width, device=device)
            else:
                self.embedding = nn.Embedding(num_virtual_tokens, token_dim, device=device)
                self.transform = nn.Sequential(nn.Linear(token_dim, projection_hidden_size, device=device), nn.Tanh(),
                                               nn.Linear(projection_hidden_size, width, device=device))

        def table(self) -> torch.Tensor:
            """Every layer's prefixes: ``[num_virtual_tokens, num_layers * 2 * token_dim]``."""
            if hasattr(self, "transform"):
                return self.transform(self.embedding.weight)
            return self.embedding.weight

        def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Layer ``index``'s key and value prefixes, each ``[heads, num_virtual_tokens, head_dim]``.
            Computed at each call (not cached between calls), so gradient checkpointing can
            recompute a block's forward from the parameters alone."""
            blocks = self.table().view(num_virtual_tokens, num_layers * 2, heads, head_dim)
            return blocks[:, 2 * index].transpose(0, 1), blocks[:, 2 * index + 1].transpose(0, 1)

        def load_table(self, table: torch.Tensor) -> None:
            """Put saved prefixes back. A reparametrised encoder is replaced by the table its MLP
            produced (what peft saves): the MLP cannot be recovered from its output, nor is it
            needed to predict."""
            with torch.no_grad():
                if hasattr(self, "transform"):
                    del self.transform
                    self.embedding = nn.Embedding(num_virtual_tokens, width, device=self.embedding.weight.device)
                self.embedding.weight.copy_(table.to(self.embedding.weight.device, self.embedding.weight.dtype))

    return PrefixEncoder()


# -- routing attention through the prefix -----------------------------------------------------

class _PrefixedConfig:
    """One self-attention module's view of the model config: ``_attn_implementation`` names the
    prefix-aware attention function, everything else reads and writes the model's own config (so
    ``model.set_attn_implementation`` still chooses what runs underneath). Also carries the
    encoder and the layer index, which must not be attributes of the attention module itself
    (registered there, the encoder's parameters would appear once per layer in a state dict)."""

    _attn_implementation = ATTENTION_NAME

    def __init__(self, config: Any, encoder: nn.Module, layer: int) -> None:
        object.__setattr__(self, "_peftkit_config", config)
        object.__setattr__(self, "_peftkit_encoder", encoder)
        object.__setattr__(self, "_peftkit_layer", layer)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name.startswith("_peftkit_"):  # copy/pickle probes, half-built views
            raise AttributeError(name)
        return getattr(self._peftkit_config, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._peftkit_config, name, value)


def _inner_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    """The attention function the model would have called: its own module's eager function (what
    transformers falls back to for ``eager``), or the registered one."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation == "eager":
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise PeftkitError(f"strategy 'prefix' cannot handle {type(module).__name__}: no eager attention "
                               "function found beside it; use attn_implementation 'sdpa'")
        return eager
    if implementation not in SUPPORTED_ATTENTION:
        raise PeftkitError(f"strategy 'prefix' supports the attention implementations "
                           f"{', '.join(SUPPORTED_ATTENTION)}, not {implementation!r}")
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _extend_mask(mask: torch.Tensor | None, num_prefix: int, query: torch.Tensor, key: torch.Tensor,
                 causal: bool) -> torch.Tensor | None:
    """The attention mask for keys ``[prefix; key]``: prefix columns visible to every query.

    ``mask`` is what the model built for the real keys: a boolean (True = attend; sdpa) or additive
    float (0 = attend; eager) tensor ``[batch, 1 or heads, queries, keys]``, or None where the model
    relies on sdpa's ``is_causal`` or needs no mask. A causal None becomes an explicit mask here,
    aligned to the end (the queries are the last ``queries`` of the real keys, as with a cache),
    because sdpa's own ``is_causal`` would align it to the start and hide the real keys' end.
    """
    import torch

    q_len, kv_len = query.shape[-2], key.shape[-2]
    if mask is None:
        if not (causal and q_len > 1):
            return None  # every query sees every key, prefix included
        rows = torch.arange(q_len, device=query.device)[:, None] + (kv_len - q_len)
        mask = (torch.arange(kv_len, device=query.device)[None, :] <= rows)[None, None]
    if mask.dim() != 4:
        raise PeftkitError(f"strategy 'prefix' expected a 4D attention mask, got shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        visible = mask.new_ones(*mask.shape[:-1], num_prefix)
    else:
        visible = mask.new_zeros(*mask.shape[:-1], num_prefix)
    return torch.cat([visible, mask], dim=-1)


def prefixed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Attention with the module's prefix in front of its keys and values (the function
    registered as ``peftkit_prefix``; the module's config is a ``_PrefixedConfig``)."""
    import torch

    view = module.config
    inner = _inner_attention(module, view._peftkit_config._attn_implementation)
    prefix_key, prefix_value = view._peftkit_encoder.layer(view._peftkit_layer)
    batch, heads, _, head_dim = key.shape
    if (prefix_key.shape[0], prefix_key.shape[-1]) != (heads, head_dim):
        raise PeftkitError(f"strategy 'prefix' built {prefix_key.shape[0]} heads x {prefix_key.shape[-1]} for "
                           f"{type(module).__name__}, whose keys have {heads} x {head_dim}")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal  # sdpa's own default
    mask = _extend_mask(attention_mask, prefix_key.shape[1], query, key, bool(causal))
    # like peft, which casts its cache to the base model's dtype: bf16 keys get bf16 prefixes
    key = torch.cat([prefix_key.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix_value.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
    return inner(module, query, key, value, mask, **kwargs)


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, prefixed_attention)


def self_attention_modules(blocks: list[nn.Module]) -> list[nn.Module] | None:
    """The self-attention module of each block: the innermost module whose class is an attention
    and which dispatches through the config (``BertSelfAttention``, ``DistilBertSelfAttention``,
    ``GPT2Attention``, ``LlamaAttention``). None unless every block has exactly one."""
    found = []
    for block in blocks:
        candidates = [m for m in block.modules()
                      if "attention" in type(m).__name__.lower() and hasattr(getattr(m, "config", None),
                                                                             "_attn_implementation")]
        innermost = [m for m in candidates if not any(c is not m for c in m.modules() if c in candidates)]
        if len(innermost) != 1:
            return None
        found.append(innermost[0])
    return found


# -- positions --------------------------------------------------------------------------------

def _position_modules(model: nn.Module, exclude: nn.Module | None) -> tuple[list[nn.Module], list[nn.Module]]:
    """Where positions enter the model: absolute position tables (an ``nn.Embedding`` with
    ``max_position_embeddings`` rows that is not the token embedding) and rotary embeddings (a
    module with an ``inv_freq`` buffer whose forward takes ``position_ids``)."""
    import inspect

    from torch import nn as tnn

    limit = getattr(model.config, "max_position_embeddings", None)
    tokens = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tables, rotary = [], []
    for module in model.modules():
        if module is tokens or module is exclude:
            continue
        if isinstance(module, tnn.Embedding) and limit is not None and module.num_embeddings == limit:
            tables.append(module)
        elif "inv_freq" in dict(module.named_buffers(recurse=False)) and \
                "position_ids" in inspect.signature(module.forward).parameters:
            rotary.append(module)
    return tables, rotary


def _shift_table_positions(offset: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        import torch

        positions = args[0] + offset
        if module.padding_idx is not None:
            # RoBERTa gives padding the table's padding index, which a cache does not move
            positions = positions.masked_fill(args[0] == module.padding_idx, module.padding_idx)
        # (a value-dependent check: an ONNX export traces without values, and checks its inputs instead)
        if not torch.compiler.is_compiling() and positions.numel() and int(positions.max()) >= module.num_embeddings:
            raise PeftkitError(f"strategy 'prefix': {offset} virtual tokens + {args[0].shape[-1]} tokens exceed the "
                               f"model's {module.num_embeddings} positions; lower --max-length or num_virtual_tokens")
        return (positions, *args[1:])

    return hook


def _shift_rotary_positions(offset: int) -> Callable[..., Any]:
    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + offset}
        elif len(args) > 1:
            args = (args[0], args[1] + offset, *args[2:])
        return args, kwargs

    return hook


# -- the strategy -----------------------------------------------------------------------------

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
        return {**cls.training_space(trial, defaults),
                "num_virtual_tokens": trial.suggest_int("num_virtual_tokens", 5, 40, log=True)}
    supports_quantized_base = True  # the base stays frozen; only the prefixes and the head train
    #: a plain peft adapter directory is matched to this strategy by peft's ``peft_type``
    peft_type = "PREFIX_TUNING"

    @classmethod
    def options_from_peft_config(cls, config: dict[str, Any]) -> PrefixOptions:
        """This strategy's options from a peft ``adapter_config.json`` (for plain peft adapters)."""
        return PrefixOptions(num_virtual_tokens=int(config["num_virtual_tokens"]),
                             prefix_projection=bool(config.get("prefix_projection")),
                             projection_hidden_size=config.get("encoder_hidden_size") if config.get("prefix_projection") else None)

    def prepare(self, model: nn.Module, task: TaskSpec) -> nn.Module:
        from ..structure import transformer_blocks

        opts: PrefixOptions = self.options
        if task.peft_task_type is None:
            # the saved format is peft's, which knows prefix tuning for text tasks only
            raise PeftkitError(f"strategy 'prefix' cannot handle task {task.kind!r}: prefix tuning needs a "
                               "text model that takes past keys and values; use lora or adapter")
        config = model.config
        model_type = getattr(config, "model_type", type(model).__name__)
        found = transformer_blocks(model)
        attentions = self_attention_modules(found[1]) if found else None
        hidden = getattr(config, "hidden_size", None)
        heads = getattr(config, "num_attention_heads", None)
        if not attentions or hidden is None or heads is None:
            raise PeftkitError(f"strategy 'prefix' cannot handle model type {model_type!r}: no self-attention "
                               "module that dispatches through transformers' attention interface found in its blocks")
        # grouped-query attention keeps fewer key/value heads: the prefix has as many (as in peft)
        head_dim = getattr(config, "head_dim", None) or hidden // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_names = task.heads(model)
        model.requires_grad_(False)
        param = next(model.parameters())
        encoder = _prefix_encoder(opts.num_virtual_tokens, len(attentions), kv_heads, head_dim,
                                  (opts.projection_hidden_size or hidden) if opts.prefix_projection else None,
                                  task.peft_task_type, head_names, param.device)
        tables, rotary = _position_modules(model, exclude=None)
        for table in tables:
            table.register_forward_pre_hook(_shift_table_positions(opts.num_virtual_tokens))
        for module in rotary:
            module.register_forward_pre_hook(_shift_rotary_positions(opts.num_virtual_tokens), with_kwargs=True)
        _register_attention()
        for index, attention in enumerate(attentions):
            attention.config = _PrefixedConfig(attention.config, encoder, index)
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
        return {"format": "peft", "peft_type": self.peft_type}

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
