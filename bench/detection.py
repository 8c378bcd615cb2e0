"""Detection benchmark: run the labelled scenarios, diagnose each, print what was
expected and what was found, then the detection rate and the false alarms.

    python bench/detection.py [--only NAME ...] [--threads N]

Every scenario is a seeded CPU training run (see ``tests/scenarios.py``). A finding
counts as detected when its kind is found and, where the label names one, its first
(most affected) layer is that layer. A false alarm is a finding whose kind is neither
expected nor listed as an allowed side effect; on a healthy control every finding is one.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def _fmt_expected(sc) -> str:
    if not sc.expected:
        return "(none: healthy control)" if sc.healthy else "(none expected)"
    return ", ".join(f"{k}@{v}" if v else k for k, v in sc.expected.items())


def _fmt_found(found: dict) -> str:
    return ", ".join(f"{k}@{v[0]}" if v else k for k, v in found.items()) or "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="scenario names to run (default: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: these models are tiny, and idle OpenMP workers spin)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import gradtrace as gt
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from scenarios import SCENARIOS, evaluate

    names = args.only or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        print(f"unknown scenario(s) {unknown}; valid: {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    rows = []
    t_all = time.perf_counter()
    for name in names:
        sc = SCENARIOS[name]
        t0 = time.perf_counter()
        torch.manual_seed(0)
        trace = sc.build()
        t1 = time.perf_counter()
        findings = gt.diagnose(trace)
        t2 = time.perf_counter()
        out = evaluate(sc, findings)
        cause = next((f.evidence.get("cause") for f in findings if f.kind == "nonfinite"), None)
        rows.append((sc, out, cause, t1 - t0, t2 - t1))

    w = max(len(n) for n in names)
    print(f"{'scenario':<{w}}  {'result':<6}  {'train':>6}  {'diag':>6}  expected -> found")
    print("-" * (w + 100))
    for sc, out, cause, tb, td in rows:
        result = "ok" if out.ok else "FAIL"
        line = (f"{sc.name:<{w}}  {result:<6}  {tb:5.1f}s  {td * 1000:4.0f}ms  "
                f"{_fmt_expected(sc)} -> {_fmt_found(out.found)}")
        print(line)
        notes = []
        if sc.cause:
            notes.append(f"cause expected {sc.cause}, found {cause}")
        if out.missed:
            notes.append(f"missed {out.missed}")
        if out.wrong_layer:
            notes.append(f"wrong first layer for {out.wrong_layer}")
        if out.false_alarms:
            notes.append(f"false alarms {out.false_alarms}")
        extra = [k for k in out.found if k in sc.allowed]
        if extra:
            notes.append(f"allowed side findings {extra}")
        if notes:
            print(f"{'':<{w}}  {'':<6}  " + "; ".join(notes))
    n_expected = sum(len(sc.expected) for sc, *_ in rows)
    n_hit = sum(len(out.hits) for _, out, *_ in rows)
    n_false = sum(len(out.false_alarms) for _, out, *_ in rows)
    healthy = [(sc, out) for sc, out, *_ in rows if sc.healthy]
    healthy_noisy = [sc.name for sc, out in healthy if out.found]
    causes = [(sc, out) for sc, out, *_ in rows if sc.cause]
    print("-" * (w + 100))
    print(f"scenarios: {len(rows)}   expected findings: {n_expected}   detected (right kind and first layer): "
          f"{n_hit}   detection rate: {n_hit / max(n_expected, 1):.0%}")
    print(f"false alarms: {n_false}   healthy controls with a finding: {len(healthy_noisy)} of {len(healthy)}"
          + (f" ({', '.join(healthy_noisy)})" if healthy_noisy else ""))
    if causes:
        good = sum(1 for _, out in causes if out.cause_ok)
        print(f"non-finite causes told apart: {good} of {len(causes)}")
    print(f"total time: {time.perf_counter() - t_all:.1f}s")
    return 0 if all(out.ok for _, out, *_ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
