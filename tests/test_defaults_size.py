"""Data-size-aware defaults (issue 19): a small training set trains more epochs (at least each
strategy's ``min_steps`` optimizer steps) with early stopping; a large one trains as it always did;
the user's ``--epochs`` is obeyed. Unit tests of ``Strategy.schedule``, then tiny-model runs and a
tune plan that must record and use the chosen epochs."""

from __future__ import annotations

import json

import pytest
import yaml

from peftkit import registry
from peftkit.config import RunConfig
from peftkit.strategies.base import TrainingDefaults, optimizer_steps_per_epoch
from peftkit.train import resolve, size_schedule

EMBEDDED_TRAIN = 10_201  # the embedded default's training split: 319 steps an epoch at batch 32

# what each strategy trained with on the embedded default before issue 19, warmup steps included
# (int(0.06 * 319 * epochs)): these figures, and every result measured with them, must not move
BEFORE = {
    "full": dict(lr=1e-4, epochs=1, batch_size=32, weight_decay=0.01, warmup_ratio=0.06, warmup=19),
    "head_only": dict(lr=3e-3, epochs=20, batch_size=32, weight_decay=0.0, warmup_ratio=0.06, warmup=382),
    "gradual_unfreeze": dict(lr=1e-3, epochs=2, batch_size=32, weight_decay=0.01, warmup_ratio=0.06, warmup=38),
    "lora": dict(lr=2e-3, epochs=1, batch_size=32, weight_decay=0.01, warmup_ratio=0.06, warmup=19),
    "adapter": dict(lr=3e-3, epochs=2, batch_size=32, weight_decay=0.01, warmup_ratio=0.06, warmup=38),
    "prefix": dict(lr=1e-2, epochs=1, batch_size=32, weight_decay=0.0, warmup_ratio=0.06, warmup=19),
}


def _strategy(name: str):
    cls = registry.get_strategy(name)
    return cls(cls.Options())


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_the_embedded_default_trains_exactly_as_before(name: str) -> None:
    run = resolve(RunConfig(strategy=name))
    schedule = size_schedule(run, EMBEDDED_TRAIN)
    hp, want = run.hparams, BEFORE[name]
    assert schedule.how == "default" and schedule.steps_per_epoch == 319
    assert (hp.lr, hp.epochs, hp.batch_size, hp.weight_decay, hp.warmup_ratio) == (
        want["lr"],
        want["epochs"],
        want["batch_size"],
        want["weight_decay"],
        want["warmup_ratio"],
    )
    assert hp.warmup_steps(319 * hp.epochs) == want["warmup"]
    assert run.config.early_stopping_patience is None  # no early stopping where there was none


def test_small_data_raises_epochs_with_early_stopping_and_says_why() -> None:
    schedule = _strategy("lora").schedule(640, 32)
    assert (schedule.epochs, schedule.steps_per_epoch, schedule.early_stopping_patience) == (8, 20, 3)
    assert schedule.how == "raised" and schedule.worth_saying
    # the patience covers at least a third of min_steps (3 x 20 >= 50): on a few hundred examples
    # validation often sits at the majority class for the first tiny epochs before it rises
    assert schedule.reason == (
        "640 examples: 20 steps per epoch; training 8 epochs (at least 150 steps), "
        "early stopping after 3 epochs (60 steps) without gain (--epochs N to choose)"
    )


def test_the_raise_is_capped_and_counts_the_global_batch_and_accumulation() -> None:
    lora = _strategy("lora").schedule(40, 32)
    # 2 steps an epoch: capped at max_epochs, and a patience of 25 (50 steps) would outlast them
    assert (lora.epochs, lora.early_stopping_patience) == (20, 10)
    assert "40 steps: lora trains at most 20 epochs by default" in lora.reason
    head = _strategy("head_only").schedule(40, 32)  # head_only's epochs are cheap: up to 100
    assert (head.epochs, head.early_stopping_patience) == (75, 25)
    # gradual_unfreeze needs its groups unfrozen (8 x 40 steps on MiniLM) and trained after
    assert _strategy("gradual_unfreeze").schedule(640, 32).epochs == 20
    # batch 16 x 2 accumulated: a step is 32 examples, as at batch 32
    assert _strategy("lora").schedule(640, 16, grad_accumulation=2).steps_per_epoch == 20
    assert optimizer_steps_per_epoch(641, 32) == 21 and optimizer_steps_per_epoch(640, 8, 3) == 27


