"""Issue 19 item 2: a run that learned nothing says so (metrics.json, the summary, the bench).

The judgement is the task's (``Task.learned``): a classifier against the majority class of the
split, a causal LM against its own perplexity before training; the likely cause is the run's.
"""

from __future__ import annotations

import csv
import json
import os

import datasets
import pytest

from peftkit.data import TaskData
from peftkit.loop import likely_cause
from peftkit.metrics import RunMetrics
from peftkit.tasks import get_task
from peftkit.tasks.sequence_classification import judge_against_majority, majority_baseline

from conftest import make_rows

# the issue's run: 500 test examples, 58.4% of them 'negative'
ISSUE_TEST = [0] * 292 + [1] * 208
NAMES = ["negative", "positive"]


def _data(test: list[int], validation: list[int], names: list[str] | None = NAMES) -> TaskData:
    def split(labels: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"text": ["x"] * len(labels), "label": labels})

    return TaskData(
        datasets.DatasetDict({"train": split([0, 1]), "validation": split(validation), "test": split(test)}), names
    )


# -- the classification rule, on constructed metrics ---------------------------------------------


def test_a_run_at_the_majority_rate_is_flagged() -> None:
    verdict = judge_against_majority(
        {"accuracy": 0.584, "f1_macro": 0.369}, majority_baseline(ISSUE_TEST, NAMES), 500, "test"
    )
    assert verdict.learned is False
    assert verdict.reason == (
        "test accuracy 0.584 is not better than the majority-class rate 0.584 "
        "(always 'negative', 500 examples), macro-F1 0.369"
    )
    assert verdict.baseline["test"]["predicts"] == "negative" and verdict.baseline["test"]["examples"] == 500


def test_a_hair_above_the_majority_rate_is_still_flagged() -> None:
    """0.590 against a majority rate of 0.588 on 1,000 examples is chance, not learning."""
    verdict = judge_against_majority(
        {"accuracy": 0.590, "f1_macro": 0.45}, majority_baseline([0] * 588 + [1] * 412, NAMES), 1000, "test"
    )
    assert verdict.learned is False and "not clearly above the majority-class rate 0.588" in verdict.reason
    assert verdict.baseline["test"]["p_value"] > 0.3


def test_a_run_clearly_above_the_majority_rate_is_not_flagged() -> None:
    verdict = judge_against_majority(
        {"accuracy": 0.764, "f1_macro": 0.75}, majority_baseline(ISSUE_TEST, NAMES), 500, "test"
    )
    assert verdict.learned is True and verdict.baseline["test"]["p_value"] < 1e-6


def test_macro_f1_at_the_one_class_value_is_flagged() -> None:
    baseline = majority_baseline(ISSUE_TEST, NAMES)
    verdict = judge_against_majority(
        {"accuracy": 0.70, "f1_macro": baseline["f1_macro"] + 0.005}, baseline, 500, "test"
    )
    assert verdict.learned is False and "is what always answering one class gets" in verdict.reason


def test_the_task_judges_on_test_and_records_validation_beside_it() -> None:
    task = get_task("sequence-classification")
    data = _data(ISSUE_TEST, [0] * 60 + [1] * 40)
    verdict = task.learned(
        {"test": {"accuracy": 0.584, "f1_macro": 0.369}, "validation": {"accuracy": 0.80, "f1_macro": 0.79}}, data
    )
    assert verdict.learned is False and verdict.baseline["judged_on"] == "test"
    assert verdict.baseline["validation"]["accuracy"] == pytest.approx(0.6)
    # a tuning trial evaluates no test split: validation decides
    verdict = task.learned({"test": {}, "validation": {"accuracy": 0.80, "f1_macro": 0.79}}, data)
    assert verdict.learned is True and verdict.baseline["judged_on"] == "validation"


