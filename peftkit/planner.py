"""``peftkit plan``: each strategy's peak training memory, predicted without training.

The peak is split the way it is spent:

- **weights**: every parameter at the precision it is stored in: 4 bytes, 2 for frozen weights
  under bf16/fp16, about 0.52 bytes for a 4-bit NF4 weight with double quantization (0.5 for the
  codes, one 8-bit block scale per 64 weights, one fp32 scale per 256 blocks), about 1 byte for an
  8-bit weight plus an fp32 scale per row;
- **gradients**: 4 bytes per trainable parameter (trainable parameters stay in fp32);
- **optimizer state**: AdamW's two moments, 8 bytes per trainable parameter, or about 2 for the
  8-bit AdamW (tensors under 4,096 elements keep 32-bit state, as bitsandbytes does);
- **activations**: what the forward and backward passes hold beyond the parameters. They depend on
  the strategy (a frozen backbone below the lowest trainable parameter keeps nothing for backward,
  prefix tuning needs the whole stack), the attention path, the precision and checkpointing, so they
  are *measured*, not guessed: the model is built from its config with random weights, the strategy
  prepares it exactly as a run does, and up to twelve training steps run on the device at the planned
  batch (the first at the full length, the rest at seeded random lengths, as a run's padded batches
  vary), stopping once four steps in a row moved the peak by under 1%. The peak increase over the
  prepared model, minus the gradients and optimizer state, is the activations. Strategies whose
  prepared models have the same parameters, trainable ones and forward pass (``full`` and
  ``gradual_unfreeze``) are measured once. Models up to 12 blocks and 150M parameters are measured whole (seconds);
  bigger ones
  at depth 2, and each further block adds its share: on a GPU depth 3's figure minus depth 2's, on
  CPU the bytes autograd saves for a block (there the resident set of depth 3 against depth 2 moves
  with the heap as much as with a block). With
  ``--device cuda`` on a machine without a GPU, activations are instead the bytes of every tensor
  autograd saves in one forward pass (``torch.autograd.graph.saved_tensors_hooks``) plus one block's
  worth of workspace (``workspace``).
- **runtime** (CPU only): the resident memory of a process that has imported torch, transformers
  and peft, measured in this process before any model exists, since on CPU the figure compared is
  the whole process's.

The whole model is built only on the meta device (no memory) unless it is small, so planning a 1B
model takes the memory of a 3-block one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .config import Levers, check_positive, flat_dict
from .durations import format_rough, time_left
from .errors import PeftkitError, first_line, raising_library, set_context
from .memory import format_size, parse_size
from .settings import setting

_NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
# Models up to this size are measured whole (seconds on a CPU); bigger ones at depth 2 and 3.
DIRECT_MAX_DEPTH = 12
DIRECT_MAX_PARAMS = 150_000_000
_BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer state below this many elements
# Measured training steps: at most MAX_STEPS, fewer once SETTLE_STEPS steps in a row raised the peak
# by under SETTLE_TOLERANCE of it (on MiniLM: full, lora and prefix stop after 7 steps, losing at most
# 1 MiB of a 580 MiB peak; a peak still creeping up keeps all 12).
MAX_STEPS = 12
SETTLE_STEPS = 4
SETTLE_TOLERANCE = 0.01


@dataclass
class PlanSettings:
    """What a plan is for: the same levers a run takes. ``None`` in ``task``, ``model`` and
    ``max_length`` means the task's default, in ``device`` this machine's (cuda if it has a GPU);
    ``resolve_settings`` fills them in."""

    strategies: list[str] = setting("plan:strategies")
    model: str | None = setting("model")
    task: str | None = setting("task")
    batch_size: int = setting("plan:batch_size")
    max_length: int | None = setting("max_length")
    num_labels: int = setting("num_labels")
    levers: Levers = field(default_factory=Levers)
    memory_budget: str | None = setting("plan:memory_budget")
    device: str | None = setting("device")
    loss_positions: int | None = setting("loss_tokens")
    processes: int = setting("processes")
    fsdp: bool = setting("fsdp")

    def validate(self) -> None:
        """Raise ``PeftkitError`` for settings no plan could use."""
        check_positive(self, ("batch_size", "max_length", "loss_positions", "processes"))
        if self.fsdp and self.processes < 2:
            raise PeftkitError(
                f"--fsdp shards over several processes; give --processes N with N of 2 or more (got {self.processes})"
            )
        if self.fsdp and self.levers.quantize:
            raise PeftkitError(
                f"--fsdp with --quantize {self.levers.quantize} is not planned: sharding "
                "bitsandbytes weights is untested here; plan --fsdp without --quantize, or "
                "--quantize with data parallel (no --fsdp)"
            )
        if self.num_labels < 2:
            raise PeftkitError(f"num_labels must be at least 2, got {self.num_labels}")
        if self.memory_budget:
            parse_size(self.memory_budget)

    def to_dict(self) -> dict[str, Any]:
        """The settings as plain data, levers flat (``peftkit plan --json`` prints them)."""
        return flat_dict(self)


def resolve_settings(settings: PlanSettings) -> PlanSettings:
    """``settings`` checked, with the task's defaults and the device filled in."""
    from .tasks import with_task_defaults

    settings.validate()
    _, filled = with_task_defaults(settings)
    if settings.device is None:
        import torch

        filled["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(settings, **filled)


@dataclass
class Estimate:
    """One strategy's predicted peak, by component, in bytes."""

    strategy: str
    status: str = "ok"
    error: str | None = None
    trainable_params: int = 0
    total_params: int = 0
    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    workspace: int = 0
    communication: int = 0
    """What several processes add: DDP's gradient buckets, or the parameters FSDP gathers at once."""
    runtime: int = 0
    activations_per_example: float = 0.0
    max_batch_size: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            self.weights
            + self.gradients
            + self.optimizer
            + self.activations
            + self.workspace
            + self.communication
            + self.runtime
        )

    def as_dict(self) -> dict[str, Any]:
        d = dict(vars(self))
        d["total"] = self.total
        return d


