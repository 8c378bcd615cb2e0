"""Gradient clipping without host synchronisation.

What is here
------------
* :func:`clip_grad_norm_` / :func:`clip_grad_value_` -- drop-in equivalents of the
  functions in :mod:`torch.nn.utils` (same signature, return value and numbers) that also
  accept sparse gradients and publish the norms they compute (see *Observers* below).
  Norm clipping rescales all gradients by ``min(1, max_norm / (total + 1e-6))`` so the
  direction of the full gradient is kept (Pascanu, Mikolov & Bengio 2013, "On the
  difficulty of training recurrent neural networks").
* :func:`grad_norms` and :func:`clip_with_norms_` -- the two halves of norm clipping,
  usable on their own (a monitor can call :func:`grad_norms` once and reuse the result).
* :func:`adaptive_clip_grad_` and :func:`agc_param_groups` -- unit-wise adaptive
  gradient clipping (AGC) from Brock, De, Smith & Simonyan 2021, "High-Performance
  Large-Scale Image Recognition Without Normalization" (NFNets).
* :class:`AutoClip` -- percentile-of-history clipping, Seetharaman, Wichern, Pardo &
  Le Roux 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks".
* :class:`ZClip` -- EMA z-score clipping, Kumar, Owen, Roy Chowdhury & Güra 2025,
  "ZClip: Adaptive Spike Mitigation for LLM Pre-Training" (arXiv:2504.02507).

No host syncs
-------------
None of the clippers reads a tensor value back to Python on the hot path: there is no
``if`` on a tensor, no ``.item()``; coefficients are clamped on the device and always
multiplied in (a coefficient of exactly 1 where nothing needs clipping). The only
exception is ``clip_grad_norm_(..., error_if_nonfinite=True)``, which must inspect the
norm to raise. Stateful clippers keep their statistics as device tensors; only step
counters are Python ints.

Observers (fusion hook for a monitor)
-------------------------------------
Every norm clipper here (:func:`clip_grad_norm_`, :class:`AutoClip`, :class:`ZClip`,
and :class:`gradtrace.remedies.guard.Guard` when it computes norms) calls each function
registered with :func:`add_norm_observer` once per call, *after* the coefficient has
been multiplied in, as::

    fn(grads, norms, total_norm, clip_coef, norm_type)

* ``grads`` -- ``list[Tensor]``, the gradient tensors (already scaled in place);
* ``norms`` -- ``list[Tensor]``, 0-d per-tensor norms of ``grads`` *before* clipping,
  same order as ``grads``;
* ``total_norm`` -- 0-d tensor, the pre-clip total norm;
* ``clip_coef`` -- 0-d tensor that was multiplied into every gradient, or ``None`` when
  no scaling was applied (post-clip norms are ``norms[i] * clip_coef``);
* ``norm_type`` -- ``float``.

Observers must not sync either if the caller cares about speed; exceptions they raise
propagate to the caller. Nothing is published when there are no gradients.

Sharded gradients (FSDP2 ``DTensor``)
-------------------------------------
When gradients are ``DTensor`` shards (``torch.distributed.fsdp.fully_shard``),
:func:`grad_norms` takes every per-shard norm from the local tensors (fused kernels, as
for plain tensors) and combines them across the shard mesh with **one all-reduce per
mesh** (sum of ``norm ** p``; max for ``inf``, min for ``-inf``; ``Replicate`` mesh
dimensions are not reduced, so HSDP replicas are counted once). The norms and the total
it returns -- and what observers receive -- are plain tensors holding the *full* values,
identical on every rank. Every rank holding the shards must call it (it is a
collective). Empty shards (uneven sharding) are fine, also for ``norm_type=inf``.
:func:`clip_grad_norm_` scales the local shards and, like
:func:`torch.nn.utils.clip_grad_norm_` (torch 2.13), returns the total as a ``DTensor``
with ``Replicate()`` placements on the gradients' mesh (``.full_tensor()`` gives the
value without communication). (For ``norm_type=inf`` torch 2.13 returns a
``Partial(max)`` DTensor of the same value, and fails outright on an empty shard.)
"""
from __future__ import annotations

import fnmatch
import math
import types
import warnings
from typing import Any, Callable, Iterable, NamedTuple, Union

import torch
from torch import Tensor

from ..distributed import is_dtensor, local
from ..stats import stored_values

__all__ = [
    "clip_grad_norm_", "clip_grad_value_", "grad_norms", "clip_with_norms_",
    "adaptive_clip_grad_", "agc_param_groups", "AGCParam", "AutoClip", "ZClip",
    "add_norm_observer", "remove_norm_observer",
]

#: Added to the total norm before dividing, as torch does.
CLIP_EPS = 1e-6

NormObserver = Callable[[list, list, Tensor, Union[Tensor, None], float], Any]

