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
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

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
            raise PeftkitError(
                f"prefix option num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens}"
            )
        if self.projection_hidden_size is not None and self.projection_hidden_size < 1:
            raise PeftkitError(
                f"prefix option projection_hidden_size must be positive, got {self.projection_hidden_size}"
            )


# -- the prefixes -----------------------------------------------------------------------------


def _prefix_encoder(
    num_virtual_tokens: int,
    num_layers: int,
    heads: int,
    head_dim: int,
    projection_hidden_size: int | None,
    task_type: str,
    head_names: list[str],
    device: Any,
) -> nn.Module:
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
                self.transform = nn.Sequential(
                    nn.Linear(token_dim, projection_hidden_size, device=device),
                    nn.Tanh(),
                    nn.Linear(projection_hidden_size, width, device=device),
                )

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
            raise PeftkitError(
                f"strategy 'prefix' cannot handle {type(module).__name__}: no eager attention "
                "function found beside it; use attn_implementation 'sdpa'"
            )
        return eager
    if implementation not in SUPPORTED_ATTENTION:
        raise PeftkitError(
            f"strategy 'prefix' supports the attention implementations "
            f"{', '.join(SUPPORTED_ATTENTION)}, not {implementation!r}"
        )
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _extend_mask(
    mask: torch.Tensor | None, num_prefix: int, query: torch.Tensor, key: torch.Tensor, causal: bool
) -> torch.Tensor | None:
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


def prefixed_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """Attention with the module's prefix in front of its keys and values (the function
    registered as ``peftkit_prefix``; the module's config is a ``_PrefixedConfig``)."""
    import torch

    view = module.config
    inner = _inner_attention(module, view._peftkit_config._attn_implementation)
    prefix_key, prefix_value = view._peftkit_encoder.layer(view._peftkit_layer)
    batch, heads, _, head_dim = key.shape
    if (prefix_key.shape[0], prefix_key.shape[-1]) != (heads, head_dim):
        raise PeftkitError(
            f"strategy 'prefix' built {prefix_key.shape[0]} heads x {prefix_key.shape[-1]} for "
            f"{type(module).__name__}, whose keys have {heads} x {head_dim}"
        )
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


def _dispatches(module: nn.Module) -> bool:
    """Whether ``module`` can be routed: it reads the attention implementation from its config,
    and its code can call transformers' attention functions (its modeling module imports them).
    DeBERTa's attention keeps a config too, yet computes its scores itself: routing it would be
    a silent no-op."""
    code = sys.modules.get(type(module).__module__)
    return hasattr(getattr(module, "config", None), "_attn_implementation") and hasattr(code, "ALL_ATTENTION_FUNCTIONS")


def self_attention_modules(blocks: list[nn.Module]) -> list[nn.Module] | None:
    """The self-attention module of each block: the innermost module whose class is an attention
    and which dispatches through the config (``BertSelfAttention``, ``DistilBertSelfAttention``,
    ``GPT2Attention``, ``LlamaAttention``). None unless every block has exactly one."""
    found = []
    for block in blocks:
        candidates = [m for m in block.modules() if "attention" in type(m).__name__.lower() and _dispatches(m)]
        innermost = [m for m in candidates if not any(c is not m for c in m.modules() if c in candidates)]
        if len(innermost) != 1:
            return None
        found.append(innermost[0])
    return found


# -- attention that computes its scores itself ------------------------------------------------
#
# Some encoders (MPNet, Megatron-BERT, RemBERT) multiply queries by keys in their own forward
# instead of calling one of transformers' attention functions, so there is no function to route.
# Their prefix goes in through the module's inputs instead: the attention runs on
# ``[P zero rows; hidden states]``, the key and value projections' outputs for those P rows are
# replaced by the layer's prefix, every score mask or bias gets P visible columns (rows too where
# it has one per query), and the P extra rows of the output are dropped. The real queries then see
# exactly ``softmax(q [prefix_keys; keys] + [0; bias + mask]) [prefix_values; values]``: prefix
# tuning. What the extra rows cost is P more queries per layer.

#: arguments that must be empty: a prefix of cross-attention or of a decoder's cache is not built here
_EMPTY_ARGUMENTS = (
    "encoder_hidden_states",
    "encoder_attention_mask",
    "past_key_value",
    "past_key_values",
    "layer_past",
    "cache",
    "cache_position",
)  # "cache": transformers 5.25's name for the cache
#: arguments that are flags, not tensors of the sequence
_FLAG_ARGUMENTS = ("output_attentions", "use_cache")


def _is_scores_term(name: str) -> bool:
    """Whether an argument of an attention's forward is added to its scores (an attention mask, a
    relative position bias): the only tensors of the sequence this path knows how to extend."""
    return "mask" in name or "bias" in name


