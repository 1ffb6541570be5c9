"""Issue 31 item 4: ``RunConfig(model=...)`` takes a loaded transformers model, alone or with its
tokenizer. It is saved for the call into a temporary directory and loaded from there as a directory
is, so a run on it is the run on that directory; it is recorded under a name that says what it was;
the caller's model is left as it was; what cannot use it refuses it in one line."""

from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile

import pytest
import yaml

from peftkit import api
from peftkit.benchmark.config import BenchConfig
from peftkit.config import FIELDS, RunConfig
from peftkit.errors import PeftkitError
from peftkit.models import in_memory_model, resolve_model_source
from peftkit.planner import PlanSettings
from peftkit.predict_io import PredictConfig
from peftkit.rundir import stage_path
from peftkit.tuning.config import TuneConfig

from conftest import _build_tokenizer, _config

pytestmark = pytest.mark.filterwarnings("ignore::peftkit.errors.LearnedNothingWarning")  # 2 epochs, 32 examples


def _quiet(message: str) -> None:
    pass


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """This test's temporary directories (the saved models among them) go here, to be seen going."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def _saved(root) -> list[str]:
    return glob.glob(os.path.join(root, "peftkit-model-*"))


def _settings(model, dataset: str, out: str, **kwargs) -> RunConfig:
    return RunConfig(
        strategy="lora",
        model=model,
        dataset=dataset,
        epochs=2,
        batch_size=8,
        max_length=16,
        max_train_samples=32,
        output_dir=out,
        **kwargs,
    )


def _snapshot(model) -> tuple[dict, dict, dict]:
    """The model's weights, which of them train, and its config."""
    return (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        model.config.to_dict(),
    )


def _figures(result) -> list[dict[str, float]]:
    """Per epoch: the training loss and every validation figure."""
    history = result.metrics.history
    return [{k: v for k, v in e.items() if k == "train_loss" or k.startswith("validation_")} for e in history]


def _tiny_llama():
    """A tiny Llama built from a config (no name_or_path) and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = _build_tokenizer()
    config = _config("llama", len(tokenizer), tokenizer.pad_token_id)
    config.eos_token_id = tokenizer.eos_token_id
    return AutoModelForCausalLM.from_config(config), tokenizer


def test_a_loaded_model_runs_as_its_directory_does(tiny_model_dir, tiny_csv, tmp_path, temp_root) -> None:
    """The same losses and metrics as the run on the directory it was loaded from; recorded as
    ``in-memory BertModel (DIR)``, its adapter's base being DIR; the caller's model untouched."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    directory = tiny_model_dir("bert")
    by_path = api.run(_settings(directory, tiny_csv, str(tmp_path / "path")), echo=_quiet)
    model, tokenizer = AutoModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    model.embeddings.requires_grad_(False)  # the caller's own choice, which the run must leave as it is
    before = _snapshot(model)
    said: list[str] = []
    seen: list[str] = []

    def echo(message: str) -> None:
        said.append(message)
        seen.extend(_saved(temp_root))

    config = _settings((model, tokenizer), tiny_csv, str(tmp_path / "loaded"))
    loaded = api.run(config, echo=echo)
    assert _figures(loaded) == _figures(by_path) and len(_figures(loaded)) == 2
    assert loaded.metrics.test == by_path.metrics.test
    name = f"in-memory BertModel ({directory})"
    recorded = yaml.safe_load(open(os.path.join(loaded.run_dir, "config.yaml")))
    metrics = json.load(open(os.path.join(loaded.run_dir, "metrics.json")))
    assert recorded["model"] == metrics["model"] == loaded.config.model == name
    assert f"loading model {name!r} ..." in said
    meta = json.load(open(os.path.join(loaded.adapter_dir, "peftkit_adapter.json")))
    peft_config = json.load(open(os.path.join(loaded.adapter_dir, "adapter_config.json")))
    assert meta["base_model"] == peft_config["base_model_name_or_path"] == directory  # never the temporary copy
    after = _snapshot(model)
    assert after[1] == before[1] and after[2] == before[2] and after[0].keys() == before[0].keys()
    assert all(torch.equal(after[0][k], before[0][k]) for k in before[0])
    assert config.model[0] is model and config.task is None  # the caller's config as given
    assert seen and not _saved(temp_root)  # the copy was there during the run, and is gone
    # a later predict loads the base from where name_or_path points (the fingerprint matches)
    [row] = api.predict(PredictConfig(adapter=loaded.adapter_dir, inputs=["a good film"]))
    assert row["label"] in ("neg", "pos")


