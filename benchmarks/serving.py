"""Serving speed: a shipped adapter in PyTorch (unmerged, merged) against its ONNX exports (fp32,
int8: ONNX Runtime) and its OpenVINO exports (fp32 at OpenVINO's default precision and forced to
f32, NNCF int8).

All seven engines answer the very same tokenized batches of the adapter's own test split (Rotten
Tomatoes, 1,276 examples, seed 0, for the shipped LoRA adapter), with the same number of threads:

- latency: one example at a time (batch 1), ``--latency-examples`` of them, p50 and p95;
- throughput: every test example in batches of ``--batch``, examples per second;
- accuracy on the test split, and agreement with PyTorch's labels.

The engines take turns (unmerged, merged, ONNX fp32, ONNX int8, OpenVINO ..., unmerged, ...) for
``--rounds`` rounds, so that drift in a shared machine's speed hits all alike; the medians are
reported, and the ratios to PyTorch merged (the fastest PyTorch can serve this model) are printed
side by side. The exports are made with ``peftkit export`` (so its checks ran on them: int8 is
kept by its accuracy gate, ``--max-accuracy-drop``) in a temporary directory. OpenVINO's fp32
export is timed twice: at OpenVINO's default inference precision (bf16 on a CPU with AVX512-BF16
or AMX; what OpenVINO serves unless told otherwise) and forced to f32 (``INFERENCE_PRECISION_HINT``,
what ``peftkit predict --openvino`` serves, as checked); the precision each OpenVINO row ran in is
read back from the compiled model and shown.

    .venv/bin/python benchmarks/serving.py                      # the shipped LoRA adapter
    .venv/bin/python benchmarks/serving.py --adapter adapters/minilm-rotten-tomatoes-adapter --out ''

Results: ``benchmarks/results/serving_cpu.{json,md}`` (or ``--out PREFIX``; '' for none) with the
command, machine, CPU (its AVX-512 / AMX flags), the load average the machine had from other
processes (``--note`` says more) and versions. Targets: ONNX Runtime int8 (issue 17) and OpenVINO
NNCF int8 (issue 33) at least 2x the throughput of PyTorch merged at batch 32 on 2 CPU cores,
accuracy within 0.5 points.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHIPPED = os.path.join(ROOT, "adapters", "minilm-rotten-tomatoes-lora")


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linearly interpolated."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low, high = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapter", default=SHIPPED, help="adapter directory (default: the shipped LoRA adapter)")
    ap.add_argument("--batch", type=int, default=32, help="batch size of the throughput pass (default 32)")
    ap.add_argument("--latency-examples", type=int, default=200, help="examples timed one at a time (default 200)")
    ap.add_argument("--rounds", type=int, default=3, help="turns each engine takes (default 3): medians reported")
    ap.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=None,
        help="the int8 exports' accuracy gate, in points (default: peftkit export's, 0.5)",
    )
    ap.add_argument("--note", default="", help="a sentence on the machine's state, kept with the results")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every engine (default: all cores)")
    ap.add_argument(
        "--out",
        default=os.path.join(HERE, "results", "serving_cpu"),
        help="results prefix: PREFIX.json and PREFIX.md ('' for none)",
    )
    args = ap.parse_args()

    import numpy as np
    import torch
    from tqdm.auto import tqdm

    from peftkit import api
    from peftkit.env import machine_description, quiet_libraries
    from peftkit.exporter import check_data, load_onnx
    from peftkit.files import write_json
    from peftkit.inference import load_adapter
    from peftkit.openvino_export import load_openvino, openvino_versions

    quiet_libraries()
    torch.set_num_threads(args.threads)
    work = tempfile.mkdtemp(prefix="peftkit-serving-")
    load_before = os.getloadavg()
    print(f"exporting {args.adapter} (ONNX, OpenVINO: fp32, int8) with peftkit export ...", flush=True)
    exports = {}
    for name, fmt, quantize in (
        ("onnx_fp32", "onnx", None),
        ("onnx_int8", "onnx", "int8"),
        ("openvino_fp32", "openvino", None),
        ("openvino_int8", "openvino", "int8"),
    ):
        config = api.ExportConfig(
            args.adapter,
            os.path.join(work, name),
            format=fmt,
            quantize=quantize,
            max_accuracy_drop=args.max_accuracy_drop if quantize else None,
        )
        exports[name] = api.export(config, echo=lambda m: print("  " + m, flush=True))

    unmerged = load_adapter(args.adapter)
    merged = copy.deepcopy(unmerged)
    merged.model = merged.strategy.serving_model(merged.model)
    task, meta = unmerged.task, unmerged.metadata
    data = check_data(task, meta, None, None, None)
    labels = np.asarray(data.labels)
    batches = [
        task.serving_batch(unmerged.tokenizer, meta, data.inputs[i : i + args.batch])
        for i in range(0, len(data.inputs), args.batch)
    ]
    singles = [task.serving_batch(unmerged.tokenizer, meta, [x]) for x in data.inputs[: args.latency_examples]]

    def torch_engine(loaded: Any) -> Callable[[dict[str, Any]], Any]:
        return lambda batch: loaded.probabilities(batch).numpy()

    def onnx_engine(directory: str) -> Callable[[dict[str, Any]], Any]:
        model = load_onnx(directory, threads=args.threads)
        return model.probabilities

    precisions: dict[str, str] = {}

    def openvino_engine(name: str, export: str, precision: str) -> Callable[[dict[str, Any]], Any]:
        model = load_openvino(exports[export].output_dir, threads=args.threads, precision=precision)
        precisions[name] = model.precision  # what OpenVINO computes in, read back from the compiled model
        return model.probabilities

    engines = {
        "pytorch_unmerged": torch_engine(unmerged),
        "pytorch_merged": torch_engine(merged),
        "onnx_fp32": onnx_engine(exports["onnx_fp32"].output_dir),
        "onnx_int8": onnx_engine(exports["onnx_int8"].output_dir),
        "openvino_fp32_default": openvino_engine("openvino_fp32_default", "openvino_fp32", "default"),
        "openvino_fp32_f32": openvino_engine("openvino_fp32_f32", "openvino_fp32", "f32"),
        "openvino_int8": openvino_engine("openvino_int8", "openvino_int8", "default"),
    }
    export_of = {"openvino_fp32_default": "openvino_fp32", "openvino_fp32_f32": "openvino_fp32"}
    for run in engines.values():  # warm-up: first calls allocate and pick kernels
        run(batches[0])
        run(singles[0])
    throughput: dict[str, list[float]] = {n: [] for n in engines}
    latency: dict[str, list[float]] = {n: [] for n in engines}
    predictions: dict[str, Any] = {}
    with tqdm(total=args.rounds * len(engines), desc="serving", unit="pass", file=sys.stderr) as bar:
        for _ in range(args.rounds):
            for name, run in engines.items():
                start = time.perf_counter()
                probs = np.concatenate([run(b) for b in batches])
                throughput[name].append(len(data.inputs) / (time.perf_counter() - start))
                predictions[name] = probs.argmax(-1)
                for single in singles:
                    start = time.perf_counter()
                    run(single)
                    latency[name].append(1000 * (time.perf_counter() - start))
                bar.update(1)

    reference = predictions["pytorch_unmerged"]
    rows = []
    base_tp = statistics.median(throughput["pytorch_merged"])
    base_p50 = percentile(latency["pytorch_merged"], 50)
    for name in engines:
        tp = statistics.median(throughput[name])
        rows.append(
            {
                "engine": name,
                "throughput_per_s": tp,
                "throughput_vs_merged": tp / base_tp,
                "latency_p50_ms": percentile(latency[name], 50),
                "latency_p95_ms": percentile(latency[name], 95),
                "latency_p50_vs_merged": percentile(latency[name], 50) / base_p50,
                "accuracy": float((predictions[name] == labels).mean()),
                "agreement_with_pytorch": float((predictions[name] == reference).mean()),
                "model_bytes": exports[export_of.get(name, name)].onnx_bytes
                if name in exports or name in export_of
                else None,
                "precision": precisions.get(name),
            }
        )
    verdict = _verdict(rows)
    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    record = {
        "command": command,
        "adapter": os.path.relpath(args.adapter, ROOT),
        "examples": len(data.inputs),
        "checked_on": data.described,
        "batch": args.batch,
        "latency_examples": len(singles),
        "rounds": args.rounds,
        "threads": args.threads,
        "rows": rows,
        "verdict": verdict,
        "export_checks": {n: r.check for n, r in exports.items()},
        "machine": machine_description() | {"cpu_flags": _cpu_flags()},
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "note": args.note,
        "versions": openvino_versions(),
    }
    table = render(record)
    print("\n" + table)
    for engine in ("onnx_int8", "openvino_int8"):
        print(
            f"ratio={engine} throughput / PyTorch merged {verdict[engine]['throughput_vs_merged']:.2f} "
            f"(target >= 2.0); accuracy {verdict[engine]['accuracy_change_points']:+.2f} points (target within 0.5)"
        )
    print(f"ratio=openvino_int8 / onnx_int8 throughput {verdict['openvino_int8_vs_onnx_int8']:.2f}")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_json(args.out + ".json", record)
        with open(args.out + ".md", "w", encoding="utf-8") as fh:
            fh.write(table + "\n")
        print(f"wrote {args.out}.json and {args.out}.md")


def _verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Each int8 engine against the targets (2x PyTorch merged's throughput at the batch, accuracy
    within 0.5 points of it), and OpenVINO's int8 against ONNX Runtime's."""
    by = {r["engine"]: r for r in rows}
    out: dict[str, Any] = {"target_throughput": 2.0, "target_accuracy_points": 0.5}
    for engine in ("onnx_int8", "openvino_int8"):
        out[engine] = {
            "throughput_vs_merged": by[engine]["throughput_vs_merged"],
            "accuracy_change_points": 100 * (by[engine]["accuracy"] - by["pytorch_merged"]["accuracy"]),
        }
    out["openvino_int8_vs_onnx_int8"] = by["openvino_int8"]["throughput_per_s"] / by["onnx_int8"]["throughput_per_s"]
    return out


