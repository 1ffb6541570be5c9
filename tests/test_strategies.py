"""What is particular to each strategy: structure found, parameter counts, schedules, refusals."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

from conftest import ARCHITECTURES
from peftkit import registry
from peftkit.errors import PeftkitError
from peftkit.models import load_classifier, load_tokenizer
from peftkit.strategies.base import TaskSpec, options_from_dict

TASK = TaskSpec(num_labels=2, label_names=("neg", "pos"))


def _prepared(name: str, model_dir: str, **options):
    cls = registry.get_strategy(name)
    strategy = cls(options_from_dict(cls, options))
    tok = load_tokenizer(model_dir)
    set_seed(0)
    return strategy, strategy.prepare(load_classifier(model_dir, ["neg", "pos"], tok.pad_token_id), TASK), tok


def _count(model: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in model.parameters() if trainable is None or p.requires_grad == trainable)


# -- adapter ----------------------------------------------------------------------------------

def test_pfeiffer_parameter_count_on_roberta_base_shape() -> None:
    cfg = AutoConfig.for_model("roberta", num_labels=2)  # roberta-base: 768 wide, 12 blocks
    with torch.device("meta"):  # no memory, no time: only shapes are counted
        base = AutoModelForSequenceClassification.from_config(cfg)
        before = _count(base)
        model = registry.get_strategy("adapter")().prepare(base, TASK)
    assert _count(model) - before == 894_528
    with torch.device("meta"):
        houlsby = registry.get_strategy("adapter")(options_from_dict(registry.get_strategy("adapter"),
                                                   {"variant": "houlsby"})).prepare(
            AutoModelForSequenceClassification.from_config(cfg), TASK)
    assert _count(houlsby) - before == 2 * 894_528


EXPECTED_TARGETS = {
    "bert": {"attention.output.dense", "output.dense"},
    "roberta": {"attention.output.dense", "output.dense"},
    "gpt2": {"attn.c_proj", "mlp.c_proj"},
    "llama": {"self_attn.o_proj", "mlp.down_proj"},
}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_adapter_wraps_the_sublayer_outputs_and_starts_as_identity(arch, tiny_model_dir) -> None:
    strategy, model, tok = _prepared("adapter", tiny_model_dir(arch), variant="houlsby")
    import re

    wrapped = [n for n, m in model.named_modules() if type(m).__name__ == "ProjectionWithAdapter"]
    assert len(wrapped) == 2 * 2  # two blocks, two sub-layers each
    # the name within its block: "bert.encoder.layer.0.output.dense" -> "output.dense"
    assert {re.sub(r"^.*?\.\d+\.", "", n) for n in wrapped} == EXPECTED_TARGETS[arch], wrapped
    # up-projections start at zero: the prepared model computes what the base model computes
    set_seed(0)
    base = load_classifier(tiny_model_dir(arch), ["neg", "pos"], tok.pad_token_id).eval()
    batch = dict(tok(["a good film", "dull"], padding=True, return_tensors="pt"))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**batch).logits, base(**batch).logits)


def test_adapter_on_distilbert(tmp_path) -> None:
    cfg = AutoConfig.for_model("distilbert", dim=32, hidden_dim=64, n_layers=2, n_heads=2, vocab_size=50)
    model = registry.get_strategy("adapter")(options_from_dict(registry.get_strategy("adapter"),
                                             {"variant": "houlsby"})).prepare(
        AutoModelForSequenceClassification.from_config(cfg), TASK)
    names = {n for n, m in model.named_modules() if type(m).__name__ == "ProjectionWithAdapter"}
    assert names == {f"distilbert.transformer.layer.{i}.{s}" for i in range(2) for s in ("attention.out_lin", "ffn.lin2")}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("pre_classifier") for n in trainable) and any(n.startswith("classifier") for n in trainable)


def test_adapter_layernorm_option_and_bad_reduction_factor(tiny_model_dir) -> None:
    _, plain, _ = _prepared("adapter", tiny_model_dir("bert"))
    _, with_norms, _ = _prepared("adapter", tiny_model_dir("bert"), train_layernorms=True)
    # 2 blocks x 2 LayerNorms x (32 weight + 32 bias)
    assert _count(with_norms, True) - _count(plain, True) == 2 * 2 * 64
    with pytest.raises(PeftkitError, match=r"reduction_factor 5 does not divide the hidden size 32 of model type 'bert'"):
        _prepared("adapter", tiny_model_dir("bert"), reduction_factor=5)


# -- gradual unfreezing -----------------------------------------------------------------------

def test_gradual_layer_groups_from_the_top(tiny_model_dir) -> None:
    from peftkit.strategies.gradual_unfreeze import layer_groups

    strategy, model, _ = _prepared("gradual_unfreeze", tiny_model_dir("bert"), unfreeze_every_steps=None)
    groups = layer_groups(model)
    assert len(groups) == 4  # head (+ pooler), block 1, block 0, embeddings
    assert all(n.startswith(("bert.pooler", "classifier")) for n in groups[0])
    assert all(n.startswith("bert.encoder.layer.1.") for n in groups[1])
    assert all(n.startswith("bert.encoder.layer.0.") for n in groups[2])
    assert all(n.startswith("bert.embeddings.") for n in groups[3])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(groups[0])
    # per-epoch unfreezing: epoch 0 adds nothing, each later epoch one group at rate / 2.6**depth
    assert strategy.on_epoch_start(model, 0) == []
    added = strategy.on_epoch_start(model, 1)
    assert len(added) == 1 and set(added[0].params) == set(groups[1])
    assert added[0].lr_scale == pytest.approx(1 / 2.6)
    assert all(p.requires_grad for p in groups[1].values())
    strategy.on_epoch_start(model, 2)
    last = strategy.on_epoch_start(model, 3)
    assert last[0].lr_scale == pytest.approx(2.6 ** -3) and strategy.on_epoch_start(model, 4) == []
    assert all(p.requires_grad for p in model.parameters())


def test_gradual_every_k_steps(tiny_model_dir) -> None:
    strategy, model, _ = _prepared("gradual_unfreeze", tiny_model_dir("llama"), unfreeze_every_steps=3)
    added = [len(strategy.on_step_end(model, s)) for s in range(1, 13)]
    assert added == [0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0]  # head + 2 blocks + embeddings = 4 groups


def test_slanted_triangular_schedule(tiny_model_dir) -> None:
    strategy, _, _ = _prepared("gradual_unfreeze", tiny_model_dir("bert"), schedule="slanted_triangular")
    f = [strategy.lr_factor(t, 100, 0) for t in range(101)]
    assert f[0] == pytest.approx(1 / 32) and f[10] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:10], f[1:11])) and all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[100] == pytest.approx(1 / 32)


def test_gradual_run_reports_the_most_trained_at_once(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    import json

    out = tmp_path / "run"
    code, _, err = run_cli("run", "-s", "gradual_unfreeze", "--model", tiny_model_dir("bert"), "--dataset", tiny_csv,
                           "--epochs", "2", "--batch-size", "16", "--max-length", "16",
                           "--set", "unfreeze_every_steps=5", "--output-dir", str(out))
    assert code == 0, err
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["trainable_params"] == metrics["total_params"]  # all 4 groups by step 15 of 20
    log = (out / "train.log").read_text()
    assert log.count("optimizer: +") >= 3 * 2  # 3 groups joined, each split into decay / no-decay


# -- prefix -----------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_prefix_parameter_count(arch, tiny_model_dir) -> None:
    _, model, _ = _prepared("prefix", tiny_model_dir(arch), num_virtual_tokens=5)
    prompt = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "prompt_encoder" in n)
    assert prompt == 5 * 2 * 2 * 32  # tokens x layers x (key, value) x hidden


def test_prefix_rejects_zero_tokens() -> None:
    with pytest.raises(PeftkitError, match="num_virtual_tokens must be a positive integer, got 0"):
        options_from_dict(registry.get_strategy("prefix"), {"num_virtual_tokens": 0})


# -- models a strategy cannot handle ----------------------------------------------------------

class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type="plain_mlp", hidden_size=8)
        self.base_model_prefix = "body"
        self.body = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)


@pytest.mark.parametrize("name", ["gradual_unfreeze", "adapter"])
def test_model_without_blocks_refused_by_name(name) -> None:
    with pytest.raises(PeftkitError, match=rf"strategy '{name}' cannot handle model type 'plain_mlp'"):
        registry.get_strategy(name)().prepare(_Mlp(), TASK)
