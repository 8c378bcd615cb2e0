"""Figures of many module calls in a few kernels: same-shape outputs stacked, reduced per row.

The step's module hooks keep references; at the end of the forward (or of the backward, for
output gradients) the calls are grouped by (shape, dtype, kind) and each group is stacked
once and reduced over its stacked rows: O(number of groups) kernel launches instead of
about ten per call. A call's figures are exactly those of the per-call definitions:

* ``flag``: the sum of its entries in float32 (finite iff every entry is; the first moment)
* ``a_min`` / ``a_max``: smallest and largest entry
* ``a_norm``: the norm about the call's own mean (a spread that survives a large offset,
  100 + 1e-3 x, where E[x^2] - E[x]^2 in float32 would cancel to zero)
* ``a_extra``: ReLU: ``sum(sign(x))`` (active entries); sigmoid/tanh: entries outside the
  saturation bounds; other kinds: the sum again (a placeholder the assembler ignores)
* ``units`` (ReLU only): per unit, 1.0 if it was positive for at least one sample

Measured on CPU (one thread, 24 rows of 128 x 256): ``aminmax(dim=1)`` takes 1.7 ms where
``amin`` + ``amax`` take 71 us, and ``var_mean`` 8.4 ms where a sum, a subtraction and a
norm take 0.29 ms, so those are used. ``sign().sum()`` is 6x faster than a comparison's sum.
The stacked copy is ours, so the centring runs on it in place (no third full-size array).
"""
from __future__ import annotations

import threading

import torch

from .selection import SATURATION_BOUNDS

F32 = torch.float32
#: At most this many bytes are stacked at once (a transient copy of a group's outputs).
STACK_BYTES = 16 << 20
#: Output gradients with at least this many entries get their norm in a Python hook at
#: once; smaller ones are retained (a C++ copy) and normed in groups (record/hooks.py):
#: for a large gradient the copy costs more than the hook.
SMALL_ENTRIES = 16384

#: Temporaries and stacks between these sizes (bytes) are reused on CPU: below, a fresh
#: one is faster (``out=`` into a kept buffer took 14 us where a fresh 128 KiB one took
#: 8 us); above, the buffer would stay too large. The hooks hold no output over
#: STACK_BYTES and groups are cut at STACK_BYTES, so each kept buffer stays within that.
SCRATCH_MIN_BYTES, SCRATCH_BYTES = 1 << 20, 64 << 20

# Reused temporaries (a group's stacked copy; signs, centred values) per thread, use and
# dtype, on CPU: a fresh full-size temporary costs page faults there on every step.
# Accelerators' caching allocators reuse blocks already, and an output as large as a
# language model's logits must not stay allocated: those get a plain temporary.
_local = threading.local()


