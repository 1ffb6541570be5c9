"""`peftkit plan`: the parameter arithmetic, the measured activations, the command."""

from __future__ import annotations

import dataclasses
import json

import pytest

from peftkit.config import Levers
from peftkit.errors import PeftkitError
from peftkit.planner import (
    PlanSettings,
    check_applicable,
    load_config,
    measure_saved_activations,
    parameter_memory,
    plan_strategy,
    resolve_settings,
)
from peftkit.registry import get_strategy
from peftkit.strategies.base import TaskSpec, options_from_dict

TASK = TaskSpec(num_labels=2, label_names=("neg", "pos"))


def _meta_prepared(model_dir: str, strategy: str, options: dict | None = None):
    from accelerate import init_empty_weights
    from transformers import AutoModelForSequenceClassification

    from peftkit.structure import head_module_names

    config = load_config(model_dir)
    config.num_labels = 2
    with init_empty_weights(include_buffers=False):
        model = AutoModelForSequenceClassification.from_config(config)
        skip = head_module_names(model)
        cls = get_strategy(strategy)
        s = cls(options_from_dict(cls, options or {}))
        model = s.prepare(model, TASK)
    return model, s.trainable_parameters(model), skip


def test_parameter_memory_full_fp32_adamw(tiny_model_dir) -> None:
    model, trainable, skip = _meta_prepared(tiny_model_dir("bert"), "full")
    n = sum(p.numel() for p in model.parameters())
    weights, grads, opt, _ = parameter_memory(model, trainable, PlanSettings(model="x", strategies=["full"]), skip)
    assert (weights, grads, opt) == (4 * n, 4 * n, 8 * n)


def test_parameter_memory_lora_bf16_4bit_and_8bit_adam(tiny_model_dir) -> None:
    from torch import nn

    model, trainable, skip = _meta_prepared(tiny_model_dir("bert"), "lora")
    t = sum(p.numel() for p in trainable.values())
    frozen = sum(p.numel() for p in model.parameters()) - t
    settings = PlanSettings(model="x", strategies=["lora"], levers=Levers(precision="bf16"))
    weights, grads, opt, _ = parameter_memory(model, trainable, settings, skip)
    assert weights == 4 * t + 2 * frozen and grads == 4 * t and opt == 8 * t  # LoRA tensors < 4096: fp32 state
    settings = PlanSettings(model="x", strategies=["lora"], levers=Levers(quantize="4bit"))
    q_weights, _, _, _ = parameter_memory(model, trainable, settings, skip)
    linear = sum(
        m.weight.numel()
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and m.weight.requires_grad is False and "classifier" not in n
    )
    # each frozen linear weight drops from 4 bytes to about 0.52 (NF4 codes + double-quantized scales)
    assert weights - 2 * frozen < q_weights < 4 * t + 4 * frozen - 3.4 * linear
    big = {"w": __import__("torch").nn.Parameter(__import__("torch").empty(100, 100, device="meta"))}
    _, _, opt8, _ = parameter_memory(
        _Holder(big), big, PlanSettings(model="x", strategies=["full"], levers=Levers(optimizer="adamw8bit")), []
    )
    assert opt8 == 2 * 10_000 + 8 * 40  # two 8-bit moments + an fp32 scale per 256-element block each


class _Holder:
    def __init__(self, params):
        self._params = params

    def parameters(self):
        return iter(self._params.values())

    def named_modules(self):
        return iter(())


def test_saved_activations_follow_batch_and_strategy(tiny_model_dir) -> None:
    config = load_config(tiny_model_dir("bert"))
    config.num_labels = 2

    def per_block(strategy: str, batch: int, **levers) -> int:
        settings = PlanSettings(model="x", strategies=[strategy], batch_size=batch, max_length=16, **levers)
        return measure_saved_activations(config, get_strategy(strategy)(), TASK, settings)[1]

    full8, full16 = per_block("full", 8), per_block("full", 16)
    assert 1.8 < full16 / full8 < 2.2  # activations are per example
    assert 0 < per_block("lora", 8) <= full8  # gradients still flow through every block
    assert per_block("head_only", 8) == 0  # nothing flows back into a frozen feature extractor


