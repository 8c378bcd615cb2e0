"""Attention-aware parts of preflight: branches of a transformer block, attention entropy, LN layout.

* **Branches.** In a residual block the stream passes through unchanged and each branch
  (attention, MLP) adds to it. :func:`find_branches` names each branch's first and last
  module from the block's structure, so the signal pass can measure the gain through
  each branch beside the gain through the whole block.
* **Attention-softmax saturation.** :class:`AttentionEntropy` wraps
  ``torch.nn.functional.scaled_dot_product_attention`` (used by ``nn.MultiheadAttention``
  and the Hugging Face SDPA attention) while the signal pass runs, and records for every
  attention row over the keys it may see (a) its entropy divided by its maximum (1:
  uniform, 0: one key takes all) and (b) the norm of the softmax's Jacobian
  diag(p) − ppᵀ, the local derivative that carries the gradient to the attention scores.
  A row is saturated when that norm is below 2·0.015·0.985 ≈ 0.03: for two keys the
  softmax is a sigmoid of the score difference with Jacobian norm 2p(1 − p), and this is
  the recorder's sigmoid bound (``SATURATION_BOUNDS``: outputs beyond 0.015/0.985, the
  derivative below ~6 % of its peak). A block whose rows are mostly saturated is
  reported like a saturated sigmoid layer. The entropy alone is no finding: a peaked
  row (entropy 0.3) passes more gradient to its scores than a uniform one. Measured
  with ``bench/preflight_grid.py --ablation``: character LMs whose query/key weights
  alone are ×4 start at entropy 0.33–0.35 (27–31 % of rows saturated) and end 200 Adam
  steps −0.03 to +0.24 nats from their ×1 twins, their query/key weights getting as
  large a share of the gradient as at ×1 or larger; scaling every other weight ×4
  instead (entropy 0.97–0.99) costs +0.25 to +0.77 nats. The loss gap of the all-×4
  models is the weight scale under Adam, not the attention.
* **Post-LN vs pre-LN.** Xiong et al. 2020 ("On Layer Normalization in the Transformer
  Architecture"): with LayerNorm after the residual addition, the gradients of the
  parameters are largest near the output at initialisation and shrink toward the input,
  which is why post-LN needs a learning-rate warm-up; pre-LN keeps them level.
  :func:`layout_from_gains` reads that from the measured per-block parameter gradients.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

import torch
from torch import nn

from ..record.selection import SATURATION_BOUNDS

__all__ = ["find_branches", "AttentionEntropy", "layout_from_gains"]

_MLP_WORDS = ("mlp", "feedforward", "feed_forward", "ffn")

_LO = SATURATION_BOUNDS["sigmoid"][0]
#: Jacobian norm below which an attention row is saturated: 2p(1 − p) at the recorder's
#: sigmoid bound (a two-key softmax is a sigmoid of the score difference)
SOFTMAX_SATURATED = 2 * _LO * (1 - _LO)


def _is_attention(m: nn.Module) -> bool:
    return isinstance(m, nn.MultiheadAttention) or (
        "attention" in type(m).__name__.lower() and any(True for _ in m.parameters()))


def find_branches(block: nn.Module) -> dict[str, tuple[str, str]]:
    """``{"attention": (first, last), "mlp": (first, last)}``: qualified names (inside
    ``block``) of the modules where each branch starts and ends; missing branches left out.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        >>> find_branches(layer)
        {'attention': ('self_attn', 'self_attn'), 'mlp': ('linear1', 'linear2')}
    """
    named = list(block.named_modules())
    out: dict[str, tuple[str, str]] = {}
    attn = [n for n, m in named if n and _is_attention(m)]
    if attn:
        # the deepest attention module: the attention itself, not a wrapper holding a norm
        name = max(attn, key=lambda n: n.count("."))
        out["attention"] = (name, name)
    mlp = [n for n, m in named if n and any(w in type(m).__name__.lower() for w in _MLP_WORDS)]
    mods = dict(named)
    if mlp:
        name = min(mlp, key=lambda n: n.count("."))
        out["mlp"] = (name, name)
    elif isinstance(mods.get("linear1"), nn.Linear) and isinstance(mods.get("linear2"), nn.Linear):
        out["mlp"] = ("linear1", "linear2")  # nn.TransformerEncoderLayer / DecoderLayer
    else:
        inter = [n for n, m in named if n and "intermediate" in type(m).__name__.lower()]
        if inter and isinstance(mods.get("output.dense"), nn.Linear):
            out["mlp"] = (inter[0], "output.dense")  # BERT: intermediate → output.dense
    return out


def _row_entropy(q: torch.Tensor, k: torch.Tensor, attn_mask: Any, is_causal: bool,
                 scale: float | None, enable_gqa: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per attention row that can see at least two keys: normalised entropy and the
    Frobenius norm of the softmax Jacobian ‖diag(p) − ppᵀ‖_F."""
    q, k = q.detach().double(), k.detach().double()
    if enable_gqa and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    L, S = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(L, S, dtype=torch.bool)
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool).tril()
    if isinstance(attn_mask, torch.Tensor):
        m = attn_mask.detach()
        if m.dtype == torch.bool:
            allowed = allowed & m
        else:
            m = m.double()
            scores = scores + m
            # Hugging Face masks with the dtype's most negative value, not -inf
            allowed = allowed & (m > torch.finfo(attn_mask.dtype).min / 2)
    allowed = allowed.expand_as(scores)
    p = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)
    h = -torch.special.xlogy(p, p).nan_to_num(0.0).sum(-1)
    n = allowed.sum(-1)
    ok = n >= 2
    # ‖diag(p) − ppᵀ‖²_F = Σp² − 2Σp³ + (Σp²)², without forming the n×n Jacobian
    p2, p3 = (p * p).sum(-1), (p ** 3).sum(-1)
    jac = (p2 - 2 * p3 + p2 * p2).clamp_min(0.0).sqrt()
    return (h[ok] / torch.log(n[ok].double())).float(), jac[ok]


