"""The GPU suite's dry run: the same script, a tiny model, the CPU. GPU sessions are rare and
short; a suite that broke since the last one would waste one, so it runs here every time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))


def test_dry_run_writes_every_section(tmp_path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    rows = {(case, r["strategy"]): r for case, c in results["cases"].items() for r in c["rows"]}
    assert set(rows) == {("strategies", "full"), ("strategies", "lora"), ("autofit_8gib", "full")}
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["peak_memory_bytes"] > 0 and row["predicted_peak_bytes"] > 0
        assert row["step_seconds_median"] > 0 and row["steady_tokens_per_second"] > 0
        assert row["model_flops_per_token"] > 0  # counted, though no MFU without a GPU peak
    assert rows[("autofit_8gib", "full")]["tried"], "the auto-fit ladder is recorded"
    assert results["overhead"]["ratio"] > 0
    assert {t["target"] for t in results["targets"]} >= {"full fine-tune MFU (data-sheet peak) >= 40%"}
    md = (out / "results.md").read_text()
    assert "| strategies | `lora` |" in md and "Auto-fit ladder" in md


def test_flops_per_token_follow_what_trains(tmp_path) -> None:
    """6N-style counting from the architecture: a frozen base saves its weight gradients, a frozen
    stack below the head saves its whole backward pass."""
    import suite

    made = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "make_llama.py"), "--size", "tiny",
                           "--out", str(tmp_path / "m")], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    seq = 32
    full = suite.train_flops_per_token(str(tmp_path / "m"), "full", seq)
    lora = suite.train_flops_per_token(str(tmp_path / "m"), "lora", seq)
    head = suite.train_flops_per_token(str(tmp_path / "m"), "head_only", seq)
    assert full["backward"] == pytest.approx(2 * full["forward"])  # weights and inputs: 4N + attention 8sd
    assert full["forward"] < lora["forward"] < 1.01 * full["forward"]  # the low-rank matrices add a little
    assert 0.9 * lora["forward"] < lora["backward"] < 1.2 * lora["forward"]  # input gradients only
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    # the output layer's weight gradient only: no input gradient, nothing below it
    assert head["backward"] == 2 * config["hidden_size"] * config["vocab_size"]


def test_spec_peak_table() -> None:
    import suite

    assert suite.spec_peak("NVIDIA H100 PCIe") == 756.0e12
    assert suite.spec_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert suite.spec_peak("NVIDIA H200") == 989.4e12
    assert suite.spec_peak("Some Future Card") is None
