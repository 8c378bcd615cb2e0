"""Errors and warnings every layer of gradtrace raises; a leaf module that imports nothing.

Exit codes of the ``gradtrace`` command line live here too, so the CLI and the modules
it calls agree on one table.

Example:
    >>> issubclass(UsageError, ValueError), EXIT_FINDINGS
    (True, 3)
"""
from __future__ import annotations

#: the run is healthy (or the command succeeded)
EXIT_OK = 0
#: the user's input or arguments are wrong: one line on stderr, no traceback
EXIT_USAGE = 2
#: the command worked and found problems in the run
EXIT_FINDINGS = 3
#: interrupted with Ctrl-C
EXIT_INTERRUPTED = 130
#: stdout closed early (``gradtrace doctor --json | head``): 128 + SIGPIPE
EXIT_BROKEN_PIPE = 141


class UsageError(ValueError):
    """A problem with what the user asked for; the CLI prints it as one line, exit code 2.

    It is a ``ValueError`` so Python callers can catch bad input the usual way.

    Example:
        >>> str(UsageError("--every must be >= 1"))
        '--every must be >= 1'
    """


class NonFiniteError(RuntimeError):
    """Raised after a step with ``nan``/``inf`` when ``watch(..., raise_on_nonfinite=True)``.

    Example:
        >>> issubclass(NonFiniteError, RuntimeError)
        True
    """


class TraceWarning(UserWarning):
    """A trace was readable but not whole (e.g. a torn last row after a crash).

    Example:
        >>> issubclass(TraceWarning, UserWarning)
        True
    """
