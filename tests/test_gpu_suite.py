"""The GPU suite's dry run: the same script, a tiny model, the CPU. GPU sessions are rare and
short; a suite that broke since the last one would waste one, so it runs here every time. The dry
run here takes the cases with code paths of their own: peftkit against Trainer + peft (job a), a
lever that is refused on a CPU (Liger), one this peftkit may not have (--compile), packing on the
prompt/response pairs, and the per-strategy profile. The cases that are one more flag on the same
bench call (--loss plain, --kernels none, the strategies, the older levers), the auto-fit ladder and
the loop-overhead benchmark are left out to keep it fast (``run.sh --dry-run`` runs them all)."""

from __future__ import annotations

import argparse
import json
import os
import re
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
    proc = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "benchmarks", "gpu", "run.sh"),
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(work),
            "--cases",
            "vs_trainer,kernels_liger,compile,packing,profile",
            "--vs-jobs",
            "a",
            "--profile-runs",
            "lora,lora+liger",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, work


@pytest.mark.slow
def test_dry_run_writes_every_section(dry_run) -> None:
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    assert results["dry_run"] is True
    rows = results["cases"]["packing"]["rows"]
    assert [r["strategy"] for r in rows] == ["lora"]
    row = rows[0]
    assert row["status"] == "ok", row
    assert row["packing"] is True and row["padding_fraction"] is not None and row["levers"] == "packing"
    assert row["peak_memory_bytes"] > 0 and row["predicted_peak_bytes"] > 0, "the planner's prediction beside it"
    assert row["step_seconds_median"] > 0 and row["steady_tokens_per_second"] > 0
    assert row["model_flops_per_token"] > 0  # counted, though no MFU without a GPU peak
    assert "prompt/response pairs" in results["pairs"]
    names = {t["target"] for t in results["targets"]}
    assert {
        "full fine-tune MFU (data-sheet peak) >= 35%",
        "LoRA step time / full step time <= 0.70",
        "QLoRA-4bit peak / LoRA-bf16 peak <= 0.6",
        "peftkit / Trainer + peft step time <= 0.8 (job a)",
        "peftkit / Trainer + peft peak training memory <= 0.6 (job a)",
    } <= names
    planner = next(t for t in results["targets"] if t["target"].startswith("planner within ±15%"))
    # the packing row, and the compile row where this peftkit has --compile: every one predicted
    assert planner["value"] is not None and re.search(r"(\d) of \1 rows predicted", planner["shown"])
    stages = row["stage_seconds"]  # where start-up goes: the GPU sessions' runs were mostly start-up
    assert list(stages) == [
        "imports",
        "load_data",
        "load_model",
        "fingerprint",
        "prepare",
        "setup",
        "train",
        "evaluate",
        "save",
    ]
    assert all(v >= 0 for v in stages.values()) and sum(stages.values()) <= row["wall_seconds"] + 0.01
    md = (out / "results.md").read_text()
    assert "| packing | `lora` | packing |" in md and "| target | issue | measured | met |" in md
    assert "Where each run's time went" in md and "| imports | load data | load model | fingerprint |" in md
    assert "| packing | `--packing` | `lora` | pairs_padded (not measured) |" in md  # the lever table
    assert "| case | part | what | estimate | took | outcome |" in md


@pytest.mark.slow
def test_vs_trainer_case(dry_run) -> None:
    """peftkit against Trainer + peft on the suite's model (MiniLM's tokenizer saved in it): both
    sides train, the same losses, and the ratios reach the table and the targets."""
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    case = results["cases"]["vs_trainer"]
    assert "error" not in case, case
    assert "--device cpu --precision fp32" in case["command"] and "--variants default,packing" in case["command"]
    trainer, peftkit = case["jobs"]["a"]["rows"]
    assert trainer["label"] == "Trainer + peft" and trainer["status"] == "ok" and peftkit["status"] == "ok"
    assert trainer["step_seconds"] > 0 and peftkit["step_seconds"] > 0
    assert peftkit["step_time_ratio"] > 0 and peftkit["peak_train_ratio"] > 0 and peftkit["losses"] == "agree"
    target = next(t for t in results["targets"] if t["target"] == "peftkit / Trainer + peft step time <= 0.8 (job a)")
    assert target["value"] == pytest.approx(peftkit["step_time_ratio"])
    assert (out / "vs_trainer.json").exists()  # vs_trainer.py's own record, every run's figures
    md = (out / "results.md").read_text()
    assert "peftkit against Trainer + peft (`vs_trainer`" in md and "| Trainer + peft |" in md


