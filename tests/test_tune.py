"""``peftkit tune``: search spaces (no training), then one small study on a tiny BERT that is
continued (resume, pruning) and shared by two processes, and the refusals of bad input.

The study's trials are head_only on a tiny random-weight BERT (two epochs of 64 examples, 8 a
batch): its validation accuracy moves with the settings, so reproducing the best one means
something. Each trial is a process of its own, which is most of the time these take."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import optuna
import pytest
import yaml

from peftkit import registry
from peftkit.config import RunConfig
from peftkit.strategies.base import TUNED_SETTINGS, Schedule, default_point, options_from_dict, options_to_dict

REPO = pathlib.Path(__file__).resolve().parent.parent


def _bitfit_from_repo() -> type:
    """The BitFit class of this repository's plugin (an installed copy may be another checkout's)."""
    path = REPO / "plugins" / "peftkit-bitfit" / "peftkit_bitfit" / "__init__.py"
    spec = importlib.util.spec_from_file_location("peftkit_bitfit_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BitFit


# peft's methods, named explicitly (the registry resolves a ``peft:`` name when asked)
PEFT_METHODS = ["peft:ia3", "peft:loha", "peft:oft", "peft:adalora", "peft:fourierft", "peft:prompt_tuning"]


def _strategies() -> dict[str, type]:
    found = {n: c for n, c in registry.available().items() if n != "bitfit"}
    found["bitfit"] = _bitfit_from_repo()
    found.update({n: registry.get_strategy(n) for n in PEFT_METHODS})
    return found


@pytest.mark.parametrize(
    "name", ["full", "head_only", "gradual_unfreeze", "lora", "adapter", "prefix", "bitfit", *PEFT_METHODS]
)
def test_search_space_suggests_only_valid_settings(name: str) -> None:
    cls = _strategies()[name]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen: dict[str, set] = {}
    for _ in range(40):
        trial = study.ask()
        values = cls.search_space(trial, cls.defaults)
        assert set(values) == set(trial.params)  # every value is a searched parameter, by its own name
        settings = {k: v for k, v in values.items() if k in TUNED_SETTINGS}
        RunConfig(strategy=name, **settings).validate()
        options_from_dict(cls, {k: v for k, v in values.items() if k not in TUNED_SETTINGS})
        for k, v in values.items():
            seen.setdefault(k, set()).add(v)
        study.tell(trial, 0.0)
    assert {"lr", "epochs", "warmup_ratio", "weight_decay"} <= set(seen)
    assert len(seen["lr"]) > 30  # searched, not fixed
    low, high = min(seen["lr"]), max(seen["lr"])
    assert (
        cls.defaults.lr / 10 * 0.999 <= low < cls.defaults.lr < high <= cls.defaults.lr * 10 * 1.001 or name == "bitfit"
    )
    own = {
        "lora": {"r", "alpha"},
        "adapter": {"reduction_factor", "variant"},
        "prefix": {"num_virtual_tokens"},
        "gradual_unfreeze": {"unfreeze_every_steps", "lr_decay"},
        "head_only": {"pooling"},
        "peft:loha": {"r"},  # each peft method's own size option, at half, once and twice its default
        "peft:oft": {"oft_block_size"},
        "peft:adalora": {"target_r"},
        "peft:fourierft": {"n_frequency"},
        "peft:prompt_tuning": {"num_virtual_tokens"},
    }.get(name, set())
    assert own <= set(seen), f"{name} searches {sorted(seen)}"
    if name == "peft:loha":
        assert seen["r"] == {4, 8, 16}
    if name == "peft:ia3":  # no size option: the training settings alone
        assert set(seen) == set(TUNED_SETTINGS)
    if name == "bitfit":
        assert 1e-4 <= low and high <= 1e-2


@pytest.mark.parametrize(
    "name", ["head_only", "lora", "adapter", "gradual_unfreeze", "prefix", "bitfit", *PEFT_METHODS]
)
def test_trial_zero_is_the_defaults(name: str) -> None:
    cls = _strategies()[name]
    point = default_point(cls)
    defaults = {**{k: getattr(cls.defaults, k) for k in TUNED_SETTINGS}, **options_to_dict(cls.Options())}
    assert point == {k: defaults[k] for k in point}
    # enqueued as trial 0, a study hands exactly these back through the strategy's space
    study = optuna.create_study()
    study.enqueue_trial(point)
    assert cls.search_space(study.ask(), cls.defaults) == point
    fixed = default_point(cls, overrides={"lr": 0.5})  # a setting the user fixed answers as given
    assert fixed["lr"] == 0.5


# -- one study, used in turn by the tests below ---------------------------------------------------


@pytest.fixture(scope="module")
def study_dir(tiny_model_dir, tiny_csv, tmp_path_factory) -> dict:
    from peftkit.cli import main

    out = tmp_path_factory.mktemp("tune") / "out"
    common = [
        "--strategy",
        "head_only",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--output-dir",
        str(out),
    ]
    with pytest.raises(SystemExit) as ended:
        main(["tune", *common, "--trials", "3", "--pruner", "none"])
    assert ended.value.code == 0
    return {"out": out, "common": common}


def _trials(out: pathlib.Path) -> dict:
    return json.loads((out / "trials.json").read_text())


def test_tune_writes_its_reports(study_dir: dict) -> None:
    out = study_dir["out"]
    for name in (
        "study.db",
        "best.yaml",
        "trials.csv",
        "trials.json",
        "optimization_history.png",
        "param_importances.png",
        "best-run/metrics.json",
        "trials/0000/train.log",
    ):
        assert (out / name).exists(), name
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no staging left behind
    summary = _trials(out)
    rows = summary["rows"]
    assert [r["number"] for r in rows] == [0, 1, 2] and all(r["state"] == "complete" for r in rows)
    assert rows[0]["defaults"] and rows[0]["params"]["lr"] == 3e-3 and rows[0]["params"]["pooling"] == "mean"
    assert "epochs" not in rows[0]["params"]  # --epochs fixed it
    assert summary["best_value"] == max(r["value"] for r in rows)
    # which validation examples each trial's selected epoch got right: the paired test's input
    for r in rows:
        correct = r["validation_correct"]
        assert len(correct) == 20 and set(correct) <= {"0", "1"}  # 200 rows: 20 validation examples
        assert correct.count("1") / 20 == pytest.approx(r["value"])
    best_is_defaults = rows[summary["best_trial"]]["defaults"]
    assert (summary["versus_defaults"] is None) == best_is_defaults == summary["defaults_best"]
    assert summary["best_run"]["test"]  # test evaluated once, for the best configuration only
    assert not (out / "trials" / "0000" / "metrics.json").exists()
    csv_lines = (out / "trials.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and "pooling" in csv_lines[0]
    header = csv_lines[0].split(",")
    assert len(header) == len(set(header)) and "validation_per_epoch" in header  # each column once


def test_best_yaml_reproduces_the_best_trial(study_dir: dict, run_cli, tmp_path) -> None:
    out = study_dir["out"]
    best = yaml.safe_load((out / "best.yaml").read_text())
    summary = _trials(out)
    assert best["strategy"] == "head_only" and best["epochs"] == 2
    assert best["lr"] == pytest.approx(summary["best_params"]["lr"])
    code, _, err = run_cli("run", "--config", str(out / "best.yaml"), "--output-dir", str(tmp_path / "again"))
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["validation_accuracy"] == summary["best_value"]
    assert again["validation_accuracy"] == summary["best_run"]["validation"]["accuracy"]


class _PruneAll(optuna.pruners.BasePruner):
    """Prunes whatever it is asked about: the tune must still never prune trial 0 (the defaults)."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return True


