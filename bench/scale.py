"""How the cost of recording grows with the number of parameter tensors and the world size.

Prints two tables (CPU, one thread per process):

1. parameter tensors: a deep narrow MLP (2 tensors per layer); the step time without
   and with ``gt.watch`` (parameter figures every step, activations off), measured
   interleaved -- plain step, watched step, plain step, ... -- so drift hits both alike,
   in this thread's CPU time (one torch thread: time spent descheduled on a shared
   machine is not counted). The marginal cost per watched tensor is the slope between
   the smallest and largest model (target <= 2 us, issue 9).
2. world size 1 -> 2 (gloo, DDP): the same comparison inside each setting, plus the
   time of the cross-rank reduction itself (two all-reduces per recorded step).

Run: ``python bench/scale.py [--quick]``. Not a test: numbers depend on the machine.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time

import torch
from torch import nn

import gradtrace as gt

SEED = 0
WIDTH = 32
BATCH = 64


def mlp(layers: int, init: str = "default") -> nn.Module:
    """``init="default"``: PyTorch's own initialisation, under which a deep ReLU stack
    vanishes (gradients of 1e-15 and below by 64 layers, some exactly zero), so the norm
    engine re-measures those tensors in float64; ``"kaiming"``: He-normal weights and
    zero biases, a healthy stack whose norms are all taken in one float32 pass."""
    torch.manual_seed(SEED)
    mods: list[nn.Module] = []
    for _ in range(layers):
        lin = nn.Linear(WIDTH, WIDTH)
        if init == "kaiming":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        mods += [lin, nn.ReLU()]
    return nn.Sequential(*mods)


def _interleaved(model_plain, model_watched, opt_p, opt_w, x, reps: int, warm: int = 5):
    """Median seconds per step of each loop, alternating the two every step."""
    def step(model, opt):
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_p, t_w = [], []
    for i in range(warm + reps):
        for model, opt, acc in ((model_plain, opt_p, t_p), (model_watched, opt_w, t_w)):
            t0 = time.thread_time()
            step(model, opt)
            if i >= warm:
                acc.append(time.thread_time() - t0)
    return statistics.median(t_p), statistics.median(t_w)


def by_tensors(sizes: list[int], reps: int, init: str = "default") -> list[tuple]:
    rows = []
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(SEED))
    for layers in sizes:
        a, b = mlp(layers, init), mlp(layers, init)
        oa = torch.optim.SGD(a.parameters(), lr=1e-3)
        ob = torch.optim.SGD(b.parameters(), lr=1e-3)
        with gt.watch(b, ob, out=None, activations_every=0):
            tp, tw = _interleaved(a, b, oa, ob, x, reps)
        rows.append((2 * layers, tp * 1e3, tw * 1e3, (tw - tp) * 1e3, (tw - tp) / (2 * layers) * 1e6))
    return rows


def python_calls(sizes: list[int], steps: int = 20) -> list[tuple[int, float, float]]:
    """Python-level function calls per watched step, counted by cProfile (deterministic,
    unlike timings on a shared machine): calls into gradtrace's own code, and all calls."""
    import cProfile
    import pstats
    rows = []
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(SEED))
    for layers in sizes:
        results = []
        for watched in (False, True):
            m = mlp(layers)
            opt = torch.optim.SGD(m.parameters(), lr=1e-3)
            mon = gt.watch(m, opt, out=None, activations_every=0) if watched else None

            def step():
                m(x).pow(2).mean().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            for _ in range(3):
                step()
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(steps):
                step()
            pr.disable()
            st = pstats.Stats(pr).stats
            total = sum(v[1] for v in st.values()) / steps
            ours = sum(v[1] for k, v in st.items() if "gradtrace" in k[0]) / steps
            results.append((total, ours))
            if mon is not None:
                mon.close()
        (bare_total, _), (w_total, w_ours) = results
        rows.append((2 * layers, w_ours, w_total - bare_total))
    return rows


