"""Gradient norm and value clipping exactly as torch does it, on gradtrace's one norm engine.

:func:`clip_grad_norm_`, :func:`clip_grad_value_`, :func:`get_total_norm` and
:func:`clip_grads_with_norm_` have the names, signatures, return values, numbers and
error messages of their namesakes in :mod:`torch.nn.utils` (torch 2.13), and also take
sparse gradients. Norm clipping rescales all gradients by
``min(1, max_norm / (total + 1e-6))``, keeping the direction of the full gradient
(Pascanu, Mikolov & Bengio 2013, "On the difficulty of training recurrent neural
networks"). The coefficient is clamped on the device and always multiplied in, so
nothing reads a value back to the host, except ``error_if_nonfinite=True``, which must.

The norms come from :mod:`gradtrace.norms`: norms a monitor took of the same, unchanged
gradients earlier in the step are reused, and after scaling the clipper tells the norm
registry (:func:`gradtrace.norms.register`) the pre-clip norms and the coefficient, so a
monitor never computes them again. As in torch, each per-tensor norm is rounded to its
gradient's dtype before the total is taken, so totals match torch's to the last bits.

FSDP2 ``DTensor`` gradients: the total is that of the full gradients (one all-reduce per
mesh, see :mod:`gradtrace.norms`), the local shards are scaled, and
:func:`clip_grad_norm_` returns, as torch 2.13 does, a ``DTensor`` with ``Replicate()``
placements (``.full_tensor()`` reads it without communication). For ``norm_type=inf``
torch returns a ``Partial(max)`` DTensor of the same value and fails on an empty shard.
"""
from __future__ import annotations

import functools
from typing import Any, Iterable

import torch
from torch import Tensor

from .. import norms as N
from ..norms import _PLAIN

__all__ = ["clip_grad_norm_", "clip_grad_value_", "get_total_norm", "clip_grads_with_norm_",
           "clip_with_norms_", "CLIP_EPS"]

#: Added to the total norm before dividing, as torch does.
CLIP_EPS = 1e-6


def _nonfinite_error(norm_type: float) -> RuntimeError:
    # torch's own wording, word for word: torch's tests (and users' code) match on it
    return RuntimeError(
        f"The total norm of order {norm_type} for gradients from "
        "`parameters` is non-finite, so it cannot be clipped. To disable "
        "this error and scale the gradients by the non-finite norm anyway, "
        "set `error_if_nonfinite=False`")


def _grads_of(parameters: Any) -> list[Tensor]:
    return [p.grad for p in N.tensor_list(parameters, "parameters") if p.grad is not None]


def _locals(tensors: list[Tensor]) -> list[Tensor]:
    """The local shards (DTensor gradients) or the tensors themselves (the usual case)."""
    if all(type(t) in _PLAIN for t in tensors):
        return tensors
    return [N.local(t) for t in tensors]


def _total(tensors: list[Tensor], p: float, foreach: bool | None
           ) -> tuple[Any, Tensor, dict, Tensor | None]:
    """Per-tensor norms (engine precision), the total as torch computes it (each norm
    rounded to its tensor's dtype, combined, in the promoted dtype), the grouping of the
    local tensors by (device, dtype), for scaling them afterwards, and the published
    batch the norms came from, if they did, else None."""
    batch = N._recall_batch(tensors, p) if N._batches else None
    if batch is not None and batch.key is not None:
        return _published_total(tensors, batch, p)
    locs = _locals(tensors)
    grouped = N.groups(locs)
    norms = N._grad_norms(tensors, p, foreach, grouped if locs is tensors else None)
    if not norms:
        return norms, torch.tensor(0.0), grouped, None
    first = tensors[0].device
    wide = N.wide_dtype(first)
    with torch.no_grad():
        parts, dtypes = [], set()
        items = [(key[1], idx) for key, idx in grouped.items()]
        if sum(len(idx) for idx in grouped.values()) < len(locs):      # sparse ones, rare
            items += [(t.dtype, [i]) for i, t in enumerate(locs) if t.layout != torch.strided]
        for dtype, idx in items:
            v = torch.stack(norms if len(idx) == len(norms) else [norms[i] for i in idx])
            if dtype.is_floating_point and dtype.itemsize < 4:
                v = v.to(dtype)          # bfloat16/float16 norms, rounded as torch's are
            parts.append(v.to(first, wide))
            dtypes.add(dtype)
        out = functools.reduce(torch.promote_types, dtypes)
        total = torch.linalg.vector_norm(parts[0] if len(parts) == 1 else torch.cat(parts), p)
    return norms, total.to(out), grouped, None


