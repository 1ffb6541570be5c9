"""Activations: measured by training steps on random-weight copies of the model, prepared as a
run prepares them (on the device where it can be, else the tensors autograd saves, on the CPU).
How and why is in ``peftkit.planner``'s docstring."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
from typing import Any

from ..errors import PeftkitError
from ..kernels import apply_kernels
from ..levers import enable_gradient_checkpointing, half_dtype, make_optimizer, store_frozen_in_half
from ..loop import torch_param_groups
from ..memory import MemoryMeter, release_free_memory
from ..strategies.base import ParamGroup
from ..structure import head_module_names
from ..tasks import get_task
from .estimate import Estimate, PlanSettings

# Models up to this size are measured whole (seconds on a CPU); bigger ones at depth 2 and 3.
DIRECT_MAX_DEPTH = 12
DIRECT_MAX_PARAMS = 150_000_000
# Measured training steps: at most MAX_STEPS, fewer once SETTLE_STEPS steps in a row raised the peak
# by under SETTLE_TOLERANCE of it (on MiniLM: full, lora and prefix stop after 7 steps, losing at most
# 1 MiB of a 580 MiB peak; a peak still creeping up keeps all 12).
MAX_STEPS = 12
SETTLE_STEPS = 4
# The run length the measured steps tell ``Strategy.after_optimizer_step``: the planner does not know
# the run's, and its steps are the first of a run much longer than they are (AdaLoRA's schedule then
# keeps its starting budget, as a run's first steps do)
NOMINAL_RUN_STEPS = 10_000
SETTLE_TOLERANCE = 0.01


def with_depth(config: Any, depth: int) -> Any:
    """A copy of a transformers ``config`` with ``depth`` layers (the rest unchanged)."""
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = depth  # attribute_map routes this to n_layer / n_layers where needed
    return cfg


def saved_activation_bytes(model: Any, forward: Any, precision: str) -> int:
    """Bytes of the tensors autograd saves during ``forward()`` (parameters excluded: they are
    counted as weights), each storage once."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    half = half_dtype(precision)
    autocast = torch.autocast("cpu", dtype=half) if half is not None else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        out = forward()
    del out
    return sum(saved.values())


def _loss_of(strategy: Any, model: Any, batch: dict[str, Any], task: Any, loss: str | None) -> Any:
    """A no-argument function computing the training loss of ``batch``: what a run's step computes
    (``Task.step_loss``, the chunked loss included, plus the strategy's ``extra_loss``, whose
    graph AdaLoRA's orthogonality penalty adds to)."""
    step_loss = _task(task).step_loss(strategy, model, loss)

    def forward() -> Any:
        value = step_loss(model, batch)
        extra = strategy.extra_loss(model)
        return value if extra is None else value + extra

    return forward


def _task(spec: Any) -> Any:
    return get_task(spec.kind)


def _reduced_model(
    config: Any, strategy: Any, task: Any, settings: PlanSettings, depth: int, device: str
) -> tuple[Any, dict[str, Any]]:
    """The model at ``depth`` blocks (random weights), prepared as a run prepares it, with every
    parameter the strategy ever trains set trainable (gradual unfreezing at its end)."""
    import torch

    torch.manual_seed(0)
    model = _task(task).model_from_config(with_depth(config, depth))
    skip = head_module_names(model)  # (named before prepare, as for the weights' arithmetic)
    if settings.levers.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    apply_kernels(model, settings.levers.kernels, device == "cuda")
    # moved after prepare, as a run's accelerator does: modules a strategy adds are built on the CPU
    model = strategy.prepare(model, task).to(device)
    trainable = strategy.trainable_parameters(model)
    for p in trainable.values():
        p.requires_grad_(True)
    store_frozen_in_half(model, trainable, settings.levers.precision)
    if settings.levers.quantize == "8bit":
        keep_inputs_as_int8_matmul(model, trainable, skip)
    model.train()
    return model, trainable


def keep_inputs_as_int8_matmul(model: Any, trainable: dict[str, Any], skip: list[str]) -> int:
    """Make every frozen linear that bitsandbytes would quantize to 8 bits keep its input for the
    backward pass, as bitsandbytes' 8-bit matmul does; returns how many linears changed.

    The plan measures an unquantized copy, and a frozen torch linear keeps nothing for backward but
    its weight, while ``MatMul8bitLt`` keeps its input whenever that input needs a gradient
    (bitsandbytes 0.50 ``autograd/_functions.py``; the 4-bit matmul keeps no input). On the GPU
    suite's 0.61B Llama (LoRA, batch 16 x 512) the plan without this was 33% under the 8-bit run's
    peak: the inputs of o_proj, the MLP and down_proj of every block are what the 8-bit base adds.
    """
    from torch import nn

    keep = {id(p) for p in trainable.values()}
    changed = 0
    for name, module in model.named_modules():
        top, last = name.split(".", 1)[0], name.rsplit(".", 1)[-1]
        if isinstance(module, nn.Linear) and top not in skip and last not in skip and id(module.weight) not in keep:
            module.forward = _KeepsInputLinear(module)
            changed += 1
    return changed