@pytest.mark.slow
def test_refused_and_missing_levers_are_rows_not_failures(dry_run) -> None:
    """Liger is refused on a CPU (the bench's one line, as a row); a flag this peftkit lacks (--compile,
    added elsewhere) is "not available" without running anything."""
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    liger = results["cases"]["kernels_liger"]
    assert [r["status"] for r in liger["rows"]] == ["not applicable"] and "CUDA" in liger["rows"][0]["error"]
    compiled = results["cases"]["compile"]
    if compiled.get("not_available"):
        assert "--compile" in compiled["not_available"] and compiled["rows"] == []
    else:  # this peftkit has --compile: a row (refused on a CPU or measured), never a failed case
        assert compiled["rows"] and "error" not in compiled
    md = (out / "results.md").read_text()
    assert "| kernels_liger | `lora` | - | - | not applicable: --kernels liger" in md


@pytest.mark.slow
def test_profile_tables_per_strategy(dry_run) -> None:
    out, _ = dry_run
    results = json.loads((out / "results.json").read_text())
    runs = results["cases"]["profile"]["runs"]
    lora = runs["lora"]
    assert lora["status"] == "ok" and 1 <= len(lora["top"]) <= 10
    assert 0 < sum(k["share"] for k in lora["top"]) <= 1.0001 and sum(lora["families"].values()) == pytest.approx(1)
    assert runs["lora+liger"]["status"] == "refused" and "CUDA" in runs["lora+liger"]["error"]
    text = (out / "profile_lora.txt").read_text()
    assert "by own host time" in text and "aten::" in text
    md = (out / "results.md").read_text()
    assert "Where the device time goes" in md and "| share | time | calls | family | kernel |" in md
    assert "- `lora+liger`: refused:" in md


def test_parts_split_the_cases_and_part_two_continues_part_one(tmp_path) -> None:
    """Part 1 runs its cases and, with time left, part 2's; part 2 runs what part 1 did not finish
    first, then its own, then the optional ones; a flag is checked against this peftkit's bench."""
    import suite

    names = [c.name for c in suite.CASES]
    assert len(names) == len(set(names)) and all(b in names for b, _ in suite.BASELINES.values())

    def split(part, dry=False, done=None, retry=None, cases=None, no_overhead=False):
        ns = argparse.Namespace(cases=cases, part=part, no_overhead=no_overhead)
        core, optional = suite.select_cases(ns, dry, done, retry)
        return [c.name for c in core], [c.name for c in optional]

    core1, extra1 = split(1)
    assert core1[:2] == ["vs_trainer", "loss_plain"] and "strategies" in extra1 and "overhead" not in extra1
    core2, extra2 = split(2, done={"vs_trainer", "loss_plain", "packing"}, retry=["kernels_liger"])
    assert core2[0] == "kernels_liger" and "strategies" in core2 and "vs_trainer" not in core2
    assert "vs_trainer_1.5b" in extra2 and "overhead" in extra2
    assert split(2)[0][0] == "compile"  # no part 1 found: part 2's own cases only
    dry_core, dry_extra = split(None, dry=True, no_overhead=True)
    assert (
        not dry_extra and "qlora_4bit" not in dry_core and "overhead" not in dry_core and "vs_trainer_1.5b" in dry_core
    )
    assert split(None, cases="qlora_4bit,vs_trainer") == (["vs_trainer", "qlora_4bit"], [])
    # part 2 finds part 1's state only with the same settings
    state = {"part": 1, "settings": "S", "dry_run": False, "cases": {}}
    (tmp_path / "suite-state.json").write_text(json.dumps(state))
    assert suite.load_part_one(str(tmp_path), "S", False) == state
    assert suite.load_part_one(str(tmp_path), "other", False) is None
    assert suite.flags_unavailable(["--loss", "plain"]) is None
    assert "--no-such-lever" in suite.flags_unavailable(["--no-such-lever"])


@pytest.mark.slow
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
    script = (
        "import subprocess, sys, time\n"
        "w = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        f"open({str(pid_file)!r}, 'w').write(str(w.pid))\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
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
