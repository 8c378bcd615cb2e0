"""Step-time overhead of gradtrace, measured interleaved (A B A B ...) in one run.

    python bench/overhead.py [--steps 60] [--rounds 7] [--threads 1] [--clock thread] [--quick]

Each variant trains the same seeded model; rounds alternate between variants so that
machine noise hits all of them alike. Reported: median step time, and the median over
rounds of each round's ratio to the baseline's time in that round (per-pair ratios).
The clock is this thread's CPU time by default (``--clock thread``: with one torch
thread every step's work runs on it, and time spent descheduled on a shared machine is
not counted); ``--clock wall`` for wall time. Then the defaults' cost by kind of step
(a gradient-only step and an activation step, each against a bare step run beside it),
and, part by part, where the defaults' remaining cost goes (cProfile, cumulative time of each of gradtrace's entry points per
step; cProfile inflates Python-heavy parts, so read it as shares, not as the ratio).
Variants:

  bare            plain training
  chapter loop    the chapter's per-parameter ``grad_stats`` (``.item()`` per tensor)
  norms floor     one grouped ``_foreach_norm`` of the gradients after each backward and
                  nothing else: the least any recorder of per-tensor gradient norms on
                  every step can cost (the defaults' floor)
  gt economy      ``preset="economy"``: parameter figures every 10th step
  gt default      ``gt.watch(model, opt)`` with default settings
  gt full         ``preset="full"``: every statistic on every step
  gt no capture   the defaults with the root forward pre-hook removed: the cost of
                  keeping each step's inputs and RNG state for the non-finite replay and
                  the flight recorder (nothing else of theirs runs on a healthy step)
  clip alone      torch ``clip_grad_norm_`` before each step
  gt + clip       gradtrace monitor with gradtrace's fused ``clip_grad_norm_``

Targets (issue 9): defaults <= 1.03x (MLP, transformer), <= 1.15x (100 x Linear(8, 8));
full <= 1.25x / 1.20x / 2x; monitor + clip <= 1.02x of clipping alone.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import tempfile
import time

import torch
from torch import nn

import gradtrace as gt


def mlp(depth: int, width: int = 256, act=nn.ReLU) -> nn.Module:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


class Encoder(nn.Module):
    def __init__(self, d: int = 128, layers: int = 6):
        super().__init__()
        self.embed = nn.Linear(32, d)
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                                               norm_first=True) for _ in range(layers))
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(1))


def chapter_grad_stats(model: nn.Module) -> None:
    """The chapter's loop: a host round trip per tensor (printing left out)."""
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        _ = (name, param.grad.norm().item(), param.data.norm().item())


class Variant:
    def __init__(self, name: str, make_model, batch, mode: str):
        torch.manual_seed(0)
        self.name, self.mode = name, mode
        self.model = make_model()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.x, self.y = batch
        self.mon = None
        if mode in ("default", "economy", "full", "gtclip", "nocapture"):
            self.mon = gt.watch(self.model, self.opt, out=tempfile.mkdtemp(prefix="gt-bench-"),
                                **({"preset": mode} if mode in ("economy", "full") else {}))
        if mode == "nocapture":       # the root forward pre-hook is the first handle attached
            self.mon._handles[0].remove()
        self.times: list[float] = []

    def step(self) -> None:
        out = self.model(self.x)
        loss = nn.functional.cross_entropy(out, self.y)
        if self.mon is not None:
            self.mon.record_loss(loss)
        loss.backward()
        if self.mode == "chapter":
            chapter_grad_stats(self.model)
        elif self.mode == "floor":
            torch.stack(torch._foreach_norm([p.grad for p in self.model.parameters()]))
        elif self.mode == "clip":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        elif self.mode == "gtclip":
            gt.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def run(self, steps: int) -> None:
        t0 = CLOCK[0]()
        for _ in range(steps):
            self.step()
        self.times.append((CLOCK[0]() - t0) / steps)

    def close(self) -> None:
        if self.mon is not None:
            self.mon.close()


