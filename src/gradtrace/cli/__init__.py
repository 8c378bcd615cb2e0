"""The ``gradtrace`` command line: argument parsing and exit codes, nothing else.

Each sub-command is a module of this package with ``add_parser(subparsers)`` and
``main(args) -> exit code``; the work itself lives in the library module it calls.
Exit codes (:mod:`gradtrace.errors`): 0 healthy, 3 findings, 2 usage or input error
(one line on stderr, no traceback).

Example:
    >>> build_parser().parse_args(["doctor", "runs/exp1", "--json"]).json
    True
"""
from __future__ import annotations

import argparse
import importlib
import sys

from gradtrace.errors import EXIT_INTERRUPTED, EXIT_USAGE, UsageError

__all__ = ["main", "build_parser", "UsageError"]

#: sub-commands, in the order ``gradtrace --help`` lists them; each is ``gradtrace.cli.<name>``
COMMANDS = ("demo", "show", "doctor", "report", "export", "preflight", "run", "replay")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _command(name: str):
    return importlib.import_module(f"gradtrace.cli.{name}")


def build_parser() -> argparse.ArgumentParser:
    """The ``gradtrace`` argument parser with every sub-command of :data:`COMMANDS`.

    Example:
        >>> build_parser().parse_args(["doctor"])            # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        UsageError: gradtrace doctor: the following arguments are required: run
    """
    from gradtrace import __version__

    p = _Parser(prog="gradtrace", description="See, diagnose and fix vanishing and exploding "
                "gradients in PyTorch training runs.")
    p.add_argument("--version", action="version", version=f"gradtrace {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        _command(name).add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradtrace`` console script; returns the exit code.

    Example:
        >>> main(["doctor", "no/such/run"])
        2
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        return int(_command(args.command).main(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        # A missing extra (matplotlib for --png, ...): the message names the pip install.
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    # Anything else is a bug in gradtrace, not the user's input: it keeps its traceback.
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
