"""The chunked loss (``--loss chunked``, peftkit.chunked_loss): the plain loss's value and gradients,
one chunk of vocabulary-wide logits at a time; refused in one line where it cannot stand in."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from peftkit.chunked_loss import CHUNK_BYTES, chunk_tokens, linear_cross_entropy
from peftkit.errors import PeftkitError

from conftest import _build_tokenizer, _config


@pytest.mark.parametrize("chunk", [1, 7, 128, 10_000])
@pytest.mark.parametrize("trained", ["all", "hidden only", "no bias"])
def test_linear_cross_entropy_is_the_plain_loss_and_gradients(chunk, trained) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(300, 16, requires_grad=True)
    weight = torch.randn(500, 16, requires_grad=trained != "hidden only")
    bias = None if trained == "no bias" else torch.randn(500, requires_grad=trained == "all")
    targets = torch.randint(0, 500, (300,))
    leaves = [t for t in (hidden, weight, bias) if t is not None and t.requires_grad]

    plain = F.cross_entropy(F.linear(hidden, weight, bias), targets, reduction="sum")
    expected = torch.autograd.grad(plain * 0.37, leaves)
    chunked = linear_cross_entropy(hidden, weight, bias, targets, chunk=chunk)
    got = torch.autograd.grad(chunked * 0.37, leaves)  # a loss scaled after it, as a mean is

    assert torch.allclose(chunked, plain, rtol=1e-6, atol=1e-4)
    for e, g in zip(expected, got):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-5)


def test_without_gradients_it_only_sums_the_loss() -> None:
    hidden, weight = torch.randn(50, 8), torch.randn(90, 8)
    targets = torch.randint(0, 90, (50,))
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, None, targets, chunk=16)
    assert torch.allclose(loss, F.cross_entropy(hidden @ weight.T, targets, reduction="sum"), rtol=1e-6)


def test_a_chunk_holds_about_chunk_bytes_of_fp32_logits() -> None:
    assert chunk_tokens(49_152) == CHUNK_BYTES // (4 * 49_152) == 341
    assert chunk_tokens(10**12) == 1


# -- through a model and a strategy: what a training step computes ------------------------------


def _model(arch: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tok = _build_tokenizer()
    config = _config(arch, len(tok), tok.pad_token_id)
    config.tie_word_embeddings = True  # the output layer is the input embeddings, as in SmolLM2 and GPT-2
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):  # GPT-2's dropout: two forwards must agree
        if hasattr(config, key):
            setattr(config, key, 0.0)
    return AutoModelForCausalLM.from_config(config), config


def _prepared(arch: str, strategy_name: str, options: dict | None = None):
    from peftkit.registry import get_strategy
    from peftkit.strategies.base import options_from_dict
    from peftkit.tasks import get_task

    model, config = _model(arch)
    task = get_task("causal-lm")
    cls = get_strategy(strategy_name)
    strategy = cls(options_from_dict(cls, options or {}))
    model = strategy.prepare(model, task.plan_spec(model, 0))
    model.train()
    return task, strategy, model, config


def _grads(task, strategy, model, batch, loss):
    step_loss = task.step_loss(strategy, model, loss)
    model.zero_grad(set_to_none=True)
    value = step_loss(model, batch)
    value.backward()
    return (
        step_loss.kind,
        value.detach(),
        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None},
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("strategy_name", ["lora", "full", "prefix"])
@pytest.mark.parametrize("answer", [3, 24], ids=["answers (logits_to_keep)", "plain text (every token)"])
def test_a_step_with_the_chunked_loss_equals_the_plain_step(arch, strategy_name, answer) -> None:
    """Loss and every trained parameter's gradient within 1e-5, for a frozen output layer (lora,
    prefix) and a trained one tied to the input embeddings (full), with left padding."""
    task, strategy, model, config = _prepared(
        arch, strategy_name, {"dropout": 0.0} if strategy_name == "lora" else None
    )
    batch = task.dummy_batch(config, 4, 24, "cpu", loss_positions=answer)
    kind_plain, loss_plain, grads_plain = _grads(task, strategy, model, batch, "plain")
    kind, loss, grads = _grads(task, strategy, model, batch, None)  # the default
    assert (kind_plain, kind) == ("plain", "chunked")
    assert torch.allclose(loss, loss_plain, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_plain.keys() and grads
    for name, grad in grads.items():
        assert torch.allclose(grad, grads_plain[name], rtol=1e-5, atol=1e-6), name


def test_under_bf16_autocast_it_stays_near_the_plain_loss() -> None:
    task, strategy, model, config = _prepared("llama", "lora", {"dropout": 0.0})
    batch = task.dummy_batch(config, 4, 24, "cpu", loss_positions=24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain, _ = _grads(task, strategy, model, batch, "plain")
        _, chunked, _ = _grads(task, strategy, model, batch, "chunked")
    assert torch.allclose(chunked, plain, rtol=2e-2)


def test_an_output_layer_a_strategy_changed_gets_the_plain_loss_or_a_one_line_refusal() -> None:
    task, strategy, model, _ = _prepared("llama", "lora", {"target_modules": ["q_proj", "lm_head"]})
    assert task.step_loss(strategy, model, None).kind == "plain"
    with pytest.raises(
        PeftkitError,
        match=r"^--loss chunked: its output layer is a Linear, not a plain linear "
        r"layer .*; use --loss plain$",
    ):
        task.step_loss(strategy, model, "chunked")


def test_soft_capped_logits_and_fsdp_are_left_to_the_plain_loss() -> None:
    from peftkit.chunked_loss import unsupported

    model, _ = _model("llama")
    assert unsupported(model) is None
    assert "fsdp" in unsupported(model, sharded=True)
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in unsupported(capped)


def test_chunked_loss_is_refused_for_a_task_without_vocabulary_wide_logits(
    tiny_model_dir, tiny_csv, run_cli, tmp_path
) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--loss",
        "chunked",
        "--output-dir",
        str(out),
    )
    assert code == 2 and not out.exists()
    assert stderr.strip().splitlines()[-1] == (
        "error: --loss chunked is for tasks with vocabulary-wide logits (causal-lm); sequence-classification's "
        "logits are a few numbers per example, with nothing to chunk: drop --loss"
    )


def test_evaluation_losses_in_chunks_are_the_plain_ones() -> None:
    from peftkit.chunked_loss import captured_output_input, chunked_example_losses, output_layer

    task, strategy, model, config = _prepared("llama", "lora")
    model.eval()
    for answer in (3, 24):
        batch = task.dummy_batch(config, 5, 24, "cpu", loss_positions=answer)
        with torch.no_grad():
            plain = task._token_losses(strategy.forward(model, batch), batch["labels"])
            with captured_output_input(output_layer(model)) as captured:
                strategy.forward(model, batch)
            chunked = chunked_example_losses(captured, batch["labels"], -100, chunk=7)
        assert torch.allclose(chunked[0], plain[0], rtol=1e-5) and torch.equal(chunked[1], plain[1])
