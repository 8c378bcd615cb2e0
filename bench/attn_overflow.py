"""A byte LM whose attention logits are computed in float16: the realistic suite's attention-logit overflow.

The failure large transformers trained in reduced precision meet (and why they add
qk-LayerNorm): nothing bounds ``q . k``, so at a high rate the query and key projections
keep growing, the logits with them, until one passes float16's largest value (65504),
becomes ``inf`` and softmax turns its row into nan. The model keeps every weight in
float32 (as mixed precision does) and casts only the logit product to float16 (what
autocast does to a matmul). ``q``, ``k`` and the product itself are separate modules, so
a recorder watching leaves sees each one's output figures.

``control="scaled"`` divides the logits by ``sqrt(head_dim)``, ``control="qkln"`` also
normalises q and k per head (qk-LayerNorm): the matching healthy runs at the same rate.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

CONTROLS = (None, "scaled", "qkln")


class QKLogits(nn.Module):
    """``scale * q @ k^T`` computed in float16 (its output overflows past 65504)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return (q * self.scale).half() @ k.half().transpose(-2, -1)


class Block(nn.Module):
    """Pre-LN causal self-attention + MLP; q, k, v, o are separate ``nn.Linear``."""

    def __init__(self, dim: int, heads: int, control: str | None):
        super().__init__()
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        hd = dim // heads
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.q_norm = nn.LayerNorm(hd) if control == "qkln" else nn.Identity()
        self.k_norm = nn.LayerNorm(hd) if control == "qkln" else nn.Identity()
        self.logits = QKLogits(1.0 if control is None else 1.0 / math.sqrt(hd))
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        #: the largest |logit| of the last forward (float32 of the float16 product; inf once it overflows)
        self.max_logit = 0.0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, t, d = h.shape
        x = self.ln1(h)

        def split(z):
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        future = torch.ones(t, t, dtype=torch.bool, device=h.device).triu(1)
        a = self.logits(self.q_norm(q), self.k_norm(k)).float()
        self.max_logit = float(a.detach().masked_fill(future, 0.0).abs().max())
        p = torch.softmax(a.masked_fill(future, float("-inf")), dim=-1)   # softmax in float32, as autocast does
        h = h + self.o((p @ v).transpose(1, 2).reshape(b, t, d))
        return h + self.mlp(self.ln2(h))


class AttnLM(nn.Module):
    """Byte embedding + learned positions -> ``layers`` blocks -> LayerNorm -> 256 logits."""

    def __init__(self, dim: int = 64, layers: int = 1, heads: int = 4, ctx: int = 32, control: str | None = None):
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(ctx, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, control) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln(h))


def train(watch, steps: int, *, lr: float = 0.1, control: str | None = None, probe: list | None = None,
          heads: int = 4):
    """Adam at ``lr`` on standard-library source bytes (batch 8 x 32), via the suite's loop;
    ``heads`` attention heads over 64 dims (fewer heads: longer q.k sums, larger logits).
    ``probe``, if given, receives ``(step, loss, max_logit, |q(x)|, |k(x)|)`` per step
    (block 0's figures of that step's forward), for the per-step table."""
    from realistic_runs import _seed, cached, lm_batch, loop

    g = _seed()
    data = cached("code")
    model = AttnLM(heads=heads, control=control)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    blk = model.blocks[0]
    norms: dict[str, float] = {}
    if probe is not None:
        for name in ("q", "k"):
            getattr(blk, name).register_forward_hook(
                lambda m, i, o, name=name: norms.__setitem__(name, float(o.detach().norm())))

    def loss_at(step):
        xb, yb = lm_batch(data, 8, 32, g)
        loss = F.cross_entropy(model(xb).reshape(-1, 256), yb.reshape(-1))
        if probe is not None:
            probe.append((step, float(loss.detach()), blk.max_logit, norms["q"], norms["k"]))
        return loss
    return loop(model, opt, steps, loss_at, watch)
