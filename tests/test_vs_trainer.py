"""benchmarks/vs_trainer.py on a tiny Llama: the Trainer + peft side and peftkit's side train the
same full batch of prompt/response pairs (left against right padding, prompts masked, one
truncated) to the same losses, and a peftkit variant this version does not accept, or one that
fails, is a row of the report, not a crash; job p's three rows (one epoch: the Trainer padded,
peftkit padded, peftkit --packing) report tokens/s and padding fractions over the same examples;
vs_trainer_paired.py alternates the two sides' steps, each side in a process of its own; plan_vs_measured.py plans each
measured row with the run's settings."""

from __future__ import annotations

import importlib
import os
import sys

from conftest import make_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# how every test here trains both sides: fp32 on one CPU thread, a child process given 5 minutes
ON_CPU = {"precision": "fp32", "device": "cpu", "threads": 1, "timeout": 300}


def _script(name: str = "vs_trainer"):
    """A script of benchmarks/ imported as a module (``vs_trainer``, ``vs_trainer_paired``, ...)."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def _corpus() -> list[dict[str, str]]:
    """Reviews, and plot summaries of 1 to 6 sentences (7 to 42 words): varied lengths."""
    rows = make_rows(60)
    reviews = [{"category": "fresh", "text": r["text"], "movie_name": f"movie_{i}"} for i, r in enumerate(rows[:30])]
    plots = [
        {
            "category": "plot",
            "text": " ".join(r["text"] for r in rows[30 + i : 31 + i + i % 6]),
            "movie_name": f"plot_{i}",
        }
        for i in range(12)
    ]
    return reviews + plots


def test_same_loss_on_both_sides_and_variants_reported(tiny_causal_dir, tmp_path):
    bench = _script()
    plan = bench.prepare_job(
        bench.JOBS["b"],
        str(tmp_path),
        model=tiny_causal_dir,
        batch_size=2,
        max_length=48,
        corpus=_corpus(),
        eval_examples=1,
    )
    lengths = plan["info"]["response_tokens"]["each"]
    # responses of 22 and 43 tokens after prompts of 11: the longer pair is cut at 48 (the prompt's
    # start goes), so the truncation rule is matched too
    assert min(lengths) < 30 and max(lengths) > 40
    lines: list[str] = []
    result = bench.run_job(
        plan,
        steps=2,
        repeats=1,
        **ON_CPU,
        workdir=str(tmp_path / "runs"),
        echo=lines.append,
        variants=[
            ("peftkit", []),
            ("peftkit --no-such-lever", ["--no-such-lever"]),
            ("peftkit bad option", ["--set", "no_such_option=1"]),
        ],
    )
    trainer, plain, missing, bad = result["rows"]
    assert trainer["status"] == "ok" and plain["status"] == "ok", lines
    check = plain["vs_trainer"]["losses"]
    assert check["same_data"] is True and check["same_trainable_params"] is True
    assert len(trainer["summary"]["losses"]) == len(plain["summary"]["losses"]) == 2
    assert check["first_rel_diff"] < 1e-4 and check["last_rel_diff"] < 1e-3, check
    assert check["verdict"] == "agree"
    # the loss moved: the second step trained on what the first learned, the same on both sides
    assert plain["summary"]["loss_last"] != plain["summary"]["loss_first"]
    assert missing["status"] == "not available" and "--no-such-lever" in missing["error"]
    assert bad["status"] == "failed" and "no_such_option" in bad["error"]
    table = bench.format_job(result, cuda=False)
    assert "not available in this peftkit" in table and "| peftkit bad option | failed:" in table
    assert "agree" in table
    assert "losses=agree" in bench.key_ratios({"b": result})


def test_epoch_job_reports_tokens_per_second_and_padding(tiny_causal_dir, tmp_path):
    """Job p on the tiny Llama: one epoch of 8 pairs (33 to 54 tokens) in batches of 2 on the Trainer
    (padded, random order), peftkit (padded, length-grouped) and peftkit --packing (rows of 96 tokens:
    two examples each, so 4 rows and 2 steps); every row reports tokens/s and its padding fraction,
    all trained on the same examples and real tokens in one epoch, and the losses are not compared."""
    bench = _script()
    plan = bench.prepare_job(
        bench.JOBS["p"],
        str(tmp_path),
        model=tiny_causal_dir,
        batch_size=2,
        max_length=96,
        corpus=_corpus(),
        eval_examples=1,
        examples=8,
    )
    assert plan["train_examples"] == 8 and len(plan["info"]["response_tokens"]["each"]) == 8
    lines: list[str] = []
    result = bench.run_job(
        plan,
        steps=2,
        repeats=1,
        **ON_CPU,
        workdir=str(tmp_path / "runs"),
        echo=lines.append,
    )
    trainer, padded, packed = result["rows"]
    assert [r["status"] for r in result["rows"]] == ["ok"] * 3, lines
    assert packed["flags"] == ["--packing"]
    tokens = {r["summary"]["train_tokens"] for r in result["rows"]}
    assert len(tokens) == 1 and tokens.pop() > 0  # every side trained every real token once
    assert trainer["summary"]["optimizer_steps"] == padded["summary"]["optimizer_steps"] == 4
    assert packed["summary"]["optimizer_steps"] == 2  # 8 examples in 4 rows of 96
    assert packed["summary"]["padding_fraction"] < trainer["summary"]["padding_fraction"]
    for row in result["rows"]:
        m = row["summary"]
        assert m["tokens_per_second"] > 0 and m["train_seconds"] > 0 and m["epochs_run"] == 1
        assert 0 <= m["padding_fraction"] < 1 and m["examples"] == 8
    for row in (padded, packed):
        m, vs = row["summary"], row["vs_trainer"]
        assert abs(m["padding_fraction"] - m["peftkit_padding_fraction"]) < 1e-9  # as peftkit counts it
        assert vs["tokens_per_second_ratio"] > 0
        assert vs["losses"]["same_data"] is True and vs["losses"]["verdict"] == "not compared"
    table = bench.format_job(result, cuda=False)
    assert "not compared: different batches" in table and "padding fraction" in table
    assert "p: tokens_per_s packing=" in bench.key_ratios({"p": result})


def test_paired_steps_take_turns_in_two_processes_on_the_same_batch(tiny_causal_dir, tmp_path):
    """vs_trainer_paired.py on the tiny Llama: each side in a process of its own (only peftkit's runs
    peftkit's process-wide settings); the Trainer trains 3 steps, each followed by one peftkit step on
    its own (the same) batch, and no step of one process overlaps a step of the other; both sides
    have 3 step times and their first-step losses agree (the same weights, the same examples); the
    warm-up pair is left out of the ratio; a variant this peftkit does not accept is a row, not a
    crash."""
    paired = _script("vs_trainer_paired")
    plan = paired.vt.prepare_job(
        paired.vt.JOBS["b"],
        str(tmp_path),
        model=tiny_causal_dir,
        batch_size=2,
        max_length=48,
        corpus=_corpus(),
        eval_examples=1,
    )
    lines: list[str] = []
    result = paired.run_job(
        plan,
        pairs=3,
        repeats=1,
        **ON_CPU,
        workdir=str(tmp_path / "runs"),
        variants=[("peftkit", []), ("peftkit --no-such-lever", ["--no-such-lever"])],
        echo=lines.append,
    )
    row, missing = result["rows"]
    assert row["status"] == "ok", lines
    run = row["runs"][0]
    assert len(run["trainer_steps"]) == len(run["peftkit_steps"]) == 3 and run["trainer_optimizer_steps"] == 3
    assert run["pids"]["trainer"] != run["pids"]["peftkit"] and run["peftkit_own_process"] is True
    # Trainer step 1, peftkit step 1, Trainer step 2, ...: each starts after the other's last one ended
    spans = [s for pair in zip(run["trainer_spans"], run["peftkit_spans"]) for s in pair]
    assert all(earlier[1] <= later[0] for earlier, later in zip(spans, spans[1:])), spans
    assert row["first_losses"]["same_data"] is True and row["first_losses"]["verdict"] == "agree"
    assert row["first_losses"]["rel_diff"] < 1e-4
    # the peftkit side trained: its losses moved from step to step, as the Trainer's did
    assert run["peftkit_losses"][0] != run["peftkit_losses"][-1]
    m = row["summary"]
    assert m["pairs"] == 2 and m["ratio"] > 0 and m["ratio_ci95"][0] <= m["ratio"] <= m["ratio_ci95"][1]
    assert missing["status"] == "not available" and "--no-such-lever" in missing["error"]
    table = paired.format_job(result)
    assert "| peftkit | 2 |" in table and "not available in this peftkit" in table
    assert paired.key_ratios({"b": result}).startswith("peftkit/Trainer (paired) b: step_time=")


def test_paired_ratio_is_the_geometric_mean_of_the_pairs():
    paired = _script("vs_trainer_paired")
    m = paired.paired_ratio([1.0, 2.0, 4.0], [2.0, 2.0, 2.0])  # ratios 2, 1, 0.5
    assert abs(m["ratio"] - 1.0) < 1e-12 and m["pairs"] == 3
    assert abs(m["ratio_min"] - 0.5) < 1e-12 and abs(m["ratio_max"] - 2.0) < 1e-12
    assert m["trainer_step_median"] == 2.0 and m["peftkit_step_median"] == 2.0
    lo, hi = m["ratio_ci95"]
    assert lo < 1.0 < hi and abs(lo * hi - 1.0) < 1e-9  # symmetric in the logs
    assert paired.paired_ratio([], []) == {"pairs": 0}


def _measured_row(label: str, flags: list[str], positions: int, rows: int, peak: int) -> dict:
    run = {"positions_per_step": [positions] * 3, "batch_examples": rows}
    return {"label": label, "side": "peftkit", "flags": flags, "status": "ok", "runs": [run],
            "summary": {"peak_train_bytes": peak}}  # fmt: skip


def test_plan_vs_measured_plans_each_row_as_the_run_trained(tiny_causal_dir, tmp_path):
    """plan_vs_measured.py on a vs_trainer record of the tiny Llama: each peftkit row is planned with
    the run's LoRA options (dropout 0), its flags, its rows and padded width (pairs: 8 x 40 of 64,
    the loss on the longest answer; packing: rows of the full length) and the ratio is planned over
    measured; the Trainer's row is not planned."""
    import json

    lora = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
    settings = {"task": "causal-lm", "model": tiny_causal_dir, "model_dir": tiny_causal_dir, "batch_size": 8,
                "max_length": 64, "precision": "fp32", "epochs": None, "lora": lora,
                "response_tokens": {"max": 30}}  # fmt: skip
    rows = [
        {"label": "Trainer + peft", "side": "trainer", "status": "ok", "runs": [], "flags": []},
        _measured_row("peftkit", [], 8 * 40, 8, 2**30),
        _measured_row("peftkit --packing", ["--packing"], 150, 8, 2**30),
    ]
    measured = tmp_path / "vs_trainer_cpu.json"
    script = _script("plan_vs_measured")
    padded = script.plan_arguments(settings, rows[1], "cpu")
    assert padded[padded.index("--batch-size") + 1 : padded.index("--max-length") + 2] == ["8", "--max-length", "40"]
    assert "dropout=0.0" in padded and "target_modules=[q_proj,v_proj]" in padded
    assert padded[padded.index("--loss-tokens") + 1] == "30"
    packed = script.plan_arguments(settings, rows[2], "cpu")
    assert packed[packed.index("--batch-size") + 1] == "3" and packed[-1] == "--packing"  # 150 positions: 3 rows
    assert "--loss-tokens" not in packed
    # the whole script on the padded row alone (one plan, in a fresh process: seconds)
    measured.write_text(json.dumps({"device": "cpu", "jobs": {"b": {"settings": settings, "rows": rows[:2]}}}))
    out = tmp_path / "plan.json"
    script.main(["--measured", str(measured), "--jobs", "b", "--out", str(out)])
    record = json.loads(out.read_text())
    assert [r["row"] for r in record["rows"]] == ["peftkit"]  # the Trainer's row is not planned
    (row,) = record["rows"]
    assert row["error"] is None and row["planned_bytes"] > 0 and row["command"] == "peftkit " + " ".join(padded)
    assert row["ratio"] == row["planned_bytes"] / 2**30 and row["within"] == (abs(row["ratio"] - 1) <= 0.15)
    assert record["summary"] == f"within +-15%: {int(row['within'])} of 1 rows" and record["measured_file"]