def _published_total(tensors: list[Tensor], batch: Any, p: float
                     ) -> tuple[Tensor, Tensor, dict, Any]:
    """:func:`_total` from norms published for exactly these tensors (a monitor's, at the
    end of backward): no gradient is read and nothing is grouped in Python. The same
    rounding as :func:`_total`: each norm to the gradients' dtype, combined wide."""
    device, dtype = batch.key
    exact = batch.vector()
    with torch.no_grad():
        v = exact.to(N._out_dtype(dtype))
        if dtype.is_floating_point and dtype.itemsize < 4:
            v = v.to(dtype)
        total = torch.linalg.vector_norm(v.to(tensors[0].device, N.wide_dtype(device)), p)
    return v, total.to(dtype), {batch.key: list(range(len(tensors)))}, batch


def _replicated_like(total: Tensor, grads: list[Tensor]) -> Tensor:
    """``total`` as torch returns it for DTensor gradients: a ``Replicate`` DTensor."""
    mesh = next((g.device_mesh for g in grads if N.is_dtensor(g)), None)
    if mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def get_total_norm(tensors: Tensor | Iterable[Tensor], norm_type: float = 2.0,
                   error_if_nonfinite: bool = False, foreach: bool | None = None) -> Tensor:
    """The norm of ``tensors`` viewed as one vector, as :func:`torch.nn.utils.get_total_norm`.

    ``tensors`` are the gradients themselves (not parameters). Same value and dtype as
    torch's; sparse and DTensor tensors are supported (a DTensor total is returned as a
    ``Replicate`` DTensor). ``error_if_nonfinite=True`` raises torch's ``RuntimeError``
    for a nan/inf total (reading the total: one host sync). No sync otherwise.

    Example:
        >>> float(get_total_norm([torch.full((4,), 1.5), torch.full((1,), 4.0)]))
        5.0
    """
    ts = N.tensor_list(tensors, "tensors")
    p = N.check_norm_type(norm_type)
    _, total, _, _ = _total(ts, p, foreach)
    if ts and error_if_nonfinite and not bool(torch.isfinite(total)):
        raise _nonfinite_error(p)
    return _replicated_like(total, ts)


def _scale_(grads: list[Tensor], coef: Tensor, foreach: bool | None = None,
            grouped: dict | None = None) -> None:
    """Multiply every gradient in place by the 0-d ``coef`` (DTensors through their local
    shards, which every rank scales by the same coefficient). No host sync. ``grouped``:
    the local tensors' (device, dtype) groups, if the caller has them."""
    locs = _locals(grads)
    for (device, _), idx in (N.groups(locs) if grouped is None else grouped).items():
        group = locs if len(idx) == len(locs) else [locs[i] for i in idx]
        c = coef.to(device)
        if N.use_foreach(group, device, foreach):
            torch._foreach_mul_(group, c)
        else:
            for g in group:
                g.mul_(c)
    if sum(len(idx) for idx in (grouped or {}).values()) != len(locs):
        for g in locs:
            if g.layout != torch.strided:
                g.mul_(coef.to(g.device))


def clip_with_norms_(grads: Tensor | Iterable[Tensor], total_norm: Tensor,
                     max_norm: float | Tensor, foreach: bool | None = None,
                     _grouped: dict | None = None) -> Tensor:
    """Scale the gradient tensors ``grads`` in place given their total norm; return the
    0-d coefficient ``clamp(max_norm / (total_norm + 1e-6), max=1)`` that was applied.

    The building block of the adaptive clippers (``max_norm`` may be a 0-d tensor);
    :func:`clip_grads_with_norm_` is torch's spelling, taking parameters. No host sync.

    Example:
        >>> g = [torch.full((4,), 3.0)]
        >>> coef = clip_with_norms_(g, get_total_norm(g), max_norm=3.0)
        >>> round(float(coef), 4), round(float(g[0][0]), 4)
        (0.5, 1.5)
    """
    tensors = N.tensor_list(grads, "grads")
    if not isinstance(total_norm, Tensor):
        raise TypeError(f"total_norm must be a Tensor, got {type(total_norm).__name__}")
    if N.is_dtensor(total_norm):         # e.g. torch's clip_grad_norm_ under FSDP2
        total_norm = total_norm.full_tensor()
    if not isinstance(max_norm, Tensor):
        max_norm = float(max_norm)
        if not max_norm >= 0.0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    with torch.no_grad():
        coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
        _scale_(tensors, coef, foreach, _grouped)
    return coef


