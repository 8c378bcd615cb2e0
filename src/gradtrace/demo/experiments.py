"""The chapter's experiments: built-in models, synthetic data, one watched training run each.

Every run is seeded, runs on the CPU and writes a trace directory. The sizes come from a
:class:`DemoConfig` (``QUICK``, ``FULL``, or a smaller one for tests).

Example:
    >>> from gradtrace.demo.experiments import TINY, train_mlp
    >>> train_mlp("runs/sig", "sigmoid", TINY)
    'runs/sig'
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo's runs.

    Example:
        >>> QUICK.depth, FULL.depth
        (20, 20)
    """

    depth: int = 20            # hidden layers of the deep networks
    width: int = 64
    mlp_steps: int = 150
    seq_len: int = 50          # time steps of the recurrent task
    rnn_hidden: int = 32
    rnn_steps: int = 150
    relu_steps: int = 150
    relu_width: int = 128
    batch: int = 128
    activations_every: int = 5
    seed: int = 0


QUICK = DemoConfig(mlp_steps=300, rnn_steps=300, relu_steps=300, activations_every=10)
# The dead-unit group keeps QUICK's 300 steps in FULL: its units die within the first few
# dozen steps, and a longer run at its peak rate only adds edge-of-stability loss spikes to
# every activation (measured: Leaky ReLU and GELU spike near step 300-400 of 1000).
FULL = DemoConfig(mlp_steps=1000, seq_len=100, rnn_steps=800, relu_steps=300, activations_every=10)
#: A very small configuration for tests (seconds, not minutes).
TINY = DemoConfig(depth=8, width=16, mlp_steps=16, seq_len=50, rnn_hidden=32, rnn_steps=16,
                  relu_steps=16, relu_width=32, batch=32, activations_every=4)


# ---- data ----------------------------------------------------------------------------------------
def classification_data(n: int, dim: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random two-layer teacher (learnable, not linear).

    Example:
        >>> x, y = classification_data(100, 16, 4, seed=0)
        >>> tuple(x.shape), int(y.max()) < 4
        ((100, 16), True)
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1 = torch.randn(dim, 2 * dim, generator=g) / math.sqrt(dim)
    w2 = torch.randn(2 * dim, classes, generator=g) / math.sqrt(2 * dim)
    y = (torch.tanh(2 * x @ w1) @ w2).argmax(1)
    return x, y


def sequence_data(n: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A long-range task: from a sequence of noise, recall the sum of the first 3 inputs.

    Inputs are ``(seq_len, n, 2)``: channel 0 is noise, channel 1 marks the first three
    steps. The target depends only on the start, so the gradient must travel the whole
    sequence back in time.

    Example:
        >>> x, y = sequence_data(8, 20, seed=0)
        >>> tuple(x.shape), tuple(y.shape)
        ((20, 8, 2), (8, 1))
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(seq_len, n, 2)
    x[:, :, 0] = torch.randn(seq_len, n, generator=g)
    x[:3, :, 1] = 1.0
    y = x[:3, :, 0].sum(0, keepdim=True).T / math.sqrt(3)
    return x, y


# ---- models ---------------------------------------------------------------------------------------
class ResidualBlock(nn.Module):
    """The chapter's pre-norm residual block: ``x + Linear(GELU(Linear(LayerNorm(x))))``."""

    def __init__(self, dim: int, hidden: int | None = None):
        super().__init__()
        hidden = hidden or 2 * dim
        self.f = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f(x)


def deep_mlp(kind: str, depth: int, width: int, d_in: int, d_out: int) -> nn.Module:
    """A deep network of ``kind`` ``"sigmoid"`` (PyTorch default init), ``"relu_kaiming"``
    or ``"residual_layernorm"``.

    Example:
        >>> len(deep_mlp("sigmoid", 4, 8, 8, 2))      # 4 x (Linear, Sigmoid) + output Linear
        9
    """
    if kind == "residual_layernorm":
        return nn.Sequential(nn.Linear(d_in, width), *[ResidualBlock(width) for _ in range(depth)],
                             nn.LayerNorm(width), nn.Linear(width, d_out))
    layers: list[nn.Module] = []
    for i in range(depth):
        lin = nn.Linear(d_in if i == 0 else width, width)
        if kind == "relu_kaiming":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.ReLU()]
        elif kind == "sigmoid":
            layers += [lin, nn.Sigmoid()]
        else:
            raise ValueError(f"unknown network kind {kind!r}")
    return nn.Sequential(*layers, nn.Linear(width, d_out))


class SeqModel(nn.Module):
    """A recurrent layer (RNN, LSTM or GRU) read out from its last hidden state."""

    def __init__(self, cell: str, hidden: int, nonlinearity: str = "tanh"):
        super().__init__()
        if cell == "rnn":
            self.rnn: nn.Module = nn.RNN(2, hidden, nonlinearity=nonlinearity)
        elif cell == "lstm":
            self.rnn = nn.LSTM(2, hidden)
        elif cell == "gru":
            self.rnn = nn.GRU(2, hidden)
        else:
            raise ValueError(f"unknown cell {cell!r}")
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[-1])


