"""Long runs: a run killed with SIGKILL and resumed ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import os
import sys

import pytest

from peftkit.adapter_io import read_safetensors

from conftest import kill_after_checkpoint


def _args(model: str, data: str, out: str, strategy: str, *extra: str) -> list[str]:
    # 4 epochs of 40 steps: checkpoints land mid-epoch and on epoch ends, the model has dropout
    # (random state matters), gradual_unfreeze adds parameter groups as it goes, head_only
    # fills its feature cache in epoch 1
    return [
        "run",
        "--strategy",
        strategy,
        "--model",
        model,
        "--dataset",
        data,
        "--epochs",
        "4",
        "--batch-size",
        "4",
        "--max-length",
        "16",
        "--output-dir",
        out,
        *extra,
    ]


def _strategy_options(strategy: str) -> list[str]:
    return ["--set", "unfreeze_every_steps=15"] if strategy == "gradual_unfreeze" else []


@pytest.mark.parametrize("strategy", [pytest.param("gradual_unfreeze", marks=pytest.mark.slow), "head_only"])
def test_sigkill_then_resume_ends_as_an_uninterrupted_run(
    strategy, tiny_model_dir, tiny_csv, run_cli, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("PEFTKIT_DISABLE_PLUGINS", "1")
    model = tiny_model_dir("bert")
    ref, out = str(tmp_path / "reference"), str(tmp_path / "killed")
    code, _, err = run_cli(*_args(model, tiny_csv, ref, strategy, *_strategy_options(strategy)))
    assert code == 0, err

    stage = os.path.join(str(tmp_path), ".killed.partial")
    kill_after_checkpoint(
        [
            sys.executable,
            "-m",
            "peftkit",
            *_args(model, tiny_csv, out, strategy, "--checkpoint-every", "7", *_strategy_options(strategy)),
        ],
        stage,
        min_step=50,
        env=dict(os.environ, PEFTKIT_DISABLE_PLUGINS="1"),
    )
    assert not os.path.exists(out), "a killed run must not appear as finished"
    code, stdout, err = run_cli("run", "--resume", out)
    assert code == 0, err
    assert "resuming" in err

    with open(os.path.join(ref, "metrics.json")) as fh:
        a = json.load(fh)
    with open(os.path.join(out, "metrics.json")) as fh:
        b = json.load(fh)
    assert b["resumed"] is True
    for key in (
        "test_accuracy",
        "test_f1_macro",
        "test_loss",
        "validation_accuracy",
        "best_epoch",
        "train_examples",
        "trainable_params",
    ):
        assert a[key] == b[key], key
    # every epoch's training loss and validation figures, bit for bit
    strip = ("epoch_seconds", "examples_per_second", "tokens_per_second")
    assert [{k: v for k, v in e.items() if k not in strip} for e in a["history"]] == [
        {k: v for k, v in e.items() if k not in strip} for e in b["history"]
    ]
    # and the trained tensors themselves
    ta = read_safetensors(os.path.join(ref, "adapter", "adapter.safetensors"))
    tb = read_safetensors(os.path.join(out, "adapter", "adapter.safetensors"))
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta)
    assert not os.path.exists(os.path.join(out, "checkpoints")), "a finished run ships no checkpoints"
    assert not os.path.exists(stage)


def test_resume_refusals(tiny_model_dir, tiny_csv, run_cli, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, _, err = run_cli("run", "--resume", out)
    assert code == 2 and "no interrupted run with a checkpoint" in err and "--checkpoint-every" in err
    code, _, err = run_cli("run", "--resume", out, "--epochs", "3")
    assert code == 2 and "--resume continues a run with its own settings; drop --epochs" in err
    code, _, err = run_cli(*_args(tiny_model_dir("bert"), tiny_csv, out, "lora"))
    assert code == 0, err
    code, _, err = run_cli("run", "--resume", out)
    assert code == 2 and "already finished" in err


def test_interrupted_run_keeps_its_checkpoint_and_says_how_to_resume(
    tiny_model_dir, tiny_csv, run_cli, tmp_path, monkeypatch
) -> None:
    """Ctrl-C (or SIGTERM) after a checkpoint keeps it; a fresh run to the same place is refused."""
    import peftkit.loop.trainer as loop  # where the training step checks the memory budget

    real = loop.check_budget
    calls = {"n": 0}

    def interrupt_later(*args, **kwargs):  # the budget check runs after every optimizer step
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "check_budget", interrupt_later)
    out = str(tmp_path / "run")
    code, _, err = run_cli(*_args(tiny_model_dir("bert"), tiny_csv, out, "lora", "--checkpoint-every", "5"))
    assert code == 130
    assert f"continue with peftkit run --resume {out}" in err.splitlines()[-1]
    after_start = err.split("checkpoints every 5 steps")[1].split("\n", 1)[1]
    assert after_start.count("--resume") == 1, err  # once: the interruption's own line, no echo before it
    assert os.path.isdir(os.path.join(str(tmp_path), ".run.partial", "checkpoints", "step-0000010"))
    monkeypatch.setattr(loop, "check_budget", real)
    code, _, err = run_cli(*_args(tiny_model_dir("bert"), tiny_csv, out, "lora"))
    assert code == 2 and "an interrupted run with checkpoints" in err
    code, _, err = run_cli("run", "--resume", out)
    assert code == 0, err and os.path.exists(os.path.join(out, "metrics.json"))
