"""How the trace scales to a long run: size on disk, write cost, load, queries, diagnose, report.

A synthetic trace shaped like what the recorder writes for a 100-layer narrow ReLU MLP
(200 parameters, 200 modules: 100 Linear + 100 ReLU) under the default preset, with
activation figures every 10th step, is written through the real ``TraceWriter``; then a
fresh process opens it and measures each figure of issue 10's table. Each detector of
``gt.diagnose`` is timed on its own (with a time limit) so a slow one is named.

Run: ``python bench/trace_scale.py [--steps 100000] [--out DIR [--reuse]] [--keep]``.
Not a test: numbers depend on the machine (2 CPU cores here).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

LAYERS, WIDTH, EVERY_ACT = 100, 16, 10


def meta() -> dict:
    modules, params = [], []
    for i in range(2 * LAYERS):
        lin = i % 2 == 0
        name = str(i)
        ps = [f"{i}.weight", f"{i}.bias"] if lin else []
        modules.append({"name": name, "type": "Linear" if lin else "ReLU",
                        "activation": None if lin else "relu", "params": ps})
        params += [{"name": p, "shape": [WIDTH, WIDTH] if p.endswith("weight") else [WIDTH],
                    "dtype": "float32", "module": name} for p in ps]
    return {"model": "Sequential", "modules": modules, "params": params, "config": {"every": 1}}


def records(n_steps: int, seed: int = 0):
    """Record dicts with the recorder's shape (Python lists, None where not recorded)."""
    rng = np.random.default_rng(seed)
    n_p, n_m = 2 * LAYERS, 2 * LAYERS
    relu = [i % 2 == 1 for i in range(n_m)]
    base = rng.uniform(0.01, 1.0, size=(64, n_p))
    order = [str(i) for i in range(n_m)]
    for s in range(n_steps):
        g = base[s % 64] * (1 + 0.01 * (s % 7))
        rec = {"step": s, "time": 1.7e9 + 0.05 * s,
               "scalars": {"loss": float(2.0 / (1 + s / 1000)), "total_grad_norm": float(np.sqrt((g ** 2).sum())),
                           "lr": 0.01},
               "param": {"grad_norm": g.tolist(), "grad_maxabs": (g / 3).tolist(), "grad_nonfinite": [0.0] * n_p,
                         "param_norm": (g * 10).tolist()},
               "module": {"out_flag_nonfinite": [0.0] * n_m}}
        if s == 0:
            rec["exec_order"] = order
        if s % EVERY_ACT == 0:
            rec["param"]["update_ratio"] = (g / 1000).tolist()
            act = rng.uniform(0, 1, size=n_m)
            rec["module"].update({
                "out_mean": act.tolist(), "out_std": (act + 1).tolist(), "out_maxabs": (act * 3).tolist(),
                "out_nonfinite": [0.0] * n_m,
                "zero_frac": [float(a) if r else None for a, r in zip(act, relu)],
                "dead_units": [0.0 if r else None for r in relu],
                "units": [float(WIDTH) if r else None for r in relu],
                "unit_samples": [64.0 if r else None for r in relu],
                "outgrad_norm": (act / 10).tolist()})
            from gradtrace.trace import pack_mask
            rec["vectors"] = {"active_mask": {str(i): pack_mask(rng.uniform(size=WIDTH) > 0.05)
                                              for i in range(n_m) if relu[i]}}
        yield rec


def figures(rec: dict) -> int:
    n = len(rec["scalars"])
    for sec in ("param", "module"):
        n += sum(sum(v is not None for v in vals) for vals in rec[sec].values())
    return n


def as_arrays(rec: dict) -> dict:
    """The same record with per-name values as float32 arrays (MISSING for None), the
    shape a recorder that keeps its figures in numpy would hand over."""
    from gradtrace.trace import MISSING

    out = dict(rec)
    for sec in ("param", "module"):
        out[sec] = {k: np.array([MISSING if x is None else x for x in v], dtype=np.float32)
                    for k, v in rec[sec].items()}
    return out


