"""``peftkit bench --train-sizes``: accuracy against training-set size (issue 19 item 3).

Parsing and refusals, the plan (``all`` and sizes past the split are the whole set, run once),
nested subsets, rows tagged and run apart, the table per size and the learning curve; with a
stand-in runner (no training), and once end to end on a tiny model."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from test_bench import _metrics

from peftkit.benchmark.config import BenchConfig, parse_train_sizes, plan_train_sizes
from peftkit.benchmark.suite import run_suite
from peftkit.benchmark.worker import Attempt
from peftkit.errors import PeftkitError

# -- parsing and the plan -------------------------------------------------------------------


def test_parse_train_sizes_reads_integers_and_all_in_the_order_given() -> None:
    assert parse_train_sizes("250, 500,1000,ALL") == [250, 500, 1000, "all"]
    assert parse_train_sizes([2000, "all", 250]) == [2000, "all", 250]  # Python / YAML give a list


@pytest.mark.parametrize(
    "value,message",
    [
        ("250,0", "got '0'"),
        ("250,-5", "got '-5'"),
        ("250,1.5", "got '1.5'"),
        ("250,,500", "got ''"),
        ("lots", "got 'lots'"),
        ([250, True], "got 'True'"),
        ("500,all,500", "lists 500 twice"),
        ("all,ALL", "lists all twice"),
    ],
)
def test_parse_train_sizes_refuses_what_is_not_a_size(value, message) -> None:
    with pytest.raises(PeftkitError, match=message):
        parse_train_sizes(value)


def test_all_and_sizes_past_the_split_are_the_whole_set_run_once() -> None:
    plan = plan_train_sizes([1000, 250, "all", 5000], whole=800)
    assert plan["sizes"] == [250, 800] and plan["whole"] == 800
    assert plan["note"] == (
        "--train-sizes: 1,000, 5,000 are at or above the training split's 800 examples: the whole set, run once as 800"
    )
    assert plan_train_sizes([250, "all"], whole=800) == {
        "requested": [250, "all"],
        "sizes": [250, 800],
        "whole": 800,
        "note": None,
    }


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train-sizes", "250,zero"], "--train-sizes expects comma-separated positive integers or 'all'"),
        (["--train-sizes", "250,250"], "--train-sizes lists 250 twice; give each size once"),
        (["--train-sizes", "0,all"], "got '0'"),
        (
            ["--train-sizes", "250,all", "--max-train-samples", "64"],
            "--train-sizes sets each run's training examples; drop --max-train-samples 64",
        ),
        (["--train-sizes", "250,all", "--tune", "2"], "--train-sizes cannot be combined with --tune: drop --tune"),
    ],
)
def test_bench_train_sizes_bad_input_is_one_line_and_writes_nothing(args, message, run_cli, tmp_path) -> None:
    out = tmp_path / "bench"
    code, _, stderr = run_cli("bench", "--output-dir", str(out), "--strategies", "lora", *args)
    assert code == 2 and stderr.count("\n") == 1 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


# -- the suite, with a stand-in for the worker process ------------------------------------------


class SizedRunner:
    """Accuracy that grows with the training examples (the whole split of 160 when uncapped);
    records every config it was given."""

    def __init__(self) -> None:
        self.calls: list = []

    def __call__(self, cfg, log_path: str) -> Attempt:
        self.calls.append(cfg)
        n = cfg.max_train_samples or 160
        acc = {"lora": 0.5 + n / 400, "head_only": 0.5 + n / 1000}[cfg.strategy] + cfg.seed * 0.01
        return Attempt(
            "ok",
            cfg.batch_size,
            metrics=_metrics(cfg.strategy, cfg.batch_size, cfg.grad_accumulation, acc),
            seconds=n / 10,
        )


BASELINES = {seed: {"name": "majority class", "predicts": "neg", "accuracy": 0.55, "f1_macro": 0.35} for seed in (0, 1)}


@pytest.fixture
def sized_suite(tmp_path) -> tuple:
    bench = BenchConfig(strategies=["lora", "head_only"], seeds=[0, 1], batch_size=8, train_sizes=[40, "all"])
    runner, said = SizedRunner(), []
    results = run_suite(
        bench,
        str(tmp_path),
        said.append,
        runner=runner,
        baselines=BASELINES,
        sizes=plan_train_sizes(bench.train_sizes, whole=160),
    )
    return results, runner, said, tmp_path


def test_every_strategy_runs_at_every_size_and_seed_tagged_and_apart(sized_suite) -> None:
    results, runner, said, out = sized_suite
    # the whole set runs uncapped, exactly like a bench without sizes
    assert [(c.strategy, c.max_train_samples, c.seed) for c in runner.calls] == [
        ("lora", 40, 0),
        ("lora", 40, 1),
        ("lora", None, 0),
        ("lora", None, 1),
        ("head_only", 40, 0),
        ("head_only", 40, 1),
        ("head_only", None, 0),
        ("head_only", None, 1),
    ]
    assert [os.path.basename(c.output_dir) for c in runner.calls][:3] == [
        "lora-n40-seed0",
        "lora-n40-seed1",
        "lora-n160-seed0",
    ]
    assert [(r["strategy"], r["train_size"], r["seed"]) for r in results["rows"]][2:4] == [
        ("lora", 160, 0),
        ("lora", 160, 1),
    ]
    # the progress count and its time left include the sizes: the second run guesses the 160-example ones
    # from the 40-example one (4 s) scaled by the examples each processes, epochs as the schedule raises
    # them at batch 8 (lora: 20 x 40 = 800 and 8 x 160 = 1280; head_only at 160: 20 x 160 = 3200):
    # 4 (lora 40) + 2 x 6.4 (lora 160); head_only stands in at lora's uncached pace (4 s as run, its
    # epochs of 8 and 2 s at the slower one: 4 + 6 = 10 s): 2 x 10 (head_only 40) + 2 x 40 (head_only 160)
    assert said[0] == "[1/8] lora, seed 0, 40 examples (0s elapsed)"
    assert said[2].startswith("[2/8] lora, seed 1, 40 examples (0s elapsed, about 1m57s left)")
    assert "[8/8] head_only, seed 1, 160 examples" in said[-2]
    on_disk = json.load(open(out / "results.json"))
    block = on_disk["train_sizes"]
    assert (block["sizes"], block["whole"], block["shown"], block["metric"]) == ([40, 160], 160, 160, "test_accuracy")
    cell = block["strategies"]["lora"]["40"]
    assert cell["mean"] == pytest.approx(0.605) and cell["seeds"] == [0, 1] and len(cell["ci95"]) == 2
    assert cell["runs"] == ["runs/lora-n40-seed0", "runs/lora-n40-seed1"]
    # the main table and its summary are of the largest size, so they mean what they meant before
    assert on_disk["summary"]["lora"]["test_accuracy_mean"] == pytest.approx(0.905)


def test_the_report_has_a_table_per_size_and_the_learning_curve(sized_suite) -> None:
    results, _, _, out = sized_suite
    md = (out / "results.md").read_text()
    assert "training examples 40, 160 (all)" in md
    assert (
        "Training-set sizes 40, 160 (all): this table, its plots and paired tests are of the largest, "
        "160 examples (the whole training split)"
    ) in md
    assert md.index("Training-set sizes 40") < md.index("| strategy | trainable")
    assert "## Accuracy against training-set size" in md and "| strategy | 40 | 160 (all) |" in md
    # best per column in bold, ± the 95% interval's half-width over the two seeds; head_only at 40 is
    # below the majority rate: marked, and the baseline stands under the table
    assert "| `lora` | **0.605** ± 0.064 | **0.905** ± 0.064 |" in md
    assert "| `head_only` | 0.545 ± 0.064 † | 0.665 ± 0.064 |" in md
    assert "Baseline, majority class (always `neg`): test accuracy 0.550 at every size" in md
    assert "![learning_curve](learning_curve.png)" in md
    from PIL import Image

    with Image.open(out / "learning_curve.png") as image:
        assert image.format == "PNG" and image.size[0] > 400
    from peftkit.benchmark.report import markdown_report  # the same results make the same report

    plots = ["accuracy_vs_memory.png", "accuracy_vs_time.png", "validation_curves.png", "learning_curve.png"]
    assert markdown_report(json.load(open(out / "results.json")), plots) == md


def test_a_one_seed_size_table_has_bare_means(tmp_path) -> None:
    bench = BenchConfig(strategies=["lora", "head_only"], seeds=[0], batch_size=8, train_sizes=[40, 80])
    run_suite(bench, str(tmp_path), lambda m: None, runner=SizedRunner(), sizes=plan_train_sizes([40, 80], 160))
    md = (tmp_path / "results.md").read_text()
    assert "| strategy | 40 | 80 |" in md and "| `lora` | **0.600** | **0.700** |" in md and "(one seed)" in md
    assert "Baseline" not in md and (tmp_path / "learning_curve.png").is_file()


def test_the_subsets_of_the_sizes_are_nested(tiny_csv) -> None:
    """The smaller size's training examples are the first of the larger's, for every seed: the
    curve measures more data, not other data."""
    from peftkit.tasks import get_task

    bench = BenchConfig(strategies=["head_only"], task="sequence-classification", dataset=tiny_csv, batch_size=8)
    for seed in (0, 3):
        texts = {}
        for size in (20, 60, None):
            cfg = BenchConfig(**{**bench.__dict__, "max_train_samples": size}).run_config("head_only", seed, 8, "x")
            texts[size] = get_task(cfg.task).load_data(cfg).splits["train"]["text"]
        assert len(texts[20]) == 20 and texts[60][:20] == texts[20]
        assert len(texts[None]) == 160 and set(texts[60]) <= set(texts[None])


# -- end to end, real worker processes on a tiny model (one strategy: two workers) ----------


def test_bench_train_sizes_end_to_end(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
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
        "--strategies",
        "head_only",
        "--train-sizes",
        "40,all,1000",
    )
    assert code == 0, stderr
    # tiny_csv has 200 rows: 160 train after the 80/10/10 split; 1000 is the whole set too, run once
    assert stderr.count("--train-sizes: 1,000 is at or above the training split's 160 examples") == 1
    assert "bench: 1 strategy x 2 training-set sizes x 1 seed(s)" in stderr and "[2/2]" in stderr
    results = json.load(open(out / "results.json"))
    assert [(r["strategy"], r["train_size"], r["status"]) for r in results["rows"]] == [
        ("head_only", 40, "ok"),
        ("head_only", 160, "ok"),
    ]
    assert results["train_sizes"]["sizes"] == [40, 160] and results["settings"]["train_sizes"] == [40, "all", 1000]
    for row in results["rows"]:
        assert row["run_dir"] == f"runs/{row['strategy']}-n{row['train_size']}-seed0"
        config = yaml.safe_load(open(out / row["run_dir"] / "config.yaml"))
        assert config["split"]["sizes"]["train"] == row["train_size"]
    assert (out / "learning_curve.png").is_file()
    assert "## Accuracy against training-set size" in stdout and "| strategy | 40 | 160 (all) |" in stdout
    assert stdout.count("| strategy | trainable") == 1
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no staging directory left


def test_time_left_after_a_cached_strategy_uses_its_uncached_pace() -> None:
    """Issue 32 (5): head_only's later epochs read cached features in a fraction of a second; the other
    strategies' time is guessed at the pace of its first epoch (which ran the backbone), not its mean."""
    from peftkit.benchmark.suite import seconds_left

    head = {
        "strategy": "head_only",
        "status": "ok",
        "tried": [{"seconds": 20.0}],
        "history": [{"epoch_seconds": 10.0}] + [{"epoch_seconds": 0.5}] * 3,
    }
    # 20 s as run, 20 + 3 x 9.5 = 48.5 s had every epoch run the backbone
    assert seconds_left([head], [("head_only", None)]) == 20.0  # its own runs: as they ran
    assert seconds_left([head], [("lora", None), ("full", None)]) == 2 * 48.5
    lora = {
        "strategy": "lora",
        "status": "ok",
        "tried": [{"seconds": 60.0}],
        "history": [{"epoch_seconds": 14.0}, {"epoch_seconds": 15.0}],
    }
    assert seconds_left([head, lora], [("lora", None)]) == 60.0
    assert seconds_left([head, lora], [("full", None)]) == (48.5 + 61.0) / 2
