"""Prefix tuning on attention that computes its scores itself (issue 32, finding 12): MPNet,
Megatron-BERT and RemBERT on tiny configs, built in milliseconds as conftest's ``tiny_model_dir``.
Their prefixes are exactly prefix tuning (checked against attention written out by hand), train,
save and load back; what cannot take a prefix is refused in one line, and ``peftkit list -v``
names the families covered."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, set_seed

from peftkit import registry
from peftkit.errors import PeftkitError
from peftkit.models import load_tokenizer
from peftkit.strategies.base import TaskSpec, options_from_dict

from conftest import _build_tokenizer

TASK = TaskSpec(num_labels=2, label_names=("neg", "pos"))
SCORING = ("mpnet", "megatron-bert", "rembert")
TEXTS = ["a good film", "dull boring plot and the acting was very bad", "great"]
SMALL = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
)


def _config(arch: str, vocab_size: int, pad_id: int):
    extra = {
        "rembert": dict(input_embedding_size=16, output_embedding_size=16),
        "convbert": dict(embedding_size=32),
    }.get(arch, {})
    return AutoConfig.for_model(arch, vocab_size=vocab_size, pad_token_id=pad_id, **SMALL, **extra)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """``model_dir(arch)`` -> a local tiny model of that family (random weights + tokenizer)."""
    cache: dict[str, str] = {}

    def build(arch: str) -> str:
        if arch not in cache:
            from transformers import AutoModel

            torch.manual_seed(0)
            tok = _build_tokenizer()
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            AutoModel.from_config(_config(arch, len(tok), tok.pad_token_id)).save_pretrained(path)
            tok.save_pretrained(path)
            cache[arch] = str(path)
        return cache[arch]

    return build


def _base(path: str, seed: int = 0) -> torch.nn.Module:
    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model.eval()


def _prefixed(path: str, **options):
    """The strategy and a model prepared by it, with prefixes far from zero (a prefix that is
    ignored would then show)."""
    cls = registry.get_strategy("prefix")
    strategy = cls(options_from_dict(cls, {"num_virtual_tokens": 5, **options}))
    model = strategy.prepare(_base(path), TASK)
    with torch.no_grad():
        torch.manual_seed(3)
        model.prefix_encoder.embedding.weight.normal_(0, 2)
    return strategy, model.eval()


def _inputs(path: str, texts: list[str] = TEXTS) -> dict[str, torch.Tensor]:
    batch = dict(load_tokenizer(path)(texts, padding=True, return_tensors="pt"))
    batch.pop("token_type_ids", None)
    return batch


def _by_hand(
    attention: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, prefix: tuple[torch.Tensor, torch.Tensor]
) -> torch.Tensor:
    """Prefix tuning written out: ``softmax(q [Pk; K]^T / sqrt(d) + [0; mask]) [Pv; V]`` with the
    module's own projections (and MPNet's output projection ``o``, which sits inside its module)."""
    q_proj, k_proj, v_proj = [m for m in attention.children() if isinstance(m, torch.nn.Linear)][:3]
    heads = attention.num_attention_heads
    split = lambda x: x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
    keys = torch.cat([prefix[0].expand(hidden.shape[0], -1, -1), k_proj(hidden)], 1)
    values = torch.cat([prefix[1].expand(hidden.shape[0], -1, -1), v_proj(hidden)], 1)
    q, k, v = split(q_proj(hidden)), split(keys), split(values)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores + torch.cat([mask.new_zeros(*mask.shape[:-1], prefix[0].shape[0]), mask], -1)
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(hidden.shape[0], hidden.shape[1], -1)
    return attention.o(out) if hasattr(attention, "o") else out


@pytest.mark.parametrize("arch", SCORING)
def test_prefix_is_prefix_tuning_on_attention_that_scores_itself(arch, model_dir) -> None:
    """One layer's output is the hand-written prefix attention (padding masked, prefix visible)."""
    _, model = _prefixed(model_dir(arch))
    block = model.base_model.encoder.layer[1]
    attention = next(m for m in block.modules() if type(m).__name__.endswith("SelfAttention"))
    torch.manual_seed(1)
    hidden = torch.randn(2, 4, 32)
    mask = torch.zeros(2, 1, 1, 4)
    mask[1, ..., 3] = torch.finfo(torch.float32).min  # the second example's last token is padding
    key, value = model.prefix_encoder.layer(1)
    prefix = (key.transpose(0, 1).reshape(5, -1), value.transpose(0, 1).reshape(5, -1))
    with torch.no_grad():
        got = attention(hidden, attention_mask=mask)[0]
        torch.testing.assert_close(got, _by_hand(attention, hidden, mask, prefix), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", SCORING)
def test_prefix_changes_logits_and_padding_does_not(arch, model_dir) -> None:
    """Another prefix gives other logits (the prefix is no no-op), and an example's logits do not
    depend on how much padding it got."""
    path = model_dir(arch)
    _, model = _prefixed(path)
    _, other = _prefixed(path)
    with torch.no_grad():
        other.prefix_encoder.embedding.weight.mul_(-1)
        batch = _inputs(path)
        assert batch["attention_mask"].eq(0).any()
        logits = model(**batch).logits
        assert (logits - other(**batch).logits).abs().max() > 1e-3
        alone = torch.cat([model(**_inputs(path, [t])).logits for t in TEXTS])
        torch.testing.assert_close(logits, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", SCORING)
def test_prefix_on_attention_that_scores_itself_trains_saves_and_loads_back(arch, model_dir, tmp_path) -> None:
    import peftkit

    path = model_dir(arch)
    strategy, model = _prefixed(path)
    batch, labels = _inputs(path), torch.tensor([1, 0, 1])
    before = model.prefix_encoder.embedding.weight.detach().clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    for _ in range(15):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert (model.prefix_encoder.embedding.weight - before).abs().max() > 1e-3
    peftkit.save_adapter(str(tmp_path / "adapter"), strategy, model)
    meta = json.load(open(tmp_path / "adapter" / "peftkit_adapter.json"))
    assert meta["prefix_injection"] == "own-scores" and "cannot apply" in meta["peft_compatibility"]
    loaded = peftkit.load_adapter(str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(loaded.model.eval()(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=1e-5)


def test_prefix_run_on_mpnet_from_the_command_line(model_dir, tiny_csv, tmp_path) -> None:
    """The popular sentence encoder's family, end to end: a run, and its adapter predicting."""
    from peftkit.cli import main
    from peftkit.inference import load_adapter, predict_texts

    with pytest.raises(SystemExit) as done:
        main(
            [
                "run",
                "-s",
                "prefix",
                "--model",
                model_dir("mpnet"),
                "--dataset",
                tiny_csv,
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--max-length",
                "16",
                "--set",
                "num_virtual_tokens=4",
                "--output-dir",
                str(tmp_path / "run"),
            ]
        )
    assert done.value.code in (0, None)
    rows = predict_texts(load_adapter(str(tmp_path / "run" / "adapter")), TEXTS)
    assert [r["label"] for r in rows] and all(r["label"] in ("neg", "pos") for r in rows)


@pytest.mark.parametrize(
    "arch,reason",
    [
        (
            "deberta-v2",
            r"its attention DisentangledSelfAttention takes 'query_states', 'relative_pos', 'rel_embeddings'",
        ),
        ("roformer", r"its attention RoFormerSelfAttention takes 'sinusoidal_pos'"),
        # half its width goes to a convolution: its projections are narrower than its heads say
        ("convbert", r"no self-attention module in its blocks calls transformers' attention functions or has its own"),
    ],
)
def test_attention_a_prefix_cannot_enter_is_refused_in_one_line(arch, reason, model_dir) -> None:
    with pytest.raises(PeftkitError) as refused:
        registry.get_strategy("prefix")().prepare(_base(model_dir(arch)), TASK)
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"strategy 'prefix' cannot handle model type '{arch}': ")
    assert re.search(reason, message), message
    assert "MPNet" in message and "BERT" in message  # what is covered instead


def test_the_probe_refuses_attention_that_mixes_positions_outside_its_scores(model_dir) -> None:
    """Structure alone would let ConvBERT through, were its projections as wide as its heads say
    (they are half as wide: the other half is a convolution over the sequence, which the prefix's
    extra rows would reach). Given their real width, the probe catches it."""
    from peftkit.strategies.prefix import _find_attention

    model = _base(model_dir("convbert"))
    with pytest.raises(PeftkitError, match="its attention ConvBertSelfAttention mixes positions outside its scores"):
        _find_attention(model, 32, 16, 5)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # left as it was


def test_list_verbose_names_the_families_prefix_covers(run_cli) -> None:
    code, stdout, _ = run_cli("list", "-v")
    assert code == 0
    covers = [line for line in stdout.splitlines() if "covers:" in line]
    assert len(covers) == 1, stdout  # only prefix is limited to some families
    for family in ("BERT", "RoBERTa", "DistilBERT", "GPT-2", "Llama", "MPNet", "Megatron-BERT", "RemBERT"):
        assert family in covers[0]
