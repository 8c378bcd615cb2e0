"""Handlers of ``gradtrace show``, ``gradtrace doctor`` and ``gradtrace report``.

Each takes the parsed arguments and returns the exit code: 0 healthy, 3 findings,
2 for input errors (raised as ``UsageError``/``ValueError``; :mod:`gradtrace.cli`
prints them as one line).

Example:
    >>> from gradtrace.cli import main
    >>> main(["doctor", "runs/exp1", "--json"])      # doctest: +SKIP
    3
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

EXIT_OK, EXIT_USAGE, EXIT_FINDINGS = 0, 2, 3


def _load(run: str):
    import warnings

    from gradtrace.cli import UsageError
    from gradtrace.trace import load

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")        # a torn last line is listed in the summary instead
        try:
            return load(run)
        except ValueError as e:                # missing, foreign or corrupt: the user's input
            raise UsageError(str(e)) from None


def _findings(trace) -> list:
    import importlib

    # the module, not gt.report the function; looked up at call time so tests can stub it
    return importlib.import_module("gradtrace.report").diagnose_trace(trace)


def _quiet_broken_pipe(func):
    """``gradtrace doctor --json | head`` closes the pipe early: exit quietly, no traceback."""
    import functools
    import os

    @functools.wraps(func)
    def wrapper(args: Any) -> int:
        try:
            code = func(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())   # Python's exit-time flush must not fail again
            return 141                              # 128 + SIGPIPE, as a shell reports it
    return wrapper


@_quiet_broken_pipe
def show_main(args: Any) -> int:
    """``gradtrace show RUN``: findings on top, then the per-layer table; exit 0 healthy, 3 findings.

    Example:
        >>> show_main(argparse.Namespace(run="runs/exp1"))     # doctest: +SKIP
        0
    """
    from .terminal import print_show

    trace = _load(args.run)
    findings = _findings(trace)
    print_show(trace, findings)
    return EXIT_FINDINGS if findings else EXIT_OK   # the same verdict as `doctor`


@_quiet_broken_pipe
def doctor_main(args: Any) -> int:
    """``gradtrace doctor RUN [--json]``: findings with fixes; 0 healthy, 3 findings.

    Example:
        >>> doctor_main(argparse.Namespace(run="runs/exp1", json=True))   # doctest: +SKIP
        3
    """
    from . import summarize
    from .terminal import _finding_lines

    trace = _load(args.run)
    findings = _findings(trace)
    healthy = not findings
    if getattr(args, "json", False):
        obj = {"run": str(args.run), "healthy": healthy,
               "findings": [f.to_dict() for f in findings],
               "summary": summarize(trace, findings)}
        print(json.dumps(obj, indent=2, allow_nan=False, default=str))
    else:
        s = summarize(trace, findings)
        print(f"gradtrace doctor · {args.run} · {s['steps_recorded']} records")
        for _, text in _finding_lines(findings):
            print(text)
        if not healthy:
            n = len(findings)
            print(f"\n{n} finding{'s' if n != 1 else ''}: "
                  f"{s['errors']} error(s), {s['warnings']} warning(s).")
    return EXIT_OK if healthy else EXIT_FINDINGS


def report_main(args: Any) -> int:
    """``gradtrace report RUN [--html FILE] [--png DIR]``: write the HTML page (and PNGs).

    Exit code 0 whether or not the run has findings (the page shows them).

    Example:
        >>> report_main(argparse.Namespace(run="runs/exp1", html=None, png=None))  # doctest: +SKIP
        0
    """
    from . import report

    trace = _load(args.run)
    if args.png:
        from .plots import _matplotlib

        _matplotlib()                       # fail before any work if matplotlib is missing
    html_path = Path(args.html) if args.html else Path(args.run) / "report.html"
    findings = _findings(trace)
    out = report(trace, html_path, findings=findings, png_dir=args.png)
    print(f"report written to {out}")
    if args.png:
        pngs = sorted(Path(args.png).glob("*.png"))
        print(f"{len(pngs)} PNG plot(s) written to {args.png}")
    return EXIT_OK
