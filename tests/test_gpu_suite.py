"""The GPU suite's dry run: the same script, a tiny model, the CPU. GPU sessions are rare and
short; a suite that broke since the last one would waste one, so it runs here every time (the
cases that add no code path of their own are left out to keep the test suite fast: the auto-fit
ladder and the loop-overhead benchmark have their own tests and benchmark)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks", "gpu"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """``run.sh --dry-run``: (results folder, scratch folder with the tiny model)."""
    tmp = tmp_path_factory.mktemp("gpu-suite")
    out, work = tmp / "out", tmp / "work"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu", "run.sh"), "--dry-run", "--out", str(out),
                           "--work", str(work), "--cases", "strategies,profile", "--strategies", "lora",
                           "--no-overhead"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, work


def test_dry_run_writes_every_section(dry_run) -> None:
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    rows = results["cases"]["strategies"]["rows"]
    assert [r["strategy"] for r in rows] == ["lora"]
    row = rows[0]
    assert row["status"] == "ok", row
    assert row["peak_memory_bytes"] > 0 and row["predicted_peak_bytes"] > 0, "the planner's prediction beside it"
    assert row["step_seconds_median"] > 0 and row["steady_tokens_per_second"] > 0
    assert row["model_flops_per_token"] > 0  # counted, though no MFU without a GPU peak
    assert {t["target"] for t in results["targets"]} >= {"full fine-tune MFU (data-sheet peak) >= 40%"}
    stages = row["stage_seconds"]  # where start-up goes: the GPU sessions' runs were mostly start-up
    assert list(stages) == ["imports", "load_data", "load_model", "fingerprint", "prepare", "setup", "train",
                            "evaluate", "save"]
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= row["wall_seconds"] + 0.01
    md = (out / "results.md").read_text()
    assert "| strategies | `lora` |" in md and "| target | measured | met |" in md
    assert "Where each run's time went" in md and "| imports | load data | load model | fingerprint |" in md
    profile = (out / "profile_lora.txt").read_text()
    assert "by own host time" in profile and "aten::" in profile


def test_flops_per_token_follow_what_trains(dry_run) -> None:
    """6N-style counting from the architecture: a frozen base saves its weight gradients, a frozen
    stack below the head saves its whole backward pass."""
    import suite

    model = str(dry_run[1] / "llama-tiny")
    seq = 32
    full = suite.train_flops_per_token(model, "full", seq)
    lora = suite.train_flops_per_token(model, "lora", seq)
    head = suite.train_flops_per_token(model, "head_only", seq)
    assert full["backward"] == pytest.approx(2 * full["forward"])  # weights and inputs: 4N + attention 8sd
    assert full["forward"] < lora["forward"] < 1.01 * full["forward"]  # the low-rank matrices add a little
    assert 0.9 * lora["forward"] < lora["backward"] < 1.2 * lora["forward"]  # input gradients only
    config = json.loads(open(os.path.join(model, "config.json")).read())
    # the output layer's weight gradient only: no input gradient, nothing below it
    assert head["backward"] == 2 * config["hidden_size"] * config["vocab_size"]


def test_spec_peak_table() -> None:
    import suite

    assert suite.spec_peak("NVIDIA H100 PCIe") == 756.0e12
    assert suite.spec_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert suite.spec_peak("NVIDIA H200") == 989.4e12
    assert suite.spec_peak("Some Future Card") is None


def test_a_case_killed_at_the_time_limit_takes_the_workers_in_their_own_sessions_too(tmp_path) -> None:
    """The bench's workers run in sessions of their own; killing the bench's process group alone
    left one training on beside the next case (second H200 session). run_logged kills them all."""
    import time

    from suite import run_logged

    pid_file = tmp_path / "worker.pid"
    # a "bench" that starts a "worker" in a new session, as peftkit's bench does, then waits
    script = ("import subprocess, sys, time\n"
              "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
              f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
              "print('started', flush=True)\n"
              "time.sleep(60)\n")
    code, seconds = run_logged([sys.executable, "-c", script], str(tmp_path / "case.log"), timeout=3)
    assert code is None and seconds < 30
    worker = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while os.path.exists(f"/proc/{worker}") and time.monotonic() < deadline:
        # a killed child of a killed parent is reaped by init; until then it is a zombie
        with open(f"/proc/{worker}/stat", encoding="utf-8") as fh:
            if fh.read().rsplit(")", 1)[1].split()[0] == "Z":
                break
        time.sleep(0.1)
    else:
        assert not os.path.exists(f"/proc/{worker}"), "the worker outlived the killed bench"
    log = (tmp_path / "case.log").read_text()
    assert "started" in log and "killed after 3 s" in log


def test_a_bench_killed_after_writing_its_results_keeps_its_rows(tmp_path, monkeypatch) -> None:
    """QLoRA's row was lost in the second H200 session: its bench had written results.json and
    was killed on its way out. A results.json that exists is read, whatever the exit."""
    import suite

    work, out = tmp_path / "work", tmp_path / "out"
    row = {"strategy": "lora", "seed": 0, "status": "ok", "peak_memory_bytes": 1}

    def killed_after_writing(cmd, log_path, timeout):
        bench_dir = cmd[cmd.index("--output-dir") + 1]
        os.makedirs(bench_dir)
        with open(os.path.join(bench_dir, "results.json"), "w", encoding="utf-8") as fh:
            json.dump({"rows": [row], "versions": {}, "device": "cuda"}, fh)
        with open(os.path.join(bench_dir, "results.md"), "w", encoding="utf-8") as fh:
            fh.write("| x |\n")
        return None, timeout  # killed

    monkeypatch.setattr(suite, "run_logged", killed_after_writing)
    case = suite.bench_case("qlora_4bit", "lora", ["--quantize", "4bit"], [], str(work), str(out), 5)
    assert case["rows"] == [row] and "error" not in case and "after writing its results" in case["note"]