def test_resume_continues_the_study_and_prunes(study_dir: dict, tiny_model_dir, tiny_csv) -> None:
    import peftkit
    from peftkit.tuning.config import TuneConfig

    out = study_dir["out"]
    run = RunConfig(
        strategy="head_only",
        model=tiny_model_dir("bert"),
        dataset=tiny_csv,
        max_train_samples=64,
        max_eval_samples=32,
        epochs=2,
        batch_size=8,
        max_length=16,
    )
    lines: list[str] = []
    result = peftkit.tune(TuneConfig(run=run, trials=4, pruner=_PruneAll(), output_dir=str(out)), echo=lines.append)
    assert result.trials == 4 and result.ran == 1  # the three before count toward --trials
    assert any(
        "continuing study 'tune-head_only' in " in line
        and line.endswith(": 3 trials: 3 complete; 3 of --trials 4 finished, 1 to go")
        for line in lines
    )
    rows = _trials(out)["rows"]
    assert rows[3]["state"] == "pruned" and list(rows[3]["epochs"]) == ["1"]
    assert any(line.startswith("trial #3: ") and "pruned after epoch 1" in line for line in lines)
    assert result.counts.describe() == "4 trials: 3 complete, 1 pruned" and result.counts.finished == 4


def test_two_processes_share_one_study(study_dir: dict) -> None:
    out = study_dir["out"]
    before = len(_trials(out)["rows"])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peftkit",
                "tune",
                *study_dir["common"],
                "--trials",
                str(before + 2),
                "--pruner",
                "none",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "trial " in err and "-> validation accuracy" in err  # each ran a trial of its own
    rows = _trials(out)["rows"]
    assert len(rows) >= before + 2 and [r["number"] for r in rows] == list(range(len(rows)))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--storage", "not-a-url"], "cannot open storage 'not-a-url'"),
        (["--trials", "0"], "--trials must be a positive integer, got 0"),
        (["--timeout", "soon"], "--timeout 'soon' is not a duration; give e.g. 90s, 30m, 2h"),
        (["--metric", "bleu"], "--metric 'bleu' is not a metric of task 'sequence-classification'; accepted: accuracy"),
        (["--space", "rank=4,8"], "--space 'rank': strategy 'head_only' does not search it; it searches: lr, epochs"),
        (["--space", "pooling=mean,sideways"], "pooling"),
        (["--strategy", "nosuch"], "unknown strategy 'nosuch'"),
    ],
)
def test_bad_input_is_one_line(extra: list[str], message: str, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli(
        "tune",
        "--strategy",
        "head_only",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--output-dir",
        str(out),
        *extra,
    )
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if "error" in line.lower() or "Traceback" in line]
    assert lines == [err.strip().splitlines()[-1]] and lines[0].startswith("error: ") and message in lines[0], err
    assert not out.exists()  # refused before anything was written


