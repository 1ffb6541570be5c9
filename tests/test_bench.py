"""`peftkit bench`: the micro-batch search, the report, the plots, memory measurement, end to end."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from peftkit.benchmark.config import BenchConfig, parse_seeds, parse_strategies
from peftkit.benchmark.ladder import bench_one, micro_batches
from peftkit.benchmark.suite import run_suite
from peftkit.benchmark.worker import Attempt
from peftkit.config import Levers
from peftkit.errors import PeftkitError
from peftkit.memory import MemoryBudgetExceeded, MemoryMeter, check_budget, format_size, parse_size
from peftkit.plots import pareto_front

# -- parsing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("4GiB", 4 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5G", 1_500_000_000),
        ("8GB", 8_000_000_000),
        ("100", 100),
        (" 2 kib ", 2048),
    ],
)
def test_parse_size(text, expected) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["4XB", "GiB", "-1GiB", "0MiB", "four"])
def test_parse_size_refuses_nonsense(text) -> None:
    with pytest.raises(PeftkitError, match="memory size"):
        parse_size(text)


def test_format_size() -> None:
    assert format_size(3 * 2**30) == "3.00 GiB" and format_size(5 * 2**20) == "5 MiB" and format_size(10) == "10 B"


@pytest.mark.parametrize(
    "effective,expected", [(32, [32, 16, 8, 4, 2, 1]), (24, [24, 12, 6, 3, 1]), (7, [7, 1]), (1, [1])]
)
def test_micro_batches_divide_the_effective_batch(effective, expected) -> None:
    assert micro_batches(effective) == expected
    assert all(effective % b == 0 for b in expected)


def test_parse_strategies_and_seeds() -> None:
    assert parse_strategies("head-only,lora,head_only") == ["head_only", "lora"]
    assert {"full", "lora", "head_only", "adapter", "prefix", "gradual_unfreeze"} <= set(parse_strategies("all"))
    with pytest.raises(PeftkitError, match="unknown strategy 'nope'"):
        parse_strategies("lora,nope")
    assert parse_seeds("0, 2,2") == [0, 2]
    with pytest.raises(PeftkitError, match="got '-1'"):
        parse_seeds("0,-1")


def test_pareto_front() -> None:
    points = {"a": (1.0, 0.70), "b": (2.0, 0.80), "c": (3.0, 0.75), "d": (4.0, 0.85), "e": (2.0, 0.60)}
    assert pareto_front(points) == ["a", "b", "d"]


# -- the micro-batch search, with a stand-in for the worker process -----------------------------


def _metrics(strategy: str, batch: int, accum: int, acc: float = 0.8) -> dict:
    return {
        "test_accuracy": acc,
        "test_f1_macro": acc - 0.01,
        "validation_accuracy": acc,
        "best_epoch": 1,
        "epochs_run": 2,
        "trainable_params": 10,
        "total_params": 100,
        "trainable_percent": 10.0,
        "peak_memory_bytes": 2**30 * batch,
        "peak_memory_eval_bytes": 2**29,
        "memory_loaded_bytes": 2**29,
        "peak_memory_increase_bytes": 2**29,
        "peak_reserved_bytes": None,
        "peak_reserved_eval_bytes": None,
        "peak_memory_method": "test",
        "train_seconds": 10.0 * batch,
        "eval_seconds": 1.0,
        "samples_per_second": 100.0,
        "adapter_bytes": 1000 * batch,
        "batch_size": batch,
        "grad_accumulation": accum,
        "effective_batch_size": batch * accum,
        "device": "cpu",
        "history": [
            {"epoch": 1, "validation_accuracy": acc - 0.1, "epoch_seconds": 8.0},
            {"epoch": 2, "validation_accuracy": acc, "epoch_seconds": 2.0},
        ],
        "versions": {"torch": "x"},
    }


class FakeRunner:
    """Out of memory above ``fits_at``; records every config it was given."""

    def __init__(self, fits_at: dict[str, int], fail: set[str] = frozenset()) -> None:
        self.fits_at, self.fail, self.calls = fits_at, fail, []

    def __call__(self, cfg, log_path: str) -> Attempt:
        self.calls.append(cfg)
        if cfg.strategy in self.fail:
            return Attempt("failed", cfg.batch_size, "boom")
        if cfg.batch_size > self.fits_at[cfg.strategy]:
            return Attempt("oom", cfg.batch_size, "out of memory")
        return Attempt("ok", cfg.batch_size, metrics=_metrics(cfg.strategy, cfg.batch_size, cfg.grad_accumulation))


def test_bench_one_halves_until_it_fits_and_keeps_the_effective_batch(tmp_path) -> None:
    bench = BenchConfig(strategies=["lora"], batch_size=32, eval_batch_size=128, memory_budget="1GiB")
    runner = FakeRunner({"lora": 8})
    row = bench_one(bench, "lora", 0, str(tmp_path), (0, 32), runner, lambda m: None)
    assert [c.batch_size for c in runner.calls] == [32, 16, 8]
    assert [c.batch_size * c.grad_accumulation for c in runner.calls] == [32, 32, 32]
    assert [c.eval_batch_size for c in runner.calls] == [128, 64, 32]
    assert all(c.memory_budget == "1GiB" for c in runner.calls)
    assert row["status"] == "ok" and row["batch_size"] == 8 and row["grad_accumulation"] == 4
    assert [t["outcome"] for t in row["tried"]] == ["oom", "oom", "ok"]


def test_bench_one_reports_does_not_fit_and_failures(tmp_path) -> None:
    bench = BenchConfig(strategies=["full", "lora"], batch_size=4, memory_budget="1MiB")
    row = bench_one(bench, "full", 0, str(tmp_path), (0, 4), FakeRunner({"full": 0}), lambda m: None)
    assert row["status"] == "does not fit" and [t["batch_size"] for t in row["tried"]] == [4, 2, 1]
    assert "micro-batch 4, 2, 1" in row["error"] and "1MiB" in row["error"] and "skipped" not in row["error"]
    runner = FakeRunner({"lora": 4}, fail={"lora"})
    row = bench_one(bench, "lora", 0, str(tmp_path), (0, 4), runner, lambda m: None)
    assert row["status"] == "failed" and row["error"] == "boom" and len(runner.calls) == 1  # no halving on a bug


def test_run_suite_writes_results_report_and_plots(tmp_path) -> None:
    bench = BenchConfig(
        strategies=["full", "lora", "head_only"],
        seeds=[0, 1],
        batch_size=32,
        memory_budget="2GiB",
        command="peftkit bench --test",
    )
    runner = FakeRunner({"full": 0, "lora": 8, "head_only": 32})
    results = run_suite(bench, str(tmp_path), lambda m: None, runner=runner)
    # seed 1 of lora starts at the micro-batch seed 0 found, instead of going through OOM again
    lora_calls = [c.batch_size for c in runner.calls if c.strategy == "lora"]
    assert lora_calls == [32, 16, 8, 8]
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["summary"]["full"]["status"] == "does not fit"
    assert on_disk["summary"]["lora"]["batch_size"] == 8 and on_disk["summary"]["lora"]["seeds"] == [0, 1]
    assert on_disk["versions"]["torch"] == "x"  # the workers' versions, not the parent's
    assert "plugins" in on_disk and on_disk["machine"]["cores"] and on_disk["command"] == "peftkit bench --test"
    for row in on_disk["rows"]:
        assert {
            "strategy",
            "seed",
            "status",
            "test_accuracy",
            "test_f1_macro",
            "trainable_params",
            "total_params",
            "peak_memory_bytes",
            "train_seconds",
            "samples_per_second",
            "adapter_bytes",
            "batch_size",
            "grad_accumulation",
            "device",
        } <= set(row) or row["status"] != "ok"
    md = (tmp_path / "results.md").read_text()
    assert "| `full` | does not fit" in md
    # the fake's memory grows with the micro-batch: lora (8 GiB) beats head_only (32 GiB) and is bold
    assert "**8.00 GiB**" in md and "**32.00 GiB**" not in md
    for png in ("accuracy_vs_memory.png", "accuracy_vs_time.png", "validation_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert results["summary"]["head_only"]["later_epoch_seconds_mean"] == 2.0


class ScoredRunner(FakeRunner):
    """Every run fits; each strategy scores its own test accuracy, over ``epochs`` epochs."""

    def __init__(self, accuracy: dict[str, float], epochs: int = 2) -> None:
        super().__init__({name: 10**6 for name in accuracy})
        self.accuracy, self.epochs = accuracy, epochs

    def __call__(self, cfg, log_path: str) -> Attempt:
        metrics = _metrics(cfg.strategy, cfg.batch_size, cfg.grad_accumulation, self.accuracy[cfg.strategy])
        metrics["history"] = metrics["history"][-self.epochs :]
        return Attempt("ok", cfg.batch_size, metrics=metrics)


def test_the_report_shows_the_majority_baseline_and_flags_what_does_not_beat_it(tmp_path) -> None:
    """Issue 15: LoRA at 0.585 / F1 0.369 in a short run was the majority class; the report says so."""
    bench = BenchConfig(strategies=["full", "lora", "head_only"], seeds=[0, 1], command="peftkit bench --test")
    runner = ScoredRunner({"full": 0.83, "lora": 0.585, "head_only": 0.58})
    baselines = {
        0: {"name": "majority class", "predicts": "positive", "accuracy": 0.59, "f1_macro": 0.37},
        1: {"name": "majority class", "predicts": "positive", "accuracy": 0.58, "f1_macro": 0.36},
    }
    results = run_suite(bench, str(tmp_path), lambda m: None, runner=runner, baselines=baselines)
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["baseline"]["accuracy"] == pytest.approx(0.585) and on_disk["baseline"]["predicts"] == "positive"
    assert on_disk["baseline"]["seeds"]["1"]["accuracy"] == 0.58 and results["baseline"] == on_disk["baseline"]
    md = (tmp_path / "results.md").read_text()
    # not above the baseline: equal (lora) and below (head_only) are flagged, full is not
    assert "| `lora` † |" in md and "| `head_only` † |" in md and "| `full` |" in md
    assert (
        "Baseline, majority class (always `positive`, the most frequent of the test split): test accuracy "
        "0.5850, macro-F1 0.3650, mean over seeds."
    ) in md
    assert (
        "† not better than the baseline's test accuracy: each may have learned no more than always to answer "
        "`positive`." in md
    )
    # the same results make the same report, byte for byte
    from peftkit.benchmark.report import markdown_report

    assert markdown_report(on_disk, ["accuracy_vs_memory.png", "accuracy_vs_time.png", "validation_curves.png"]) == md


def test_a_one_epoch_suite_skips_the_validation_curves_and_says_why(tmp_path) -> None:
    bench = BenchConfig(strategies=["lora", "head_only"], epochs=1)
    run_suite(bench, str(tmp_path), lambda m: None, runner=ScoredRunner({"lora": 0.8, "head_only": 0.7}, epochs=1))
    md = (tmp_path / "results.md").read_text()
    assert not (tmp_path / "validation_curves.png").exists() and "validation_curves" not in md
    assert "(no validation curves: every strategy trained one epoch, so each has a single validation point" in md
    assert (tmp_path / "accuracy_vs_memory.png").exists() and "Baseline" not in md  # none given: no line


# -- memory measurement -------------------------------------------------------------------------


def test_cpu_meter_resets_its_peak_between_phases() -> None:
    meter = MemoryMeter("cpu")
    if not meter.resettable:
        pytest.skip("this system cannot reset the peak resident set (/proc/self/clear_refs)")
    meter.reset_peak()
    base = meter.peak()
    block = bytearray(200 * 2**20)  # touched: bytearray zero-fills, so the pages are resident
    assert meter.peak() >= base + 150 * 2**20
    del block
    meter.reset_peak()
    assert meter.peak() < base + 100 * 2**20
    with pytest.raises(MemoryBudgetExceeded, match="went over the budget 1 MiB during a test; the loaded model"):
        check_budget(meter, 2**20, "a test", loaded=meter.current())
    check_budget(meter, 2**40, "a test")  # a budget that holds raises nothing


# -- end to end, real worker processes on a tiny model ---------------------------------------


def _bench_args(model_dir: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        "bench",
        "--model",
        model_dir,
        "--dataset",
        data,
        "--output-dir",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        *extra,
    ]


def test_bench_end_to_end(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "bench"
    code, stdout, stderr = run_cli(
        *_bench_args(tiny_model_dir("bert"), tiny_csv, str(out), "--strategies", "lora,peft:ia3")
    )
    assert code == 0, stderr
    results = json.load(open(out / "results.json"))
    assert [(r["strategy"], r["status"]) for r in results["rows"]] == [("lora", "ok"), ("peft:ia3", "ok")]
    # the guessed columns are said once and recorded, for the suite and each of its runs
    assert (
        stderr.count("text column 'text', label column 'label' (guessed; --text-column/--label-column to choose)") == 1
    )
    assert (results["settings"]["text_column"], results["settings"]["label_column"]) == ("text", "label")
    for row in results["rows"]:
        assert row["batch_size"] == 8 and row["grad_accumulation"] == 1 and len(row["history"]) == 2
        assert row["peak_memory_bytes"] > row["memory_loaded_bytes"] * 0.9 > 0
        assert ":" not in row["run_dir"] and os.path.isfile(out / row["run_dir"] / "metrics.json")
        assert os.path.isdir(out / row["run_dir"] / "adapter")
        assert yaml.safe_load(open(out / row["run_dir"] / "config.yaml"))["text_column"] == "text"
    assert results["command"].startswith("peftkit bench --strategies lora,peft:ia3")
    # tiny_csv is half pos, half neg: a stratified test split of 20 is a tie, broken to the first label
    assert results["baseline"]["predicts"] == "neg" and results["baseline"]["accuracy"] == 0.5
    assert "| `lora`" in stdout and "results.md" in stdout and "Baseline, majority class (always `neg`" in stdout
    # each run said which of the 20 test examples it got right: the two are paired on them
    assert all(len(r["per_example_correct"]) == 20 for r in results["rows"])
    other = next(n for n in ("lora", "peft:ia3") if n != results["comparison"]["best"])
    assert results["comparison"]["strategies"][other]["examples"] == 20
    assert "One seed: the ranking carries no interval across seeds" in stdout
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging directory left


def test_bench_under_an_impossible_budget_reports_does_not_fit(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "bench"
    code, _, stderr = run_cli(
        *_bench_args(
            tiny_model_dir("bert"),
            tiny_csv,
            str(out),
            "--strategies",
            "lora",
            "--batch-size",
            "2",
            "--memory-budget",
            "1MiB",
        )
    )
    assert code == 0, stderr  # a strategy that does not fit is a result, not a crash
    row = json.load(open(out / "results.json"))["rows"][0]
    assert row["status"] == "does not fit"
    # the planner rules micro-batch 2 out; the last candidate is always run, so "does not fit" is measured
    assert [(t["batch_size"], t["grad_accumulation"], t["outcome"]) for t in row["tried"]] == [
        (2, 1, "skipped"),
        (1, 2, "oom"),
    ]
    assert "predicted" in row["tried"][0]["error"] and "went over the budget 1 MiB" in row["tried"][1]["error"]
    assert not (out / "runs").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "lora,nope"], "unknown strategy 'nope'"),
        (["--seeds", "0,x"], "--seeds expects"),
        (["--memory-budget", "lots"], "memory size 'lots'"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
        (["--dataset", "missing.csv"], "data file not found: missing.csv"),
    ],
)
def test_bench_bad_input_is_one_line_and_writes_nothing(args, message, run_cli, tmp_path) -> None:
    out = tmp_path / "bench"
    code, _, stderr = run_cli("bench", "--output-dir", str(out), *args)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_bench_refuses_an_existing_output_dir(run_cli, tmp_path) -> None:
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "keep.txt").write_text("mine")
    code, _, stderr = run_cli("bench", "--output-dir", str(tmp_path / "bench"), "--strategies", "lora")
    assert code == 2 and "already exists" in stderr
    assert (tmp_path / "bench" / "keep.txt").read_text() == "mine"


def _tiny_lora_run(run_cli, model: str, data: str, out, *flags: str) -> tuple[int, str, str]:
    """``peftkit run --strategy lora`` on the tiny BERT and CSV, 16 tokens, with ``flags``."""
    return run_cli(
        "run", "--model", model, "--dataset", data, "--output-dir", str(out), "--strategy", "lora",
        "--max-length", "16", *flags,
    )  # fmt: skip


def test_run_over_its_memory_budget_stops_with_one_line(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, stderr = _tiny_lora_run(run_cli, tiny_model_dir("bert"), tiny_csv, out, "--memory-budget", "1MiB")
    last = stderr.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: peak memory") and "Traceback" not in stderr
    assert "went over the budget 1 MiB during training at micro-batch 32" in last
    assert not out.exists()


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="glibc's allocator")
def test_a_cpu_run_with_a_budget_returns_free_memory_between_blocks_and_says_so(
    run_cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch
) -> None:
    """A CPU run given a --memory-budget is lean (env.lean_host_memory): its training steps return the
    heap's free pages between transformer blocks (memory.HeapTrimsBetweenBlocks: here after every
    block, the tiny BERT's outputs being far below the real threshold), the peak the planner predicts;
    metrics.json says how often and in how long, and its peak_memory_method says so. One without a
    budget returns nothing and says nothing of it."""
    import peftkit.memory as memory

    monkeypatch.setattr(memory, "TRIM_EVERY_BYTES", 1)
    runs = {}
    for name, budget in (("lean", ["--memory-budget", "64GiB"]), ("plain", [])):
        out = tmp_path / name
        code, _, stderr = _tiny_lora_run(run_cli, tiny_model_dir("bert"), tiny_csv, out, "--epochs", "1", *budget)
        assert code == 0, stderr
        runs[name] = json.loads((out / "metrics.json").read_text())
    lean, plain = runs["lean"], runs["plain"]
    assert "of transformer-block outputs" in lean["peak_memory_method"]
    assert "(--memory-budget)" in lean["peak_memory_method"]
    assert lean["heap_trims"] > 0 and lean["heap_trim_seconds"] >= 0
    assert "returned" not in plain["peak_memory_method"] and plain["heap_trims"] is None


# -- --auto-fit: levers in order, guided by the planner's predictions ----------------------------


def test_lever_rungs_add_levers_in_order_and_skip_what_a_strategy_cannot_take() -> None:
    from peftkit.benchmark.ladder import describe_levers, lever_rungs
    from peftkit.registry import get_strategy

    bench = BenchConfig(strategies=["lora"], memory_budget="1GiB", auto_fit=True)
    assert [describe_levers(r) for r in lever_rungs(bench, get_strategy("lora"))] == [
        "-",
        "bf16",
        "bf16 + checkpointing",
        "bf16 + checkpointing + adamw8bit",
        "bf16 + checkpointing + adamw8bit + 4bit base",
    ]
    # a full fine-tune cannot train a quantized base: that rung is not offered
    assert describe_levers(lever_rungs(bench, get_strategy("full"))[-1]) == "bf16 + checkpointing + adamw8bit"
    # without --auto-fit only the suite's own levers are used
    assert lever_rungs(BenchConfig(strategies=["lora"], memory_budget="1GiB"), get_strategy("lora")) == [Levers()]


def test_auto_fit_skips_what_the_planner_rules_out_and_reports_the_levers_used(tmp_path) -> None:
    bench = BenchConfig(
        strategies=["full"],
        task="sequence-classification",
        model="minilm",
        batch_size=32,
        memory_budget="10GiB",
        auto_fit=True,
    )

    class NeedsCheckpointing(FakeRunner):
        def __call__(self, cfg, log_path):
            self.calls.append(cfg)
            if not cfg.levers.gradient_checkpointing or cfg.batch_size > 8:
                return Attempt("oom", cfg.batch_size, "out of memory")
            return Attempt("ok", cfg.batch_size, metrics=_metrics(cfg.strategy, cfg.batch_size, cfg.grad_accumulation))

    def predict(strategy, levers, micro):  # wrong in one place (bf16 at 4 fits, it says), as planners are
        if levers.gradient_checkpointing:
            return micro * 2**30
        return 2**40 if micro > 4 else 2**30

    runner = NeedsCheckpointing({})
    row = bench_one(bench, "full", 0, str(tmp_path), (0, 32), runner, lambda m: None, predict)
    assert [(c.batch_size, c.levers.precision, c.levers.gradient_checkpointing) for c in runner.calls] == [
        (4, "fp32", False),
        (2, "fp32", False),
        (1, "fp32", False),  # predicted to fit: tried, did not
        (4, "bf16", False),
        (2, "bf16", False),
        (1, "bf16", False),
        (8, "bf16", True),
    ]  # 32 and 16 predicted over 10 GiB
    assert row["status"] == "ok" and row["levers"] == "bf16 + checkpointing" and row["batch_size"] == 8
    assert row["predicted_peak_bytes"] == 8 * 2**30
    skipped = [t for t in row["tried"] if t["outcome"] == "skipped"]
    assert len(skipped) == 8 and all("predicted" in t["error"] for t in skipped)


@pytest.mark.parametrize("how", ["ctrl-c", pytest.param("kill", marks=pytest.mark.slow)])
def test_interrupting_a_bench_says_so_once_and_leaves_nothing_behind(how, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) and ``kill`` (SIGTERM to
    the command) stop the suite and its running worker, remove the staged output, and print one
    line: no worker traceback, no library warning (issue 15 printed both before it)."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bench"
    # a session of its own: the test's process group must not get the Ctrl-C
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "peftkit.cli",
            *_bench_args(tiny_model_dir("bert"), tiny_csv, str(out), "--epochs", "50"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        # a suite started in the background (`cmd &` in a script, nohup) inherits an ignored
        # SIGINT, and Python then never turns Ctrl-C into KeyboardInterrupt: give the bench
        # the terminal's default, as a user's shell does
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not any((p / "runs").is_dir() for p in tmp_path.glob(".bench.partial*")):
        time.sleep(0.2)
    time.sleep(2)  # the first worker is loading or training
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == (130 if how == "ctrl-c" else 143), err  # 128 + the signal, as shells say
    assert lines[-1] == "error: interrupted; nothing was written", err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err and "couldn't be hashed" not in err, err
    assert max(len(line) for line in lines) < 300, err  # no warning listing thousands of indices
    assert list(tmp_path.iterdir()) == []


def test_datasets_hashing_warning_is_silenced() -> None:
    """A Ctrl-C inside datasets' fingerprint hashing made it warn with every one of 12,752 indices."""
    import logging

    from peftkit.env import quiet_libraries

    quiet_libraries()
    assert not logging.getLogger("datasets.fingerprint").isEnabledFor(logging.WARNING)


