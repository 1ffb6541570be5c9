"""The GPU suite: every strategy and every memory lever on a 0.6B Llama-style model, on one GPU.

Started by ``benchmarks/gpu/run.sh`` (which installs what the GPU machine lacks first); see
``benchmarks/gpu/README.md``. Every measurement goes through the product itself (``peftkit bench``,
one process per run, the allocator's peaks, the planner's prediction beside each), and this script
adds what the bench does not: the card's bf16 peak measured by a large matrix product, model FLOPs
per token counted from the architecture and what each strategy trains, MFU, and one table.

Sections run in order of importance, each in its own processes with a time limit, and the results
files are rewritten after each section, so a suite stopped at any point keeps what it measured:

1. the environment (GPU, driver, CUDA, versions) and an 8192^3 bf16 matrix product;
2. every strategy (the built-in six and the bitfit plugin), bf16 mixed precision;
3. the levers: LoRA on a 4-bit (QLoRA) and an 8-bit base, paged 8-bit AdamW, gradient checkpointing;
4. ``--memory-budget 8GiB --auto-fit`` on a full fine-tune that does not fit 8 GiB as configured;
5. ``benchmarks/overhead.py --device cuda``: peftkit's loop against a hand-written one;
6. one run under ``torch.profiler`` (``profile_run.py``): where a step's and a run's time goes.

``--dry-run`` runs the same code on a tiny model on the CPU in about a minute (tests/test_gpu_suite.py),
so the suite cannot rot between the sessions that have a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
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
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched in
# order against torch.cuda.get_device_name(); the suite also measures the peak itself, so MFU does
# not depend on this table alone.
SPEC_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0),
    ("RTX 4090", 165.2),
)

ALL_STRATEGIES = "full,head_only,gradual_unfreeze,lora,adapter,prefix,bitfit"


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
        return any(module_name == h or module_name.endswith("." + h) or f".{h}." in module_name + "."
                   or module_name.startswith(h + ".") for h in heads)

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
    return {"forward": forward, "backward": backward, "total": forward + backward,
            "trainable_tensors": len(trainable_at)}


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
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", start_new_session=True, cwd=ROOT)

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


def bench_case(name: str, strategies: str, extra: list[str], common: list[str], work: str, out: str,
               timeout: float) -> dict[str, Any]:
    """One ``peftkit bench`` call; returns its rows (or why there are none). The bench's own
    results.json / results.md and its logs are copied into ``out`` (not the run directories: a full
    fine-tune's saved weights are gigabytes)."""
    bench_dir = os.path.join(work, name)
    shutil.rmtree(bench_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "peftkit", "bench", "--strategies", strategies, *common, *extra,
           "--output-dir", bench_dir]
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    code, seconds = run_logged(cmd, os.path.join(out, "logs", f"{name}.log"), timeout)
    result: dict[str, Any] = {"case": name, "command": " ".join(["peftkit", *cmd[3:]]), "exit_code": code,
                              "seconds": round(seconds, 1), "rows": []}
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
        result["error"] = ("killed: the suite's time was up" if code is None
                           else f"peftkit bench exited with {code}; see logs/{name}.log")
        result["rows"] = salvage_rows(os.path.join(work, f".{name}.partial-*"))
    shutil.rmtree(bench_dir, ignore_errors=True)  # gigabytes of run directories: not results
    for stage in glob.glob(os.path.join(work, f".{name}.partial-*")):  # a killed bench's staging
        shutil.rmtree(stage, ignore_errors=True)
    return result


def salvage_rows(stage: str) -> list[dict[str, Any]]:
    """Rows of the runs that finished in a bench that did not (killed when the suite's time was up):
    each run's own metrics.json, without the planner's prediction (the bench writes that at its end)."""
    from peftkit.benchmark import ROW_METRICS

    rows = []
    for path in sorted(glob.glob(os.path.join(stage, "runs", "*", "metrics.json"))):  # (stage: a pattern)
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
        levers = [m.get("precision") if m.get("precision") != "fp32" else None,
                  "checkpointing" if m.get("gradient_checkpointing") else None,
                  m.get("optimizer") if m.get("optimizer") != "adamw" else None,
                  f"{m['quantize']} base" if m.get("quantize") else None]
        rows.append({"strategy": m["strategy"], "seed": m.get("seed", 0), "status": "ok", "salvaged": True,
                     "levers": " + ".join(x for x in levers if x) or "-", **{k: m.get(k) for k in ROW_METRICS}})
    return rows


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


def targets(cases: dict[str, dict[str, Any]], overhead: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured figure and met / not met."""

    def row(case: str, strategy: str) -> dict[str, Any] | None:
        for r in cases.get(case, {}).get("rows", []):
            if r["strategy"] == strategy and r.get("status") == "ok":
                return r
        return None

    full, lora, qlora = row("strategies", "full"), row("strategies", "lora"), row("qlora_4bit", "lora")
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, limit: float, higher_is_ok: bool = False, fmt: str = "{:.2f}") -> None:
        met = None if value is None else (value >= limit if higher_is_ok else value <= limit)
        out.append({"target": what, "value": value, "limit": limit, "met": met,
                    "shown": "-" if value is None else fmt.format(value)})

    add("LoRA peak / full peak <= 0.55", ratio(lora and lora["peak_memory_bytes"], full and full["peak_memory_bytes"]), 0.55)
    add("LoRA step time / full step time <= 0.5",
        ratio(lora and lora.get("step_seconds_median"), full and full.get("step_seconds_median")), 0.5)
    add("QLoRA-4bit peak / LoRA-bf16 peak <= 0.5",
        ratio(qlora and qlora["peak_memory_bytes"], lora and lora["peak_memory_bytes"]), 0.5)
    add("full fine-tune MFU (data-sheet peak) >= 40%", full and full.get("mfu_spec"), 0.40, True, "{:.1%}")
    errors = [abs(r["predicted_peak_bytes"] / r["peak_memory_bytes"] - 1)
              for c in cases.values() for r in c.get("rows", [])
              if r.get("status") == "ok" and r.get("predicted_peak_bytes") and r.get("peak_memory_bytes")]
    add("planner within 15% of the allocator's peak (worst row)", max(errors) if errors else None, 0.15, False, "{:.1%}")
    add("peftkit loop / hand-written loop <= 1.03", overhead.get("ratio") if overhead else None, 1.03, False, "{:.3f}")
    return out


STAGES = ("imports", "load_data", "load_model", "fingerprint", "prepare", "setup", "train", "evaluate", "save")


def start_up_table(cases: dict[str, Any]) -> list[str]:
    """Where each run's time went (``stage_seconds`` of its metrics.json), beside the worker's own
    count (``tried``: from its start, imports included) and the run's wall time: on the first two
    H200 sessions a run took 35-45 s of the suite for 1-5 s of training."""
    rows = [(name, r) for name, case in cases.items() for r in case.get("rows", [])
            if r.get("status") == "ok" and r.get("stage_seconds")]
    if not rows:
        return []
    lines = ["Where each run's time went (seconds): the run's stages, its wall time, and the worker's "
             "(imports included; - where the bench was killed before it said)", "",
             "| case | strategy | " + " | ".join(s.replace("_", " ") for s in STAGES) + " | run wall | worker |",
             "|---|---|" + "---|" * (len(STAGES) + 2)]
    for name, r in rows:
        stages = r["stage_seconds"]
        worker = sum(t.get("seconds") or 0 for t in r.get("tried") or []) or None
        lines.append(f"| {name} | `{r['strategy']}` | " + " | ".join(
            f"{stages[k]:.1f}" if stages.get(k) is not None else "-" for k in STAGES)
            + f" | {r.get('wall_seconds') or 0:.1f} | {f'{worker:.1f}' if worker else '-'} |")
    return lines + [""]


def write_report(out: str, state: dict[str, Any]) -> None:
    """results.json and results.md in ``out``, rewritten after every section."""
    cases = state["cases"]
    state["targets"] = targets(cases, state.get("overhead"))
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(state, fh, indent=2, default=str)
    os.replace(tmp, os.path.join(out, "results.json"))

    env, peaks = state["environment"], state["peaks"]
    lines = [f"# peftkit GPU suite: {env.get('gpu', 'no GPU')}", ""]
    lines += [f"- Command: `{state['command']}` ({'dry run, tiny model, ' if state['dry_run'] else ''}"
              f"suite {state.get('suite_seconds', 0):.0f} s)",
              f"- GPU: {env.get('gpu', '-')}, {gib(env.get('gpu_memory_bytes'))}, driver {env.get('driver', '-')}, "
              f"CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}; CPU: {env.get('cpu', '-')}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in (state.get("versions") or {}).items()),
              f"- Model: {state['model']['description']}; data: {state['data']}",
              f"- Settings: {state['settings']}",
              "- bf16 peak: " + (f"data sheet {peaks['spec'] / 1e12:.0f} TFLOP/s, " if peaks.get("spec") else "not in the table, ")
              + (f"measured {peaks['measured'] / 1e12:.0f} TFLOP/s (8192³ bf16 matmul)" if peaks.get("measured")
                 else "not measured"), ""]
    lines += ["| case | strategy | levers | status | trainable | peak allocated | peak reserved | planned (error) "
              "| step time | tokens/s | MFU (sheet / measured) | micro-batch × accum |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, case in cases.items():
        if not case.get("rows"):
            lines.append(f"| {name} | - | - | {case.get('error', 'no rows')} |" + " |" * 8)
        for r in case.get("rows", []):
            if r.get("status") != "ok":
                lines.append(f"| {name} | `{r['strategy']}` | {r.get('levers', '-')} | {r['status']}: "
                             f"{(r.get('error') or '')[:160]} |" + " |" * 8)
                continue
            pred, peak = r.get("predicted_peak_bytes"), r["peak_memory_bytes"]
            mfu = (f"{r['mfu_spec']:.1%}" if r.get("mfu_spec") is not None else "-") + " / " + \
                  (f"{r['mfu_measured']:.1%}" if r.get("mfu_measured") is not None else "-")
            step = r.get("step_seconds_median")
            lines.append(
                f"| {name} | `{r['strategy']}` | {r.get('levers', '-')} | ok | {r['trainable_percent']:.3g}% "
                f"| {gib(peak)} | {gib(r.get('peak_reserved_bytes'))} "
                f"| {gib(pred) + f' ({pred / peak - 1:+.0%})' if pred else '-'} "
                f"| {f'{step * 1000:.0f} ms' if step else '-'} "
                f"| {r.get('steady_tokens_per_second') or r.get('tokens_per_second') or 0:,.0f} | {mfu} "
                f"| {r['batch_size']} × {r['grad_accumulation']} |")
    lines += ["", "Step time: median wall time of an optimizer step after each epoch's first; tokens/s over "
              "the same steps. MFU: model FLOPs per token (counted from the architecture and what the strategy "
              "trains; see suite.py `train_flops_per_token`) x tokens/s / the card's bf16 peak. Planned: "
              "`peftkit plan --device cuda`'s prediction for the same run (error = planned / measured - 1).", ""]
    auto = cases.get("autofit_8gib", {})
    budget = re.search(r"--memory-budget (\S+)", auto.get("command", ""))
    for r in auto.get("rows", []):
        if r.get("tried"):
            lines.append(f"Auto-fit ladder for `{r['strategy']}` under {budget.group(1) if budget else '?'}: " + "; ".join(
                f"micro-batch {t['batch_size']} ({t['levers']}): {t['outcome']}"
                + (f" (planned {gib(t['predicted_peak_bytes'])})" if t.get("predicted_peak_bytes") else "")
                for t in r["tried"]))
            lines.append("")
    lines += start_up_table(cases)
    for name, where in state.get("profiles", {}).items():
        lines += [f"Profile of a `{name}` run (torch.profiler, operators by device and host time): {where}", ""]
    ov = state.get("overhead")
    if ov:
        if ov.get("ratio"):
            lines += [f"Loop overhead (`benchmarks/overhead.py`, LoRA, fp32, on {ov.get('device')}): peftkit "
                      f"{ov['peftkit_median'] * 1000:.1f} ms/step, hand-written {ov['hand_median'] * 1000:.1f} ms/step, "
                      f"ratio {ov['ratio']:.3f}", ""]
        else:
            lines += [f"Loop overhead: {ov.get('error')}", ""]
    lines += ["| target | measured | met |", "|---|---|---|"]
    for t in state["targets"]:
        lines.append(f"| {t['target']} | {t['shown']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'no'} |")
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
    env: dict[str, Any] = {"cpu": report["machine"]["cpu"], "cuda": device["cuda_version"],
                           "cudnn": device["cudnn_version"], "torch": torch.__version__,
                           "versions": report["versions"], "lock_status": report["lock"]["status"]}
    if device["gpus"]:
        env.update(gpu=device["gpus"][0]["name"], gpu_memory_bytes=device["gpus"][0]["memory_bytes"])
        try:  # the driver is not torch's to know
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            env["driver"] = None
    try:
        import bitsandbytes  # noqa: F401 - installed does not mean importable (its CUDA library must load)
    except Exception as exc:  # noqa: BLE001 - recorded, the lever cases then report it
        env["bitsandbytes_error"] = f"{type(exc).__name__}: {exc}"
    return env


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="results folder (results.json, results.md, logs/, bench/)")
    ap.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU: checks the suite, measures nothing")
    ap.add_argument("--size", default=None, help="make_llama.py size (default: 0.6b; tiny with --dry-run)")
    ap.add_argument("--tokenizer", default="minilm", help="tokenizer for the model (short name or directory)")
    ap.add_argument("--data", default="rotten_tomatoes", help="labelled text the documents are drawn from")
    ap.add_argument("--time-limit", type=float, default=480, help="seconds for the whole suite (default 480)")
    ap.add_argument("--work", default=None, help="scratch folder for the model and run directories")
    ap.add_argument("--cases", default=None, help="comma-separated cases to run (default: all), e.g. qlora_4bit,autofit_8gib")
    ap.add_argument("--part", type=int, choices=[1, 2], default=None,
                    help="the suite in two device calls of about 6 minutes: 1 = every strategy, 2 = the levers, "
                         "auto-fit and the loop overhead (one call of 8 minutes covered only part 1's first half)")
    ap.add_argument("--strategies", default=None, help=f"strategies of the 'strategies' case (default: {ALL_STRATEGIES})")
    ap.add_argument("--no-overhead", action="store_true", help="skip benchmarks/overhead.py")
    args = ap.parse_args()
    dry = args.dry_run
    size = args.size or ("tiny" if dry else "0.6b")
    started = time.perf_counter()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    work = os.path.abspath(args.work or os.path.join(out, "..", ".gpu-suite-work"))
    os.makedirs(work, exist_ok=True)
    if dry:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the dry run checks the code, on the CPU, anywhere
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    def left() -> float:
        return args.time_limit - (time.perf_counter() - started)

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
        print(f"[suite] bf16 matmul: {peaks['measured'] / 1e12:.0f} TFLOP/s measured, data sheet "
              f"{(peaks['spec'] or 0) / 1e12:.0f}", flush=True)

    # the model and the data
    model_dir = os.path.join(work, f"llama-{size}")
    if not os.path.isdir(model_dir):
        made = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_llama.py"), "--size", size,
                               "--tokenizer", args.tokenizer, "--attention-bias", "--out", model_dir],
                              capture_output=True, text=True, cwd=ROOT)
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
    data = (f"{int(batch * steps / 0.8) + 40} plain-text documents of ~{seq} words drawn at random from "
            f"{n_sentences:,} {args.data} review sentences (plain language modelling, every token learned)")
    common = ["--task", "causal-lm", "--model", model_dir, "--dataset", corpus, "--precision", "bf16",
              "--epochs", "1", "--batch-size", str(batch), "--eval-batch-size", str(batch), "--max-length", str(seq),
              "--max-train-samples", str(batch * steps), "--max-eval-samples", str(batch)]
    if dry:
        common[common.index("bf16")] = "fp32"  # (the CPU's bf16 is slow on some machines; the code path is the same)
    state: dict[str, Any] = {
        "command": "bash benchmarks/gpu/run.sh " + " ".join(sys.argv[1:]),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "dry_run": dry, "environment": env,
        "versions": env["versions"], "peaks": peaks,
        "model": {"size": size, "description": description},
        "data": data, "settings": " ".join(common[2:]).replace(model_dir, f"llama-{size}").replace(corpus, "documents.jsonl"),
        "cases": {}, "overhead": None, "flops_per_token": {},
    }

    # FLOPs per token of each strategy (a weightless copy each: seconds)
    strategies = args.strategies or (ALL_STRATEGIES if not dry else "full,lora")
    if args.part == 2 and not args.strategies:
        strategies = "full,lora"  # what the lever cases train
    for name in strategies.split(","):
        try:
            state["flops_per_token"][name] = train_flops_per_token(model_dir, name, seq)
        except Exception as exc:  # noqa: BLE001 - a strategy that cannot be counted has no MFU, still a row
            state["flops_per_token"][name] = None
            print(f"[suite] FLOPs of {name} not counted: {type(exc).__name__}: {exc}", flush=True)
    flops = {k: v for k, v in state["flops_per_token"].items() if v}

    cases = [
        ("strategies", strategies, [], 0.5),
        ("qlora_4bit", "lora", ["--quantize", "4bit"], 0.1),
        ("lora_8bit", "lora", ["--quantize", "8bit"], 0.1),
        # (full only: each bench run costs 35-45 s on the H200, mostly start-up, and part 2 ran out
        # of time with both; these two levers are for the full fine-tune's optimizer state and
        # activations, which is where they matter)
        ("paged_adamw8bit", "full", ["--optimizer", "paged_adamw8bit"], 0.1),
        ("gradient_checkpointing", "full", ["--gradient-checkpointing"], 0.1),
        # tries several micro-batches, each attempt a fresh worker
        ("autofit_8gib", "full", ["--memory-budget", "8GiB", "--auto-fit"], 0.2),
    ]
    if dry:
        # the CUDA-only levers are refused on a CPU (tested elsewhere); the rest run on the tiny model
        cases = [c for c in cases if c[0] in ("strategies", "autofit_8gib")]
        cases = [(n, s, [x if x != "8GiB" else "1GiB" for x in e], w) for n, s, e, w in cases]
    if args.part == 1:
        args.cases, args.no_overhead = "strategies", True
    elif args.part == 2:
        args.cases = ",".join([c[0] for c in cases if c[0] != "strategies"] + ["profile"])
    if args.cases:
        cases = [c for c in cases if c[0] in args.cases.split(",")]
    for name, names, extra, share in cases:
        if left() < 30:
            state["cases"][name] = {"case": name, "rows": [], "error": "skipped: the suite's time was up"}
            continue
        # each case gets its share of the time left, and what earlier cases did not use
        weight = share / sum(w for n, _, _, w in cases if n not in state["cases"])
        # the last case leaves 40 s for what follows it (the loop overhead, the profile), or 10 s
        # for the report when nothing does (part 1)
        profiled = args.part != 1 and (not args.cases or "profile" in args.cases.split(","))
        after = 10 if args.no_overhead and not profiled else 40
        budget = max(30.0, (left() - 60) * weight) if name != cases[-1][0] else left() - after
        print(f"[suite] {name}: peftkit bench --strategies {names} {' '.join(extra)} (up to {budget:.0f} s)", flush=True)
        case = bench_case(name, names, extra, common, work, out, budget)
        add_mfu(case["rows"], flops, peaks)
        state["cases"][name] = case
        state["suite_seconds"] = time.perf_counter() - started
        write_report(out, state)

    # peftkit's loop against a hand-written one, on the same device
    if args.no_overhead:
        state["overhead"] = {"error": "not run (--no-overhead)"}
    elif left() > 45:
        overhead_json = os.path.join(out, "overhead.json")
        classifier_data = os.path.join(work, "labelled.csv")
        _labelled_csv(args.data, classifier_data)
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "overhead.py"), "--model", model_dir,
               "--dataset", classifier_data, "--device", "cpu" if dry else "cuda", "--out", overhead_json,
               "--steps", "3" if dry else "20", "--repeats", "1" if dry else "3", "--batch-size", str(batch * 2)]
        code, _ = run_logged(cmd, os.path.join(out, "logs", "overhead.log"), left() - 10)
        if code == 0 and os.path.exists(overhead_json):
            with open(overhead_json, encoding="utf-8") as fh:
                state["overhead"] = json.load(fh)
        else:
            state["overhead"] = {"error": "killed: the suite's time was up" if code is None
                                 else f"overhead.py exited with {code}; see logs/overhead.log"}
    else:
        state["overhead"] = {"error": "skipped: the suite's time was up"}
    # where the time of a run goes (operators by device and by host time), for the MFU question
    if args.part != 1 and (not args.cases or "profile" in args.cases.split(",")):
        if left() > 40:
            for name in ("full",) if not dry else ("lora",):
                cmd = [sys.executable, os.path.join(HERE, "profile_run.py"), "--model", model_dir, "--dataset", corpus,
                       "--strategy", name, "--steps", "2" if dry else "8", "--batch-size", str(batch),
                       "--max-length", str(seq), "--out", os.path.join(out, f"profile_{name}.txt")]
                code, _ = run_logged(cmd, os.path.join(out, "logs", f"profile_{name}.log"), left() - 10)
                state["profiles"] = {**state.get("profiles", {}),
                                     name: f"profile_{name}.txt" if code == 0 else f"failed ({code}); see logs"}
        else:
            state["profiles"] = {"-": "skipped: the suite's time was up"}
    state["suite_seconds"] = time.perf_counter() - started
    write_report(out, state)
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
