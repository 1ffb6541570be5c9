"""One optimizer micro-step (``train_step``): the step to call for a training step of your own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..strategies.base import Strategy


def train_step(
    accelerator: Any,
    model: Any,
    optimizer: Any,
    strategy: Strategy,
    step_loss: Callable[[Any, dict[str, Any]], Any],
    batch: dict[str, Any],
    *,
    step: int,
    total_steps: int,
    warmup_steps: int,
    max_grad_norm: float,
) -> Any:
    """One optimizer micro-step: forward and loss (``step_loss``, the task's, plus the strategy's
    ``extra_loss``), backward and, on the
    micro-step that ends an
    accumulation, gradient clipping and the learning rate for optimizer step ``step`` (each group's
    ``base_lr`` times the strategy's factor); then step, the strategy's ``after_optimizer_step``
    and zero the gradients (accelerate skips all three until the accumulation is complete).
    Returns the loss tensor."""
    with accelerator.accumulate(model):
        loss = step_loss(model, batch)
        extra = strategy.extra_loss(accelerator.unwrap_model(model))
        if extra is not None:  # the method's own regularizer (AdaLoRA's), part of what it minimises
            loss = loss + extra
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], max_grad_norm)
            factor = strategy.lr_factor(step, total_steps, warmup_steps)
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * factor
        optimizer.step()
        if accelerator.sync_gradients:  # the step was taken, and its gradients are still there
            strategy.after_optimizer_step(accelerator.unwrap_model(model), step + 1, total_steps)
        optimizer.zero_grad(set_to_none=True)
    return loss
