"""The ``gradtrace`` command line.

Exit codes: 0 healthy, 3 findings, 2 usage or input error (one line on stderr, no
traceback). Each sub-command's work lives in the module that owns it; this file only
parses arguments and turns expected errors into one clear line.
"""
from __future__ import annotations

import argparse
import importlib
import sys

EXIT_OK, EXIT_USAGE, EXIT_FINDINGS = 0, 2, 3


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line, exit code 2.

    Example:
        >>> build_parser().parse_args(["doctor"])            # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        UsageError: gradtrace doctor: the following arguments are required: run
    """


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


# sub-command -> "module:function"; the function takes the parsed Namespace, returns an exit code
_HANDLERS = {
    "demo": "gradtrace.demo:cli_main",
    "show": "gradtrace.report.cli:show_main",
    "doctor": "gradtrace.report.cli:doctor_main",
    "report": "gradtrace.report.cli:report_main",
    "preflight": "gradtrace.preflight:cli_main",
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gradtrace`` argument parser: sub-commands demo, show, doctor, report, preflight.

    Example:
        >>> build_parser().parse_args(["doctor", "runs/exp1", "--json"]).json
        True
    """
    p = _Parser(prog="gradtrace", description="See, diagnose and fix vanishing and exploding "
                "gradients in PyTorch training runs.")
    from gradtrace import __version__

    p.add_argument("--version", action="version", version=f"gradtrace {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    d = sub.add_parser("demo", help="run the chapter's experiments; write traces and one report")
    d.add_argument("--quick", action="store_true", help="smaller runs (under 2 minutes on 2 CPU cores)")
    d.add_argument("--out", default="gradtrace-demo", help="output directory (default: %(default)s)")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")

    s = sub.add_parser("show", help="per-layer table with trends, findings on top")
    s.add_argument("run", help="trace directory")

    dr = sub.add_parser("doctor", help="findings with fixes; exit 0 healthy, 3 findings")
    dr.add_argument("run", help="trace directory")
    dr.add_argument("--json", action="store_true", help="print one JSON object")

    r = sub.add_parser("report", help="self-contained HTML report (and PNG plots)")
    r.add_argument("run", help="trace directory")
    r.add_argument("--html", default=None, help="output file (default: RUN/report.html)")
    r.add_argument("--png", default=None, metavar="DIR", help="also write each plot as PNG here")

    pf = sub.add_parser("preflight", help="predict vanishing/exploding before training")
    pf.add_argument("factory", help="PKG.MODULE:FACTORY, a callable returning an nn.Module")
    pf.add_argument("--input-shape", required=True, help="comma-separated, e.g. 64,784")
    pf.add_argument("--dtype", default="float32", help="input dtype (default: %(default)s)")
    pf.add_argument("--seed", type=int, default=0)
    pf.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradtrace`` console script.

    Example:
        >>> main(["doctor", "runs/exp1", "--json"])    # doctest: +SKIP
        3
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return EXIT_USAGE
        module, func = _HANDLERS[args.command].split(":")
        handler = getattr(importlib.import_module(module), func)
        return int(handler(args))
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
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
