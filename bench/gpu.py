"""GPU overhead of gradtrace on a GPT-2-small-sized model, and a proof of zero host syncs.

    python bench/gpu.py [--steps 30] [--rounds 5] [--batch 8] [--seq 512]

Needs a CUDA device (exits 0 with a note otherwise). The model is built locally
(12 pre-LN blocks, d=768, 12 heads, vocabulary 50257: about 124 M parameters), trained in
bf16 autocast with AdamW. Printed:

1. step-time ratios, interleaved (A B A B ...): bare, gradtrace default, economy, full,
   and clip alone vs gradtrace monitor + fused clipping;
2. the number of host syncs on every step (recorded, activation and plain steps, with
   torch's clipping), each run under ``torch.cuda.set_sync_debug_mode("error")`` (any
   sync raises): gradtrace must add 0, and every step's record must reach the trace.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import torch
from torch import nn

import gradtrace as gt


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x, mask):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=50257, d=768, heads=12, layers=12, ctx=1024):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight            # tied, as in GPT-2

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), 1)
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for b in self.blocks:
            x = b(x, mask)
        return self.head(self.ln(x))


def make(mode: str, batch):
    torch.manual_seed(0)
    model = GPT().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    mon = None
    if mode in ("default", "economy", "full", "gtclip"):
        preset = {"default": "default", "economy": "economy", "full": "full", "gtclip": "default"}[mode]
        mon = gt.watch(model, opt, out=tempfile.mkdtemp(prefix="gt-gpu-"), preset=preset)
    x, y = batch

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        if mon is not None:
            mon.record_loss(loss)
        loss.backward()
        if mode == "clip":
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        elif mode == "gtclip":
            gt.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, mon


def timed(step, n):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device here; nothing measured")
        return 0
    g = torch.Generator(device="cuda").manual_seed(0)
    batch = (torch.randint(0, 50257, (args.batch, args.seq), device="cuda", generator=g),
             torch.randint(0, 50257, (args.batch, args.seq), device="cuda", generator=g))
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, GPT-2-small-sized, "
          f"batch {args.batch} x {args.seq}, bf16 autocast, fused AdamW")

    for title, modes, base in (
            ("monitoring", ["bare", "economy", "default", "full"], "bare"),
            ("clipping", ["clip", "gtclip"], "clip")):
        runs = {m: make(m, batch) for m in modes}
        times = {m: [] for m in modes}
        for m, (step, _) in runs.items():
            timed(step, 3)                         # warm-up
        for _ in range(args.rounds):
            for m, (step, _) in runs.items():
                times[m].append(timed(step, args.steps))
        med = {m: statistics.median(v) for m, v in times.items()}
        print(f"\n{title}\n| variant | ms / step | ratio to {base} |\n|---|---:|---:|")
        for m in modes:
            print(f"| {m} | {med[m] * 1e3:.2f} | {med[m] / med[base]:.3f}x |")
        for _, mon in runs.values():
            if mon is not None:
                mon.close()
        del runs
        torch.cuda.empty_cache()

    # Host syncs: every step (recorded or not, activation steps included, with torch's
    # clipping so the post-clip path runs) under torch.cuda.set_sync_debug_mode("error"),
    # where any synchronising call raises. Two warm-up steps first (lazy CUDA state).
    def count_syncs(watched: bool) -> tuple[int, list[str], int]:
        torch.manual_seed(0)
        model = GPT().cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        mon = gt.watch(model, opt, activations_every=4) if watched else None
        x, y = batch
        errors: list[str] = []
        for i in range(10):
            if i >= 2:
                torch.cuda.set_sync_debug_mode("error")
            try:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
                if mon is not None:
                    mon.record_loss(loss)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            except RuntimeError as e:
                errors.append(f"step {i}: {str(e).splitlines()[0][:160]}")
                opt.zero_grad(set_to_none=True)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        recorded = 0
        if mon is not None:
            mon.close()                     # close() may wait for the last copies: allowed
            recorded = len(mon.trace)
        return len(errors), errors, recorded

    bare_syncs, bare_err, _ = count_syncs(False)
    watched_syncs, watched_err, recorded = count_syncs(True)
    print(f"\nhost syncs on 8 steps under sync-debug 'error': bare model {bare_syncs}, watched "
          f"{watched_syncs} (gradtrace adds {watched_syncs - bare_syncs}); records written: {recorded}")
    for line in watched_err[:5]:
        print("  ", line)
    return 1 if watched_syncs > bare_syncs or recorded != 10 else 0


if __name__ == "__main__":
    raise SystemExit(main())
