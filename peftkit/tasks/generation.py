"""Generation for the causal-LM task: the exact match of each test example's greedy answer with its
reference (``exact_matches``), and ``predict``'s completions: prompts encoded (through the chat
template if asked), generated in left-padded batches (``generate``), an answer read as a label
name (``matching_label``)."""

from __future__ import annotations

import string
from typing import TYPE_CHECKING, Any

from ..errors import PeftkitError
from ..predict_io import GenerationOptions

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

IGNORE = -100  # label of tokens that carry no loss (prompt, padding), as torch's cross-entropy skips


def exact_matches(model: nn.Module, batch: dict[str, torch.Tensor], tokenizer: Any) -> torch.Tensor:
    """1 for each example whose greedy continuation of its prompt is its reference response."""
    import torch

    ids, labels = batch["input_ids"], batch["labels"]
    prompts, references = [], []
    for row_ids, row_labels, row_mask in zip(ids, labels, batch["attention_mask"]):
        real = row_mask.bool()
        row_ids, row_labels = row_ids[real], row_labels[real]
        answer = (row_labels != IGNORE).nonzero()
        start = int(answer[0]) if len(answer) else len(row_labels)
        # an empty prompt (data without one) starts from the end-of-sequence token
        prompts.append(row_ids[:start] if start else row_ids.new_tensor([tokenizer.eos_token_id]))
        references.append(row_labels[row_labels != IGNORE])
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    # generation continues from the last position: prompts are padded on the left
    input_ids = torch.stack(
        [torch.cat([torch.full((width - len(p),), pad, dtype=p.dtype, device=p.device), p]) for p in prompts]
    )
    mask = torch.stack(
        [
            torch.cat(
                [
                    torch.zeros(width - len(p), dtype=torch.long, device=p.device),
                    torch.ones(len(p), dtype=torch.long, device=p.device),
                ]
            )
            for p in prompts
        ]
    )
    new = max(len(r) for r in references)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
    )
    generated = out[:, width:]
    hits = []
    for gen, ref in zip(generated, references):
        text = tokenizer.decode(gen, skip_special_tokens=True).strip()
        hits.append(text == tokenizer.decode(ref, skip_special_tokens=True).strip())
    return torch.tensor(hits, device=ids.device)


def encode_prompts(tok: Any, prompts: list[str], chat: bool, model: str | None) -> list[list[int]]:
    """Token ids of each prompt: as the training data was encoded, or (``chat``) through the
    tokenizer's chat template as the user's turn, with the assistant's turn opened."""
    if not chat:
        return [tok(p, add_special_tokens=True)["input_ids"] or [tok.eos_token_id] for p in prompts]
    if not getattr(tok, "chat_template", None):
        raise PeftkitError(
            f"--chat: the tokenizer of {model!r} has no chat template; leave out --chat to give the prompts as they are"
        )
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in prompts
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]  # the template has its own


def generate(
    model: nn.Module, tok: Any, encoded: list[list[int]], new_tokens: int, generation: GenerationOptions
) -> Any:
    """The generated token ids of each (left-padded) prompt of one batch."""
    import torch

    width = max(len(e) for e in encoded)
    ids = torch.tensor([[tok.pad_token_id] * (width - len(e)) + e for e in encoded])
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    sampling = {
        k: v for k, v in (("temperature", generation.temperature), ("top_p", generation.top_p)) if v is not None
    }
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new_tokens,
            do_sample=generation.do_sample,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            **sampling,
        )
    return gen[:, width:]


_AROUND_AN_ANSWER = string.whitespace + string.punctuation + "\u201c\u201d\u2018\u2019"  # and curly quotes


def matching_label(answer: str, names: list[str]) -> str | None:
    """The label name ``answer`` is, case aside and ignoring surrounding whitespace and punctuation
    (a model answers ``" Positive."`` as readily as ``" positive"``), or None when it is none."""

    def norm(text: str) -> str:
        return text.strip(_AROUND_AN_ANSWER).casefold()

    by_norm = {norm(n): n for n in names}
    return by_norm.get(norm(answer)) if norm(answer) else None
