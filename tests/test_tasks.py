"""Task types beyond text classification: causal-lm and image-classification, with every strategy,
on tiny models built from a config (no pretrained weights needed)."""

from __future__ import annotations

import csv
import json
import os

import pytest

from conftest import make_rows

STRATEGIES = ("full", "head_only", "gradual_unfreeze", "lora", "adapter", "prefix")


def _load(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


# -- causal-lm ----------------------------------------------------------------------------------


def test_the_loss_is_on_the_response_only(tiny_causal_dir, pairs_csv) -> None:
    from peftkit.config import RunConfig
    from peftkit.tasks import get_task
    from peftkit.tasks.causal_lm import IGNORE

    task = get_task("causal-lm")
    cfg = RunConfig(task="causal-lm", model=tiny_causal_dir, dataset=pairs_csv, max_length=8)
    data = task.load_data(cfg)
    tok = task.load_processor(tiny_causal_dir)
    enc = task.encode(data, tok, cfg)
    row, raw = enc["train"][0], data.splits["train"][0]
    answer = tok(raw["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    labelled = [t for t in row["labels"] if t != IGNORE]
    assert labelled == answer, "exactly the response and the end-of-sequence token carry loss"
    assert row["input_ids"][-len(answer) :] == answer and len(row["input_ids"]) <= 8
    # a prompt too long for max_length loses its beginning, never the answer
    assert (
        row["input_ids"][: len(row["input_ids"]) - len(answer)]
        == tok(raw["prompt"])["input_ids"][-(len(row["input_ids"]) - len(answer)) :]
    )
    batch = task.collate(tok)([enc["train"][i] for i in range(4)])
    assert (batch["attention_mask"][:, -1] == 1).all(), "padded on the left: answers end every row"
    assert batch["logits_to_keep"] == int((batch["labels"] != IGNORE).sum(1).max()) + 1


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_strategy_trains_a_causal_lm(strategy, tiny_causal_dir, pairs_csv, run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, stdout, err = run_cli(
        "run",
        "--strategy",
        strategy,
        "--model",
        tiny_causal_dir,
        "--dataset",
        pairs_csv,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--output-dir",
        out,
    )
    assert code == 0, err
    m = _load(os.path.join(out, "metrics.json"))
    assert m["task"] == "causal-lm", "inferred from the model's config (LlamaForCausalLM)"
    assert m["loss"] == "chunked", "the default where the output layer is a plain linear layer"
    assert m["test_perplexity"] > 1 and 0 <= m["test_exact_match"] <= 1 and "test_accuracy" not in m
    assert "test perplexity" in stdout and "exact match" in stdout
    meta = _load(os.path.join(out, "adapter", "peftkit_adapter.json"))
    assert meta["task"] == "causal-lm"
    from peftkit.inference import load_adapter, predict_texts

    rows = predict_texts(load_adapter(os.path.join(out, "adapter")), ["the film is good", "dull and boring"])
    assert [r["text"] for r in rows] == ["the film is good", "dull and boring"]
    assert all(isinstance(r["completion"], str) for r in rows)


def test_causal_lm_learns_the_toy_answers(tiny_causal_dir, pairs_csv, run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, _, err = run_cli(
        "run",
        "--strategy",
        "full",
        "--lr",
        "3e-3",
        "--model",
        tiny_causal_dir,
        "--dataset",
        pairs_csv,
        "--epochs",
        "6",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--output-dir",
        out,
    )
    assert code == 0, err
    m = _load(os.path.join(out, "metrics.json"))
    # two equally likely answers: a model that learned nothing scores about 0.5 and perplexity ~2 on them
    assert m["test_exact_match"] >= 0.9, m["test_exact_match"]
    # the untrained model's validation perplexity was measured first, and training beat it
    assert m["learned"] is True and m["baseline"]["name"] == "zero-shot"
    assert m["validation_loss"] < m["baseline"]["validation"]["loss"]


def test_head_only_trains_the_untied_output_layer_only(tiny_causal_dir, pairs_csv) -> None:
    from peftkit.config import RunConfig
    from peftkit.train import resolve

    run = resolve(RunConfig(strategy="head_only", model=tiny_causal_dir, dataset=pairs_csv))
    data = run.task.load_data(run.config)
    tok = run.task.load_processor(tiny_causal_dir)
    base = run.task.load_model(tiny_causal_dir, data, tok, None, "fp32")
    assert base.lm_head.weight is base.get_input_embeddings().weight
    model = run.strategy.prepare(base, run.task.spec(base, data))
    trainable = run.strategy.trainable_parameters(model)
    assert list(trainable) == ["lm_head.weight"]
    assert model.lm_head.weight is not model.get_input_embeddings().weight, "untied: the embeddings stay frozen"


def test_labelled_data_becomes_a_completion_task(tiny_causal_dir, tiny_csv, run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, _, err = run_cli(
        "run",
        "--task",
        "causal-lm",
        "--strategy",
        "lora",
        "--model",
        tiny_causal_dir,
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "24",
        "--output-dir",
        out,
    )
    assert code == 0, err
    m = _load(os.path.join(out, "metrics.json"))
    assert m["test_accuracy"] == m["test_exact_match"], "the generated answer is the predicted label"
    # which answers matched, one per test example, for a bench's paired test
    record = m["per_example_correct"]
    assert len(record) == 20 and record.count("1") / len(record) == pytest.approx(m["test_exact_match"])
    meta = _load(os.path.join(out, "adapter", "peftkit_adapter.json"))
    assert meta["prompt_template"] == "{text}\nAnswer:" and meta["label_names"] == ["neg", "pos"]


# -- image-classification ---------------------------------------------------------------------


@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "prefix"])
def test_every_strategy_trains_an_image_classifier(strategy, tiny_vit_dir, run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, stdout, err = run_cli(
        "run",
        "--strategy",
        strategy,
        "--model",
        tiny_vit_dir,
        "--dataset",
        "digits",
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--max-train-samples",
        "300",
        "--output-dir",
        out,
    )
    assert code == 0, err
    m = _load(os.path.join(out, "metrics.json"))
    assert m["task"] == "image-classification" and m["split"]["sizes"]["train"] == 300
    assert 0 <= m["test_accuracy"] <= 1 and m["label_names"] == [str(i) for i in range(10)]
    from PIL import Image

    from peftkit.inference import load_adapter, predict_texts

    path = str(tmp_path / "digit.png")
    Image.new("L", (8, 8), color=128).save(path)
    rows = predict_texts(load_adapter(os.path.join(out, "adapter")), [path])
    assert rows[0]["image"] == path and rows[0]["label"] in m["label_names"]


def test_prefix_is_refused_for_images_in_one_line(tiny_vit_dir, run_cli, tmp_path) -> None:
    code, _, err = run_cli(
        "run",
        "--strategy",
        "prefix",
        "--model",
        tiny_vit_dir,
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--max-train-samples",
        "50",
        "--output-dir",
        str(tmp_path / "run"),
    )
    assert code == 2 and "strategy 'prefix' cannot handle task 'image-classification'" in err
    assert "Traceback" not in err and not os.path.exists(tmp_path / "run")


def test_image_data_from_a_folder_and_mnist(tiny_vit_dir, tmp_path) -> None:
    from PIL import Image

    from peftkit.config import RunConfig
    from peftkit.tasks import get_task

    for label in ("cat", "dog"):
        os.makedirs(tmp_path / "pics" / label)
        for i in range(6):
            Image.new("RGB", (10, 10), color=(40 * i, 0, 0) if label == "cat" else (0, 40 * i, 0)).save(
                tmp_path / "pics" / label / f"{i}.png"
            )
    task = get_task("image-classification")
    data = task.load_data(RunConfig(task="image-classification", dataset=str(tmp_path / "pics")))
    assert data.label_names == ["cat", "dog"] and sum(data.split_info["sizes"].values()) == 12
    # arrays too: a saved dataset whose images are lists of numbers (channels first, floats in [0, 1])
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    arrays = datasets.Dataset.from_dict(
        {"pixels": [rng.random((3, 12, 12)).tolist() for _ in range(12)], "label": ["a", "b"] * 6}
    )
    arrays.save_to_disk(str(tmp_path / "arrays"))
    cfg = RunConfig(task="image-classification", dataset=str(tmp_path / "arrays"), model=tiny_vit_dir)
    data = task.load_data(cfg)
    enc = task.encode(data, task.load_processor(tiny_vit_dir), cfg)
    assert np.asarray(enc["train"][0]["pixel_values"]).shape == (3, 16, 16)
    mnist = task.load_data(RunConfig(task="image-classification", dataset="mnist", max_train_samples=100))
    assert mnist.label_names == [str(i) for i in range(10)] and mnist.split_info["sizes"]["train"] == 100
    assert mnist.splits["train"][0]["image"].size == (28, 28)


# -- inference of the task, plan, trackers ------------------------------------------------------


def test_the_task_is_read_from_the_model(tiny_causal_dir, tiny_vit_dir, tiny_model_dir) -> None:
    from peftkit.tasks import infer_task

    assert infer_task(tiny_causal_dir) == "causal-lm"
    assert infer_task(tiny_vit_dir) == "image-classification"
    assert infer_task(tiny_model_dir("bert")) == "sequence-classification"
    assert infer_task("smollm2") == "causal-lm" and infer_task("vit-tiny") == "image-classification"


@pytest.mark.parametrize("kind", ["causal", "vit"])
def test_plan_works_for_every_task(kind, tiny_causal_dir, tiny_vit_dir) -> None:
    from peftkit.planner import PlanSettings, make_plan

    model, task = (tiny_causal_dir, "causal-lm") if kind == "causal" else (tiny_vit_dir, "image-classification")
    settings = PlanSettings(
        model=model,
        strategies=["full", "lora", "head_only"],
        task=task,
        batch_size=8,
        max_length=16 if kind == "causal" else None,
    )
    estimates = {e.strategy: e for e in make_plan(settings)}
    assert all(e.status == "ok" for e in estimates.values()), [e.error for e in estimates.values()]
    full, lora = estimates["full"], estimates["lora"]
    assert full.trainable_params == full.total_params and lora.trainable_params < full.trainable_params
    if kind == "causal":  # tied input and output embeddings are one matrix, counted once
        from transformers import AutoModelForCausalLM

        real = AutoModelForCausalLM.from_pretrained(model)
        assert full.total_params == sum(p.numel() for p in real.parameters())
    assert full.optimizer > lora.optimizer > 0 and full.activations > 0


def test_tensorboard_events_are_written(tiny_model_dir, tiny_csv, run_cli, tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "run")
    code, _, err = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--output-dir",
        out,
        "--report-to",
        "tensorboard",
    )
    assert code == 0, err
    logdir = os.path.join(out, "tensorboard", "peftkit")
    events = EventAccumulator(logdir)
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "validation/accuracy", "test/accuracy"} <= set(tags), tags
    assert [e.step for e in events.Scalars("train/loss")] == list(range(1, 21))  # 2 epochs x 10 steps
    assert len(events.Scalars("validation/accuracy")) == 2


def test_wandb_asked_for_but_not_installed(tiny_model_dir, tiny_csv, run_cli, tmp_path, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run_cli(
        "run",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        str(tmp_path / "run"),
        "--report-to",
        "wandb",
    )
    assert code == 2 and "needs the wandb package, which is not installed: pip install wandb" in err


# -- the benchmark, for every task type ------------------------------------------------------


def test_bench_compares_strategies_on_a_causal_lm(tiny_causal_dir, pairs_csv, run_cli, tmp_path) -> None:
    out = tmp_path / "bench"
    code, stdout, err = run_cli(
        "bench",
        "--strategies",
        "lora,head_only",
        "--model",
        tiny_causal_dir,
        "--dataset",
        pairs_csv,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--max-eval-samples",
        "10",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    results = json.load(open(out / "results.json"))
    assert results["settings"]["task"] == "causal-lm" and results["settings"]["max_length"] == 16
    assert results["quality"][0] == "test_exact_match", "no labels: quality is the exact match"
    for name in ("lora", "head_only"):
        row = next(r for r in results["rows"] if r["strategy"] == name)
        assert row["status"] == "ok" and row["test_perplexity"] > 1
        assert results["summary"][name]["test_exact_match_mean"] is not None
        assert row["predicted_peak_bytes"], "the planner predicted the causal-lm run too"
    md = (out / "results.md").read_text()
    assert "| exact match (± sd) | perplexity |" in md
    # one epoch: a dot per strategy is no curve (issue 15); the report says why there is none
    assert not (out / "validation_curves.png").exists() and "no validation curves" in md
    assert results["baseline"]["name"] == "majority answer" and 0 < results["baseline"]["exact_match"] < 1


@pytest.mark.slow
def test_bench_compares_strategies_on_images(tiny_vit_dir, run_cli, tmp_path) -> None:
    out = tmp_path / "bench"
    code, _, err = run_cli(
        "bench",
        "--strategies",
        "full,lora,prefix",
        "--model",
        tiny_vit_dir,
        "--dataset",
        "digits",
        "--epochs",
        "1",
        "--max-train-samples",
        "200",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    results = json.load(open(out / "results.json"))
    assert results["settings"]["task"] == "image-classification" and results["quality"][0] == "test_accuracy"
    status = {r["strategy"]: r["status"] for r in results["rows"]}
    assert status == {"full": "ok", "lora": "ok", "prefix": "not applicable"}
    prefix = next(r for r in results["rows"] if r["strategy"] == "prefix")
    assert "cannot handle task 'image-classification'" in prefix["error"] and prefix["tried"] == []
    assert "| test accuracy (± sd) | macro-F1 |" in (out / "results.md").read_text()


def test_wandb_offline_run_when_installed(tiny_model_dir, tiny_csv, run_cli, tmp_path, monkeypatch) -> None:
    """W&B is not a dependency: this runs where it is installed (offline: nothing leaves the machine)."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    os.makedirs(tmp_path / "wb")
    out = str(tmp_path / "run")
    code, _, err = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--output-dir",
        out,
        "--report-to",
        "wandb",
    )
    assert code == 0, err
    runs = [p for p in (tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb")]
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_plan_refuses_a_strategy_that_trains_nothing(tiny_causal_dir) -> None:
    from peftkit import registry
    from peftkit.planner import PlanSettings, make_plan

    if "bitfit" not in registry.available():
        pytest.skip("the bitfit plugin is not installed (or plugins are disabled)")
    [est] = make_plan(
        PlanSettings(model=tiny_causal_dir, strategies=["bitfit"], task="causal-lm", batch_size=4, max_length=8)
    )
    assert est.status == "refused" and "left no parameter to train" in est.error  # Llama has no biases


def test_merge_a_causal_lora_adapter_into_a_plain_model(tiny_causal_dir, pairs_csv, run_cli, tmp_path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from peftkit.inference import load_adapter

    out = str(tmp_path / "run")
    code, _, err = run_cli(
        "run",
        "--strategy",
        "lora",
        "--lr",
        "1e-2",
        "--model",
        tiny_causal_dir,
        "--dataset",
        pairs_csv,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        "--output-dir",
        out,
    )
    assert code == 0, err
    merged_dir = str(tmp_path / "merged")
    code, stdout, err = run_cli("merge", "--adapter", os.path.join(out, "adapter"), "--output", merged_dir)
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    loaded = load_adapter(os.path.join(out, "adapter"))
    ids = torch.tensor([[2, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, loaded.model(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_one_text_column_is_plain_language_modelling(tiny_causal_dir, tmp_path, run_cli) -> None:
    path = tmp_path / "texts.csv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text"])
        writer.writeheader()
        writer.writerows({"text": r["text"]} for r in make_rows(60))
    out = str(tmp_path / "run")
    code, stdout, err = run_cli(
        "run",
        "--task",
        "causal-lm",
        "--strategy",
        "lora",
        "--model",
        tiny_causal_dir,
        "--dataset",
        str(path),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--output-dir",
        out,
    )
    assert code == 0, err
    m = _load(os.path.join(out, "metrics.json"))
    assert m["split"]["shape"] == "plain text" and m["test_perplexity"] > 1
    assert "test_exact_match" not in m, "no answers to generate"


def test_the_planner_keeps_every_position_for_plain_text(tiny_causal_dir, pairs_csv, tmp_path) -> None:
    """On the first GPU run the planner was 30% under for plain-text language modelling: it planned
    a short answer's logits, while plain text keeps vocabulary-wide logits at every position. The
    data's shape now reaches the planner: every position for plain text, the answer for pairs."""
    from peftkit.config import Levers, RunConfig
    from peftkit.planner import PlanSettings, load_config, plan_strategy
    from peftkit.tasks import get_task

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": f"sentence {i} " * 6}) + "\n" for i in range(40)))
    task = get_task("causal-lm")
    tok = task.load_processor(tiny_causal_dir)
    cfg = RunConfig(task="causal-lm", model=tiny_causal_dir, dataset=str(plain), max_length=16)
    assert task.loss_positions(task.load_data(cfg), tok, cfg) == 16
    task = get_task("causal-lm")
    cfg = RunConfig(task="causal-lm", model=tiny_causal_dir, dataset=pairs_csv, max_length=16)
    answer = task.loss_positions(task.load_data(cfg), tok, cfg)
    assert 2 <= answer <= 4, "a one-word answer and its end-of-sequence token"

    batch = task.dummy_batch(load_config(tiny_causal_dir), 4, 16, "cpu", loss_positions=16)
    assert batch["logits_to_keep"] == 16 and bool((batch["labels"] != -100).all())
    # planned for a GPU from this CPU: the bytes autograd saves, exact (a CPU resident set is noisy)
    settings = dict(
        model=tiny_causal_dir, strategies=["lora"], task="causal-lm", batch_size=8, max_length=16, device="cuda"
    )
    plain = Levers(loss="plain")
    short = plan_strategy(load_config(tiny_causal_dir), "lora", PlanSettings(**settings, levers=plain))
    every = plan_strategy(
        load_config(tiny_causal_dir), "lora", PlanSettings(**settings, levers=plain, loss_positions=16)
    )
    assert every.activations > short.activations
    # the chunked loss (the default) keeps no vocabulary-wide logits for the positions it learns
    chunked = plan_strategy(load_config(tiny_causal_dir), "lora", PlanSettings(**settings, loss_positions=16))
    assert chunked.activations < every.activations