def test_a_study_made_for_another_strategy_is_refused(study_dir: dict, run_cli) -> None:
    common = list(study_dir["common"])
    common[common.index("head_only")] = "full"
    code, _, err = run_cli("tune", *common, "--study-name", "tune-head_only", "--trials", "1")
    assert code == 2 and "was made for strategy head_only" in err and "--overwrite" in err, err


def test_a_study_continued_on_other_data_is_refused(study_dir: dict, run_cli) -> None:
    """Its trials were measured on 64 training examples: ranking them against trials on 48 would
    compare different data. The refusal names only what differs."""
    common = list(study_dir["common"])
    common[common.index("--max-train-samples") + 1] = "48"
    code, _, err = run_cli("tune", *common, "--trials", "4")
    last = err.strip().splitlines()[-1]
    assert code == 2 and "was made for max_train_samples 64, not max_train_samples 48" in last, err
    assert "--overwrite" in last and "strategy" not in last.split("was made for")[1], err


def test_a_study_from_before_the_data_was_recorded_is_continued() -> None:
    from peftkit.tuning.search import _differences

    now = {"strategy": "lora", "model": "m", "seed": 0, "max_train_samples": 2000}
    assert _differences({"strategy": "lora", "model": "m"}, now) is None  # older record: judged on what it has
    assert _differences({"strategy": "lora", "model": "m", "seed": 1}, now) == {"seed": 1}
    assert _differences(None, now) == {} and _differences({}, now) == {}  # not made by peftkit tune