# -- parameters: weights, gradients, optimizer state ----------------------------------------


def _quantized_weight_ids(model: Any, skip: list[str]) -> dict[int, tuple[int, int]]:
    """id(weight) -> (numel, out_features) for every linear weight bitsandbytes would quantize."""
    from torch import nn

    out = {}
    for name, module in model.named_modules():
        top = name.split(".", 1)[0]
        if isinstance(module, nn.Linear) and top not in skip and name.rsplit(".", 1)[-1] not in skip:
            out[id(module.weight)] = (module.weight.numel(), module.weight.shape[0])
    return out


def parameter_memory(
    model: Any, trainable: dict[str, Any], settings: PlanSettings, skip: list[str]
) -> tuple[int, int, int, list[str]]:
    """Bytes of weights, gradients and optimizer state of a prepared (meta-device) model."""
    from .levers import half_dtype

    half = half_dtype(settings.levers.precision)
    trainable_ids = {id(p) for p in trainable.values()}
    quantized = _quantized_weight_ids(model, skip) if settings.levers.quantize else {}
    weights = grads = opt = 0
    notes: list[str] = []
    seen: set[int] = set()
    for p in model.parameters():  # parameters() yields each shared (tied) tensor once
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if id(p) in trainable_ids:
            weights += 4 * n
            grads += 4 * n
            if settings.levers.optimizer == "adamw" or n < _BNB_MIN_8BIT_SIZE:
                opt += 8 * n
            else:  # two 8-bit moments plus an fp32 scale per 256-element block each
                opt += 2 * n + 2 * 4 * math.ceil(n / 256)
        elif id(p) in quantized:
            numel, rows = quantized[id(p)]
            weights += int(numel * _NF4_BYTES) if settings.levers.quantize == "4bit" else numel + 4 * rows
        elif half is not None and p.is_floating_point():
            weights += 2 * n
        else:
            weights += p.element_size() * n
    if settings.levers.optimizer == "paged_adamw8bit" and settings.device == "cuda":
        opt = 0  # the allocator never sees it, so neither does its peak
        notes.append("paged optimizer state lives in CUDA managed memory, outside the allocator's count")
    return weights, grads, opt, notes


