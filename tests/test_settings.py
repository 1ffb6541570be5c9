"""Each setting is declared once (``peftkit.settings``): a command's flag, its config class's field
and docs/cli.md cannot disagree.

Nothing runs: the click commands and the config dataclasses are read, not invoked.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import types
import typing
from typing import Any, Literal, Union

import click
import pytest

from peftkit.benchmark.config import BenchConfig
from peftkit.cli import cli
from peftkit.config import ColumnSettings, DataSettings, Levers, ModelSettings, RunConfig
from peftkit.evaluation import EvalConfig
from peftkit.export_config import ExportConfig, MergeConfig
from peftkit.planner import PlanSettings
from peftkit.settings import REQUIRED, SETTINGS, Setting
from peftkit.tuning.config import TuneConfig

# A command's config classes: every flag of the command sets a field of one of them, and every field
# of the first (the command's own) is set by a flag, but for the exceptions below.
ROOT = pathlib.Path(__file__).resolve().parent.parent

CONFIGS: dict[str, tuple[type, ...]] = {
    "run": (RunConfig, Levers),
    "bench": (BenchConfig, Levers),
    "tune": (TuneConfig, RunConfig, Levers),
    "plan": (PlanSettings, Levers),
    "eval": (EvalConfig,),
    "merge": (MergeConfig,),
    "export": (ExportConfig,),
}
# (command, flag): why the flag sets no config field
FLAG_WITHOUT_FIELD = {
    ("run", "--config"): "a YAML file of the same fields, read into them",
    ("tune", "--config"): "a YAML file of the same fields, read into the RunConfig every trial shares",
    ("run", "--resume"): "continues a recorded run with its own config.yaml; no other setting is taken",
    ("bench", "--overwrite"): "an argument of api.bench (where the suite goes), not a BenchConfig field",
    ("plan", "--json"): "how the command prints, not what is planned",
    ("eval", "--json"): "how the command prints, not what is evaluated",
}
# (class, field): why no flag of the command sets it
FIELD_WITHOUT_FLAG = {
    ("RunConfig", "max_grad_norm"): "Python and YAML only: clipping at 1.0 is the loop's documented behaviour",
    (
        "RunConfig",
        "eval_batch_size",
    ): "run takes it from YAML and Python; bench's --eval-batch-size sets it for its runs",
    ("RunConfig", "levers"): "nested: its fields are flags (--quantize, ...), flat in YAML",
    ("BenchConfig", "levers"): "nested: its fields are flags",
    ("PlanSettings", "levers"): "nested: its fields are flags",
    ("BenchConfig", "command"): "the command line itself, filled in by the CLI for results.json",
    ("TuneConfig", "run"): "nested: the run flags (--model, --lr, ...) set its fields",
}
# fields wider than their flag's type: a string a parser turns into the value (--seeds 0,1,2), or
# what only Python can give (an Optuna pruner object, a timeout in seconds)
WIDER = {"strategies", "seeds", "train_sizes", "space", "strategy_options", "timeout", "pruner"}
# fields that from Python also take an object (a dataset in memory, a loaded model): the flag's type
# must still be one they accept
OR_AN_OBJECT = {"model", "dataset"}


def _setting_of(param: click.Parameter) -> Setting:
    """The one setting a command's option was built from (same flags, parameter name and help)."""
    found = [
        s
        for s in SETTINGS.values()
        if s.flags == tuple(param.opts + param.secondary_opts)
        and (s.dest or s.field or s.flag.lstrip("-").replace("-", "_")) == param.name
        and s.help == getattr(param, "help", None)
    ]
    assert len(found) == 1, f"option {param.opts} matches {len(found)} settings: {[s.key for s in found]}"
    return found[0]


def _options(command: str) -> list[click.Option]:
    return [p for p in cli.commands[command].params if isinstance(p, click.Option) and p.name != "help"]


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_option_is_built_from_a_setting(command: str) -> None:
    for param in _options(command):
        _setting_of(param)


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_flag_sets_a_field(command: str) -> None:
    fields = {f.name for cls in CONFIGS[command] for f in dataclasses.fields(cls)}
    for param in _options(command):
        s = _setting_of(param)
        if (command, s.flag) in FLAG_WITHOUT_FIELD:
            continue
        assert s.field in fields, (
            f"peftkit {command} {s.flag} sets {s.field!r}, which no field of "
            f"{', '.join(c.__name__ for c in CONFIGS[command])} is; add the field, or the flag to FLAG_WITHOUT_FIELD"
        )


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_field_has_a_flag(command: str) -> None:
    own = CONFIGS[command][0]
    flags = {_setting_of(p).field for p in _options(command)}
    for f in dataclasses.fields(own):
        if (own.__name__, f.name) in FIELD_WITHOUT_FLAG or f.name in flags:
            continue
        pytest.fail(
            f"{own.__name__}.{f.name} has no flag in peftkit {command}; add one (peftkit.settings and "
            "the command's @options), or the field to FIELD_WITHOUT_FLAG with the reason"
        )


