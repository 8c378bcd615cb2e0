"""Mean-field signal propagation for plain MLPs (Poole et al. 2016; Schoenholz et al. 2017).

The per-layer gain χ₁ = σ_w² E_z[φ′(√q z)²] follows from the weight variance and the
activation at the fixed point q* of q ← σ_w² E[φ(√q z)²] + σ_b²; the depth scale
ξ = 1/|ln χ₁| says over how many layers a signal survives. Moments come from
Gauss–Hermite quadrature (exact closed forms for ReLU and linear).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..record.selection import SATURATION_BOUNDS

__all__ = ["mean_field", "saturated_fraction"]


_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(100)  # even count: no node at 0
_GH_W = _GH_W / math.sqrt(2 * math.pi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


# activation -> (φ, φ′) on numpy arrays; piecewise-linear ones get exact moments below
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x))),
    "relu": (lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "linear": (lambda x: x, lambda x: np.ones_like(x)),
    "gelu": (lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
             lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
             + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
    "silu": (lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
}
# pre-activation beyond which the output leaves SATURATION_BOUNDS (|tanh| > 0.97,
# sigmoid outside (0.015, 0.985))
_SAT_PRE = {"tanh": math.atanh(SATURATION_BOUNDS["tanh"][1]),
            "sigmoid": math.log(SATURATION_BOUNDS["sigmoid"][1] / (1 - SATURATION_BOUNDS["sigmoid"][1]))}
_MODULE_ACT = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.Identity: "linear",
               nn.GELU: "gelu", nn.SiLU: "silu"}


def _moments_q(act: str, q: float) -> tuple[float, float]:
    """(E[φ(√q z)²], E[φ′(√q z)²]) for z ~ N(0, 1)."""
    if act == "relu":
        return q / 2, 0.5
    if act == "linear":
        return q, 1.0
    phi, dphi = _ACTIVATIONS[act]
    h = math.sqrt(max(q, 0.0)) * _GH_X
    return float(_GH_W @ phi(h) ** 2), float(_GH_W @ dphi(h) ** 2)


def saturated_fraction(activation: str, q: float) -> float | None:
    """Fraction of φ(h), h ~ N(0, q), beyond the recorder's ``SATURATION_BOUNDS``
    (tanh, sigmoid; None for unbounded activations). Both bounds are symmetric about the
    activation's centre, so it is P(|h| > h_sat) = erfc(h_sat / √(2q)).

    Example:
        >>> round(saturated_fraction("tanh", 1.0), 4), saturated_fraction("relu", 1.0)
        (0.0364, None)
    """
    if activation not in _SAT_PRE:
        return None
    return math.erfc(_SAT_PRE[activation] / math.sqrt(2 * q)) if q > 0 else 0.0


def mean_field(activation: str, sigma_w2: float, sigma_b2: float = 0.0, q0: float = 1.0,
               depth: int = 500) -> dict[str, float]:
    """Mean-field fixed point q* and χ₁ = σ_w² E[φ′(√q* z)²] (Gauss–Hermite quadrature).

    Iterates q ← σ_w² E[φ(√q z)²] + σ_b² from ``q0`` for ``depth`` layers. Also returns the
    depth scale ξ = 1/|ln χ₁| (``inf`` at χ₁ = 1) and, for tanh and sigmoid, the fraction
    of outputs saturated at q* (:func:`saturated_fraction`; None otherwise).

    Example:
        >>> round(mean_field("relu", 2.0)["chi1"], 6)
        1.0
        >>> mean_field("tanh", 1.0)["chi1"] <= 1.0
        True
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; valid: {', '.join(_ACTIVATIONS)}")
    if not sigma_w2 > 0 or sigma_b2 < 0:
        raise ValueError(f"need sigma_w2 > 0 and sigma_b2 >= 0, got {sigma_w2!r}, {sigma_b2!r}")
    q = float(q0)
    for _ in range(depth):
        q = sigma_w2 * _moments_q(activation, q)[0] + sigma_b2
    chi1 = sigma_w2 * _moments_q(activation, q)[1]
    xi = math.inf if abs(math.log(chi1)) < 1e-12 else 1.0 / abs(math.log(chi1))
    return {"q_star": q, "chi1": chi1, "depth_scale": xi,
            "saturated_fraction": saturated_fraction(activation, q)}


def plain_mlp(model: nn.Module, groups: list[list[str]]) -> list[tuple[nn.Linear, str]] | None:
    """[(linear, activation)] per block when every block is Linear [+ one activation]."""
    mods = dict(model.named_modules())
    out = []
    for g in groups:
        ms = [mods[n] for n in g if not isinstance(mods[n], (nn.Dropout, nn.Flatten))]
        if not ms or not isinstance(ms[0], nn.Linear) or len(ms) > 2:
            return None
        act = "linear"
        if len(ms) == 2:
            act = _MODULE_ACT.get(type(ms[1]))
            if act is None:
                return None
        out.append((ms[0], act))
    return out if len(out) >= 2 else None


def mean_field_profile(layers: list[tuple[nn.Linear, str]], q_in: float) -> list[dict[str, float]]:
    """Per-block σ_w², σ_b², pre-activation variance q and predicted gain χ₁."""
    rows = []
    m2 = q_in  # mean square of the block input
    for lin, act in layers:
        w = lin.weight.detach()
        sw2 = float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2) / w.numel() * lin.in_features
        sb2 = (float(torch.linalg.vector_norm(lin.bias.detach(), dtype=torch.float64) ** 2) / lin.bias.numel()
               if lin.bias is not None else 0.0)
        q = sw2 * m2 + sb2
        phi2, dphi2 = _moments_q(act, q)
        rows.append({"sigma_w2": sw2, "sigma_b2": sb2, "q": q, "chi1": sw2 * dphi2,
                     "activation": act, "saturated_fraction": saturated_fraction(act, q)})
        m2 = phi2
    return rows