def set_recurrent_radius(rnn: nn.RNN, radius: float, seed: int) -> None:
    """Make the recurrent matrix a scaled orthogonal one: every singular value = ``radius``.

    Above 1 the backward signal through time grows like ``radius**T``; below 1 it decays.
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(rnn.hidden_size, rnn.hidden_size, generator=g))
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(radius * q)
        rnn.bias_hh_l0.zero_()


def relu_family_mlp(act: str, width: int, d_in: int, d_out: int, depth: int = 4) -> nn.Module:
    """A ReLU-family MLP (``"relu"``, ``"leaky"`` or ``"gelu"``) for the dead-unit experiment."""
    make: dict[str, Callable[[], nn.Module]] = {
        "relu": nn.ReLU, "leaky": lambda: nn.LeakyReLU(0.01), "gelu": nn.GELU}
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(d_in if i == 0 else width, width), make[act]()]
    return nn.Sequential(*layers, nn.Linear(width, d_out))


# ---- training ------------------------------------------------------------------------------------------
def _clipper():
    """``gt.clip_grad_norm_`` when gradtrace ships it, else PyTorch's."""
    try:
        from gradtrace.remedies.clip import clip_grad_norm_

        return clip_grad_norm_
    except ImportError:
        return torch.nn.utils.clip_grad_norm_


def _train(model: nn.Module, opt: torch.optim.Optimizer, out: str, steps: int, batch_fn, loss_fn,
           cfg: DemoConfig, tick: Callable[[], None], clip: float | None = None,
           time_gradients: bool = False, lr_at: Callable[[int], float] | None = None) -> str:
    import gradtrace as gt

    clipper = _clipper() if clip is not None else None
    with gt.watch(model, opt, out=out, activations_every=cfg.activations_every,
                  time_gradients=time_gradients) as mon:
        for step in range(steps):
            if lr_at is not None:
                for group in opt.param_groups:
                    group["lr"] = lr_at(step)
            x, y = batch_fn(step)
            loss = loss_fn(model(x), y)
            mon.record_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clipper is not None:
                clipper(model.parameters(), max_norm=clip)
            opt.step()
            tick()
    return out


def train_mlp(out: str, kind: str, cfg: DemoConfig, tick: Callable[[], None] = lambda: None) -> str:
    """Train a deep ``kind`` network (see :func:`deep_mlp`) on the teacher task; returns ``out``.

    Example:
        >>> train_mlp("runs/sigmoid", "sigmoid", TINY)
        'runs/sigmoid'
    """
    torch.manual_seed(cfg.seed)
    d_in, classes = 16, 4
    x, y = classification_data(cfg.batch * 8, d_in, classes, cfg.seed)
    model = deep_mlp(kind, cfg.depth, cfg.width, d_in, classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)

    def batch(step: int):
        i = (step % 8) * cfg.batch
        return x[i:i + cfg.batch], y[i:i + cfg.batch]

    return _train(model, opt, out, cfg.mlp_steps, batch, F.cross_entropy, cfg, tick)


