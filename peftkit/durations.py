"""Durations, in one place: how they are written for a person, read from a flag, and how long the
work still to do should take at the pace so far.

Every line that says how long something took or has left takes its words from here, so a run's
heartbeat, a plan's progress, a bench's table and a tune's trial lines say durations alike:

- ``format_duration``: ``42s``, ``3m05s``, ``1h02m`` (a clock: progress lines, time left);
- ``format_seconds``: ``0.42 s``, ``3.1 s``, ``93 s`` (a measured time in a table: train time);
- ``format_rough``: ``5 s``, ``3 min``, ``1.2 h`` (a rough guess said before work starts: a plan);
- ``parse_duration``: ``90s``, ``30m``, ``2h``, ``1h30m`` or seconds, from a flag (``--timeout``);
- ``time_left``: the pace so far carried over what is left, never past a deadline.

A bench guesses each run's time from the finished runs most like it (same strategy and size, else
scaled from a smaller one: ``peftkit.benchmark.suite.seconds_left``); the pace it falls back on is
the one here.
"""

from __future__ import annotations

import re
import time

from .errors import PeftkitError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")


def format_duration(seconds: float, hours: bool = True) -> str:
    """A duration for a person: ``42s``, ``3m05s``, ``1h02m``. ``hours=False`` counts minutes past
    the hour (``75m00s``), as a bench's and a tune's lines (and results.md) have always written them."""
    seconds = max(0, int(round(seconds)))
    if hours and seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def format_seconds(seconds: float) -> str:
    """Seconds with the precision a reader needs: 0.42 s, 3.1 s, 93 s."""
    return f"{seconds:.2f} s" if seconds < 1 else f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def format_rough(seconds: float) -> str:
    """A rough duration, said before the work: ``5 s`` (at least 1), ``3 min``, ``1.2 h``."""
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    return f"{round(seconds / 60)} min" if seconds < 3600 else f"{seconds / 3600:.1f} h"


def parse_duration(value: str | float | int, flag: str = "--timeout") -> float:
    """``90s``, ``30m``, ``2h``, ``1h30m``, ``1d`` or plain seconds -> seconds (positive); ``flag``
    names the option in a refusal."""
    text = str(value).strip().lower().replace(" ", "")
    try:
        seconds = float(text)
    except ValueError:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise PeftkitError(f"{flag} {value!r} is not a duration; give e.g. 90s, 30m, 2h or 1h30m") from None
        seconds = sum(float(n) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[u] for n, u in parts)
    if not seconds > 0:
        raise PeftkitError(f"{flag} must be positive, got {value!r}; give e.g. 90s, 30m, 2h or 1h30m")
    return seconds


def time_left(spent: float, done: float, todo: float, deadline: float | None = None) -> float:
    """How long ``todo`` more units (steps, trials, measurements) take at the pace so far: ``spent``
    seconds for ``done`` units (positive); never past ``deadline`` (a ``time.monotonic()`` time:
    nothing starts after it)."""
    left = todo * spent / done
    if deadline is not None:
        left = min(left, max(0.0, deadline - time.monotonic()))
    return left


__all__ = ["format_duration", "format_rough", "format_seconds", "parse_duration", "time_left"]
