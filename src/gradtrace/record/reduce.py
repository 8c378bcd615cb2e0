"""On-device reductions over lists of tensors that are not norms (norms: gradtrace.norms).

Every function but :func:`nonfinite_counts` returns tensors on one device and never reads
a value on the host: the monitor gathers the results into one flat buffer and copies it
once. The squared norms come from the one norm engine, :func:`gradtrace.norms.norm_vector`
(on the CPU float64 sums for small tensors and range-checked float32 norms for large ones,
float64 accumulation on accelerators): finite gradients give finite squares.
"""
from __future__ import annotations

import operator

import torch

from ..norms import _plan, norm_vector, stored_values

F32 = torch.float32
_SHAPE = operator.attrgetter("shape")
__all__ = ["squared_norms", "max_abs", "nonfinite_counts", "stored_values"]


def squared_norms(tensors: list[torch.Tensor], device: torch.device,
                  uniform: bool = False) -> torch.Tensor:
    """Squared L2 norms (float64, on ``device``) from :func:`gradtrace.norms.norm_vector`
    with ``wide=True``: on the CPU the sums of squares of small tensors of a repeated
    shape are float64 from the start and the others range-checked (lost ones redone in float64), elsewhere float64
    accumulation; squared in float64, so the square of a vanishing norm (3e-25 squared
    is below float32's smallest value) is kept and squares add up across shards and
    ranks. Finite tensors give finite squares: nothing is left to re-measure.

    Example:
        >>> squared_norms([torch.ones(4), torch.ones(9)], torch.device("cpu"))
        tensor([4., 9.], dtype=torch.float64)
    """
    if not tensors:
        return torch.empty(0, dtype=torch.float64, device=device)
    return norm_vector(tensors, 2.0, device=device, uniform=uniform, wide=True).square()


def max_abs(tensors: list[torch.Tensor], device: torch.device, uniform: bool = False) -> torch.Tensor:
    """Largest |entry| of each tensor (NaN if it holds a NaN), float32, on ``device``.

    ``_foreach_norm(.., inf)`` takes a slow path on the CPU (4 ms for the 24-layer MLP's
    gradients), so each tensor is read by one ``aminmax``; on the CPU, small tensors of a
    repeated shape (the norm engine's stacked route) are read as the rows of one stack
    instead: a 100-layer narrow model's 200 tensors in two reductions, not 200.
    ``uniform=True``: the caller checked that all are plain dense tensors of one device
    and dtype (the stacked route needs it).

    Example:
        >>> max_abs([torch.tensor([-3.0, 2.0])], torch.device("cpu"))
        tensor([3.])
    """
    if not tensors:
        return torch.empty(0, dtype=F32, device=device)
    plan = None
    if uniform and device.type == "cpu" and tensors[0].device.type == "cpu" and \
            tensors[0].is_floating_point():
        plan = _plan(tuple(map(_SHAPE, tensors)))
    if plan is None:
        return _max_abs_each(tensors, device)
    parts = []
    try:
        for pick in plan.stacks:
            group = pick(tensors)
            rows = torch.stack(group).reshape(len(group), -1)
            # maximum() propagates NaN, so a NaN anywhere in a row shows in its max |x|.
            parts.append(torch.maximum(rows.amax(1), rows.amin(1).neg_()).to(F32))
    except (TypeError, RuntimeError):    # sparse gradients of dense parameters (Embedding)
        return _max_abs_each(tensors, device)
    if plan.rest is not None:
        parts.append(_max_abs_each(plan.rest(tensors), device))
    v = torch.cat(parts) if len(parts) > 1 else parts[0]
    return v if plan.order is None else v[plan.order]


def _max_abs_each(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """One ``aminmax`` per tensor (any dtype, device or layout: sparse by stored values)."""
    lo, hi = [], []
    uniform = True
    for t in tensors:
        d = stored_values(t)
        mn, mx = d.aminmax() if d.numel() else (d.new_zeros(()), d.new_zeros(()))
        uniform = uniform and mn.dtype == F32 and mn.device == device
        lo.append(mn)
        hi.append(mx)
    if not uniform:  # mixed dtypes/devices: bring every scalar to float32 on `device`
        # non_blocking only between devices: a copy to the host must land before it is read
        nb = device.type != "cpu"
        lo = [v.to(device=device, dtype=F32, non_blocking=nb) for v in lo]
        hi = [v.to(device=device, dtype=F32, non_blocking=nb) for v in hi]
    # maximum() propagates NaN, so a NaN anywhere in a tensor shows in its max |x|.
    return torch.maximum(torch.stack(hi), -torch.stack(lo))


def nonfinite_counts(tensors: list[torch.Tensor]) -> list[int]:
    """Number of ``nan``/``inf`` entries of each tensor (host ints: call only on failure).

    Example:
        >>> nonfinite_counts([torch.tensor([1.0, float("nan"), float("inf")])])
        [2]
    """
    return [int((~torch.isfinite(stored_values(t))).sum()) for t in tensors]