def test_a_model_with_no_name_is_recorded_by_its_class(pairs_csv, tmp_path, temp_root, run_cli, capsys) -> None:
    """A model built from a config names nowhere it could be loaded from: its tokenizer must come
    with it, the task is read from its class, and its adapter asks for the base in one line (the
    loaded model again serves); its config.yaml can be neither rerun nor resumed elsewhere."""
    model, tokenizer = _tiny_llama()
    alone = r"^the loaded LlamaForCausalLM names no model to read its tokenizer from .*model=\(model, tokenizer or"
    with pytest.raises(PeftkitError, match=alone):
        api.run(_settings(model, pairs_csv, str(tmp_path / "alone")), echo=_quiet)
    out = str(tmp_path / "run")
    result = api.run(_settings((model, tokenizer), pairs_csv, out), echo=_quiet)
    assert result.config.task == "causal-lm" and result.config.model == "in-memory LlamaForCausalLM"
    meta = json.load(open(os.path.join(result.adapter_dir, "peftkit_adapter.json")))
    assert meta["base_model"] == "in-memory LlamaForCausalLM"
    gone = r"^model 'in-memory LlamaForCausalLM' was a model loaded in the Python process that used it .*--model"
    with pytest.raises(PeftkitError, match=gone):
        api.predict(PredictConfig(adapter=result.adapter_dir, inputs=["the film is"]))
    taken = tmp_path / "answers.jsonl"
    taken.write_text("kept\n")
    saves: list[str] = []
    save = model.save_pretrained
    model.save_pretrained = lambda path, **kw: saves.append(path) or save(path, **kw)
    with pytest.raises(PeftkitError, match="answers.jsonl"):  # refused before the base is saved for the call
        api.predict(
            PredictConfig(adapter=result.adapter_dir, inputs=["x"], model=(model, tokenizer), output=str(taken))
        )
    assert taken.read_text() == "kept\n" and saves == []
    del model.save_pretrained
    [row] = api.predict(
        PredictConfig(adapter=result.adapter_dir, inputs=["the film is"], model=(model, tokenizer), max_new_tokens=2)
    )
    assert row["prompt"] == "the film is" and isinstance(row["completion"], str)
    recorded = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    settings = {k: v for k, v in recorded.items() if k in FIELDS - {"overwrite", "output_dir"}}
    with pytest.raises(PeftkitError, match=gone):
        api.run(RunConfig.from_dict({**settings, "output_dir": str(tmp_path / "again")}), echo=_quiet)
    path = tmp_path / "again.yaml"
    path.write_text(yaml.safe_dump(settings))
    capsys.readouterr()  # what the runs above printed
    code, _, err = run_cli("run", "--config", str(path), "--output-dir", str(tmp_path / "again"))
    assert code != 0 and "was a model loaded in the Python process" in err and len(err.strip().splitlines()) == 1
    os.makedirs(stage_path(out))  # as an interrupted run leaves it
    shutil.copy(os.path.join(out, "config.yaml"), stage_path(out))
    with pytest.raises(PeftkitError, match=r"^run .* was started from Python with a model held in memory .*resumed"):
        api.resume(out, echo=_quiet)
    assert not _saved(temp_root)


def test_a_model_alone_brings_the_tokenizer_its_name_or_path_names(tiny_model_dir, tiny_csv, temp_root) -> None:
    """A model alone: its tokenizer is read from the directory (or installed or cached model) that
    its name_or_path names, and saved beside it; one that names nothing readable is refused."""
    from transformers import AutoModel, AutoTokenizer

    directory = tiny_model_dir("bert")
    model = AutoModel.from_pretrained(directory)
    with in_memory_model(model) as name:
        assert name == f"in-memory BertModel ({directory})"
        saved = resolve_model_source(name)
        assert AutoTokenizer.from_pretrained(saved).get_vocab() == AutoTokenizer.from_pretrained(directory).get_vocab()
    assert not os.path.exists(saved)
    plan = api.plan(PlanSettings(model=model, strategies=["lora"], batch_size=2, max_length=8), echo=_quiet)
    assert plan.settings.model == name and [e.status for e in plan.estimates] == ["ok"]
    model.name_or_path = "someone/not-cached"  # a hub id with nothing cached, the hub out of reach
    refused = r"^the loaded BertModel's name_or_path 'someone/not-cached' is no model directory here.*model=\(model"
    with pytest.raises(PeftkitError, match=refused):
        api.run(RunConfig(model=model, dataset=tiny_csv), echo=_quiet)
    assert not _saved(temp_root)