def test_explicit_epochs_are_obeyed_and_a_user_patience_kept() -> None:
    lora = _strategy("lora")
    obeyed = lora.schedule(640, 32, epochs=1)
    assert (obeyed.epochs, obeyed.early_stopping_patience, obeyed.how) == (1, None, "set")
    assert obeyed.reason.startswith("note: 1 epoch(s) as set, on 640 examples, make 20 optimizer steps")
    enough = lora.schedule(640, 32, epochs=8)
    assert (enough.epochs, enough.how, enough.worth_saying) == (8, "set", False)
    kept = lora.schedule(640, 32, patience=5)
    assert (kept.epochs, kept.early_stopping_patience) == (8, 5) and "as set" in kept.reason
    assert lora.schedule(EMBEDDED_TRAIN, 32, patience=2).early_stopping_patience == 2


def test_warmup_is_a_ratio_of_the_run_with_a_cap() -> None:
    d = TrainingDefaults(lr=1e-3, epochs=1)
    assert d.warmup_steps(150) == 9 and d.warmup_steps(20) == 1
    assert d.warmup_steps(1_000_000) == 1000  # not 60,000 steps below the rate


def _tiny_run(run_cli, tiny_model_dir, tiny_csv, out, *extra: str) -> tuple[dict, dict, str]:
    code, _, err = run_cli(
        "run",
        "--strategy",
        "lora",
        "--model",
        tiny_model_dir("bert"),
        "--dataset",
        tiny_csv,
        "--max-train-samples",
        "40",
        "--max-eval-samples",
        "16",
        "--max-length",
        "16",
        "--output-dir",
        str(out),
        *extra,
    )
    assert code == 0, err
    config = yaml.safe_load((out / "config.yaml").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    return config, metrics, err


def test_a_small_run_records_its_raised_epochs(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    config, metrics, err = _tiny_run(run_cli, tiny_model_dir, tiny_csv, tmp_path / "run")
    # 40 examples at batch 32: 2 steps an epoch, raised to lora's cap of 20 epochs
    assert config["epochs"] == 20 and config["early_stopping_patience"] == 10
    assert config["schedule"]["how"] == "raised" and config["schedule"]["default_epochs"] == 1
    assert metrics["epochs"] == 20 and metrics["schedule"] == config["schedule"]
    assert "40 examples: 2 steps per epoch; training 20 epochs" in err
    # what config.yaml recorded is what a rerun (or --resume) reads: epochs then count as set
    again = RunConfig.from_dict({k: v for k, v in config.items() if k in ("epochs", "early_stopping_patience")})
    assert (again.epochs, again.early_stopping_patience) == (20, 10)


def test_a_small_run_with_explicit_epochs_trains_them(run_cli, tiny_model_dir, tiny_csv, tmp_path) -> None:
    config, metrics, err = _tiny_run(run_cli, tiny_model_dir, tiny_csv, tmp_path / "run", "--epochs", "1")
    assert config["epochs"] == 1 and config["early_stopping_patience"] is None and metrics["epochs_run"] == 1
    assert "note: 1 epoch(s) as set, on 40 examples, make 2 optimizer steps" in err


def test_tune_trial_zero_gets_the_raised_epochs(tiny_model_dir, tiny_csv, tmp_path) -> None:
    import optuna

    from peftkit.tuning.config import TuneConfig, plan_tune
    from peftkit.tuning.trial import SearchTrial, trial_config, trial_zero

    said: list[str] = []
    run = RunConfig(
        strategy="lora", model=tiny_model_dir("bert"), dataset=tiny_csv, max_train_samples=40, max_length=16
    )
    plan = plan_tune(TuneConfig(run=run, output_dir=str(tmp_path / "tune")), echo=said.append)
    zero = trial_zero(plan)
    assert zero["epochs"] == 20  # what a plain run trains on these 40 examples, not lora's 1
    assert any("training 20 epochs" in line for line in said)
    assert trial_config(plan, zero, str(tmp_path / "t0")).early_stopping_patience == 10
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    searched = {
        plan.strategy.search_space(SearchTrial(study.ask(), plan.fixed, {}), plan.defaults)["epochs"] for _ in range(30)
    }
    assert min(searched) >= 10 and max(searched) <= 40 and max(searched) > 20  # half to twice the raised
