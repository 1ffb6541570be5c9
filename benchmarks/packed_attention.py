"""What a packed row's attention costs on CPU, and what a per-example attention would save.

``--packing`` fills rows of ``--max-length`` tokens with whole examples; on CPU the model's SDPA
attention then spans the whole row under a block-diagonal causal mask (transformers builds it from
the restarting ``position_ids``), where FlashAttention's variable-length kernel on a GPU attends
inside each example only. Is a per-example attention worth writing for CPU? Two measurements,
interleaved, forward + backward, fp32:

1. **attention alone**, SmolLM2-135M's shape (9 query heads, 3 key/value heads, head size 64), a
   batch of 8 rows of 512 positions holding examples of 50-330 tokens (job p's lengths): SDPA under
   the block mask, SDPA causal over the whole row (no mask: what an unpacked row costs), and one causal
   SDPA call per example (what a variable-length kernel does); the block mask's and the per-example
   outputs must agree;
2. **whole steps** (``--steps``): SmolLM2-135M with LoRA (peftkit's defaults) and peftkit's chunked loss
   and SwiGLU, the same 4,096 positions as 32 x 128, 16 x 256 and 8 x 512 tokens: how the cost of a
   position grows with the row's length.

    .venv/bin/python benchmarks/packed_attention.py              # attention alone (seconds)
    .venv/bin/python benchmarks/packed_attention.py --steps 3    # and 3 rounds of whole steps (minutes)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def packed_positions(rows: int, length: int, shortest: int, longest: int, seed: int = 0) -> list[list[int]]:
    """Each row's position ids: examples of ``shortest``-``longest`` tokens, each restarting at 0."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        row: list[int] = []
        while len(row) < length:
            row += list(range(min(rng.randint(shortest, longest), length - len(row))))
        out.append(row)
    return out


def attention_alone(rounds: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    rows, heads, kv_heads, length, size = 8, 9, 3, 512, 64
    positions = torch.tensor(packed_positions(rows, length, 50, 330))
    example = (positions == 0).cumsum(-1)
    mask = (example[:, :, None] == example[:, None, :]) & torch.ones(length, length, dtype=torch.bool).tril()
    mask = mask[:, None]
    starts = [[i for i, p in enumerate(r) if p == 0] + [length] for r in positions.tolist()]

    def block_mask(q: Any, k: Any, v: Any) -> Any:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    def causal_row(q: Any, k: Any, v: Any) -> Any:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    def per_example(q: Any, k: Any, v: Any) -> Any:
        out = []
        for b, s in enumerate(starts):
            parts = [
                F.scaled_dot_product_attention(
                    q[b : b + 1, :, x:y], k[b : b + 1, :, x:y], v[b : b + 1, :, x:y], is_causal=True, enable_gqa=True
                )
                for x, y in zip(s, s[1:])
            ]
            out.append(torch.cat(parts, dim=2))
        return torch.cat(out)

    def inputs() -> tuple[Any, Any, Any]:
        return (
            torch.randn(rows, heads, length, size, requires_grad=True),
            torch.randn(rows, kv_heads, length, size, requires_grad=True),
            torch.randn(rows, kv_heads, length, size, requires_grad=True),
        )

    q, k, v = inputs()
    agree = float((block_mask(q, k, v) - per_example(q, k, v)).abs().max())
    kinds = {"block mask (packed row)": block_mask, "causal, whole row": causal_row, "per example": per_example}
    seconds: dict[str, list[float]] = {n: [] for n in kinds}
    for i in range(rounds):
        for name, fn in kinds.items() if i % 2 == 0 else list(kinds.items())[::-1]:
            q, k, v = inputs()
            start = time.perf_counter()
            fn(q, k, v).sum().backward()
            seconds[name].append(time.perf_counter() - start)
    return {
        "shape": {"rows": rows, "heads": heads, "kv_heads": kv_heads, "length": length, "head_size": size},
        "examples_per_row": statistics.fmean(len(s) - 1 for s in starts),
        "max_abs_difference_block_mask_vs_per_example": agree,
        "median_seconds": {n: statistics.median(v) for n, v in seconds.items()},
        "seconds": seconds,
    }


def whole_steps(rounds: int) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from peftkit import chunked_loss
    from peftkit.kernels import apply_kernels
    from peftkit.models import resolve_model_source
    from peftkit.strategies.lora import LoraOptions

    model = AutoModelForCausalLM.from_pretrained(resolve_model_source("smollm2"))
    apply_kernels(model, "torch", on_cuda=False)
    opts = LoraOptions()
    model = get_peft_model(
        model,
        LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=0.0, target_modules=opts.target_modules),
    )
    model.train()
    layer = chunked_loss.output_layer(model)
    shapes = [(32, 128), (16, 256), (8, 512)]

    def step(rows: int, length: int) -> None:
        ids = torch.randint(0, layer.weight.shape[0], (rows, length))
        with chunked_loss.captured_output_input(layer) as captured:
            model(input_ids=ids, use_cache=False)
        total, count = chunked_loss.chunked_token_loss(captured, ids, -100)
        (total / count).backward()
        model.zero_grad(set_to_none=True)

    step(8, 64)  # warm-up
    seconds: dict[str, list[float]] = {f"{r} x {n}": [] for r, n in shapes}
    for i in range(rounds):
        for rows, length in shapes if i % 2 == 0 else shapes[::-1]:
            start = time.perf_counter()
            step(rows, length)
            seconds[f"{rows} x {length}"].append(time.perf_counter() - start)
    return {
        "median_seconds": {k: statistics.median(v) for k, v in seconds.items()},
        "positions_per_second": {k: 4096 / statistics.median(v) for k, v in seconds.items()},
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the attention measurement")
    ap.add_argument("--steps", type=int, default=0, help="rounds of whole steps (0: none; each round ~1 minute)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default=None, help="result file (default: results/packed_attention_cpu.json)")
    args = ap.parse_args()
    import torch

    from peftkit.env import machine_description, package_versions

    if args.threads:
        torch.set_num_threads(args.threads)
    record: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/packed_attention.py", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_description(),
        "versions": package_versions(),
        "threads": torch.get_num_threads(),
        "attention": attention_alone(args.rounds),
    }
    for name, s in record["attention"]["median_seconds"].items():
        print(f"attention, forward + backward, {name}: {s * 1000:.1f} ms (x 30 layers: {s * 30:.2f} s)")
    difference = record["attention"]["max_abs_difference_block_mask_vs_per_example"]
    print(f"  block mask vs per example: max difference {difference:.1e}")
    if args.steps:
        record["steps"] = whole_steps(args.steps)
        for name, s in record["steps"]["median_seconds"].items():
            print(
                f"whole step, {name} tokens: {s:.2f} s, {record['steps']['positions_per_second'][name]:.0f} positions/s"
            )
    out = args.out or os.path.join(HERE, "results", "packed_attention_cpu.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1)
        fh.write("\n")
    os.replace(out + ".tmp", out)
    print(f"written: {out}")


if __name__ == "__main__":
    main()
