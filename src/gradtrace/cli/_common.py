"""Helpers the sub-commands share: loading a run, importing a user's factory, pipes."""
from __future__ import annotations

import functools
import importlib
import os
import sys
import warnings
from typing import Any, Callable

from gradtrace.errors import EXIT_BROKEN_PIPE, UsageError


def load_run(run: str):
    """The trace at ``run``; a missing, foreign or corrupt directory is a ``UsageError``."""
    from gradtrace.trace import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # a torn last row is listed in the summary instead
        try:
            return load(run)
        except ValueError as e:
            raise UsageError(str(e)) from None


def findings_of(trace) -> list:
    """The findings (with fixes) every command shows for ``trace``."""
    # the module, not gt.report the function; looked up at call time so tests can stub it
    return importlib.import_module("gradtrace.report").diagnose_trace(trace)


def quiet_broken_pipe(func: Callable[[Any], int]) -> Callable[[Any], int]:
    """``gradtrace doctor --json | head`` closes the pipe early: exit quietly, no traceback."""
    @functools.wraps(func)
    def wrapper(args: Any) -> int:
        try:
            code = func(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())   # Python's exit-time flush must not fail again
            return EXIT_BROKEN_PIPE
    return wrapper


def load_factory(spec: str) -> Any:
    """Call the ``PKG.MODULE:FACTORY`` the user named (the current directory is importable).

    Every problem is a one-line ``UsageError``: a malformed spec, an import error, a
    missing attribute, a factory that raises.
    """
    if spec.count(":") != 1 or not all(spec.split(":")):
        raise UsageError(f"factory {spec!r} must look like PKG.MODULE:FACTORY")
    mod_name, attr = spec.split(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(mod_name)
    except Exception as e:
        raise UsageError(f"cannot import {mod_name!r}: {type(e).__name__}: {e}") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(f"module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{spec} is not callable")
    try:
        return obj()
    except Exception as e:
        raise UsageError(f"factory {spec} failed: {type(e).__name__}: {e}") from None
