"""An exception raised inside a library (transformers, peft, torch, ...) during run, bench, predict
or plan: one line naming the library, the strategy, the model type and the library's message; exit
status 1; nothing left behind; the traceback only with --debug or PEFTKIT_DEBUG=1."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from peftkit.errors import clear_context, context_of, error_context, library_error_line, raising_library, set_context


@pytest.fixture(scope="module")
def broken_model_dir(tmp_path_factory) -> str:
    """A tiny BERT whose position table holds 4 positions: every sentence of the tiny data is longer,
    so transformers' BertEmbeddings.forward raises (a RuntimeError about expanded sizes)."""
    import torch
    from transformers import AutoModel

    from conftest import _build_tokenizer, _config

    torch.manual_seed(0)
    tok = _build_tokenizer()
    config = _config("bert", len(tok), tok.pad_token_id)
    config.max_position_embeddings = 4
    path = tmp_path_factory.mktemp("broken-bert")
    AutoModel.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def _library_failure() -> BaseException:
    from transformers import AutoConfig

    try:
        AutoConfig.for_model("surely-no-such-model-type")
    except Exception as exc:  # noqa: BLE001
        return exc
    raise AssertionError("transformers accepted an unknown model type")


def test_raising_library_is_found_by_walking_the_traceback() -> None:
    assert raising_library(_library_failure()) == "transformers"
    try:
        raise ValueError("peftkit's own bug")
    except ValueError as exc:
        assert raising_library(exc) is None  # raised in our code (here: a test): not a library's


def test_library_error_line_names_strategy_model_type_and_message() -> None:
    clear_context()
    set_context(command="run", strategy="prefix", model="minilm", model_type=None)
    assert library_error_line(_library_failure(), "transformers").startswith(
        "transformers raised ValueError during run (strategy prefix, model 'minilm'): Unrecognized model"
    )
    set_context(model_type="bert")
    assert "(strategy prefix, model type bert)" in library_error_line(_library_failure(), "transformers")
    clear_context()


def test_each_call_has_its_own_error_context() -> None:
    """What a call learned names its failure after it returned (the exception carries it), and is
    gone with the call: the next one starts from the enclosing context only."""
    clear_context()
    with error_context(command="run"):
        with pytest.raises(ValueError) as caught, error_context(strategy="prefix"):
            set_context(model_type="bert")
            raise _library_failure()
        assert context_of(ValueError()) == {"command": "run"}  # the inner call's facts ended with it
    assert context_of(ValueError()) == {}
    assert "during run (strategy prefix, model type bert)" in library_error_line(caught.value, "transformers")


