"""peftkit from Python without reading its source (issue 15, finding 18): the commands' functions at
top level and in ``dir(peftkit)`` without importing torch, ``save_adapter`` with no undocumented
arguments, and no library FutureWarning on the way."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import warnings

ROOT = pathlib.Path(__file__).resolve().parent.parent
TOP_LEVEL = (
    "run",
    "bench",
    "plan",
    "predict",
    "evaluate",
    "merge",
    "export",
    "inspect",
    "RunConfig",
    "BenchConfig",
    "PlanSettings",
    "Levers",
    "load_adapter",
    "predict_texts",
    "save_adapter",
)


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=environ)


def test_the_api_is_at_top_level_listed_and_cheap_to_import() -> None:
    code = f"""
import sys, peftkit
missing = [n for n in {TOP_LEVEL!r} if n not in dir(peftkit)]
assert not missing, f"not in dir(peftkit): {{missing}}"
assert "torch" not in sys.modules, "import peftkit imported torch"
import peftkit.inference, peftkit.planner   # the modules behind the functions
import peftkit.benchmark.suite, peftkit.tuning.search   # and the packages
from peftkit import api, config
assert (peftkit.predict, peftkit.plan, peftkit.bench, peftkit.run) == (api.predict, api.plan, api.bench, api.run)
assert peftkit.tune is api.tune
import peftkit.exporter   # the module does not shadow the function
assert peftkit.export is api.export
assert peftkit.RunConfig is config.RunConfig and peftkit.load_adapter is sys.modules["peftkit.inference"].load_adapter
assert "torch" not in sys.modules, "looking the names up imported torch"
print(peftkit.RunResult("runs/x", None).adapter_dir)
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == os.path.join("runs/x", "adapter")


def test_save_adapter_needs_only_strategy_and_model(tiny_model_dir, tmp_path) -> None:
    import torch

    import peftkit
    from peftkit.models import load_classifier
    from peftkit.tasks import TaskData, get_task

    base = load_classifier(tiny_model_dir("bert"), ["neg", "pos"], 0)
    strategy = peftkit.get_strategy("adapter")(peftkit.get_strategy("adapter").Options())
    model = strategy.prepare(base, get_task("sequence-classification").spec(base, TaskData(None, ["neg", "pos"], {})))
    with torch.no_grad():  # something trained: different from a fresh head
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05)
    size = peftkit.save_adapter(str(tmp_path / "a"), strategy, model)
    assert size == os.path.getsize(tmp_path / "a" / "adapter.safetensors")
    loaded = peftkit.load_adapter(str(tmp_path / "a"))
    assert loaded.label_names == ["neg", "pos"] and loaded.metadata["base_model"] == tiny_model_dir("bert")
    texts = ["good film", "dull plot"]
    model.eval()
    encoded = loaded.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = torch.softmax(model(**encoded).logits, -1)
    got = torch.tensor([row["probabilities"] for row in peftkit.predict_texts(loaded, texts)])
    torch.testing.assert_close(got, expected)


def test_checkpointing_raises_no_future_warning(tiny_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    from peftkit.levers import after_quantized_load, enable_gradient_checkpointing

    for prepare in (enable_gradient_checkpointing, lambda m: after_quantized_load(m, True)):
        model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"), num_labels=2)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            prepare(model)
        assert model.is_activation_checkpointing


def test_no_future_warning_reaches_a_cli_user(tiny_model_dir, tiny_csv, tmp_path) -> None:
    """A LoRA run with checkpointing, then predict from the command line and from Python: the paths
    where transformers' deprecations showed, every FutureWarning printed (``always``)."""
    out = str(tmp_path / "run")
    run = [
        "-m",
        "peftkit",
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--max-train-samples",
        "32",
        "--gradient-checkpointing",
        "--output-dir",
        out,
    ]
    environ = {
        **os.environ,
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "PYTHONWARNINGS": "always::FutureWarning",
    }
    adapter = os.path.join(out, "adapter")
    # predict from Python, then from the command line, in one process (a fresh interpreter is most
    # of each one's time): the library first, with no quiet_libraries() in front of it, so the
    # command line's quieting cannot hide what the library says; with every FutureWarning printed
    # (``always``), the command line's own calls still print theirs
    both_predicts = (
        "import peftkit\n"
        f"print(peftkit.predict_texts(peftkit.load_adapter({adapter!r}), ['good film']))\n"
        "from peftkit.cli import main\n"
        f"main(['predict', '--adapter', {adapter!r}, 'good film'])"
    )
    for args in (run, ["-c", both_predicts]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=environ)
        assert done.returncode == 0, done.stderr
        assert "FutureWarning" not in done.stderr, done.stderr


def test_a_python_run_leaves_logging_alone_and_logs_its_progress(tiny_model_dir, tiny_csv, tmp_path) -> None:
    """Issue 31 item 4: from Python, ``run`` prints nothing past its ``echo`` (the loop's epoch lines
    go to the ``peftkit`` logger) and leaves the process's logging as it found it (transformers'
    verbosity, datasets' progress bars: the command line quiets those only in its own process)."""
    code = f"""
import logging, sys
import datasets, transformers
import peftkit

records = []
handler = logging.Handler()
handler.emit = records.append
logging.getLogger("peftkit").addHandler(handler)
logging.getLogger("peftkit").setLevel(logging.INFO)
before = (transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled())
said = []
cfg = peftkit.RunConfig(strategy="head_only", model={tiny_model_dir("bert")!r}, dataset={tiny_csv!r}, epochs=1,
                        max_length=16, output_dir={str(tmp_path / "run")!r})
import warnings
warnings.simplefilter("ignore")
peftkit.run(cfg, echo=said.append)
assert (transformers.logging.get_verbosity(), datasets.is_progress_bar_enabled()) == before, before
assert any(m.startswith("training head_only") for m in said), said
assert any(r.getMessage().startswith("epoch 1/1: train loss") for r in records), [r.getMessage() for r in records]
print("ok")
"""
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok") and "epoch 1/1" not in done.stderr, done.stderr


def test_all_is_the_public_surface() -> None:
    """``__all__`` (what ``from peftkit import *`` and the docs promise) names the functions, configs,
    results, errors and plugin interfaces, each one resolvable, and no helper (issue 31 item 4)."""
    import peftkit
    from peftkit import api

    assert set(api.__all__) <= set(peftkit.__all__), set(api.__all__) - set(peftkit.__all__)
    for name in peftkit.__all__:
        assert getattr(peftkit, name) is not None
    for name in api.__all__:
        assert getattr(api, name) is getattr(peftkit, name), name
    internal = {"check_inputs", "resumed_config", "plan_tune", "preflight_bench", "bench_tuning"}
    assert not internal & (set(api.__all__) | set(peftkit.__all__))
    assert {"predict_iter", "RunInterrupted", "Plan", "BenchResult", "EvalResult"} <= set(peftkit.__all__)