# -- a process that stopped without telling the study ----------------------------------------------


def _age_heartbeat(storage, trial_id: int, minutes: int) -> None:
    """Backdate ``trial_id``'s heartbeat, as if its process had stopped ``minutes`` ago."""
    import sqlalchemy

    with storage.engine.begin() as conn:
        conn.execute(
            sqlalchemy.text(
                f"UPDATE trial_heartbeats SET heartbeat = datetime('now', '-{minutes} minutes') WHERE trial_id = :id"
            ),
            {"id": trial_id},
        )


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks as a process would
def test_a_killed_tune_is_recovered_by_the_next(tiny_model_dir, tiny_csv, run_cli, tmp_path) -> None:
    from peftkit.tuning.config import TuneConfig, plan_tune
    from peftkit.tuning.output import prepare_output
    from peftkit.tuning.search import open_study
    from peftkit.tuning.storage import open_storage
    from peftkit.tuning.trial import SearchTrial

    out = tmp_path / "out"
    run = RunConfig(
        strategy="head_only",
        model=tiny_model_dir("bert"),
        dataset=tiny_csv,
        max_train_samples=64,
        max_eval_samples=32,
        epochs=1,
        batch_size=8,
        max_length=16,
    )
    plan = plan_tune(TuneConfig(run=run, trials=1, output_dir=str(out)), echo=lambda _line: None)
    prepare_output(plan)
    storage = open_storage(plan.storage)
    study = open_study(plan, storage, lambda _line: None)
    # trial 0 (the defaults) was running in a process that was SIGKILLed 10 minutes ago; trial 1
    # runs in another process, alive: its heartbeat is fresh
    running = [study.ask(), study.ask()]
    for trial in running:
        plan.strategy.search_space(SearchTrial(trial, plan.fixed, {}), plan.defaults)
        storage.record_heartbeat(trial._trial_id)
    _age_heartbeat(storage, running[0]._trial_id, minutes=10)

    code, out_text, err = run_cli(
        "tune",
        "--strategy",
        "head_only",
        "--model",
        run.model,
        "--dataset",
        tiny_csv,
        "--max-train-samples",
        "64",
        "--max-eval-samples",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--max-length",
        "16",
        "--output-dir",
        str(out),
        "--trials",
        "1",
    )
    assert code == 0, err
    assert (
        "trial #0 was left running by a process that stopped (no heartbeat for over 2m00s): marked "
        "interrupted (it does not count toward --trials; another trial takes its place)"
    ) in err
    assert "trial #1 was left" not in err
    summary = _trials(out)
    rows = summary["rows"]
    assert [(r["number"], r["state"], r["defaults"], r["interrupted"]) for r in rows] == [
        (0, "interrupted", True, True),
        (1, "running", False, False),
        (2, "complete", True, False),
    ]
    assert "the process running it stopped" in rows[0]["error"]
    assert rows[2]["params"] == rows[0]["params"]  # the defaults, run again
    assert summary["counted"] == 1 and summary["best_trial"] == 2
    # the progress counts the trial that ran, not the dead or the live one
    assert "trial #2 (the defaults): " in err and "; 1 of --trials 1 finished" in err
    assert summary["counts"]["total"] == 3 and summary["counts"]["running"] == 1
    assert "best: trial #2 (the defaults), " in out_text, out_text
    assert "of 3 trials: 1 complete, 1 interrupted, 1 running" in out_text
    assert "the defaults were best: no tuned setting beat them" in out_text
    import sqlalchemy

    with storage.engine.connect() as conn:  # the tune kept a heartbeat for the trial it ran
        beating = {row[0] for row in conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}
    assert len(beating) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks as a process would
