"""Run configuration: command line -> YAML -> one typed ``RunConfig`` -> objects.

Precedence is explicit: a flag given on the command line beats the same key in ``--config FILE``,
which beats the strategy's own defaults (``Strategy.defaults``), which beat the defaults here.
Unknown keys are errors, never ignored: a misspelt ``learning_rate`` silently ignored would train
with the default and nobody would know.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import typing
from collections.abc import Mapping
from dataclasses import KW_ONLY, dataclass, field
from typing import Any

import yaml

from .errors import PeftkitError, did_you_mean
from .memory import parse_size
from .rundir import stage_path

# The closed sets are defined in peftkit.settings beside the settings they close, and re-exported
# here (``X as X``) for the modules that have always read them from the config.
from .settings import KERNELS as KERNELS
from .settings import LOSSES as LOSSES
from .settings import OPTIMIZERS as OPTIMIZERS
from .settings import PRECISIONS as PRECISIONS
from .settings import QUANTIZATIONS as QUANTIZATIONS
from .settings import REPORTERS as REPORTERS
from .settings import KernelsName as KernelsName
from .settings import LossName as LossName
from .settings import OptimizerName as OptimizerName
from .settings import Precision as Precision
from .settings import Quantization as Quantization
from .settings import setting
from .typing_utils import coerce, parse_scalar


@dataclass(frozen=True)
class Levers:
    """The memory levers of a run, a bench or a plan (see ``peftkit.levers`` for what each does).

    Frozen, so a combination can be a dictionary key (the bench's predictor caches by it) and an
    auto-fit rung is a new value (``dataclasses.replace``), never an edited one. In YAML files,
    ``config.yaml`` and ``metrics.json`` the four keys stay flat (``quantize: 4bit``).
    """

    quantize: Quantization | None = setting("quantize")
    optimizer: OptimizerName = setting("optimizer")
    gradient_checkpointing: bool = setting("gradient_checkpointing")
    precision: Precision = setting("precision")
    loss: LossName | None = setting("loss")
    packing: bool = setting("packing")
    compile: bool = setting("compile")
    kernels: KernelsName | None = setting("kernels")

    def __post_init__(self) -> None:
        # a Levers that exists is a valid one, however it was made (flag, YAML, Python)
        hints = typing.get_type_hints(Levers)
        for f in dataclasses.fields(self):
            coerce(getattr(self, f.name), hints[f.name], f.name)


LEVER_FIELDS = tuple(f.name for f in dataclasses.fields(Levers))


def with_levers(values: Mapping[str, Any]) -> dict[str, Any]:
    """Settings with flat lever keys (``quantize``, ... as in YAML and recorded files) turned into
    one ``levers`` entry, ready for a config class; a ``levers`` entry already there (a ``Levers`` or a
    mapping) is the base the flat keys override."""
    out = dict(values)
    base = out.pop("levers", None) or Levers()
    if isinstance(base, Mapping):
        base = Levers(**base)
    flat = {k: out.pop(k) for k in LEVER_FIELDS if k in out}
    out["levers"] = dataclasses.replace(base, **flat) if flat else base
    return out


def flat_dict(config: Any, lead: tuple[str, ...] = ()) -> dict[str, Any]:
    """A config dataclass as plain data with the levers' keys flat: what YAML files, ``config.yaml``,
    a bench's ``results.json`` and worker specs hold. The ``lead`` keys come first (a run's
    ``strategy``, which would otherwise follow the inherited ``DataSettings``, a dataclass's first
    fields), then the rest in field order."""
    out: dict[str, Any] = {key: None for key in lead}
    for key, value in dataclasses.asdict(config).items():
        if key == "levers":
            out.update(value)
        else:
            out[key] = value
    return out


def check_positive(config: Any, names: tuple[str, ...]) -> None:
    """Refuse a setting among ``names`` that is set but below 1 (the one check of every count a
    config holds: epochs, batch sizes, lengths, sample caps, ...)."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < 1:
            raise PeftkitError(f"{name} must be a positive integer, got {value}")


