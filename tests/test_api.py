"""peftkit.api: a run, a bench and a plan from Python on a tiny model, and what they hand back."""

from __future__ import annotations

import json
import os
import re

import pytest
import yaml

from peftkit import api
from peftkit.benchmark.config import BenchConfig
from peftkit.config import FIELDS, Levers, RunConfig
from peftkit.errors import PeftkitError, RunInterrupted
from peftkit.planner import PlanSettings


def test_run_predict_merge_inspect(tiny_model_dir, tiny_csv, tmp_path) -> None:
    model, out = tiny_model_dir("bert"), str(tmp_path / "run")
    config = RunConfig(
        strategy="lora",
        model=model,
        dataset=tiny_csv,
        epochs=1,
        batch_size=16,
        max_length=16,
        output_dir=out,
        levers=Levers(gradient_checkpointing=True),
    )
    messages: list[str] = []
    result = api.run(config, echo=messages.append)
    assert result.run_dir == out and sorted(os.listdir(out)) == ["adapter", "config.yaml", "metrics.json", "train.log"]
    assert result.metrics.to_dict() == json.load(open(os.path.join(out, "metrics.json")))
    assert result.metrics.strategy == "lora" and result.metrics.gradient_checkpointing is True
    assert 0 <= result.metrics.test["accuracy"] <= 1
    assert result.config.task == "sequence-classification"  # the task's defaults are filled in, on the result
    assert config.task is None and result.config.epochs == 1 and result.config.output_dir == out
    assert any(m.startswith("training lora") for m in messages)
    # config.yaml keeps the levers flat, and reads back as the same settings
    recorded = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert recorded["gradient_checkpointing"] is True and "levers" not in recorded
    again = RunConfig.from_dict({k: v for k, v in recorded.items() if k in FIELDS})
    assert again.levers == config.levers and again.max_length == 16

    [row] = api.predict(api.PredictConfig(adapter=os.path.join(out, "adapter"), inputs=["a good film"], model=model))
    assert row["text"] == "a good film" and row["label"] in ("neg", "pos")
    merged = api.merge(api.MergeConfig(os.path.join(out, "adapter"), str(tmp_path / "merged"), model=model))
    assert merged.strategy == "lora" and os.path.isfile(tmp_path / "merged" / "config.json")
    meta = api.inspect(os.path.join(out, "adapter"))
    assert meta["strategy"] == "lora" and meta["adapter_bytes"] > 0


def _one_short_epoch(tiny_model_dir, tiny_csv, **settings) -> RunConfig:
    """head_only for one epoch of 32 examples on the tiny BERT: a whole run in a second or two."""
    return RunConfig(
        strategy="head_only",
        model=tiny_model_dir("bert"),
        dataset=tiny_csv,
        epochs=1,
        max_train_samples=32,
        max_length=16,
        **settings,
    )


