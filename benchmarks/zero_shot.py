"""The untrained base model on a task's test split: the reference a fine-tuned strategy must beat.

For causal-lm this is the pretrained model answering the prompt as it is (zero-shot): its
perplexity on the reference answers and the exact match of its greedy answers. Same split, same
sample and same prompt as `peftkit run` / `peftkit bench` with the same settings.

    .venv/bin/python benchmarks/zero_shot.py --task causal-lm --max-train-samples 800 --max-eval-samples 250

Prints one JSON object (with the command, machine and versions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="causal-lm")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from accelerate import Accelerator
    from transformers import set_seed

    from peftkit.config import RunConfig
    from peftkit.data import cap_eval_splits
    from peftkit.env import machine_description, package_versions
    from peftkit.strategies.base import Strategy
    from peftkit.train import make_loader, resolve

    cfg = RunConfig(
        task=args.task,
        model=args.model,
        dataset=args.dataset,
        seed=args.seed,
        max_train_samples=args.max_train_samples,
        max_eval_samples=args.max_eval_samples,
    )
    run = resolve(cfg)
    task = run.task
    set_seed(cfg.seed)
    data = task.load_data(cfg)
    cap_eval_splits(data, cfg.max_eval_samples, cfg.seed)
    processor = task.load_processor(cfg.model)
    model = task.load_model(cfg.model, data, processor, None, "fp32")
    encoded = task.encode(data, processor, cfg)
    loader, _ = make_loader(encoded["test"], task.collate(processor), args.eval_batch_size, None)
    accelerator = Accelerator(cpu=True)
    start = time.perf_counter()
    # the base class's forward: the model as it is, no strategy applied
    metrics = task.evaluate(Strategy(), model, loader, accelerator, final=True, context=processor)
    print(
        json.dumps(
            {
                "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
                "task": task.name,
                "model": cfg.model,
                "dataset": cfg.dataset,
                "test_size": len(data.splits["test"]),
                **{f"test_{k}": v for k, v in metrics.items()},
                "seconds": round(time.perf_counter() - start, 1),
                "machine": machine_description(),
                "versions": package_versions(),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
