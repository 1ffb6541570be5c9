"""The search: the study opened (or continued) and its trials run until ``--trials`` count.

The parent process holds the study (TPE sampler, seeded; a pruner that judges no trial before a
plain run could stop early: ``pruning_grace``) and asks it for each trial's settings; each trial
runs in a worker (``peftkit.tuning.trial.run_trial``), and ``optimize`` tells the study how it
ended, with a progress line each (``progress_line``: the value, the best so far, the count against
``--trials`` and the time left). Trial 0 is the defaults and is never pruned, so the tuned result is
never worse on validation. A study made for other settings is refused (``StudyMismatch``).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..durations import format_duration, parse_duration, time_left
from ..errors import PeftkitError, RunInterrupted
from ..strategies.base import Schedule
from .config import TunePlan
from .output import prepare_output
from .storage import REPLACED, fail_stale_trials, heartbeat, mark_interrupted, masked, open_storage
from .trial import SearchTrial, TrialCounts, TrialOutcome, counted, run_trial, still_to_run, trial_config, trial_zero

if TYPE_CHECKING:  # pragma: no cover
    import optuna

Echo = Callable[[str], None]


def run_study(plan: TunePlan, echo: Echo) -> tuple[optuna.Study, int]:
    """``peftkit tune``'s search: the output directory made or found (``prepare_output``), the
    study opened or continued, and trials run until the study counts ``--trials`` or the timeout
    passes. Returns the study and how many trials this call ran."""
    prepare_output(plan)
    study = open_study(plan, open_storage(plan.storage), echo)
    return study, optimize(study, plan, echo)


def pruning_grace(schedule: Schedule | None) -> int:
    """The first epoch after which a trial may be pruned: the first at which a plain run with the
    defaults could stop early (its patience + 1), or 1 where the defaults do not stop early.

    On a small training set validation sits at the majority rate for the first epochs and then
    rises (issue 19); a median pruner judging epoch 1 there pruned every trial that started like
    the defaults (bench --tune on 1,000 examples: 5 of the adapter's 8 trials, all at the defaults'
    own epoch-1 value)."""
    if schedule is None or not schedule.early_stopping_patience:
        return 1
    return schedule.early_stopping_patience + 1


def make_pruner(pruner: Any, grace: int = 1) -> Any:
    """The optuna pruner ``pruner`` names (an object is used as it is), judging no trial before
    epoch ``grace`` (``pruning_grace``)."""
    import optuna

    if not isinstance(pruner, str):
        return pruner
    return {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=grace),
        "hyperband": lambda: optuna.pruners.HyperbandPruner(min_resource=grace),
        "none": optuna.pruners.NopPruner,
    }[pruner]()


class StudyMismatch(PeftkitError):
    """The study exists and was made for other settings; ``mismatch`` says how, without tune's
    advice (a bench gives its own: another ``--tune-storage``)."""

    def __init__(self, message: str, mismatch: str) -> None:
        super().__init__(message)
        self.mismatch = mismatch


def open_study(plan: TunePlan, storage: Any, echo: Echo) -> optuna.Study:
    """Load the plan's study, or create it with trial 0 (the defaults) queued. A study made for
    another strategy, task, model, dataset or metric is refused unless ``overwrite`` (then it is
    deleted and made afresh)."""
    import optuna

    name = plan.study_name
    exists = name in optuna.get_all_study_names(storage)
    if exists:
        made_for = optuna.load_study(study_name=name, storage=storage).user_attrs.get("peftkit")
        differs = _differences(made_for, plan.identity)
        if differs is not None and not plan.config.overwrite:
            mine = {k: plan.identity.get(k) for k in differs} if differs else plan.identity
            mismatch = (
                f"study {name!r} in {masked(plan.storage)} was made for {_describe(differs)}, not {_describe(mine)}"
            )
            raise StudyMismatch(
                f"{mismatch}; choose another --study-name or --output-dir, or --overwrite to start it afresh", mismatch
            )
        if differs is not None:
            optuna.delete_study(study_name=name, storage=storage)
            exists = False
    trials_done = 0 if not exists else len(optuna.load_study(study_name=name, storage=storage).trials)
    # seeded, and different for each process joining the study at another point; constant_liar
    # keeps processes that run at the same time from trying the same point
    sampler = optuna.samplers.TPESampler(seed=plan.base.seed * 100_003 + trials_done, constant_liar=True)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction=plan.direction,
        sampler=sampler,
        pruner=make_pruner(plan.config.pruner, pruning_grace(plan.schedule)),
        load_if_exists=True,
    )
    if not study.user_attrs.get("peftkit"):
        study.set_user_attr("peftkit", plan.identity)
        study.set_user_attr("settings", plan.base.to_dict())
    if not study.trials:
        study.enqueue_trial(trial_zero(plan), user_attrs={"defaults": True}, skip_if_exists=True)
        echo(
            f"tune: new study {name!r} in {masked(plan.storage)}; trial #0 is the defaults of "
            f"{plan.strategy.name}; it ends when {plan.config.trials} trials have finished (complete, pruned or "
            "failed; an interrupted one is replaced)"
        )
    else:
        echo(f"tune: continuing study {name!r} in {masked(plan.storage)}: {still_to_run(TrialCounts.of(study), plan)}")
    return study


def _differences(made_for: dict[str, Any] | None, identity: dict[str, Any]) -> dict[str, Any] | None:
    """What of ``made_for`` (a study's record) ``identity`` does not match: None where it matches,
    ``{}`` for a study peftkit did not make. A record without a key (a study from a peftkit
    before the key was recorded) is not judged on it."""
    if not made_for:
        return {}
    differs = {k: v for k, v in made_for.items() if identity.get(k) != v}
    return differs or None


def _describe(identity: dict[str, Any] | None) -> str:
    if not identity:
        return "something other than peftkit tune"
    return ", ".join(f"{k} {v}" for k, v in identity.items())


def optimize(study: optuna.Study, plan: TunePlan, echo: Echo) -> int:
    """Run trials until the study counts ``trials`` of them or the timeout passes; a line per
    trial. Before each, trials left running by a process that stopped are failed
    (``fail_stale_trials``); while one runs, its heartbeat is kept. Returns how many this call ran.
    Ctrl-C marks the running trial failed (``interrupted``) and raises ``RunInterrupted`` saying how
    to continue."""
    from optuna.exceptions import UpdateFinishedTrialError

    cfg = plan.config
    deadline = time.monotonic() + parse_duration(cfg.timeout) if cfg.timeout is not None else None
    ran: list[float] = []
    while counted(study) < cfg.trials and (deadline is None or time.monotonic() < deadline):
        fail_stale_trials(study, echo)
        with warnings.catch_warnings():
            # optuna warns that heartbeats are meant for its optimize(): here they are kept below
            warnings.filterwarnings("ignore", "Heartbeat of storage is supposed to be used")
            trial = study.ask()
        try:
            # ask/tell: the asking process keeps the heartbeat, as optuna's own optimize does
            with heartbeat(study, trial):
                values = plan.strategy.search_space(SearchTrial(trial, plan.fixed, cfg.space), plan.defaults)
                run_cfg = trial_config(plan, values, os.path.join(plan.output_dir, "trials", f"{trial.number:04d}"))
                outcome = run_trial(trial, run_cfg, plan, prunable=not trial.user_attrs.get("defaults"))
            _tell(study, trial, outcome)
        except UpdateFinishedTrialError:  # its heartbeat was late past the grace: another process failed it
            echo(
                f"tune: trial #{trial.number} was marked interrupted by another process while it ran (its "
                f"heartbeat was late): its result is dropped ({REPLACED})"
            )
            continue
        except KeyboardInterrupt:
            mark_interrupted(study, trial)
            raise RunInterrupted(
                f"trial #{trial.number} was stopped and marked interrupted ({REPLACED}); study "
                f"{plan.study_name!r} in {masked(plan.storage)} keeps "
                f"{still_to_run(TrialCounts.of(study), plan)}: run the same peftkit tune command "
                "again to continue it"
            ) from None
        ran.append(outcome.seconds)
        name = f"#{trial.number} (the defaults)" if trial.user_attrs.get("defaults") else f"#{trial.number}"
        echo(progress_line(study, plan, name, values, outcome, ran, deadline))
        if outcome.status == "refused":
            raise PeftkitError(outcome.error or "the trial was refused")
    return len(ran)


def _tell(study: optuna.Study, trial: Any, outcome: TrialOutcome) -> None:
    from optuna.trial import TrialState

    trial.set_user_attr("seconds", round(outcome.seconds, 2))
    if outcome.correct:
        trial.set_user_attr("validation_correct", outcome.correct)
    if outcome.status == "ok":
        study.tell(trial, outcome.value)
        return
    if outcome.error:
        trial.set_user_attr("error", f"{outcome.status}: {outcome.error}")
    study.tell(trial, state=TrialState.PRUNED if outcome.status == "pruned" else TrialState.FAIL)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def progress_line(
    study: optuna.Study,
    plan: TunePlan,
    name: str,
    values: dict[str, Any],
    outcome: TrialOutcome,
    ran: list[float],
    deadline: float | None,
) -> str:
    """``trial #2: lr=0.0012, r=8 -> validation accuracy 0.8125 (best so far: trial #0, 0.8200); 12 s;
    3 of --trials 10 finished, about 1m24s left``. ``name`` is ``#N``, the trial's number in the study
    (trials.csv's ``number``, its folder trials/NNNN, trial #0 the defaults), the one way every
    message names a trial; the count says what it counts (finished: complete, pruned or failed)."""
    done = counted(study)
    shown = ", ".join(f"{k}={_short(v)}" for k, v in values.items() if k not in plan.fixed)
    if outcome.status == "ok":
        result = f"validation {plan.metric} {outcome.value:.4f}"
    elif outcome.status == "pruned":
        result = f"pruned after epoch {len(outcome.epochs)} (validation {plan.metric} {outcome.epochs[-1]:.4f})"
    else:
        result = f"{outcome.status}: {outcome.error}"
    try:
        best = f"best so far: trial #{study.best_trial.number}, {study.best_value:.4f}"
    except ValueError:  # no complete trial yet
        best = "no trial complete yet"
    left = time_left(sum(ran), len(ran), max(0, plan.config.trials - done), deadline)
    return (
        f"trial {name}: {shown or 'defaults'} -> {result} ({best}); {format_duration(outcome.seconds, hours=False)}; "
        f"{done} of --trials {plan.config.trials} finished, about {format_duration(left, hours=False)} left"
    )
