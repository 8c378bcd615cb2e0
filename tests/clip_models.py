"""Small models with gradients and a host-read counter, shared by the clipping tests."""
from __future__ import annotations

import torch
import torch.nn as nn

RTOL = 1e-6          # vs torch.nn.utils (same arithmetic, different summation order)
REF_RTOL = 1e-5      # vs plain-float references
SEED = 1234


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, 2, stride=2)
        self.fc = nn.Linear(6 * 8 * 8, 5)

    def forward(self, x):
        return self.fc(torch.relu(self.up(torch.relu(self.conv(x)))).flatten(1))

def _mlp():
    return nn.Sequential(nn.Linear(7, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))

def _rnn():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.rnn(self.emb(x))[0][:, -1])
    return M()

def _input(name, n=4):
    if name == "cnn":
        return torch.randn(n, 3, 4, 4)
    if name == "rnn":
        return torch.randint(0, 20, (n, 5))
    return torch.randn(n, 7)


MODELS = {"mlp": _mlp, "cnn": TinyCNN, "rnn": _rnn}


def _make(name, mixed=False, scale=10.0):
    """A model with gradients; with mixed=True some parameters are float64/bfloat16."""
    torch.manual_seed(SEED)
    model = MODELS[name]()
    x = _input(name)
    model(x).pow(2).sum().mul(scale).backward()
    if mixed:
        params = list(model.parameters())
        for i, p in enumerate(params):
            if i % 3 == 1:
                p.data = p.data.double()
                p.grad = p.grad.double()
            elif i % 3 == 2:
                p.data = p.data.bfloat16()
                p.grad = p.grad.bfloat16()
    # one parameter without a gradient must be skipped
    first = next(model.parameters())
    first.grad = None
    return model

def _grads(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]

def _assert_grads_close(a, b, rtol=RTOL):
    for ga, gb in zip(a, b):
        if ga is None or gb is None:
            assert ga is None and gb is None
            continue
        assert ga.dtype == gb.dtype
        torch.testing.assert_close(ga, gb, rtol=rtol, atol=0.0)

class SyncCounter:
    """Counts Tensor->host conversions while installed via monkeypatch."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        self.where: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def wrapper(t, *a, **k):
            self.count += 1
            self.where.append(name)
            return original(t, *a, **k)
        return wrapper