def test_a_lever_a_strategy_cannot_take_makes_a_not_applicable_row(tmp_path) -> None:
    bench = BenchConfig(strategies=["full", "lora"], levers=Levers(quantize="4bit"))
    runner = FakeRunner({"full": 32, "lora": 32})
    results = run_suite(bench, str(tmp_path), lambda m: None, runner=runner)
    assert [c.strategy for c in runner.calls] == ["lora"]  # no process started for the refused one
    assert results["summary"]["full"]["status"] == "not applicable"
    assert "trains the base model's own weights" in results["summary"]["full"]["error"]
    assert "| `full` | not applicable:" in (tmp_path / "results.md").read_text()


# -- how sure the ranking is: intervals over seeds, paired tests over examples ---------------------


class CorrectRunner(FakeRunner):
    """Every run fits; ``correct(strategy, seed)`` is the run's per-example record, and its test
    accuracy is that record's mean (as a real run's is)."""

    def __init__(self, correct) -> None:
        super().__init__({})
        self.correct = correct

    def __call__(self, cfg, log_path: str) -> Attempt:
        record = self.correct(cfg.strategy, cfg.seed)
        metrics = _metrics(cfg.strategy, cfg.batch_size, cfg.grad_accumulation, record.count("1") / len(record))
        return Attempt("ok", cfg.batch_size, metrics={**metrics, "per_example_correct": record})


