"""``gradtrace demo``: run the chapter's experiments, write their traces and one report."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gradtrace.errors import EXIT_OK, UsageError


def add_parser(sub: Any) -> None:
    d = sub.add_parser("demo", help="run the chapter's experiments; write traces and one report")
    d.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes on 2 CPU cores)")
    d.add_argument("--out", default="gradtrace-demo", help="output directory (default: %(default)s)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(args: Any) -> int:
    """``gradtrace demo [--quick] [--out DIR] [--no-progress]``; returns the exit code."""
    from gradtrace.demo import run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} is a file; pass a directory for the traces and report")
    try:
        run_demo(out, quick=args.quick, progress=not args.no_progress)
    except PermissionError as e:
        raise UsageError(f"cannot write to --out {str(out)!r}: {e.strerror}") from None
    return EXIT_OK
