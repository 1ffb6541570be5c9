"""The machinery of the settings table: ``Setting``, ``SETTINGS``, ``declare``/``vary`` (which
``peftkit.settings.run`` and ``peftkit.settings.commands`` call, one entry a setting), the config
fields' ``setting()``, and the closed sets, each defined here once."""

from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Literal

# -- the closed sets, each defined here once -------------------------------------------------
# The memory levers' accepted values: the command line's choices, the YAML check and ``Levers``'
# own check (through these Literal types) are all read from these.
Quantization = Literal["4bit", "8bit"]
OptimizerName = Literal["adamw", "adamw8bit", "paged_adamw8bit"]
Precision = Literal["fp32", "bf16", "fp16"]
LossName = Literal["plain", "chunked"]
KernelsName = Literal["torch", "liger", "none"]
QUANTIZATIONS: tuple[str, ...] = typing.get_args(Quantization)
OPTIMIZERS: tuple[str, ...] = typing.get_args(OptimizerName)
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)
LOSSES: tuple[str, ...] = typing.get_args(LossName)
KERNELS: tuple[str, ...] = typing.get_args(KernelsName)
REPORTERS = ("tensorboard", "wandb")
PRUNERS = ("median", "hyperband", "none")
DEVICES = ("cpu", "cuda")
EXPORT_FORMATS = ("onnx", "gguf", "openvino")  # gguf: peftkit.gguf_export, openvino: peftkit.openvino_export
EXPORT_QUANTIZATIONS = ("int8",)


class _Required:
    """The default of a field that must be given (a dataclass cannot hold ``dataclasses.MISSING``)."""

    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Setting:
    """One setting: how it is given on the command line and what its config field holds."""

    key: str
    """``NAME``, or ``COMMAND:NAME`` for a command's own wording of ``NAME``."""
    flags: tuple[str, ...]
    """The option's declarations: ``("--strategy", "-s")``."""
    help: str
    field: str | None
    """The config field (and YAML key) it sets; None for a setting of the invocation only (``--json``)."""
    type: type = str
    """str, int, float, or bool for a flag that takes no value."""
    default: Any = REQUIRED
    """The config field's default; ``REQUIRED``: the field must be given."""
    cli_default: Any = None
    """What click gives for the flag not given (None: not given; the config's default applies)."""
    show_default: bool = False
    choices: tuple[str, ...] = ()
    """The closed set of accepted values (empty: open)."""
    metavar: str | None = None
    dest: str | None = None
    """The command function's parameter name where it is not the field's (``config_file``)."""
    multiple: bool = False
    required: bool = False
    file: bool = False
    """The value is a path to an existing file (``--config``)."""

    @property
    def flag(self) -> str:
        """The long flag, as messages and docs name it."""
        return self.flags[0]


SETTINGS: dict[str, Setting] = {}


def declare(key: str, *flags: str, field: str | None = "", default: Any = None, **attrs: Any) -> None:
    """Declare ``key`` (``field`` defaults to the key's NAME part; None: no config field)."""
    name = key.rpartition(":")[2] if field == "" else field
    SETTINGS[key] = Setting(key=key, flags=flags, field=name, default=default, **attrs)


def vary(key: str, **changes: Any) -> None:
    """Declare ``COMMAND:NAME`` as ``NAME`` with ``changes`` (its help, its default) for that command."""
    SETTINGS[key] = dataclasses.replace(SETTINGS[key.rpartition(":")[2]], key=key, **changes)


LEVERS = ("quantize", "optimizer", "gradient_checkpointing", "precision", "loss", "packing", "kernels", "compile")
"""The keys of the memory levers (``Levers``' fields), in the order commands list them."""


def setting(key: str) -> Any:
    """A config dataclass field declared by ``SETTINGS[key]``: its default (a fresh copy of a list or
    dict for each instance) and, in its metadata, its help and key (``tests/test_settings.py``
    reads them back)."""
    s = SETTINGS[key]
    metadata = {"help": s.help, "setting": key}
    if s.default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    if isinstance(s.default, (list, dict)):
        default = s.default
        return dataclasses.field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return dataclasses.field(default=s.default, metadata=metadata)