class _KeepsInputLinear:
    """``module.forward`` replaced by a linear that saves its input for backward (see
    ``keep_inputs_as_int8_matmul``)."""

    def __init__(self, module: Any) -> None:
        self.module = module

    def __call__(self, x: Any) -> Any:
        return _keeps_input_function().apply(x, self.module.weight, self.module.bias)


def _keeps_input_function() -> Any:
    import torch

    if not _KEEPS_INPUT:

        class KeepsInput(torch.autograd.Function):
            @staticmethod
            def forward(ctx: Any, x: Any, weight: Any, bias: Any) -> Any:
                ctx.save_for_backward(x, weight)  # the weight is a parameter: not counted twice
                return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

            @staticmethod
            def backward(ctx: Any, grad: Any) -> Any:
                x, weight = ctx.saved_tensors
                return (grad @ weight.to(grad.dtype)).to(x.dtype), None, None

        _KEEPS_INPUT.append(KeepsInput)
    return _KEEPS_INPUT[0]


_KEEPS_INPUT: list[Any] = []


def _batch(config: Any, settings: PlanSettings, device: str, task: Any) -> dict[str, Any]:
    # (packing is refused earlier for a task that cannot pack: only those take ``packed``)
    packed = {"packed": True} if settings.levers.packing else {}
    return _task(task).dummy_batch(
        config, settings.batch_size, settings.max_length, device, loss_positions=settings.loss_positions, **packed
    )


def measure_step_increase(
    config: Any, strategy: Any, task: Any, settings: PlanSettings, depth: int, device: str, steps: int = MAX_STEPS
) -> int:
    """Peak memory of up to ``steps`` training steps over the prepared model's, on ``device``, at
    the planned batch: gradients, optimizer state, activations, the backward pass's transients and
    the allocator's own overhead, all measured.

    The first step is at the full planned length (a run's length-grouped batches put the longest
    first); the others at seeded random lengths down to a quarter of it, because batches padded to
    their own longest example vary, and on CPU the heap fragments as they do: over the first dozen
    steps of a real run the resident peak keeps rising by a fifth or more over a single step's.
    The steps stop early once the peak has settled (``_settled``): on MiniLM the peak of ``full``,
    ``lora`` and ``prefix`` is reached by the third step, and the steps after it only cost time."""
    import torch

    # (no trim before the build: the previous measurement trimmed after itself, and the figure
    # compared starts after the trim below)
    model, trainable = _reduced_model(config, strategy, task, settings, depth, device)
    optimizer = make_optimizer(settings.levers.optimizer, torch_param_groups([ParamGroup(trainable)], 1e-5, 0.01), 1e-5)
    batches = [
        _batch(config, dataclasses.replace(settings, max_length=n or None), device, task)
        for n in step_lengths(settings.max_length, steps)
    ]
    meter = MemoryMeter(torch.device(device))
    half = half_dtype(settings.levers.precision)
    release_free_memory()
    if device == "cuda":
        torch.cuda.synchronize()
    meter.reset_peak()
    before = meter.current()
    peaks: list[int] = []
    for batch in batches:
        autocast = torch.autocast(device, dtype=half) if half is not None else contextlib.nullcontext()
        with autocast:
            loss = _loss_of(strategy, model, batch, task, settings.levers.loss)()
        loss.backward()
        optimizer.step()
        # as the loop does, while the gradients are there: what the method keeps per step (AdaLoRA's
        # importance scores) is measured too; the first steps of a long run, as these steps are
        strategy.after_optimizer_step(model, len(peaks) + 1, NOMINAL_RUN_STEPS)
        optimizer.zero_grad(set_to_none=True)
        peaks.append(meter.peak() - before)
        if _settled(peaks):
            break
    del model, optimizer, loss, batches
    release_free_memory()
    return max(0, peaks[-1])


