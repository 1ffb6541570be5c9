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
from peftkit.strategies.base import TUNED_SETTINGS, default_point, options_from_dict, options_to_dict

REPO = pathlib.Path(__file__).resolve().parent.parent


def _bitfit_from_repo() -> type:
    """The BitFit class of this repository's plugin (an installed copy may be another checkout's)."""
    path = REPO / "plugins" / "peftkit-bitfit" / "peftkit_bitfit" / "__init__.py"
    spec = importlib.util.spec_from_file_location("peftkit_bitfit_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.BitFit


def _strategies() -> dict[str, type]:
    found = {n: c for n, c in registry.available().items() if n != "bitfit"}
    found["bitfit"] = _bitfit_from_repo()
    return found


@pytest.mark.parametrize("name", ["full", "head_only", "gradual_unfreeze", "lora", "adapter", "prefix", "bitfit"])
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
    assert cls.defaults.lr / 10 * 0.999 <= low < cls.defaults.lr < high <= cls.defaults.lr * 10 * 1.001 \
        or name == "bitfit"
    own = {"lora": {"r", "alpha"}, "adapter": {"reduction_factor", "variant"}, "prefix": {"num_virtual_tokens"},
           "gradual_unfreeze": {"unfreeze_every_steps", "lr_decay"}, "head_only": {"pooling"}}.get(name, set())
    assert own <= set(seen), f"{name} searches {sorted(seen)}"
    if name == "bitfit":
        assert 1e-4 <= low and high <= 1e-2


@pytest.mark.parametrize("name", ["head_only", "lora", "adapter", "gradual_unfreeze", "prefix", "bitfit"])
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
    common = ["--strategy", "head_only", "--model", tiny_model_dir("bert"), "--dataset", tiny_csv,
              "--max-train-samples", "64", "--max-eval-samples", "32", "--epochs", "2", "--batch-size", "8",
              "--max-length", "16", "--output-dir", str(out)]
    with pytest.raises(SystemExit) as ended:
        main(["tune", *common, "--trials", "3", "--pruner", "none"])
    assert ended.value.code == 0
    return {"out": out, "common": common}


def _trials(out: pathlib.Path) -> dict:
    return json.loads((out / "trials.json").read_text())


def test_tune_writes_its_reports(study_dir: dict) -> None:
    out = study_dir["out"]
    for name in ("study.db", "best.yaml", "trials.csv", "trials.json", "optimization_history.png",
                 "param_importances.png", "best-run/metrics.json", "trials/0000/train.log"):
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
    assert (summary["versus_defaults"] is None) == best_is_defaults
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
    from peftkit.tuning import TuneConfig

    out = study_dir["out"]
    run = RunConfig(strategy="head_only", model=tiny_model_dir("bert"), dataset=tiny_csv, max_train_samples=64,
                    max_eval_samples=32, epochs=2, batch_size=8, max_length=16)
    lines: list[str] = []
    result = peftkit.tune(TuneConfig(run=run, trials=4, pruner=_PruneAll(), output_dir=str(out)), echo=lines.append)
    assert result.trials == 4 and result.ran == 1  # the three before count toward --trials
    assert any("continuing study 'tune-head_only' (3 trials so far)" in line for line in lines)
    rows = _trials(out)["rows"]
    assert rows[3]["state"] == "pruned" and list(rows[3]["epochs"]) == ["1"]
    assert any("pruned after epoch 1" in line for line in lines)


def test_two_processes_share_one_study(study_dir: dict) -> None:
    out = study_dir["out"]
    before = len(_trials(out)["rows"])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, "-m", "peftkit", "tune", *study_dir["common"], "--trials",
                               str(before + 2), "--pruner", "none"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "trial " in err and "-> validation accuracy" in err  # each ran a trial of its own
    rows = _trials(out)["rows"]
    assert len(rows) >= before + 2 and [r["number"] for r in rows] == list(range(len(rows)))


@pytest.mark.parametrize("extra, message", [
    (["--storage", "not-a-url"], "cannot open storage 'not-a-url'"),
    (["--trials", "0"], "--trials must be a positive integer, got 0"),
    (["--timeout", "soon"], "--timeout 'soon' is not a duration; give e.g. 90s, 30m, 2h"),
    (["--metric", "bleu"], "--metric 'bleu' is not a metric of task 'sequence-classification'; accepted: accuracy"),
    (["--space", "rank=4,8"], "--space 'rank': strategy 'head_only' does not search it; it searches: lr, epochs"),
    (["--space", "pooling=mean,sideways"], "pooling"),
    (["--strategy", "nosuch"], "unknown strategy 'nosuch'"),
])
def test_bad_input_is_one_line(extra: list[str], message: str, run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    out = tmp_path / "out"
    code, _, err = run_cli("tune", "--strategy", "head_only", "--model", tiny_model_dir("bert"), "--dataset", tiny_csv,
                           "--output-dir", str(out), *extra)
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
    from peftkit.tuning import _differences

    now = {"strategy": "lora", "model": "m", "seed": 0, "max_train_samples": 2000}
    assert _differences({"strategy": "lora", "model": "m"}, now) is None  # older record: judged on what it has
    assert _differences({"strategy": "lora", "model": "m", "seed": 1}, now) == {"seed": 1}
    assert _differences(None, now) == {} and _differences({}, now) == {}  # not made by peftkit tune


# -- a process that stopped without telling the study ----------------------------------------------

def _age_heartbeat(storage, trial_id: int, minutes: int) -> None:
    """Backdate ``trial_id``'s heartbeat, as if its process had stopped ``minutes`` ago."""
    import sqlalchemy

    with storage.engine.begin() as conn:
        conn.execute(sqlalchemy.text(f"UPDATE trial_heartbeats SET heartbeat = datetime('now', '-{minutes} minutes') "
                                     "WHERE trial_id = :id"), {"id": trial_id})


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks as a process would
def test_a_killed_tune_is_recovered_by_the_next(tiny_model_dir, tiny_csv, run_cli, tmp_path) -> None:
    from peftkit.api import plan_tune
    from peftkit.tuning import SearchTrial, TuneConfig, open_storage, open_study, prepare_output

    out = tmp_path / "out"
    run = RunConfig(strategy="head_only", model=tiny_model_dir("bert"), dataset=tiny_csv, max_train_samples=64,
                    max_eval_samples=32, epochs=1, batch_size=8, max_length=16)
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

    code, _, err = run_cli("tune", "--strategy", "head_only", "--model", run.model, "--dataset", tiny_csv,
                           "--max-train-samples", "64", "--max-eval-samples", "32", "--epochs", "1",
                           "--batch-size", "8", "--max-length", "16", "--output-dir", str(out), "--trials", "1")
    assert code == 0, err
    assert ("trial #0 was left running by a process that stopped (no heartbeat for over 2m00s): marked failed, "
            "it will be re-run") in err
    assert "trial #1 was left" not in err
    summary = _trials(out)
    rows = summary["rows"]
    assert [(r["number"], r["state"], r["defaults"], r["interrupted"]) for r in rows] == [
        (0, "fail", True, True), (1, "running", False, False), (2, "complete", True, False)]
    assert "the process running it stopped" in rows[0]["error"]
    assert rows[2]["params"] == rows[0]["params"]  # the defaults, run again
    assert summary["counted"] == 1 and summary["best_trial"] == 2
    assert "trial 1/1 (#2)" in err  # the progress counts the trial that ran, not the dead or the live one
    import sqlalchemy

    with storage.engine.connect() as conn:  # the tune kept a heartbeat for the trial it ran
        beating = {row[0] for row in conn.execute(sqlalchemy.text("SELECT trial_id FROM trial_heartbeats"))}
    assert len(beating) == 3


@pytest.mark.filterwarnings("ignore:Heartbeat of storage")  # the test asks as a process would
def test_only_trials_without_a_recent_heartbeat_are_failed(tmp_path) -> None:
    from peftkit.tuning import fail_stale_trials, open_storage

    storage = open_storage(f"sqlite:///{tmp_path}/study.db")
    study = optuna.create_study(storage=storage)
    fresh, unbeaten, stale = study.ask(), study.ask(), study.ask()
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
    from peftkit import tuning
    from peftkit.errors import RunInterrupted

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tuning, "run_trial", interrupted)
    run = RunConfig(strategy="head_only", model=tiny_model_dir("bert"), dataset=tiny_csv, max_train_samples=64,
                    max_eval_samples=32, epochs=1, batch_size=8, max_length=16)
    with pytest.raises(RunInterrupted):
        peftkit.tune(tuning.TuneConfig(run=run, trials=1, output_dir=str(tmp_path / "out")), echo=lambda _l: None)
    study = optuna.load_study(study_name="tune-head_only", storage=f"sqlite:///{tmp_path}/out/study.db")
    first, again = study.get_trials()
    assert first.state.name == "FAIL" and first.user_attrs["interrupted"]
    assert again.state.name == "WAITING" and again.user_attrs["defaults"]
    assert again.system_attrs["fixed_params"] == first.params


def _schedule(patience: int | None) -> "Schedule":
    from peftkit.strategies.base import Schedule

    return Schedule(epochs=10, early_stopping_patience=patience, steps_per_epoch=16, default_epochs=3,
                    how="raised" if patience else "default", reason="")


def test_the_pruner_judges_no_trial_before_the_defaults_could_stop_early() -> None:
    """On small data validation sits at the majority rate for the first epochs; a trial that starts
    like that is not pruned before epoch patience + 1, and is pruned from then on if still behind."""
    from peftkit.tuning import make_pruner, pruning_grace

    assert pruning_grace(None) == 1 and pruning_grace(_schedule(None)) == 1
    assert pruning_grace(_schedule(2)) == 3 and pruning_grace(_schedule(4)) == 5
    for name in ("median", "hyperband"):
        study = optuna.create_study(direction="maximize", pruner=make_pruner(name, pruning_grace(_schedule(2))),
                                    sampler=optuna.samplers.RandomSampler(seed=0))
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
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 1e-3 * (number + 1)}, distributions={"lr": FloatDistribution(1e-4, 1e-1, log=True)},
            value=bits.count("1") / len(bits), user_attrs={"defaults": is_defaults, "validation_correct": bits}))
    return study


def test_the_best_trial_is_judged_against_the_defaults_on_the_same_examples() -> None:
    """The best of N trials on a few hundred validation examples can be luck: tune says whether
    its gain over the defaults is beyond validation noise (paired, example by example)."""
    from peftkit.tuning import describe_versus_defaults, versus_defaults

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
