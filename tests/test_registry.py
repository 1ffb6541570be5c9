"""The registry: names, aliases, duplicates, entry-point plugins, and a torch-free `peftkit list`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peftkit import registry
from peftkit.errors import PeftkitError
from peftkit.strategies.base import Strategy

from conftest import fake_plugin_env


def test_builtins_registered_with_aliases() -> None:
    names = set(registry.available())
    assert {"full", "head_only", "lora"} <= names
    assert registry.get_strategy("head-only") is registry.get_strategy("head_only")
    assert registry.get_strategy("LoRA").name == "lora"


def test_unknown_strategy_lists_valid_ones() -> None:
    with pytest.raises(PeftkitError, match=r"unknown strategy 'nope'; available: .*full.*lora"):
        registry.get_strategy("nope")


def test_duplicate_name_refused() -> None:
    class Impostor(Strategy):
        name = "lora"
        description = "tries to replace the built-in"

    with pytest.raises(ValueError, match="already registered"):
        registry.register_strategy(Impostor)
    assert registry.get_strategy("lora").__name__ == "Lora"


def test_duplicate_alias_refused() -> None:
    class AliasThief(Strategy):
        name = "alias_thief"
        aliases = ("head-only",)
        description = "claims an alias that is taken"

    with pytest.raises(ValueError, match="already registered"):
        registry.register_strategy(AliasThief)
    assert "alias_thief" not in registry.available()


def test_strategy_needs_description() -> None:
    class Silent(Strategy):
        name = "silent"

    with pytest.raises(ValueError, match="description"):
        registry.register_strategy(Silent)


def _plugin_env(tmp_path, module_source: str, entry: str) -> dict[str, str]:
    """A fake installed distribution on PYTHONPATH declaring a peftkit.strategies entry point."""
    return fake_plugin_env(tmp_path, module_source, entry, "peftkit.strategies")


GOOD_PLUGIN = """
from peftkit.strategies.base import Strategy

class BiasOnly(Strategy):
    name = "bias_only_test"
    description = "Test plugin: only biases train."

    def prepare(self, model, task):
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith("bias"))
        return model
"""


def _peftkit(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "peftkit.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_entry_point_plugin_listed_and_switchable(tmp_path) -> None:
    env = _plugin_env(tmp_path, GOOD_PLUGIN, "bias_only_test = fake_plugin_mod:BiasOnly")
    shown = _peftkit(["list"], env)
    assert shown.returncode == 0, shown.stderr
    assert "bias_only_test" in shown.stdout and "plugin: bias_only_test = fake_plugin_mod:BiasOnly" in shown.stdout
    env["PEFTKIT_DISABLE_PLUGINS"] = "1"
    hidden = _peftkit(["list"], env)
    assert hidden.returncode == 0 and "bias_only_test" not in hidden.stdout and "lora" in hidden.stdout


def test_broken_plugin_is_named_and_others_keep_working(tmp_path) -> None:
    env = _plugin_env(tmp_path, "raise ImportError('missing dependency xyz')\n", "broken = fake_plugin_mod:Nothing")
    shown = _peftkit(["list"], env)
    assert shown.returncode == 0
    assert "lora" in shown.stdout and "full" in shown.stdout
    warnings = [line for line in shown.stderr.splitlines() if line.strip()]
    assert len(warnings) == 1, shown.stderr
    assert "plugin 'broken'" in warnings[0] and "fake_plugin_mod:Nothing" in warnings[0]
    assert "missing dependency xyz" in warnings[0] and "Traceback" not in shown.stderr
    asked = _peftkit(["run", "--strategy", "broken"], env)
    assert asked.returncode == 2 and "plugin 'broken'" in asked.stderr and "Traceback" not in asked.stderr


def test_list_does_not_import_torch() -> None:
    code = (
        "import sys\nfrom peftkit.cli import main\n"
        "try:\n    main(['list', '-v'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'peftkit list imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "lora" in done.stdout


def test_example_plugin_distribution_runs_without_editing_peftkit(
    example_plugin, run_cli, tiny_model_dir, tiny_csv, tmp_path
) -> None:
    """plugins/peftkit-bitfit is a separate distribution that install.sh installs."""
    assert registry.loaded_plugins()["bitfit"] == "bitfit = peftkit_bitfit:BitFit"
    out = tmp_path / "run"
    code, _, err = run_cli(
        "run",
        "--strategy",
        "bitfit",
        "--model",
        tiny_model_dir("roberta"),
        "--dataset",
        tiny_csv,
        "--epochs",
        "1",
        "--max-length",
        "16",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    import json

    metrics = json.load(open(out / "metrics.json"))
    assert 0 < metrics["trainable_params"] < 0.2 * metrics["total_params"]


def test_a_family_resolves_its_names_when_first_asked_for() -> None:
    """A prefix family (``Registry.register_family``, what ``peft:NAME`` uses and plugins may use):
    nothing is made at registration, a name is made once when asked for, a name outside the family
    is refused by the family itself, and the prefix is no longer free for single names."""
    made: list[str] = []

    def resolve(rest: str) -> type[Strategy]:
        if rest != "one":
            raise PeftkitError(f"unknown strategy 'fam:{rest}'")
        made.append(rest)
        return type("FamOne", (Strategy,), {"name": "fam:one", "description": "one of the family"})

    reg = registry.Registry("strategy", Strategy, "peftkit.test-no-plugins", ())
    reg.register_family("fam:", resolve, "a test family")
    assert made == [] and list(reg.families()) == ["fam:"]
    assert reg.get("FAM:one") is reg.get("fam:one") and made == ["one"]
    with pytest.raises(PeftkitError, match="unknown strategy 'fam:two'"):
        reg.get("fam:two")
    with pytest.raises(PeftkitError, match=r"unknown strategy 'nope'; available: fam:NAME \(a test family\)"):
        reg.get("nope")
    impostor = type("Impostor", (Strategy,), {"name": "fam:three", "description": "not the family's"})
    with pytest.raises(ValueError, match="family's prefix"):
        reg.register(impostor)
    with pytest.raises(ValueError, match="already taken"):
        reg.register_family("fam:", resolve, "again")


def test_peft_methods_are_a_family_not_registered_strategies() -> None:
    assert "peft:" in registry.strategy_families()
    assert not any(name.startswith("peft:") for name in registry.available())
    assert registry.get_strategy("peft:IA3").name == "peft:ia3"
