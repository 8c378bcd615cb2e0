"""Watch a deep sigmoid MLP train, then ask gradtrace what went wrong and write a report.

    python examples/watch_and_diagnose.py [--out runs/sigmoid] [--steps 60]
"""
import argparse
import textwrap

import torch
from torch import nn

import gradtrace as gt

ap = argparse.ArgumentParser()
ap.add_argument("--out", default="runs/sigmoid")
ap.add_argument("--steps", type=int, default=60)
args = ap.parse_args()

torch.manual_seed(0)
layers = []
for _ in range(16):
    layers += [nn.Linear(64, 64), nn.Sigmoid()]
model = nn.Sequential(*layers, nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)

with gt.watch(model, opt, out=args.out, activations_every=5) as mon:
    for step in range(args.steps):
        x = torch.randn(32, 64)
        loss = (model(x) - x[:, :1]).pow(2).mean()
        mon.record_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()

trace = gt.load(args.out)
print(f"first-layer / last-layer gradient norm: "
      f"{trace.series('grad_norm', '0.weight').mean() / trace.series('grad_norm', '32.weight').mean():.1e}")
for f in gt.diagnose(trace):
    print(f"{f.severity}: {f.kind} in {f.layers[:3]} from step {f.first_step}")
    print(f"   fix: {f.fixes[0].action}")
    print(textwrap.indent(f.fixes[0].code, "        "))
print("report:", gt.report(trace, f"{args.out}/report.html"))
