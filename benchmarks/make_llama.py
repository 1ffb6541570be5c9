"""Build a Llama-style model from a config (random weights) for memory and speed benchmarks.

No pretrained Llama weights install offline, and memory and speed do not depend on what the weights
are, only on their shapes. This writes a local model directory that ``peftkit bench --model DIR``
and ``peftkit run --model DIR`` load like any other (accuracy figures from it mean nothing: it is
untrained; measure accuracy with the real embedded model). The tokenizer is MiniLM's WordPiece
vocabulary (30,522 tokens), so the embedding matrix is the only part smaller than in a real Llama.

    .venv/bin/python benchmarks/make_llama.py --size 0.6b --out /tmp/llama-0.6b
    .venv/bin/peftkit bench --model /tmp/llama-0.6b --strategies full,lora --epochs 1 --max-train-samples 4000

Sizes (parameters with the 30,522-token vocabulary):
    tiny  hidden 64,   2 layers                      (seconds on CPU; for trying the pipeline)
    0.6b  hidden 1536, 20 layers, 16 heads / 8 KV heads, MLP 4096      ~0.57B
    1.1b  hidden 2048, 22 layers, 32 heads / 4 KV heads, MLP 5632 (TinyLlama's shape)  ~1.03B
    1.5b  hidden 2048, 22 layers, 16 heads / 8 KV heads, MLP 8192      ~1.51B

--max-positions sets the longest sequence the model is made for (default 512; the GPU suite's
1.5B vs-Trainer case trains at 1,024); --dtype bfloat16 writes half the bytes (a run in bf16 loads
its frozen weights in 16 bits either way).
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

SIZES = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
    ),
    "0.6b": dict(
        hidden_size=1536, intermediate_size=4096, num_hidden_layers=20, num_attention_heads=16, num_key_value_heads=8
    ),
    "1.1b": dict(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4
    ),
    "1.5b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=22, num_attention_heads=16, num_key_value_heads=8
    ),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="0.6b")
    ap.add_argument("--out", required=True, help="directory to write (must not exist)")
    ap.add_argument(
        "--tokenizer",
        default="minilm",
        help="tokenizer to save with the model: a short name or a directory (default: minilm)",
    )
    ap.add_argument(
        "--attention-bias",
        action="store_true",
        help="biases on the q/k/v/o projections (as Qwen2 has), so BitFit has something to train",
    )
    ap.add_argument(
        "--max-positions",
        type=int,
        default=512,
        help="longest sequence the model is made for (max_position_embeddings; default 512)",
    )
    ap.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the weights written (default float32)",
    )
    args = ap.parse_args()
    if os.path.exists(args.out):
        sys.exit(f"error: {args.out} already exists")

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from peftkit.models import load_tokenizer

    if os.path.isdir(args.tokenizer):  # a tokenizer folder alone (no model config beside it)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    if tokenizer.eos_token is None:  # a WordPiece (encoder) vocabulary: its [SEP] ends a sequence
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.bos_token is None and tokenizer.cls_token is not None:
        tokenizer.bos_token = tokenizer.cls_token
    # (the tokenizer's own limit, MiniLM's 512, would only warn about longer texts)
    if (tokenizer.model_max_length or 0) < args.max_positions:
        tokenizer.model_max_length = args.max_positions
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=args.max_positions,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attention_bias=args.attention_bias,
        **SIZES[args.size],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    n = sum(p.numel() for p in model.parameters())
    if args.dtype != "float32":
        model.to(getattr(torch, args.dtype))
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    bias = ", q/k/v/o biases" if args.attention_bias else ""
    print(
        f"wrote {args.out}: Llama-style{bias}, {n / 1e9:.3f}B parameters (random init), vocabulary {len(tokenizer):,}"
        + (f", {args.max_positions} positions" if args.max_positions != 512 else "")
        + (f", {args.dtype}" if args.dtype != "float32" else "")
    )


if __name__ == "__main__":
    main()