def clip_grads_with_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                          total_norm: Tensor, foreach: bool | None = None) -> None:
    """Scale the gradients of ``parameters`` given a precomputed total norm, as
    :func:`torch.nn.utils.clip_grads_with_norm_`: ``grad *= min(max_norm / (total + 1e-6), 1)``.

    Pair it with :func:`get_total_norm` (torch's split of :func:`clip_grad_norm_`, e.g.
    to all-reduce the total yourself). Parameters without ``.grad`` are skipped.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(4)); p.grad = torch.full((4,), 3.0)
        >>> clip_grads_with_norm_([p], 3.0, get_total_norm([p.grad]))
        >>> [round(v, 4) for v in p.grad.tolist()]     # grad * 3 / (6 + 1e-6)
        [1.5, 1.5, 1.5, 1.5]
    """
    grads = _grads_of(parameters)
    if grads:
        clip_with_norms_(grads, total_norm, max_norm, foreach)


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """Clip the total gradient norm of ``parameters`` to ``max_norm``, in place.

    Same signature, return value (the *pre*-clip total, as a tensor) and numbers as
    :func:`torch.nn.utils.clip_grad_norm_`. Parameters whose ``.grad`` is None are
    skipped; sparse gradients are supported. No host sync unless
    ``error_if_nonfinite=True``, which raises torch's ``RuntimeError`` for a nan/inf
    total. Tells the norm registry (:func:`gradtrace.norms.register`) what it did.

    Example:
        >>> model = torch.nn.Linear(3, 2)
        >>> model(torch.randn(5, 3)).pow(2).sum().backward()
        >>> total = clip_grad_norm_(model.parameters(), max_norm=1.0)
        >>> after = torch.cat([p.grad.flatten() for p in model.parameters()])
        >>> bool(torch.linalg.vector_norm(after) <= 1.0)
        True
    """
    grads = _grads_of(parameters)
    p = N.check_norm_type(norm_type)
    norms, total, grouped, source = _total(grads, p, foreach)
    if not grads:
        return total
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise _nonfinite_error(p)
    coef = clip_with_norms_(grads, total, max_norm, foreach, grouped)
    N.notify_clipped(grads, norms, total, coef, p, source=source)
    return _replicated_like(total, grads)


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float,
                     foreach: bool | None = None) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]``, in place.

    Same signature and results as :func:`torch.nn.utils.clip_grad_value_`; also handles
    sparse gradients (an uncoalesced COO gradient is coalesced first and written back to
    ``param.grad`` so that duplicate entries are summed before clamping). No host sync.

    Example:
        >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([-5., .5, 5.])
        >>> clip_grad_value_(p, 1.0); p.grad.tolist()
        [-1.0, 0.5, 1.0]
    """
    params = N.tensor_list(parameters, "parameters")
    clip_value = float(clip_value)
    if not clip_value >= 0.0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        for (device, _), idx in N.groups(grads).items():
            group = [grads[i] for i in idx]
            if N.use_foreach(group, device, foreach):
                torch._foreach_clamp_min_(group, -clip_value)
                torch._foreach_clamp_max_(group, clip_value)
            else:
                for g in group:
                    g.clamp_(min=-clip_value, max=clip_value)
        for p in params:
            g = p.grad
            if g is None or g.layout == torch.strided:
                continue
            if g.layout == torch.sparse_coo:
                if not g.is_coalesced():
                    g = g.coalesce()
                    p.grad = g
                g._values().clamp_(min=-clip_value, max=clip_value)
            else:
                g.values().clamp_(min=-clip_value, max=clip_value)


# ------------------------------------------------------------ earlier import paths

def grad_norms(grads: Tensor | Iterable[Tensor], norm_type: float = 2.0,
               foreach: bool | None = None) -> tuple[list[Tensor], Tensor]:
    """``(per-tensor norms, total)``: gradtrace 0.1's spelling of
    :func:`gradtrace.norms.grad_norms` followed by :func:`gradtrace.norms.total_norm`.

    Example:
        >>> norms, total = grad_norms([torch.ones(4), torch.ones(5)]); float(total)
        3.0
    """
    norms = N.grad_norms(grads, norm_type, foreach=foreach)
    return norms, N.total_norm(norms, norm_type)


#: names that moved to their own modules, still importable from here
_MOVED = {"AutoClip": "adaptive", "ZClip": "adaptive", "adaptive_clip_grad_": "agc",
          "agc_param_groups": "agc", "AGCParam": "agc"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib
        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
