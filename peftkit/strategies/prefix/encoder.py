"""The module that holds (or computes) every layer's prefix, laid out as peft's ``PrefixEncoder``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from torch import nn


# -- the prefixes -----------------------------------------------------------------------------


def prefix_encoder(
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
    encoder = _encoder_class()(num_virtual_tokens, num_layers, heads, head_dim, projection_hidden_size, device)
    encoder.task_type, encoder.head_names = task_type, list(head_names)
    return encoder


def _encoder_class() -> type[nn.Module]:
    """``PrefixEncoder``, defined where torch is imported (only when a model is prepared)."""
    import torch
    from torch import nn

    class PrefixEncoder(nn.Module):
        def __init__(
            self, num_virtual_tokens: int, num_layers: int, heads: int, head_dim: int, hidden: int | None, device: Any
        ) -> None:
            super().__init__()
            self.num_virtual_tokens, self.num_layers = num_virtual_tokens, num_layers
            self.heads, self.head_dim, self.token_dim = heads, head_dim, heads * head_dim
            self.width = num_layers * 2 * self.token_dim
            self.projection_hidden_size = hidden
            if hidden is None:
                self.embedding = nn.Embedding(num_virtual_tokens, self.width, device=device)
            else:
                self.embedding = nn.Embedding(num_virtual_tokens, self.token_dim, device=device)
                self.transform = nn.Sequential(
                    nn.Linear(self.token_dim, hidden, device=device),
                    nn.Tanh(),
                    nn.Linear(hidden, self.width, device=device),
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
            blocks = self.table().view(self.num_virtual_tokens, self.num_layers * 2, self.heads, self.head_dim)
            return blocks[:, 2 * index].transpose(0, 1), blocks[:, 2 * index + 1].transpose(0, 1)

        def load_table(self, table: torch.Tensor) -> None:
            """Put saved prefixes back. A reparametrised encoder is replaced by the table its MLP
            produced (what peft saves): the MLP cannot be recovered from its output, nor is it
            needed to predict."""
            with torch.no_grad():
                if hasattr(self, "transform"):
                    del self.transform
                    self.embedding = nn.Embedding(
                        self.num_virtual_tokens, self.width, device=self.embedding.weight.device
                    )
                self.embedding.weight.copy_(table.to(self.embedding.weight.device, self.embedding.weight.dtype))

    return PrefixEncoder