def per_process_memory(
    est: Estimate, model: Any, trainable: dict[str, Any], settings: PlanSettings, skip: list[str]
) -> None:
    """Turn ``est``'s weights, gradients and optimizer state (one process's whole model) into one
    device's share of ``settings.processes``, and set what the processes add (``communication``).

    - Data parallel (DDP): every process holds everything; DistributedDataParallel also keeps a
      bucket copy of every gradient to all-reduce (``gradient_as_bucket_view`` is off in accelerate
      and here), so ``communication`` is the gradients again.
    - FSDP2 (``fully_shard`` on each transformer block, then the root): weights, gradients and
      optimizer state are split evenly (each parameter's first dimension over the processes). To
      compute, FSDP gathers whole parameters: the root's own (embeddings, head) for the pass, and
      a block at a time, the next one prefetched, with a block's gradients before they are
      reduce-scattered; ``communication`` is that: the root's weights, two of the largest block's
      weights and its gradients. Activations are not divided: each device runs its own micro-batch.
    """
    n = settings.processes
    if n == 1:
        return
    if not settings.fsdp:
        est.communication = est.gradients
        est.notes.append(
            f"data parallel over {n} processes: each holds the whole model, plus a bucket copy of "
            "its gradients for the all-reduce"
        )
        return
    from .structure import transformer_blocks

    found = transformer_blocks(model)
    blocks = found[1] if found else []
    block_weights, block_grads = 0, 0
    in_blocks = 0
    for block in blocks:
        ids = {id(p) for p in block.parameters()}
        weights, grads, _, _ = parameter_memory(
            block, {k: p for k, p in trainable.items() if id(p) in ids}, settings, skip
        )
        in_blocks += weights
        block_weights, block_grads = max(block_weights, weights), max(block_grads, grads)
    root = est.weights - in_blocks
    est.weights, est.gradients, est.optimizer = (math.ceil(x / n) for x in (est.weights, est.gradients, est.optimizer))
    est.communication = root + 2 * block_weights + block_grads
    est.notes.append(
        f"FSDP over {n} processes: weights, gradients and optimizer state split {n} ways; "
        f"communication: the parameters gathered at once (the root's own, two blocks) and one "
        f"block's gradients"
        + ("" if blocks else "; no transformer blocks found: the whole model is one unit, gathered whole")
    )


# -- activations: measured by training steps on random-weight copies -----------------------


def _with_depth(config: Any, depth: int) -> Any:
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = depth  # attribute_map routes this to n_layer / n_layers where needed
    return cfg


