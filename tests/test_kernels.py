"""``--kernels`` (peftkit.kernels): the SwiGLU that keeps only its inputs gives the model's own
values and gradients and keeps less; Liger's kernels are refused in one line where they cannot run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peftkit.errors import PeftkitError
from peftkit.kernels import apply_kernels, gated_mlps, swiglu

from conftest import _build_tokenizer, _config


def test_swiglu_is_silu_times_up_with_the_same_gradients() -> None:
    torch.manual_seed(0)
    gate = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    up = torch.randn(6, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate, up))
    out = swiglu(gate, up)
    assert torch.equal(out, F.silu(gate) * up)


def test_swiglu_keeps_only_its_inputs() -> None:
    gate = torch.randn(8, 64, requires_grad=True)
    up = torch.randn(8, 64, requires_grad=True)
    kept: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t.untyped_storage().data_ptr())
        return t

    for fn in (swiglu, lambda g, u: F.silu(g) * u):
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(gate, up)
        saved = set(kept)
        if fn is swiglu:
            assert saved == {gate.untyped_storage().data_ptr(), up.untyped_storage().data_ptr()}
        else:  # autograd's own keeps silu(gate) as well
            assert len(saved) == 3


def _llama(strategy_name: str = "lora"):
    from transformers import AutoModelForCausalLM

    from peftkit.registry import get_strategy
    from peftkit.tasks import get_task

    torch.manual_seed(0)
    tok = _build_tokenizer()
    config = _config("llama", len(tok), tok.pad_token_id)
    task = get_task("causal-lm")
    model = AutoModelForCausalLM.from_config(config)
    return task, get_strategy(strategy_name)(), model, config


@pytest.mark.parametrize("strategy_name", ["lora", "full"])
def test_a_model_with_the_torch_kernels_trains_as_the_model_itself(strategy_name) -> None:
    import copy

    task, strategy, model, config = _llama(strategy_name)
    patched = copy.deepcopy(model)
    assert apply_kernels(patched, None, on_cuda=False) == "torch"  # the default where it applies
    assert len(gated_mlps(patched)) == config.num_hidden_layers
    batch = task.dummy_batch(config, 4, 20, "cpu", loss_positions=20)
    results = []
    for m in (model, patched):
        torch.manual_seed(1)
        prepared = type(strategy)().prepare(m, task.plan_spec(m, 0))
        prepared.train()
        loss = task.step_loss(strategy, prepared, "plain")(prepared, batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in prepared.named_parameters() if p.grad is not None}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-5, atol=1e-7), name


def test_kernels_none_leaves_the_model_alone_and_torch_needs_a_gated_mlp(tiny_model_dir) -> None:
    from transformers import AutoModelForSequenceClassification

    _, _, model, _ = _llama()
    forwards = [type(m).forward for m in gated_mlps(model)]
    assert apply_kernels(model, "none", on_cuda=False) == "none"
    assert all("forward" not in vars(m) for m in gated_mlps(model)) and forwards
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"), num_labels=2)
    assert apply_kernels(bert, None, on_cuda=False) == "none"  # no gated MLP: nothing to do, nothing said
    with pytest.raises(PeftkitError, match=r"^--kernels torch: model type 'bert' has no gated \(SwiGLU\) MLP"):
        apply_kernels(bert, "torch", on_cuda=False)


def test_liger_is_refused_in_one_line_without_a_gpu(tiny_causal_dir, pairs_csv, run_cli, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_causal_dir,
        "--dataset",
        pairs_csv,
        "--kernels",
        "liger",
        "--output-dir",
        str(out),
    )
    assert code == 2 and not out.exists()
    assert stderr.strip().splitlines()[-1] == (
        "error: --kernels liger: Liger's kernels are Triton kernels for CUDA GPUs; on CPU use --kernels torch "
        "(the default) or none"
    )


def test_compile_blocks_compiles_training_and_leaves_evaluation_eager(monkeypatch) -> None:
    """``--compile``: each block's forward goes through torch.compile while it trains (here with
    dynamo's eager backend, to test the wiring in milliseconds), and stays eager in evaluation."""
    from peftkit.kernels import compile_blocks

    calls: list[str] = []
    real_compile = torch.compile

    def compile_eagerly(fn):
        compiled = real_compile(fn, backend="eager")

        def counted(*args, **kwargs):
            calls.append("compiled")
            return compiled(*args, **kwargs)

        return counted

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    task, strategy, model, config = _llama()
    model = strategy.prepare(model, task.plan_spec(model, 0))
    batch = task.dummy_batch(config, 2, 12, "cpu", loss_positions=12)
    model.train()
    expected = task.step_loss(strategy, model, None)(model, batch)
    assert compile_blocks(model) == config.num_hidden_layers
    got = task.step_loss(strategy, model, None)(model, batch)
    assert torch.allclose(got, expected, rtol=1e-5) and len(calls) == config.num_hidden_layers
    model.eval()
    with torch.no_grad():
        task.step_loss(strategy, model, None)(model, batch)
    assert len(calls) == config.num_hidden_layers, "evaluation ran the eager forward"


def test_compile_is_refused_with_a_quantized_base() -> None:
    from peftkit.config import Levers
    from peftkit.levers import check_levers
    from peftkit.registry import get_strategy

    with pytest.raises(PeftkitError, match=r"^--compile with --quantize 4bit: torch.compile does not trace"):
        check_levers(Levers(compile=True, quantize="4bit"), get_strategy("lora")())
