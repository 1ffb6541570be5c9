"""The one exception type users see."""


class PeftkitError(Exception):
    """A problem with what the user asked for (bad input, missing file, unknown name).

    The command line prints its message as one line and exits with status 2, without a traceback,
    so every message must say what was wrong and what would be accepted.
    """


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name if it has none), for one-line
    errors that wrap a library's multi-line message."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
