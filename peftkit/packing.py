"""Padding-free packing of a causal LM's training examples (``--packing``).

Examples of varied length padded to the longest of their batch spend much of every step on
padding: prompt/response pairs of 20 to 500 tokens, batched 8 at a time, are mostly padding. Packed,
several whole examples share a row of up to ``--max-length`` tokens, and a batch is ``--batch-size``
such rows: far fewer padded positions, so more real tokens a step (TRL's and axolotl's packing).

Each example stays what it was alone:

- **attention stays inside it**: its positions restart at 0 (``position_ids``) and no attention mask
  is passed, from which transformers builds a block-diagonal causal mask
  (``masking_utils.find_packed_sequence_indices``; FlashAttention's variable-length path where the
  model uses it); ``use_cache=False``, since a cache switches that detection off;
- **its loss is its own**: the label of its first token is dropped (position t predicts token t+1,
  and the token before an example's first belongs to another example), as an unpacked example's
  first token predicts nothing either.

So each example's loss equals its unpacked loss (within float noise: tests/test_packing.py). Rows are
filled first-fit decreasing (longest first, each into the first row with room), once, when the
training split is encoded; a run shuffles the rows every epoch as it shuffles examples. Validation
and test are not packed (their metrics are per example).
"""

from __future__ import annotations

from typing import Any

IGNORE = -100  # a label that carries no loss (as torch's cross-entropy skips it)


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` in rows of at most ``capacity`` tokens: longest first, each into the
    first row with room (ties by index, so the same data always packs the same)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than a row's {capacity}")
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(capacity - n)
    return rows


def pack_examples(ds: Any, capacity: int) -> Any:
    """The encoded examples of ``ds`` (``input_ids``, ``labels``, ``example_key``) as packed rows: a
    ``datasets.Dataset`` with ``input_ids``, ``labels`` (each example's first label dropped),
    ``position_ids`` (restarting per example), ``length`` and ``example_key`` (a list per row)."""
    import datasets

    ids, labels, keys = ds["input_ids"], ds["labels"], ds["example_key"]
    out: dict[str, list[Any]] = {"input_ids": [], "labels": [], "position_ids": [], "length": [], "example_key": []}
    for row in first_fit_decreasing([len(x) for x in ids], capacity):
        row_ids, row_labels, row_positions = [], [], []
        for i in row:
            row_ids += ids[i]
            row_labels += [IGNORE, *labels[i][1:]]
            row_positions += list(range(len(ids[i])))
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["position_ids"].append(row_positions)
        out["length"].append(len(row_ids))
        out["example_key"].append([keys[i] for i in row])
    return datasets.Dataset.from_dict(out)


def collate_packed(rows: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
    """A batch of packed rows, padded on the right to the longest; the padding is a sequence of its
    own (positions from 0) that carries no loss. ``real_tokens`` counts the examples' tokens."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)

    def padded(key: str, fill: Any) -> torch.Tensor:
        return torch.stack(
            [torch.cat([torch.as_tensor(r[key], dtype=torch.long), fill(width - len(r[key]))]) for r in rows]
        )

    def constant(value: int) -> Any:
        return lambda n: torch.full((n,), value, dtype=torch.long)

    return {
        "input_ids": padded("input_ids", constant(pad_id)),
        "labels": padded("labels", constant(IGNORE)),
        "position_ids": padded("position_ids", lambda n: torch.arange(n, dtype=torch.long)),
        "use_cache": False,
        "example_key": torch.tensor([int(k) for r in rows for k in r["example_key"]]),
        "real_tokens": sum(len(r["input_ids"]) for r in rows),
    }


def padding_fraction(real_tokens: int, positions: int) -> float | None:
    """The share of a run's batch positions that were padding (None before any batch)."""
    return 1.0 - real_tokens / positions if positions else None