def _record(right: range, n: int = 1000) -> str:
    return "".join("1" if i in right else "0" for i in range(n))


def test_the_report_gives_intervals_and_says_what_cannot_be_told_from_the_best(tmp_path) -> None:
    """Of 1,000 test examples per seed, full gets 850+seed right; lora misses 8 of those and gets 6
    others (0.2 points behind: not distinguishable); head_only gets 700+seed (15 points: clearly)."""
    correct = {
        "full": lambda s: _record(range(0, 850 + s)),
        "lora": lambda s: _record(range(8, 856 + s)),
        "head_only": lambda s: _record(range(0, 700 + s)),
    }
    bench = BenchConfig(strategies=["lora", "full", "head_only"], seeds=[0, 1, 2], command="peftkit bench --test")
    results = run_suite(bench, str(tmp_path), lambda m: None, runner=CorrectRunner(lambda n, s: correct[n](s)))
    on_disk = json.load(open(tmp_path / "results.json"))
    full = on_disk["summary"]["full"]
    assert full["test_accuracy_mean"] == pytest.approx(0.851)
    # 0.850, 0.851, 0.852: sd 0.001, half-width t(0.975, 2) * 0.001 / sqrt(3) = 0.00248
    assert full["test_accuracy_ci95"] == pytest.approx([0.851 - 0.00248413, 0.851 + 0.00248413], abs=1e-7)
    comparison = on_disk["comparison"]
    assert comparison["best"] == "full" and set(comparison["strategies"]) == {"lora", "head_only"}
    lora, head = comparison["strategies"]["lora"], comparison["strategies"]["head_only"]
    assert lora["difference"] == pytest.approx(-0.002) and lora["verdict"] == "not distinguishable"
    assert (lora["examples"], lora["only_this_right"], lora["only_best_right"]) == (3000, 18, 24)
    assert lora["ci95"][0] < 0 < lora["ci95"][1] and lora["p_value"] > 0.05 and lora["seeds"] == [0, 1, 2]
    assert head["difference"] == pytest.approx(-0.15) and head["verdict"] == "distinguishable"
    assert head["ci95"][1] < 0 and head["p_value"] < 0.001 and head["mcnemar_p"] < 1e-6
    md = (tmp_path / "results.md").read_text()
    assert "| test accuracy (± 95% CI) |" in md and "| **0.8510** ± 0.0025 (n=3, sd 0.0010) |" in md
    l_low, l_high = (f"{100 * x:+.1f}" for x in lora["ci95"])
    assert (
        f"Not distinguishable from the best (`full`) at the 95% level: `lora` (difference -0.2 points, "
        f"95% CI [{l_low}, {l_high}], p = {lora['p_value']:.2f})."
    ) in md
    assert "Distinguishable from it: `head_only` (difference -15.0 points, 95% CI [" in md and "p < 0.001)." in md
    assert "One seed" not in md and "paired bootstrap resamples" in md
    from peftkit.benchmark.report import markdown_report

    assert markdown_report(on_disk, ["accuracy_vs_memory.png", "accuracy_vs_time.png", "validation_curves.png"]) == md
    assert results["comparison"] == comparison