#: Recurrent variants: (cell, nonlinearity, recurrent radius or None for PyTorch's init,
#: clip max-norm or None, optimizer). The exploding pair uses plain SGD, whose step is
#: proportional to the gradient (so an exploding gradient is an exploding step); the
#: vanishing/gated group uses Adam, as one would to train gated cells in practice.
RNN_VARIANTS = {
    "rnn_exploding": ("rnn", "relu", 1.6, None, "sgd"),
    "rnn_clipped": ("rnn", "relu", 1.6, 1.0, "sgd"),
    "rnn_vanishing": ("rnn", "tanh", 0.5, None, "adam"),
    "lstm": ("lstm", "tanh", None, None, "adam"),
    "gru": ("gru", "tanh", None, None, "adam"),
}


def train_rnn(out: str, variant: str, cfg: DemoConfig, tick: Callable[[], None] = lambda: None) -> str:
    """Train one of :data:`RNN_VARIANTS` on the long-range recall task; returns ``out``.

    Example:
        >>> train_rnn("runs/rnn", "rnn_clipped", TINY)
        'runs/rnn'
    """
    cell, nonlin, radius, clip, optim = RNN_VARIANTS[variant]
    torch.manual_seed(cfg.seed)
    x, y = sequence_data(cfg.batch * 4, cfg.seq_len, cfg.seed)
    model = SeqModel(cell, cfg.rnn_hidden, nonlin)
    if radius is not None:
        set_recurrent_radius(model.rnn, radius, cfg.seed)
    if optim == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def batch(step: int):
        i = (step % 4) * cfg.batch
        return x[:, i:i + cfg.batch], y[i:i + cfg.batch]

    return _train(model, opt, out, cfg.rnn_steps, batch, F.mse_loss, cfg, tick, clip=clip, time_gradients=True)


#: Dead-unit variants: (activation, peak learning rate of SGD with momentum 0.9, decayed
#: along a cosine to 0 over the run). At 0.4 the first large steps push a quarter to a half
#: of the units of three ReLU layers below zero for every input for good, while Leaky ReLU
#: and GELU, on the same schedule, keep every unit and train further; ReLU at 0.2 loses
#: none. (Measured on QUICK: plain SGD at rates of 0.5-2.0 made every activation's loss
#: spike, and ReLU at 0.3 lost no units.)
RELU_VARIANTS = {
    "relu_high_lr": ("relu", 0.4),
    "leaky_high_lr": ("leaky", 0.4),
    "gelu_high_lr": ("gelu", 0.4),
    "relu_low_lr": ("relu", 0.2),
}


def train_relu(out: str, variant: str, cfg: DemoConfig, tick: Callable[[], None] = lambda: None) -> str:
    """Train one of :data:`RELU_VARIANTS`: the same MLP with a given activation and rate.

    Example:
        >>> train_relu("runs/relu", "relu_high_lr", TINY)
        'runs/relu'
    """
    act, lr = RELU_VARIANTS[variant]
    torch.manual_seed(cfg.seed)
    d_in, classes = 16, 4
    x, y = classification_data(cfg.batch * 8, d_in, classes, cfg.seed + 1)
    model = relu_family_mlp(act, cfg.relu_width, d_in, classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    steps = max(1, cfg.relu_steps)

    def cosine(step: int) -> float:
        return lr * 0.5 * (1 + math.cos(math.pi * step / steps))

    def batch(step: int):
        i = (step % 8) * cfg.batch
        return x[i:i + cfg.batch], y[i:i + cfg.batch]

    return _train(model, opt, out, cfg.relu_steps, batch, F.cross_entropy, cfg, tick, lr_at=cosine)


def scaled(cfg: DemoConfig, **changes) -> DemoConfig:
    """A copy of ``cfg`` with some sizes changed.

    Example:
        >>> scaled(QUICK, depth=4).depth
        4
    """
    return replace(cfg, **changes)