def test_an_8bit_base_keeps_each_quantized_linears_input_as_bitsandbytes_does(tiny_model_dir) -> None:
    """bitsandbytes' 8-bit matmul keeps its input for backward; a frozen torch linear (the plan's
    unquantized copy) does not. The GPU suite found the 8-bit plan 33% under for lack of this."""
    from torch import nn

    from peftkit.planner import keep_inputs_as_int8_matmul

    config = load_config(tiny_model_dir("llama"))
    config.num_labels = 2

    def per_block(quantize: str | None) -> int:
        settings = PlanSettings(
            model="x",
            strategies=["lora"],
            batch_size=4,
            max_length=16,
            device="cuda",
            levers=Levers(precision="bf16", quantize=quantize),
        )
        return measure_saved_activations(config, get_strategy("lora")(), TASK, settings)[1]

    bf16, four, eight = per_block(None), per_block("4bit"), per_block("8bit")
    assert four == bf16  # the 4-bit matmul keeps no input: nothing to add
    # at least the inputs of o_proj and down_proj are new: kept by nothing else in a LoRA block
    tokens = 4 * 16
    assert eight - bf16 >= 2 * tokens * (config.hidden_size + config.intermediate_size)
    # only frozen linears outside the head change; LoRA's own (trainable) ones and the head do not
    model = nn.ModuleDict({"layer": nn.Linear(4, 4), "lora_A": nn.Linear(4, 2), "score": nn.Linear(4, 2)})
    assert keep_inputs_as_int8_matmul(model, {"a": model["lora_A"].weight}, ["score"]) == 1
    assert isinstance(model["layer"].forward, object) and model["score"].forward.__self__ is model["score"]


def test_plan_command(run_cli, tiny_model_dir) -> None:
    code, out, err = run_cli(
        "plan",
        "--model",
        tiny_model_dir("bert"),
        "--strategies",
        "lora,full,head_only",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--memory-budget",
        "4GiB",
        "--json",
    )
    assert code == 0, err
    plan = json.loads(out)
    rows = {e["strategy"]: e for e in plan["estimates"]}
    for e in rows.values():
        assert e["status"] == "ok"
        parts = ("weights", "gradients", "optimizer", "activations", "workspace", "communication", "runtime")
        assert e["total"] == sum(e[k] for k in parts)
        assert e["max_batch_size"] and e["max_batch_size"] > 8  # a tiny model leaves room in 4 GiB
    assert rows["full"]["optimizer"] > rows["lora"]["optimizer"] > rows["head_only"]["optimizer"]
    code, out, err = run_cli(
        "plan",
        "--model",
        tiny_model_dir("bert"),
        "--strategies",
        "full,lora",
        "--quantize",
        "4bit",
        "--batch-size",
        "4",
        "--max-length",
        "8",
    )
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("full") and "refused: strategy 'full' trains" in line for line in lines)
    assert any(line.startswith("lora") and "GiB" in line or "MiB" in line for line in lines)
    # no budget on a CPU: the table says whose peak it gives (a run with a budget returns freed memory
    # at once; one without keeps it, and can peak higher)
    assert "note: peaks are those of a CPU run given a --memory-budget" in out


