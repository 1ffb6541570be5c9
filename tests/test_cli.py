"""`peftkit run` / `predict` end to end on a tiny model, and every bad input the issue lists."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

METRIC_KEYS = {
    "strategy",
    "model",
    "dataset",
    "seed",
    "epochs",
    "device",
    "test_accuracy",
    "test_f1_macro",
    "validation_accuracy",
    "trainable_params",
    "total_params",
    "train_seconds",
    "samples_per_second",
    "peak_memory_bytes",
    "adapter_bytes",
}


def _run_args(model_dir: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        "run",
        "--model",
        model_dir,
        "--dataset",
        data,
        "--output-dir",
        out,
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        *extra,
    ]


@pytest.mark.parametrize("strategy", ["full", "head_only", "lora"])
def test_run_writes_a_complete_run_directory(strategy, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, stdout, stderr = run_cli(*_run_args(tiny_model_dir("bert"), tiny_csv, out, "--strategy", strategy))
    assert code == 0, stderr
    assert sorted(os.listdir(out)) == ["adapter", "config.yaml", "metrics.json", "train.log"]
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert METRIC_KEYS <= set(metrics)
    assert metrics["strategy"] == strategy and metrics["epochs"] == 2 and metrics["device"] == "cpu"
    assert 0 < metrics["trainable_params"] <= metrics["total_params"]
    weights = [f for f in os.listdir(os.path.join(out, "adapter")) if f.endswith(".safetensors")]
    assert weights == (["adapter_model.safetensors"] if strategy == "lora" else ["adapter.safetensors"])
    assert metrics["adapter_bytes"] == os.path.getsize(os.path.join(out, "adapter", weights[0]))
    assert metrics["peak_memory_bytes"] > 0 and 0 <= metrics["test_accuracy"] <= 1
    assert len(metrics["history"]) == 2
    config = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert config["strategy"] == strategy and config["lr"] > 0 and config["split"]["sizes"]["train"] == 160
    meta = json.load(open(os.path.join(out, "adapter", "peftkit_adapter.json")))
    assert meta["strategy"] == strategy and meta["label_names"] == ["neg", "pos"] and meta["max_length"] == 16
    assert (
        meta["base_fingerprint"].startswith("sha256:") and meta["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    )
    from peftkit.env import package_versions  # the one version table, the same as `peftkit env`'s

    assert meta["versions"] == metrics["versions"] == package_versions()
    log = open(os.path.join(out, "train.log")).read()
    assert "epoch 2/2" in log and "test accuracy" in log
    assert f"{strategy}: test accuracy" in stdout

    code, stdout, stderr = run_cli(
        "predict",
        "--adapter",
        os.path.join(out, "adapter"),
        "--model",
        tiny_model_dir("bert"),
        "a good film",
        "dull and boring",
    )
    assert code == 0, stderr
    rows = [json.loads(line) for line in stdout.splitlines()]
    assert [r["text"] for r in rows] == ["a good film", "dull and boring"]
    for r in rows:
        assert r["label"] in ("neg", "pos") and r["label_id"] == ["neg", "pos"].index(r["label"])
        assert abs(sum(r["probabilities"]) - 1) < 1e-5 and r["score"] == max(r["probabilities"])


def test_full_run_learns_the_toy_task(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, _, stderr = run_cli(
        *_run_args(tiny_model_dir("bert"), tiny_csv, out, "--strategy", "full", "--epochs", "6", "--lr", "3e-3")
    )
    assert code == 0, stderr
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["test_accuracy"] >= 0.9
    assert m["learned"] is True and m["learned_note"] is None, "well above the majority class: not flagged"


def test_same_seed_same_result(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    results = []
    for name in ("a", "b"):
        out = str(tmp_path / name)
        code, _, stderr = run_cli(*_run_args(tiny_model_dir("bert"), tiny_csv, out, "--strategy", "lora"))
        assert code == 0, stderr
        results.append(json.load(open(os.path.join(out, "metrics.json"))))
    assert results[0]["history"][-1]["train_loss"] == results[1]["history"][-1]["train_loss"]
    assert results[0]["test_accuracy"] == results[1]["test_accuracy"]


def test_yaml_config_flags_override_and_set_options(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "strategy": "lora",
                "model": tiny_model_dir("gpt2"),
                "dataset": tiny_csv,
                "epochs": 1,
                "batch_size": 16,
                "max-length": 16,
                "lr": 0.5,
                "strategy_options": {"r": 2, "alpha": 4},
            }
        )
    )
    out = str(tmp_path / "run")
    code, _, stderr = run_cli("run", "--config", str(cfg), "--lr", "0.002", "--set", "r=4", "--output-dir", out)
    assert code == 0, stderr
    resolved = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert resolved["lr"] == 0.002  # flag beats file
    assert resolved["strategy_options"]["r"] == 4 and resolved["strategy_options"]["alpha"] == 4
    assert resolved["max_length"] == 16


def test_existing_run_is_kept_unless_overwrite(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    args = _run_args(tiny_model_dir("bert"), tiny_csv, str(out), "--strategy", "head_only")
    code, _, stderr = run_cli(*args)
    assert code == 2 and "already exists; use --overwrite" in stderr
    assert (out / "precious.txt").read_text() == "keep me"
    code, _, stderr = run_cli(*args, "--overwrite")
    assert code == 0, stderr
    assert not (out / "precious.txt").exists() and (out / "metrics.json").exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # no staging leftovers


# -- bad input: one line, exit 2, no traceback, nothing written --------------------------------


@pytest.fixture
def bad_inputs(tmp_path, tiny_model_dir, tiny_csv):
    (tmp_path / "bad.yaml").write_text("epochs: 2\nlr: [1, 2\nseed: 1\n")
    (tmp_path / "unknown.yaml").write_text("epochs: 2\nlearning_rate: 0.1\n")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "metrics.json").write_text("{}")
    m, d = tiny_model_dir("bert"), tiny_csv
    base = ["run", "--model", m, "--dataset", d, "--max-length", "16"]
    t = str(tmp_path)
    return {
        "unknown strategy": (
            base + ["--strategy", "lorax"],
            r"unknown strategy 'lorax' \(did you mean 'lora'\?\); available: adapter, .*full, "
            r"gradual_unfreeze, head_only, lora, prefix",
        ),
        "missing file": (["run", "--model", m, "--dataset", f"{t}/none.csv"], r"data file not found"),
        "missing column": (base + ["--text-column", "body"], r"text column 'body' not found; columns: text, label"),
        "zero epochs": (base + ["--epochs", "0"], r"epochs must be a positive integer, got 0"),
        "negative batch": (base + ["--batch-size", "-4"], r"batch_size must be a positive integer, got -4"),
        "zero max length": (base + ["--max-length", "0"], r"max_length must be a positive integer, got 0"),
        "lr not a number": (base + ["--lr", "fast"], r"'fast' is not a valid float"),
        "yaml syntax": (base + ["--config", f"{t}/bad.yaml"], r"YAML syntax error in .*bad.yaml, line 3"),
        "unknown config key": (base + ["--config", f"{t}/unknown.yaml"], r"unknown key 'learning_rate'"),
        "unknown option": (base + ["--set", "rank=4"], r"unknown option 'rank' for strategy 'lora'; accepted: alpha"),
        "bad option value": (base + ["--set", "r=0"], r"lora option r must be a positive integer, got 0"),
        "bad option type": (base + ["--set", "r=big"], r"option 'r' of strategy 'lora' must be int, got 'big'"),
        "set without =": (base + ["--set", "r"], r"--set expects KEY=VALUE"),
        "no model there": (
            ["run", "--model", f"{t}/empty_model", "--dataset", d],
            r"holds no model \(no config.json\)",
        ),
        "output is a file": (base + ["--output-dir", f"{t}/afile"], r"is a file"),
        "existing run": (base + ["--output-dir", f"{t}/existing"], r"already exists; use --overwrite"),
        "predict missing adapter": (["predict", "--adapter", f"{t}/nope", "hi"], r"adapter directory not found"),
    }


CASES = [
    "unknown strategy",
    "missing file",
    "missing column",
    "zero epochs",
    "negative batch",
    "zero max length",
    "lr not a number",
    "yaml syntax",
    "unknown config key",
    "unknown option",
    "bad option value",
    "bad option type",
    "set without =",
    "no model there",
    "output is a file",
    "existing run",
    "predict missing adapter",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gives_one_line_error(case, bad_inputs, run_cli, tmp_path, monkeypatch) -> None:
    import re

    monkeypatch.chdir(tmp_path)  # default run directories would land here
    before = sorted(os.listdir(tmp_path))
    args, pattern = bad_inputs[case]
    code, stdout, stderr = run_cli(*args)
    assert code == 2, (code, stderr)
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # progress lines ("loading data ...") may come first; the error is one line, and the last
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in stderr, stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert sorted(os.listdir(tmp_path)) == before, "a failed run left files behind"


def test_error_in_a_real_process_has_no_traceback(tiny_csv) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", "run", "--dataset", tiny_csv, "--epochs", "-1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "error: epochs must be a positive integer, got -1"


def test_the_help_lists_every_command(run_cli) -> None:
    """`peftkit --help` opens with a line per command (issue 32: `export` was missing from it)."""
    from peftkit.cli import cli

    code, out, _ = run_cli("--help")
    assert code == 0
    listed = {line.split()[1] for line in out.splitlines() if line.strip().startswith("peftkit ")}
    hidden = {name for name, cmd in cli.commands.items() if cmd.hidden}
    assert set(cli.commands) - hidden <= listed, set(cli.commands) - listed
