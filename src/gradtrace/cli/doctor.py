"""``gradtrace doctor RUN [--json] [--follow]``: the findings with their fixes, or live as the run writes them."""
from __future__ import annotations

import json
from typing import Any

from gradtrace.cli._common import findings_of, load_run, quiet_broken_pipe
from gradtrace.errors import EXIT_FINDINGS, EXIT_OK


def add_parser(sub: Any) -> None:
    dr = sub.add_parser("doctor", help="findings with fixes; exit 0 healthy, 3 findings")
    dr.add_argument("run", help="trace directory")
    dr.add_argument("--json", action="store_true", help="print one JSON object")
    dr.add_argument("--follow", action="store_true",
                    help="watch a live run: print each new finding as the trace grows; stop when "
                         "the run closes (an end or exception event) or writes nothing for --idle seconds")
    dr.add_argument("--interval", type=float, default=2.0, help="seconds between reads with --follow (default 2)")
    dr.add_argument("--idle", type=float, default=120.0,
                    help="with --follow, stop after this many seconds without a new record (default 120)")


@quiet_broken_pipe
def main(args: Any) -> int:
    """Print the findings; exit 0 healthy, 3 with findings."""
    from gradtrace.report import summarize
    from gradtrace.report.terminal import _finding_lines

    if getattr(args, "follow", False):
        return follow(args)
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


#: Events that mark a run as finished (the writer's closing marker, or a crash).
END_EVENTS = ("end", "close", "exception")


def follow(args: Any) -> int:
    """Re-read the run every ``--interval`` seconds and print each finding kind the first
    time the diagnosis of the run so far contains it (one line, then its top fix).
    Returns 3 if anything was found, else 0."""
    import time
    from pathlib import Path

    import gradtrace as gt
    from gradtrace.errors import UsageError
    from gradtrace.trace import has_trace

    for name in ("interval", "idle"):
        v = getattr(args, name)
        if not v > 0:
            raise UsageError(f"--{name} must be > 0 seconds, got {v}")
    seen: dict[str, Any] = {}
    last_size, last_change = -1, time.monotonic()
    print(f"gradtrace doctor --follow · {args.run}", flush=True)
    while True:
        if has_trace(args.run):
            trace = load_run(args.run)
            size = len(trace) + len(trace.events())
            if size != last_size:
                last_size, last_change = size, time.monotonic()
                for f in gt.diagnose(trace):
                    if f.kind in seen:
                        continue
                    seen[f.kind] = f
                    line = f"step {f.first_step}: {f.kind} ({f.severity})"
                    if f.layers:
                        line += f" in {', '.join(f.layers[:3])}"
                    if f.evidence.get("summary"):      # typed evidence: a Mapping
                        line += f": {f.evidence['summary']}"
                    print(line, flush=True)
                    if f.fixes:
                        print(f"    fix: {f.fixes[0].action}", flush=True)
            # The latest marker decides: a resumed run's old "end" is followed by "resume".
            marks = [e["event"] for e in trace.events() if e["event"] in END_EVENTS + ("resume",)]
            if marks and marks[-1] != "resume":
                break
        elif not Path(args.run).exists() and time.monotonic() - last_change > args.idle:
            raise UsageError(f"{args.run}: no trace appeared within {args.idle:g} s")
        if time.monotonic() - last_change > args.idle:
            print(f"(no new record for {args.idle:g} s; stopping)", flush=True)
            break
        time.sleep(args.interval)
    n = len(seen)
    print(f"{n} finding{'s' if n != 1 else ''}." if n else "healthy so far: no finding.", flush=True)
    return EXIT_FINDINGS if n else EXIT_OK