def test_plan_per_device_under_data_parallel_and_fsdp(tiny_model_dir) -> None:
    """--processes N: data parallel (DDP) keeps everything on each device plus a bucket copy of the
    gradients; FSDP splits weights, gradients and optimizer state N ways and adds what it gathers
    at once: the root's own parameters, two blocks and one block's gradients."""
    import math

    from peftkit.planner import resolve_settings
    from peftkit.planner.plan import _arithmetic

    model = tiny_model_dir("bert")
    config = load_config(model)

    def est(strategy: str, **kw):
        settings = resolve_settings(PlanSettings(model=model, strategies=[strategy], device="cpu", **kw))
        return _arithmetic(config, strategy, settings).est

    one, ddp, fsdp, fsdp4 = (
        est("full", **kw)
        for kw in ({}, {"processes": 2}, {"processes": 2, "fsdp": True}, {"processes": 4, "fsdp": True})
    )
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (one.weights, one.gradients, one.optimizer)
    assert one.communication == 0 and ddp.communication == one.gradients
    for sharded, n in ((fsdp, 2), (fsdp4, 4)):
        assert (sharded.weights, sharded.gradients, sharded.optimizer) == tuple(
            math.ceil(x / n) for x in (one.weights, one.gradients, one.optimizer)
        )
    # full fine-tune in fp32: a block's weights and gradients are 4 bytes a parameter; the root holds the rest
    model_meta, _, _ = _meta_prepared(model, "full")
    block = sum(p.numel() for p in model_meta.bert.encoder.layer[0].parameters())
    total = sum(p.numel() for p in model_meta.parameters())
    assert fsdp.communication == 4 * (total - 2 * block) + 2 * 4 * block + 4 * block
    assert fsdp.communication == fsdp4.communication  # what is gathered does not shrink with N
    lora = est("lora", processes=2, fsdp=True)
    lora_one = est("lora")
    assert lora.gradients == math.ceil(lora_one.gradients / 2) and lora.communication < fsdp.communication
    assert any("FSDP over 2 processes" in note for note in fsdp.notes)


def test_plan_command_per_process(run_cli, tiny_model_dir) -> None:
    code, out, err = run_cli(
        "plan",
        "--model",
        tiny_model_dir("bert"),
        "--strategies",
        "full",
        "--batch-size",
        "4",
        "--max-length",
        "8",
        "--processes",
        "2",
        "--fsdp",
    )
    assert code == 0, err
    assert "per process" in out and "each of 2 cpu processes, fully sharded (FSDP)" in out
    assert "communication" in out.splitlines()[1]