@pytest.mark.parametrize(
    ("model", "got"),
    [([1, 2], "got: list"), ("tuple", "got: tuple of str, int"), ("model+int", "got: int")],
)
def test_anything_else_is_refused_in_one_line(model, got, tmp_path, temp_root) -> None:
    if model == "tuple":
        model = ("bert", 3)
    elif model == "model+int":
        model = (_tiny_llama()[0], 3)
    with pytest.raises(PeftkitError, match=rf"^(model must be a name |model=\(model, tokenizer\)).*{got}$"):
        api.run(RunConfig(model=model, output_dir=str(tmp_path / "run")), echo=_quiet)
    assert not os.path.exists(tmp_path / "run") and not _saved(temp_root)


def test_bench_and_tune_refuse_what_their_workers_cannot_see(tiny_csv) -> None:
    """bench and tune train in processes of their own, which read the model and data by name."""
    import pandas

    model, tokenizer = _tiny_llama()
    save = r"in a process of its own, which cannot see a model loaded in this one: save it .* and give DIR$"
    with pytest.raises(PeftkitError, match=rf"^bench runs each strategy {save}"):
        api.bench(BenchConfig(strategies=["lora"], model=model), echo=_quiet)
    with pytest.raises(PeftkitError, match=rf"^tune runs each trial {save}"):
        api.tune(TuneConfig(run=RunConfig(strategy="lora", model=(model, tokenizer))), echo=_quiet)
    with pytest.raises(PeftkitError, match=r"^bench runs each strategy .* cannot see data held in memory"):
        api.bench(BenchConfig(strategies=["lora"], dataset=pandas.read_csv(tiny_csv)), echo=_quiet)


def test_checkpoints_that_could_never_be_resumed_are_refused(tiny_csv, tmp_path, temp_root) -> None:
    """A run on a loaded model or on data in memory cannot be resumed (``resume`` refuses it), so
    checkpoints, whose message would promise ``peftkit run --resume``, are refused first."""
    import pandas

    out = str(tmp_path / "run")
    for given in ({"model": _tiny_llama()}, {"dataset": pandas.read_csv(tiny_csv)}):
        with pytest.raises(PeftkitError, match=r"^checkpoint_every=5: a run on a loaded model or on data in memory"):
            api.run(RunConfig(checkpoint_every=5, output_dir=out, **given), echo=_quiet)
    assert not os.path.exists(out) and not _saved(temp_root)


def test_the_saved_copy_goes_however_the_run_ends(tiny_model_dir, tiny_csv, tmp_path, temp_root, monkeypatch) -> None:
    from transformers import AutoModel, AutoTokenizer

    import peftkit.train

    directory = tiny_model_dir("bert")
    model, tokenizer = AutoModel.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    with pytest.raises(PeftkitError, match="'nope'"):  # refused by the data's checks, after the save
        api.run(RunConfig(model=(model, tokenizer), dataset=tiny_csv, label_column="nope"), echo=_quiet)
    assert not _saved(temp_root)
    seen: list[set[str]] = []

    def failing(run, stage, echo, resume=False, early=None):
        seen.append(set(os.listdir(resolve_model_source(run.config.model))))
        raise RuntimeError("failed while training")

    monkeypatch.setattr(peftkit.train, "execute_run", failing)
    with pytest.raises(RuntimeError, match="failed while training"):
        api.run(_settings((model, tokenizer), tiny_csv, str(tmp_path / "run")), echo=_quiet)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= seen[0]
    assert not _saved(temp_root) and not os.path.exists(tmp_path / "run")
