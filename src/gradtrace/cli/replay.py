"""``gradtrace replay RUN [--factory PKG.MODULE:FACTORY] [--loss PKG.MODULE:FACTORY]``."""
from __future__ import annotations

import json
from typing import Any

from gradtrace.errors import EXIT_FINDINGS, EXIT_OK


def add_parser(sub: Any) -> None:
    p = sub.add_parser("replay", help="the exact op and source line of the first nan/inf "
                       "(from the flight recorder's bundle); exit 3 when one is named")
    p.add_argument("run", help="run or trace directory, or a flight-*.pt bundle")
    p.add_argument("--factory", help="PKG.MODULE:FACTORY returning the model "
                   "(default: the model stored in the bundle)")
    p.add_argument("--loss", help="PKG.MODULE:FACTORY returning loss_fn(output) -> scalar")
    p.add_argument("--device", help="where to replay (default: cpu)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: Any) -> int:
    """Replay the bundle's step under the op checker and print what made the first nan."""
    from dataclasses import asdict

    from gradtrace.replay import replay

    result = replay(args.run, factory=args.factory, loss=args.loss, device=args.device)
    if args.json:
        obj = asdict(result)
        obj["headline"] = result.headline
        print(json.dumps(obj, indent=2, default=str))
    else:
        print(f"gradtrace replay · step {result.step} ({result.reason}) · {result.bundle}")
        print(result)
    return EXIT_OK if result.phase == "none" else EXIT_FINDINGS
