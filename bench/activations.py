"""Cost of the recorder's activation steps, measured interleaved (A B A B ...) in one run.

    python bench/activations.py [--steps 40] [--rounds 7] [--threads 1] [--quick] [--steptypes]

The gradient-only steps are ``bench/overhead.py``'s; this bench isolates what an
activation step adds: the module hooks, the batched figures at the end of the step, and
the record's assembly. For each model it trains the same seeded model as

  bare        plain training
  gt default  ``gt.watch(model, opt)``: activations every 10th step
  gt full     ``preset="full"``: activations and output-gradient norms on every step
  gt grads    ``activations_every=0``: gradient figures only, on default's record steps
  gt every    ``every=1, activations_every=0, backward_flags=False``: full's record steps
              without its activation steps (no module hook); full minus this is what
              the activation steps cost (the per-parameter figures full takes on an
              activation step, the update snapshot among them, are counted there too)

and reports the median step time (thread CPU clock, as ``bench/overhead.py``) and the median over rounds of each round's ratio to
bare (per-pair ratios), plus the mean ratio (the default preset's activation step is one
step in ten: the mean shows it where the median may hide it). A last table times the
host side of one full-preset record (assemble + write) per model.

Targets (issue 9): defaults <= 1.03x (MLP, transformer), <= 1.15x (100 x Linear(8, 8));
full <= 1.25x (MLP), <= 1.20x (transformer), <= 2x (100 x Linear(8, 8)).

``--steptypes`` prints what one activation step of the defaults adds (a bare and a
watched step in turn, split by step type; target: MLP <= +6 ms), then the in-loop cost
of the MLP's figures by strategy. Ideas measured in-loop for the activation steps
(thread clock, one thread, 2 shared cores: a few % of noise):

=====================================================  ==========================  =======
idea                                                   measured in-loop            kept
=====================================================  ==========================  =======
hold outputs >= SMALL_ENTRIES up to 256 KiB too (were  MLP hook time 5.3 -> 2.7    yes
measured per call in the hook), reduce them in groups  ms a step; whole step,
into a kept stack, centred in place (no third array)   interleaved with the old
                                                       code: -2.9 ms (none held:
                                                       +14.9 vs +14.3, equal)
same, into a fresh stack (page faults every step)      MLP hook time 4.5 ms        no
same for outputs over 256 KiB (HOLD_MAX_BYTES)         8 x 128 x 1024 MLP: hook    no
                                                       time 10.6 -> 1.0 ms, but
                                                       whole step +24.3 / +22.6
                                                       vs +21.5 / +23.2 ms: held
                                                       megabytes make the model's
                                                       own allocations fault
forward hooks straight into the modules' hook dicts    attach + detach, 200        yes
(register_forward_hook builds a handle per call)       modules: 1.85 -> 0.23 ms
no detach() per held output / retained gradient        ~2.5 us a call              yes
(reductions under no_grad)
a ReLU group's max from its per-unit maxima            one 3 MiB pass (~50 us)     yes
conv unit masks: amax over (N, H, W), not a            no transposed copy          yes
transposed reshape
per call: sub with alpha (no mean op), no stack of     5.3 -> 3.7-4.2 ms (MLP);    no (held
five 0-d figures, gt_ in place                         superseded by holding       instead)
out= into a kept 128 KiB scratch per call              slower than fresh (2.5 vs   no
                                                       1.7 ms for the MLP)
large output gradients: retain_grad (C++ copy) or      MLP +2.8 / +2.0 ms vs       no
a Python hook that holds them, then one norm           +1.7 ms (hook + norm now)
float64 sum of squares (for the centred norm)          vector_norm(dtype=float64)  no
                                                       costs 3x a float32 pass
=====================================================  ==========================  =======

All kept together, against the previous hooks.py + batched.py loaded side by side in one
process (bare, old, new step in turn; median extra ms of an activation step):
MLP defaults +15.9 -> +10.6, full +12.4 -> +9.8; 100 x (Linear(8, 8) + Tanh) defaults
+10.3 -> +9.8, full +7.9 -> +7.0 (its attach/detach saving lands on the step before).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gradtrace as gt  # noqa: E402
import overhead  # noqa: E402  (the same models, step and clock as the overhead bench)
from overhead import Encoder, mlp  # noqa: E402

MODES = {"bare": None, "gt default": {}, "gt full": {"preset": "full"},
         "gt grads": {"activations_every": 0},
         "gt every": {"every": 1, "activations_every": 0, "backward_flags": False}}


class Variant(overhead.Variant):
    """``overhead.Variant``'s seeded model, step and clock (thread CPU time), watched with
    ``MODES[name]``."""

    def __init__(self, name: str, make_model, batch):
        super().__init__(name, make_model, batch, "bare")
        kw = MODES[name]
        if kw is not None:
            self.mon = gt.watch(self.model, self.opt, out=tempfile.mkdtemp(prefix="gt-act-"), **kw)


def compare(title: str, make_model, batch, steps: int, rounds: int) -> None:
    variants = [Variant(n, make_model, batch) for n in MODES]
    for v in variants:                 # warm-up: allocator, kernels, first-step caches
        v.run(10)
        v.times.clear()
    for _ in range(rounds):
        for v in variants:
            v.run(steps)
    base = variants[0]
    print(f"\n{title}")
    print("| variant | ms / step | ratio to bare (median of per-round) | mean ratio |")
    print("|---|---:|---:|---:|")
    for v in variants:
        r = [t / b for t, b in zip(v.times, base.times)]
        print(f"| {v.name} | {statistics.median(v.times) * 1e3:.2f} | {statistics.median(r):.3f}x "
              f"| {statistics.mean(r):.3f}x |")
        v.close()


def record_cost(title: str, make_model, batch, n: int = 30) -> None:
    """Host time of one full-preset record: assemble (numpy) and write (encode + file)."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = gt.watch(model, opt, out=tempfile.mkdtemp(prefix="gt-act-"), preset="full")
    build, write = [], []
    orig_build, orig_write = mon._assembler.build, mon._write

    def timed_build(*a, **k):
        t0 = time.perf_counter()
        try:
            return orig_build(*a, **k)
        finally:
            build.append(time.perf_counter() - t0)

    def timed_write(rec):
        t0 = time.perf_counter()
        try:
            return orig_write(rec)
        finally:
            write.append(time.perf_counter() - t0)
    mon._assembler.build, mon._write = timed_build, timed_write
    x, y = batch
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    mon.close()
    print(f"| {title} | {statistics.median(build) * 1e6:.0f} | {statistics.median(write) * 1e6:.0f} |")


