"""Memory levers: quantized bases, 8-bit optimizers, gradient checkpointing, mixed precision."""

from __future__ import annotations

import json
import os

import pytest
import torch

from peftkit.config import Levers
from peftkit.errors import PeftkitError
from peftkit.levers import check_levers, make_optimizer, store_frozen_in_half
from peftkit.registry import get_strategy
from peftkit.strategies.base import TaskSpec

TASK = TaskSpec(num_labels=2, label_names=("neg", "pos"))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _classifier(model_dir: str):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)


def _run_args(model_dir: str, data: str, out: str, *extra: str) -> list[str]:
    return [
        "run",
        "--model",
        model_dir,
        "--dataset",
        data,
        "--output-dir",
        out,
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--max-length",
        "16",
        *extra,
    ]


# -- what is refused, and how -------------------------------------------------------------------


def test_quantized_full_fine_tune_is_refused_naming_what_works() -> None:
    with pytest.raises(
        PeftkitError,
        match=r"strategy 'full' trains the base .* use --quantize with "
        r"adapter, head_only, lora, prefix",
    ):
        check_levers(Levers(quantize="4bit"), get_strategy("full")())
    check_levers(Levers(quantize="4bit"), get_strategy("lora")())  # fine


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_cuda_only_levers_are_refused_on_cpu() -> None:
    with pytest.raises(PeftkitError, match="fp16 needs a CUDA GPU"):
        check_levers(Levers(precision="fp16"), get_strategy("lora")())
    with pytest.raises(PeftkitError, match="paged_adamw8bit .* needs a CUDA GPU"):
        check_levers(Levers(optimizer="paged_adamw8bit"), get_strategy("lora")())


def test_run_refuses_a_bad_lever_in_one_line(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        *_run_args(tiny_model_dir("bert"), tiny_csv, str(out), "--strategy", "full", "--quantize", "4bit")
    )
    last = stderr.strip().splitlines()[-1]  # (the fixture's first model save may print a bar before it)
    assert code == 2 and last.startswith("error: strategy 'full' trains") and "Traceback" not in stderr
    code, _, stderr = run_cli(*_run_args(tiny_model_dir("bert"), tiny_csv, str(out), "--precision", "fp64"))
    assert code == 2 and "'fp64' is not one of 'fp32', 'bf16', 'fp16'" in stderr
    assert not out.exists()


def test_levers_are_yaml_settings(tmp_path) -> None:
    from peftkit.config import build_run_config

    path = tmp_path / "run.yaml"
    path.write_text(
        "strategy: lora\nquantize: 4bit\noptimizer: adamw8bit\ngradient_checkpointing: true\nprecision: bf16\n"
    )
    cfg = build_run_config(str(path), {}, {})
    assert cfg.levers == Levers(quantize="4bit", optimizer="adamw8bit", gradient_checkpointing=True, precision="bf16")
    assert cfg.to_dict()["quantize"] == "4bit"  # recorded flat, as written
    path.write_text("strategy: lora\nquantize: 3bit\n")
    with pytest.raises(PeftkitError, match="quantize"):
        build_run_config(str(path), {}, {})


# -- each lever does what it says ---------------------------------------------------------------


def test_frozen_weights_are_stored_in_half_and_trainable_ones_stay_fp32(tiny_model_dir) -> None:
    strategy = get_strategy("lora")()
    model = strategy.prepare(_classifier(tiny_model_dir("bert")), TASK)
    trainable = strategy.trainable_parameters(model)
    converted = store_frozen_in_half(model, trainable, "bf16")
    frozen = [p for p in model.parameters() if all(p is not q for q in trainable.values())]
    assert converted == sum(p.numel() for p in frozen) > 0
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    assert store_frozen_in_half(model, trainable, "fp32") == 0


def test_adamw8bit_keeps_8bit_state(tiny_model_dir) -> None:
    big = torch.nn.Parameter(torch.randn(128, 64))
    opt = make_optimizer("adamw8bit", [{"params": [big], "weight_decay": 0.0}], lr=1e-3)
    big.grad = torch.randn_like(big)
    before = big.detach().clone()
    opt.step()
    state = opt.state[big]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert not torch.equal(before, big.detach())