#: Registered observers, called in registration order. Use add/remove_norm_observer.
_norm_observers: list[NormObserver] = []

_FOREACH_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia"})


def add_norm_observer(fn: NormObserver) -> NormObserver:
    """Register ``fn`` to receive the norms every gradtrace norm clipper computes.

    ``fn(grads, norms, total_norm, clip_coef, norm_type)`` is called after clipping; see
    the module docstring for the contract. Adding the same function twice has no effect.
    Returns ``fn`` so it can be used as a decorator.

    Example:
        >>> seen = []
        >>> fn = add_norm_observer(lambda g, n, t, c, p: seen.append(t))
        >>> remove_norm_observer(fn)
    """
    if not callable(fn):
        raise TypeError(f"add_norm_observer: fn must be callable, got {type(fn).__name__}")
    if fn not in _norm_observers:
        _norm_observers.append(fn)
    return fn


def remove_norm_observer(fn: NormObserver) -> None:
    """Unregister ``fn``; removing a function that is not registered does nothing.

    Example:
        >>> remove_norm_observer(print)
    """
    try:
        _norm_observers.remove(fn)
    except ValueError:
        pass


def _publish(grads: list[Tensor], norms: list[Tensor], total: Tensor,
             coef: Tensor | None, norm_type: float) -> None:
    for fn in tuple(_norm_observers):
        fn(grads, norms, total, coef, norm_type)


# --------------------------------------------------------------------------- helpers

