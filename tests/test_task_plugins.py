"""Tasks are registered like strategies: one registry mechanism, duplicates refused, entry-point
plugins (group ``peftkit.tasks``) loaded lazily and named when broken; and the example plugin's
text-regression task runs end to end through its entry point."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys

import pytest

from peftkit import registry
from peftkit.errors import PeftkitError
from peftkit.tasks import TASKS, get_task, register_task, task_names
from peftkit.tasks.sequence_classification import SequenceClassification

from conftest import FILLER, NEGATIVE, POSITIVE, fake_plugin_env


def test_builtin_tasks_in_their_order_and_spelled_either_way() -> None:
    assert task_names()[:3] == ("sequence-classification", "causal-lm", "image-classification")
    assert get_task("Causal_LM").name == "causal-lm"


def test_unknown_task_lists_the_available_ones() -> None:
    with pytest.raises(PeftkitError, match=r"unknown task 'nope'; available: .*causal-lm.*sequence-classification"):
        get_task("nope")


def test_duplicate_task_name_refused() -> None:
    class Impostor(SequenceClassification):
        name = "causal-lm"
        description = "tries to replace the built-in"

    with pytest.raises(ValueError, match="task name 'causal-lm' is already registered"):
        register_task(Impostor)
    assert type(get_task("causal-lm")).__name__ == "CausalLM"


def test_tasks_keep_no_state() -> None:
    """Whatever a task learns while loading data travels on the data (its shape), not on the task."""
    for name in task_names()[:3]:
        task = get_task(name)
        assert vars(task) == {}, f"{name} has instance state"


def _fake_task_plugin(tmp_path, module_source: str, entry: str) -> dict[str, str]:
    return fake_plugin_env(tmp_path, module_source, entry, "peftkit.tasks")


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_task_plugin_loads_lazily_and_is_switchable(tmp_path) -> None:
    env = _fake_task_plugin(
        tmp_path,
        """
        from peftkit.tasks.sequence_classification import SequenceClassification

        class Echo(SequenceClassification):
            name = "echo-test"
            description = "Test plugin task."
        """,
        "echo-test = fake_plugin_mod:Echo",
    )
    code = (
        "import sys; from peftkit.tasks import task_names, TASKS\n"
        "assert 'fake_plugin_mod' not in sys.modules\n"
        "print('echo-test' in task_names(), TASKS.loaded_plugins().get('echo-test'))\n"
    )
    shown = _python(code, env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.split() == ["True", "echo-test", "=", "fake_plugin_mod:Echo"]
    env[registry.DISABLE_PLUGINS_ENV] = "1"
    hidden = _python("from peftkit.tasks import task_names; print(task_names())", env)
    assert hidden.returncode == 0 and "echo-test" not in hidden.stdout


def test_broken_task_plugin_is_named_and_others_keep_working(tmp_path) -> None:
    env = _fake_task_plugin(
        tmp_path, "raise ImportError('missing dependency xyz')\n", "broken-task = fake_plugin_mod:Nope"
    )
    code = (
        "from peftkit.tasks import get_task, task_plugin_errors\n"
        "assert get_task('causal-lm').name == 'causal-lm'\n"
        "[message] = task_plugin_errors(); print(message)\n"
        "try:\n    get_task('broken-task')\nexcept Exception as exc:\n    print(exc)\n"
    )
    shown = _python(code, env)
    assert shown.returncode == 0, shown.stderr
    first, asked = shown.stdout.strip().splitlines()
    assert first == asked
    assert "plugin 'broken-task'" in first and "fake_plugin_mod:Nope" in first and "group peftkit.tasks" in first
    assert "missing dependency xyz" in first


@pytest.fixture(scope="module")
def regression_csv(tmp_path_factory) -> str:
    """120 texts whose number is how many positive minus negative words they hold."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("regression") / "scores.csv"
    lines = ["text,score"]
    for _ in range(120):
        pos, neg = rng.randint(0, 3), rng.randint(0, 3)
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE, pos) + rng.sample(NEGATIVE, neg)
        rng.shuffle(words)
        lines.append(f"{' '.join(words)},{pos - neg}")
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_example_plugin_task_runs_through_its_entry_point(
    example_plugin, run_cli, tiny_model_dir, regression_csv, tmp_path
) -> None:
    """plugins/peftkit-bitfit also ships text-regression (entry point group peftkit.tasks)."""
    from importlib.metadata import entry_points

    if "text-regression" not in entry_points(group="peftkit.tasks").names:
        pytest.skip("the installed peftkit-bitfit predates its task: reinstall it (install.sh)")
    assert TASKS.loaded_plugins()["text-regression"] == "text-regression = peftkit_bitfit.regression:TextRegression"
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        "run",
        "--task",
        "text-regression",
        "--strategy",
        "bitfit",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        regression_csv,
        "--epochs",
        "2",
        "--max-length",
        "16",
        "--output-dir",
        str(out),
    )
    assert code == 0, err
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["task"] == "text-regression" and metrics["split"]["sizes"] == {
        "train": 96,
        "validation": 12,
        "test": 12,
    }
    for key in ("test_mse", "test_mae", "test_pearson", "validation_mse"):
        assert math.isfinite(metrics[key]), key
    assert "test mse" in stdout
    code, stdout, err = run_cli("predict", "--adapter", str(out / "adapter"), "good great film")
    assert code == 0, err
    assert isinstance(json.loads(stdout.splitlines()[0])["value"], float)