def write_arrays(out: Path, n_steps: int) -> dict:
    """Write cost when the values arrive as numpy arrays (conversion not timed)."""
    from gradtrace.trace import TraceWriter

    w = TraceWriter(out, meta())
    costs = {"every-step": [], "activation": []}
    for rec in records(n_steps):
        rec = as_arrays(rec)
        t0 = time.perf_counter()
        w.write(rec)
        costs["activation" if "update_ratio" in rec["param"] else "every-step"].append(time.perf_counter() - t0)
    w.close()
    return {"mean": 1e6 * statistics.fmean(costs["every-step"] + costs["activation"]),
            "every": 1e6 * statistics.median(costs["every-step"]),
            "act": 1e6 * statistics.median(costs["activation"])}


def write(out: Path, n_steps: int) -> dict:
    from gradtrace.trace import TraceWriter

    w = TraceWriter(out, meta())
    costs = {"every-step": [], "activation": []}
    n_fig = 0
    for rec in records(n_steps):
        n_fig += figures(rec)
        t0 = time.perf_counter()
        w.write(rec)
        costs["activation" if "update_ratio" in rec["param"] else "every-step"].append(time.perf_counter() - t0)
    w.close()
    size = sum(f.stat().st_size for f in out.iterdir())
    all_costs = costs["every-step"] + costs["activation"]
    return {"bytes": size, "figures": n_fig, "steps": n_steps,
            "write_mean_us": 1e6 * statistics.fmean(all_costs),
            "write_every_us": 1e6 * statistics.median(costs["every-step"]),
            "write_act_us": 1e6 * statistics.median(costs["activation"])}


def rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class _Late(Exception):
    pass


def _alarm(*_):
    raise _Late


