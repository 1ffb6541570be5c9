"""Finding the parts of a transformer by structure, not by name.

Strategies need to know where the task head is, which modules are the transformer blocks, and
which projection ends each sub-layer. Matching parameter names (``"lora_" in name``) breaks on the
next architecture; these helpers look at the module tree instead and work for BERT, RoBERTa,
DistilBERT, GPT-2 and Llama-style models alike.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


def head_module_names(model: nn.Module) -> list[str]:
    """Top-level modules with parameters outside the pretrained backbone: the new task head
    (``classifier`` for BERT, ``pre_classifier`` + ``classifier`` for DistilBERT, ``score`` for
    GPT-2 and Llama)."""
    backbone = getattr(model, "base_model_prefix", "")
    return [
        name for name, child in model.named_children() if name != backbone and any(True for _ in child.parameters())
    ]


def transformer_blocks(model: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """The list of transformer blocks: the longest ``nn.ModuleList`` whose entries share one class
    (``encoder.layer`` in BERT, ``transformer.layer`` in DistilBERT, ``h`` in GPT-2, ``layers`` in
    Llama). Returns its qualified name and the blocks, or None when the model has none."""
    from torch import nn as tnn

    best: tuple[str, list[tnn.Module]] | None = None
    for name, module in model.named_modules():
        if isinstance(module, tnn.ModuleList) and len(module) > 0:
            kinds = {type(m) for m in module}
            has_params = any(True for _ in module.parameters())
            if len(kinds) == 1 and has_params and (best is None or len(module) > len(best[1])):
                best = (name, list(module))
    return best


def out_features(module: nn.Module) -> int | None:
    """Output width of a linear layer (``nn.Linear`` or GPT-2's transposed ``Conv1D``)."""
    from torch import nn as tnn

    if isinstance(module, tnn.Linear):
        return module.out_features
    if type(module).__name__ == "Conv1D":
        return int(module.nf)
    return None


def sublayer_outputs(block: nn.Module, hidden_size: int) -> tuple[str | None, str | None]:
    """Names (within ``block``) of the projection that ends the attention sub-layer and the one
    that ends the feed-forward sub-layer: the last linear layer of width ``hidden_size`` inside the
    attention module, and the last one outside it (registration order follows the forward order
    in every architecture we support)."""
    attention = next((n for n, m in block.named_modules() if n and "attention" in type(m).__name__.lower()), None)
    attn_out = ffn_out = None
    for name, module in block.named_modules():
        if out_features(module) != hidden_size:
            continue
        inside = attention is not None and (name == attention or name.startswith(attention + "."))
        if inside:
            attn_out = name
        else:
            ffn_out = name
    return attn_out, ffn_out


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    """Replace the submodule at dotted path ``name``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)
