"""Typed configs: every file in configs/ is checked against RunConfig and the strategy's options."""

from __future__ import annotations

import pathlib

import pytest

from peftkit import registry
from peftkit.config import build_run_config, load_yaml_config, parse_set_options
from peftkit.errors import PeftkitError
from peftkit.strategies.base import options_from_dict
from peftkit.train import resolve

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("*.yaml"))


def test_there_is_a_config_per_builtin_strategy() -> None:
    names = {p.stem for p in CONFIGS}
    builtins = {n for n, cls in registry.available().items() if cls.__module__.startswith("peftkit.strategies.")}
    assert builtins == {"full", "head_only", "gradual_unfreeze", "lora", "adapter", "prefix"}
    assert builtins <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_file_is_valid(path) -> None:
    values = load_yaml_config(str(path))
    assert values["strategy"] == path.stem
    cfg = build_run_config(str(path), {}, {})
    run = resolve(cfg)
    # the file states every option of its strategy, so its comments document all of them
    assert set(values.get("strategy_options", {})) == set(vars(run.strategy.Options()))
    # and it states the strategy's own defaults, so the file and `peftkit run -s NAME` agree
    d = run.strategy.defaults
    assert (values["lr"], values["epochs"], values["batch_size"]) == (d.lr, d.epochs, d.batch_size)


def test_set_values_are_parsed_as_yaml_scalars() -> None:
    assert parse_set_options(["r=16", "use_dora=true", "target_modules=[query,value]", "alpha=0.5"]) == {
        "r": 16,
        "use_dora": True,
        "target_modules": ["query", "value"],
        "alpha": 0.5,
    }
    opts = options_from_dict(registry.get_strategy("lora"), {"target_modules": "query,key"})
    assert opts.target_modules == ["query", "key"]


def test_bool_option_rejects_strings() -> None:
    with pytest.raises(PeftkitError, match="use_dora.*must be bool"):
        options_from_dict(registry.get_strategy("lora"), {"use_dora": "maybe"})


def test_literal_option_lists_choices() -> None:
    with pytest.raises(PeftkitError, match=r"pooling.*must be one of 'mean', 'pooler', 'cls', 'last'"):
        options_from_dict(registry.get_strategy("head_only"), {"pooling": "max"})


def test_yaml_must_be_a_mapping(tmp_path) -> None:
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(PeftkitError, match="must hold a mapping"):
        load_yaml_config(str(p))


def test_yaml_wrong_type(tmp_path) -> None:
    p = tmp_path / "t.yaml"
    p.write_text("epochs: two\n")
    with pytest.raises(PeftkitError, match="epochs must be int or null, got 'two'"):
        load_yaml_config(str(p))


@pytest.mark.parametrize("key", ["model", "dataset"])
def test_yaml_model_and_dataset_are_names(key, tmp_path) -> None:
    """From Python they may be objects (data in memory); a file holds plain data, so only a name."""
    p = tmp_path / "t.yaml"
    p.write_text(f"{key}: [1, 2]\n")
    with pytest.raises(PeftkitError, match=f"{key} must be str or null, got \\[1, 2\\]"):
        load_yaml_config(str(p))
    p.write_text(f"{key}: 123\n")
    assert load_yaml_config(str(p)) == {key: "123"}


TASK_CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs" / "tasks").glob("*.yaml"))


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: p.name)
def test_task_config_file_is_valid(path) -> None:
    """configs/tasks/: one example per task type beyond text classification."""
    values = load_yaml_config(str(path))
    run = resolve(build_run_config(str(path), {}, {}))
    assert run.task.name == values["task"]
    assert set(values.get("strategy_options", {})) <= set(vars(run.strategy.Options()))


def test_there_is_a_config_per_task_type() -> None:
    assert {load_yaml_config(str(p))["task"] for p in TASK_CONFIGS} == {"causal-lm", "image-classification"}