def _projections(attention: nn.Module, hidden: int, width: int) -> list[nn.Module]:
    """The module's own query, key and value projections: its direct ``nn.Linear`` children from
    the hidden size to ``width`` (heads x head size), in registration order, which is the forward
    order ``q, k, v`` in every attention that has them (the probe checks key and value matter)."""
    from torch import nn as tnn

    return [
        m
        for m in attention.children()
        if isinstance(m, tnn.Linear) and m.in_features == hidden and m.out_features == width
    ][:3]


def _unextendable_arguments(attention: nn.Module) -> list[str]:
    """Arguments of the module's forward, after the hidden states, that carry something a prefix
    would have to be put into but this path cannot (rotary tables, relative positions, a second
    input): everything but score masks and biases, flags and what must be empty."""
    import inspect

    params = list(inspect.signature(attention.forward).parameters.values())[1:]
    return [
        p.name
        for p in params
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        and not _is_scores_term(p.name)
        and p.name not in _EMPTY_ARGUMENTS + _FLAG_ARGUMENTS
    ]


def scoring_attention_modules(blocks: list[nn.Module], hidden: int, width: int) -> tuple[list[nn.Module], str | None]:
    """The self-attention module of each block that computes its scores itself: the module whose
    class is an attention and which owns query, key and value projections. Returns the modules
    (empty where a block has not exactly one) and why they cannot take a prefix, or None."""
    found = []
    for block in blocks:
        candidates = [
            m
            for m in block.modules()
            if "attention" in type(m).__name__.lower() and len(_projections(m, hidden, width)) == 3
        ]
        if len(candidates) != 1:
            return [], (
                "no self-attention module in its blocks calls transformers' attention functions or has "
                "its own query, key and value projections"
            )
        found.append(candidates[0])
    others = _unextendable_arguments(found[0])
    if others:
        return [], (
            f"its attention {type(found[0]).__name__} takes {', '.join(map(repr, others))}, "
            "which a prefix cannot be put into"
        )
    return found, None


