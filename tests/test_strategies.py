"""What is particular to each strategy: structure found, parameter counts, schedules, refusals."""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

from peftkit import registry
from peftkit.errors import PeftkitError
from peftkit.models import load_classifier, load_tokenizer
from peftkit.strategies.base import TaskSpec, options_from_dict

from conftest import ARCHITECTURES

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
        houlsby = registry.get_strategy("adapter")(
            options_from_dict(registry.get_strategy("adapter"), {"variant": "houlsby"})
        ).prepare(AutoModelForSequenceClassification.from_config(cfg), TASK)
    assert _count(houlsby) - before == 2 * 894_528


EXPECTED_TARGETS = {
    "bert": {"attention.output.dense", "output.dense"},
    "roberta": {"attention.output.dense", "output.dense"},
    "distilbert": {"attention.out_lin", "ffn.lin2"},
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
    model = registry.get_strategy("adapter")(
        options_from_dict(registry.get_strategy("adapter"), {"variant": "houlsby"})
    ).prepare(AutoModelForSequenceClassification.from_config(cfg), TASK)
    names = {n for n, m in model.named_modules() if type(m).__name__ == "ProjectionWithAdapter"}
    assert names == {
        f"distilbert.transformer.layer.{i}.{s}" for i in range(2) for s in ("attention.out_lin", "ffn.lin2")
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("pre_classifier") for n in trainable) and any(n.startswith("classifier") for n in trainable)


def test_adapter_layernorm_option_and_bad_reduction_factor(tiny_model_dir) -> None:
    _, plain, _ = _prepared("adapter", tiny_model_dir("bert"))
    _, with_norms, _ = _prepared("adapter", tiny_model_dir("bert"), train_layernorms=True)
    # 2 blocks x 2 LayerNorms x (32 weight + 32 bias)
    assert _count(with_norms, True) - _count(plain, True) == 2 * 2 * 64
    with pytest.raises(
        PeftkitError, match=r"reduction_factor 5 does not divide the hidden size 32 of model type 'bert'"
    ):
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
    assert last[0].lr_scale == pytest.approx(2.6**-3) and strategy.on_epoch_start(model, 4) == []
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
    code, _, err = run_cli(
        "run",
        "-s",
        "gradual_unfreeze",
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
        "--set",
        "unfreeze_every_steps=5",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["trainable_params"] == metrics["total_params"]  # all 4 groups by step 15 of 20
    log = (out / "train.log").read_text()
    assert log.count("optimizer: +") >= 3 * 2  # 3 groups joined, each split into decay / no-decay


# -- prefix -----------------------------------------------------------------------------------

TEXTS = ["a good film", "dull boring plot and the acting was very bad", "great"]


def _base(model_dir: str, task: str = "SEQ_CLS", attn: str = "sdpa", seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM

    set_seed(seed)
    if task == "CAUSAL_LM":
        return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn).eval()
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2, attn_implementation=attn)
    model.config.pad_token_id = load_tokenizer(model_dir).pad_token_id
    return model.eval()


def _spec(task: str) -> TaskSpec:
    if task == "CAUSAL_LM":
        return TaskSpec(num_labels=0, label_names=(), kind="causal-lm", head_modules=(), peft_task_type="CAUSAL_LM")
    return TASK


def _ours(model_dir: str, task: str = "SEQ_CLS", attn: str = "sdpa", **options) -> nn.Module:
    cls = registry.get_strategy("prefix")
    model = cls(options_from_dict(cls, options)).prepare(_base(model_dir, task, attn), _spec(task))
    with torch.no_grad():  # prefixes far from zero, so a prefix that is ignored changes the logits
        torch.manual_seed(3)
        model.prefix_encoder.embedding.weight.normal_(0, 2)
    return model.eval()


def _inputs(model_dir: str, side: str = "right", texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(model_dir)
    tok.padding_side = side
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


PEFT_CASES = [(a, "SEQ_CLS") for a in ("bert", "roberta", "gpt2", "llama")] + [
    (a, "CAUSAL_LM") for a in ("gpt2", "llama")
]


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch,task", PEFT_CASES)
def test_prefix_gives_peft_logits(arch, task, attn, side, tiny_model_dir) -> None:
    """Where peft's own prefix tuning runs, the same prefix weights give the same logits (with
    padding on either side, causal-lm position ids given as the causal-lm task gives them)."""
    from peft import PrefixTuningConfig, get_peft_model

    model_dir = tiny_model_dir(arch)
    ours = _ours(model_dir, task, attn)
    batch = _inputs(model_dir, side)
    if task == "CAUSAL_LM":
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    theirs = get_peft_model(
        _base(model_dir, task, attn), PrefixTuningConfig(task_type=task, num_virtual_tokens=20)
    ).eval()
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prefix_encoder.embedding.weight)
        for name, param in theirs.named_parameters():
            if "modules_to_save.default." in name:  # the same (random) head
                param.copy_(
                    ours.get_parameter(name.replace("base_model.", "", 1).replace("modules_to_save.default.", ""))
                )
        try:
            expected = theirs(**batch).logits
        except ValueError as exc:
            if "past key values" not in str(exc):
                raise
            pytest.skip(f"peft's prefix tuning cannot run here: {exc}")
        got = ours(**batch).logits
        plain = _base(model_dir, task, attn)
        if task == "SEQ_CLS":
            plain.get_submodule(ours.prefix_encoder.head_names[-1]).load_state_dict(
                ours.get_submodule(ours.prefix_encoder.head_names[-1]).state_dict()
            )
        unprefixed = plain(**batch).logits
    real = batch["attention_mask"].bool() if task == "CAUSAL_LM" else slice(None)
    torch.testing.assert_close(got[real], expected[real], rtol=0, atol=1e-5)
    assert (got[real] - unprefixed[real]).abs().max() > 1e-3  # the prefix is not a no-op


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_masks_for_padding_and_both_attention_implementations(arch, tiny_model_dir) -> None:
    """Whatever transformers' version: eager and sdpa agree, and an example's logits do not depend
    on how much padding it got, so padding stays masked and prefixes stay visible. Left padding
    too for decoders given position ids (as the causal-lm task gives them); encoders classify
    from position 0, a pad under left padding, with or without a prefix."""
    model_dir = tiny_model_dir(arch)
    sdpa, eager = _ours(model_dir, attn="sdpa"), _ours(model_dir, attn="eager")
    with torch.no_grad():
        alone = torch.cat([sdpa(**_inputs(model_dir, texts=[t])).logits for t in TEXTS])
        for side in ("right", "left") if arch in ("gpt2", "llama") else ("right",):
            batch = _inputs(model_dir, side)
            assert batch["attention_mask"].eq(0).any()  # some padding, or the test shows nothing
            if arch in ("gpt2", "llama"):
                batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
            torch.testing.assert_close(sdpa(**batch).logits, alone, rtol=0, atol=1e-5)
            torch.testing.assert_close(eager(**batch).logits, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_causal_lm_is_causal_and_generates_as_it_scores(arch, tiny_model_dir) -> None:
    """Real tokens see the whole prefix but no later token; greedy generation through the key/value
    cache (left padded) picks what full forwards without a cache pick."""
    model_dir = tiny_model_dir(arch)
    for attn in ("sdpa", "eager"):
        model = _ours(model_dir, "CAUSAL_LM", attn)
        batch = _inputs(model_dir, "left")
        changed = batch["input_ids"].clone()
        changed[:, -1] = 7
        with torch.no_grad():
            a, b = model(**batch).logits, model(input_ids=changed, attention_mask=batch["attention_mask"]).logits
            torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
            tok = load_tokenizer(model_dir)
            out = model.generate(**batch, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
            ids, mask = batch["input_ids"], batch["attention_mask"]
            for _ in range(4):  # the same, the slow way: no cache, positions from the mask
                positions = (mask.cumsum(-1) - 1).clamp(min=0)
                step = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].argmax(-1)
                ids, mask = torch.cat([ids, step[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        assert torch.equal(out, ids), attn


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_prefix_parameter_count(arch, tiny_model_dir) -> None:
    _, model, _ = _prepared("prefix", tiny_model_dir(arch), num_virtual_tokens=5)
    prompt = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and n.startswith("prefix_encoder."))
    assert prompt == 5 * 2 * 2 * 32  # tokens x layers x (key, value) x hidden
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        "prefix_encoder",
        *(["pre_classifier"] if arch == "distilbert" else []),
        "score" if arch in ("gpt2", "llama") else "classifier",
    }


def test_prefix_projection_saves_its_output_and_loads_back(tiny_model_dir, tmp_path) -> None:
    """With the paper's MLP the saved prefixes are its output (as peft saves them); loaded, they
    give the trained model's logits without the MLP."""
    from safetensors.torch import load_file

    cls = registry.get_strategy("prefix")
    opts = options_from_dict(cls, {"num_virtual_tokens": 4, "prefix_projection": True, "projection_hidden_size": 16})
    model_dir = tiny_model_dir("llama")
    strategy = cls(opts)
    model = strategy.prepare(_base(model_dir), TASK)
    mlp = sum(p.numel() for n, p in model.named_parameters() if n.startswith("prefix_encoder.transform"))
    assert mlp == 32 * 16 + 16 + 16 * (2 * 2 * 32) + 2 * 2 * 32
    strategy.save_adapter(model, str(tmp_path), {})
    assert load_file(str(tmp_path / "adapter_model.safetensors"))["prompt_embeddings"].shape == (4, 2 * 2 * 32)
    again = cls(opts).prepare(_base(model_dir, seed=5), TASK)
    cls(opts).load_adapter(again, str(tmp_path), {})
    assert not any(n.startswith("prefix_encoder.transform") for n, _ in again.named_parameters())
    batch = _inputs(model_dir)
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, model(**batch).logits, rtol=0, atol=1e-6)


def test_prefix_rejects_zero_tokens() -> None:
    with pytest.raises(PeftkitError, match="num_virtual_tokens must be a positive integer, got 0"):
        options_from_dict(registry.get_strategy("prefix"), {"num_virtual_tokens": 0})


def test_prefix_longer_than_the_position_table_is_one_line(tiny_model_dir) -> None:
    model = _ours(tiny_model_dir("bert"), num_virtual_tokens=60)  # 64 positions; the batch has 11 tokens
    with pytest.raises(PeftkitError, match=r"60 virtual tokens \+ \d+ tokens exceed the model's 64 positions"):
        model(**_inputs(tiny_model_dir("bert")))


def test_prefix_refuses_attention_it_cannot_extend(tiny_model_dir) -> None:
    model = _ours(tiny_model_dir("bert"))
    model.config._attn_implementation_internal = "flex_attention"  # (no need for it to be installed)
    with pytest.raises(PeftkitError, match="supports the attention implementations sdpa, eager, not 'flex_attention'"):
        model(**_inputs(tiny_model_dir("bert")))


# -- models a strategy cannot handle ----------------------------------------------------------


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(model_type="plain_mlp", hidden_size=8)
        self.base_model_prefix = "body"
        self.body = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)


@pytest.mark.parametrize("name", ["gradual_unfreeze", "adapter", "prefix"])
def test_model_without_blocks_refused_by_name(name) -> None:
    with pytest.raises(PeftkitError, match=rf"strategy '{name}' cannot handle model type 'plain_mlp'"):
        registry.get_strategy(name)().prepare(_Mlp(), TASK)