def test_data_without_labels_is_not_judged() -> None:
    """A plugin task that measures its own way (text regression: no label names) is not judged wrongly."""
    task = get_task("sequence-classification")
    assert task.learned({"test": {"accuracy": 0.5}}, _data(ISSUE_TEST, [0, 1], names=None)) is None
    assert task.learned({"test": {"mse": 0.5}, "validation": {"mse": 0.4}}, _data(ISSUE_TEST, [0, 1])) is None


# -- causal LM: against its own perplexity before training -----------------------------------------


def test_a_causal_lm_worse_than_zero_shot_is_flagged_and_better_is_not() -> None:
    task, data = get_task("causal-lm"), _data([0], [0])
    worse = task.learned({"test": {"loss": 2.6}, "validation": {"loss": 2.5}}, data, zero_shot={"loss": 2.0})
    assert worse.learned is False and worse.worse
    assert worse.reason == "validation perplexity 12.18 is worse than the untrained (zero-shot) model's 7.39"
    assert worse.baseline == {
        "name": "zero-shot",
        "judged_on": "validation",
        "validation": {"loss": 2.0, "perplexity": pytest.approx(7.389, abs=1e-3)},
    }
    better = task.learned({"test": {"loss": 1.6}, "validation": {"loss": 1.5}}, data, zero_shot={"loss": 2.0})
    assert better.learned is True
    assert task.learned({"validation": {"loss": 1.5}}, data, zero_shot=None) is None


# -- the likely cause: from the run's own numbers ---------------------------------------------------


def _metrics(steps: int, epochs: int) -> RunMetrics:
    m = RunMetrics.__new__(RunMetrics)  # only the figures likely_cause reads
    m.optimizer_steps, m.epochs_run = steps, epochs
    return m


def test_the_likely_cause_follows_the_runs_numbers() -> None:
    # the issue's run: 640 examples, batch 32, one epoch
    assert (
        likely_cause(2e-3, _metrics(20, 1), [{"train_loss": 0.68}])
        == "20 optimizer steps is likely too few: try --epochs 8 (or a higher --lr)"
    )
    # enough steps, the loss did not fall: too high a rate
    rose = likely_cause(2e-3, _metrics(300, 3), [{"train_loss": 0.69}, {"train_loss": 0.69}, {"train_loss": 0.70}])
    assert "the learning rate 0.002 is likely too high: try --lr 0.00067" in rose
    # enough steps, the loss fell a little: too low a rate
    assert likely_cause(2e-3, _metrics(300, 3), [{"train_loss": 0.69}, {"train_loss": 0.68}]).endswith("--lr 0.006")
    # worse than the reference: a lower rate, however few the steps
    assert "try --lr 0.00067" in likely_cause(2e-3, _metrics(20, 1), [], worse=True)


# -- end to end on tiny models ----------------------------------------------------------------------