def saved_activation_bytes(model: Any, forward: Any, precision: str) -> int:
    """Bytes of the tensors autograd saves during ``forward()`` (parameters excluded: they are
    counted as weights), each storage once."""
    import torch

    from .levers import half_dtype

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
    (``Task.step_loss``, the chunked loss included)."""
    step_loss = _task(task).step_loss(strategy, model, loss)

    def forward() -> Any:
        return step_loss(model, batch)

    return forward


def _task(spec: Any) -> Any:
    from .tasks import get_task

    return get_task(spec.kind)


def _reduced_model(
    config: Any, strategy: Any, task: Any, settings: PlanSettings, depth: int, device: str
) -> tuple[Any, dict[str, Any]]:
    """The model at ``depth`` blocks (random weights), prepared as a run prepares it, with every
    parameter the strategy ever trains set trainable (gradual unfreezing at its end)."""
    import torch

    from .kernels import apply_kernels
    from .levers import enable_gradient_checkpointing, store_frozen_in_half
    from .structure import head_module_names

    torch.manual_seed(0)
    model = _task(task).model_from_config(_with_depth(config, depth))
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

    from .levers import half_dtype, make_optimizer
    from .memory import MemoryMeter, release_free_memory
    from .strategies.base import ParamGroup
    from .train import torch_param_groups

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
    import random

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

        from .memory import MemoryMeter

        _RUNTIME.append(MemoryMeter("cpu").current())
    return _RUNTIME[0]


# -- the plan -------------------------------------------------------------------------------


def _depth(config: Any) -> int:
    depth = getattr(config, "num_hidden_layers", None)
    if not isinstance(depth, int) or depth < 1:
        raise PeftkitError(
            f"cannot plan model type {getattr(config, 'model_type', '?')!r}: its config "
            "names no number of layers (num_hidden_layers)"
        )
    return depth


def _measurement(config: Any, settings: PlanSettings, total_params: int) -> str:
    """How activations are measured: "whole" (training steps of the whole model), "extrapolated"
    (steps at depth 2 and 3) or "saved" (no GPU here for a GPU plan: the tensors autograd saves)."""
    import torch

    if not (settings.device == "cpu" or torch.cuda.is_available()):
        return "saved"
    return "whole" if _depth(config) <= DIRECT_MAX_DEPTH and total_params <= DIRECT_MAX_PARAMS else "extrapolated"


def _measure_activations(config: Any, strategy: Any, task: Any, settings: PlanSettings, est: Estimate) -> str:
    """Set ``est``'s activations (and workspace): training steps measured on the device where it
    can be (the whole model if small, else depth 2 and 3 extrapolated), else the tensors autograd
    saves, measured on the CPU. Returns the note saying which."""
    import torch

    torch.set_grad_enabled(True)
    depth = _depth(config)
    how = _measurement(config, settings, est.total_params)
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


@dataclass
class _Job:
    """One strategy between its arithmetic (weights, gradients, optimizer state) and its measurement."""

    est: Estimate
    strategy: Any
    task: Any = None
    key: Any = None
    """What the activations depend on (``structure_key``): equal keys, equal activations."""


@contextlib.contextmanager
def _row_errors(est: Estimate) -> Any:
    """A strategy that cannot be planned is a row, not a crash: refused (``PeftkitError``: it
    cannot be used so) or failed (anything else, naming the library that raised)."""
    try:
        yield
    except PeftkitError as exc:
        est.status, est.error = "refused", str(exc)
    except Exception as exc:  # noqa: BLE001
        library = raising_library(exc)  # the row names where it failed: "peft raised ValueError: ..."
        est.status, est.error = (
            "failed",
            f"{library + ' raised ' if library else ''}{type(exc).__name__}: {first_line(exc)}",
        )


def structure_key(strategy: Any, prepared: Any, trainable: dict[str, Any]) -> tuple[Any, ...]:
    """What a strategy's activations depend on, read from its prepared (meta) model: every
    parameter's name, shape, dtype and whether it trains, every module's type and hooks, and the
    strategy's forward (with its options, where it overrides the shared one). Two strategies with
    equal keys run the same computation (``full`` and ``gradual_unfreeze`` at its end): measured once."""
    from .strategies.base import Strategy

    forward = type(strategy).forward
    options = None if forward is Strategy.forward else repr(strategy.options)
    trains = {id(p) for p in trainable.values()}
    params = tuple((n, tuple(p.shape), str(p.dtype), id(p) in trains) for n, p in prepared.named_parameters())
    modules = tuple(
        (
            type(m).__qualname__,
            tuple(
                getattr(h, "__qualname__", type(h).__qualname__)
                for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values())
            ),
        )
        for m in prepared.modules()
    )
    return forward, options, params, modules


def _arithmetic(
    config: Any, strategy_name: str, settings: PlanSettings, strategy_options: dict[str, Any] | None = None
) -> _Job:
    """Weights, gradients and optimizer state of one strategy, from the model built on the meta
    device (no memory, no measuring), and what its activations will need."""
    from accelerate import init_empty_weights

    from .levers import check_levers
    from .registry import get_strategy
    from .strategies.base import options_from_dict
    from .structure import head_module_names
    from .tasks import get_task

    cls = get_strategy(strategy_name)
    job = _Job(Estimate(strategy=cls.name), cls(options_from_dict(cls, strategy_options or {})))
    est, task_type = job.est, get_task(settings.task)
    with _row_errors(est):
        check_levers(settings.levers, job.strategy, on_cuda=settings.device == "cuda", task=task_type)
        with init_empty_weights(include_buffers=False):
            full = task_type.model_from_config(config)
        job.task = task_type.plan_spec(full, settings.num_labels)
        skip = head_module_names(full)
        with init_empty_weights(include_buffers=False):
            prepared = job.strategy.prepare(full, job.task)
        trainable = job.strategy.trainable_parameters(prepared)
        if not trainable:  # (BitFit on a model without biases) as a run would refuse it
            raise PeftkitError(f"strategy {cls.name!r} left no parameter to train on this model")
        est.trainable_params = sum(p.numel() for p in trainable.values())
        est.total_params = sum(p.numel() for p in prepared.parameters())
        est.weights, est.gradients, est.optimizer, est.notes = parameter_memory(prepared, trainable, settings, skip)
        per_process_memory(est, prepared, trainable, settings, skip)
        job.key = structure_key(job.strategy, prepared, trainable)
    return job


def _measure(config: Any, job: _Job, settings: PlanSettings, measured: dict[Any, tuple[Estimate, str]]) -> None:
    """Fill in ``job``'s activations: measured, or copied from an earlier strategy in ``measured``
    with the same structure key (which this adds to)."""
    est = job.est
    if est.status != "ok":
        return
    with _row_errors(est):
        if job.key in measured:
            source, note = measured[job.key]
            est.activations, est.workspace = source.activations, source.workspace
            est.notes += [
                note,
                f"activations as measured for {source.strategy} (the same parameters, trainable ones and forward pass)",
            ]
        else:
            note = _measure_activations(config, job.strategy, job.task, settings, est)
            est.notes.append(note)
            measured[job.key] = (est, note)
    if est.status == "ok":
        _fit_budget(est, settings)


def plan_strategy(
    config: Any, strategy_name: str, settings: PlanSettings, strategy_options: dict[str, Any] | None = None
) -> Estimate:
    """Predict one strategy's peak training memory for ``config`` (a transformers config)."""
    if settings.device == "cpu":
        runtime_bytes()  # before any model exists in this process
    job = _arithmetic(config, strategy_name, settings, strategy_options)
    _measure(config, job, settings, {})
    return job.est


