"""``gradtrace run [--out DIR] [--preset P] [--every N] script.py [args...]`` (or ``-m module``)."""
from __future__ import annotations

import argparse
from typing import Any

from gradtrace.errors import UsageError


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run", help="watch an unmodified training script (exit code: the script's)",
        description="Run a training script as `python script.py args...` would, watching every "
                    "model it trains: each optimizer and the model it updates are found at the "
                    "optimizer's first step (recorded from step 0: gradient figures only on that "
                    "step, except under Lightning); one trace per model under --out. At exit the findings and the HTML "
                    "report's path are printed to stderr.")
    p.add_argument("--out", help="run directory (default: runs/<script>-<date>-<time>)")
    p.add_argument("--preset", help="economy, default or full (see gt.watch)")
    p.add_argument("--every", type=int, help="record every N optimizer steps")
    # like python -m: the module name and everything after it belong to the module
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE [args...]",
                   help="run a library module as a script, like python -m")
    p.add_argument("target", nargs=argparse.REMAINDER, metavar="script.py [args...]",
                   help="the script and its own arguments")


def main(args: Any) -> int:
    """Run the script (or module) under gradtrace; its exit code is the command's."""
    from gradtrace.autowatch import run_script

    target = list(args.target)
    if args.module is None:
        if not target:
            raise UsageError("gradtrace run: name a script (gradtrace run train.py ...) or -m MODULE")
        script, rest = target[0], target[1:]
    else:
        if not args.module:
            raise UsageError("gradtrace run: -m needs a module name (gradtrace run -m pkg.train ...)")
        script, rest = args.module[0], args.module[1:] + target
    if args.every is not None and args.every < 1:
        raise UsageError(f"--every must be >= 1, got {args.every}")
    kw = {k: v for k, v in (("preset", args.preset), ("every", args.every)) if v is not None}
    if "preset" in kw:
        from gradtrace.record import PRESETS
        if kw["preset"] not in PRESETS:
            raise UsageError(f"--preset {kw['preset']!r} is unknown; valid: {', '.join(PRESETS)}")
    return run_script(script, rest, module=args.module is not None, out=args.out, **kw)