@pytest.mark.parametrize("strategy", ["full", "lora", "prefix"])
def test_gradient_checkpointing_gives_the_same_gradients(strategy, tiny_model_dir) -> None:
    """Recomputing activations must not change the gradients (dropout replays the same RNG state)."""
    from peftkit.levers import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = _classifier(tiny_model_dir("bert"))
        if checkpointing:
            enable_gradient_checkpointing(model)
        s = get_strategy(strategy)()
        model = s.prepare(model, TASK)
        model.train()
        torch.manual_seed(1)
        ids = torch.randint(5, 30, (4, 12))
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1]))
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in s.trainable_parameters(model).items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "levers",
    [["--precision", "bf16"], ["--optimizer", "adamw8bit"], ["--gradient-checkpointing"]],
    ids=lambda x: x[-1].lstrip("-"),
)
def test_run_with_a_lever(levers, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(*_run_args(tiny_model_dir("bert"), tiny_csv, str(out), "--strategy", "lora", *levers))
    assert code == 0, stderr
    metrics = json.load(open(out / "metrics.json"))
    expected = (
        {"precision": "bf16"}
        if "bf16" in levers
        else ({"optimizer": "adamw8bit"} if "adamw8bit" in levers else {"gradient_checkpointing": True})
    )
    assert expected.items() <= metrics.items()
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["train_seconds"] > 0


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_lora_on_a_quantized_base_trains_saves_and_predicts(bits, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """QLoRA on CPU: the base's linear layers load through bitsandbytes, the head does not, the
    adapter ships in peft's format and loads back onto the same quantized base."""
    import bitsandbytes as bnb

    from peftkit.inference import load_adapter, predict_texts

    out = tmp_path / "run"
    code, _, stderr = run_cli(
        *_run_args(
            tiny_model_dir("bert"), tiny_csv, str(out), "--strategy", "lora", "--quantize", bits, "--epochs", "2"
        )
    )
    assert code == 0, stderr
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["quantize"] == bits and metrics["trainable_params"] > 0
    meta = json.load(open(out / "adapter" / "peftkit_adapter.json"))
    assert meta["base_quantization"] == bits
    code, stdout, stderr = run_cli("inspect", str(out / "adapter"))
    assert code == 0 and f"base quantization {bits}\n" in stdout, stderr  # the text form shows it too
    assert os.path.isfile(out / "adapter" / "adapter_model.safetensors")
    loaded = load_adapter(str(out / "adapter"))
    kind = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    assert any(isinstance(m, kind) for m in loaded.model.modules())
    classifier = [m for n, m in loaded.model.named_modules() if n.endswith("classifier")]
    assert classifier and not any(isinstance(m, kind) for c in classifier for m in c.modules())
    rows = predict_texts(loaded, ["good great fun", "bad dull awful"])
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)


def test_a_4bit_base_counts_its_parameters_not_its_packed_bytes(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """Issue 15: --quantize 4bit reported 17.5M of MiniLM's 22.8M parameters (two 4-bit values are
    stored per byte). The same model and strategy count the same, quantized or not."""
    counts = {}
    for bits in (None, "4bit"):
        out = tmp_path / str(bits)
        code, stdout, stderr = run_cli(
            *_run_args(
                tiny_model_dir("bert"),
                tiny_csv,
                str(out),
                "--strategy",
                "lora",
                "--epochs",
                "1",
                "--max-train-samples",
                "32",
                "--max-eval-samples",
                "16",
                *(["--quantize", bits] if bits else []),
            )
        )
        assert code == 0, stderr
        metrics = json.load(open(out / "metrics.json"))
        counts[bits] = (metrics["trainable_params"], metrics["total_params"])
        assert f"trainable {metrics['trainable_params']:,} of {metrics['total_params']:,} parameters" in stdout
    assert counts["4bit"] == counts[None]


@needs_cuda
def test_fp16_and_paged_optimizer_on_cuda(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "run"
    code, _, stderr = run_cli(
        *_run_args(
            tiny_model_dir("bert"),
            tiny_csv,
            str(out),
            "--strategy",
            "lora",
            "--precision",
            "fp16",
            "--optimizer",
            "paged_adamw8bit",
        )
    )
    assert code == 0, stderr
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["device"].startswith("cuda") and metrics["precision"] == "fp16"


def test_cuda_budget_caps_the_card_by_its_index(monkeypatch) -> None:
    """accelerate's device is ``cuda`` without an index, which the allocator's cap refuses (found
    on the first GPU run): the budget must reach it as the card's number and the right fraction."""
    import torch

    from peftkit.memory import apply_budget

    calls = []
    total = 80 * 2**30
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: type("Props", (), {"total_memory": total})())
    monkeypatch.setattr(
        torch.cuda, "set_per_process_memory_fraction", lambda fraction, device: calls.append((fraction, device))
    )
    apply_budget(torch.device("cuda"), 8 * 2**30)
    apply_budget(torch.device("cuda", 3), 20 * 2**30)
    assert calls == [(0.1, 0), (0.25, 3)]
    assert all(isinstance(device, int) for _, device in calls)


@pytest.mark.parametrize(
    "levers",
    [["--quantize", "4bit"], ["--quantize", "8bit"], ["--precision", "bf16"], ["--gradient-checkpointing"]],
    ids=lambda x: x[-1].lstrip("-"),
)
def test_prefix_with_a_lever_trains_saves_and_predicts(levers, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    """Prefixes go in front of keys whatever computed them: 4/8-bit projections, bf16 autocast
    (the prefixes are cast to the keys' dtype), recomputed blocks."""
    from peftkit.inference import load_adapter, predict_texts

    out = tmp_path / "run"
    code, _, stderr = run_cli(
        *_run_args(
            tiny_model_dir("llama"),
            tiny_csv,
            str(out),
            "--strategy",
            "prefix",
            "--set",
            "num_virtual_tokens=4",
            *levers,
        )
    )
    assert code == 0, stderr
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["trainable_params"] == 4 * 2 * 2 * 32 + 2 * 32 and 0 <= metrics["test_accuracy"] <= 1
    rows = predict_texts(load_adapter(str(out / "adapter")), ["good great fun", "bad dull awful"])
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-4 for r in rows)