@dataclass(kw_only=True)
class ModelSettings:
    """What is learnt, by which model, on how many tokens: the settings of every command that trains or
    plans a model (``run``, ``bench``, ``tune`` through ``DataSettings``, and ``plan``'s
    ``PlanSettings``, which reads no data). ``None`` means the task's default (the task: what the model is made for),
    filled in by ``peftkit.tasks.with_task_defaults``.

    Keyword-only, here and in the groups below: a config class inherits them as its first fields, and
    its own fields keep their positions (``RunConfig("lora")`` is the strategy)."""

    task: str | None = setting("task")
    model: str | object | None = setting("model")
    """Short name (minilm, smollm2, vit-tiny), hub id or local directory of a Hugging Face model
    (default: the task's own); from Python also a loaded ``transformers`` ``PreTrainedModel``, alone
    (its tokenizer or processor read from where its ``name_or_path`` points) or as ``(model,
    tokenizer or processor)``: saved into a temporary directory for the call and loaded from there as
    a directory would be (your model is left as it was); recorded as ``in-memory LlamaForCausalLM
    (<name_or_path>)``. ``bench`` and ``tune`` refuse a loaded model. ``object``: a config needs no
    transformers to import."""
    max_length: int | None = setting("max_length")


@dataclass(kw_only=True)
class ColumnSettings:
    """Which columns of a dataset hold what (``None``: guessed from the names): shared by every
    command that reads a dataset with a task's columns (``run``, ``bench``, ``tune`` through
    ``DataSettings``, and ``eval``'s ``EvalConfig``)."""

    text_column: str | None = setting("text_column")
    label_column: str | None = setting("label_column")
    response_column: str | None = setting("response_column")


@dataclass(kw_only=True)
class DataSettings(ColumnSettings, ModelSettings):
    """The model and data settings ``run``, ``bench`` and ``tune`` share, declared here once: the task,
    model and length of ``ModelSettings`` (also ``plan``'s), the columns of ``ColumnSettings`` (also
    ``eval``'s), the dataset and the sample caps. ``RunConfig`` and ``BenchConfig`` inherit them (flat:
    ``cfg.model``, and flat keys in YAML and recorded files), ``TuneConfig`` through its ``RunConfig``.

    ``eval`` takes only the columns from here: its ``--model`` is the adapter's base (another help),
    its ``--dataset`` is required and its ``--max-eval-samples`` worded for it."""

    dataset: str | object | None = setting("dataset")
    """Short name (rotten_tomatoes), hub id, data file (.csv/.json/.jsonl/.parquet, compressed too)
    or a directory saved by `datasets`; for ``run`` from Python also an in-memory ``datasets.Dataset``,
    ``DatasetDict`` or pandas ``DataFrame`` (read with the same column checks and splits; recorded
    as ``in-memory Dataset (N rows)``). ``bench`` and ``tune`` refuse data in memory: each of their
    runs is a process of its own."""
    max_train_samples: int | None = setting("max_train_samples")
    max_eval_samples: int | None = setting("max_eval_samples")


DATA_FIELDS = tuple(f.name for f in dataclasses.fields(DataSettings))


def data_settings(config: DataSettings) -> dict[str, Any]:
    """``config``'s model and data settings (``DataSettings``' fields), to give another config."""
    return {name: getattr(config, name) for name in DATA_FIELDS}


