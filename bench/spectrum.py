"""Benchmark: time per block of gt.spectrum, full spectrum vs matrix-free Lanczos, by width.

Prints two tables (not a test):
  1. seconds per block (Linear + tanh, a few examples) for each width and method, with
     the Lanczos top singular value's relative error against the full spectrum;
  2. gt.preflight on a 50-layer MLP of width 512, end to end (budget 10 s);
  3. gt.preflight on a 12-layer d=256 transformer encoder (pre-LN, sequence 32, batch 8),
     end to end and part by part (budget 30 s, issue 14).

Run: python bench/spectrum.py [--widths 64,128,256,512,1024] [--examples 4] [--repeats 3]
"""
from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import gradtrace as gt


def block(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    lin = nn.Linear(width, width)
    nn.init.normal_(lin.weight, 0, 1.5 / math.sqrt(width))
    return nn.Sequential(lin, nn.Tanh())


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up (vmap / functorch caches)
    best, out = math.inf, None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="64,128,256,512,1024")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    widths = [int(w) for w in a.widths.split(",")]
    print(f"torch {torch.__version__}, threads used by gt.spectrum: 1, examples {a.examples}, "
          f"Lanczos k={a.k} ({max(4 * a.k, 40)} steps), best of {a.repeats}")
    print()
    print(f"{'width':>6}  {'full s/block':>12}  {'lanczos s/block':>15}  {'full/lanczos':>12}  "
          f"{'σ_max rel err':>13}  {'gain rel err':>12}")
    for w in widths:
        m = block(w)
        x = torch.randn(a.examples, w, generator=torch.Generator().manual_seed(1))
        tf, sf = timed(lambda: gt.spectrum(m, x, n_samples=a.examples, method="full",
                                           end_to_end=False), a.repeats)
        tl, sl = timed(lambda: gt.spectrum(m, x, n_samples=a.examples, method="lanczos", k=a.k,
                                           end_to_end=False), a.repeats)
        err = float((sl.singular_values("0")[:, 0] / sf.singular_values("0")[:, 0] - 1).__abs__().max())
        gerr = abs(sl.gain("0") / sf.gain("0") - 1)
        print(f"{w:>6}  {tf:>12.4f}  {tl:>15.4f}  {tf / tl:>12.2f}  {err:>13.2e}  {gerr:>12.2e}")
    print()
    print("preflight, 50-layer ReLU MLP (Kaiming), width 512, batch 64:")
    torch.manual_seed(0)
    layers = []
    for _ in range(50):
        lin = nn.Linear(512, 512)
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    print(f"{'configuration':<40}  {'seconds':>8}")
    for label, kw in (("signal pass only (no spectrum)", dict(compute_spectrum=False)),
                      ("default (Lanczos above width 256)", {}),
                      ("full spectra (full_max=512)", dict(full_max=512))):
        t, _ = timed(lambda: gt.preflight(model, x, **kw), 1)
        print(f"{label:<40}  {t:>8.2f}")
    transformer_cost()


TRANSFORMER_BUDGET_S = 30.0


def timed_cpu(fn) -> tuple[float, float, object]:
    """(wall seconds, process CPU seconds, result) of one call after a warm-up call.

    Preflight runs on one intra-op thread, so its CPU time is the wall time it takes on
    an otherwise idle core; on shared cores the wall time also counts other people's work.
    """
    fn()
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def transformer_cost() -> None:
    from gradtrace.preflight import PREFLIGHT_SPECTRUM

    print()
    print("preflight, 12-layer transformer encoder, d=256, 8 heads, ff 1024, pre-LN, input 8×32×256:")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 8, 1024, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    x = torch.randn(8, 32, 256, generator=torch.Generator().manual_seed(3))
    kw = dict(n_samples=4, **PREFLIGHT_SPECTRUM)
    print(f"{'part':<44}  {'wall s':>7}  {'CPU s':>7}")
    wall = cpu = 0.0
    r = None
    for label, fn in (("signal pass (no spectrum)", lambda: gt.preflight(model, x, compute_spectrum=False)),
                      ("spectra of the 12 blocks", lambda: gt.spectrum(model, x, end_to_end=False, **kw)),
                      ("end-to-end spectrum (one block listed)",
                       lambda: gt.spectrum(model, x, blocks=["layers.0"], **kw)),
                      ("preflight, defaults (all of the above)", lambda: gt.preflight(model, x))):
        wall, cpu, r = timed_cpu(fn)
        print(f"{label:<44}  {wall:>7.2f}  {cpu:>7.2f}")
    print(f"budget {TRANSFORMER_BUDGET_S:.0f} s: {'met' if cpu <= TRANSFORMER_BUDGET_S else 'MISSED'} "
          f"on CPU time ({cpu:.1f} s; wall {wall:.1f} s); estimates: "
          f"{sorted({row.get('estimate') for row in r.summary['blocks']})}")