@pytest.mark.parametrize(
    "args,message",
    [
        (["--fsdp"], "--fsdp shards over several processes; give --processes N with N of 2 or more (got 1)"),
        (["--processes", "0"], "processes"),
        (["--processes", "2", "--fsdp", "--quantize", "4bit"], "--fsdp with --quantize 4bit is not planned"),
    ],
)
def test_plan_refuses_what_cannot_be_sharded(args, message, run_cli, tiny_model_dir) -> None:
    code, _, err = run_cli("plan", "--model", tiny_model_dir("bert"), "--strategies", "lora", *args)
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--strategies", "nope"], "unknown strategy 'nope'"),
        (["--memory-budget", "x"], "memory size 'x'"),
        (["--model", "/no/such/dir"], "model directory not found"),
        (["--strategies", "full,lora", "--set", "nope=1"], "unknown option 'nope' for the planned strategies"),
        (["--strategies", "full,lora", "--set", "r=abc"], "option 'r' of strategy 'lora' must be int, got 'abc'"),
        (["--set", "r"], "--set expects KEY=VALUE, got 'r'"),
    ],
)
def test_plan_bad_input(args, message, run_cli) -> None:
    code, _, err = run_cli("plan", *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_plan_for_a_gpu_from_a_cpu_machine_uses_saved_tensors(run_cli, tiny_model_dir) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: plan measures on it")
    code, out, err = run_cli(
        "plan",
        "--model",
        tiny_model_dir("bert"),
        "--strategies",
        "lora",
        "--device",
        "cuda",
        "--batch-size",
        "4",
        "--max-length",
        "8",
    )
    assert code == 0, err
    assert "no GPU here: activations are the tensors autograd saves" in out and "runtime" not in out.splitlines()[1]


def _fail_lora(monkeypatch) -> None:
    """Planning lora raises a long ValueError (as prefix once did through peft), the others plan."""
    import peftkit.planner.plan as plan  # where the plan calls the measurement

    measure = plan.measure_activations

    def failing(config, strategy, *args):
        if strategy.name == "lora":
            raise ValueError("prefix length does not fit the cache " + "x" * 120)
        return measure(config, strategy, *args)

    monkeypatch.setattr(plan, "measure_activations", failing)


def test_plan_failed_row_keeps_the_table_and_exits_1(run_cli, tiny_model_dir, monkeypatch) -> None:
    _fail_lora(monkeypatch)
    args = (
        "plan",
        "--model",
        tiny_model_dir("bert"),
        "--strategies",
        "head_only,lora,full",
        "--batch-size",
        "4",
        "--max-length",
        "8",
    )
    code, out, err = run_cli(*args)
    assert code == 1 and "error: planning failed for lora" in err and "Traceback" not in err
    lines = out.splitlines()
    table = lines[1:5]  # header, head_only, lora, full
    assert table[0].split()[:2] == ["strategy", "status"]
    assert len({len(line) for line in table}) == 1 and len(table[0]) < 120  # the error does not widen it
    assert table[2].split()[:3] == ["lora", "failed", "-"] and "ValueError" not in table[2]
    assert "lora failed: ValueError: prefix length does not fit the cache xxx" in lines[5]
    code, out, err = run_cli(*args, "--json")
    assert code == 1, err
    plan = json.loads(out)
    rows = {e["strategy"]: e for e in plan["estimates"]}
    assert plan["failed"] == ["lora"] and rows["lora"]["status"] == "failed"
    assert rows["lora"]["error"].startswith("ValueError: prefix length") and rows["full"]["status"] == "ok"


def test_plan_says_what_it_measures_and_measures_each_structure_once(run_cli, tiny_model_dir, monkeypatch) -> None:
    import peftkit.planner.measure as plan  # where the measurement calls its steps

    calls = []
    measure = plan.measure_step_increase
    monkeypatch.setattr(
        plan, "measure_step_increase", lambda c, s, *a, **k: calls.append(s.name) or measure(c, s, *a, **k)
    )
    code, out, err = run_cli(
        "plan",
        "--model",
        tiny_model_dir("bert"),
        "--strategies",
        "full,gradual_unfreeze,lora",
        "--batch-size",
        "4",
        "--max-length",
        "8",
        "--json",
    )
    assert code == 0, err
    rows = {e["strategy"]: e for e in json.loads(out)["estimates"]}  # stdout: the JSON alone
    # gradual_unfreeze at its end trains what full trains, through the same forward pass
    assert calls == ["full", "lora"]
    assert rows["gradual_unfreeze"]["activations"] == rows["full"]["activations"] > 0
    lines = err.splitlines()
    assert lines[0].startswith("planning 3 strategies") and "2 measurements" in lines[0] and "roughly" in lines[0]
    assert "gradual_unfreeze shares full's" in lines[0]
    assert [line.split(":")[0] for line in lines[1:4]] == ["[1/3] full", "[2/3] gradual_unfreeze", "[3/3] lora"]


def test_measured_steps_stop_once_the_peak_settles() -> None:
    from peftkit.planner.measure import MAX_STEPS, _settled, step_lengths

    assert step_lengths(64)[0] == 64 and len(step_lengths(64)) == MAX_STEPS
    flat = [678, 702, 966, 966, 966, 966, 966]  # full on MiniLM: the peak is reached at step 3
    assert not any(_settled(flat[:n]) for n in range(1, len(flat))) and _settled(flat)
    creeping = [61, 90, 90, 99, 111, 123, 145, 166, 166, 173, 182]  # head_only's heap keeps growing
    assert not any(_settled(creeping[:n]) for n in range(1, len(creeping) + 1))


def test_plan_gives_a_row_for_peft_methods(run_cli, tiny_model_dir, monkeypatch) -> None:
    """``peft:`` methods are planned as the others, from a measured step that runs the strategy's
    hooks as a run does (AdaLoRA's ``extra_loss`` and ``after_optimizer_step``)."""
    from peftkit.strategies.peft_methods import AdaLoraMethod

    called: list[str] = []
    hook = AdaLoraMethod.after_optimizer_step
    monkeypatch.setattr(
        AdaLoraMethod, "after_optimizer_step", lambda self, *a: (called.append("step"), hook(self, *a))[1]
    )
    args = ["--batch-size", "8", "--max-length", "16", "--memory-budget", "4GiB", "--json"]
    code, out, err = run_cli(
        "plan", "--model", tiny_model_dir("bert"), "--strategies", "lora,peft:ia3,peft:adalora", *args
    )
    assert code == 0, err
    rows = {e["strategy"]: e for e in json.loads(out)["estimates"]}
    assert set(rows) == {"lora", "peft:ia3", "peft:adalora"}
    for e in rows.values():
        assert e["status"] == "ok" and e["total"] > 0 and e["max_batch_size"] > 8
    assert rows["peft:ia3"]["optimizer"] < rows["lora"]["optimizer"]  # IA3 trains a vector per layer
    assert called  # the measured steps ran AdaLoRA's hook


def test_applicability_of_a_method_built_from_the_weights(tiny_model_dir) -> None:
    """SHiRA draws its mask from the weights (``torch.nonzero``), which a weightless copy cannot
    answer: it is applicable to BERT (checked again on a one-layer copy with real weights), and its
    refusal on GPT-2's Conv1D layers still stands, in one line naming the method and the model."""
    check_applicable(tiny_model_dir("bert"), "sequence-classification", "peft:shira", {"r": 4})
    with pytest.raises(PeftkitError) as refused:
        check_applicable(tiny_model_dir("gpt2"), "sequence-classification", "peft:shira", {"r": 4})
    message = str(refused.value)
    assert "peft:shira" in message and "gpt2" in message and "\n" not in message


def test_a_method_built_from_the_weights_is_counted_by_extrapolation(tiny_model_dir) -> None:
    """SHiRA on a 3-layer BERT: counted on 1- and 2-layer copies and extrapolated, the plan's
    trainable and total parameters equal those of the method built on the real 3-layer model."""
    import torch
    from transformers import AutoModelForSequenceClassification

    config = load_config(tiny_model_dir("bert"))
    config.num_hidden_layers, config.num_labels = 3, 2
    settings = resolve_settings(
        PlanSettings(model=tiny_model_dir("bert"), strategies=["peft:shira"], batch_size=2, max_length=8)
    )
    est = plan_strategy(config, "peft:shira", settings, {"r": 4})
    assert est.status == "ok", est.error
    assert any("extrapolated to 3 layers" in note for note in est.notes)
    torch.manual_seed(0)
    strategy = get_strategy("peft:shira")
    strategy = strategy(options_from_dict(strategy, {"r": 4}))
    model = strategy.prepare(AutoModelForSequenceClassification.from_config(config), TASK)
    assert est.trainable_params == sum(p.numel() for p in strategy.trainable_parameters(model).values())
    assert est.total_params == sum(p.numel() for p in model.parameters())


def test_bench_predictor_keeps_the_fixed_part_of_the_activations_at_smaller_micro_batches(
    tiny_model_dir, monkeypatch
) -> None:
    """Activations are a fixed part (the optimizer step's temporaries, workspace) plus a part per
    example: a smaller micro-batch is predicted on the line through the plans at the effective batch
    and at 1, not by scaling the effective batch's figure down (which lost the fixed part)."""
    import peftkit.planner.plan as plan_module
    from peftkit.planner import Estimate, bench_predictor

    planned: list[int] = []

    def fake_plan(config, strategy, settings, options=None):
        planned.append(settings.batch_size)
        return Estimate(strategy=strategy, weights=1000, activations=100 + 10 * settings.batch_size)

    monkeypatch.setattr(plan_module, "plan_strategy", fake_plan)
    predict = bench_predictor(tiny_model_dir("bert"), 8, 16, 2, "cpu")
    assert predict("full", Levers(), 1) == 1000 + 110 and planned == [1]  # its own plan only
    assert predict("full", Levers(), 4) == 1000 + 140 and planned == [1, 8]
    assert predict("full", Levers(), 8) == 1000 + 180 and predict("full", Levers(), 16) == 1000 + 360
    assert planned == [1, 8]  # each (strategy, levers, batch) planned once


def test_the_largest_batch_under_a_budget_keeps_the_fixed_part_of_the_activations(tiny_model_dir, monkeypatch) -> None:
    """Under ``--memory-budget`` the activations are measured at the batch planned and at 1, and
    the largest batch read off the line through them: a fixed part (100 MiB here) is not divided
    among the examples (dividing it overstated the largest batch at small budgets)."""
    import peftkit.planner.plan as plan_module
    from peftkit.planner import PlanSettings, make_plan

    mib = 2**20
    measured: list[int] = []

    def fake_measure(config, strategy, task, settings, est):
        measured.append(settings.batch_size)
        est.activations, est.workspace = 100 * mib + 10 * mib * settings.batch_size, 0
        return "stand-in"

    monkeypatch.setattr(plan_module, "measure_activations", fake_measure)
    settings = PlanSettings(model=tiny_model_dir("bert"), strategies=["lora"], batch_size=8, max_length=16)
    (probe,) = make_plan(settings)
    weights_and_state = probe.total - probe.activations - probe.workspace
    budget = weights_and_state + 100 * mib + 10 * mib * 20 + 5 * mib  # room for 20 examples, not 21
    measured.clear()
    (est,) = make_plan(dataclasses.replace(settings, memory_budget=str(budget)))
    assert measured == [8, 1]
    assert est.activations_fixed == pytest.approx(100 * mib) and est.activations_per_example == pytest.approx(10 * mib)
    assert est.max_batch_size == 20  # through the origin, 22.5 MiB per example, it was 305 / 22.5 = 13


def test_set_plans_each_strategy_that_has_the_option_with_it(run_cli, tiny_model_dir) -> None:
    """``--set r=32``, ``--set dropout=0``: LoRA is planned at rank 32 (its trainable parameters are
    those of a LoRA of rank 32) and without dropout (fewer saved bytes: dropout keeps a copy of each
    adapted layer's input); full has neither option, and its row is as without them."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: plan measures on it")

    def plan(*args: str) -> dict:
        code, out, err = run_cli(
            "plan", "--model", tiny_model_dir("bert"), "--strategies", "lora,full", "--device", "cuda",
            "--batch-size", "4", "--max-length", "8", "--json", *args,
        )  # fmt: skip
        assert code == 0, err
        return {e["strategy"]: e for e in json.loads(out)["estimates"]} | {"settings": json.loads(out)["settings"]}

    default, ranked, undropped = plan(), plan("--set", "r=32"), plan("--set", "dropout=0")
    assert ranked["settings"]["strategy_options"] == {"r": 32}
    for rows, options in ((default, {}), (ranked, {"r": 32})):
        _, trainable, _ = _meta_prepared(tiny_model_dir("bert"), "lora", options)
        assert rows["lora"]["trainable_params"] == sum(p.numel() for p in trainable.values())
    assert ranked["lora"]["trainable_params"] > default["lora"]["trainable_params"]
    assert undropped["lora"]["activations"] < default["lora"]["activations"]
    for rows in (ranked, undropped):
        assert rows["full"] == default["full"]