def step_types(title: str, make_model, batch, steps: int) -> None:
    """Extra thread time of each step type of the defaults: a bare and a watched model
    step in turn (A B A B ...), split by whether the watched step recorded activations."""
    bare = overhead.Variant("bare", make_model, batch, "bare")
    mon = Variant("gt default", make_model, batch)
    clock = overhead.CLOCK[0]
    tb, tg, ta = [], [], []
    for i in range(steps + 20):
        t0 = clock()
        bare.step()
        t1 = clock()
        act = mon.mon._act            # this step records activations (hooks attached)
        mon.step()
        t2 = clock()
        if i >= 20:                   # warm-up left out
            tb.append(t1 - t0)
            (ta if act else tg).append(t2 - t1)
    mon.close()
    b = statistics.median(tb)
    print(f"| {title} | {b * 1e3:.2f} | +{(statistics.median(tg) - b) * 1e3:.2f} | "
          f"+{(statistics.median(ta) - b) * 1e3:.2f} | {len(ta)} |")


def figure_ideas(steps: int) -> None:
    """In-loop cost of taking the MLP's activation figures (hook time a step, forward
    hooks on every module, strategies interleaved step by step): each call measured in
    its hook (``call_figures``) against calls held and reduced in groups at the end of
    the forward (``figures``), into a fresh stack or the kept one."""
    from gradtrace.record import batched

    torch.manual_seed(0)
    model = mlp(24)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    kinds = ["relu" if isinstance(m, nn.ReLU) else None for m in model]
    state = {"mode": "none", "held": [], "t": 0.0}
    last = len(model) - 1

    def hook(i):
        def run(module, inputs, out):
            t0 = time.thread_time()
            out = out.detach()
            if state["mode"] == "per call":
                batched.call_figures(out, kinds[i])
            elif state["mode"] != "none":
                state["held"].append((out, kinds[i]))
                if i == last:
                    groups: dict = {}
                    for t, k in state["held"]:
                        groups.setdefault((t.shape, k), []).append(t)
                    for (_, k), ts in groups.items():
                        batched.figures(ts, k, True)
            state["t"] += time.thread_time() - t0
        return run
    for i, m in enumerate(model):
        m.register_forward_hook(hook(i))
    modes = ["none", "per call", "held, fresh stack", "held, kept stack"]
    res: dict[str, list[float]] = {m: [] for m in modes}
    keep = batched.SCRATCH_BYTES
    for i in range(steps * len(modes) + 20):
        mode = modes[i % len(modes)]
        state.update(mode=mode, held=[], t=0.0)
        batched.SCRATCH_BYTES = 0 if mode == "held, fresh stack" else keep
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 20:
            res[mode].append(state["t"])
    batched.SCRATCH_BYTES = keep
    base = statistics.median(res["none"])
    print("| strategy (48 calls of 128 x 256) | hook ms / step |")
    print("|---|---:|")
    for mode in modes[1:]:
        print(f"| {mode} | {(statistics.median(res[mode]) - base) * 1e3:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    ap.add_argument("--only", choices=("mlp", "transformer", "narrow"), default=None)
    ap.add_argument("--steptypes", action="store_true",
                    help="only the per-step-type table (MLP and narrow) and the in-loop figure strategies")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 10, 2
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps, "
          "interleaved")
    g = torch.Generator().manual_seed(0)
    models = {
        "mlp": ("24-layer MLP, width 256, batch 128 (Linear+ReLU)", lambda: mlp(24),
                (torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g))),
        "transformer": ("6-layer pre-LN transformer encoder (d=128, 4 heads, seq 64, batch 16)", Encoder,
                        (torch.randn(16, 64, 32, generator=g), torch.randint(0, 10, (16,), generator=g))),
        "narrow": ("100 x (Linear(8, 8) + Tanh), batch 16 (launch-bound)",
                   lambda: nn.Sequential(*mlp(100, 8, nn.Tanh)[:-1]),
                   (torch.randn(16, 8, generator=g), torch.randint(0, 8, (16,), generator=g))),
    }
    chosen = [args.only] if args.only else list(models)
    if args.steptypes:
        print("\nDefaults, extra thread time per step type (median over steps, bare and watched in turn)")
        print("| model | bare ms | gradient-only step | activation step | activation steps |")
        print("|---|---:|---:|---:|---:|")
        for k in [c for c in chosen if c != "transformer"]:
            step_types(models[k][0], *models[k][1:], steps=300 if not args.quick else 60)
        print()
        figure_ideas(steps=40 if not args.quick else 10)
        return
    for k in chosen:
        compare(*models[k], args.steps, args.rounds)
    print("\nHost side of one full-preset record (median)")
    print("| model | assemble us | write us |")
    print("|---|---:|---:|")
    for k in chosen:
        _, make, batch = models[k]
        record_cost(k, make, batch)


if __name__ == "__main__":
    main()
