"""Run directories that appear whole or not at all.

A run is written into a hidden staging directory beside its destination and renamed into place
only when it succeeded, so an interrupted or failed run leaves no half-written directory, and an
existing run is never replaced unless ``--overwrite`` was given.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .checkpoint import latest
from .errors import PeftkitError, RunInterrupted
from .files import private_dir, publish_modes


def check_output_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> None:
    """Refuse a destination that is a file, or an existing directory without ``overwrite``.
    ``flag`` is the option that named it (``merge`` takes ``--output``), for the message."""
    if os.path.isfile(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise PeftkitError(f"output directory {path!r} is a file; choose a directory path")
    if os.path.isdir(path) and not overwrite and os.listdir(path):
        raise PeftkitError(
            f"output directory {path!r} already exists; use --overwrite to replace it or choose another {flag}"
        )
    parent = os.path.dirname(os.path.abspath(path))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK):
        raise PeftkitError(f"cannot create output directory {path!r}: {probe!r} is not a writable directory")


def continued_dir(out: str, overwrite: bool, marker: str, what: str) -> dict[str, Any] | None:
    """An output directory a command writes as it goes and continues when run again (a tune's study,
    a recommend's search), so it cannot be staged: the record in its ``marker`` file when ``out``
    holds one (the caller checks it was made for the same work), else None after making ``out``
    afresh (replacing it with ``overwrite``; the caller writes its marker). A directory holding
    anything but ``what`` is refused unless ``overwrite``."""
    path = os.path.join(out, marker)
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        if not os.path.exists(path):
            raise PeftkitError(
                f"output directory {out!r} exists and holds no {what} ({marker}); use --overwrite to replace it "
                "or choose another --output-dir"
            )
        with open(path, encoding="utf-8") as fh:
            recorded: dict[str, Any] = json.load(fh)
        return recorded
    check_output_dir(out, overwrite=True)
    if os.path.isdir(out) and overwrite:
        shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    return None


@contextlib.contextmanager
def staged_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> Iterator[str]:
    """Yield a staging directory; on success move it to ``path`` (replacing it if ``overwrite``;
    ``flag`` names the option that gave ``path`` in a refusal)."""
    check_output_dir(path, overwrite, flag)
    final = os.path.abspath(path)
    parent = os.path.dirname(final)
    created = []  # parent directories we make, removed again if the run fails
    probe = parent
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(parent, exist_ok=True)
    stage = private_dir(f".{os.path.basename(final)}.partial-", parent)
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for directory in created:  # deepest first
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    _move_into_place(stage, final, path, overwrite, flag)


# -- runs that can be resumed ---------------------------------------------------------------------
# A run's staging directory has a fixed name beside its destination (``.NAME.partial``), so that
# every process of a data-parallel run writes into the same place and ``--resume`` finds an
# interrupted run by the name the user gave.

_CREATED_PARENTS: dict[str, list[str]] = {}


def stage_path(path: str) -> str:
    """The staging directory of the run that will end up at ``path``."""
    final = os.path.abspath(path)
    return os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial")


def open_stage(path: str, overwrite: bool, resume: bool) -> str:
    """Create (or, with ``resume``, find) the staging directory of the run going to ``path``."""
    stage = stage_path(path)
    if resume:
        _refuse_a_stage_given_as_run(path)
        if os.path.isdir(path) and os.path.exists(os.path.join(path, "metrics.json")):
            raise PeftkitError(f"run {path!r} already finished; nothing to resume")
        if not os.path.isdir(stage) or latest(stage) is None:
            raise PeftkitError(
                f"no interrupted run with a checkpoint at {path!r} (looked for {stage}); "
                "only runs started with --checkpoint-every N can be resumed"
            )
        return stage
    check_output_dir(path, overwrite)
    if os.path.isdir(stage):
        if latest(stage) is not None and not overwrite:
            raise PeftkitError(
                f"an interrupted run with checkpoints is at {stage!r}; continue it with "
                f"peftkit run --resume {path}, or start afresh with --overwrite"
            )
        shutil.rmtree(stage)  # left by a run killed before its first checkpoint
    created = []  # parent directories we make, removed again if the run fails
    probe = os.path.dirname(stage)
    while not os.path.exists(probe):
        created.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(stage)
    _CREATED_PARENTS[stage] = created
    return stage


def _refuse_a_stage_given_as_run(path: str) -> None:
    """``--resume runs/.long.partial`` (the directory a user finds on disk) names the staging
    directory, not the run: say which run directory to give instead of looking for
    ``runs/..long.partial.partial``."""
    name = os.path.basename(os.path.normpath(path))
    if name.startswith(".") and name.endswith(".partial") and len(name) > len("..partial"):
        run_dir = os.path.join(os.path.dirname(os.path.normpath(path)), name[1 : -len(".partial")])
        raise PeftkitError(
            f"{path!r} is the staging directory of an interrupted run; resume it by its "
            f"run directory: peftkit run --resume {run_dir}"
        )


def finish_stage(stage: str, path: str, overwrite: bool) -> None:
    """Move a finished run's staging directory to ``path``."""
    _move_into_place(stage, os.path.abspath(path), path, overwrite)


def _move_into_place(stage: str, final: str, path: str, overwrite: bool, flag: str = "--output-dir") -> None:
    """Rename a complete staging directory to ``final`` (replacing it only with ``overwrite``),
    its files first given the modes a plain mkdir/open gives: libraries write some of them through
    private 0600 temporary files, and the user's output should not be less readable than a file
    they wrote themselves."""
    check_output_dir(path, overwrite, flag)  # something may have appeared there while we ran
    publish_modes(stage)
    old = None
    if os.path.exists(final):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.old-", dir=os.path.dirname(final))
        os.rename(final, os.path.join(old, "run"))
    os.rename(stage, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def abandon_stage(stage: str) -> bool:
    """After a failure: keep the staging directory if it holds a checkpoint to resume from (True),
    else remove it."""
    if latest(stage) is not None:
        return True
    shutil.rmtree(stage, ignore_errors=True)
    for directory in _CREATED_PARENTS.pop(stage, []):  # deepest first
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    return False


# -- a run in every process of a launch -----------------------------------------------------------


@dataclass
class RunStage:
    """Where a run writes while it runs (``staged_run``), as this process sees it."""

    path: str
    """The staging directory (``.NAME.partial`` beside the run directory)."""
    main: bool
    """This process writes and reports: the only one, or the main one of a data-parallel launch."""


@contextlib.contextmanager
def staged_run(out: str, overwrite: bool, resume: bool, echo: Callable[[str], None]) -> Iterator[RunStage]:
    """A run's staging, the same in every process of an ``accelerate launch`` / ``torchrun``: join
    the process group; the main process creates ``out``'s staging directory (or, with ``resume``,
    finds it) while the others wait for its answer, so a refusal stops every process instead of
    leaving some waiting forever. When the block ends the processes wait for each other and the
    main one renames the directory to ``out``. A failure keeps it only if it holds a checkpoint,
    and says how to resume (``echo``); Ctrl-C raises ``RunInterrupted`` saying the same."""
    state = _process_state()
    stage = _open_stage_everywhere(state, out, overwrite, resume)
    try:
        yield RunStage(stage, state.is_main_process)
    except BaseException as exc:
        if state.is_main_process and abandon_stage(stage):
            kept = f"the last checkpoint is kept: continue with peftkit run --resume {out}"
            if isinstance(exc, KeyboardInterrupt):
                raise RunInterrupted(kept) from exc  # its message says it once: no echo as well
            echo(f"the run stopped; {kept}")
        raise
    state.wait_for_everyone()
    if state.is_main_process:
        finish_stage(stage, out, overwrite)


def _process_state() -> Any:
    """accelerate's process state: joins the process group under ``accelerate launch`` /
    ``torchrun``. On a machine without a GPU (or when accelerate was told to use the CPU) it must
    be told, or each process trains alone."""
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    return PartialState(cpu=cpu)


def _open_stage_everywhere(state: Any, out: str, overwrite: bool, resume: bool) -> str:
    """The main process creates (or finds) the staging directory; the others wait for its answer."""
    problem: BaseException | None = None
    if state.is_main_process:
        try:
            open_stage(out, overwrite, resume)
        except BaseException as exc:  # the other processes must not wait forever for us
            problem = exc
    if state.num_processes > 1:
        import torch.distributed as dist

        flag = [problem is None]
        dist.broadcast_object_list(flag, src=0)
        if not flag[0] and problem is None:
            raise SystemExit(2)  # the main process reports the error
    if problem is not None:
        raise problem
    return stage_path(out)