def test_only_trials_without_a_recent_heartbeat_are_failed(tmp_path) -> None:
    from peftkit.tuning.storage import fail_stale_trials, open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/study.db")
    study = optuna.create_study(storage=storage)
    fresh, _unbeaten, stale = study.ask(), study.ask(), study.ask()
    storage.record_heartbeat(fresh._trial_id)  # unbeaten: asked, its first beat not yet recorded
    storage.record_heartbeat(stale._trial_id)
    _age_heartbeat(storage, stale._trial_id, minutes=3)
    lines: list[str] = []
    assert fail_stale_trials(study, lines.append) == 1 and len(lines) == 1 and "trial #2 " in lines[0]
    states = [t.state.name for t in study.get_trials()]
    assert states == ["RUNNING", "RUNNING", "FAIL"]
    assert study.get_trials()[2].user_attrs["interrupted"]
    assert fail_stale_trials(study, lines.append) == 0  # failed once, said once
    memory = optuna.create_study()  # a storage without heartbeats: nothing to fail, no error
    memory.ask()
    assert fail_stale_trials(memory, lines.append) == 0 and len(lines) == 1


def test_ctrl_c_on_the_defaults_trial_queues_them_again(tiny_model_dir, tiny_csv, tmp_path, monkeypatch) -> None:
    import peftkit
    from peftkit.errors import RunInterrupted
    from peftkit.tuning import search
    from peftkit.tuning.config import TuneConfig

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(search, "run_trial", interrupted)
    run = RunConfig(
        strategy="head_only",
        model=tiny_model_dir("bert"),
        dataset=tiny_csv,
        max_train_samples=64,
        max_eval_samples=32,
        epochs=1,
        batch_size=8,
        max_length=16,
    )
    with pytest.raises(RunInterrupted):
        peftkit.tune(TuneConfig(run=run, trials=1, output_dir=str(tmp_path / "out")), echo=lambda _l: None)
    study = optuna.load_study(study_name="tune-head_only", storage=f"sqlite:///{tmp_path}/out/study.db")
    first, again = study.get_trials()
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    assert first.user_attrs["error"].startswith("interrupted: ")  # trials.csv's error is not empty
    assert again.state.name == "WAITING" and again.user_attrs["defaults"]
    assert again.system_attrs["fixed_params"] == first.params


def _schedule(patience: int | None) -> Schedule:
    return Schedule(
        epochs=10,
        early_stopping_patience=patience,
        steps_per_epoch=16,
        default_epochs=3,
        how="raised" if patience else "default",
        reason="",
    )


def test_the_pruner_judges_no_trial_before_the_defaults_could_stop_early() -> None:
    """On small data validation sits at the majority rate for the first epochs; a trial that starts
    like that is not pruned before epoch patience + 1, and is pruned from then on if still behind."""
    from peftkit.tuning.search import make_pruner, pruning_grace

    assert pruning_grace(None) == 1 and pruning_grace(_schedule(None)) == 1
    assert pruning_grace(_schedule(2)) == 3 and pruning_grace(_schedule(4)) == 5
    for name in ("median", "hyperband"):
        study = optuna.create_study(
            direction="maximize",
            pruner=make_pruner(name, pruning_grace(_schedule(2))),
            sampler=optuna.samplers.RandomSampler(seed=0),
        )
        for _ in range(4):  # trials that rose quickly
            done = study.ask()
            for epoch, value in enumerate([0.6, 0.75, 0.78, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8], start=1):
                done.report(value, step=epoch)
            study.tell(done, 0.8)
        slow = study.ask()
        verdicts = []
        for epoch in range(1, 10):
            slow.report(0.57, step=epoch)  # never moves from the majority rate
            verdicts.append(slow.should_prune())
        assert verdicts[:2] == [False, False], name  # epochs 1 and 2: too early to judge
        if name == "median":  # hyperband needs more trials per bracket than this to prune at all
            assert any(verdicts[2:])  # from epoch 3 a trial still at the start is pruned


