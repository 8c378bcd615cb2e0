"""On-device reductions over lists of tensors that are not norms (norms: gradtrace.norms).

Every function but :func:`nonfinite_counts` returns tensors on one device and never reads
a value on the host: the monitor gathers the results into one flat buffer and copies it
once. The squared norms come from the one norm engine, :func:`gradtrace.norms.norm_vector`
(on the CPU float64 sums for small tensors and range-checked float32 norms for large ones,
float64 accumulation on accelerators): finite gradients give finite squares.
"""
from __future__ import annotations

import torch

from ..norms import by_shape, norm_vector, stored_values

F32 = torch.float32
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
    v = None
    if uniform and device.type == "cpu" and tensors[0].device.type == "cpu" and \
            tensors[0].is_floating_point():
        try:
            v = by_shape(tensors, _stack_max_abs, lambda rest: _max_abs_each(rest, device))
        except (TypeError, RuntimeError):    # sparse gradients of dense parameters (Embedding)
            v = None
    return _max_abs_each(tensors, device) if v is None else v


def _stack_max_abs(group: list[torch.Tensor]) -> torch.Tensor:
    """Largest |entry| of same-shape tensors as the rows of one stack, float32."""
    rows = torch.stack(group).reshape(len(group), -1)
    # maximum() propagates NaN, so a NaN anywhere in a row shows in its max |x|.
    return torch.maximum(rows.amax(1), rows.amin(1).neg_()).to(F32)


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
