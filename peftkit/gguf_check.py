"""The check of a GGUF export by llama.cpp itself, against PyTorch.

llama.cpp (``peftkit.llamacpp``) loads the written file (with the LoRA GGUF, for ``--lora-only``)
and must, on every check prompt:

- tokenize it into the ids transformers' tokenizer gives (the prompts hold digits, ``$``, ``(``
  and non-ASCII text, which a missing or wrong ``tokenizer.ggml.pre`` splits otherwise);
- continue it greedily (float32, temperature 0) with PyTorch's ``CHECK_NEW_TOKENS`` tokens, each
  as probable as in PyTorch within ``LOGPROB_TOLERANCE`` (a misplaced tensor moves the
  probabilities even where the greedy tokens happen to stay); where llama.cpp stops early at an
  end-of-generation token, that token is PyTorch's too;
- log no warning or error while it loads and runs the file.

PyTorch's side is a plain greedy loop over the model (no stopping at end of sequence: llama.cpp
decides where it stops, and each token it gives is compared).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import PeftkitError
from .llamacpp import LlamaCppRun, run_llamacpp

CHECK_PROMPTS = (
    "The capital of France is",
    "Once upon a time,",
    "def fibonacci(n):",
    "It costs $12,345 (about 10%) — a naïve café in Zürich, 東京.",
)
"""Fixed prompts; the last one holds what pre-tokenizers split differently: digits, ``$``, ``(``,
punctuation and non-ASCII letters."""
CHECK_NEW_TOKENS = 16
LOGPROB_TOLERANCE = 5e-3
"""Largest difference in a generated token's log-probability between llama.cpp and PyTorch: the
same float32 weights, summed in another order through every layer, measured up to 2.1e-4 (a tiny
Llama) and 2.8e-4 (SmolLM2-135M, 30 layers); a wrong tensor moves them by tenths or more."""

Echo = Callable[[str], None]


@dataclass
class Greedy:
    """PyTorch's side: each prompt's token ids, its greedy tokens and their log-probabilities."""

    prompt_ids: list[list[int]]
    generated: list[list[int]]
    logprobs: list[list[float]]


def check_prompts(metadata: dict[str, Any]) -> list[str]:
    """``CHECK_PROMPTS``, and one in the adapter's prompt template where it learned one."""
    template = metadata.get("prompt_template")
    return list(CHECK_PROMPTS) + ([template.format(text="A quietly devastating film.")] if template else [])


def greedy_reference(model: Any, tokenizer: Any, prompts: list[str], new_tokens: int = CHECK_NEW_TOKENS) -> Greedy:
    """``model``'s greedy continuation of each of ``prompts`` (``new_tokens`` tokens, the most
    probable each time, never stopping early) with each token's log-probability."""
    import torch

    prompt_ids, generated, logprobs = [], [], []
    with torch.no_grad():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
            out, probs, past, step = [], [], None, ids
            for _ in range(new_tokens):
                result = model(input_ids=step, past_key_values=past, use_cache=True)
                past = result.past_key_values
                scores = torch.log_softmax(result.logits[0, -1].float(), dim=-1)
                token = int(scores.argmax())
                out.append(token)
                probs.append(float(scores[token]))
                step = torch.tensor([[token]])
            prompt_ids.append(ids[0].tolist())
            generated.append(out)
            logprobs.append(probs)
    return Greedy(prompt_ids, generated, logprobs)


def llamacpp_check(
    path: str,
    prompts: list[str],
    reference: Greedy,
    tokenizer: Any,
    context: int,
    lora: str | None = None,
    echo: Echo = lambda _: None,
) -> dict[str, Any]:
    """llama.cpp's reading of the GGUF file at ``path`` (with ``lora``) against PyTorch's
    ``reference`` on ``prompts``: the export's ``check`` record, or refused in one line (the
    caller's staging directory then leaves nothing) where anything differs or llama.cpp warned."""
    run = run_llamacpp(path, prompts, CHECK_NEW_TOKENS, context, lora=lora)
    check = compare(prompts, reference, run, tokenizer)
    problems = _differences(check, run)
    if problems:
        raise PeftkitError(
            f"llama.cpp reads the GGUF file otherwise than PyTorch: {'; '.join(problems)}; nothing was written"
        )
    stopped = sum(1 for item in check["prompts"] if item["stopped_early"])
    echo(
        f"check (llama.cpp {run.version}): the prompts' tokens and {CHECK_NEW_TOKENS} greedy tokens the same as "
        f"PyTorch's on all {len(prompts)} prompts"
        + (f" ({stopped} ending early at an end-of-generation token)" if stopped else "")
        + f"; log-probabilities within {check['max_abs_logprob_diff']:.1e}; no warning ({run.seconds:.1f} s)"
    )
    return check


def compare(prompts: list[str], reference: Greedy, run: LlamaCppRun, tokenizer: Any) -> dict[str, Any]:
    """What llama.cpp's ``run`` and PyTorch's ``reference`` gave on each prompt, side by side (the
    export's ``check`` record): token counts and whether the ids agree, the greedy tokens compared
    as far as llama.cpp went, the largest log-probability difference, llama.cpp's warnings."""
    items, worst = [], 0.0
    for i, prompt in enumerate(prompts):
        got, want = run.generated[i], reference.generated[i]
        same = got == want[: len(got)] and len(got) > 0
        diffs = [abs(a - b) for a, b in zip(run.logprobs[i], reference.logprobs[i])] if same else []
        worst = max([worst, *diffs])
        items.append(
            {
                "prompt": prompt,
                "tokens_transformers": len(reference.prompt_ids[i]),
                "tokens_llama_cpp": len(run.prompt_ids[i]),
                "same_ids": run.prompt_ids[i] == reference.prompt_ids[i],
                "same_greedy_tokens": same,
                "greedy_tokens_compared": len(got),
                "stopped_early": same and len(got) < len(want),
                "greedy_token_ids": got,
                "logprobs_compared": len(diffs),
                "completion": tokenizer.decode(got),
            }
        )
    return {
        "reader": f"llama.cpp (xllamacpp {run.version})",
        "new_tokens": CHECK_NEW_TOKENS,
        "prompts": items,
        "max_abs_logprob_diff": worst,
        "logprob_tolerance": LOGPROB_TOLERANCE,
        "llama_cpp_warnings": run.warnings,
        "llama_cpp_seconds": round(run.seconds, 2),
    }


def _differences(check: dict[str, Any], run: LlamaCppRun) -> list[str]:
    """Each way ``check`` (``compare``'s) falls short, in words; empty where it passed."""
    items, problems = check["prompts"], []
    tokenized = [item for item in items if not item["same_ids"]]
    if tokenized:
        first = tokenized[0]
        problems.append(
            f"{len(tokenized)} of {len(items)} prompts tokenized otherwise ({first['tokens_llama_cpp']} "
            f"tokens where transformers makes {first['tokens_transformers']} of {first['prompt']!r})"
        )
    generated = sum(1 for item in items if not item["same_greedy_tokens"])
    if generated:
        problems.append(f"{generated} of {len(items)} prompts continued with other greedy tokens")
    if not check["max_abs_logprob_diff"] <= LOGPROB_TOLERANCE:
        problems.append(
            f"log-probabilities up to {check['max_abs_logprob_diff']:.2e} apart (allowed {LOGPROB_TOLERANCE:g})"
        )
    if run.warnings:
        shown = "; ".join(repr(w) for w in run.warnings[:2])
        more = f" (and {len(run.warnings) - 2} more)" if len(run.warnings) > 2 else ""
        problems.append(f"llama.cpp warned: {shown}{more}")
    return problems