def _study_with(best: str, defaults: str):
    import optuna
    from optuna.distributions import FloatDistribution

    study = optuna.create_study(direction="maximize")
    for number, (bits, is_defaults) in enumerate([(defaults, True), (best, False)]):
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": 1e-3 * (number + 1)},
                distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
                value=bits.count("1") / len(bits),
                user_attrs={"defaults": is_defaults, "validation_correct": bits},
            )
        )
    return study


def test_the_best_trial_is_judged_against_the_defaults_on_the_same_examples() -> None:
    """The best of N trials on a few hundred validation examples can be luck: tune says whether
    its gain over the defaults is beyond validation noise (paired, example by example)."""
    from peftkit.tuning.report import describe_versus_defaults, versus_defaults

    # 300 examples; the best gets 40 more right and none fewer: clearly better
    clear = versus_defaults(_study_with("1" * 240 + "0" * 60, "1" * 200 + "0" * 100))
    assert clear["best_trial"] == 1 and clear["defaults_trial"] == 0 and clear["examples"] == 300
    assert clear["difference"] == pytest.approx(40 / 300) and clear["best_only"] == 40 and clear["defaults_only"] == 0
    assert clear["distinguishable"] and clear["p_value"] < 0.001 and clear["low"] > 0
    assert "beyond validation noise" in describe_versus_defaults(clear)
    # net two more right out of 300 (+0.7 points, what the first bench's tuning chose on): 12
    # examples only the best got right, 10 only the defaults did: noise
    noise = versus_defaults(_study_with("0" * 10 + "1" * 190 + "1" * 12 + "0" * 88, "1" * 200 + "0" * 100))
    assert noise["difference"] == pytest.approx(2 / 300) and (noise["best_only"], noise["defaults_only"]) == (12, 10)
    assert not noise["distinguishable"] and noise["mcnemar_p"] > 0.5 and noise["low"] < 0 < noise["high"]
    assert "within validation noise" in describe_versus_defaults(noise)
    # the defaults are the best, or a trial without per-example records: nothing to say
    assert versus_defaults(_study_with("1" * 10 + "0" * 10, "1" * 20)) is None
    assert versus_defaults(_study_with("1" * 10, "1" * 5 + "0" * 6)) is None  # not the same examples


# -- numbering and counts, with a stand-in for the trial's worker (no training: seconds) -----------


def _stand_in_plan(tmp_path: pathlib.Path, trials: int):
    """A resolved plan for head_only at fixed epochs, without data: the stand-in runner trains nothing."""
    from peftkit.tuning.config import TuneConfig, TunePlan

    base = RunConfig(strategy="head_only", epochs=2)
    config = TuneConfig(run=base, trials=trials, pruner="none", output_dir=str(tmp_path))
    return TunePlan(
        config,
        registry.get_strategy("head_only"),
        base,
        {"epochs": 2},
        "accuracy",
        "maximize",
        str(tmp_path),
        f"sqlite:///{tmp_path}/study.db",
        "stand-in",
    )


def _scripted(monkeypatch, script: dict) -> None:
    """Replace the worker by ``script[trial number]``: (status, epochs' values, error); ``stop``
    reports its values and then is Ctrl-C'd."""
    from peftkit.tuning import search
    from peftkit.tuning.trial import TrialOutcome

    def run_trial(trial, _cfg, _plan, prunable):
        status, values, error = script[trial.number]
        for epoch, value in enumerate(values, start=1):
            trial.report(value, step=epoch)
        if status == "stop":
            raise KeyboardInterrupt
        return TrialOutcome(status, max(values) if status == "ok" else None, list(values), error, 1.0)

    monkeypatch.setattr(search, "run_trial", run_trial)


# trial #0 the defaults (a float32 metric's value), #1 pruned, #2 failed before any epoch, #3 failed
# after one, #4 stopped by Ctrl-C after one
_SCRIPT = {
    0: ("ok", [0.5, 0.7200000286102295], None),
    1: ("pruned", [0.4], None),
    2: ("failed", [], "boom"),
    3: ("oom", [0.6], "out of memory"),
    4: ("stop", [0.55], None),
}


