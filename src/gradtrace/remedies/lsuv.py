"""LSUV: orthonormal init, then each layer rescaled in execution order to unit output std.

Mishkin & Matas 2016, "All you need is a good init"; the orthonormal start follows Saxe,
McClelland & Ganguli 2014.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn

from ._report import LAYERS as _LAYERS
from ._report import LSUVRow, Report

__all__ = ["lsuv_"]


class _StopForward(Exception):
    pass


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def lsuv_(model: nn.Module, batch: Any, tol: float = 0.1, max_iter: int = 10, *,
          zero_bias: bool = True) -> Report:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016), in place.

    Every Linear/Conv weight gets an orthonormal init (biases zeroed when
    ``zero_bias``); then, layer by layer in the order the forward pass calls them, the
    weight is divided by the std of the layer's output on ``batch`` until
    ``|std - 1| < tol`` or ``max_iter`` rescalings were done. The model runs in eval mode
    (every module's training flag is restored afterwards) under ``torch.no_grad``; each
    measurement stops the forward pass right after the layer in question. Forward hooks
    are removed in a ``finally`` block. ``batch`` is passed as ``model(batch)``,
    ``model(*batch)`` for a tuple/list or ``model(**batch)`` for a dict.

    Returns a :class:`Report` of :class:`LSUVRow`.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        >>> rows = lsuv_(net, torch.randn(64, 16))
        >>> all(r.converged for r in rows)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not float(tol) > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise ValueError("lsuv_: the model has no Linear/Conv layers")
    names = {id(m): n for n, m in layers}
    training = {m: m.training for m in model.modules()}
    handles: list[Any] = []
    report = Report()
    try:
        model.eval()
        with torch.no_grad():
            for _, m in layers:
                nn.init.orthogonal_(m.weight)
                if zero_bias and getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            order: list[nn.Module] = []

            def record(mod: nn.Module, inp: Any, out: Any) -> None:
                if all(mod is not o for o in order):
                    order.append(mod)

            handles = [m.register_forward_hook(record) for _, m in layers]
            _run(model, batch)
            for h in handles:
                h.remove()
            handles = []
            for layer in order:
                measured: list[torch.Tensor] = []

                def grab(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
                    measured.append(out.detach().float().std())
                    raise _StopForward

                handles = [layer.register_forward_hook(grab)]

                def measure() -> float:
                    measured.clear()
                    try:
                        _run(model, batch)
                    except _StopForward:
                        pass
                    return float(measured[0])

                std = first = measure()
                iters = 0
                while (abs(std - 1.0) >= tol and iters < max_iter and math.isfinite(std)
                       and std > 0.0):
                    layer.weight.div_(std)
                    iters += 1
                    std = measure()
                handles[0].remove()
                handles = []
                report.append(LSUVRow(names[id(layer)], iters, first, std,
                                      abs(std - 1.0) < tol))
            called = {id(m) for m in order}
            for n, m in layers:
                if id(m) not in called:
                    report.append(LSUVRow(n + " (not called: orthogonal only)", 0,
                                          math.nan, math.nan, False))
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return report


