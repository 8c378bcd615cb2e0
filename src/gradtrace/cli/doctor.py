"""``gradtrace doctor RUN [--json]``: the findings with their fixes."""
from __future__ import annotations

import json
from typing import Any

from gradtrace.cli._common import findings_of, load_run, quiet_broken_pipe
from gradtrace.errors import EXIT_FINDINGS, EXIT_OK


def add_parser(sub: Any) -> None:
    dr = sub.add_parser("doctor", help="findings with fixes; exit 0 healthy, 3 findings")
    dr.add_argument("run", help="trace directory")
    dr.add_argument("--json", action="store_true", help="print one JSON object")


@quiet_broken_pipe
def main(args: Any) -> int:
    """Print the findings; exit 0 healthy, 3 with findings."""
    from gradtrace.report import summarize
    from gradtrace.report.terminal import _finding_lines

    trace = load_run(args.run)
    findings = findings_of(trace)
    healthy = not findings
    summary = summarize(trace, findings)
    if getattr(args, "json", False):
        obj = {"run": str(args.run), "healthy": healthy,
               "findings": [f.to_dict() for f in findings], "summary": summary}
        print(json.dumps(obj, indent=2, allow_nan=False, default=str))
    else:
        print(f"gradtrace doctor · {args.run} · {summary['steps_recorded']} records")
        for _, text in _finding_lines(findings):
            print(text)
        if not healthy:
            n = len(findings)
            print(f"\n{n} finding{'s' if n != 1 else ''}: "
                  f"{summary['errors']} error(s), {summary['warnings']} warning(s).")
    return EXIT_OK if healthy else EXIT_FINDINGS
