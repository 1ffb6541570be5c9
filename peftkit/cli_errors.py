"""How a ``peftkit`` command ends: its exit status, and the one line it prints when it fails.

Every error a user can cause is printed as one line starting with ``error:`` and exits with status
2; no traceback. An exception raised inside a library (transformers, peft, accelerate, bitsandbytes,
torch, ...) is one line too, naming the library, the strategy, the model type and the library's
message, with status 1; ``--debug`` (or ``PEFTKIT_DEBUG=1``) shows its traceback instead. Ctrl-C and
``kill`` (SIGTERM) stop a command the same way, with status 130 or 143. Kept apart from
``peftkit.cli`` so that the commands hold only what they do.
"""

from __future__ import annotations

import signal
import traceback
from collections.abc import Callable
from typing import Any

import click

from .env import own_process
from .errors import PeftkitError, debug_requested, error_context, library_error_line, raising_library

# --debug given (PEFTKIT_DEBUG=1 is read when an error happens)
_DEBUG = False
_SIGNALLED: list[int] = []  # the signal that stopped the command (SIGTERM), for its exit status


def request_debug(debug: bool) -> None:
    """``peftkit --debug``: a library's failure shows its traceback."""
    global _DEBUG
    _DEBUG = _DEBUG or debug


def _debug() -> bool:
    return _DEBUG or debug_requested()


def _left_behind(exc: BaseException | None) -> str:
    """What an interrupted command leaves: a run with checkpoints says so (``RunInterrupted``)."""
    return getattr(exc, "kept", "nothing was written")


def _terminate(signum: int, frame: Any) -> None:
    # `kill` (SIGTERM) gets the same clean-up as Ctrl-C: staged output removed, workers stopped
    _SIGNALLED.append(signum)
    raise KeyboardInterrupt


def _interrupted_status() -> int:
    """128 + the signal, as shells report a process a signal stopped: 130 for Ctrl-C (SIGINT),
    143 for ``kill`` (SIGTERM)."""
    return 128 + (_SIGNALLED[-1] if _SIGNALLED else int(signal.SIGINT))


def _error(line: str) -> None:
    click.echo(f"error: {line}", err=True)


def _library_failure(exc: Exception, library: str) -> int:
    """The library's own message, one line, with what we were doing: status 1."""
    line = library_error_line(exc, library)
    if _debug():
        traceback.print_exc()
        _error(line)
    else:
        _error(f"{line} (peftkit --debug ... shows the traceback)")
    return 1


def exit_status(command: Callable[[], Any]) -> int:
    """Run ``command`` (click's ``main`` in ``standalone_mode=False``) as this process's command:
    SIGTERM handled as Ctrl-C, and each way it can fail turned into one line and an exit status."""
    global _DEBUG
    _DEBUG = False
    _SIGNALLED.clear()
    own_process()  # the command line's process is peftkit's (env.freeze_imported_objects)
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (embedded use): keep the default
        pass
    try:
        with error_context():  # the command's own, for its one-line library errors; cli() adds its name
            code = command()
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.NoArgsIsHelpError as exc:  # `peftkit` alone: the help, not "error: Usage: ..."
        exc.show()
        code = exc.exit_code
    except click.exceptions.Abort as exc:  # click's form of Ctrl-C (and of our SIGTERM handler)
        _error(f"interrupted; {_left_behind(exc.__cause__)}")
        code = _interrupted_status()
    except click.ClickException as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _error(f"{exc.format_message()}{hint}")
        code = exc.exit_code
    except PeftkitError as exc:
        _error(str(exc))
        code = 2
    except KeyboardInterrupt as exc:
        _error(f"interrupted; {_left_behind(exc)}")
        code = _interrupted_status()
    except OSError as exc:  # disk full, permission denied: the user's environment, not our bug
        if _debug():
            raise
        _error(str(exc))
        code = 1
    except Exception as exc:
        # Raised inside a library (found by walking the traceback, not by the exception's type)? Anything
        # raised in peftkit's own code is a bug, and its traceback is what a bug report needs: it propagates.
        library = raising_library(exc)
        if library is None:
            raise
        code = _library_failure(exc, library)
    return code if isinstance(code, int) else 0
