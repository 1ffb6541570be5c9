"""Shipping adapters: peft's format where peft has one, only changed tensors otherwise, every
refusal (pickles, corrupt files, mismatched keys, another base checkpoint), merge and inspect."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.inference import load_adapter, predict_texts

TEXTS = ["a good and charming film", "dull boring plot", "the acting was very superb"]


class _Trained(dict):
    """strategy -> adapter directory, each strategy trained when a test first asks for it."""

    def __init__(self, train) -> None:
        super().__init__()
        self.train = train

    def __missing__(self, strategy: str) -> str:
        self[strategy] = self.train(strategy)
        return self[strategy]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, tiny_csv):
    """strategy -> adapter directory of a short run on the tiny BERT (trained once per module, when
    first asked for: under pytest-xdist each worker that gets some of these tests builds this fixture
    again, and trained all six strategies where its tests need one or two)."""
    from peftkit.cli import main

    root = tmp_path_factory.mktemp("ship")
    extra = {"gradual_unfreeze": ["--set", "unfreeze_every_steps=1000"], "prefix": ["--set", "num_virtual_tokens=4"]}

    def train(strategy: str) -> str:
        run = root / strategy
        with pytest.raises(SystemExit) as done:
            main(
                [
                    "run",
                    "-s",
                    strategy,
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
                    "--lr",
                    "5e-3",
                    "--output-dir",
                    str(run),
                    *extra.get(strategy, []),
                ]
            )
        assert done.value.code in (0, None)
        return str(run / "adapter")

    return _Trained(train)


def _probs(rows) -> torch.Tensor:
    return torch.tensor([r["probabilities"] for r in rows])


@pytest.mark.parametrize("strategy", ["lora", "prefix"])
def test_peft_loads_our_adapter_and_agrees(strategy, trained, tiny_model_dir) -> None:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    directory = trained[strategy]
    assert {"adapter_config.json", "adapter_model.safetensors", "peftkit_adapter.json"} <= set(os.listdir(directory))
    ours = _probs(predict_texts(load_adapter(directory), TEXTS))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("bert"))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"), num_labels=2)
    model = PeftModel.from_pretrained(base, directory).eval()
    with torch.no_grad():
        try:
            theirs = torch.softmax(
                model(**tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits, -1
            )
        except ValueError as exc:  # transformers >= 5.24: BERT's forward takes no past_key_values
            if strategy != "prefix" or "past key values" not in str(exc):
                raise
            pytest.skip(f"peft's prefix tuning cannot run here: {exc}")
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_plain_peft_directory_predicts_with_label_ids(trained, tiny_model_dir, tmp_path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(trained["lora"], plain)
    os.remove(plain / "peftkit_adapter.json")
    with_meta = predict_texts(load_adapter(trained["lora"]), TEXTS)
    rows = predict_texts(load_adapter(str(plain), model=tiny_model_dir("bert")), TEXTS)
    assert all(r["label"] in ("0", "1") for r in rows)
    torch.testing.assert_close(_probs(rows), _probs(with_meta), atol=1e-5, rtol=0)


def test_full_style_adapters_keep_only_changed_tensors(trained) -> None:
    from safetensors.torch import load_file

    meta = json.load(open(os.path.join(trained["gradual_unfreeze"], "peftkit_adapter.json")))
    saved = load_file(os.path.join(trained["gradual_unfreeze"], "adapter.safetensors"))
    # only the top group (pooler + classifier) was unfrozen: the rest is recorded as unchanged
    assert saved and all(k.startswith(("bert.pooler.", "classifier.")) for k in saved)
    assert any(k.startswith("bert.embeddings.") for k in meta["unchanged_from_base"])
    full_meta = json.load(open(os.path.join(trained["full"], "peftkit_adapter.json")))
    assert full_meta["adapter_bytes"] > 10 * meta["adapter_bytes"]
    predict_texts(load_adapter(trained["gradual_unfreeze"]), TEXTS)  # loads and predicts


def test_refuses_pickles_and_corrupt_files(trained, tmp_path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save({"w": torch.zeros(1)}, pickled / "adapter_model.bin")
    with pytest.raises(PeftkitError, match="pickle files can run code"):
        load_adapter(str(pickled))
    broken = tmp_path / "broken"
    shutil.copytree(trained["adapter"], broken)
    path = broken / "adapter.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PeftkitError, match="truncated or corrupt"):
        load_adapter(str(broken))


def test_mismatched_keys_or_shapes_are_errors(trained, tmp_path) -> None:
    wrong = tmp_path / "wrong"
    shutil.copytree(trained["adapter"], wrong)
    meta = json.load(open(wrong / "peftkit_adapter.json"))
    meta["strategy_options"]["reduction_factor"] = 8  # the file holds rf 16 shapes
    (wrong / "peftkit_adapter.json").write_text(json.dumps(meta))
    # the strategy named "adapter" once made this "the adapter adapter does not match"
    with pytest.raises(
        PeftkitError, match=r"^the adapter \(strategy 'adapter'\) does not match the model: .* has shape"
    ):
        load_adapter(str(wrong))
    meta["strategy_options"]["reduction_factor"] = 16
    meta["strategy_options"]["variant"] = "houlsby"  # expects attention adapters the file lacks
    (wrong / "peftkit_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(PeftkitError, match=r"does not match the model: \d+ missing"):
        load_adapter(str(wrong))


def test_another_checkpoint_is_refused_unless_forced(trained, tmp_path, tiny_model_dir) -> None:
    from transformers import AutoModel

    other = tmp_path / "other-bert"
    shutil.copytree(tiny_model_dir("bert"), other)
    torch.manual_seed(1)
    AutoModel.from_config(AutoModel.from_pretrained(str(other)).config).save_pretrained(
        other
    )  # same shapes, new weights
    with pytest.raises(
        PeftkitError, match=r"was trained on base .* \(sha256:.*\), but .*other-bert.* has other weights"
    ):
        load_adapter(trained["lora"], model=str(other))
    load_adapter(trained["lora"], model=str(other), force=True)


@pytest.mark.parametrize("strategy", ["lora", "full"])
def test_merge_writes_a_plain_model_that_predicts_the_same(strategy, trained, run_cli, tmp_path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    code, stdout, stderr = run_cli("merge", "--adapter", trained[strategy], "--output", str(out))
    assert code == 0, stderr
    assert any(f.endswith(".safetensors") for f in os.listdir(out)) and not any(
        f.endswith(".bin") for f in os.listdir(out)
    )
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        merged = torch.softmax(
            model(**tok(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")).logits, -1
        )
    torch.testing.assert_close(merged, _probs(predict_texts(load_adapter(trained[strategy]), TEXTS)), atol=1e-4, rtol=0)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    code, _, stderr = run_cli("merge", "--adapter", trained[strategy], "--output", str(out))
    assert code == 2 and "already exists" in stderr


@pytest.mark.parametrize("strategy", ["adapter", "prefix", "head_only"])
def test_merge_refused_where_impossible(strategy, trained, run_cli, tmp_path) -> None:
    out = tmp_path / "merged"
    code, _, stderr = run_cli("merge", "--adapter", trained[strategy], "--output", str(out))
    assert code == 2 and f"strategy '{strategy}' cannot be merged" in stderr
    assert not out.exists()


def test_inspect(trained, run_cli) -> None:
    code, stdout, stderr = run_cli("inspect", trained["lora"])
    assert code == 0, stderr
    for field in (
        "strategy          lora",
        "base fingerprint  sha256:",
        "labels            0=neg, 1=pos",
        "trainable params",
        "size",
        "test accuracy",
    ):
        assert field in stdout, stdout
    assert re.search(r"^trained on .*, seed 0, 2 epoch\(s\), best [12]$", stdout, re.M), stdout
    code, stdout, _ = run_cli("inspect", "--json", trained["adapter"])
    assert json.loads(stdout)["strategy"] == "adapter"
    recorded = json.loads(stdout)["metrics"]
    assert recorded["epochs"] == 2 and recorded["epochs_run"] == 2 and recorded["best_epoch"] in (1, 2)


def test_inspect_says_what_training_did_not_only_what_was_planned() -> None:
    """Issue 32 (9): early stopping ended at 7 of 15 planned epochs, the best the 2nd: inspect says so."""
    from peftkit.cli_output import epochs_trained as _epochs_trained

    assert (
        _epochs_trained({"epochs": 15, "epochs_run": 7, "best_epoch": 2}) == "7 of 15 epoch(s) (stopped early), best 2"
    )
    assert _epochs_trained({"epochs": 2, "epochs_run": 2, "best_epoch": 2}) == "2 epoch(s), best 2"
    assert _epochs_trained({"epochs": 3}) == "3 epoch(s)"  # an adapter saved before these were recorded


def test_python_api_round_trip(trained, tiny_model_dir, tmp_path) -> None:
    import peftkit
    from peftkit.fingerprint import backbone_digests, fingerprint
    from peftkit.models import load_classifier

    loaded = peftkit.load_adapter(trained["adapter"])
    base = load_classifier(tiny_model_dir("bert"), ["neg", "pos"], 0)
    digests = backbone_digests(base)
    target = str(tmp_path / "copy")
    size = peftkit.save_adapter(
        target, loaded.strategy, loaded.model, {**loaded.metadata, "base_fingerprint": fingerprint(digests)}, digests
    )
    assert size == os.path.getsize(os.path.join(target, "adapter.safetensors"))
    again = peftkit.load_adapter(target)
    torch.testing.assert_close(
        _probs(peftkit.predict_texts(again, TEXTS)), _probs(peftkit.predict_texts(loaded, TEXTS)), atol=0, rtol=0
    )
