"""The one exception type users see."""


class PeftkitError(Exception):
    """A problem with what the user asked for (bad input, missing file, unknown name).

    The command line prints its message as one line and exits with status 2, without a traceback,
    so every message must say what was wrong and what would be accepted.
    """
