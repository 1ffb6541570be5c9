"""Before/after a restructure (issue 31 item 1): the same twelve small runs (every built-in strategy,
two epochs, on a tiny BERT classifier and a tiny Llama causal LM, as tests/test_stored_losses.py) under
two checkouts of peftkit, each run in a fresh process, and every key of their metrics.json compared
(timings, memory, paths and versions aside; ``adapter_bytes`` compared). Prints the differing keys.

    git worktree add --detach /tmp/peftkit-old <commit before the change>
    .venv/bin/python benchmarks/before_after.py --old /tmp/peftkit-old --work /tmp/before-after

Runs already in --work are reused (delete its runs-new/ after changing the new tree).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRATEGIES = ("full", "lora", "adapter", "prefix", "gradual_unfreeze", "head_only")
EXTRA = {"gradual_unfreeze": ["--set", "unfreeze_every_steps=5"], "prefix": ["--set", "num_virtual_tokens=4"]}
JOBS = (("bert", "sequence-classification", "reviews.csv"), ("llama", "causal-lm", "pairs.csv"))
# keys that measure the machine, not the arithmetic
SKIP = ("seconds", "time", "memory", "bytes", "rss", "versions", "machine", "dir", "path", "started", "finished",
        "per_second", "examples_s", "duration", "when", "date", "peak", "cpu", "host", "command", "output")  # fmt: skip
KEEP = {"adapter_bytes"}


def make_inputs(work: str) -> None:
    """The test suite's tiny models and data, written once into ``work``."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    import conftest

    torch.manual_seed(0)
    tok = conftest._build_tokenizer()
    conftest.save_quietly(AutoModel.from_config(conftest._config("bert", len(tok), tok.pad_token_id)), f"{work}/bert")
    tok.save_pretrained(f"{work}/bert")
    torch.manual_seed(0)
    tok = conftest._build_tokenizer()
    config = conftest._config("llama", len(tok), tok.pad_token_id)
    config.tie_word_embeddings, config.eos_token_id = True, tok.eos_token_id
    conftest.save_quietly(AutoModelForCausalLM.from_config(config), f"{work}/llama")
    tok.save_pretrained(f"{work}/llama")
    with open(f"{work}/reviews.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(conftest.make_rows(200))
    with open(f"{work}/pairs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        writer.writeheader()
        for row in conftest.make_rows(200, seed=1):
            writer.writerow({"prompt": row["text"], "response": "good" if row["label"] == "pos" else "bad"})


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b.0": 1}``."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(item, f"{prefix}{i}.").items()}
    return {prefix[:-1]: value}


def metrics(tree: str, out: str, work: str, arch: str, task: str, data: str, strategy: str) -> dict[str, Any]:
    """The compared keys of one run's metrics.json, under the peftkit checkout ``tree``."""
    if not os.path.exists(f"{out}/metrics.json"):
        cmd = [sys.executable, "-m", "peftkit", "run", "-s", strategy, "--model", f"{work}/{arch}", "--task", task,
               "--dataset", f"{work}/{data}", "--epochs", "2", "--batch-size", "16", "--max-length", "16",
               "--lr", "5e-3", "--max-eval-samples", "40", "--output-dir", out, *EXTRA.get(strategy, [])]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": tree, "PEFTKIT_DISABLE_PLUGINS": "1"}
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{tree}: {arch} {strategy} failed:\n{done.stderr[-2000:]}")
    with open(f"{out}/metrics.json") as fh:
        found = flat(json.load(fh))
    return {k: v for k, v in found.items() if k in KEEP or not any(s in k.lower() for s in SKIP)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="checkout of peftkit before the change")
    ap.add_argument("--new", default=ROOT, help="checkout after it (default: this one)")
    ap.add_argument("--work", required=True, help="scratch directory: the tiny models, data and runs")
    args = ap.parse_args()
    work = os.path.abspath(args.work)
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(f"{work}/bert"):
        make_inputs(work)
    trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
    diffs = []
    for arch, task, data in JOBS:
        for strategy in STRATEGIES:
            old, new = (
                metrics(tree, f"{work}/runs-{side}/{arch}-{strategy}", work, arch, task, data, strategy)
                for side, tree in trees.items()
            )
            diffs += [
                f"{arch}/{strategy} {key}: old {old.get(key, '<missing>')!r} new {new.get(key, '<missing>')!r}"
                for key in sorted(set(old) | set(new))
                if old.get(key, "<missing>") != new.get(key, "<missing>")
            ]
            print(f"{arch}/{strategy}: {len(old)} keys compared", flush=True)
    print(f"{len(JOBS) * len(STRATEGIES)} runs, {len(diffs)} differing keys", *diffs, sep="\n")


if __name__ == "__main__":
    main()
