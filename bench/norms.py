"""What the norm engine costs over a bare ``torch._foreach_norm``, and what sharing saves.

Interleaved on one thread: each round runs every variant once, in turn, and the table
reports the median over rounds of (variant - bare foreach) per tensor, in µs. Variants:

* ``engine``: ``norms.grad_norms`` with nobody listening (grouping, finite-safe check);
* ``listening, miss``: the same while an observer is registered, on tensors changed
  since (the norms are computed and remembered);
* ``listening, hit``: a second call on unchanged tensors (reused, nothing computed);
* ``clip: torch`` / ``clip: gradtrace``: ``clip_grad_norm_`` of torch and of gradtrace;
* ``monitor-like + clip``: a listener's ``grad_norms`` then gradtrace's clip, against
  gradtrace's clip alone (the reuse the recorder relies on).

Run: ``python bench/norms.py [--rounds 200]``.
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
    yield "100 x Linear(8, 8)", [torch.nn.Parameter(torch.randn(8, 8)) for _ in range(100)] + \
        [torch.nn.Parameter(torch.randn(8)) for _ in range(100)]
    yield "24 x Linear(256, 256)", [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(24)] + \
        [torch.nn.Parameter(torch.randn(256)) for _ in range(24)]


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(rounds: int) -> list[str]:
    torch.set_num_threads(1)
    rows = ["| tensors | variant | µs per call | extra µs per tensor vs bare foreach |",
            "|---|---|---|---|"]
    for name, params in _cases():
        for p in params:
            p.grad = torch.randn_like(p)
        grads = [p.grad for p in params]
        k = len(grads)

        def bump():          # a backward would write new values: new versions, no hit
            torch._foreach_add_(grads, 0.0)

        variants = {
            "bare _foreach_norm": lambda: (bump(), torch._foreach_norm(grads, 2)),
            "engine": lambda: (bump(), N.grad_norms(grads)),
            "listening, miss": lambda: (bump(), N.grad_norms(grads)),
            "listening, hit": lambda: N.grad_norms(grads),
            "clip: torch": lambda: (bump(), torch.nn.utils.clip_grad_norm_(params, 1e9)),
            "clip: gradtrace": lambda: (bump(), clip_grad_norm_(params, 1e9)),
            "monitor-like + clip": lambda: (bump(), N.grad_norms(grads), clip_grad_norm_(params, 1e9)),
        }
        listening = {"listening, miss", "listening, hit", "monitor-like + clip"}
        times: dict[str, list[float]] = {v: [] for v in variants}
        bump_t: list[float] = []
        for r in range(rounds + 5):
            bt = _timed(bump)
            for v, fn in variants.items():
                handle = N.register(lambda *a: None) if v in listening else None
                if v == "listening, hit":
                    bump()
                    N.grad_norms(grads)
                try:
                    t = _timed(fn)
                finally:
                    if handle is not None:
                        handle.remove()
                if r >= 5:
                    times[v].append(t)
            if r >= 5:
                bump_t.append(bt)
        base = times["bare _foreach_norm"]
        for v in variants:
            med = statistics.median(times[v]) * 1e6
            if v == "listening, hit":
                med_b = statistics.median(bump_t) * 1e6
                extra = statistics.median([(a - b) for a, b in zip(times[v], base)]) * 1e6 + med_b
            else:
                extra = statistics.median([(a - b) for a, b in zip(times[v], base)]) * 1e6
            rows.append(f"| {name} | {v} | {med:.0f} | {extra / k:+.2f} |")
        ratio = statistics.median([a / b for a, b in zip(times["monitor-like + clip"],
                                                        times["clip: gradtrace"])])
        rows.append(f"| {name} | (monitor-like + clip) / clip | {ratio:.3f}× | |")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    print("\n".join(run(ap.parse_args().rounds)))
