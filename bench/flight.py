"""Cost of ``gradtrace run`` and of the flight recorder, measured interleaved in one run.

    python bench/flight.py [--steps 40] [--rounds 7] [--threads 1]

Step-time variants (four copies of the same seeded model, stepped in turn, the order
rotating every step; reported: median step time and the median over steps of each
step's ratio to ``bare``'s step next to it):

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


class Variant:
    """One seeded model + optimizer (+ its monitor), stepped one step at a time."""

    def __init__(self, name: str, out: Path, aw: AutoWatch):
        torch.manual_seed(0)
        self.model = mlp()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x, self.y = torch.randn(128, 256), torch.randint(0, 10, (128,))
        self.mon = None
        if name == "gt.watch":
            self.mon = gt.watch(self.model, self.opt, out=str(out))
        elif name == "gt.watch no fr":
            self.mon = gt.watch(self.model, self.opt, out=str(out), flight_recorder=False)
        if name != "gradtrace run":
            # The AutoWatch of this run must only pick up its own variant: the others are
            # marked as known (their steps still pay its global hook's one dict lookup).
            aw._seen[self.opt] = True

    def step(self) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad()
        nn.functional.cross_entropy(self.model(self.x), self.y).backward()
        self.opt.step()
        return time.perf_counter() - t0


def bundle_cost(tmp: Path) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(128, 256)
    x[0] = 3e38                                    # finite, but the first Linear overflows:
    with torch.no_grad():
        model[0].weight[0].fill_(1.0)              # 256 x 3e38 > float32's largest
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
    with tempfile.TemporaryDirectory() as d:
        aw = AutoWatch(str(Path(d) / "auto")).start()
        runs = {v: Variant(v, Path(d) / v.replace(" ", "_"), aw) for v in variants}
        warm = 5                                   # attach, first loop, allocator warm-up
        for i in range(warm + a.steps * a.rounds):
            order = variants[i % len(variants):] + variants[:i % len(variants)]
            got = {v: runs[v].step() for v in order}   # the variants take turns, step by step
            if i >= warm:
                for v in variants:
                    times[v].append(got[v])
        aw.close()
        for r in runs.values():
            if r.mon is not None:
                r.mon.close()
        assert len(aw.monitors) == 1, "AutoWatch must watch the gradtrace-run variant only"
        print(f"24-layer MLP, width 256, batch 128; CPU, {a.threads} thread(s); "
              f"{a.steps * a.rounds} steps per variant, interleaved step by step")
        print("| variant | median step | median of per-step ratios to bare |\n|---|---|---|")
        for v in variants:
            ratio = statistics.median(t / b for t, b in zip(times[v], times["bare"]))
            print(f"| {v} | {statistics.median(times[v]) * 1e3:.2f} ms | {ratio:.3f}x |")
        print("\nflight recorder on the non-finite step (once per run)")
        print("| | |\n|---|---|")
        for k, v in bundle_cost(Path(d)):
            print(f"| {k} | {v} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