def _scratch(shape: torch.Size, dtype: torch.dtype, device: torch.device, use: str = "tmp") -> torch.Tensor:
    """A temporary of ``shape``: a view of this thread's kept buffer for ``use`` (CPU, sizes
    in the reuse range), else a fresh tensor. Two uses ("stack", "tmp") never share one."""
    n = shape.numel()
    if device.type != "cpu" or not SCRATCH_MIN_BYTES <= n * dtype.itemsize <= SCRATCH_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    cache = getattr(_local, "bufs", None)
    if cache is None:
        cache = _local.bufs = {}
    buf = cache.get((use, dtype))
    if buf is None or buf.numel() < n:
        buf = cache[(use, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


def _acc(t: torch.Tensor) -> torch.dtype:
    """The accumulation dtype of a norm whose result is float32: float32, or float64 for a
    float64 tensor (``vector_norm`` refuses to narrow its input through ``dtype=``)."""
    return torch.float64 if t.dtype == torch.float64 else F32


def units_of(shape: torch.Size) -> int:
    """Unit count of an output of ``shape``, as :func:`selection.unit_view` sees it.

    Example:
        >>> units_of(torch.Size([8, 3, 5, 5])), units_of(torch.Size([4, 7])), units_of(torch.Size([5]))
        (3, 7, 5)
    """
    if len(shape) >= 4:
        return shape[1]
    return shape[-1] if len(shape) else 1


def _rows(tensors: list[torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """The calls as the rows of a (k, *shape) tensor, and whether it is a copy of ours
    (which may be changed in place). On CPU a copy of 1-64 MiB goes into the kept "stack"
    buffer: a fresh one that size costs page faults on every step (measured, see
    bench/activations.py); one call outside that range is a view."""
    t = tensors[0]
    shape = (len(tensors), *t.shape)
    if t.device.type == "cpu" and SCRATCH_MIN_BYTES <= t.numel() * t.element_size() * len(tensors) <= SCRATCH_BYTES:
        return torch.stack(tensors, out=_scratch(torch.Size(shape), t.dtype, t.device, "stack")), True
    if len(tensors) == 1:
        return t.unsqueeze(0), False
    return torch.stack(tensors), True


def _unit_max(s: torch.Tensor) -> torch.Tensor:
    """Per row and unit of a stacked (k, *shape) output: the largest entry (a new tensor)."""
    k = s.shape[0]
    if s.dim() >= 5:          # conv outputs: channels are dim 1 of each call (no copy)
        return s.amax(dim=(1, *range(3, s.dim())))
    if s.dim() == 1:          # 0-d outputs: one unit
        return s.reshape(k, 1).clone()
    return s.reshape(k, -1, s.shape[-1]).amax(1)


def figures(tensors: list[torch.Tensor], kind: str | None, act: bool) -> dict[str, torch.Tensor]:
    """Per-call figures of same-shape, same-dtype outputs of one activation ``kind``.

    Returns 1-D float32 tensors of length ``len(tensors)`` (``units``: one row per call),
    ``flag`` alone when ``act`` is false.

    Example:
        >>> f = figures([torch.tensor([[-1.0, 2.0]]), torch.tensor([[0.0, 3.0]])], "relu", True)
        >>> f["flag"].tolist(), f["a_min"].tolist(), f["a_extra"].tolist(), f["units"].tolist()
        ([1.0, 3.0], [-1.0, 0.0], [0.0, 1.0], [[0.0, 1.0], [0.0, 1.0]])
    """
    per = tensors[0].numel() * tensors[0].element_size()
    chunk = max(1, STACK_BYTES // max(per, 1))
    if len(tensors) > chunk:   # bound the transient copy; rare (large outputs, many calls)
        parts = [figures(tensors[i:i + chunk], kind, act) for i in range(0, len(tensors), chunk)]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    s, owned = _rows(tensors)
    flat = s.reshape(s.shape[0], -1)
    total = flat.sum(1, dtype=F32)
    if not act:
        return {"flag": total}
    n = flat.shape[1]
    out = {"flag": total, "a_min": flat.amin(1).to(F32)}
    if kind == "relu":
        # The per-unit maxima give the row's maximum too (a pass over 256 entries a row,
        # not over all of them); nan > 0 is false, as a comparison's.
        um = _unit_max(s)
        out["a_max"] = um.amax(1).to(F32)
        out["units"] = um.gt_(0).to(F32)
        out["a_extra"] = torch.sign(flat, out=_scratch(flat.shape, flat.dtype, flat.device)).sum(1, dtype=F32)
    elif kind in SATURATION_BOUNDS:
        lo, hi = SATURATION_BOUNDS[kind]                 # symmetric about their middle
        c = torch.sub(flat, (lo + hi) / 2, out=_scratch(flat.shape, flat.dtype, flat.device))
        out["a_extra"] = c.abs_().sub_((hi - lo) / 2).sign_().clamp_(min=0).sum(1, dtype=F32)
    else:
        out["a_extra"] = total
    if "a_max" not in out:
        out["a_max"] = flat.amax(1).to(F32)
    # Centred last: on a copy of ours in place (no temporary) when the dtype allows; the
    # same subtraction either way, so the same values.
    mean = (total / n).unsqueeze(1)
    dtype = torch.result_type(flat, mean)
    c = flat.sub_(mean) if owned and dtype == flat.dtype else torch.sub(flat, mean, out=_scratch(flat.shape, dtype, flat.device))
    out["a_norm"] = torch.linalg.vector_norm(c, dim=1, dtype=_acc(c)).to(F32)
    return out


def call_figures(t: torch.Tensor, kind: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The figures of one call, as :func:`figures` defines them, without the row machinery.

    Returns a float32 vector ``[flag, a_min, a_max, a_norm, a_extra]`` and, for ReLU, the
    call's ``units`` row (else None). One call needs no stack; whole-tensor reductions and
    a single output vector cost about half the launches and Python of a one-row group
    (measured: 128 x 256 ReLU output, see bench/activations.py).

    Example:
        >>> v, u = call_figures(torch.tensor([[-1.0, 2.0], [0.0, 3.0]]), "relu")
        >>> v.tolist(), u.tolist()
        ([4.0, -1.0, 3.0, 3.1622776985168457, 1.0], [0.0, 1.0])
    """
    total = t.sum(dtype=F32)
    mn, mx = t.aminmax()
    norm = torch.linalg.vector_norm(t - total / t.numel(), dtype=_acc(t)).to(F32)
    units = None
    if kind == "relu":
        extra = t.sign().sum(dtype=F32)
        if t.dim() >= 4:      # conv outputs: channels are dim 1
            v = t.transpose(1, -1).reshape(-1, t.shape[1])
        else:
            v = t.reshape(-1, t.shape[-1] if t.dim() else 1)
        units = (v.amax(0) > 0).to(F32)
    elif kind in SATURATION_BOUNDS:
        lo, hi = SATURATION_BOUNDS[kind]
        extra = (t - (lo + hi) / 2).abs_().sub_((hi - lo) / 2).sign_().clamp_(min=0).sum(dtype=F32)
    else:
        extra = total
    if mn.dtype != F32:
        mn, mx = mn.to(F32), mx.to(F32)
    return torch.stack((total, mn, mx, norm, extra)), units


def grad_norms(grads: list[torch.Tensor]) -> torch.Tensor:
    """Float32 norms of same-shape, same-dtype gradients, one per tensor.

    Example:
        >>> grad_norms([torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0])]).tolist()
        [5.0, 1.0]
    """
    per = grads[0].numel() * grads[0].element_size()
    chunk = max(1, STACK_BYTES // max(per, 1))
    if len(grads) > chunk:
        return torch.cat([grad_norms(grads[i:i + chunk]) for i in range(0, len(grads), chunk)])
    s, _ = _rows(grads)
    return torch.linalg.vector_norm(s.reshape(s.shape[0], -1), dim=1, dtype=_acc(s)).to(F32)
