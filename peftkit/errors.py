"""The one exception type users see, and how a library's exception becomes one line."""

from __future__ import annotations

import os
from collections.abc import Iterable
from types import TracebackType


class PeftkitError(Exception):
    """A problem with what the user asked for (bad input, missing file, unknown name).

    The command line prints its message as one line and exits with status 2, without a traceback,
    so every message must say what was wrong and what would be accepted.
    """


class PeftkitWarning(UserWarning):
    """Something a library user should know about a result that is not an error (the command line
    prints its own line instead; ``warnings.simplefilter("error", PeftkitWarning)`` makes it one)."""


class LearnedNothingWarning(PeftkitWarning):
    """A run ended without learning anything beyond an answer that needs no training (its
    metrics.json ``learned`` is false); the message gives what the figures say, the likely cause
    and the flag to try (``RunMetrics.learned_note``)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or ``kill``) stopped a command; ``kept`` says what it left behind, for the one-line
    message (``nothing was written``, or that the last checkpoint is kept and how to continue).

    A ``KeyboardInterrupt``, so code that lets interrupts through lets this one through too.
    """

    def __init__(self, kept: str = "nothing was written") -> None:
        super().__init__(kept)
        self.kept = kept


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" (did you mean 'lora'?)"`` for a misspelt ``name`` close to one of ``choices`` (difflib,
    case and ``-`` / ``_`` aside), else ``""``: put right after the bad name in an "unknown ..."
    message, before the list of what is accepted."""
    import difflib

    def norm(value: str) -> str:
        return value.strip().lower().replace("-", "_")

    by_norm = {norm(c): c for c in choices}
    close = difflib.get_close_matches(norm(name), list(by_norm), n=1, cutoff=0.6)
    return f" (did you mean {by_norm[close[0]]!r}?)" if close else ""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line
    errors that wrap a library's multi-line message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


# What the command is doing, for the one-line message: "command", "strategy", "model" (as given),
# and "model_type" (from the loaded config) once known. Set by the commands as they learn them.
_context: dict[str, str] = {}


def set_context(**facts: str | None) -> None:
    """Record what the running command works on (``command=``, ``strategy=``, ``model=``, ``model_type=``),
    for naming it if a library fails; None values are ignored."""
    _context.update({k: str(v) for k, v in facts.items() if v is not None})


def clear_context() -> None:
    """Forget what ``set_context`` recorded (each command starts afresh)."""
    _context.clear()


def _is_installed_file(path: str) -> bool:
    parts = os.path.normpath(path).split(os.sep)
    return "site-packages" in parts or "dist-packages" in parts


def raising_library(exc: BaseException) -> str | None:
    """The third-party library the exception was raised in: the top-level package of the innermost
    traceback frame whose file lies in an installed library (site-packages), peftkit itself aside.
    None when no such frame exists (raised in peftkit's own code or the standard library)."""
    tb: TracebackType | None = exc.__traceback__
    found = None
    while tb is not None:
        frame = tb.tb_frame
        module = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if (
            module
            and module != "peftkit"
            and not module.startswith("peftkit_")
            and _is_installed_file(frame.f_code.co_filename)
        ):
            found = module
        elif module == "peftkit" or module.startswith("peftkit_"):
            found = None  # the library returned; peftkit (or a plugin) raised after it
        tb = tb.tb_next
    return found


def library_error_line(exc: BaseException, library: str) -> str:
    """One line for a library's exception: the library, what peftkit was doing (command, strategy,
    model type, as ``set_context`` recorded them) and the library's own first line, e.g. ``peft raised
    ValueError during run (strategy prefix, model type bert): Model does not support past key ...``."""
    command = _context.get("command")
    what = []
    if "strategy" in _context:
        what.append(f"strategy {_context['strategy']}")
    if "model_type" in _context:
        what.append(f"model type {_context['model_type']}")
    elif "model" in _context:
        what.append(f"model {_context['model']!r}")
    during = f" during {command}" if command else ""
    detail = f" ({', '.join(what)})" if what else ""
    return f"{library} raised {type(exc).__name__}{during}{detail}: {first_line(exc)}"


def debug_requested() -> bool:
    """True when ``PEFTKIT_DEBUG`` is set to 1/true/yes (``peftkit --debug`` sets it): full
    tracebacks instead of one-line library errors."""
    return os.environ.get("PEFTKIT_DEBUG", "").strip().lower() in ("1", "true", "yes")
