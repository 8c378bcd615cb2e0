"""``gradtrace show RUN``: findings on top, then the per-layer table."""
from __future__ import annotations

from typing import Any

from gradtrace.cli._common import findings_of, load_run, quiet_broken_pipe
from gradtrace.errors import EXIT_FINDINGS, EXIT_OK


def add_parser(sub: Any) -> None:
    s = sub.add_parser("show", help="per-layer table with trends, findings on top")
    s.add_argument("run", help="trace directory")


@quiet_broken_pipe
def main(args: Any) -> int:
    """Print the run; exit 0 healthy, 3 with findings (the same verdict as ``doctor``)."""
    from gradtrace.report.terminal import print_show

    trace = load_run(args.run)
    findings = findings_of(trace)
    print_show(trace, findings)
    return EXIT_FINDINGS if findings else EXIT_OK