def _tensor_list(items: Any, argname: str) -> list[Tensor]:
    if isinstance(items, Tensor):
        return [items]
    if items is None:
        raise TypeError(f"{argname} must be a Tensor or an iterable of Tensors, got None")
    was_generator = isinstance(items, types.GeneratorType)
    try:
        out = list(items)
    except TypeError:
        raise TypeError(
            f"{argname} must be a Tensor or an iterable of Tensors, got {type(items).__name__}"
        ) from None
    for t in out:
        if not isinstance(t, Tensor):
            raise TypeError(f"{argname} must contain Tensors, found {type(t).__name__}")
    if was_generator and not out:
        warnings.warn(f"`{argname}` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return out


def _check_norm_type(norm_type: Any) -> float:
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(value):
        raise ValueError("norm_type must not be nan; use e.g. 1.0, 2.0 or 'inf'")
    return value


def _is_dense(t: Tensor) -> bool:
    return t.layout == torch.strided


def _groups(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the dense tensors, grouped by (device, dtype), in first-seen order."""
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, t in enumerate(tensors):
        if _is_dense(t):
            groups.setdefault((t.device, t.dtype), []).append(i)
    return groups


def _use_foreach(tensors: list[Tensor], device: torch.device, foreach: bool | None) -> bool:
    supported = device.type in _FOREACH_DEVICE_TYPES
    if foreach is None:
        return supported and all(type(t) in (Tensor, torch.nn.Parameter) for t in tensors)
    if foreach and not supported:
        raise RuntimeError(
            f"foreach=True was passed, but the foreach kernels are not available on "
            f"{device.type} tensors; pass foreach=None or False")
    return bool(foreach)


def _scale_(grads: list[Tensor], coef: Tensor, foreach: bool | None = None) -> None:
    """Multiply every gradient in place by the 0-d tensor ``coef`` (no host sync).

    DTensor gradients are scaled through their local shards (every rank holds the same
    coefficient), so the fused kernels apply to them too."""
    grads = [local(g) for g in grads]
    for (device, _), idx in _groups(grads).items():
        group = [grads[i] for i in idx]
        c = coef.to(device)
        if _use_foreach(group, device, foreach):
            torch._foreach_mul_(group, c)
        else:
            for g in group:
                g.mul_(c)
    for g in grads:
        if not _is_dense(g):
            g.mul_(coef.to(g.device))


# ------------------------------------------------------------------ norm clipping

def _local_norms(tensors: list[Tensor], p: float, foreach: bool | None) -> list[Tensor]:
    """Per-tensor norms of plain (local) tensors, one fused kernel per (device, dtype)."""
    norms: list[Tensor | None] = [None] * len(tensors)
    for (device, _), idx in _groups(tensors).items():
        group = [tensors[i].detach() for i in idx]
        if _use_foreach(group, device, foreach):
            out = torch._foreach_norm(group, p)
        else:
            out = [torch.linalg.vector_norm(t, p) for t in group]
        for i, n in zip(idx, out):
            norms[i] = n
    for i, t in enumerate(tensors):
        if not _is_dense(t):
            norms[i] = torch.linalg.vector_norm(stored_values(t.detach()), p)
    return norms  # type: ignore[return-value]


def _sharded_norms(tensors: list[Tensor], p: float, foreach: bool | None) -> list[Tensor]:
    """Full per-tensor norms of DTensors: local shard norms, one all-reduce per mesh.

    A shard's contribution is ``norm ** p`` (summed), its max|x| (``inf``, MAX), min|x|
    (``-inf``, MIN) or its nonzero count (``p == 0``, summed); the reduction runs over
    the mesh dimensions the tensor is sharded along. DTensors with a ``Partial``
    placement (unreduced gradients) fall back to DTensor's own norm and ``full_tensor()``.
    """
    import torch.distributed as dist
    out: list[Tensor | None] = [None] * len(tensors)
    if p == math.inf:
        op, empty = dist.ReduceOp.MAX, 0.0
    elif p == -math.inf:
        op, empty = dist.ReduceOp.MIN, math.inf
    else:
        op, empty = dist.ReduceOp.SUM, 0.0
    # (mesh, sharded mesh dims, device) -> indices; first-seen order on every rank
    buckets: dict[tuple[Any, tuple[int, ...], torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        placements = tuple(t.placements)
        if any(pl.is_partial() for pl in placements) or not _is_dense(t):
            out[i] = torch.linalg.vector_norm(t.detach(), p).full_tensor()
            continue
        dims = tuple(d for d, pl in enumerate(placements) if pl.is_shard())
        buckets.setdefault((t.device_mesh, dims, t.device), []).append(i)
    for (mesh, dims, device), idx in buckets.items():
        locs = [local(tensors[i].detach()) for i in idx]
        full = [j for j, t in enumerate(locs) if t.numel() > 0]
        norms = _local_norms([locs[j] for j in full], p, foreach) if full else []
        wdt = torch.float64 if any(t.dtype == torch.float64 for t in locs) else torch.float32
        acc = torch.full((len(idx),), empty, dtype=wdt, device=device)
        if full:
            v = torch.stack([n.to(device, wdt) for n in norms])
            if p not in (0.0, math.inf, -math.inf):
                v = v.pow(p)
            acc[torch.tensor(full, device=device)] = v
        if dims and mesh.get_coordinate() is not None:
            for d in dims:       # one collective per sharded mesh dim (FSDP2: exactly one)
                dist.all_reduce(acc, op=op, group=mesh.get_group(d))
        if p not in (0.0, math.inf, -math.inf):
            acc = acc.pow(1.0 / p)
        for k, i in enumerate(idx):
            out[i] = acc[k].to(locs[k].dtype)
    return out  # type: ignore[return-value]


def grad_norms(grads: Tensor | Iterable[Tensor], norm_type: float = 2.0,
               foreach: bool | None = None) -> tuple[list[Tensor], Tensor]:
    """Per-tensor norms and their total, computed with one fused kernel per (device, dtype).

    Returns ``(norms, total)``: ``norms[i]`` is the 0-d ``norm_type``-norm of
    ``grads[i]`` (in that tensor's dtype, on its device) and ``total`` is the norm of the
    vector of those norms (on the first tensor's device), i.e. the norm of all gradients
    viewed as one vector. Sparse tensors are supported (norm of their coalesced values).
    With no tensors, returns ``([], tensor(0.))``. No host sync.

    ``DTensor`` gradients (FSDP2 shards) give the norms of the *full* tensors as plain
    tensors, identical on every rank, at the cost of one all-reduce per device mesh; all
    ranks of the mesh must call this together (see the module docstring).

    Example:
        >>> import torch
        >>> norms, total = grad_norms([torch.ones(4), torch.ones(5)])
        >>> round(float(total), 4)
        3.0
    """
    tensors = _tensor_list(grads, "grads")
    p = _check_norm_type(norm_type)
    if not tensors:
        return [], torch.tensor(0.0)
    with torch.no_grad():
        sharded = [i for i, t in enumerate(tensors) if is_dtensor(t)]
        if sharded:
            is_sharded = set(sharded)
            plain = [i for i in range(len(tensors)) if i not in is_sharded]
            norms: list[Tensor | None] = [None] * len(tensors)
            for i, n in zip(sharded, _sharded_norms([tensors[i] for i in sharded], p, foreach)):
                norms[i] = n
            for i, n in zip(plain, _local_norms([tensors[i] for i in plain], p, foreach)):
                norms[i] = n
        else:
            norms = _local_norms(tensors, p, foreach)  # type: ignore[assignment]
        first = tensors[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(first) for n in norms]), p)
    return norms, total  # type: ignore[return-value]


def _replicated_like(total: Tensor, grads: list[Tensor]) -> Tensor:
    """``total`` as torch's clip_grad_norm_ returns it: a Replicate DTensor for DTensor grads."""
    mesh = next((g.device_mesh for g in grads if is_dtensor(g)), None)
    if mesh is None:
        return total
    from torch.distributed.tensor import DTensor, Replicate
    return DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)


def clip_with_norms_(grads: Tensor | Iterable[Tensor], total_norm: Tensor,
                     max_norm: float | Tensor, foreach: bool | None = None) -> Tensor:
    """Scale ``grads`` in place given a precomputed total norm; return the coefficient.

    The coefficient is ``clamp(max_norm / (total_norm + 1e-6), max=1)`` and is always
    multiplied in (no ``if`` on a tensor, so no host sync). ``max_norm`` may itself be a
    0-d tensor (as AutoClip/ZClip use). Observers are *not* called here; callers that
    computed the norms publish them.

    Example:
        >>> import torch
        >>> g = [torch.full((4,), 3.0)]
        >>> norms, total = grad_norms(g)
        >>> coef = clip_with_norms_(g, total, max_norm=1.0)
        >>> round(float(torch.linalg.vector_norm(g[0])), 4)
        1.0
    """
    tensors = _tensor_list(grads, "grads")
    if not isinstance(total_norm, Tensor):
        raise TypeError(f"total_norm must be a Tensor, got {type(total_norm).__name__}")
    if is_dtensor(total_norm):          # e.g. torch's clip_grad_norm_ under FSDP2
        total_norm = total_norm.full_tensor()
    if not isinstance(max_norm, Tensor):
        max_norm = float(max_norm)
        if not max_norm >= 0.0:
            raise ValueError(f"max_norm must be >= 0, got {max_norm}")
    with torch.no_grad():
        coef = torch.clamp(max_norm / (total_norm + CLIP_EPS), max=1.0)
        _scale_(tensors, coef, foreach)
    return coef


def clip_grad_norm_(parameters: Tensor | Iterable[Tensor], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False,
                    foreach: bool | None = None) -> Tensor:
    """Clip the total gradient norm of ``parameters`` to ``max_norm``, in place.

    Same signature, return value and numbers as :func:`torch.nn.utils.clip_grad_norm_`:
    returns the total ``norm_type``-norm of the gradients *before* clipping, viewed as
    a single vector. Parameters whose ``.grad`` is None are skipped; sparse gradients
    are supported. No host sync unless ``error_if_nonfinite=True`` (which must read the
    norm to decide whether to raise ``RuntimeError``). Publishes to norm observers.

    With ``DTensor`` gradients (FSDP2) the total is computed over the full gradients (one
    all-reduce, see :func:`grad_norms`) and returned, as torch 2.13 does, as a ``DTensor``
    with ``Replicate()`` placements; observers get it as a plain tensor.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 2)
        >>> model(torch.randn(5, 3)).pow(2).sum().backward()
        >>> total = clip_grad_norm_(model.parameters(), max_norm=1.0)
    """
    params = _tensor_list(parameters, "parameters")
    grads = [p.grad for p in params if p.grad is not None]
    norms, total = grad_norms(grads, norm_type, foreach)
    if not grads:
        return total
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"clip_grad_norm_: the total norm of order {float(norm_type)} of the gradients is "
            "non-finite, so it cannot be clipped; pass error_if_nonfinite=False to scale by "
            "it anyway")
    coef = clip_with_norms_(grads, total, max_norm, foreach)
    _publish(grads, norms, total, coef, float(norm_type))
    return _replicated_like(total, grads)


def clip_grad_value_(parameters: Tensor | Iterable[Tensor], clip_value: float,
                     foreach: bool | None = None) -> None:
    """Clamp every gradient entry to ``[-clip_value, clip_value]``, in place.

    Same signature and results as :func:`torch.nn.utils.clip_grad_value_`; also handles
    sparse gradients (an uncoalesced COO gradient is coalesced first and written back to
    ``param.grad`` so that duplicate entries are summed before clamping). No host sync.

    Example:
        >>> import torch
        >>> p = torch.nn.Parameter(torch.zeros(3)); p.grad = torch.tensor([-5., .5, 5.])
        >>> clip_grad_value_(p, 1.0); p.grad.tolist()
        [-1.0, 0.5, 1.0]
    """
    params = _tensor_list(parameters, "parameters")
    clip_value = float(clip_value)
    if not clip_value >= 0.0:
        raise ValueError(f"clip_value must be >= 0, got {clip_value}")
    with torch.no_grad():
        grads = [p.grad for p in params if p.grad is not None]
        for (device, _), idx in _groups(grads).items():
            group = [grads[i] for i in idx]
            if _use_foreach(group, device, foreach):
                torch._foreach_clamp_min_(group, -clip_value)
                torch._foreach_clamp_max_(group, clip_value)
            else:
                for g in group:
                    g.clamp_(min=-clip_value, max=clip_value)
        for p in params:
            g = p.grad
            if g is None or _is_dense(g):
                continue
            if g.layout == torch.sparse_coo:
                if not g.is_coalesced():
                    g = g.coalesce()
                    p.grad = g
                g._values().clamp_(min=-clip_value, max=clip_value)
            else:
                g.values().clamp_(min=-clip_value, max=clip_value)


# ------------------------------------------------------------------------------ AGC

class AGCParam(NamedTuple):
    """A parameter for :func:`adaptive_clip_grad_` with its unit layout.

    ``unit_dim`` is the dimension that indexes output units (0 for Linear/Conv weights,
    1 for ConvTranspose weights laid out ``[in, out/groups, *k]``); ``groups`` is the
    ConvTranspose ``groups`` (output units are then ``(group, channel)`` pairs);
    ``name`` is used by name-glob exclusion.

    Example:
        >>> AGCParam(torch.nn.Parameter(torch.ones(2, 3)), name="fc.weight").unit_dim
        0
    """

    param: Tensor
    unit_dim: int = 0
    groups: int = 1
    name: str | None = None


def _as_agc_param(item: Any) -> AGCParam:
    if isinstance(item, AGCParam):
        return item
    if isinstance(item, Tensor):
        return AGCParam(item)
    if isinstance(item, tuple) and len(item) == 2:
        a, b = item
        if isinstance(a, str) and isinstance(b, Tensor):
            return AGCParam(b, name=a)
        if isinstance(a, Tensor) and isinstance(b, int) and not isinstance(b, bool):
            return AGCParam(a, unit_dim=b)
    raise TypeError(
        "adaptive_clip_grad_: parameters must contain Tensors, (name, Tensor) pairs from "
        "named_parameters(), (Tensor, unit_dim) pairs or AGCParam entries from "
        f"agc_param_groups(); got {type(item).__name__}")


def _check_patterns_match(patterns: list[str], names: list[tuple[str, str | None]]) -> None:
    """An ``exclude`` glob that matches no parameter is a mistake, not a no-op."""
    for pat in patterns:
        if not any(_name_excluded(n, m, [pat]) for n, m in names):
            sample = [n for n, _ in names][:8]
            raise ValueError(f"exclude pattern {pat!r} matches no parameter; names look like {sample}")


def _name_excluded(name: str | None, module_name: str | None, patterns: list[str]) -> bool:
    if name is None:
        return False
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat):
            return True
        if module_name is not None and fnmatch.fnmatchcase(module_name, pat):
            return True
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if fnmatch.fnmatchcase(owner, pat):
            return True
    return False


def _split_exclude(exclude: Any) -> tuple[set[int], list[str]]:
    if exclude is None:
        return set(), []
    if isinstance(exclude, (str, Tensor)):
        exclude = [exclude]
    ids: set[int] = set()
    patterns: list[str] = []
    for e in exclude:
        if isinstance(e, str):
            patterns.append(e)
        elif isinstance(e, Tensor):
            ids.add(id(e))
        else:
            raise TypeError(
                f"exclude must contain Tensors or name globs (str), found {type(e).__name__}")
    return ids, patterns


def _unit_scale(w: Tensor, g: Tensor, unit_dim: int, groups: int, clip_factor: float,
                eps: float) -> Tensor:
    """Per-unit AGC scale, broadcastable to (or shaped like) ``g``."""
    if g.ndim <= 1:
        wn = torch.linalg.vector_norm(w)
        gn = torch.linalg.vector_norm(g)
    elif groups == 1:
        dims = tuple(d for d in range(g.ndim) if d != unit_dim % g.ndim)
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
    else:
        shape = (groups, g.shape[0] // groups) + tuple(g.shape[1:])
        dims = (1,) + tuple(range(3, len(shape)))
        wn = torch.linalg.vector_norm(w.reshape(shape), dim=dims, keepdim=True)
        gn = torch.linalg.vector_norm(g.reshape(shape), dim=dims, keepdim=True)
    max_norm = wn.clamp(min=eps) * clip_factor
    scale = torch.where(gn > max_norm, max_norm / gn.clamp(min=1e-6), torch.ones_like(gn))
    if g.ndim > 1 and groups > 1:
        scale = scale.expand(shape).reshape(g.shape)
    return scale


def adaptive_clip_grad_(parameters: Any, clip_factor: float = 0.01, eps: float = 1e-3,
                        exclude: Any = None) -> None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), in place.

    For every unit ``i`` (output row) of every parameter, with
    ``W* = max(||W_i||, eps)``: if ``||G_i|| / W* > clip_factor`` the unit's gradient is
    rescaled to ``clip_factor * W* / max(||G_i||, 1e-6) * G_i``. Tensors with ndim <= 1
    (biases, gains) use their whole norm. No host sync.

    ``parameters`` may mix:

    * Tensors (unit dim 0, the layout of Linear/Conv weights ``[out, in, *k]``);
    * ``(name, Tensor)`` pairs, e.g. ``model.named_parameters()``, so that ``exclude``
      can name layers;
    * ``(Tensor, unit_dim)`` pairs for other layouts;
    * :class:`AGCParam` entries from :func:`agc_param_groups`, which detects
      ConvTranspose weights (unit dim 1, with their ``groups``) for you -- the
      recommended way for models with transposed convolutions.

    ``exclude`` is an iterable of Tensors (matched by identity) and/or name globs
    (``fnmatch``), matched against the parameter name and its owning module name,
    so ``exclude=("fc",)`` drops ``fc.weight`` and ``fc.bias``. The paper excludes the
    final classifier. Name globs need named entries.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 2))
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> adaptive_clip_grad_(model.named_parameters(), exclude=("2",))
        >>> adaptive_clip_grad_(agc_param_groups(model, exclude=("2",)), clip_factor=0.02)
    """
    clip_factor = float(clip_factor)
    eps = float(eps)
    if not clip_factor > 0.0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    items = [_as_agc_param(x) for x in parameters]
    ex_ids, patterns = _split_exclude(exclude)
    if patterns and items and all(it.name is None for it in items):
        raise ValueError(
            "exclude contains name patterns but parameters carry no names; pass "
            "model.named_parameters() or agc_param_groups(model, exclude=...)")
    _check_patterns_match(patterns, [(it.name, None) for it in items if it.name is not None])
    with torch.no_grad():
        for it in items:
            p, g = it.param, it.param.grad
            if g is None or id(p) in ex_ids or _name_excluded(it.name, None, patterns):
                continue
            if not _is_dense(g):
                raise TypeError(
                    f"adaptive_clip_grad_: sparse gradients are not supported "
                    f"(parameter {it.name or tuple(p.shape)})")
            if g.ndim > 1:
                if not -g.ndim <= it.unit_dim < g.ndim:
                    raise ValueError(
                        f"unit_dim={it.unit_dim} is out of range for a {g.ndim}-d parameter")
                if it.groups < 1 or (it.groups > 1 and (it.unit_dim % g.ndim != 1
                                                        or g.shape[0] % it.groups)):
                    raise ValueError(
                        f"groups={it.groups} needs unit_dim=1 and a first dim divisible by "
                        f"groups (ConvTranspose layout); got shape {tuple(g.shape)}")
            cdt = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
            scale = _unit_scale(p.detach().to(cdt), g.to(cdt), it.unit_dim, it.groups,
                                clip_factor, eps)
            g.mul_(scale.to(g.dtype))


def agc_param_groups(model: torch.nn.Module, exclude: Iterable[str] | None = None
                     ) -> list[AGCParam]:
    """List ``model``'s parameters as :class:`AGCParam` with the right unit layout.

    ConvTranspose weights (``[in, out/groups, *k]``) get ``unit_dim=1`` and their
    ``groups``; everything else uses dim 0. ``exclude`` is an iterable of name globs
    matched against module names and full parameter names (``("fc",)`` or
    ``("head.*",)``); excluded parameters are left out. Shared parameters appear once.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 2), torch.nn.Flatten(),
        ...                         torch.nn.LazyLinear(2))
        >>> [p.unit_dim for p in agc_param_groups(m, exclude=("2",))]
        [1, 0]
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude or [])
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"exclude must contain name globs (str), found {type(pat).__name__}")
    _check_patterns_match(patterns, [(f"{m}.{n}" if m else n, m) for m, mod in model.named_modules()
                                     for n, _ in mod.named_parameters(recurse=False)])
    convt = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    seen: set[int] = set()
    out: list[AGCParam] = []
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if _name_excluded(full, mname, patterns):
                continue
            if isinstance(mod, convt) and pname == "weight":
                out.append(AGCParam(p, 1, mod.groups, full))
            else:
                out.append(AGCParam(p, 0, 1, full))
    return out


