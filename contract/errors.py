"""Base error type. Every expected failure raises a subclass; the CLI prints one line and exits non-zero."""


class MpmriError(Exception):
    """An expected, user-facing failure. ``str(err)`` is one line that names the problem."""

    #: process exit code used by the CLI for this error class
    exit_code: int = 2
