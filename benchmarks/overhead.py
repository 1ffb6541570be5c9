"""peftkit's training loop against the physical floor: a minimal hand-written torch + peft loop.

Both sides train LoRA on the same model (the embedded MiniLM by default) over the very same
batches (same tokenized examples, same length-grouped order, same padding), with the same
optimizer (AdamW, decay on matrices only), warmup + linear decay, gradient clipping and thread
count. The only difference is what runs around the step: peftkit's ``fit`` (accelerate, the
strategy's forward, the hooks, the progress bar, the memory meter) against eleven lines of torch.

The two alternate (peftkit, hand, hand, peftkit, ...) so that drift in a shared machine's speed
hits both alike, and the medians of seconds per step are compared. Validation and test sets are
cut to 32 examples: evaluation is not part of the step and is not timed on either side.

    .venv/bin/python benchmarks/overhead.py                   # MiniLM, 40 steps x 5 repeats
    .venv/bin/python benchmarks/overhead.py --steps 20 --repeats 3 --out ''   # quicker, no file
    python benchmarks/overhead.py --device cuda --model DIR --dataset FILE.csv   # on a GPU (fp32 both sides)

The last line printed is ``ratio=<peftkit / hand-written>`` (target: at most 1.05 on CPU, 1.03 on a
GPU). Results go to benchmarks/results/overhead_<device>.json (or --out) with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--dataset", default="rotten_tomatoes", help="labelled text data (short name or file)")
    ap.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where both sides train (auto: cuda when there is one)",
    )
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per timed run")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per side")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--out", default=None, help="result file (default: results/overhead_<device>.json; '' for none)")
    args = ap.parse_args()
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # peftkit's loop (accelerate) takes a GPU when it sees one

    from peftkit.env import quiet_libraries

    quiet_libraries()  # before peft imports bitsandbytes, whose optional-kernel warning is noise here
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, TaskType, get_peft_model
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding, get_linear_schedule_with_warmup, set_seed
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from peftkit.config import RunConfig
    from peftkit.data import LabelledData, load_labelled_data
    from peftkit.env import machine_description, package_versions
    from peftkit.models import load_classifier, load_tokenizer
    from peftkit.strategies.base import TaskSpec
    from peftkit.structure import head_module_names
    from peftkit.train import fit, resolve

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA GPU")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.out is None:
        args.out = os.path.join(HERE, "results", f"overhead_{device.type}.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train = args.steps * args.batch_size
    data = load_labelled_data(args.dataset, seed=0, max_train_samples=n_train)
    small = {
        "train": data.splits["train"],
        "validation": data.splits["validation"].select(range(32)),
        "test": data.splits["test"].select(range(32)),
    }
    data = LabelledData(small, data.label_names, data.split_info)
    tokenizer = load_tokenizer(args.model)
    task = TaskSpec(num_labels=len(data.label_names), label_names=tuple(data.label_names))
    cfg = RunConfig(
        strategy="lora",
        task="sequence-classification",
        model=args.model,
        epochs=1,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=0,
    )
    run = resolve(cfg)
    hp = run.hparams

    def fresh_base():
        set_seed(0)
        return load_classifier(args.model, data.label_names, tokenizer.pad_token_id)

    def peftkit_side() -> float:
        model = run.strategy.prepare(fresh_base(), task)
        outcome = fit(run, model, tokenizer, data, task, log=lambda message: None)
        return outcome.history[0]["epoch_seconds"]

    # -- the floor: what a practitioner would write by hand with torch + peft ------------------
    encoded = (
        data.splits["train"]
        .map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=args.max_length),
            batched=True,
            remove_columns=["text"],
        )
        .rename_column("label", "labels")
    )
    lengths = [len(ids) for ids in encoded["input_ids"]]

    def hand_side() -> tuple[float, int]:
        base = fresh_base()
        lora = run.strategy.options
        # peft's default projections for the architecture (what peftkit's lora targets by default)
        model = get_peft_model(
            base,
            LoraConfig(
                task_type=TaskType.SEQ_CLS,
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=None,
                modules_to_save=head_module_names(base),
            ),
        ).to(device)
        sampler = LengthGroupedSampler(
            args.batch_size, lengths=lengths, generator=torch.Generator().manual_seed(cfg.seed)
        )
        loader = DataLoader(
            encoded.with_format("torch"),
            batch_size=args.batch_size,
            sampler=sampler,
            collate_fn=DataCollatorWithPadding(tokenizer),
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.ndim >= 2], "weight_decay": hp.weight_decay},
                {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=hp.lr,
        )
        steps = len(loader)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(hp.warmup_ratio * steps), steps)
        model.train()
        start = time.perf_counter()
        for batch in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            labels = batch.pop("labels")
            loss = F.cross_entropy(model(**batch).logits.float(), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
        return time.perf_counter() - start, sum(p.numel() for p in params)

    # the same work on both sides: same number of trainable parameters, same batches
    check = run.strategy.prepare(fresh_base(), task)
    peftkit_trainable = sum(p.numel() for p in check.parameters() if p.requires_grad)
    del check
    peftkit_times, hand_times = [], []
    hand_trainable = None
    print(
        f"warming up, then {args.repeats} alternating runs of {args.steps} steps per side "
        f"(batch {args.batch_size}, length <= {args.max_length}, {torch.get_num_threads()} threads)",
        flush=True,
    )
    peftkit_side()  # warm-up: first-touch allocations, lazy imports, kernel selection
    hand_side()
    for i in range(args.repeats):
        order = ("peftkit", "hand") if i % 2 == 0 else ("hand", "peftkit")
        for side in order:
            if side == "peftkit":
                peftkit_times.append(peftkit_side() / args.steps)
            else:
                seconds, hand_trainable = hand_side()
                hand_times.append(seconds / args.steps)
        print(
            f"repeat {i + 1}: peftkit {peftkit_times[-1] * 1000:.1f} ms/step, "
            f"hand-written {hand_times[-1] * 1000:.1f} ms/step",
            flush=True,
        )
    if hand_trainable != peftkit_trainable:
        sys.exit(
            f"the two sides train different parameters ({peftkit_trainable:,} vs {hand_trainable:,}): "
            "not a fair comparison"
        )

    p_med, h_med = statistics.median(peftkit_times), statistics.median(hand_times)
    ratio = p_med / h_med
    result = {
        "command": " ".join(["python", "benchmarks/overhead.py", *sys.argv[1:]]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_description(),
        "device": (f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "cpu"),
        "versions": package_versions(),
        "settings": {
            "model": args.model,
            "strategy": "lora",
            "steps": args.steps,
            "repeats": args.repeats,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "threads": torch.get_num_threads(),
            "trainable_params": peftkit_trainable,
        },
        "peftkit_seconds_per_step": peftkit_times,
        "hand_seconds_per_step": hand_times,
        "peftkit_median": p_med,
        "hand_median": h_med,
        "ratio": ratio,
        "target": 1.03 if device.type == "cuda" else 1.05,
    }
    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
    print(
        f"median seconds per step: peftkit {p_med:.4f}, hand-written {h_med:.4f} "
        f"({peftkit_trainable:,} trainable parameters on both sides)"
    )
    print(f"ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