def step_lengths(full: int | None, steps: int = MAX_STEPS) -> list[int]:
    """The measured steps' sequence lengths: ``full`` first, then seeded random lengths down to a
    quarter of it (0 for every step of a task without lengths, e.g. images)."""
    rng = random.Random(0)
    full = full or 0
    return [full] + [rng.randint(max(1, full // 4), full) if full else 0 for _ in range(steps - 1)]


def _settled(peaks: list[int]) -> bool:
    """True once the last ``SETTLE_STEPS`` steps raised the peak by under ``SETTLE_TOLERANCE`` of
    it: more steps would not move the figure (a peak still creeping up, as a frozen backbone's heap
    does on CPU, keeps all ``MAX_STEPS``)."""
    if len(peaks) <= SETTLE_STEPS:
        return False
    return peaks[-1] - peaks[-1 - SETTLE_STEPS] <= SETTLE_TOLERANCE * max(1, peaks[-1])


def measure_saved_activations(config: Any, strategy: Any, task: Any, settings: PlanSettings) -> tuple[int, int, int]:
    """(base, per block, block input) bytes that autograd saves, at the planned batch and length:
    the device-independent part of activations, for planning a GPU from a machine without one."""
    measured = {}
    for depth in (1, 2):
        model, _ = _reduced_model(config, strategy, task, settings, depth, "cpu")
        measured[depth] = saved_activation_bytes(
            model,
            _loss_of(strategy, model, _batch(config, settings, "cpu", task), task, settings.levers.loss),
            settings.levers.precision,
        )
        del model
    per_block = max(0, measured[2] - measured[1])
    base = max(0, measured[1] - per_block)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    block_input = settings.batch_size * (settings.max_length or 1) * hidden * 4
    return base, per_block, block_input


def _saved_block_bytes(config: Any, strategy: Any, task: Any, settings: PlanSettings) -> int:
    """What one more block adds to a training step: the tensors autograd saves for it, or under
    gradient checkpointing only its input (``measure_saved_activations``)."""
    _, per_block, block_input = measure_saved_activations(config, strategy, task, settings)
    return block_input if settings.levers.gradient_checkpointing and per_block else per_block


_RUNTIME: list[int] = []


def runtime_bytes() -> int:
    """Resident memory of this process with torch, transformers and peft imported (the CPU runtime),
    measured once, before any model is built here."""
    if not _RUNTIME:
        import peft  # noqa: F401 - imported for its memory, as a run imports it
        import transformers  # noqa: F401

        _RUNTIME.append(MemoryMeter("cpu").current())
    return _RUNTIME[0]


def model_depth(config: Any) -> int:
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        raise PeftkitError(
            f"cannot plan model type {getattr(config, 'model_type', '?')!r}: its config "
            "names no number of layers (num_hidden_layers)"
        )
    return depth


def measurement_method(config: Any, settings: PlanSettings, total_params: int) -> str:
    """How activations are measured: "whole" (training steps of the whole model), "extrapolated"
    (steps at depth 2 and 3) or "saved" (no GPU here for a GPU plan: the tensors autograd saves)."""
    import torch

    if not (settings.device == "cpu" or torch.cuda.is_available()):
        return "saved"
    return "whole" if model_depth(config) <= DIRECT_MAX_DEPTH and total_params <= DIRECT_MAX_PARAMS else "extrapolated"


def measure_activations(config: Any, strategy: Any, task: Any, settings: PlanSettings, est: Estimate) -> str:
    """Set ``est``'s activations (and workspace): training steps measured on the device where it
    can be (the whole model if small, else depth 2 and 3 extrapolated), else the tensors autograd
    saves, measured on the CPU. Returns the note saying which."""
    import torch

    torch.set_grad_enabled(True)
    depth = model_depth(config)
    how = measurement_method(config, settings, est.total_params)
    if how == "whole":
        # small enough to measure whole: the steps run on the full-depth model (random weights)
        increase = measure_step_increase(config, strategy, task, settings, depth, settings.device)
        est.activations = max(0, increase - est.gradients - est.optimizer)
        return f"activations measured: training steps of the whole model (random weights) on {settings.device}"
    if how == "extrapolated":
        # too big to build whole: steps at depth 2 and 3, the difference is one block's share.
        # (Not 1 and 2: the first block's figure carries one-off workspace that hides the slope.)
        two = measure_step_increase(config, strategy, task, settings, 2, settings.device)
        if settings.device == "cpu":
            # On CPU the resident set of depth 2 against depth 3 differs by heap noise as much as by
            # one block (issue 30: SmolLM2's 30 blocks extrapolated to 2.8 GiB where 4.7 was measured):
            # the slope is instead the bytes autograd saves per block, the same every time
            slope = _saved_block_bytes(config, strategy, task, settings)
            increase = two + (depth - 2) * slope
            est.activations = max(0, increase - est.gradients - est.optimizer)
            return (
                f"activations measured: training steps at depth 2 on cpu, and each further block's "
                f"saved tensors, for {depth} blocks"
            )
        three = measure_step_increase(config, strategy, task, settings, 3, settings.device)
        increase = two + (depth - 2) * max(0, three - two)
        est.activations = max(0, increase - est.gradients - est.optimizer)
        return (
            f"activations measured: training steps at depth 2 and 3 on {settings.device}, "
            f"extrapolated to {depth} blocks"
        )
    base, per_block, block_input = measure_saved_activations(config, strategy, task, settings)
    if settings.levers.gradient_checkpointing and per_block:
        # each block keeps only its input; one block is rebuilt whole during its backward pass
        est.activations = base + depth * block_input + per_block
    else:
        est.activations = base + depth * per_block
    est.workspace = per_block
    return (
        "no GPU here: activations are the tensors autograd saves (measured on CPU), "
        "plus one block's worth of backward workspace"
    )
