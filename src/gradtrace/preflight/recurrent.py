"""Gradients through time in recurrent layers (Pascanu, Mikolov & Bengio 2013).

With γ bounding |φ′| (1 for tanh and ReLU), a largest singular value of W_hh below 1/γ
is sufficient for gradients to vanish through time. The Jacobian ∂h_t/∂h_0 over the time
steps of the example batch is measured as well, for gated cells too.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .ad import reason


def _rnn_gamma(m: nn.Module) -> float | None:
    """Bound on |φ′| of a plain RNN's nonlinearity; None for gated cells (LSTM/GRU)."""
    if isinstance(m, (nn.RNN, nn.RNNCell)):
        return 1.0  # tanh and ReLU derivatives are at most 1
    return None


def recurrent_rows(model: nn.Module, rnn_inputs: dict[str, tuple], time_horizon: int | None,
                   n_samples: int, seed: int) -> list[dict[str, Any]]:
    """One row per recurrent layer: σ_max(W_hh), γ, Pascanu's bound over the horizon and,
    where the layer's captured input allows, the measured ‖∂h_T/∂h_0‖ and its curve."""
    mods = dict(model.named_modules())
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name, m in mods.items():
        if not isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            continue
        whh = [p for n, p in m.named_parameters() if n.startswith("weight_hh")]
        smax = max(float(torch.linalg.matrix_norm(w.detach().float(), 2)) for w in whh) if whh else float("nan")
        gamma = _rnn_gamma(m)
        row: dict[str, Any] = {"layer": name, "type": type(m).__name__, "sigma_max_whh": smax,
                               "gamma": gamma, "steps": None, "jacobian_norm": None,
                               "rate_per_step": None, "norm_over_time": None}
        if name in rnn_inputs and isinstance(m, nn.RNNBase):
            try:
                row.update(_measure_time(m, rnn_inputs[name], n_samples, gen))
            except Exception as e:  # noqa: BLE001 - a layer we cannot measure is a row, not a crash
                row["not_measured"] = reason(e)
        T = row["steps"] or time_horizon
        horizon = time_horizon or T
        row["horizon"] = horizon
        row["pascanu_bound"] = (gamma * smax) ** horizon if (gamma is not None and horizon) else None
        rows.append(row)
    return rows


def _measure_time(m: nn.RNNBase, captured: tuple, n_samples: int, gen: torch.Generator) -> dict[str, Any]:
    """‖∂h_t/∂h_0 v‖ for t = 1..T (random unit v) and the spectral norm of ∂h_T/∂h_0."""
    args, kwargs = captured
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return {}
    bf = m.batch_first
    x = (x[:n_samples] if bf else x[:, :n_samples]).detach()
    B, T = (x.shape[0], x.shape[1]) if bf else (x.shape[1], x.shape[0])
    D = 2 if m.bidirectional else 1
    H = m.hidden_size if not getattr(m, "proj_size", 0) else m.proj_size
    h0 = torch.zeros(B, m.num_layers * D, H, dtype=x.dtype)
    lstm = isinstance(m, nn.LSTM)
    c0 = torch.zeros(m.num_layers * D, B, m.hidden_size, dtype=x.dtype)

    def seq(h: torch.Tensor) -> torch.Tensor:  # h0 (batch first) -> outputs (B, T, D·H)
        hx = h.transpose(0, 1).contiguous()
        out = m(x, (hx, c0) if lstm else hx)[0]
        return out if bf else out.transpose(0, 1)

    with torch.enable_grad():
        v = torch.randn(h0.shape, generator=gen, dtype=x.dtype)
        v = v / v.flatten(1).norm(dim=1).reshape(B, 1, 1)
        Jv = torch.autograd.functional.jvp(seq, h0, v)[1]  # (B, T, D·H)
        curve = Jv.double().norm(dim=2).mean(0)
        last = lambda h: seq(h)[:, -1]  # noqa: E731
        y, vjp_fn = torch.func.vjp(last, h0)
        eye = torch.eye(y.shape[1], dtype=y.dtype).unsqueeze(1).expand(-1, B, -1)
        try:
            J = torch.vmap(vjp_fn)(eye)[0]
        except (RuntimeError, NotImplementedError):
            J = torch.stack([vjp_fn(e)[0] for e in eye])  # no batching rule for this kernel
        J = J.reshape(y.shape[1], B, -1).transpose(0, 1)
    s = torch.linalg.matrix_norm(J.detach().float(), 2).double()
    jn = float(s.mean())
    return {"steps": T, "jacobian_norm": jn, "rate_per_step": jn ** (1.0 / T) if jn > 0 else 0.0,
            "norm_over_time": curve.tolist()}