def _fit_budget(est: Estimate, settings: PlanSettings) -> None:
    """Per-example activations, the CPU runtime and, under a budget, the largest batch that fits."""
    est.activations_per_example = (est.activations + est.workspace) / settings.batch_size
    if settings.device == "cpu":
        est.runtime = runtime_bytes()
    if settings.memory_budget:
        budget = parse_size(settings.memory_budget)
        fixed = est.total - est.activations - est.workspace
        room = budget - fixed
        est.max_batch_size = max(0, int(room // est.activations_per_example)) if est.activations_per_example else None
        if est.max_batch_size == 0:
            est.notes.append(
                f"the weights, gradients and optimizer state alone ({format_size(fixed)}) "
                f"leave no room in {format_size(budget)}"
            )


def load_config(model: str) -> Any:
    """The model's transformers config (hub id, local directory or short name), nothing else."""
    from transformers import AutoConfig

    from .models import resolve_model_source

    source = resolve_model_source(model)
    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:  # noqa: BLE001
        raise PeftkitError(f"cannot read the config of model {model!r}: {first_line(exc)}") from None
    set_context(model_type=getattr(config, "model_type", None))
    return config


def check_applicable(model: str, task: str, strategy_name: str, strategy_options: dict[str, Any] | None = None) -> None:
    """Raise ``PeftkitError`` if the strategy cannot train this model for this task (prefix tuning
    on a ViT, BitFit on a model without biases), found in a second on a weightless copy."""
    from accelerate import init_empty_weights

    from .registry import get_strategy
    from .strategies.base import options_from_dict
    from .tasks import get_task

    cls = get_strategy(strategy_name)
    strategy = cls(options_from_dict(cls, strategy_options or {}))
    task_type = get_task(task)
    with init_empty_weights(include_buffers=False):
        full = task_type.model_from_config(load_config(model))
        prepared = strategy.prepare(full, task_type.plan_spec(full, 2))
    if not strategy.trainable_parameters(prepared):
        raise PeftkitError(f"strategy {strategy_name!r} left no parameter to train on this model")


def make_plan(settings: PlanSettings, echo: Callable[[str], None] | None = None) -> list[Estimate]:
    """An ``Estimate`` per strategy in ``settings`` (task defaults and device filled in first).
    ``echo`` gets one line saying what will be measured and roughly how long it takes, then one
    line per strategy as it is done."""
    settings = resolve_settings(settings)
    config = load_config(settings.model)
    say = echo or (lambda _line: None)
    if settings.device == "cpu":
        runtime_bytes()  # before any model exists in this process
    jobs = [_arithmetic(config, name, settings) for name in settings.strategies]
    say(_announce(config, settings, jobs))
    measured: dict[Any, tuple[Estimate, str]] = {}
    started, done = time.monotonic(), 0
    for i, job in enumerate(jobs, 1):
        fresh = job.est.status == "ok" and job.key not in measured
        t = time.monotonic()
        _measure(config, job, settings, measured)
        done += fresh
        left = _distinct(jobs[i:], measured)
        say(
            _progress(
                i,
                len(jobs),
                job.est,
                time.monotonic() - t if fresh else None,
                time_left(time.monotonic() - started, done, left) if done and left else None,
            )
        )
    return [job.est for job in jobs]


def _distinct(jobs: list[_Job], measured: dict[Any, Any] | None = None) -> int:
    """How many measurements ``jobs`` still need (one per structure key not in ``measured``)."""
    return len({job.key for job in jobs if job.est.status == "ok"} - set(measured or ()))


def _announce(config: Any, settings: PlanSettings, jobs: list[_Job]) -> str:
    """The line said before measuring: what, for how many strategies, roughly how long."""
    ok = [job for job in jobs if job.est.status == "ok"]
    what = (
        f"planning {len(jobs)} strateg{'y' if len(jobs) == 1 else 'ies'} for {settings.model} on "
        f"{settings.device}: weights, gradients and optimizer state by arithmetic"
    )
    count = _distinct(ok)
    if not count:
        return what + "; nothing to measure"
    how = _measurement(config, settings, max(job.est.total_params for job in ok))
    length = f" x {settings.max_length} tokens" if settings.max_length else ""
    shared = [
        f"{job.est.strategy} shares {first.est.strategy}'s"
        for n, job in enumerate(ok)
        for first in ok[:n]
        if first.key == job.key
    ][:3]
    if how == "saved":
        method = f"the tensors autograd saves in one forward pass at depth 1 and 2, batch {settings.batch_size}{length}"
    else:
        where = (
            "the whole model"
            if how == "whole"
            else "depth 2, a block's saved tensors"
            if settings.device == "cpu"
            else "depth 2 and 3"
        )
        method = (
            f"up to {MAX_STEPS} training steps of a random-weight copy ({where}, batch "
            f"{settings.batch_size}{length}) on {settings.device}"
        )
    return (
        f"{what}; activations by {method}, {count} measurement{'s' if count > 1 else ''}"
        f"{' (' + ', '.join(shared) + ')' if shared else ''}; "
        f"roughly {format_rough(_rough_seconds(config, settings, how) * count)}"
    )


def _progress(i: int, n: int, est: Estimate, seconds: float | None, left: float | None) -> str:
    """One strategy's progress line: its status, how long it took, about how long is left."""
    if est.status != "ok":
        state = est.status
    elif seconds is None:
        state = "done (activations shared)"
    else:
        state = f"measured in {format_rough(seconds)}"
    return f"[{i}/{n}] {est.strategy}: {state}" + (f", about {format_rough(left)} left" if left else "")


# A measurement's time over the time the matmuls of all MAX_STEPS steps take at the calibrated rate:
# attention, dropout, norms and the optimizer add to it, stopping once settled (usually after 7 steps)
# takes from it. Fitted on MiniLM, all strategies, an idle 2-core Xeon (AVX-512): 6 measurements in
# 36 s, where a factor of 0.6 (fitted while the machine was busy, so its matmul rate was low) said 13 s.
_TIME_FACTOR = 1.6


def _rough_seconds(config: Any, settings: PlanSettings, how: str) -> float:
    """A rough time for one measurement: 6 FLOPs per linear weight per position (forward and
    backward) over every measured step's positions, at this machine's matmul rate now."""
    from accelerate import init_empty_weights
    from torch import nn

    from .tasks import get_task

    if how == "saved":
        return 2.0
    with init_empty_weights(include_buffers=False):
        model = get_task(settings.task).model_from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if how == "extrapolated":  # depth 2 and 3 instead of all of it
        linear = linear * 5 / _depth(config)
    positions = sum(step_lengths(settings.max_length)) or MAX_STEPS * 197  # (images: ViT-base's patches)
    flops = 6 * linear * settings.batch_size * positions
    return _TIME_FACTOR * flops / _matmul_rate(settings.device)


def _matmul_rate(device: str) -> float:
    """FLOP/s of a mid-sized fp32 matmul on ``device``: the best of five bursts of 20 ms (the
    machine's own speed; on a busy machine the per-strategy lines correct the estimate)."""
    import torch

    a, b = torch.randn(1024, 384, device=device), torch.randn(384, 1536, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start, runs = time.perf_counter(), 0
        while time.perf_counter() - start < 0.02:
            a @ b
            runs += 1
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * 1024 * 384 * 1536 * runs / (time.perf_counter() - start))
    return best


def bench_predictor(
    model: str,
    batch_size: int,
    max_length: int | None,
    num_labels: int,
    device: str,
    task: str = "sequence-classification",
    loss_positions: int | None = None,
) -> Any:
    """For ``peftkit bench``: predicted peak bytes of (strategy, levers, micro-batch).

    Each (strategy, levers) is planned once at the effective batch; other micro-batches scale the
    activations linearly (they are per example), the rest does not depend on the batch.
    """
    config = load_config(model)
    cache: dict[Any, Estimate | None] = {}

    def predict(strategy: str, levers: Levers, micro_batch: int) -> int | None:
        key = (strategy, levers)
        if key not in cache:
            settings = PlanSettings(
                model=model,
                strategies=[strategy],
                task=task,
                batch_size=batch_size,
                max_length=max_length,
                num_labels=num_labels,
                device=device,
                loss_positions=loss_positions,
                levers=levers,
            )
            est = plan_strategy(config, strategy, settings)
            if device == "cuda":
                # the workers need the card: give back what planning cached (the context stays)
                import torch

                torch.cuda.empty_cache()
            cache[key] = est if est.status == "ok" else None
        est = cache[key]
        if est is None:
            return None
        fixed = est.total - est.activations - est.workspace
        return int(fixed + est.activations_per_example * micro_batch)

    return predict
