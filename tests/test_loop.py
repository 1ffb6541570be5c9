"""The loop's pieces on their own (no model): its state round-trips through a checkpoint's JSON,
epoch selection and early stopping, and metrics.json's figures declared once."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest

from peftkit.errors import PeftkitError
from peftkit.loop import BestEpoch, LoopState
from peftkit.metrics import ROW_METRICS, RunMetrics, summarize_figures


def test_loop_state_round_trips_through_json() -> None:
    state = LoopState(epoch=1, step=7, history=[{"epoch": 1, "train_loss": 0.5}], smooth_loss=0.25)
    state.peaks.record("train", 100, None)
    state.best.judge(1, {"accuracy": 0.75}, 0.75, None, snapshot=lambda: {"w": "tensor"})
    saved = json.loads(json.dumps(state.to_dict()))
    assert "snapshot" not in saved["best"]  # tensors go to best.safetensors, not state.json
    again = LoopState.from_dict(saved, {"w": "tensor"})
    assert again == state


def test_a_checkpoint_of_the_old_layout_is_refused_in_one_line() -> None:
    saved = LoopState().to_dict()
    del saved["best"]  # before LoopState, the best epoch's fields were loose keys of the loop dict
    saved.update(best_score=None, best_epoch=None, best_metrics={}, epochs_without_gain=0)
    with pytest.raises(PeftkitError, match=r"written by another version of peftkit .* --overwrite"):
        LoopState.from_dict(saved, {})


def test_best_epoch_decides_improved_worse_and_stop() -> None:
    best, taken = BestEpoch(), []
    assert best.judge(1, {"a": 0.5}, 0.5, 2, snapshot=lambda: taken.append(1) or {"e": 1}) == "improved"
    assert best.judge(2, {"a": 0.4}, 0.4, 2, snapshot=lambda: taken.append(2) or {"e": 2}) == "worse"
    assert best.judge(3, {"a": 0.5}, 0.5, 2, snapshot=lambda: taken.append(3) or {"e": 3}) == "stop"  # ties: no gain
    assert (best.epoch, best.metrics, best.snapshot, taken) == (1, {"a": 0.5}, {"e": 1}, [1])
    assert BestEpoch(score=1.0).judge(2, {}, 0.0, None, snapshot=dict) == "worse"  # no patience: never stops


def _metrics() -> RunMetrics:
    values = {f.name: f"{f.name}-value" for f in fields(RunMetrics)}
    values.update(test={"accuracy": 0.9, "f1_macro": 0.8}, validation={"accuracy": 0.85, "loss": 0.3})
    return RunMetrics(**values)


def test_run_metrics_flattens_task_metrics_and_reads_back() -> None:
    m = _metrics()
    flat = m.to_dict()
    keys = list(flat)
    assert keys[:6] == ["strategy", "model", "dataset", "seed", "epochs", "task"]
    assert keys[6:10] == ["test_accuracy", "test_f1_macro", "validation_accuracy", "validation_loss"]
    assert keys[-5:] == ["split", "label_names", "history", "versions", "per_example_correct"]
    assert RunMetrics.from_dict(flat) == m
    with pytest.raises(PeftkitError, match="'nope'"):
        RunMetrics.from_dict({**flat, "nope": 1})
    assert set(m.adapter_record()) == {
        "seed",
        "epochs",
        "test_accuracy",
        "test_f1_macro",
        "validation_accuracy",
        "trainable_params",
        "total_params",
        "epochs_run",
        "best_epoch",
    }


def test_benchmark_rows_and_summary_come_from_the_fields() -> None:
    assert {"task", "test_accuracy", "validation_loss", "peak_memory_bytes", "wall_seconds"} <= set(ROW_METRICS)
    assert not {"strategy", "seed", "history", "versions"} & set(ROW_METRICS)  # a row has its own
    base = dict.fromkeys(ROW_METRICS, 1)
    rows = [
        {**base, "epochs_run": 2, "peak_reserved_bytes": None, "tokens_per_second": None, "train_seconds": 1.0},
        {**base, "epochs_run": 3, "peak_reserved_bytes": None, "tokens_per_second": 4.0, "train_seconds": 3.0},
    ]
    summary = summarize_figures(rows)
    assert summary["epochs"] == 3 and summary["total_params"] == 1 and summary["train_seconds_mean"] == 2.0
    assert summary["peak_reserved_bytes"] is None and summary["tokens_per_second_mean"] == 2.0


def test_without_a_terminal_a_progress_line_comes_every_heartbeat(
    run_cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch
) -> None:
    """Issue 32 (4): stderr is not a terminal here, so there is no bar; with the heartbeat at 0 s every
    step says where training is (a real run: every 30 s)."""
    import re

    from peftkit.durations import format_duration
    from peftkit.loop import trainer as loop  # where the heartbeat reads its interval

    monkeypatch.setattr(loop, "HEARTBEAT_SECONDS", 0.0)
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        str(tmp_path / "run"),
        "--epochs",
        "2",
        "--batch-size",
        "32",
        "--max-length",
        "16",
    )
    assert code == 0, stderr
    beats = [line for line in stderr.splitlines() if line.startswith("lora: step ")]
    pattern = r"lora: step (\d+)/(\d+) \(epoch [12]/2\), loss \d+\.\d{4}, [\d.]+ examples/s, about \S+ of training left"
    assert beats and all(re.fullmatch(pattern, line) for line in beats), beats
    steps = [int(re.match(r"lora: step (\d+)/", line).group(1)) for line in beats]
    assert steps == list(range(1, len(steps) + 1)) and steps[-1] == int(re.match(pattern, beats[-1]).group(2))
    assert [format_duration(s) for s in (0.4, 42, 185, 3725)] == ["0s", "42s", "3m05s", "1h02m"]