def test_a_run_that_cannot_learn_warns_and_records_it(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """A learning rate of 1e-9 leaves the random head as it was: the warning, in the summary and metrics.json."""
    out = str(tmp_path / "run")
    code, stdout, stderr = run_cli(
        "run",
        "--strategy",
        "full",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        out,
        "--epochs",
        "1",
        "--lr",
        "1e-9",
        "--batch-size",
        "16",
        "--max-length",
        "16",
    )
    assert code == 0, stderr
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["learned"] is False and m["optimizer_steps"] == 10
    assert m["baseline"]["name"] == "majority class" and m["baseline"]["judged_on"] == "test"
    assert m["baseline"]["test"]["predicts"] == "neg" and m["baseline"]["test"]["accuracy"] == 0.5
    assert "10 optimizer steps is likely too few: try --epochs 15 (or a higher --lr)" in m["learned_note"]
    assert f"warning: this run learned nothing: {m['learned_note']}" in stderr
    assert "full: test accuracy" in stdout  # the figures are still shown, the warning after them
    assert "learned: false" in open(os.path.join(out, "train.log")).read()
    assert "LearnedNothingWarning" not in stderr  # the command's own line, not Python's warning form


def test_the_python_api_warns_when_a_run_learned_nothing(tiny_model_dir, tiny_csv, tmp_path) -> None:
    """Issue 32 (1): a library user reads no summary line: peftkit.run warns with LearnedNothingWarning,
    a PeftkitWarning, whose message is the run's learned_note."""
    import peftkit

    cfg = peftkit.RunConfig(
        strategy="full",
        model=tiny_model_dir("bert"),
        dataset=tiny_csv,
        output_dir=str(tmp_path / "run"),
        epochs=1,
        lr=1e-9,
        batch_size=16,
        max_length=16,
    )
    with pytest.warns(peftkit.LearnedNothingWarning, match="learned nothing: .*too few") as caught:
        result = peftkit.run(cfg, echo=lambda line: None)
    assert issubclass(peftkit.LearnedNothingWarning, peftkit.PeftkitWarning)
    assert result.metrics.learned is False and result.metrics.learned_note in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line, not into peftkit


def test_swapped_columns_are_the_cause_named_when_nothing_was_learned(run_cli, tiny_model_dir, tmp_path) -> None:
    """Issue 32 (3): the data check found the label column holds free text; the learned-nothing line
    names that fix, not more epochs or another learning rate."""
    path = tmp_path / "swapped.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["review", "sentiment"])
        writer.writeheader()
        writer.writerows({"review": r["text"], "sentiment": r["label"]} for r in make_rows(200))
    out = str(tmp_path / "run")
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "full",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        str(path),
        "--text-column",
        "sentiment",
        "--label-column",
        "review",
        "--output-dir",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
    )
    assert code == 0, stderr
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["learned"] is False
    fix = "did you mean --text-column review --label-column sentiment?"
    assert m["learned_note"].endswith(fix) and "label column 'review' has" in m["learned_note"]
    assert "try --epochs" not in m["learned_note"] and "try --lr" not in m["learned_note"]
    assert stderr.rstrip().splitlines()[-1] == f"warning: this run learned nothing: {m['learned_note']}"


@pytest.fixture(scope="module")
def answers_csv(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("answers") / "answers.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["prompt", "response"])
        writer.writeheader()
        for row in make_rows(120, seed=2):
            writer.writerow({"prompt": row["text"], "response": "good" if row["label"] == "pos" else "bad"})
    return str(path)


def test_a_causal_lm_made_worse_by_training_is_flagged(run_cli, tiny_causal_dir, answers_csv, tmp_path) -> None:
    """The untrained model's validation loss is measured before the first step; a rate of 3 wrecks the model."""
    out = str(tmp_path / "run")
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "full",
        "--model",
        tiny_causal_dir,
        "--dataset",
        answers_csv,
        "--output-dir",
        out,
        "--epochs",
        "1",
        "--lr",
        "3",
        "--batch-size",
        "16",
        "--max-length",
        "16",
    )
    assert code == 0, stderr
    m = json.load(open(os.path.join(out, "metrics.json")))
    zero_shot = m["baseline"]["validation"]["loss"]
    assert m["baseline"]["name"] == "zero-shot" and m["validation_loss"] > zero_shot
    assert m["learned"] is False and "is worse than the untrained (zero-shot) model's" in m["learned_note"]
    assert "the learning rate 3 is likely too high: try --lr 1" in m["learned_note"] and "warning: this run" in stderr
    assert len(m["history"]) == 1  # the zero-shot pass is no epoch
    assert "zero-shot validation (before training): loss" in open(os.path.join(out, "train.log")).read()


# -- the bench: each row carries its run's verdict, the report flags it with the cause ---------------

NOTE = (
    "test accuracy 0.584 is not better than the majority-class rate 0.584 (always 'negative', 500 examples), "
    "macro-F1 0.369. 20 optimizer steps is likely too few: try --epochs 8 (or a higher --lr)"
)