@pytest.mark.filterwarnings("ignore::peftkit.errors.LearnedNothingWarning")  # one epoch of 32 examples
def test_one_config_runs_twice_and_is_left_as_given(tiny_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    """``run`` works on a copy: the caller's config is unchanged, so the same object (output_dir None:
    the default directory) runs again into a directory of its own; the completed one is on the result."""
    monkeypatch.chdir(tmp_path)
    config = _one_short_epoch(tiny_model_dir, tiny_csv, strategy_options={})
    before = RunConfig.from_dict(config.to_dict())
    first = api.run(config, echo=lambda message: None)
    second = api.run(config, echo=lambda message: None)
    assert config == before and config.output_dir is None and config.task is None
    assert first.run_dir != second.run_dir and os.path.isdir(first.run_dir) and os.path.isdir(second.run_dir)
    assert first.config.output_dir == first.run_dir and first.config.task == "sequence-classification"
    recorded = yaml.safe_load(open(os.path.join(first.run_dir, "config.yaml")))
    assert first.config == RunConfig.from_dict({k: v for k, v in recorded.items() if k in FIELDS})


def test_plan(tiny_model_dir) -> None:
    plan = api.plan(
        PlanSettings(
            model=tiny_model_dir("bert"),
            strategies=["lora", "head-only"],
            batch_size=4,
            max_length=8,
            levers=Levers(precision="bf16"),
        )
    )
    assert plan.settings.task == "sequence-classification" and plan.settings.strategies == ["lora", "head_only"]
    assert plan.settings.device in ("cpu", "cuda")
    assert [e.status for e in plan.estimates] == ["ok", "ok"]
    as_json = plan.to_dict()
    assert as_json["settings"]["precision"] == "bf16" and as_json["estimates"][0]["total"] > 0
    json.dumps(as_json)  # what `peftkit plan --json` prints


def test_bench(tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = str(tmp_path / "bench")
    config = BenchConfig(
        strategies=["head_only"],
        model=tiny_model_dir("bert"),
        dataset=tiny_csv,
        epochs=1,
        batch_size=8,
        max_length=16,
        output_dir=out,
    )
    result = api.bench(config, echo=lambda message: None)
    assert result.output_dir == out and os.path.isfile(os.path.join(out, "results.json"))
    [row] = result.results["rows"]
    assert row["status"] == "ok" and row["batch_size"] == 8
    assert result.results["settings"]["task"] == "sequence-classification"
    assert result.results["settings"]["optimizer"] == "adamw"  # levers recorded flat
    assert re.search(r"^\| `head_only`( †)? \|", result.table, re.M)  # † when it does no better than the baseline


def test_bad_settings_are_refused_before_anything_runs(tmp_path) -> None:
    with pytest.raises(PeftkitError, match="unknown task 'translation'; available: "):
        api.run(RunConfig(task="translation", output_dir=str(tmp_path / "run")))
    with pytest.raises(PeftkitError, match="--auto-fit needs --memory-budget"):
        api.bench(BenchConfig(strategies=["lora"], auto_fit=True, output_dir=str(tmp_path / "bench")))
    with pytest.raises(PeftkitError, match="batch_size must be a positive integer, got 0"):
        api.plan(PlanSettings(strategies=["lora"], batch_size=0))
    with pytest.raises(PeftkitError, match="precision must be one of 'fp32', 'bf16', 'fp16', got 'fp64'"):
        Levers(precision="fp64")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("checkpointed", [True, False])
def test_an_interrupted_run_says_what_it_left(checkpointed, tiny_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    """Ctrl-C during a run: with a checkpoint, ``RunInterrupted`` says how to continue and the
    staging directory stays; without one, nothing is left."""
    import peftkit.train

    def interrupted(run, stage, echo, resume=False, early=None):
        if checkpointed:
            os.makedirs(os.path.join(stage, "checkpoints", "step-0000004"))
            open(os.path.join(stage, "checkpoints", "step-0000004", "state.json"), "w").write("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(peftkit.train, "execute_run", interrupted)
    out = str(tmp_path / "run")
    config = RunConfig(strategy="lora", model=tiny_model_dir("bert"), dataset=tiny_csv, output_dir=out)
    with pytest.raises(KeyboardInterrupt) as caught:
        api.run(config, echo=lambda message: None)
    if checkpointed:
        assert isinstance(caught.value, RunInterrupted)
        assert caught.value.kept == f"the last checkpoint is kept: continue with peftkit run --resume {out}"
        assert os.listdir(tmp_path) == [".run.partial"]
    else:
        assert not isinstance(caught.value, RunInterrupted) and os.listdir(tmp_path) == []


def test_predict_takes_one_config_checked_before_anything_loads(tmp_path) -> None:
    """``predict`` and ``predict_iter`` take a ``PredictConfig`` (issue 31 item 4: one config object per
    function, as ``evaluate``'s ``EvalConfig``), refused in one line before torch loads."""
    with pytest.raises(PeftkitError, match="no model: give --adapter DIR"):
        api.predict(api.PredictConfig(inputs=["a good film"]))
    with pytest.raises(PeftkitError, match="no inputs: give texts, or --input FILE"):
        api.predict_iter(api.PredictConfig(adapter=str(tmp_path)))
    with pytest.raises(PeftkitError, match="adapter directory not found"):
        api.predict(api.PredictConfig(adapter=str(tmp_path / "missing"), inputs=["a good film"]))
    assert api.PredictConfig(do_sample=True, temperature=0.7).generation.temperature == 0.7


@pytest.mark.filterwarnings("ignore::peftkit.errors.LearnedNothingWarning")  # one epoch of a tiny model
def test_in_memory_data_is_read_as_its_file_is(tiny_model_dir, tiny_csv, tmp_path) -> None:
    """Issue 31 item 4: ``RunConfig.dataset`` may be a ``datasets.Dataset``, a ``DatasetDict`` or a pandas
    ``DataFrame``: the same column checks and the same seeded splits as the file they came from, and
    a name that says what it was wherever a name is recorded."""
    import datasets
    import pandas

    def run(dataset, name: str) -> tuple[dict, dict]:
        config = RunConfig(
            strategy="head_only",
            model=tiny_model_dir("bert"),
            dataset=dataset,
            epochs=1,
            max_length=16,
            output_dir=str(tmp_path / name),
        )
        result = api.run(config, echo=lambda message: None)
        assert config.dataset is dataset  # the caller's config still holds its data
        recorded = yaml.safe_load(open(os.path.join(result.run_dir, "config.yaml")))
        return recorded, {**result.metrics.to_dict(), "test": result.metrics.test}

    from_file, file_metrics = run(tiny_csv, "file")
    frame = pandas.read_csv(tiny_csv)
    for data, name, recorded_as in [
        (frame, "frame", "in-memory DataFrame (200 rows)"),
        (datasets.Dataset.from_pandas(frame), "dataset", "in-memory Dataset (200 rows)"),
    ]:
        recorded, metrics = run(data, name)
        assert recorded["dataset"] == metrics["dataset"] == recorded_as
        assert metrics["split"] == file_metrics["split"] and recorded["text_column"] == from_file["text_column"]
        assert metrics["test"] == file_metrics["test"]  # the same examples, the same run
    whole = datasets.Dataset.from_pandas(frame).train_test_split(test_size=0.25, seed=0)
    recorded, metrics = run(whole, "dict")
    assert recorded["dataset"] == "in-memory DatasetDict (train 150, test 50 rows)"
    assert metrics["split"]["sizes"]["test"] == 50  # its own test split kept, as a file's would be
    with pytest.raises(PeftkitError, match="'nope'"):  # the file's column checks
        api.run(RunConfig(model=tiny_model_dir("bert"), dataset=frame, label_column="nope"), echo=lambda message: None)
    with pytest.raises(PeftkitError, match="in-memory datasets.Dataset, datasets.DatasetDict or pandas DataFrame"):
        api.run(RunConfig(dataset=[1, 2, 3]), echo=lambda message: None)


def test_what_runs_in_processes_of_its_own_refuses_objects_in_one_line(tmp_path) -> None:
    """``dataset`` and ``model`` are the shared ``DataSettings``' (str or, from Python, an object): a
    bench's and a tune's runs are processes of their own, which cannot see data in memory, and a
    model that is neither a name nor a loaded transformers model is refused by all; each says so in
    one line before anything loads."""
    import pandas

    from peftkit.tuning.config import TuneConfig

    frame = pandas.DataFrame({"text": ["good", "bad"] * 10, "label": [1, 0] * 10})
    with pytest.raises(PeftkitError, match="bench runs each strategy in a process of its own"):
        api.bench(BenchConfig(strategies=["lora"], dataset=frame, output_dir=str(tmp_path / "b")))
    with pytest.raises(PeftkitError, match="tune runs each trial in a process of its own"):
        api.tune(TuneConfig(run=RunConfig(dataset=frame, output_dir=str(tmp_path / "t"))))
    with pytest.raises(PeftkitError, match=r"or a loaded transformers PreTrainedModel, .*; got: object$"):
        api.plan(PlanSettings(strategies=["lora"], model=object()))
    assert not os.listdir(tmp_path)


@pytest.mark.filterwarnings("ignore::peftkit.errors.LearnedNothingWarning")  # one epoch of 32 examples
def test_start_up_before_the_run_began_is_in_its_stages_and_wall(tiny_model_dir, tiny_csv, tmp_path, monkeypatch):
    """A run's caller imports datasets, transformers, torch and accelerate before the run's own clock
    starts (quieting the libraries, staging the directory): that is start-up, so stage_seconds'
    ``imports`` and the wall time count it (here a stand-in that takes half a second)."""
    import time

    import peftkit.runs

    monkeypatch.setattr(peftkit.runs, "quiet_libraries_in_own_process", lambda: time.sleep(0.5))
    config = _one_short_epoch(tiny_model_dir, tiny_csv, output_dir=str(tmp_path / "run"))
    result = api.run(config, echo=lambda message: None)
    metrics = json.load(open(os.path.join(result.run_dir, "metrics.json")))
    stages = metrics["stage_seconds"]
    assert stages["imports"] >= 0.5
    assert metrics["wall_seconds"] >= sum(stages.values()) - 0.05  # the stages fit inside the wall time