def test_a_one_seed_report_says_its_ranking_has_no_interval(tmp_path) -> None:
    correct = {"full": _record(range(0, 850)), "lora": _record(range(0, 845))}
    bench = BenchConfig(strategies=["full", "lora"], seeds=[0])
    run_suite(bench, str(tmp_path), lambda m: None, runner=CorrectRunner(lambda n, s: correct[n]))
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["summary"]["full"]["test_accuracy_ci95"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| test accuracy (± sd) |" in md and "| **0.8500** (n=1) |" in md
    assert "One seed: the ranking carries no interval across seeds" in md
    assert "The paired test below is over that seed's test examples" in md
    # 5 discordant examples, all one way: McNemar's p = 2 / 2^5
    assert on_disk["comparison"]["strategies"]["lora"]["mcnemar_p"] == pytest.approx(2 / 32)
    assert "Not distinguishable from the best (`full`) at the 95% level: `lora` (difference -0.5 points" in md
    assert "p = 0.062)" in md  # McNemar's: the bootstrap alone would have called it (p about 0.01)


def test_runs_without_a_per_example_record_get_no_paired_test(tmp_path) -> None:
    """A task that cannot say which examples were right (or a record that is not of the ranked
    figure) leaves the strategy out of the verdicts, and the report says so."""
    bench = BenchConfig(strategies=["full", "lora"], seeds=[0, 1])
    run_suite(bench, str(tmp_path), lambda m: None, runner=ScoredRunner({"full": 0.83, "lora": 0.80}))
    on_disk = json.load(open(tmp_path / "results.json"))
    assert on_disk["comparison"]["strategies"]["lora"] == {"verdict": "no per-example record", "seeds": []}
    md = (tmp_path / "results.md").read_text()
    assert "No paired test for `lora`: its runs (or `full`'s) recorded no per-example correctness" in md
    assert "Not distinguishable" not in md and "paired bootstrap resamples" not in md


@pytest.mark.parametrize("name", ["bench_cpu", "bench_cpu_budget", "bench_cpu_causal", "bench_cpu_image"])
def test_committed_results_without_intervals_still_render_as_before(name) -> None:
    from peftkit.benchmark.report import markdown_report

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", name, "results.json")
    results = json.load(open(path))
    md = markdown_report(results, ["accuracy_vs_memory.png"])
    assert "(± sd) |" in md and "95% CI" not in md and "istinguishable" not in md and "One seed" not in md
    assert "(± sample standard deviation when there are several)" in md


def test_plot_error_bars_are_the_95_interval_over_seeds_where_known() -> None:
    from peftkit.plots import _error_bar

    assert _error_bar(
        {"test_accuracy_ci95": [0.80, 0.86], "test_accuracy_std": 0.01}, "test_accuracy"
    ) == pytest.approx(0.03)
    assert _error_bar({"test_accuracy_ci95": None, "test_accuracy_std": None}, "test_accuracy") == 0  # one seed
    assert _error_bar({"test_accuracy_std": 0.01}, "test_accuracy") == 0.01  # results from before intervals


# -- bench --tune ------------------------------------------------------------------------------


class TunedRunner(FakeRunner):
    """Every run fits; a run with the tuned learning rate scores ``tuned``, any other ``default``."""

    def __init__(self, default: float, tuned: float, lr: float) -> None:
        super().__init__({})
        self.default, self.tuned, self.lr = default, tuned, lr

    def __call__(self, cfg, log_path: str) -> Attempt:
        self.calls.append(cfg)
        acc = self.tuned if cfg.lr == self.lr else self.default
        metrics = _metrics(cfg.strategy, cfg.batch_size, cfg.grad_accumulation, acc)
        metrics["per_example_correct"] = "1" * int(acc * 20) + "0" * (20 - int(acc * 20))
        return Attempt("ok", cfg.batch_size, metrics=metrics)


def _tuning(**strategies: dict) -> dict:
    return {"trials": 4, "timeout": None, "seed": 0, "metric": "accuracy", "seconds": 1.0, "strategies": strategies}


def test_a_tuned_suite_runs_defaults_and_tuned_and_reports_them_side_by_side(tmp_path) -> None:
    bench = BenchConfig(strategies=["lora", "head_only", "full"], seeds=[0, 1], batch_size=8, tune=4)
    tuning = _tuning(
        lora={
            "status": "ok",
            "error": None,
            "trials": 4,
            "best_trial": 3,
            "best_validation": 0.9,
            "default_validation": 0.7,
            "settings": {"lr": 0.0042, "epochs": 2, "r": 16},
            "same_as_default": False,
            "validation_versus_defaults": {"p_value": 0.0004},
        },
        head_only={
            "status": "ok",
            "error": None,
            "trials": 4,
            "best_trial": 0,
            "best_validation": 0.6,
            "default_validation": 0.6,
            "settings": {"lr": 0.001},
            "same_as_default": True,
        },
        full={
            "status": "failed",
            "error": "no trial of its study completed",
        },
    )
    runner = TunedRunner(default=0.5, tuned=0.9, lr=0.0042)
    said: list[str] = []
    results = run_suite(bench, str(tmp_path), said.append, runner=runner, tuning=tuning)
    # the progress says which rows are their defaults' runs, rather than announce a run that does not happen
    assert "[8/12] head_only (tuned), seed 1: the defaults won its study, so this is their run of seed 1" in said
    assert [line for line in said if line.startswith("[3/12]")][0].startswith("[3/12] lora (tuned), seed 0 (")
    # lora and full run their defaults, lora its tuned settings too; head_only's defaults won: not run twice
    assert [(c.strategy, c.lr, c.strategy_options.get("r")) for c in runner.calls] == [
        ("lora", None, None),
        ("lora", None, None),
        ("lora", 0.0042, 16),
        ("lora", 0.0042, 16),
        ("head_only", None, None),
        ("head_only", None, None),
        ("full", None, None),
        ("full", None, None),
    ]
    assert [c.output_dir.rsplit("/", 1)[1] for c in runner.calls][2] == "lora-tuned-seed0"
    tags = [(r["strategy"], r["configuration"], r["seed"], r["status"]) for r in results["rows"]]
    assert ("head_only", "tuned", 1, "ok") in tags and ("full", "tuned", 0, "failed") in tags
    # the main summary is of the tuned rows, the defaults' beside it
    assert results["summary"]["lora"]["test_accuracy_mean"] == 0.9
    assert results["tuning"]["default_summary"]["lora"]["test_accuracy_mean"] == 0.5
    assert results["summary"]["full"]["status"] == "failed"
    versus = results["tuning"]["versus_default"]["lora"]
    assert abs(versus["difference"] - 0.4) < 1e-9 and versus["verdict"] == "distinguishable"
    md = (tmp_path / "results.md").read_text()
    assert "Tuned: each strategy's row is its best configuration of `--tune 4`" in md
    assert "## Default vs tuned" in md
    assert "| `lora` | 4 | 0.7000 → 0.9000 (p < 0.001) | 0.5000 ± 0.0000 (n=2) | 0.9000 ± 0.0000 (n=2) | +40.0 ([" in md
    assert "| `full` | failed: no trial of its study completed |" in md
    assert "- `lora`: trial #3: lr=0.0042, epochs=2, r=16" in md
    assert "- `head_only`: the defaults won (trial #0)" in md and "| 0.0 (the same runs) |" in md
    json.load(open(tmp_path / "results.json"))  # every field plain data


def test_bench_tune_end_to_end(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "bench"
    code, stdout, stderr = run_cli(
        "bench",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        str(out),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--max-train-samples",
        "64",
        "--strategies",
        "head_only",
        "--tune",
        "2",
    )
    assert code == 0, stderr
    assert "tuning head_only: trial #0 (the defaults): " in stderr and "tuning head_only: trial #1: " in stderr
    assert "; 1 of --trials 2 finished" in stderr and "; 2 of --trials 2 finished" in stderr
    results = json.load(open(out / "results.json"))
    entry = results["tuning"]["strategies"]["head_only"]
    assert entry["status"] == "ok" and entry["trials"] == 2 and results["settings"]["tune"] == 2
    assert entry["best_validation"] >= entry["default_validation"]  # trial 0 is the defaults, never pruned
    # the validation gain judged example by example (nothing to judge when the defaults won)
    assert (entry["validation_versus_defaults"] is None) == entry["same_as_default"]
    assert {"lr", "epochs", "warmup_ratio", "weight_decay"} <= set(entry["settings"]) and entry["settings"][
        "epochs"
    ] == 1
    assert [(r["configuration"], r["status"]) for r in results["rows"]] == [("default", "ok"), ("tuned", "ok")]
    tuned = results["rows"][1]
    if not entry["same_as_default"]:
        assert tuned["run_dir"] == "runs/head_only-tuned-seed0"
        config = yaml.safe_load(open(out / tuned["run_dir"] / "config.yaml"))
        assert config["lr"] == entry["settings"]["lr"]
    for name in ("study.db", "best.yaml", "trials.json", "trials.csv"):
        assert (out / "tuning" / "head_only" / name).is_file()
    md = (out / "results.md").read_text()
    assert "## Default vs tuned" in md and "| `head_only` | 2 |" in md and "Tuned settings" in md
    assert "## Default vs tuned" in stdout and stdout.count("| strategy | trainable") == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging directory left


@pytest.mark.slow
def test_bench_tune_storage_keeps_the_studies_for_the_next_bench(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """An interrupted tuned bench loses its tuning (its output directory is staged); with
    --tune-storage the studies outlive it, and the same bench run again continues them."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    common = [
        "bench",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--max-train-samples",
        "64",
        "--strategies",
        "head_only",
        "--tune-storage",
        url,
    ]
    code, _, stderr = run_cli(*common, "--tune", "1", "--output-dir", str(tmp_path / "first"))
    assert code == 0 and "tuning head_only: trial #0 (the defaults): " in stderr, stderr
    code, _, stderr = run_cli(*common, "--tune", "2", "--output-dir", str(tmp_path / "second"))
    assert code == 0, stderr
    # trial #0 came from the first bench
    assert "trial #0 (the defaults): " not in stderr and "tuning head_only: trial #1: " in stderr
    results = json.load(open(tmp_path / "second" / "results.json"))
    assert results["tuning"]["storage"] == url and results["tuning"]["strategies"]["head_only"]["trials"] == 2
    assert not (tmp_path / "second" / "tuning" / "head_only" / "study.db").exists()  # it is in the storage
    # the same storage for other data is refused, naming what differs, before anything is written
    code, _, stderr = run_cli(
        *[a if a != "64" else "48" for a in common], "--tune", "2", "--output-dir", str(tmp_path / "third")
    )
    assert code == 2 and "--tune-storage: study 'tune-head_only'" in stderr and "max_train_samples 64" in stderr, stderr
    assert "Traceback" not in stderr and not (tmp_path / "third").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tune", "0"], "--tune must be a positive number of trials per strategy, got 0"),
        (["--tune", "-3"], "--tune must be a positive number of trials per strategy, got -3"),
        (["--tune-timeout", "1h"], "--tune-timeout needs --tune N"),
        (["--tune", "2", "--tune-timeout", "soon"], "--tune-timeout 'soon' is not a duration"),
        (["--tune-storage", "sqlite:///x.db"], "--tune-storage needs --tune N"),
        (["--tune", "2", "--tune-storage", "not-a-url"], "--tune-storage: cannot open storage 'not-a-url'"),
    ],
)
def test_bench_tune_bad_input_is_one_line_and_writes_nothing(args, message, run_cli, tmp_path) -> None:
    out = tmp_path / "bench"
    code, _, stderr = run_cli("bench", "--output-dir", str(out), "--strategies", "lora", *args)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_a_peft_method_s_runs_have_no_colon_in_their_path(tmp_path) -> None:
    """``peft:ia3``'s bench runs and logs are named ``peft-ia3``, as run's default output directory."""
    assert parse_strategies("lora,peft:ia3") == ["lora", "peft:ia3"]
    assert not any(s.startswith("peft:") for s in parse_strategies("all"))  # named one by one
    bench = BenchConfig(strategies=["peft:ia3"], batch_size=8)
    row = bench_one(bench, "peft:ia3", 0, str(tmp_path), (0, 8), FakeRunner({"peft:ia3": 8}), lambda m: None)
    assert row["status"] == "ok" and row["run_dir"] == os.path.join("runs", "peft-ia3-seed0")