CLOCK = [time.thread_time]


def parts(title: str, make_model, batch, steps: int) -> None:
    """The defaults' cost per step, part by part: each gradtrace entry point (a function
    of gradtrace called from outside it: a hook, an optimizer hook, an autograd callback)
    with its cumulative thread CPU time, against the whole step under the same profiler.
    An entry point called from another (the optimizer's pre-step hook runs a clipper)
    counts in both, so the rows may add up to more than the last one."""
    v = Variant("gt default", make_model, batch, "default")
    v.run(5)
    prof = cProfile.Profile(time.thread_time)      # the same clock as the whole step
    t0 = time.thread_time()
    prof.enable()
    for _ in range(steps):
        v.step()
    prof.disable()
    whole = (time.thread_time() - t0) / steps
    v.close()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    mine = {k for k in stats if "/gradtrace/" in k[0]}
    rows: dict[str, float] = {}
    for key in mine:
        callers = stats[key][4]
        if any(c not in mine for c in callers):
            name = f"{key[0].rsplit('/gradtrace/', 1)[1]}:{key[2]}"
            rows[name] = rows.get(name, 0.0) + sum(
                ct for c, (_, _, _, ct) in callers.items() if c not in mine)
    print(f"\n{title}: gradtrace defaults part by part (cProfile, {steps} steps, "
          f"activation steps included; whole profiled step {whole * 1e3:.2f} ms)")
    print("| entry point | ms / step | share of the profiled step |")
    print("|---|---:|---:|")
    total = 0.0
    for name, ct in sorted(rows.items(), key=lambda kv: -kv[1]):
        if ct / steps >= 5e-6:
            print(f"| {name} | {ct / steps * 1e3:.3f} | {ct / steps / whole:.1%} |")
        total += ct
    print(f"| all of gradtrace | {total / steps * 1e3:.3f} | {total / steps / whole:.1%} |")


def step_types(title: str, make_model, batch, steps: int) -> None:
    """The defaults' cost split by kind of step: a bare step and a watched step run one
    after the other (their order alternating), and each watched step is filed under its
    kind. Medians per kind; the amortised line is what ``activations_every=10`` adds."""
    bare = Variant("bare", make_model, batch, "bare")
    mon = Variant("gt default", make_model, batch, "default")
    for v in (bare, mon):
        v.run(5)
    t_bare, t_grad, t_act = [], [], []
    for i in range(steps):
        act = mon.mon._act
        for v in ((bare, mon) if i % 2 else (mon, bare)):
            t0 = CLOCK[0]()
            v.step()
            dt = CLOCK[0]() - t0
            (t_bare if v is bare else t_act if act else t_grad).append(dt)
    mon.close()
    b, g, a = (statistics.median(t) * 1e3 for t in (t_bare, t_grad, t_act))
    every = mon.mon.activations_every
    print(f"\n{title}: the defaults by kind of step ({steps} pairs, medians)")
    print("| step | ms | extra ms | ratio |")
    print("|---|---:|---:|---:|")
    print(f"| bare | {b:.2f} | | |")
    print(f"| gradient figures only (9 steps in 10) | {g:.2f} | {g - b:.3f} | {g / b:.3f}x |")
    print(f"| with activation figures (1 in {every}) | {a:.2f} | {a - b:.3f} | {a / b:.3f}x |")
    amort = ((every - 1) * (g - b) + (a - b)) / every
    print(f"| amortised | | {amort:.3f} | {1 + amort / b:.3f}x |")