@dataclass
class RunConfig(DataSettings):
    """Everything a run needs. ``None`` means "the strategy's default" where a strategy has one.

    The model and data settings (task, model, dataset, columns, max_length, sample caps) are
    ``DataSettings``', inherited: given by keyword like the rest (``RunConfig("lora", model=...)``)."""

    strategy: str = setting("strategy")
    _: KW_ONLY  # the positions after the strategy were the data settings': refused, not read anew
    epochs: int | None = setting("epochs")
    batch_size: int | None = setting("batch_size")
    lr: float | None = setting("lr")
    weight_decay: float | None = setting("weight_decay")
    warmup_ratio: float | None = setting("warmup_ratio")
    eval_batch_size: int = setting("eval_batch_size")
    grad_accumulation: int = setting("grad_accumulation")
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm (Python and YAML only: no flag)."""
    early_stopping_patience: int | None = setting("early_stopping_patience")
    levers: Levers = field(default_factory=Levers)
    """Quantized base, 8-bit optimizer, gradient checkpointing, mixed precision (flat keys in YAML)."""
    memory_budget: str | None = setting("memory_budget")
    checkpoint_every: int | None = setting("checkpoint_every")
    fsdp: bool = setting("run:fsdp")
    report_to: list[str] = setting("report_to")
    seed: int = setting("seed")
    output_dir: str | None = setting("output_dir")
    overwrite: bool = setting("overwrite")
    strategy_options: dict[str, Any] = setting("set")

    def validate(self) -> None:
        """Raise ``PeftkitError`` for values no run could use."""
        check_positive(
            self,
            (
                "epochs",
                "batch_size",
                "max_length",
                "eval_batch_size",
                "grad_accumulation",
                "max_train_samples",
                "max_eval_samples",
                "early_stopping_patience",
                "checkpoint_every",
            ),
        )
        if self.lr is not None and not (self.lr > 0 and self.lr < 1e3):
            raise PeftkitError(f"lr must be a positive number, got {self.lr}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise PeftkitError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise PeftkitError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.max_grad_norm <= 0:
            raise PeftkitError(f"max_grad_norm must be positive, got {self.max_grad_norm}")
        if self.memory_budget is not None:
            parse_size(self.memory_budget)
        for tracker in self.report_to:
            if tracker not in REPORTERS:
                raise PeftkitError(f"unknown tracker {tracker!r} in report_to; accepted: {', '.join(REPORTERS)}")
        if self.seed < 0:
            raise PeftkitError(f"seed must be >= 0, got {self.seed}")

    def to_dict(self) -> dict[str, Any]:
        """Every setting as plain data, levers flat: what ``from_dict`` and ``config.yaml`` take."""
        return flat_dict(self, lead=("strategy",))

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """A ``RunConfig`` from flat settings (a YAML file's, a recorded ``config.yaml``'s)."""
        return cls(**with_levers(values))


# the keys a YAML run config (and config.yaml) may hold: the fields, with the levers flat
FIELDS = ({f.name for f in dataclasses.fields(RunConfig)} - {"levers"}) | set(LEVER_FIELDS)
# keys that do not belong in a YAML file: where the run goes is a property of the invocation
_CLI_ONLY = {"overwrite"}


def _hints() -> dict[str, Any]:
    return {**typing.get_type_hints(RunConfig), **typing.get_type_hints(Levers)}


def coerce_run_value(key: str, value: Any) -> Any:
    """Check one run setting (read from a file: plain data) against ``RunConfig``'s type for it; a
    ``model`` or ``dataset`` given as an object is Python's alone, so here it must be a name."""
    if key == "strategy_options":
        if not isinstance(value, dict):
            raise PeftkitError(f"strategy_options must be a mapping of option: value, got {value!r}")
        return dict(value)
    hint = _hints()[key]
    if object in typing.get_args(hint):
        # the hint's other members (str | None), made at run time: X | Y cannot take a tuple
        hint = typing.Union[tuple(arg for arg in typing.get_args(hint) if arg is not object)]  # noqa: UP007
    return coerce(value, hint, key)


def load_yaml_config(path: str) -> dict[str, Any]:
    """Read a YAML run config into a dict of checked ``RunConfig`` values."""
    if not os.path.exists(path):
        raise PeftkitError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise PeftkitError(f"config path is a directory, expected a YAML file: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark else path
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PeftkitError(f"YAML syntax error in {where}: {problem}") from None
    except UnicodeDecodeError:
        raise PeftkitError(f"config file is not UTF-8 text: {path}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PeftkitError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key not in FIELDS or key in _CLI_ONLY:
            accepted = ", ".join(sorted(FIELDS - _CLI_ONLY))
            hint = did_you_mean(str(raw_key), FIELDS - _CLI_ONLY)
            raise PeftkitError(f"unknown key {raw_key!r}{hint} in {path}; accepted: {accepted}")
        out[key] = coerce_run_value(key, value)
    return out


def parse_set_options(items: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """``["r=16", "alpha=32"]`` -> ``{"r": 16, "alpha": 32}`` (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise PeftkitError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip()] = parse_scalar(value)
    return out


def build_run_config(config_file: str | None, flags: dict[str, Any], set_options: dict[str, Any]) -> RunConfig:
    """Merge defaults < YAML file < command-line flags (those not None) < ``--set`` options."""
    values: dict[str, Any] = load_yaml_config(config_file) if config_file else {}
    options = dict(values.pop("strategy_options", {}) or {})
    for key, value in flags.items():
        if value is not None:
            values[key] = value
    options.update(set_options)
    cfg = RunConfig.from_dict({**values, "strategy_options": options})
    cfg.validate()
    return cfg


def path_name(strategy: str) -> str:
    """``strategy`` as a file or directory name: a family's ``:`` becomes ``-`` (``peft-ia3``), as
    paths with a colon read as lists (PATH) or hosts (scp)."""
    return strategy.replace(":", "-")


def default_output_dir(strategy: str) -> str:
    """``runs/<strategy>-<timestamp>`` (``path_name``: ``runs/peft-ia3-...``), with ``-2``, ``-3``
    ... after it when a run (finished or staged) already has that name: two runs started in the
    same second get a directory each."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{path_name(strategy)}-{stamp}")
    path, n = base, 1
    while os.path.exists(path) or os.path.exists(stage_path(path)):
        n += 1
        path = f"{base}-{n}"
    return path