class VerdictRunner:
    """Every run fits; ``verdicts[(strategy, seed)]`` is (test accuracy, learned)."""

    def __init__(self, verdicts: dict[tuple[str, int], tuple[float, bool]]) -> None:
        self.verdicts = verdicts

    def __call__(self, cfg, log_path: str):
        from peftkit.benchmark.worker import Attempt

        acc, learned = self.verdicts[(cfg.strategy, cfg.seed)]
        metrics = {
            "test_accuracy": acc,
            "test_f1_macro": acc - 0.2,
            "validation_accuracy": acc,
            "best_epoch": 1,
            "epochs_run": 1,
            "trainable_params": 10,
            "total_params": 100,
            "trainable_percent": 10.0,
            "peak_memory_bytes": 2**30,
            "peak_memory_eval_bytes": 2**29,
            "memory_loaded_bytes": 2**29,
            "peak_memory_increase_bytes": 2**29,
            "peak_memory_method": "test",
            "train_seconds": 10.0,
            "eval_seconds": 1.0,
            "samples_per_second": 100.0,
            "adapter_bytes": 1000,
            "batch_size": cfg.batch_size,
            "grad_accumulation": 1,
            "effective_batch_size": cfg.batch_size,
            "device": "cpu",
            "optimizer_steps": 20,
            "learned": learned,
            "learned_note": None if learned else NOTE,
            "history": [{"epoch": 1, "validation_accuracy": acc, "epoch_seconds": 8.0}],
        }
        return Attempt("ok", cfg.batch_size, metrics=metrics)


def test_the_bench_flags_a_run_that_learned_nothing_with_its_cause(tmp_path) -> None:
    """lora's mean (0.70) is above the majority rate, but its seed 0 learned nothing: flagged, with why."""
    from peftkit.benchmark.config import BenchConfig
    from peftkit.benchmark.suite import run_suite

    bench = BenchConfig(strategies=["full", "lora"], seeds=[0, 1], command="peftkit bench --test")
    runner = VerdictRunner(
        {("full", 0): (0.80, True), ("full", 1): (0.81, True), ("lora", 0): (0.584, False), ("lora", 1): (0.81, True)}
    )
    baselines = {
        s: {"name": "majority class", "predicts": "negative", "accuracy": 0.584, "f1_macro": 0.369} for s in (0, 1)
    }
    echoed: list[str] = []
    results = run_suite(bench, str(tmp_path), echoed.append, runner=runner, baselines=baselines)
    assert [r["learned"] for r in results["rows"]] == [True, True, False, True]
    assert results["summary"]["lora"]["learned_nothing"] == [0] and results["summary"]["full"]["learned_nothing"] == []
    assert any(
        line.startswith("  lora seed 0: test accuracy 0.5840") and line.endswith(f"; learned nothing: {NOTE}")
        for line in echoed
    )
    md = (tmp_path / "results.md").read_text()
    assert "| `lora` † |" in md and "| `full` |" in md
    assert f"† `lora` learned nothing (seed 0): {NOTE}." in md
    assert "† not better than the baseline's" not in md  # no strategy's mean is at the baseline


def test_the_bench_flags_runs_that_learned_nothing_without_a_baseline(tmp_path) -> None:
    """Plain text has no majority answer, but a causal LM's run is judged against zero-shot all the same."""
    from peftkit.benchmark.config import BenchConfig
    from peftkit.benchmark.suite import run_suite

    bench = BenchConfig(strategies=["lora"], seeds=[0, 1], command="peftkit bench --test")
    run_suite(
        bench,
        str(tmp_path),
        lambda m: None,
        runner=VerdictRunner({("lora", 0): (0.5, False), ("lora", 1): (0.5, False)}),
    )
    md = (tmp_path / "results.md").read_text()
    assert "| `lora` † |" in md and f"† `lora` learned nothing (seeds 0, 1): {NOTE}." in md and "Baseline" not in md


def test_a_checkpoint_from_before_the_zero_shot_reference_still_resumes() -> None:
    from peftkit.loop import LoopState

    saved = LoopState(step=7).to_dict()
    del saved["zero_shot"]
    assert LoopState.from_dict(saved, {}).zero_shot is None
