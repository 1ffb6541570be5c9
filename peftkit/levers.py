"""The memory levers: quantized bases, 8-bit optimizers, gradient checkpointing, mixed precision.

Each lever is a setting of ``RunConfig`` (``quantize``, ``optimizer``, ``gradient_checkpointing``,
``precision``), available alike in ``peftkit run``, YAML configs, ``peftkit bench`` and
``peftkit plan``. This module checks a combination before anything loads, and applies the levers in
the order a run needs them: quantization when the base model loads, gradient checkpointing on the
loaded base, half-precision storage of the frozen weights once the strategy has said which
parameters train, the optimizer last.

Which strategies can train on a quantized base is a property of each strategy
(``Strategy.supports_quantized_base``): a strategy that updates the base weights themselves (a full
fine-tune) cannot, since 4-bit and 8-bit weights have no gradient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import PeftkitError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
QUANTIZATIONS = ("4bit", "8bit")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def check_levers(cfg: Any, strategy: Any, on_cuda: bool | None = None) -> None:
    """Refuse a combination of levers that cannot work, with what would."""
    from . import registry

    if cfg.quantize is not None and not strategy.supports_quantized_base:
        able = [n for n, cls in registry.available().items() if cls.supports_quantized_base]
        raise PeftkitError(
            f"strategy {strategy.name!r} trains the base model's own weights, which a {cfg.quantize} quantized "
            f"base cannot do (quantized weights get no gradients); use --quantize with {', '.join(able)}, "
            "or drop --quantize")
    if on_cuda is None and (cfg.precision == "fp16" or cfg.optimizer == "paged_adamw8bit"):
        on_cuda = cuda_available()
    if cfg.precision == "fp16" and not on_cuda:
        raise PeftkitError("--precision fp16 needs a CUDA GPU (CPUs have no fast float16 kernels); "
                           "on CPU use bf16 or fp32")
    if cfg.optimizer == "paged_adamw8bit" and not on_cuda:
        raise PeftkitError("--optimizer paged_adamw8bit pages optimizer state between GPU and CPU memory and "
                           "needs a CUDA GPU; on CPU use adamw8bit or adamw")


def half_dtype(precision: str) -> torch.dtype | None:
    """The 16-bit type of a mixed-precision setting (None for fp32)."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def quantization_config(quantize: str, precision: str, skip_modules: list[str]) -> Any:
    """``BitsAndBytesConfig`` for a frozen base: NF4 with double quantization for 4-bit (QLoRA,
    Dettmers et al. 2023), LLM.int8 for 8-bit. ``skip_modules`` (the new task head) stay in full
    precision: they train, and a fresh head has nothing to quantize yet."""
    import torch
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=half_dtype(precision) or torch.float32,
                                  llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)


def after_quantized_load(model: nn.Module, gradient_checkpointing: bool) -> nn.Module:
    """peft's preparation of a k-bit base (frozen, norms in fp32, inputs that carry gradients)."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None)
    disable_bnb_cpu_bf16_path(model)
    return model


def disable_bnb_cpu_bf16_path(model: nn.Module) -> None:
    """bitsandbytes 0.50 repacks 4-bit weights for an AVX512-BF16 kernel on the first eval-mode
    forward on such CPUs; training after that fails, and layers narrower than a quantization block
    (64) fail at once. Its generic CPU path has neither problem."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


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
        raise PeftkitError(f"model type {getattr(model.config, 'model_type', '?')!r} does not support gradient "
                           "checkpointing in transformers; drop --gradient-checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


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
    2022) / its paged variant (state that pages to CPU memory under GPU memory pressure)."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    import bitsandbytes as bnb

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, lr=lr)