def _worker(rank: int, world: int, port: int, layers: int, reps: int, q) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    x = torch.randn(BATCH // world, WIDTH, generator=torch.Generator().manual_seed(SEED + rank))
    a, b = DDP(mlp(layers)), DDP(mlp(layers))
    oa = torch.optim.SGD(a.parameters(), lr=1e-3)
    ob = torch.optim.SGD(b.parameters(), lr=1e-3)
    with gt.watch(b, ob, out=None, activations_every=0) as mon:
        tp, tw = _interleaved(a, b, oa, ob, x, reps)
        # the reduction alone, on this step's parts
        red = mon._dist
        n = len(mon._params)
        parts = [("gsq", torch.rand(n)), ("gmax", torch.rand(n)), ("psq", torch.rand(n))]
        idx = list(range(n))
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            red.reduce(parts, idx)
            ts.append(time.perf_counter() - t0)
    if rank == 0:
        q.put((tp, tw, statistics.median(ts)))
    dist.barrier()
    dist.destroy_process_group()


def by_world(layers: int, reps: int) -> list[tuple]:
    import torch.multiprocessing as mp
    rows = []
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(SEED))
    a, b = mlp(layers), mlp(layers)
    oa, ob = torch.optim.SGD(a.parameters(), lr=1e-3), torch.optim.SGD(b.parameters(), lr=1e-3)
    with gt.watch(b, ob, out=None, activations_every=0):
        tp, tw = _interleaved(a, b, oa, ob, x, reps)
    rows.append((1, tp * 1e3, tw * 1e3, (tw - tp) * 1e3, 0.0))
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, layers, reps, q), nprocs=2, join=True,
                       start_method="spawn")
    tp, tw, tr = q.get(timeout=60)
    rows.append((2, tp * 1e3, tw * 1e3, (tw - tp) * 1e3, tr * 1e3))
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    reps = 15 if a.quick else 40
    sizes = [4, 16, 64] if a.quick else [4, 16, 64, 256]
    for init, what in (("kaiming", "He-normal init: healthy"),
                       ("default", "PyTorch's default init: vanishing, tiny norms re-measured")):
        print(f"# recording cost vs parameter tensors (MLP width {WIDTH}, batch {BATCH}, {what}; "
              f"median of {reps} interleaved steps, 1 thread)")
        print(f"{'tensors':>8} {'plain ms':>9} {'watched ms':>11} {'extra ms':>9} {'us/tensor':>10}")
        rows = by_tensors(sizes, reps, init)
        for n, tp, tw, d, per in rows:
            print(f"{n:>8} {tp:>9.3f} {tw:>11.3f} {d:>9.3f} {per:>10.2f}")
        # The per-step fixed cost (record, copy, hooks on the root) divides out of the
        # slope: what one more watched tensor costs on a step without activations
        # (target <= 2 us).
        (n0, _, _, d0, _), (n1, _, _, d1, _) = rows[0], rows[-1]
        print(f"marginal cost per watched tensor ({n0} -> {n1} tensors): "
              f"{(d1 - d0) / (n1 - n0) * 1e3:.2f} us\n")
    print("\n# Python function calls per step without activations (cProfile; load-independent)")
    print(f"{'tensors':>8} {'in gradtrace':>13} {'added in all':>13}")
    for n, ours, added in python_calls(sizes):
        print(f"{n:>8} {ours:>13.0f} {added:>13.0f}")
    layers = 16
    print(f"\n# world size (gloo, DDP, {2 * layers} tensors, global batch {BATCH})")
    print(f"{'world':>6} {'plain ms':>9} {'watched ms':>11} {'extra ms':>9} {'reduce ms':>10}")
    for w, tp, tw, d, r in by_world(layers, reps):
        print(f"{w:>6} {tp:>9.3f} {tw:>11.3f} {d:>9.3f} {r:>10.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
