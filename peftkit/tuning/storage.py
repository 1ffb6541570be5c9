"""Where a study lives, and every use of Optuna's private API in peftkit, here and nowhere else.

The study is kept in an Optuna ``RDBStorage`` (``open_storage``: an SQLite file ``study.db`` in the
output directory by default, or any database URL SQLAlchemy takes), written as trials finish: it is
what a second ``tune`` into the same directory (or storage and study name) continues, and what
several processes share. ``masked`` hides a URL's password wherever one is shown.

Optuna's public API has no way to do three things a shared, interruptible study needs, so this
module reaches into its private parts (``optuna.storages._heartbeat``, ``Study._storage`` and
``_study_id``, ``FrozenTrial``/``Trial._trial_id``, ``RDBStorage._get_stale_trial_ids``); an Optuna
upgrade that moves them breaks this file alone:

- ``heartbeat``: keep a running trial's heartbeat from the process that asked for it (Optuna's own
  ``optimize`` does this, but peftkit runs trials with ask/tell);
- ``fail_stale_trials``: fail the trials a stopped process left RUNNING, marked ``interrupted``
  first (Optuna's own ``fail_stale_trials`` calls back only once a trial is finished, when its
  attributes can no longer be written);
- ``mark_interrupted``: fail a trial Ctrl-C stopped, and queue the defaults again when it was them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from ..durations import format_duration
from ..errors import PeftkitError, first_line

if TYPE_CHECKING:  # pragma: no cover
    import optuna

Echo = Callable[[str], None]

# While a trial runs, its process records a heartbeat in the study every HEARTBEAT_S seconds; a
# RUNNING trial whose last one is older than STALE_AFTER_S was left by a process that stopped
# without telling the study (SIGKILL, the OOM killer, a machine that went down). Each beat is a
# write to the shared database (an SQLite file every process on the study locks), so no more often
# than this; the grace is four beats, so a live process whose beats are late (a busy database, a
# loaded machine) is never taken for dead, while a dead one's trial is re-run within minutes,
# little next to a trial.
HEARTBEAT_S = 30
STALE_AFTER_S = 120
# what an interrupted trial means for the study, said alike wherever one is reported
REPLACED = "it does not count toward --trials; another trial takes its place"


def masked(url: str) -> str:
    """A storage URL with its password hidden, for messages and files."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL: shown as given (it holds no password then)
        return url


def open_storage(url: str) -> Any:
    """An optuna ``RDBStorage`` on ``url``, with heartbeats (see ``HEARTBEAT_S``); a URL that is
    malformed, names a missing driver or cannot be reached is one line."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=STALE_AFTER_S)
    except Exception as exc:  # noqa: BLE001 - sqlalchemy's and the drivers' errors differ: one line each
        raise PeftkitError(
            f"cannot open storage {masked(url)!r}: {first_line(exc)}; give an SQLAlchemy "
            "database URL such as sqlite:///study.db or postgresql://user@host/db"
        ) from None


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Keep ``trial``'s heartbeat in the study's storage while the block runs (every
    ``HEARTBEAT_S``; ask/tell: the asking process keeps it, as optuna's own optimize does)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def fail_stale_trials(study: optuna.Study, echo: Echo) -> int:
    """Fail the trials a process that stopped (killed, out of memory, its machine down) left
    RUNNING: no heartbeat for ``STALE_AFTER_S``. They are marked ``interrupted`` as Ctrl-C marks a
    trial, so they do not count and the study runs others in their place (the defaults trial is
    queued again); a line each. Trials that live processes run keep beating and are left alone; a
    storage without heartbeats has none to fail. Returns how many this call failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.storages._heartbeat import is_heartbeat_enabled
    from optuna.trial import TrialState

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return 0
    why = f"no heartbeat for over {format_duration(STALE_AFTER_S, hours=False)}"
    failed = 0
    # optuna.storages.fail_stale_trials would fail them too, but its callback comes once a trial is
    # finished, when its attributes can no longer be written: so they are marked first, then failed
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            storage.set_trial_user_attr(trial_id, "interrupted", True)
            storage.set_trial_user_attr(trial_id, "error", f"interrupted: the process running it stopped ({why})")
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                continue
        except UpdateFinishedTrialError:  # another process failed it first (and said so)
            continue
        trial = storage.get_trial(trial_id)
        _queue_defaults_again(study, trial)
        echo(
            f"tune: trial #{trial.number} was left running by a process that stopped ({why}): marked "
            f"interrupted ({REPLACED})"
        )
        failed += 1
    return failed


def _queue_defaults_again(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Queue the defaults again when ``trial``, the defaults trial, did not run its course: the
    tuned result is never worse than the defaults only if they do run."""
    if trial.user_attrs.get("defaults"):
        study.enqueue_trial(trial.system_attrs.get("fixed_params", trial.params), user_attrs={"defaults": True})


def mark_interrupted(study: optuna.Study, trial: Any) -> None:
    """Fail ``trial``, which Ctrl-C (or kill) stopped, as interrupted, with an error that says so
    (trials.csv would otherwise show an empty one); the defaults are queued again. A trial the
    study already holds as finished (the stop came just after it was told) stays as it is."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    try:
        trial.set_user_attr("interrupted", True)
        trial.set_user_attr("error", "interrupted: the tune was stopped (Ctrl-C or kill) while it ran")
        study.tell(trial, state=TrialState.FAIL)
    except (UpdateFinishedTrialError, RuntimeError, ValueError):
        return
    _queue_defaults_again(study, study._storage.get_trial(trial._trial_id))
