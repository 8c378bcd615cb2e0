"""Jacobian-vector products that survive kernels without forward-mode AD, and saying which one ran.

Fused kernels often lack forward-mode derivatives (the transformer encoder fast path
``_transformer_encoder_layer_fwd``) or double-backward (the CPU flash-attention kernel).
:func:`differentiable` turns both off for the duration of a measurement: the math
attention backend (plain matmul + softmax, differentiable in every mode) and no
nn.Transformer fast path. :func:`jvp` then tries, in order, forward mode
(``torch.func.jvp``), the double-backward trick (two reverse passes), and central finite
differences, and records which estimate it used so every figure can say where it came from.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

#: the estimates a J·v product can come from, most exact first
ESTIMATES = ("forward-mode", "double-backward", "finite-difference")

#: relative step of the central difference, scaled by the RMS of x (float32 sweet spot:
#: truncation error ~ eps², rounding ~ 1e-7 / eps)
FD_REL_STEP = 1e-3


@contextlib.contextmanager
def differentiable():
    """Math attention backend and no transformer fast path, restored on exit.

    Example:
        >>> with differentiable():
        ...     torch.backends.mha.get_fastpath_enabled()
        False
    """
    mha = getattr(torch.backends, "mha", None)
    before = mha.get_fastpath_enabled() if mha is not None else None
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # older torch: only the default backends exist
            pass
        if mha is not None:
            mha.set_fastpath_enabled(False)
        try:
            yield
        finally:
            if mha is not None:
                mha.set_fastpath_enabled(before)


def _finite_difference(f: Callable, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scale = float(x.detach().double().pow(2).mean().sqrt()) or 1.0
    vn = float(v.detach().double().pow(2).mean().sqrt()) or 1.0
    eps = FD_REL_STEP * scale / vn
    with torch.no_grad():
        return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


def jvp(f: Callable, x: torch.Tensor, v: torch.Tensor, used: set[str] | None = None) -> torch.Tensor:
    """``J v`` for ``J = ∂f/∂x`` at ``x``; adds the estimate used to ``used``.

    Example:
        >>> used = set()
        >>> jvp(lambda t: 3 * t, torch.ones(2), torch.ones(2), used).tolist(), sorted(used)
        ([3.0, 3.0], ['forward-mode'])
    """
    try:
        out = torch.func.jvp(f, (x,), (v,))[1]
        _note(used, "forward-mode")
        return out
    except Exception:  # noqa: BLE001 - any missing rule sends us down the chain
        pass
    try:
        with torch.enable_grad():
            # strict: a backward that is not differentiable must raise, not give zeros
            out = torch.autograd.functional.jvp(f, x, v, strict=True)[1]
        _note(used, "double-backward")
        return out
    except Exception:  # noqa: BLE001
        pass
    out = _finite_difference(f, x, v)
    _note(used, "finite-difference")
    return out


def vjp_fn(f: Callable, x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``(f(x), u ↦ Jᵀu)`` by reverse mode; ``torch.func.vjp`` first, plain autograd after."""
    try:
        y, fn = torch.func.vjp(f, x)
        return y, lambda u: fn(u)[0]
    except Exception:  # noqa: BLE001 - functorch cannot trace this block
        xg = x.detach().requires_grad_(True)
        with torch.enable_grad():
            y = f(xg)

        def back(u: torch.Tensor) -> torch.Tensor:
            return torch.autograd.grad(y, xg, u, retain_graph=True)[0]
        return y.detach(), back


def _note(used: set[str] | None, what: str) -> None:
    if used is not None:
        used.add(what)


def _why(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def describe(used: set[str]) -> str:
    """The least exact estimate in ``used`` (the one that bounds a figure's accuracy).

    Example:
        >>> describe({"forward-mode", "finite-difference"})
        'finite-difference'
    """
    for e in reversed(ESTIMATES):
        if e in used:
            return e
    return "reverse-mode"


def reason(e: BaseException) -> str:
    """One line that says why a block could not be measured.

    Example:
        >>> reason(RuntimeError("derivative for x is not implemented\\nmore"))
        'RuntimeError: derivative for x is not implemented'
    """
    return _why(e)[:300]
