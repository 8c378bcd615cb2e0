"""Before training: measure the layer Jacobians of a 30-layer ReLU MLP with Xavier init,
fix the initialisation for its activations, and measure again.

    python examples/preflight_and_init.py
"""
import torch
from torch import nn

import gradtrace as gt

torch.manual_seed(0)
layers = []
for _ in range(30):
    layers += [nn.Linear(128, 128), nn.ReLU()]
model = nn.Sequential(*layers, nn.Linear(128, 10))
for m in model:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        nn.init.zeros_(m.bias)
x = torch.randn(64, 128)

before = gt.preflight(model, x)
print("before:", [f.kind for f in before] or "healthy")
print(gt.init_for_activation(model))
after = gt.preflight(model, x)
print("after:", [f.kind for f in after] or "healthy")
