"""The one exception type users see, and how a library's exception becomes one line."""

from __future__ import annotations

import contextlib
import difflib
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from types import TracebackType
from typing import TypeVar

_T = TypeVar("_T")


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
# and "model_type" (from the loaded config) once known. A context variable, not a module global: each
# call of the API has its own (``error_context``), so nothing one call learned names the next call's
# failure, and threads or asyncio tasks running calls side by side do not mix theirs.
_context: ContextVar[dict[str, str] | None] = ContextVar("peftkit_error_context", default=None)
CONTEXT_ATTRIBUTE = "peftkit_context"
"""Where ``error_context`` leaves its facts on an exception that leaves it: the one-line message is
made by whoever catches it (the command line, a bench worker), after the call's context is gone."""


def _facts(facts: dict[str, str | None]) -> dict[str, str]:
    return {k: str(v) for k, v in facts.items() if v is not None}


@contextlib.contextmanager
def error_context(**facts: str | None) -> Iterator[dict[str, str]]:
    """A context of its own for what the code inside works on, starting from the enclosing one's
    (the command's name) plus ``facts``; ``set_context`` inside adds to it, and it ends with the
    block. An exception leaving the block carries the facts (``CONTEXT_ATTRIBUTE``; the innermost
    block's, which know the most). Yields the facts, to re-enter them later (``resumed_context``)."""
    current = {**(_context.get() or {}), **_facts(facts)}
    with resumed_context(current):
        yield current


@contextlib.contextmanager
def resumed_context(current: dict[str, str]) -> Iterator[dict[str, str]]:
    """Enter the facts ``error_context`` yielded once more (a generator's lazy part runs after its
    call returned: ``predict_iter``'s answers)."""
    token = _context.set(current)
    try:
        yield current
    except BaseException as exc:
        if getattr(exc, CONTEXT_ATTRIBUTE, None) is None:
            try:
                setattr(exc, CONTEXT_ATTRIBUTE, dict(current))
            except (AttributeError, TypeError):  # an exception type without attributes: the caller's context
                pass
        raise
    finally:
        _context.reset(token)


def within_context(facts: dict[str, str], items: Iterator[_T]) -> Iterator[_T]:
    """``items`` computed inside the error context of the call that made them (``facts``, what its
    ``error_context`` yielded): a generator runs after that call returned, and a library failing in
    it is named as in the call."""
    with resumed_context(facts):
        yield from items


def set_context(**facts: str | None) -> None:
    """Record what the running call works on (``command=``, ``strategy=``, ``model=``, ``model_type=``),
    for naming it if a library fails; None values are ignored. Inside ``error_context`` they last as
    long as it; outside any (a worker process), for the rest of the current context."""
    current = _context.get()
    if current is None:
        _context.set(_facts(facts))
    else:
        current.update(_facts(facts))


def clear_context() -> None:
    """Forget what ``set_context`` recorded outside any ``error_context``."""
    _context.set(None)


def context_of(exc: BaseException) -> dict[str, str]:
    """The facts that name what failed: those ``exc`` carries from the call it left, else the
    current context's."""
    return dict(getattr(exc, CONTEXT_ATTRIBUTE, None) or _context.get() or {})


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
    model type, as ``set_context`` recorded them in the call it left: ``context_of``) and the
    library's own first line, e.g. ``peft raised
    ValueError during run (strategy prefix, model type bert): Model does not support past key ...``."""
    context = context_of(exc)
    command = context.get("command")
    what = []
    if "strategy" in context:
        what.append(f"strategy {context['strategy']}")
    if "model_type" in context:
        what.append(f"model type {context['model_type']}")
    elif "model" in context:
        what.append(f"model {context['model']!r}")
    during = f" during {command}" if command else ""
    detail = f" ({', '.join(what)})" if what else ""
    return f"{library} raised {type(exc).__name__}{during}{detail}: {first_line(exc)}"


def debug_requested() -> bool:
    """True when ``PEFTKIT_DEBUG`` is set to 1/true/yes (``peftkit --debug`` sets it): full
    tracebacks instead of one-line library errors."""
    return os.environ.get("PEFTKIT_DEBUG", "").strip().lower() in ("1", "true", "yes")