def _base(hint: Any) -> Any:
    """``int | None`` -> ``int``; ``str | object | None`` -> ``str`` (a model field also takes a loaded
    model from Python: the flag's type is what is beside it)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None) and a is not object]
        return args[0] if len(args) == 1 else hint
    return hint


CLASSES = (RunConfig, Levers, BenchConfig, TuneConfig, PlanSettings, EvalConfig, MergeConfig, ExportConfig)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fields_take_default_help_type_and_choices_from_their_setting(cls: type) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f.metadata.get("setting")
        if key is None:
            assert (cls.__name__, f.name) in FIELD_WITHOUT_FLAG, (
                f"{cls.__name__}.{f.name} is not declared from peftkit.settings"
            )
            continue
        s = SETTINGS[key]
        where = f"{cls.__name__}.{f.name} (setting {key!r})"
        assert s.field == f.name, f"{where} is declared from a setting of field {s.field!r}"
        assert f.metadata["help"] == s.help
        if s.default is REQUIRED:
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, where
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            assert value == s.default, f"{where}: default {value!r}, the setting's {s.default!r}"
        if f.name in WIDER:
            continue
        if f.name in OR_AN_OBJECT and object in typing.get_args(hints[f.name]):
            assert s.type in typing.get_args(hints[f.name]), f"{where}: does not take the flag's {s.type.__name__}"
            continue
        hint = _base(hints[f.name])
        if s.multiple:
            assert typing.get_origin(hint) is list, where
            hint = typing.get_args(hint)[0]
        if typing.get_origin(hint) is Literal:
            assert typing.get_args(hint) == s.choices, f"{where}: accepts {typing.get_args(hint)}, the flag {s.choices}"
        else:
            assert hint is s.type, f"{where}: a field of type {hint}, a flag of type {s.type.__name__}"


# The model and data settings' groups (peftkit.config), and the config classes that take them
GROUPS: dict[type, tuple[type, ...]] = {
    DataSettings: (RunConfig, BenchConfig),
    ModelSettings: (DataSettings, RunConfig, BenchConfig, PlanSettings),
    ColumnSettings: (DataSettings, RunConfig, BenchConfig, EvalConfig),
}


@pytest.mark.parametrize("group", GROUPS, ids=lambda c: c.__name__)
def test_shared_settings_are_declared_once_in_their_group(group: type) -> None:
    """run, bench, plan and eval take their model and data settings from the one group that declares
    them: the same field objects (name, default, help), redeclared by none of them."""
    own = {f.name: f for f in dataclasses.fields(group)}
    for cls in GROUPS[group]:
        assert issubclass(cls, group), f"{cls.__name__} does not take its settings from {group.__name__}"
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in own.items():
            assert fields[name] is f, f"{cls.__name__}.{name} is not {group.__name__}'s field"
            assert f.kw_only, f"{group.__name__}.{name}: keyword-only, or it takes the subclass's first positions"
        redeclared = set(own) & set(cls.__dict__.get("__annotations__", {}))
        assert not redeclared, f"{cls.__name__} declares {group.__name__}'s {sorted(redeclared)} again"
    # TuneConfig gets them through the RunConfig every trial shares
    assert typing.get_type_hints(TuneConfig)["run"] is RunConfig
    assert not set(own) & {f.name for f in dataclasses.fields(TuneConfig)}


def test_shared_settings_keep_positions_and_key_order() -> None:
    """The inherited groups change no call and no file: the leading positional arguments mean what
    they did (those after them, once the data settings', are refused rather than read as others),
    and recorded keys (config.yaml, results.json, plan --json) lead with the strategies."""
    assert RunConfig("full").strategy == "full"
    assert BenchConfig(["lora"], [1]).seeds == [1] and EvalConfig("a", "d").dataset == "d"
    for cls, args in [(RunConfig, ("lora", "causal-lm")), (BenchConfig, (["lora"], [0], "causal-lm"))]:
        with pytest.raises(TypeError, match="positional"):
            cls(*args)
    with pytest.raises(TypeError, match="positional"):
        PlanSettings(["lora"], "minilm")
    with pytest.raises(TypeError, match="positional"):
        EvalConfig("a", "d", "text")
    assert list(RunConfig("full", model="m").to_dict())[:3] == ["strategy", "task", "model"]
    assert list(BenchConfig(strategies=["lora"]).to_dict())[:3] == ["strategies", "seeds", "task"]
    assert list(PlanSettings(strategies=["lora"]).to_dict())[:2] == ["strategies", "task"]


def test_yaml_keys_are_the_run_settings() -> None:
    """A YAML run config takes the fields of RunConfig and Levers (flat), each declared from the table."""
    from peftkit.config import FIELDS

    declared = {f.name for cls in (RunConfig, Levers) for f in dataclasses.fields(cls)} - {"levers"}
    assert declared == FIELDS


def _cli_docs() -> Any:
    spec = importlib.util.spec_from_file_location("cli_docs", ROOT / "scripts" / "cli_docs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_cli_md_is_generated_from_the_commands() -> None:
    docs = _cli_docs()
    page = ROOT / "docs" / "cli.md"
    assert page.read_text(encoding="utf-8") == docs.render(page.read_text(encoding="utf-8")), (
        "docs/cli.md differs from the commands' flags: run `python scripts/cli_docs.py` and commit docs/cli.md"
    )