# ------------------------------------------------------------------ stateful clippers

def _state_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _grads_of(parameters: Any) -> list[Tensor]:
    return [p.grad for p in _tensor_list(parameters, "parameters") if p.grad is not None]


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): clip to a percentile of past gradient norms.

    At each call the pre-clip total norm is appended to the history (current one
    included) and the gradients are norm-clipped to the ``percentile``-th percentile
    (linear interpolation, like ``numpy.percentile``) of that history. ``percentile=10``
    is the paper's value. ``history=None`` keeps every norm; an int keeps the last
    ``history`` (a ring buffer). Non-finite norms are stored as nan and ignored by the
    percentile. The history lives on the gradients' device (float64, float32 on MPS);
    no host sync. Returns the pre-clip total norm (a tensor) and publishes to norm
    observers.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> clipper = AutoClip(percentile=10, history=1000)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> total = clipper(model.parameters())
        >>> state = clipper.state_dict()
    """

    def __init__(self, percentile: float = 10.0, history: int | None = None,
                 norm_type: float = 2.0, foreach: bool | None = None) -> None:
        percentile = float(percentile)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must be in [0, 100], got {percentile}")
        if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                    or history < 1):
            raise ValueError(f"history must be None (unbounded) or an int >= 1, got {history!r}")
        self.percentile = percentile
        self.history = history
        self.norm_type = _check_norm_type(norm_type)
        self.foreach = foreach
        self._buf: Tensor | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Number of norms recorded so far."""
        return self._count

    def _record(self, total: Tensor) -> Tensor:
        device = total.device
        dtype = _state_dtype(device)
        if self._buf is None:
            self._buf = torch.empty(self.history or 64, dtype=dtype, device=device)
        elif self._buf.device != device:
            self._buf = self._buf.to(device)
        value = total.detach().to(self._buf.dtype)
        value = torch.where(torch.isfinite(value), value, torch.full_like(value, math.nan))
        if self.history is not None:
            if self._buf.numel() < self.history:  # restored from a partly filled state
                grown = torch.empty(self.history, dtype=self._buf.dtype, device=device)
                grown[: self._buf.numel()] = self._buf
                self._buf = grown
            self._buf[self._count % self.history] = value
            n = min(self._count + 1, self.history)
        else:
            if self._count >= self._buf.numel():
                grown = torch.empty(max(64, 2 * self._buf.numel()), dtype=self._buf.dtype,
                                    device=device)
                grown[: self._count] = self._buf[: self._count]
                self._buf = grown
            self._buf[self._count] = value
            n = self._count + 1
        self._count += 1
        return self._buf[:n]

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> Tensor:
        """Record the total norm, clip to the percentile threshold, return the pre-clip norm."""
        grads = _grads_of(parameters)
        norms, total = grad_norms(grads, self.norm_type, self.foreach)
        if not grads:
            return total
        window = self._record(total)
        with torch.no_grad():
            threshold = torch.nanquantile(window, self.percentile / 100.0)
            coef = clip_with_norms_(grads, total, threshold, self.foreach)
        _publish(grads, norms, total, coef, self.norm_type)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Settings, count and stored norms (a tensor), enough to resume identically.

        Example:
            >>> AutoClip(percentile=10).state_dict()["count"]
            0
        """
        n = self._count if self.history is None else min(self._count, self.history)
        norms = self._buf[:n].clone() if self._buf is not None else torch.zeros(0)
        return {"percentile": self.percentile, "history": self.history,
                "norm_type": self.norm_type, "count": self._count, "norms": norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (settings included).

        Example:
            >>> c = AutoClip(); c.load_state_dict(AutoClip(percentile=50, history=8).state_dict())
            >>> c.percentile, c.history
            (50.0, 8)
        """
        self.__init__(state["percentile"], state["history"], state.get("norm_type", 2.0),
                      self.foreach)
        self._count = int(state["count"])
        norms = state["norms"]
        self._buf = norms.detach().clone() if norms.numel() else None


