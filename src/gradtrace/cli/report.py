"""``gradtrace report RUN [--html FILE] [--png DIR]``: the self-contained HTML page."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from gradtrace.cli._common import findings_of, load_run
from gradtrace.errors import EXIT_OK


def add_parser(sub: Any) -> None:
    r = sub.add_parser("report", help="self-contained HTML report (and PNG plots)")
    r.add_argument("run", help="trace directory")
    r.add_argument("--html", default=None, help="output file (default: RUN/report.html)")
    r.add_argument("--png", default=None, metavar="DIR", help="also write each plot as PNG here")


def main(args: Any) -> int:
    """Write the page (and PNGs); exit 0 whether or not the run has findings (the page shows them)."""
    from gradtrace.report import report

    trace = load_run(args.run)
    if args.png:
        from gradtrace.report.plots import _matplotlib

        _matplotlib()                       # fail before any work if matplotlib is missing
    html_path = Path(args.html) if args.html else Path(args.run) / "report.html"
    out = report(trace, html_path, findings=findings_of(trace), png_dir=args.png)
    print(f"report written to {out}")
    if args.png:
        pngs = sorted(Path(args.png).glob("*.png"))
        print(f"{len(pngs)} PNG plot(s) written to {args.png}")
    return EXIT_OK
