"""The memory and speed levers: quantized bases, 8-bit optimizers, gradient checkpointing, mixed
precision, the chunked loss, packing.

Each lever is a field of ``config.Levers`` (``quantize``, ``optimizer``, ``gradient_checkpointing``,
``precision``), embedded in the run, bench and plan configs, so available alike in ``peftkit run``,
YAML configs, ``peftkit bench`` and ``peftkit plan``. This module checks a combination before anything
loads, and applies the levers in
the order a run needs them: quantization when the base model loads, gradient checkpointing on the
loaded base, half-precision storage of the frozen weights once the strategy has said which
parameters train, the optimizer last.

Which strategies can train on a quantized base is a property of each strategy
(``Strategy.supports_quantized_base``): a strategy that updates the base weights themselves (a full
fine-tune) cannot, since 4-bit and 8-bit weights have no gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import registry
from .config import KERNELS, LOSSES, OPTIMIZERS, PRECISIONS, QUANTIZATIONS, Levers  # noqa: F401 - the accepted values, re-exported
from .errors import PeftkitError
from .kernels import LIGER_NEEDS_CUDA

# what loading a model needs lives with the loading (a lower layer); re-exported for the levers' users
from .models import disable_bnb_cpu_bf16_path, half_dtype, quantization_config  # noqa: F401
from .tasks import TASKS

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_levers(levers: Levers, strategy: Any, on_cuda: bool | None = None, task: Any = None) -> None:
    """Refuse a combination of levers that cannot work, with what would (``task``: the task
    object, where known, for the levers only some tasks take)."""
    if levers.packing and task is not None and not task.supports_packing:
        able = [n for n, t in TASKS.available().items() if t.supports_packing]
        raise PeftkitError(
            f"--packing is for tasks whose examples are token sequences of varied length "
            f"({', '.join(able)}); {task.name} cannot pack its examples: drop --packing"
        )
    if levers.loss == "chunked" and task is not None and not task.supports_chunked_loss:
        able = [n for n, t in TASKS.available().items() if t.supports_chunked_loss]
        raise PeftkitError(
            f"--loss chunked is for tasks with vocabulary-wide logits ({', '.join(able)}); "
            f"{task.name}'s logits are a few numbers per example, with nothing to chunk: "
            "drop --loss"
        )

    if levers.quantize is not None and not strategy.supports_quantized_base:
        able = [n for n, cls in registry.available().items() if cls.supports_quantized_base]
        raise PeftkitError(
            f"strategy {strategy.name!r} trains the base model's own weights, which a {levers.quantize} quantized "
            f"base cannot do (quantized weights get no gradients); use --quantize with {', '.join(able)}, "
            "or drop --quantize"
        )
    if on_cuda is None and (
        levers.precision == "fp16" or levers.optimizer == "paged_adamw8bit" or levers.kernels == "liger"
    ):
        on_cuda = cuda_available()
    if levers.precision == "fp16" and not on_cuda:
        raise PeftkitError(
            "--precision fp16 needs a CUDA GPU (CPUs have no fast float16 kernels); on CPU use bf16 or fp32"
        )
    if levers.kernels == "liger" and not on_cuda:
        raise PeftkitError(LIGER_NEEDS_CUDA)
    if levers.compile and levers.quantize is not None:
        raise PeftkitError(
            f"--compile with --quantize {levers.quantize}: torch.compile does not trace "
            "bitsandbytes' quantized layers; drop one of them"
        )
    if levers.optimizer == "paged_adamw8bit" and not on_cuda:
        raise PeftkitError(
            "--optimizer paged_adamw8bit pages optimizer state between GPU and CPU memory and "
            "needs a CUDA GPU; on CPU use adamw8bit or adamw"
        )


def after_quantized_load(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's preparation of a k-bit base (frozen, norms in fp32, inputs that carry gradients)."""
    from peft import prepare_model_for_kbit_training

    # checkpointing is ours to switch on: peft would call transformers' deprecated
    # gradient_checkpointing_enable (a FutureWarning), and with use_reentrant=False it does nothing else
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    disable_bnb_cpu_bf16_path(model)
    return model


def prepare_base(model: nn.Module, quantize: str | None, gradient_checkpointing: bool) -> nn.Module:
    """The loaded base, ready for a strategy: k-bit preparation and/or gradient checkpointing."""
    if quantize is not None:
        return after_quantized_load(model, gradient_checkpointing)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of storing them.

    Non-reentrant checkpointing, because with a frozen base (LoRA, adapters, prefix) the block
    inputs carry no gradient and the reentrant variant would then silently compute none.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise PeftkitError(
            f"model type {getattr(model.config, 'model_type', '?')!r} does not support gradient "
            "checkpointing in transformers; drop --gradient-checkpointing"
        )
    # activation_checkpointing_enable: transformers 5's name (the old gradient_checkpointing_enable warns)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def logical_numel(param: torch.Tensor) -> int:
    """How many parameters ``param`` holds as the model computes with it. A 4-bit bitsandbytes
    weight (``Params4bit``) is stored packed, two values per byte in a flat uint8 tensor, so its
    ``numel()`` is half the weight's; its ``quant_state`` keeps the logical shape. (8-bit weights
    are stored one per element and count right as they are.)"""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    if shape is None:
        return param.numel()
    count = 1
    for size in shape:
        count *= int(size)
    return count


def store_frozen_in_half(model: nn.Module, trainable: dict[str, Any], precision: str) -> int:
    """Keep every parameter that never trains in 16 bits; returns how many were converted.

    Under mixed precision the matrix products run in 16 bits anyway; a parameter that gets no update
    needs no 32-bit master copy, so storing it in 16 bits halves the frozen base's memory. Trainable
    parameters (``Strategy.trainable_parameters``: including those unfrozen later) stay in fp32.
    """
    dtype = half_dtype(precision)
    if dtype is None:
        return 0
    keep = {id(p) for p in trainable.values()}
    converted = 0
    for param in model.parameters():
        if id(param) not in keep and param.is_floating_point() and param.dtype.itemsize > dtype.itemsize:
            param.data = param.data.to(dtype)
            converted += param.numel()
    return converted


def make_optimizer(name: str, groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    """AdamW from torch, or bitsandbytes' 8-bit AdamW (block-wise quantized state, Dettmers et al.
    2022) / its paged variant (state that pages to CPU memory under GPU memory pressure). torch's
    AdamW is the fused one (one kernel for every parameter's update) where every parameter is on a
    CUDA device, else its default (for-each) one."""
    import torch

    if name == "adamw":
        params = [p for g in groups for p in g["params"]]
        fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=lr, fused=fused or None)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, lr=lr)
