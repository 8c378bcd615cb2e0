"""What the norm engine costs over a bare ``torch._foreach_norm``, and what sharing saves.

Cases: a narrow and a wide model, and the narrow one with gradients ~1e-13 (a vanishing
network: nothing is lost in float32, so nothing may be redone). Interleaved on one
thread: each round runs every variant in turn (5 calls each, thread CPU time, so time
spent descheduled on a shared machine is not counted); the table gives the median over
rounds per call and per tensor. Before each timed call the gradients are written to
(new ``_version``\\ s, as a backward would), untimed, except where a variant says it
reuses.

* ``bare _foreach_norm``: torch's fused kernel alone, the floor;
* ``engine``: ``norms.grad_norms``, nobody listening (grouping, the CPU range check);
* ``engine, float64 path``: the accelerator path forced on the CPU (float64
  accumulation instead of the range check): what the check saves on a CPU;
* ``engine, vector (recorder)``: ``norms.norm_vector(.., uniform=True)``, the recorder's
  call: one foreach + one stack, nothing remembered;
* ``engine, listening``: the same while an observer is registered (norms remembered);
* ``engine, reused``: a second call on unchanged gradients (nothing read);
* ``clip: torch`` / ``clip: gradtrace``: each library's ``clip_grad_norm_``;
* ``clip after a listener's norms``: gradtrace's clip when a monitor already took the
  norms at the end of backward (untimed): the clip reuses them.

A second table decides :data:`gradtrace.norms.SMALL_NUMEL`, the size up to which the CPU
route sums squares of same-shape tensors as the rows of one float64 stack instead of by
``_foreach_norm``: per-tensor cost of each route for 200 tensors of one shape. (Measured
outside a training loop, where both are cheaper; right after a backward the stack's lead
grows: 33 us against 139 us for 64 tensors of 32 entries.)

Run: ``python bench/norms.py [--rounds 100]``. The recorder's ``bench/overhead.py``
measures the end result, monitor + clip against clip on a whole training step.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradtrace import norms as N
from gradtrace.remedies.clip import clip_grad_norm_


def _cases():
    torch.manual_seed(0)
    for name, n, width, scale in (("100 x Linear(8, 8)", 100, 8, 1.0),
                                  ("100 x Linear(8, 8), norms ~1e-13", 100, 8, 1e-14),
                                  ("24 x Linear(256, 256)", 24, 256, 1.0)):
        yield name, scale, [torch.nn.Parameter(torch.randn(width, width)) for _ in range(n)] + \
            [torch.nn.Parameter(torch.randn(width)) for _ in range(n)]


def _float64_path(grads):
    saved, N.HOST_READ_FREE = N.HOST_READ_FREE, frozenset()
    try:
        return N.grad_norms(grads)
    finally:
        N.HOST_READ_FREE = saved


def run(rounds: int, reps: int = 5) -> list[str]:
    torch.set_num_threads(1)
    rows = ["| tensors | variant | µs per call | µs per tensor |", "|---|---|---|---|"]
    for name, scale, params in _cases():
        for p in params:
            p.grad = torch.randn_like(p) * scale
        grads = [p.grad for p in params]
        k = len(grads)

        def write():         # what a backward does to the gradients: new versions
            torch._foreach_add_(grads, 0.0)

        def noop():
            pass

        # name -> (setup before each call (untimed), timed call, listening?)
        variants = {
            "bare _foreach_norm": (write, lambda: torch._foreach_norm(grads, 2), False),
            "engine": (write, lambda: N.grad_norms(grads), False),
            "engine, float64 path": (write, lambda: _float64_path(grads), False),
            "engine, vector (recorder)": (write, lambda: N.norm_vector(grads, uniform=True),
                                          False),
            "engine, listening": (write, lambda: N.grad_norms(grads), True),
            "engine, reused": (noop, lambda: N.grad_norms(grads), True),
            "clip: torch": (write, lambda: torch.nn.utils.clip_grad_norm_(params, 1e9), False),
            "clip: gradtrace": (write, lambda: clip_grad_norm_(params, 1e9), False),
            "clip after a listener's norms": (lambda: (write(), N.grad_norms(grads)),
                                              lambda: clip_grad_norm_(params, 1e9), True),
        }
        times: dict[str, list[float]] = {v: [] for v in variants}
        for r in range(rounds + 3):
            for v, (setup, fn, listening) in variants.items():
                handle = N.register(lambda *a: None) if listening else None
                try:
                    total = 0.0
                    for _ in range(reps):
                        setup()
                        t0 = time.thread_time()
                        fn()
                        total += time.thread_time() - t0
                finally:
                    if handle is not None:
                        handle.remove()
                if r >= 3:           # the first rounds warm caches and allocator
                    times[v].append(total / reps)
        for v in variants:
            med = statistics.median(times[v]) * 1e6
            rows.append(f"| {name} | {v} | {med:.0f} | {med / k:.2f} |")
        ratio = statistics.median(a / b for a, b in zip(times["clip after a listener's norms"],
                                                        times["clip: gradtrace"]))
        rows.append(f"| {name} | clip after a listener's norms / clip | {ratio:.2f}× | |")
    return rows


def routes(rounds: int, reps: int = 5) -> list[str]:
    """Per-tensor µs of the two CPU routes by tensor size (200 tensors, interleaved)."""
    torch.set_num_threads(1)
    rows = [f"| entries | _foreach_norm float32 | float64 stack route | engine takes "
            f"(SMALL_NUMEL = {N.SMALL_NUMEL}) |", "|---:|---:|---:|---|"]
    g = torch.Generator().manual_seed(1)
    for size in (8, 64, 256, 512, 1024, 4096):
        ts = [torch.randn(size, generator=g) for _ in range(200)]
        fns = {"foreach": lambda: torch.stack(torch._foreach_norm(ts, 2, dtype=torch.float32)),
               "stack": lambda: N._stack_norms(ts)}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(rounds + 3):
            for k, fn in fns.items():
                t0 = time.thread_time()
                for _ in range(reps):
                    fn()
                if r >= 3:
                    times[k].append((time.thread_time() - t0) / reps)
        a, b = (statistics.median(times[k]) / len(ts) * 1e6 for k in ("foreach", "stack"))
        rows.append(f"| {size} | {a:.2f} | {b:.2f} | "
                    f"{'stack' if size <= N.SMALL_NUMEL else 'foreach'} |")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=100)
    rounds = ap.parse_args().rounds
    print("\n".join(run(rounds)))
    print()
    print("\n".join(routes(max(10, rounds // 5))))
