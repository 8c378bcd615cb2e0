"""What building and writing a gradient-only step's record costs, measured in the training loop.

    python bench/record_cost.py [--steps 20] [--rounds 8] [--quick]

Two models (CPU, one torch thread, ``gt.watch`` defaults writing to a temporary trace):
the 24-layer MLP of ``bench/overhead.py`` (50 parameter tensors) and 100 x
(Linear(8, 8) + Tanh) (200 tensors). Per gradient-only step, the thread CPU time of
``Assembler.build`` and of the monitor's ``_write`` (encode + one ``write()``), medians
over the steps. Measured where they run, right after ``optimizer.step()``: there every
numpy call and system call costs several times its isolated time, so a microbenchmark
would mislead. Three monitors on three copies of the seeded model, their rounds
interleaved so that machine noise hits all alike:

  short path      the code as it is: the gradient-only record's short path
                  (``Assembler._grad_only``) and the encoder's row recipe
  general path    the same monitor forced through ``Assembler._build`` and the
                  encoder's general path every step (what every record took before)
  write() alone   the short path, plus one ``os.write`` of a row-sized buffer to a
                  scratch file timed just before the record (the system call's own
                  cost at that point of the loop; not counted in its build + write)

Target (issue 9): build + write <= ~30 us + ~0.1 us per parameter tensor.
Not a test: the numbers depend on the machine (a virtual machine's system calls cost more).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead as oh  # noqa: E402  (the seeded models, step and variant of the overhead bench)

import gradtrace as gt  # noqa: E402


def _models():
    g = torch.Generator().manual_seed(0)
    yield ("24-layer MLP, width 256, batch 128", lambda: oh.mlp(24),
           (torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)))
    yield ("100 x (Linear(8, 8) + Tanh), batch 16", lambda: nn.Sequential(*oh.mlp(100, 8, nn.Tanh)[:-1]),
           (torch.randn(16, 8, generator=g), torch.randint(0, 8, (16,), generator=g)))


class Timed:
    """One watched copy of the model whose record building and writing are timed."""

    def __init__(self, name: str, make_model, batch, mode: str, out: str):
        self.name = name
        self.v = oh.Variant(name, make_model, batch, "bare")
        self.mon = gt.watch(self.v.model, self.v.opt, out=out)
        self.v.mon = self.mon
        self.build, self.write = [], []
        self._cur = [0, 0]
        asm, enc = self.mon._assembler, self.mon._writer._encoder
        build = asm._build if mode == "general" else asm.build
        if mode == "general":
            encode = enc.encode

            def general_encode(rec, copy=True):
                enc._fast.clear()           # no row recipe: the general path every time
                return encode(rec, copy)
            enc.encode = general_encode
        write = self.mon._write
        scratch = None
        if mode == "syscall":
            fd = os.open(os.path.join(out, "scratch.bin"), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            scratch = (fd, bytes(8 * (len(self.mon._param_names) + 8)))
        self.syscall: list[int] = []

        def timed_build(*args):
            t = time.thread_time_ns()
            try:
                return build(*args)
            finally:
                self._cur[0] += time.thread_time_ns() - t

        def timed_write(rec):
            if scratch is not None and "event" not in rec:
                t = time.thread_time_ns()
                os.write(*scratch)
                self.syscall.append(time.thread_time_ns() - t)
            t = time.thread_time_ns()
            write(rec)
            self._cur[1] += time.thread_time_ns() - t
        asm.build = timed_build
        self.mon._write = timed_write

    def run(self, steps: int, keep: bool = True) -> None:
        for _ in range(steps):
            act = self.mon._act
            self._cur[:] = [0, 0]
            self.v.step()
            if keep and not act:            # gradient-only steps
                self.build.append(self._cur[0])
                self.write.append(self._cur[1])

    def close(self) -> None:
        self.mon.close()


def measure(title: str, make_model, batch, steps: int, rounds: int) -> None:
    tmp = tempfile.mkdtemp(prefix="gt-record-cost-")
    vs = [Timed(n, make_model, batch, m, os.path.join(tmp, m))
          for n, m in (("short path", "short"), ("general path", "general"), ("write() alone", "syscall"))]
    for v in vs:
        v.run(12, keep=False)           # warm-up: row recipes, allocator, first-step caches
    for _ in range(rounds):
        for v in vs:
            v.run(steps)
    n = len(vs[0].mon._param_names)
    print(f"\n{title}: {n} parameter tensors; per gradient-only step, median us (thread clock, in the loop)")
    print("| code | build | write | build + write | target |")
    print("|---|---:|---:|---:|---:|")
    med = statistics.median
    for v in vs[:2]:
        both = med([b + w for b, w in zip(v.build, v.write)]) / 1e3
        print(f"| {v.name} | {med(v.build) / 1e3:.1f} | {med(v.write) / 1e3:.1f} | {both:.1f} | "
              f"{30 + 0.1 * n:.0f} |")
    print(f"| one write() system call alone | | {med(vs[2].syscall) / 1e3:.1f} | | |")
    loads = [gt.load(v.mon.out) for v in vs[:2]]
    for v in vs:
        v.close()
    a, b = (t.matrix("grad_norm") for t in loads)
    same = a.values.shape == b.values.shape and (a.values == b.values).all()
    print(f"short and general path traces hold the same grad_norm values: {bool(same)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 10, 2
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds x {args.steps} steps per variant, "
          f"interleaved")
    for title, make_model, batch in _models():
        measure(title, make_model, batch, args.steps, args.rounds)


if __name__ == "__main__":
    main()