def read_side(out: str, limit: float) -> dict:
    """Runs in a fresh process: load, memory, series, diagnose (per detector), report."""
    import gradtrace as gt

    res: dict = {}
    before = rss()
    t0 = time.perf_counter()
    trace = gt.load(out)
    res["load_s"] = time.perf_counter() - t0
    res["rss_after_load"] = rss() - before
    t = []
    for name in ("50.weight", "52.bias", "150.weight", "0.bias", "198.bias"):
        t0 = time.perf_counter()
        v = trace.series("grad_norm", name)
        t.append(time.perf_counter() - t0)
    res["series_ms"] = 1e3 * statistics.median(t)
    res["series_len"] = int(v.size)
    res["rss_after_series"] = rss() - before
    from gradtrace.diagnose import DETECTORS, Thresholds
    th = Thresholds()
    per = {}
    signal.signal(signal.SIGALRM, _alarm)
    for det in DETECTORS:
        name = f"{det.__module__.rsplit('.', 1)[-1]}.{det.__name__}"
        signal.alarm(int(limit))
        t0 = time.perf_counter()
        try:
            det(trace, th)
            per[name] = time.perf_counter() - t0
        except _Late:
            per[name] = float("inf")
        except Exception as e:  # a detector broken by work in progress elsewhere: say so
            per[name] = f"error: {type(e).__name__}: {str(e)[:80]}"
        finally:
            signal.alarm(0)
    res["detectors"] = per
    from gradtrace.api import diagnose       # gt.diagnose: findings plus advised fixes
    signal.alarm(int(limit) * 3)
    t0 = time.perf_counter()
    findings: list = []
    try:
        findings = diagnose(trace)
        res["diagnose_s"] = time.perf_counter() - t0
    except _Late:
        res["diagnose_s"] = float("inf")
    except Exception as e:
        res["diagnose_s"] = f"error: {type(e).__name__}: {str(e)[:120]}"
    finally:
        signal.alarm(0)
    signal.alarm(int(limit) * 3)
    t0 = time.perf_counter()
    try:
        html = Path(out).parent / "report.html"
        gt.report(trace, str(html), findings=findings)
        res["report_s"] = time.perf_counter() - t0
        res["report_bytes"] = html.stat().st_size
    except _Late:
        res["report_s"], res["report_bytes"] = float("inf"), 0
    except Exception as e:
        res["report_s"], res["report_bytes"] = f"error: {type(e).__name__}: {str(e)[:120]}", 0
    finally:
        signal.alarm(0)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--out", default=None, help="trace directory (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the trace")
    ap.add_argument("--reuse", action="store_true", help="read the trace already in --out (write costs not measured)")
    ap.add_argument("--limit", type=float, default=60.0, help="seconds allowed per detector")
    ap.add_argument("--read-only", dest="read_only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read_only:
        print(json.dumps(read_side(args.read_only, args.limit)))
        return
    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="gt-trace-scale-"))
    run = root / "run"
    if args.reuse and (run / "meta.json").exists():
        size = sum(f.stat().st_size for f in run.iterdir())
        n_fig = sum(figures(r) for r in records(min(args.steps, 1000))) / min(args.steps, 1000) * args.steps
        w = {"bytes": size, "figures": n_fig, "steps": args.steps, "write_mean_us": float("nan"),
             "write_every_us": float("nan"), "write_act_us": float("nan")}
    else:
        if run.exists():
            shutil.rmtree(run)
        w = write(run, args.steps)
    wa = write_arrays(root / "arrays", min(args.steps, 5000))
    shutil.rmtree(root / "arrays")
    proc = subprocess.run([sys.executable, __file__, "--read-only", str(run), "--limit", str(args.limit)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    per_step = w["bytes"] / w["steps"]
    fig_step = w["figures"] / w["steps"]

    def ok(x: bool) -> str:
        return "met" if x else "MISSED"

    num = (lambda v, f: f.format(v) if isinstance(v, (int, float)) else str(v))
    ref = np.random.default_rng(0).uniform(size=1000).tolist()
    t0 = time.perf_counter()
    for _ in range(200):
        np.array(ref, dtype=np.float32)
    ref_us = (time.perf_counter() - t0) / 200 * 1e6
    print(f"machine reference: np.array of 1,000 Python floats takes {ref_us:.1f} us here "
          f"(about 15 us on an idle core); load average {os.getloadavg()[0]:.1f}")
    print(f"trace_scale: {w['steps']:,} steps, {2 * LAYERS} parameters, {2 * LAYERS} modules, "
          f"activation figures every {EVERY_ACT}th step; {os.cpu_count()} CPUs")
    print("| figure | target | measured | |")
    print("|---|---|---|---|")
    print(f"| bytes on disk per step | <= 1.1 x 4 B x {fig_step:.0f} figures = {1.1 * 4 * fig_step:.0f} B "
          f"| {per_step:.0f} B ({per_step / (4 * fig_step):.3f} x) | {ok(per_step <= 1.1 * 4 * fig_step)} |")
    print(f"| write a record (encode + write + flush) | <= 50 us | mean {w['write_mean_us']:.1f} us "
          f"(median every-step {w['write_every_us']:.1f}, activation {w['write_act_us']:.1f}) "
          f"| {ok(w['write_mean_us'] <= 50)} |")
    print(f"| ... same, values handed over as numpy arrays (first 5,000 steps) | <= 50 us "
          f"| mean {wa['mean']:.1f} us (median every-step {wa['every']:.1f}, activation {wa['act']:.1f}) "
          f"| {ok(wa['mean'] <= 50)} |")
    print(f"| gt.load | <= 0.5 s | {r['load_s']:.3f} s | {ok(r['load_s'] <= 0.5)} |")
    print(f"| resident memory after load | <= 1.5 x file ({1.5 * w['bytes'] / 1e6:.0f} MB) "
          f"| {r['rss_after_load'] / 1e6:.1f} MB (after a series: {r['rss_after_series'] / 1e6:.1f} MB) "
          f"| {ok(r['rss_after_load'] <= 1.5 * w['bytes'])} |")
    print(f"| series(stat, name), {r['series_len']:,} steps | <= 20 ms | {r['series_ms']:.2f} ms "
          f"| {ok(r['series_ms'] <= 20)} |")
    d = r["diagnose_s"]
    print(f"| gt.diagnose | <= 15 s | {num(d, '{:.2f} s')} | {ok(isinstance(d, float) and d <= 15)} |")
    rs, rb = r["report_s"], r["report_bytes"]
    print(f"| gt.report HTML | <= 15 s, <= 5 MB | {num(rs, '{:.2f} s')}, {rb / 1e6:.2f} MB "
          f"| {ok(isinstance(rs, float) and rs <= 15 and 0 < rb <= 5e6)} |")
    print("\nper detector (s; inf = over the --limit):")
    for name, v in r["detectors"].items():
        print(f"  {name:40s} {num(v, '{:.3f}')}")
    if not args.keep and not args.out:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
