"""How a prefix goes into attention that calls transformers' attention functions (routed through
the module's own view of the config to the function registered as ``peftkit_prefix``), and how the
real tokens' positions move behind the prefix (position tables and rotary embeddings)."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import PeftkitError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


#: the name under which the prefix-aware attention function is registered with transformers
ATTENTION_NAME = "peftkit_prefix"
#: attention implementations the prefix can be put in front of (both take an explicit 4D mask)
SUPPORTED_ATTENTION = ("sdpa", "eager")


# -- routing attention through the prefix -----------------------------------------------------


class PrefixedConfig:
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
    registered as ``peftkit_prefix``; the module's config is a ``PrefixedConfig``)."""
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


def register_attention() -> None:
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


# -- positions --------------------------------------------------------------------------------


def position_modules(model: nn.Module, exclude: nn.Module | None) -> tuple[list[nn.Module], list[nn.Module]]:
    """Where positions enter the model: absolute position tables (an ``nn.Embedding`` with
    ``max_position_embeddings`` rows that is not the token embedding) and rotary embeddings (a
    module with an ``inv_freq`` buffer whose forward takes ``position_ids``)."""
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


def shift_table_positions(offset: int) -> Callable[..., Any]:
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


def shift_rotary_positions(offset: int) -> Callable[..., Any]:
    def hook(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "position_ids" in kwargs:
            kwargs = {**kwargs, "position_ids": kwargs["position_ids"] + offset}
        elif len(args) > 1:
            args = (args[0], args[1] + offset, *args[2:])
        return args, kwargs

    return hook