class _ScoresPrefix:
    """The hooks that put one layer's prefix into an attention that computes its scores itself.
    Holds the encoder by reference (a module attribute would repeat its parameters in every
    layer's state dict); the state of one forward lives here between the hooks."""

    def __init__(
        self,
        attention: nn.Module,
        key: nn.Module,
        value: nn.Module,
        num_prefix: int,
        encoder: nn.Module | None = None,
        layer: int = 0,
    ) -> None:
        """Hooks on ``attention`` and its ``key`` and ``value`` projections for ``num_prefix``
        virtual tokens, taken from layer ``layer`` of ``encoder`` (None: the probe's own)."""
        import inspect

        self.attention, self.encoder, self.layer = attention, encoder, layer
        self.num_prefix, self.width = num_prefix, key.out_features
        self.signature = inspect.signature(attention.forward)
        self.hidden_name = next(iter(self.signature.parameters))
        self.enabled = True  # False only in the probe: the module as it was
        self.visible = True  # False only in the probe: the prefix is masked out
        self.replacement: tuple[torch.Tensor, torch.Tensor] | None = None  # the probe's own prefixes
        self.filler: torch.Tensor | None = None  # the probe's content of the extra rows (else zeros)
        self._extended: torch.Tensor | None = None
        self._prefixes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._used: set[int] = set()
        self._handles = [
            attention.register_forward_pre_hook(self.before, with_kwargs=True),
            attention.register_forward_hook(self.after, with_kwargs=True),
            key.register_forward_hook(self._projected(0)),
            value.register_forward_hook(self._projected(1)),
        ]

    def remove(self) -> None:
        """Take the hooks off again (after the probe)."""
        for handle in self._handles:
            handle.remove()

    def _layer_prefixes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's key and value prefixes as the projections output them: ``[P, heads * head_dim]``."""
        if self.replacement is not None:
            return self.replacement
        key, value = self.encoder.layer(self.layer)  # each [heads, P, head_dim]
        return (key.transpose(0, 1).reshape(self.num_prefix, -1), value.transpose(0, 1).reshape(self.num_prefix, -1))

    def before(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Prepend P zero rows to the hidden states and P visible columns to every score term."""
        self._extended = None
        if not self.enabled:
            return args, kwargs
        bound = self.signature.bind(*args, **kwargs)
        hidden = bound.arguments[self.hidden_name]
        length = hidden.shape[1]
        for name, value in list(bound.arguments.items()):
            if name == self.hidden_name:
                continue
            if isinstance(value, dict):  # **kwargs: the same rules, name by name
                bound.arguments[name] = {k: self._extended_argument(k, v, length) for k, v in value.items()}
            else:
                bound.arguments[name] = self._extended_argument(name, value, length)
        # what the extra rows hold reaches nothing but the dropped queries (the probe checks it)
        rows = self.filler
        if rows is None:
            rows = hidden.new_zeros(hidden.shape[0], self.num_prefix, hidden.shape[2])
        self._extended = _cat_rows(rows, hidden)
        bound.arguments[self.hidden_name] = self._extended
        self._prefixes, self._used = self._layer_prefixes(), set()
        return bound.args, bound.kwargs

    def _extended_argument(self, name: str, value: Any, length: int) -> Any:
        import torch

        if name in _EMPTY_ARGUMENTS and value is not None:
            raise PeftkitError(
                f"strategy 'prefix' puts prefixes in self-attention only; "
                f"{type(self.attention).__name__} was given {name}"
            )
        if not torch.is_tensor(value) or not _is_scores_term(name):
            return value
        return _extend_scores_term(
            value, self.num_prefix, length, self.visible, f"{type(self.attention).__name__}'s {name}"
        )

    def _projected(self, which: int) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            if self._extended is None or not args or args[0] is not self._extended:
                return output  # called on something else (not this layer's own hidden states)
            self._used.add(which)
            prefix = self._prefixes[which].to(output.dtype)
            return _cat_rows(prefix.unsqueeze(0).expand(output.shape[0], -1, -1), output[:, self.num_prefix :])

        return hook

    def after(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        """Drop the P prefix rows from what the attention returns; refuse if the prefix did not
        reach both projections (a model whose attention projects something else)."""
        extended, used = self._extended, self._used
        self._extended, self._prefixes = None, None
        if extended is None:
            return output
        if used != {0, 1}:
            raise PeftkitError(
                f"strategy 'prefix' could not put prefixes into {type(module).__name__}: its key and "
                "value projections were not applied to its hidden states"
            )
        return _drop_prefix_rows(output, self.num_prefix, extended.shape[1])


def _cat_rows(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([first, second], dim=1)


def _extend_scores_term(term: torch.Tensor, num_prefix: int, length: int, visible: bool, what: str) -> torch.Tensor:
    """A mask or bias added to scores ``[batch, heads or 1, queries or 1, keys]`` for keys
    ``[prefix; keys]``: P columns every query sees (0 added, or True), and P rows for the prefix's
    own queries where it has one row per query (their output is dropped; any value would do).
    ``visible=False`` hides the prefix instead (the probe's control)."""
    import torch

    if term.dim() != 4 or term.shape[-1] != length:
        if term.dim() >= 2 and term.shape[-1] == length:
            raise PeftkitError(
                f"strategy 'prefix' cannot extend {what} of shape {tuple(term.shape)}: "
                "it expects a 4D mask or bias added to the attention scores"
            )
        return term  # broadcast over the keys, or not of the sequence: the same for the prefix
    if term.dtype == torch.bool:
        fill = visible
    elif term.is_floating_point():
        fill = 0.0 if visible else torch.finfo(term.dtype).min
    else:
        raise PeftkitError(f"strategy 'prefix' cannot extend {what} of dtype {term.dtype}")
    columns = torch.full((*term.shape[:-1], num_prefix), fill, dtype=term.dtype, device=term.device)
    term = torch.cat([columns, term], dim=-1)
    if term.shape[-2] == length:
        rows = torch.full((*term.shape[:-2], num_prefix, term.shape[-1]), fill, dtype=term.dtype, device=term.device)
        term = torch.cat([rows, term], dim=-2)
    return term


def _drop_prefix_rows(output: Any, num_prefix: int, extended_length: int) -> Any:
    """The attention's output without the prefix's own queries: hidden states ``[batch, P + n,
    width]`` lose their first P rows, attention weights ``[batch, heads, P + n, P + n]`` their
    first P query rows (they keep the prefix columns, as weights over a cache do)."""
    if isinstance(output, (tuple, list)):
        return type(output)(_drop_prefix_rows(o, num_prefix, extended_length) for o in output)
    shape = getattr(output, "shape", None)
    if shape is None:
        return output
    if len(shape) == 3 and shape[1] == extended_length:
        return output[:, num_prefix:]
    if len(shape) == 4 and shape[-2] == extended_length:
        return output[..., num_prefix:, :]
    return output


def _first_tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def probe_scoring_attention(hooks: _ScoresPrefix, hidden: int) -> str | None:
    """Why prefixes put in by ``hooks`` would not act as prefix tuning on their attention, or None
    where they do. Runs the module alone on 3 random positions (its own random generator, eval
    mode: the global seed and the module's state stay as they were, so ``prepare`` remains
    deterministic), and checks what structure alone cannot tell:

    * a prefix the mask hides, on extra rows of random content, leaves the output as it was, so
      positions meet only through the scores (a convolution over the sequence, as in ConvBERT,
      would see the extra rows);
    * another key prefix, and another value prefix, each change the output: both projections
      found are the ones whose outputs are scored and averaged, in that order.
    """
    import torch

    attention = hooks.attention
    name = type(attention).__name__
    floats = [p for p in attention.parameters() if p.is_floating_point()]
    if not floats or floats[0].device.type == "meta":
        return None  # nothing to run on (shapes only): structure is all there is
    mask_name = next((n for n in hooks.signature.parameters if "mask" in n and n not in _EMPTY_ARGUMENTS), None)
    if mask_name is None:
        return f"its attention {name} takes no attention mask"
    device, dtype = floats[0].device, floats[0].dtype
    generator = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(device, dtype)

    width = hooks.width
    inputs = {hooks.hidden_name: rand(1, 3, hidden), mask_name: torch.zeros(1, 1, 1, 3, device=device, dtype=dtype)}
    keys, values = (rand(hooks.num_prefix, width), rand(hooks.num_prefix, width)), (rand(hooks.num_prefix, width),) * 2
    values = (values[0], rand(hooks.num_prefix, width))

    filler = rand(1, hooks.num_prefix, hidden)

    def run(prefix: tuple[torch.Tensor, torch.Tensor] | None, visible: bool = True) -> torch.Tensor:
        hooks.enabled, hooks.replacement, hooks.visible = prefix is not None, prefix, visible
        hooks.filler = None if visible else filler
        return _first_tensor(attention(**inputs)).float()

    modes = {m: m.training for m in attention.modules()}
    attention.eval()  # no dropout: outputs comparable, no random numbers drawn
    try:
        with torch.no_grad():
            plain, hidden_prefix = run(None), run((keys[0], values[0]), visible=False)
            both, other_key, other_value = (
                run((keys[0], values[0])),
                run((keys[1], values[0])),
                run((keys[0], values[1])),
            )
    except Exception as exc:  # noqa: BLE001 - any failure means: this attention does not take the prefix
        first_line = (str(exc).splitlines() or [""])[0]
        return f"its attention {name} failed with a prefix ({type(exc).__name__}: {first_line})"
    finally:
        hooks.enabled, hooks.replacement, hooks.visible, hooks.filler = True, None, True, None
        for module, mode in modes.items():
            module.training = mode
    tolerance = (1e-4 if dtype == torch.float32 else 2e-2) * (1 + float(plain.abs().max()))
    if float((hidden_prefix - plain).abs().max()) > tolerance:
        return f"its attention {name} mixes positions outside its scores (a masked prefix changed its output)"
    if min(float((both - other_key).abs().max()), float((both - other_value).abs().max())) <= tolerance:
        return f"its attention {name} does not score and average the outputs of its key and value projections"
    return None


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
        elif (
            "inv_freq" in dict(module.named_buffers(recurse=False))
            and "position_ids" in inspect.signature(module.forward).parameters
        ):
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
            raise PeftkitError(
                f"strategy 'prefix': {offset} virtual tokens + {args[0].shape[-1]} tokens exceed the "
                f"model's {module.num_embeddings} positions; lower --max-length or num_virtual_tokens"
            )
        return (positions, *args[1:])

    return hook


def _shift_rotary_positions(offset: int) -> Callable[..., Any]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + offset}
        elif len(args) > 1:
            args = (args[0], args[1] + offset, *args[2:])
        return args, kwargs

    return hook


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
    from ..structure import transformer_blocks

    found = transformer_blocks(model)
    if not found:
        raise _refusal(model, "no transformer blocks found")
    dispatching = self_attention_modules(found[1])
    if dispatching:
        return INTERFACE, dispatching
    scoring, reason = scoring_attention_modules(found[1], hidden, width)
    if scoring:
        hooks = _ScoresPrefix(scoring[0], *_projections(scoring[0], hidden, width)[1:], num_prefix)
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
        encoder = _prefix_encoder(
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
        tables, rotary = _position_modules(model, exclude=None)
        for table in tables:
            table.register_forward_pre_hook(_shift_table_positions(opts.num_virtual_tokens))
        for module in rotary:
            module.register_forward_pre_hook(_shift_rotary_positions(opts.num_virtual_tokens), with_kwargs=True)
        if injection == INTERFACE:
            _register_attention()
            for index, attention in enumerate(attentions):
                attention.config = _PrefixedConfig(attention.config, encoder, index)
        else:
            for index, attention in enumerate(attentions):
                _ScoresPrefix(
                    attention,
                    *_projections(attention, hidden, kv_heads * head_dim)[1:],
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
