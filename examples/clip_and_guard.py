"""A recurrent net whose gradients explode: clip with the monitor (norms computed once)
and let a Guard skip any step that still goes non-finite.

    python examples/clip_and_guard.py [--steps 100]
"""
import argparse

import torch
from torch import nn

import gradtrace as gt

ap = argparse.ArgumentParser()
ap.add_argument("--steps", type=int, default=100)
args = ap.parse_args()

torch.manual_seed(0)
rnn, head = nn.RNN(4, 32, nonlinearity="relu"), nn.Linear(32, 1)
with torch.no_grad():
    rnn.weight_hh_l0.copy_(1.6 * torch.linalg.qr(torch.randn(32, 32))[0])  # radius 1.6: explodes
model = nn.ModuleDict({"rnn": rnn, "head": head})
opt = torch.optim.SGD(model.parameters(), lr=1e-3)
guard = gt.Guard(opt, skip_nonfinite=True)

with gt.watch(model, opt, clip=gt.ZClip(warmup=10)) as mon:   # clipping fused with monitoring
    guard.monitor = mon                                         # skips land in the trace
    for step in range(args.steps):
        x = torch.randn(50, 16, 4)                             # 50 time steps
        out, _ = rnn(x)
        loss = (head(out[-1]) - x[0, :, :1]).pow(2).mean()
        mon.record_loss(loss)
        loss.backward()
        guard.step(loss)                                        # instead of opt.step()
        opt.zero_grad()

t = mon.trace
pre, post = t.series("total_grad_norm"), t.series("total_grad_norm_post_clip")
print(f"steps recorded: {len(t)}, skipped by the guard: {guard.skipped}")
print(f"largest gradient norm before clipping {pre.max():.3g}, after {post.max():.3g}")
print("parameters finite:", all(torch.isfinite(p).all() for p in model.parameters()))