class AttentionEntropy:
    """Records the entropy and the softmax Jacobian norm of attention rows per block while active.

    ``block_of`` maps a module to its block name; the entropy of a call is credited to
    the block whose forward is running. Use as a context manager around one forward.

    Example:
        >>> layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
        >>> with AttentionEntropy({"enc": layer}) as probe:
        ...     _ = layer(torch.randn(2, 5, 16))
        >>> s = probe.summary()["enc"]
        >>> 0.5 < s["attention_entropy"] <= 1.0, s["attention_saturated_rows"]
        (True, 0.0)
    """

    def __init__(self, blocks: dict[str, nn.Module]) -> None:
        self.blocks = blocks
        self.rows: dict[str, list[torch.Tensor]] = {}
        self._stack: list[str] = []
        self._handles: list[Any] = []

    def __enter__(self) -> "AttentionEntropy":
        F = torch.nn.functional
        self._orig = F.scaled_dot_product_attention
        orig = self._orig

        def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False, **kw):
            if self._stack:
                with torch.no_grad():
                    self.rows.setdefault(self._stack[-1], []).append(
                        _row_entropy(query, key, attn_mask, is_causal, scale, enable_gqa))
            extra = {"enable_gqa": True} if enable_gqa else {}
            return orig(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                        is_causal=is_causal, scale=scale, **extra, **kw)

        F.scaled_dot_product_attention = sdpa
        for name, m in self.blocks.items():
            def pre(mod, args, name=name):
                self._stack.append(name)

            def post(mod, args, out):
                if self._stack:
                    self._stack.pop()
            self._handles.append(m.register_forward_pre_hook(pre))
            self._handles.append(m.register_forward_hook(post))
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.nn.functional.scaled_dot_product_attention = self._orig
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def summary(self, peak: float = 0.5) -> dict[str, dict[str, float]]:
        """Per block: mean normalised entropy, the fraction of rows below ``peak``, the mean
        softmax Jacobian norm and the fraction of saturated rows (norm < SOFTMAX_SATURATED)."""
        out = {}
        for name, parts in self.rows.items():
            if not parts:
                continue
            e, jac = (torch.cat([p[i].flatten() for p in parts]) for i in range(2))
            if e.numel():
                out[name] = {"attention_entropy": float(e.mean()),
                             "attention_low_entropy_rows": float((e < peak).float().mean()),
                             "attention_jacobian_norm": float(jac.mean()),
                             "attention_saturated_rows": float((jac < SOFTMAX_SATURATED).double().mean())}
        return out


def layout_from_gains(rows: list[dict[str, Any]], ends_in_norm: list[bool]) -> dict[str, Any] | None:
    """LayerNorm layout and how the parameter-gradient norm runs across the blocks.

    ``layout`` is ``"post-LN"`` when every block's output is the output of a norm layer
    inside it (measured in the signal pass), else ``"pre-LN"``. ``output_over_median`` is
    the last block's parameter-gradient norm over the median block's: above 1 the
    gradients are largest near the output, the post-LN signature of Xiong et al. 2020.
    ``block_gain`` turns it into a growth per block, (last / median)^(2 / (L − 1)) for L
    blocks (the median sits (L − 1)/2 blocks before the last), so that one threshold
    means the same at every depth. None with fewer than two measured blocks.

    Example:
        >>> rows = [{"param_grad_norm": v} for v in (3.0, 2.0, 2.0, 2.0, 4.0)]
        >>> t = layout_from_gains(rows, [True] * 5)
        >>> t["output_over_median"], round(t["block_gain"], 4), t["layout"]
        (2.0, 1.4142, 'post-LN')
    """
    g = [r.get("param_grad_norm") for r in rows]
    g = [v for v in g if v is not None and v > 0 and math.isfinite(v)]
    if len(g) < 2:
        return None
    med = statistics.median(g)
    return {"layout": "post-LN" if ends_in_norm and all(ends_in_norm) else "pre-LN",
            "param_grad_first": g[0], "param_grad_last": g[-1], "param_grad_median": med,
            "output_over_median": g[-1] / med, "output_over_input": g[-1] / g[0],
            "block_gain": (g[-1] / med) ** (2.0 / (len(g) - 1))}


def norm_first_fix_target(model: nn.Module, blocks: list[str]) -> str | None:
    """The torch constructor to change when the blocks are post-LN ``nn.Transformer*Layer``s."""
    mods = dict(model.named_modules())
    for b in blocks:
        m = mods.get(b)
        if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.norm_first:
            return type(m).__name__
    return None