def test_an_api_call_leaves_no_context_behind(tiny_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    """A library failing inside ``api.run``: the exception names the run's strategy and model, and
    nothing of it reaches the next call (the command line used to clear a module global)."""
    import peftkit.train
    from peftkit import api
    from peftkit.config import RunConfig

    def failing(*args, **kwargs):
        raise _library_failure()

    monkeypatch.setattr(peftkit.train, "execute_run", failing)
    clear_context()
    model = tiny_model_dir("bert")
    config = RunConfig(strategy="lora", model=model, dataset=tiny_csv, output_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError) as caught:
        api.run(config, echo=lambda message: None)
    assert f"(strategy lora, model {model!r})" in library_error_line(caught.value, "transformers")
    assert context_of(ValueError()) == {}


def _run_args(model: str, data: str, out: str) -> list[str]:
    return [
        "run",
        "--strategy",
        "lora",
        "--model",
        model,
        "--dataset",
        data,
        "--output-dir",
        out,
        "--max-length",
        "16",
        "--batch-size",
        "16",
    ]


def _assert_one_library_line(code: int, stderr: str) -> str:
    assert code == 1, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    return errors[0]


def test_run_library_failure_is_one_line_and_leaves_nothing(
    run_cli, broken_model_dir, tiny_csv, tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("PEFTKIT_DEBUG", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, stderr = run_cli(*_run_args(broken_model_dir, tiny_csv, "out"))
    line = _assert_one_library_line(code, stderr)
    assert line.startswith(
        "error: transformers raised RuntimeError during run (strategy lora, model type bert): "
        "The expanded size of the tensor"
    ), line
    assert "--debug" in line
    assert os.listdir(tmp_path) == []  # neither out/ nor .out.partial


@pytest.mark.parametrize("how", ["--debug", "PEFTKIT_DEBUG=1"])
def test_debug_shows_the_traceback(how, run_cli, broken_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    if how == "--debug":
        monkeypatch.delenv("PEFTKIT_DEBUG", raising=False)
        args = ["--debug", *_run_args(broken_model_dir, tiny_csv, "out")]
    else:
        monkeypatch.setenv("PEFTKIT_DEBUG", "1")
        args = _run_args(broken_model_dir, tiny_csv, "out")
    code, _, stderr = run_cli(*args)
    assert code == 1
    assert "Traceback (most recent call last)" in stderr and "modeling_bert.py" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: transformers raised RuntimeError during run")
    assert os.listdir(tmp_path) == []
    if how == "--debug":  # --debug is per command: the next one is back to one line
        code, _, stderr = run_cli(*_run_args(broken_model_dir, tiny_csv, "out"))
        _assert_one_library_line(code, stderr)


def test_a_bug_in_peftkit_keeps_its_traceback(run_cli, tiny_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    # only library failures are shortened: our own bugs must be reported with their traceback
    def broken(*args, **kwargs):
        raise ZeroDivisionError("peftkit bug")

    monkeypatch.setattr("peftkit.train.fit", broken)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroDivisionError):
        run_cli(*_run_args(tiny_model_dir("bert"), tiny_csv, "out"))
    assert os.listdir(tmp_path) == []  # the staging directory is removed all the same


def test_predict_library_failure_is_one_line(run_cli, tiny_model_dir, broken_model_dir, tiny_csv, tmp_path) -> None:
    out = str(tmp_path / "run")
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "head_only",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        out,
        "--max-length",
        "16",
        "--epochs",
        "1",
    )
    assert code == 0, stderr
    # the adapter applied to the broken base (same shapes, other weights: --force)
    code, stdout, stderr = run_cli(
        "predict",
        "--adapter",
        os.path.join(out, "adapter"),
        "--model",
        broken_model_dir,
        "--force",
        "a good and moving film with fun acting",
    )
    line = _assert_one_library_line(code, stderr)
    assert line.startswith(
        "error: transformers raised RuntimeError during predict (strategy head_only, model type bert): "
    ), line
    assert stdout == ""


def test_bench_worker_reports_a_library_failure_as_one_line(broken_model_dir, tiny_csv, tmp_path) -> None:
    from peftkit.benchmark.worker import main as worker_main
    from peftkit.config import RunConfig

    cfg = RunConfig(
        strategy="lora",
        model=broken_model_dir,
        dataset=tiny_csv,
        max_length=16,
        batch_size=16,
        epochs=1,
        output_dir=str(tmp_path / "runs" / "lora-0"),
    )
    spec = {
        "config": cfg.to_dict(),
        "result_path": str(tmp_path / "result.json"),
        "log_path": str(tmp_path / "logs" / "lora-0.log"),
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    assert worker_main(str(tmp_path / "spec.json")) == 0
    report = json.loads((tmp_path / "result.json").read_text())
    assert report["status"] == "failed" and "\n" not in report["error"]
    assert report["error"].startswith("transformers raised RuntimeError during "), report["error"]
    assert "(strategy lora, model type bert): The expanded size" in report["error"]
    assert "Traceback" in (tmp_path / "logs" / "lora-0.log").read_text()
    assert not (tmp_path / "runs").exists() or os.listdir(tmp_path / "runs") == []


def test_plan_names_the_failing_library_in_its_row(run_cli, broken_model_dir) -> None:
    code, stdout, stderr = run_cli(
        "plan", "--model", broken_model_dir, "--strategies", "lora", "--max-length", "16", "--batch-size", "2", "--json"
    )
    # a strategy that cannot be planned is a row, not a crash, and the exit status says it failed
    assert code == 1 and "Traceback" not in stderr, stderr
    row = json.loads(stdout)["estimates"][0]
    assert row["status"] == "failed" and row["error"].startswith("transformers raised RuntimeError: "), row


def test_a_real_process_prints_no_traceback(broken_model_dir, tiny_csv, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PEFTKIT_DEBUG"}
    done = subprocess.run(
        [sys.executable, "-m", "peftkit.cli", *_run_args(broken_model_dir, tiny_csv, "out")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    line = _assert_one_library_line(done.returncode, done.stderr)
    assert "transformers raised RuntimeError during run (strategy lora, model type bert)" in line
    assert os.listdir(tmp_path) == []
