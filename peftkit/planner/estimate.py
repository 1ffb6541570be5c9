"""What a plan is for (``PlanSettings``), what it predicts per strategy (``Estimate``) and the whole
plan the library returns (``Plan``: ``peftkit.api.plan``'s result)."""

from __future__ import annotations

import dataclasses
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

from ..config import Levers, ModelSettings, check_positive, flat_dict
from ..errors import PeftkitError
from ..memory import parse_size
from ..settings import setting
from ..tasks import with_task_defaults


@dataclass
class PlanSettings(ModelSettings):
    """What a plan is for: the same levers a run takes. Of a run's model and data settings a plan
    takes ``ModelSettings``' (task, model, max_length; inherited): it reads no data. ``None`` in
    those means the task's default, in ``device`` this machine's (cuda if it has a GPU);
    ``resolve_settings`` fills them in. ``model`` may be a loaded model from Python, as
    ``RunConfig.model`` takes one."""

    strategies: list[str] = setting("plan:strategies")
    _: KW_ONLY  # the positions after the strategies were model, task: refused, not read anew
    strategy_options: dict[str, Any] = setting("plan:set")
    """Strategy options by name (``--set``): each strategy that has an option is planned with it
    (``planner.options_for``)."""
    batch_size: int = setting("plan:batch_size")
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
        return flat_dict(self, lead=("strategies",))


def resolve_settings(settings: PlanSettings) -> PlanSettings:
    """``settings`` checked, with the task's defaults and the device filled in."""
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
    """What each example adds to the activations and workspace (``activation_line``)."""
    activations_fixed: float = 0.0
    """The part of the activations and workspace that does not grow with the batch (the optimizer
    step's temporaries...): measured at a batch of 1 too where a memory budget asks for the largest
    batch, else 0 (the planned batch's figure divided among its examples)."""
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


def activation_line(planned: Estimate, batch_size: int, at_one: Estimate | None = None) -> tuple[float, float]:
    """(fixed part, bytes per example) of the activations and workspace, as a line in the batch size:
    through ``planned`` (at ``batch_size``) and ``at_one`` (the same strategy planned at a batch of 1)
    where given, else ``planned.activations_fixed`` (0 unless measured) and the rest divided among
    the examples. A negative slope (noise, on a tiny model) is read as flat."""
    activations = planned.activations + planned.workspace
    if at_one is not None and batch_size > 1:
        one = at_one.activations + at_one.workspace
        per_example = max(0.0, (activations - one) / (batch_size - 1))
        return one - per_example, per_example
    fixed = min(planned.activations_fixed, activations)
    return fixed, (activations - fixed) / batch_size


@dataclass
class Plan:
    """Predicted peak training memory of each strategy, for the settings it was made for."""

    settings: PlanSettings
    """The settings with the task's defaults and the device filled in."""
    estimates: list[Estimate]

    @property
    def failed(self) -> list[str]:
        """The strategies whose planning failed (an error, not a refusal): ``peftkit plan`` exits 1."""
        return [e.strategy for e in self.estimates if e.status == "failed"]

    def to_dict(self) -> dict[str, Any]:
        """What ``peftkit plan --json`` prints."""
        return {
            "settings": self.settings.to_dict(),
            "estimates": [e.as_dict() for e in self.estimates],
            "failed": self.failed,
        }