def _interrupted_study(tmp_path, monkeypatch) -> tuple:
    """The stand-in study of ``_SCRIPT`` after its Ctrl-C: (plan, study, progress lines, the message)."""
    from peftkit.errors import RunInterrupted
    from peftkit.tuning.search import open_study, optimize
    from peftkit.tuning.storage import open_storage

    plan = _stand_in_plan(tmp_path, trials=5)
    _scripted(monkeypatch, _SCRIPT)
    lines: list[str] = []
    study = open_study(plan, open_storage(plan.storage), lines.append)
    with pytest.raises(RunInterrupted) as stopped:
        optimize(study, plan, lines.append)
    return plan, study, lines, str(stopped.value.kept)


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_every_message_names_a_trial_by_its_number_and_counts_alike(tmp_path, monkeypatch) -> None:
    """Issue 32 (7): "trial 4/5 (#3)" then "trial 4 was stopped" (meaning #4); "4 finished", "5 trials
    so far", "best of 6". Now a trial is #N (its number in the study) everywhere, and every count
    says what it counts, with the same figures in every line."""
    import re

    from peftkit.tuning.search import open_study, optimize
    from peftkit.tuning.storage import open_storage
    from peftkit.tuning.trial import TrialCounts

    plan, study, lines, stopped = _interrupted_study(tmp_path, monkeypatch)
    assert "trial #0 is the defaults" in lines[0] and "5 trials have finished (complete, pruned or failed" in lines[0]
    progress = lines[1:]
    assert [re.match(r"trial #(\d+)", line).group(1) for line in progress] == ["0", "1", "2", "3"]
    assert progress[0].startswith("trial #0 (the defaults): ")
    assert [re.search(r"; (\d) of --trials 5 finished", line).group(1) for line in progress] == ["1", "2", "3", "4"]
    assert not any(re.search(r"\(#\d|trial \d", line) for line in lines)  # no second numbering
    assert "(best so far: trial #0, 0.7200)" in progress[1]
    assert stopped.startswith("trial #4 was stopped and marked interrupted (it does not count toward --trials")
    stand = "5 trials: 1 complete, 1 pruned, 2 failed, 1 interrupted; 4 of --trials 5 finished, 1 to go"
    assert stand in stopped
    counts = TrialCounts.of(study)
    assert (counts.finished, counts.total, counts.interrupted) == (4, 5, 1)

    # continued: the same figures, the same words; then the trial that takes #4's place
    _scripted(monkeypatch, {5: ("ok", [0.6, 0.8], None)})
    again: list[str] = []
    study = open_study(plan, open_storage(plan.storage), again.append)
    assert again == [f"tune: continuing study 'stand-in' in {plan.storage}: {stand}"]
    assert optimize(study, plan, again.append) == 1
    assert again[1].startswith("trial #5: ") and "; 5 of --trials 5 finished" in again[1]
    assert "(best so far: trial #5, 0.8000)" in again[1]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_trials_csv_names_the_interruption_and_rounds_its_numbers(tmp_path, monkeypatch) -> None:
    """An interrupted trial's error is not empty, and 0.7200000286102295 (a float32 metric) reads 0.72;
    trials.json keeps every digit, and its counts agree with the lines'."""
    import csv

    from peftkit.tuning.report import write_reports
    from peftkit.tuning.trial import best_config

    plan, study, _, _ = _interrupted_study(tmp_path, monkeypatch)
    stage = tmp_path / "stage"
    stage.mkdir()
    write_reports(str(stage), plan, study, best_config(plan, study), {})
    rows = list(csv.DictReader((stage / "trials.csv").open()))
    assert [r["state"] for r in rows] == ["complete", "pruned", "failed", "failed", "interrupted"]
    assert rows[0]["value"] == "0.72" and json.loads(rows[0]["validation_per_epoch"]) == {"1": 0.5, "2": 0.72}
    assert rows[4]["error"].startswith("interrupted") and rows[2]["error"] == "failed: boom"
    assert rows[3]["error"] == "oom: out of memory" and rows[1]["error"] == ""
    assert all(len(r["lr"]) <= 12 for r in rows)  # six significant digits at most
    summary = _trials(stage)
    assert summary["rows"][0]["value"] == 0.7200000286102295  # the data file keeps every digit
    assert summary["counts"] == {
        "complete": 1,
        "pruned": 1,
        "failed": 2,
        "interrupted": 1,
        "running": 0,
        "finished": 4,
        "total": 5,
    }
    assert summary["counted"] == 4 and summary["defaults_best"] is True
    header = (stage / "best.yaml").read_text().splitlines()[:2]
    assert header[0].startswith(
        "# peftkit tune: trial #0, the best of study 'stand-in' (5 trials: 1 complete, "
        "1 pruned, 2 failed, 1 interrupted)"
    )
    assert header[1] == "# the defaults were best: no tuned setting beat them"


