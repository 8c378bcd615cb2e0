"""Cost of ``gradtrace run`` and of the flight recorder, measured interleaved in one run.

    python bench/flight.py [--steps 40] [--rounds 7] [--threads 1]

Step-time variants (same seeded model, rounds alternate A B C D ...; reported: median
step time and the median over rounds of each round's ratio to ``bare``):

  bare              plain training
  gt.watch          ``gt.watch(model, opt)`` placed before the loop (defaults)
  gt.watch no fr    the same with ``flight_recorder=False``
  gradtrace run     ``AutoWatch`` (what ``gradtrace run`` uses): found at the first step;
                    its global module hooks leave after one loop, its global optimizer
                    hook stays (one Python call per step)

Then, once, on the non-finite step of the same model: the bundle's size, the time to
write it, and the time ``gt.replay`` takes to name the op.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

import gradtrace as gt
from gradtrace.autowatch import AutoWatch
from gradtrace.record import flight


def mlp(depth: int = 24, width: int = 256) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def train(variant: str, steps: int, out: Path) -> float:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(128, 256), torch.randint(0, 10, (128,))
    ctx = None
    if variant == "gt.watch":
        ctx = gt.watch(model, opt, out=str(out))
    elif variant == "gt.watch no fr":
        ctx = gt.watch(model, opt, out=str(out), flight_recorder=False)
    elif variant == "gradtrace run":
        ctx = AutoWatch(str(out)).start()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    if ctx is not None:
        ctx.close()
    return statistics.median(times[5:])          # the first steps attach and warm up


def bundle_cost(tmp: Path) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(128, 256)
    x[0, 0] = float("inf")                         # the step goes non-finite in the first Linear
    cap = SimpleNamespace(args=(x,), kwargs={}, rng_state=flight.rng_state())
    nn.functional.cross_entropy(model(x), torch.zeros(128, dtype=torch.long)).backward()
    t0 = time.perf_counter()
    path = flight.save_bundle(tmp / "fr", model=model, optimizer=opt, capture=cap, step=0, reason="bench")
    save_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    r = gt.replay(path)
    replay_s = time.perf_counter() - t0
    n = sum(p.numel() for p in model.parameters())
    return [("parameters", f"{n:,}"), ("bundle size", f"{path.stat().st_size / 1e6:.1f} MB"),
            ("write the bundle", f"{save_s * 1e3:.0f} ms"), ("gt.replay", f"{replay_s * 1e3:.0f} ms"),
            ("replay found", r.headline[:90])]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    variants = ["bare", "gt.watch", "gt.watch no fr", "gradtrace run"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    ratios: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            order = variants[r % len(variants):] + variants[:r % len(variants)]
            got = {v: train(v, a.steps, Path(d) / f"{v}-{r}".replace(" ", "_")) for v in order}
            for v in variants:
                times[v].append(got[v])
                ratios[v].append(got[v] / got["bare"])
        print(f"24-layer MLP, width 256, batch 128; CPU, {a.threads} thread(s); "
              f"{a.rounds} rounds x {a.steps} steps, interleaved")
        print("| variant | median step | median ratio to bare |\n|---|---|---|")
        for v in variants:
            print(f"| {v} | {statistics.median(times[v]) * 1e3:.2f} ms | {statistics.median(ratios[v]):.3f}x |")
        print("\nflight recorder on the non-finite step (once per run)")
        print("| | |\n|---|---|")
        for k, v in bundle_cost(Path(d)):
            print(f"| {k} | {v} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