_ZCLIP_MODES = ("adaptive", "mean", "fixed")


class ZClip:
    """ZClip (Kumar et al. 2025): clip total-norm spikes by an EMA z-score.

    The first ``warmup`` norms are only collected (no clipping, except an optional
    ``max_norm`` cap); then the mean ``mu`` and (population) variance ``var`` are set
    from the finite ones. Afterwards, for a total norm ``g`` with
    ``z = (g - mu) / (sqrt(var) + eps)``, when ``z > z_thresh`` the gradients are
    norm-clipped to a threshold that depends on ``mode``:

    * ``"adaptive"`` (paper default): ``mu + z_thresh**2 * sigma / z`` -- the larger the
      outlier, the harder it is clipped;
    * ``"mean"``: the EMA mean ``mu`` (the reference implementation's ``clip_option="mean"``);
    * ``"fixed"``: ``mu + z_thresh * sigma``, i.e. the z-score boundary itself.

    Then the EMA is updated with the clipped value ``x`` (``g`` if not clipped), mean
    first: ``mu <- a*mu + (1-a)*x``, ``var <- a*var + (1-a)*(x - mu)**2`` (with the new
    ``mu``, as in the reference code). Non-finite norms leave the statistics unchanged.
    ``max_norm`` (optional) is an absolute cap applied on top. Statistics are 0-d device
    tensors (float64; float32 on MPS); no host sync. Returns the pre-clip total norm.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> zclip = ZClip(alpha=0.97, z_thresh=2.5, warmup=25)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> total = zclip(model.parameters())
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 mode: str = "adaptive", *, max_norm: float | None = None, eps: float = 1e-6,
                 norm_type: float = 2.0, foreach: bool | None = None) -> None:
        alpha, z_thresh = float(alpha), float(z_thresh)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not z_thresh > 0.0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if mode not in _ZCLIP_MODES:
            raise ValueError(f"mode must be one of {_ZCLIP_MODES}, got {mode!r}")
        if max_norm is not None and not float(max_norm) > 0.0:
            raise ValueError(f"max_norm must be None or > 0, got {max_norm}")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.alpha, self.z_thresh, self.warmup, self.mode = alpha, z_thresh, warmup, mode
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)
        self.norm_type = _check_norm_type(norm_type)
        self.foreach = foreach
        self.step_count = 0
        self._warm: list[Tensor] = []
        self._mean: Tensor | None = None
        self._var: Tensor | None = None

    @property
    def warmed_up(self) -> bool:
        """True once the EMA statistics are initialised (and clipping is active)."""
        return self._mean is not None

    @property
    def mean(self) -> Tensor | None:
        """EMA mean of the total norm (0-d tensor) or None during warmup."""
        return self._mean

    @property
    def var(self) -> Tensor | None:
        """EMA variance of the total norm (0-d tensor) or None during warmup."""
        return self._var

    def _init_stats(self) -> None:
        x = torch.stack(self._warm)
        finite = torch.isfinite(x)
        n = finite.sum().clamp(min=1).to(x.dtype)
        xz = torch.where(finite, x, torch.zeros_like(x))
        mean = xz.sum() / n
        var = torch.where(finite, (x - mean) ** 2, torch.zeros_like(x)).sum() / n
        self._mean, self._var = mean, var
        self._warm = []

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> Tensor:
        """Clip a spike (after warmup), update the statistics, return the pre-clip norm."""
        grads = _grads_of(parameters)
        norms, total = grad_norms(grads, self.norm_type, self.foreach)
        if not grads:
            return total
        self.step_count += 1
        dtype = _state_dtype(total.device)
        g = total.detach().to(dtype)
        coef: Tensor | None = None
        with torch.no_grad():
            if self._mean is None:
                self._warm.append(g)
                if len(self._warm) >= self.warmup:
                    self._init_stats()
                if self.max_norm is not None:
                    coef = clip_with_norms_(grads, total, self.max_norm, self.foreach)
            else:
                if self._mean.device != g.device:
                    self._mean, self._var = self._mean.to(g.device), self._var.to(g.device)
                mean, var = self._mean, self._var
                std = var.sqrt()
                z = (g - mean) / (std + self.eps)
                spike = z > self.z_thresh
                if self.mode == "adaptive":
                    threshold = mean + self.z_thresh ** 2 * std / z
                elif self.mode == "mean":
                    threshold = mean
                else:
                    threshold = mean + self.z_thresh * std
                x = torch.where(spike, threshold, g)
                limit = x if self.max_norm is None else torch.clamp(x, max=self.max_norm)
                one = torch.ones_like(g)
                coef = torch.where(g > limit, limit / (g + CLIP_EPS), one).clamp(max=1.0)
                _scale_(grads, coef, self.foreach)
                finite = torch.isfinite(g)
                new_mean = self.alpha * mean + (1.0 - self.alpha) * x
                new_var = self.alpha * var + (1.0 - self.alpha) * (x - new_mean) ** 2
                self._mean = torch.where(finite, new_mean, mean)
                self._var = torch.where(finite, new_var, var)
        _publish(grads, norms, total, coef, self.norm_type)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Settings, step count, warmup buffer and EMA statistics (tensors).

        Example:
            >>> ZClip(warmup=5).state_dict()["warmup"]
            5
        """
        return {
            "alpha": self.alpha, "z_thresh": self.z_thresh, "warmup": self.warmup,
            "mode": self.mode, "max_norm": self.max_norm, "eps": self.eps,
            "norm_type": self.norm_type, "step_count": self.step_count,
            "warm": torch.stack(self._warm).clone() if self._warm else torch.zeros(0),
            "mean": None if self._mean is None else self._mean.clone(),
            "var": None if self._var is None else self._var.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (settings included).

        Example:
            >>> z = ZClip(); z.load_state_dict(ZClip(z_thresh=3.0).state_dict()); z.z_thresh
            3.0
        """
        self.__init__(state["alpha"], state["z_thresh"], state["warmup"], state["mode"],
                      max_norm=state["max_norm"], eps=state["eps"],
                      norm_type=state.get("norm_type", 2.0), foreach=self.foreach)
        self.step_count = int(state["step_count"])
        self._warm = list(state["warm"].detach().clone().unbind(0))
        self._mean = None if state["mean"] is None else state["mean"].detach().clone()
        self._var = None if state["var"] is None else state["var"].detach().clone()