def compare(title: str, make_model, batch, modes: list[tuple[str, str]], steps: int, rounds: int,
            baseline: str = "bare") -> dict[str, float]:
    variants = [Variant(n, make_model, batch, m) for n, m in modes]
    for v in variants:       # warm-up: allocator, kernels, first-step caches
        v.run(5)
        v.times.clear()
    for _ in range(rounds):
        for v in variants:
            v.run(steps)
    med = {v.name: statistics.median(v.times) for v in variants}
    base = next(v for v in variants if v.name == baseline)
    print(f"\n{title}")
    print(f"| variant | ms / step | ratio to {baseline} (median of per-round ratios) |")
    print("|---|---:|---:|")
    ratios = {}
    for v in variants:
        ratios[v.name] = statistics.median(t / b for t, b in zip(v.times, base.times))
        print(f"| {v.name} | {med[v.name] * 1e3:.2f} | {ratios[v.name]:.3f}x |")
        v.close()
    return ratios


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps per round and variant")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("thread", "wall"), default="thread",
                    help="thread CPU time (default) or wall time")
    ap.add_argument("--no-depth", action="store_true", help="skip the depth table")
    ap.add_argument("--quick", action="store_true", help="fewer steps (smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.rounds = 5, 2
    torch.set_num_threads(args.threads)
    CLOCK[0] = time.thread_time if args.clock == "thread" else time.perf_counter
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.rounds} rounds x {args.steps} steps, "
          f"medians of interleaved rounds, {args.clock} clock")

    modes = [("bare", "bare"), ("chapter loop", "chapter"), ("norms floor", "floor"), ("gt economy", "economy"),
             ("gt default", "default"), ("gt no capture", "nocapture"), ("gt full", "full")]
    g = torch.Generator().manual_seed(0)
    mlp_batch = (torch.randn(128, 256, generator=g), torch.randint(0, 10, (128,), generator=g))
    compare("24-layer MLP, width 256, batch 128 (Linear+ReLU)", lambda: mlp(24), mlp_batch,
            modes, args.steps, args.rounds)
    tr_batch = (torch.randn(16, 64, 32, generator=g), torch.randint(0, 10, (16,), generator=g))
    compare("6-layer pre-LN transformer encoder (d=128, 4 heads, seq 64, batch 16)", Encoder, tr_batch,
            modes, args.steps, args.rounds)
    narrow_batch = (torch.randn(16, 8, generator=g), torch.randint(0, 8, (16,), generator=g))
    compare("100 x (Linear(8, 8) + Tanh), batch 16 (launch-bound)",
            lambda: nn.Sequential(*mlp(100, 8, nn.Tanh)[:-1]), narrow_batch,
            modes, args.steps, args.rounds)
    compare("24-layer MLP: clipping alone vs monitor + fused clipping", lambda: mlp(24), mlp_batch,
            [("clip alone", "clip"), ("gt + clip", "gtclip")], args.steps, args.rounds, baseline="clip alone")
    step_types("24-layer MLP", lambda: mlp(24), mlp_batch, 10 * args.steps)
    step_types("100 x (Linear(8, 8) + Tanh)", lambda: nn.Sequential(*mlp(100, 8, nn.Tanh)[:-1]),
               narrow_batch, 10 * args.steps)
    parts("24-layer MLP", lambda: mlp(24), mlp_batch, 4 * args.steps)
    parts("100 x (Linear(8, 8) + Tanh)", lambda: nn.Sequential(*mlp(100, 8, nn.Tanh)[:-1]),
          narrow_batch, 4 * args.steps)
    if args.no_depth:
        return

    print("\nOverhead of gradtrace defaults vs depth (MLP width 256, batch 128)")
    print("| depth | bare ms | gt default ms | ratio |")
    print("|---:|---:|---:|---:|")
    for depth in (12, 50, 100, 200):
        steps = max(3, args.steps * 24 // depth)
        vs = [Variant(n, lambda: mlp(depth), mlp_batch, m) for n, m in (("bare", "bare"), ("gt", "default"))]
        for v in vs:
            v.run(3)
            v.times.clear()
        for _ in range(max(3, args.rounds // 2)):
            for v in vs:
                v.run(steps)
        b, m = (statistics.median(v.times) for v in vs)
        print(f"| {depth} | {b * 1e3:.1f} | {m * 1e3:.1f} | {m / b:.3f}x |")
        for v in vs:
            v.close()


if __name__ == "__main__":
    main()
