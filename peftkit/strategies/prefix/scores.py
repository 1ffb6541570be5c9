"""How a prefix goes into attention that computes its scores itself (MPNet, Megatron-BERT,
RemBERT): hooks that run it on extra rows whose key and value projections are the prefix, and the
probe that checks, once per model, that this acts as prefix tuning."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ...errors import PeftkitError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


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


def projections(attention: nn.Module, hidden: int, width: int) -> list[nn.Module]:
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
            if "attention" in type(m).__name__.lower() and len(projections(m, hidden, width)) == 3
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


class ScoresPrefix:
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


def probe_scoring_attention(hooks: ScoresPrefix, hidden: int) -> str | None:
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
    try:
        plain, hidden_prefix, both, other_key, other_value = _probe_outputs(hooks, hidden, mask_name, floats[0])
    except Exception as exc:  # noqa: BLE001 - any failure means: this attention does not take the prefix
        first_line = (str(exc).splitlines() or [""])[0]
        return f"its attention {name} failed with a prefix ({type(exc).__name__}: {first_line})"
    tolerance = (1e-4 if floats[0].dtype == torch.float32 else 2e-2) * (1 + float(plain.abs().max()))
    if float((hidden_prefix - plain).abs().max()) > tolerance:
        return f"its attention {name} mixes positions outside its scores (a masked prefix changed its output)"
    if min(float((both - other_key).abs().max()), float((both - other_value).abs().max())) <= tolerance:
        return f"its attention {name} does not score and average the outputs of its key and value projections"
    return None


def _probe_outputs(hooks: ScoresPrefix, hidden: int, mask_name: str, like: torch.Tensor) -> list[torch.Tensor]:
    """The probe's five outputs of the attention alone, on 3 random positions (drawn from its own
    generator, in ``like``'s device and dtype; eval mode, restored after): no prefix, a masked-out
    prefix over random extra rows, a prefix, and that prefix with another key, then another value."""
    import torch

    attention = hooks.attention
    device, dtype = like.device, like.dtype
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
            return [
                run(None),
                run((keys[0], values[0]), visible=False),
                run((keys[0], values[0])),
                run((keys[1], values[0])),
                run((keys[0], values[1])),
            ]
    finally:
        hooks.enabled, hooks.replacement, hooks.visible, hooks.filler = True, None, True, None
        for module, mode in modes.items():
            module.training = mode