def test_an_old_interrupted_trial_without_an_error_still_says_why() -> None:
    """A study from before the error was recorded: its interrupted trial's row says so all the same."""
    from peftkit.tuning.report import trial_rows

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs={"interrupted": True}))
    assert [(r["state"], r["error"]) for r in trial_rows(study)] == [("interrupted", "interrupted")]


def test_the_end_says_in_words_when_the_defaults_won() -> None:
    from peftkit.tuning.report import describe_best
    from peftkit.tuning.trial import TrialCounts

    counts = TrialCounts(complete=4, pruned=1, failed=1)
    won = describe_best(counts, 0, "accuracy", 0.8125, {"lr": 0.003, "pooling": "mean"}, defaults_best=True)
    assert won == [
        "best: trial #0 (the defaults), validation accuracy 0.8125 (lr=0.003, pooling=mean); of 6 trials: "
        "4 complete, 1 pruned, 1 failed",
        "the defaults were best: no tuned setting beat them on validation accuracy (over 4 complete trials)",
    ]
    tuned = describe_best(counts, 3, "accuracy", 0.84, {"lr": 0.0012345}, defaults_best=False)
    assert tuned == [
        "best: trial #3, validation accuracy 0.8400 (lr=0.001234); of 6 trials: 4 complete, 1 pruned, 1 failed"
    ]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")
def test_the_history_plot_shows_pruned_and_failed_trials(tmp_path, monkeypatch) -> None:
    """Optuna's own plot drew complete trials only: here every trial is drawn, each state its own
    marker in the legend, at its last epoch's value (on the x axis where it reported none)."""
    import matplotlib

    matplotlib.use("Agg")
    from peftkit.tuning.report import history_points, plot_history, write_plots

    _, study, _, _ = _interrupted_study(tmp_path, monkeypatch)
    points = history_points(study)
    assert points == {
        "complete": [(0, 0.7200000286102295)],
        "pruned": [(1, 0.4)],
        "failed": [(2, None), (3, 0.6)],
        "interrupted": [(4, 0.55)],
    }
    fig = plot_history(study, "accuracy")
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [
        "best so far",
        "complete",
        "pruned (at its last epoch's value)",
        "failed (at its last epoch's value)",
        "interrupted (at its last epoch's value)",
        "failed (no validation: on the x axis)",
    ]
    drawn = sorted(tuple(xy) for c in ax.collections for xy in c.get_offsets().tolist())
    assert [x for x, _ in drawn] == [0, 1, 2, 3, 4]  # every trial, the one without a value too
    assert ax.get_ylim()[0] > 0.3  # the trial on the x axis does not stretch the value scale to 0
    assert ax.get_ylabel() == "validation accuracy"
    assert write_plots(study, str(tmp_path), "accuracy")[0] == "optimization_history.png"
    assert (tmp_path / "optimization_history.png").stat().st_size > 10_000