def _cpu_flags() -> list[str]:
    """The CPU's flags that decide OpenVINO's and ONNX Runtime's kernels: AVX-512 (its VNNI int8 and
    BF16 parts) and AMX, from /proc/cpuinfo (Linux)."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
    except OSError:
        return []
    return [f for f in wanted if f in flags]


def render(record: dict[str, Any]) -> str:
    """The results as a markdown table with the command, machine and versions under it."""
    names = {
        "pytorch_unmerged": "PyTorch, adapter unmerged",
        "pytorch_merged": "PyTorch, merged",
        "onnx_fp32": "ONNX Runtime fp32",
        "onnx_int8": "ONNX Runtime int8",
        "openvino_fp32_default": "OpenVINO fp32 export, its default precision",
        "openvino_fp32_f32": "OpenVINO fp32 export, f32 forced",
        "openvino_int8": "OpenVINO NNCF int8",
    }
    lines = [
        f"| engine | throughput, batch {record['batch']} (examples/s) | vs merged | latency p50 / p95, batch 1 (ms) "
        "| vs merged (p50) | test accuracy | same label as PyTorch | model file |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        size = f"{r['model_bytes'] / 2**20:.0f} MiB" if r["model_bytes"] else "-"
        computes = f" (computes in {r['precision']})" if r.get("precision") else ""
        lines.append(
            f"| {names.get(r['engine'], r['engine'])}{computes} | {r['throughput_per_s']:,.0f} | "
            f"{r['throughput_vs_merged']:.2f}x | {r['latency_p50_ms']:.1f} / {r['latency_p95_ms']:.1f} | "
            f"{r['latency_p50_vs_merged']:.2f}x | {r['accuracy']:.4f} | {r['agreement_with_pytorch']:.2%} | "
            f"{size} |"
        )
    m, v, load = record["machine"], record["versions"], record.get("load_average")
    lines += [
        "",
        f"{record['examples']:,} test examples ({record['checked_on']}), {record['rounds']} rounds "
        f"(medians), {record['threads']} threads, the same tokenized batches for every engine. "
        f"Adapter: `{record['adapter']}`.",
        f"Command: `{record['command']}`",
        f"Machine: {m['cpu']}, {m['cores']} cores"
        + (f" ({', '.join(m['cpu_flags'])})" if m.get("cpu_flags") else "")
        + (f"; load average {load['before'][0]:.1f} before the run, {load['after'][0]:.1f} after" if load else "")
        + (f". {record['note']}" if record.get("note") else "")
        + ". Versions: "
        + ", ".join(
            f"{k} {v[k]}"
            for k in (
                "python",
                "torch",
                "transformers",
                "peft",
                "onnx",
                "onnxscript",
                "onnxruntime",
                "openvino",
                "nncf",
            )
            if k in v
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
