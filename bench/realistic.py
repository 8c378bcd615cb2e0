"""Realistic suite: gradtrace on real model code and real shipped data, healthy and broken.

    python bench/realistic.py [--only NAME ...] [--quick] [--no-demo] [--threads N]

For every run (see ``bench/realistic_runs.py``, plus the demo's runs) it prints what was
expected, what ``gt.diagnose`` found (kinds in rank order, first step of each), the step
at which a live run would first have said something (the first ``s`` with a finding in
``gt.diagnose(trace.upto(s))``), the damage step (first non-finite loss, or the loss
clearly diverging: at least ``DIVERGE_START`` times its first value and ``DIVERGE_MIN``
times its lowest so far, on ``DIVERGE_HOLD`` records in a row: a one-record bump the run
absorbs at once is not damage), the lead time (damage minus live detection; must be >= 0, and
>= 3 on slow divergences) and the overhead (watched / unwatched wall time of the same
seeded run; the watched run includes live diagnosis, ``OnlineDiagnosis`` at its defaults,
whose own share of the time is printed under each run). A healthy run passes with no finding at all; a broken one when its root
cause is the top finding, every expected kind is found and nothing else but the allowed
side findings.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

#: A loss counts as clearly diverged at this multiple of its first value ...
DIVERGE_START = 1.5
#: ... when it is also this multiple of its lowest value so far.
DIVERGE_MIN = 2.0
#: ... on this many consecutive records (the damage step is the first of them).
DIVERGE_HOLD = 2
#: Slow divergences must be caught at least this many steps ahead.
SLOW_LEAD = 3


def damage_step(steps, losses) -> int | None:
    """First non-finite loss, else the first of ``DIVERGE_HOLD`` consecutive clearly
    diverged records (see module docstring).

    >>> damage_step(range(6), [1.0, 0.5, 2.0, 0.6, 2.0, 2.5])    # the bump at 2 recovers
    4
    >>> damage_step(range(3), [1.0, 0.5, float("nan")])
    2
    """
    lo = math.inf
    first = None
    held: list[int] = []
    for s, v in zip(steps, losses):
        if not math.isfinite(v):
            return int(held[0]) if held else int(s)
        if first is None:
            first = v
        elif v >= DIVERGE_START * first and v >= DIVERGE_MIN * lo:
            held.append(int(s))
            if len(held) >= DIVERGE_HOLD:
                return held[0]
            continue                    # a diverged record does not lower the floor
        else:
            held = []
        lo = min(lo, v)
    return None


def live_detection(trace, diagnose, until: int | None) -> int | None:
    """First recorded step at which the diagnosis of the run so far is not empty."""
    steps = trace.steps_recorded
    for s in steps.tolist():
        if until is not None and s > until + 5:
            return None
        if diagnose(_upto(trace, int(s))):
            return int(s)
    return None


def _upto(trace, step: int):
    """``trace.upto(step)``; rebuilt from the records on gradtrace 0.1 (the "before" run)."""
    if hasattr(trace, "upto"):
        return trace.upto(step)
    return type(trace)(trace.meta, [r for r in trace.records if r["step"] <= step]
                       + [e for e in trace.events() if e["step"] <= step])


def evaluate(run, findings) -> tuple[bool, list[str]]:
    kinds = [f.kind for f in findings]
    notes = []
    if run.healthy:
        return not kinds, ([f"false alarms {kinds}"] if kinds else [])
    ok = True
    if not kinds or kinds[0] != run.first:
        ok = False
        notes.append(f"top finding {kinds[0] if kinds else None}, want {run.first}")
    missed = [k for k in run.expect if k not in kinds]
    if missed:
        ok = False
        notes.append(f"missed {missed}")
    extra = [k for k in kinds if k != run.first and k not in run.expect and k not in run.allowed]
    if extra:
        ok = False
        notes.append(f"unexpected {extra}")
    return ok, notes


def demo_runs(quick: bool):
    """The demo's runs as ``(name, healthy, first, trainer)`` (healthy = no finding)."""
    from gradtrace.demo import EXPERIMENTS, QUICK, TINY
    from gradtrace.demo.experiments import scaled

    cfg = scaled(TINY, mlp_steps=60, rnn_steps=60, relu_steps=60) if quick else QUICK
    broken = {"sigmoid": "vanishing_gradients", "rnn_exploding": "nonfinite",
              "rnn_vanishing": "vanishing_through_time", "relu_high_lr": "dead_units"}
    out = []
    for _, _, _, _, runs in EXPERIMENTS:
        for name, _, trainer, _ in runs:
            out.append((f"demo:{name}", name not in broken, broken.get(name), trainer, cfg))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="run names (default: all)")
    ap.add_argument("--quick", action="store_true", help="only the runs marked quick")
    ap.add_argument("--no-demo", action="store_true", help="leave out the demo's runs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore")
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)

    import gradtrace as gt
    from gradtrace.diagnose.online import OnlineDiagnosis
    from realistic_runs import RUNS, Run

    names = args.only or [n for n, r in RUNS.items() if r.quick or not args.quick]
    rows = []
    t_all = time.perf_counter()
    for name in names:
        if name.startswith("demo:"):
            continue
        run = RUNS[name]
        plain = run.fn(None)
        fired: list[int] = []
        sink = OnlineDiagnosis(lambda f: fired.append(int(sink.trace.steps_recorded[-1])))
        watched = run.fn({"out": None, "sinks": [sink]})   # watch + live diagnosis (defaults)
        trace = watched.trace
        t0 = time.perf_counter()
        findings = gt.diagnose(trace)
        tdiag = time.perf_counter() - t0
        steps, losses = trace.series("loss", with_steps=True)
        dmg = damage_step(steps.tolist(), losses.tolist())
        live = None if run.healthy else live_detection(trace, gt.diagnose, dmg)
        ok, notes = evaluate(run, findings)
        lead = None if dmg is None or live is None else dmg - live
        if not run.healthy and dmg is not None and (lead is None or lead < (SLOW_LEAD if run.slow else 0)):
            ok = False
            notes.append(f"lead time {lead} below {SLOW_LEAD if run.slow else 0}")
        if fired and (live is None or min(fired) > live):
            notes.append(f"the live sink first spoke at step {min(fired)} (its every/budget limits)")
        notes.append(f"live diagnosis: {sink.runs} runs, {sink.seconds * 1000:.0f} ms = "
                     f"{100 * sink.seconds / watched.seconds:.1f}% of the watched run's time")
        rows.append((name, run.healthy, run.first, findings, live, dmg, lead,
                     watched.seconds / plain.seconds, tdiag, ok, notes))
    if not args.no_demo and (not args.only or any(n.startswith("demo:") for n in args.only)):
        with tempfile.TemporaryDirectory() as tmp:
            for name, healthy, first, trainer, cfg in demo_runs(args.quick):
                if args.only and name not in args.only:
                    continue
                d = os.path.join(tmp, name.split(":")[1])
                trainer(d, cfg, lambda: None)
                trace = gt.load(d)
                t0 = time.perf_counter()
                findings = gt.diagnose(trace)
                tdiag = time.perf_counter() - t0
                steps, losses = trace.series("loss", with_steps=True)
                dmg = damage_step(steps.tolist(), losses.tolist())
                live = None if healthy else live_detection(trace, gt.diagnose, dmg)
                run = Run(name, None, healthy, first)
                ok, notes = evaluate(run, findings)
                if first:
                    # The demo labels the kind each broken experiment illustrates, not a causal
                    # order of everything that happens in it: the kind must be found; what ranks
                    # above it started earlier (rnn_vanishing: a corroborated gradient spike at
                    # step 32, before the vanishing stretch of steps 60-250) and is printed.
                    kinds = [f.kind for f in findings]
                    ok = first in kinds
                    notes = [] if ok else [f"missed {first}"]
                    if ok and kinds[0] != first:
                        notes.append(f"ranked after {kinds[:kinds.index(first)]} (started earlier)")
                lead = None if dmg is None or live is None else dmg - live
                if not healthy and dmg is not None and (lead is None or lead < 0):
                    ok = False
                    notes.append(f"lead time {lead} below 0")
                rows.append((name, healthy, first, findings, live, dmg, lead, None, tdiag, ok, notes))

    w = max(len(r[0]) for r in rows)
    print(f"{'run':<{w}}  {'result':<6} {'expected':<24} {'live':>5} {'damage':>6} {'lead':>5} "
          f"{'overhead':>8} {'diag':>6}  found (kind@first_step, rank order)")
    print("-" * (w + 120))
    for name, healthy, first, findings, live, dmg, lead, ovh, tdiag, ok, notes in rows:
        exp = "healthy" if healthy else first
        found = ", ".join(f"{f.kind}@{f.first_step}" for f in findings) or "-"
        print(f"{name:<{w}}  {'ok' if ok else 'FAIL':<6} {exp:<24} {'-' if live is None else live:>5} "
              f"{'-' if dmg is None else dmg:>6} {'-' if lead is None else lead:>5} "
              f"{'-' if ovh is None else f'{ovh:.2f}x':>8} {tdiag * 1000:5.0f}ms  {found}")
        for n in notes:
            print(f"{'':<{w}}    {n}")
    healthy = [r for r in rows if r[1]]
    broken = [r for r in rows if not r[1]]
    fa = sum(1 for r in healthy if r[3])
    caught = sum(1 for r in broken if r[9])
    print("-" * (w + 120))
    print(f"healthy runs with any finding: {fa}/{len(healthy)}; broken runs passed: {caught}/{len(broken)}; "
          f"total {time.perf_counter() - t_all:.0f}s")
    return 0 if fa == 0 and caught == len(broken) else 1


if __name__ == "__main__":
    sys.exit(main())
