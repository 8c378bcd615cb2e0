"""The one norm engine: per-tensor gradient norms, grouped, finite-safe, DTensor-aware, shared.

Every gradient norm in gradtrace -- the recorder's figures, the clippers, the guard -- comes
from here (:func:`norm_vector` for the recorder, :func:`grad_norms` for the remedies), so
two parts of the product never disagree about one gradient and, within one step, never
compute the same norms twice.

* **Grouped.** Dense tensors are grouped by (device, dtype), as torch's
  ``_group_tensors_by_device_and_dtype`` does, and each group takes one
  ``torch._foreach_norm`` call; sparse tensors (COO, CSR/CSC/BSR/BSC) use the norm of the
  values they store. On the CPU, 2-norms of small tensors (up to :data:`SMALL_NUMEL`
  entries: biases, narrow layers) of a shape that repeats (a stack of identical blocks)
  take a cheaper route: per shape, one ``torch.stack`` of them, widened to float64,
  squared and summed per row (0.5 µs a tensor in a training loop against 2.2 µs for
  ``_foreach_norm``, measured); being float64, it needs no range check below.
* **Finite-safe.** A finite entry of 1e20 squares past float32's range and a norm of
  1e-25 squares below it; both would come out as ``inf`` / ``0``. On the CPU the
  float32 norms are checked (one ``aminmax``; reading a CPU value waits for nothing) and
  only the norms float32 really lost (``inf`` from finite entries, or so small that
  entries' squares may have underflowed: the bound, from float32's smallest normal and
  the tensor's size, is at ``RTOL``) are redone, in one grouped call
  accumulating in float64. On accelerators
  the group accumulates in float64 (``_foreach_norm(..., dtype=float64)``: a
  memory-bound read there, and no host read); on one CPU thread that costs 3.3× the
  float32 norm (0.85 ms against 0.26 ms for 1.6 M values, measured), hence the check.
  MPS has no float64 and keeps float32. float16 and float64 tensors cannot overflow
  their accumulator and skip all this.
* **Sharded.** ``DTensor`` gradients (FSDP2) give the norms of the *full* tensors: shard
  norms, then one all-reduce per device mesh (sum of ``norm ** p``; max for ``inf``, min
  for ``-inf``; ``Replicate`` mesh dims are not reduced). It is a collective: every rank
  of the mesh calls it together. Empty shards are fine.
* **Shared within a step.** While anyone listens (:func:`register`), every call remembers
  its per-tensor norms keyed by the tensor's identity (a weak reference) and its
  ``_version``; a later call on the same, unchanged tensors reuses them instead of reading
  the gradients again. A monitor hands its end-of-backward norms to :func:`publish` as one
  vector (no Python step per tensor); a clipper given exactly those tensors takes them
  whole (:func:`recall`), and after scaling publishes their post-clip norms
  (``norm * coef``) for the new versions, which the monitor reads back as its post-clip
  total. Writes that bypass autograd's version
  counter are invisible to this: ``GradScaler.unscale_`` is one (handled: its kernel is
  wrapped while anyone listens, and forgets what it unscaled); ``grad.data.mul_(...)``
  and ``torch.distributed`` collectives on gradients outside DDP are others: call
  :func:`forget` after them. ``DTensor`` norms are never reused, so a rank that
  published cannot skip a collective that another rank runs.

(Why ~930 lines in one file: the recorder and the remedies import this as one leaf
module, which may import nothing else from gradtrace; the engine, its two CPU routes, its
sharded path and the sharing between them change together.)

Example:
    >>> import torch
    >>> g = [torch.full((4,), 1e20), torch.full((9,), 1e-25)]
    >>> [f"{float(n):.3g}" for n in grad_norms(g)]
    ['2e+20', '3e-25']
    >>> f"{float(total_norm(grad_norms(g))):.3g}"
    '2e+20'
"""
from __future__ import annotations

import math
import operator
import types
import warnings
import weakref
from collections import OrderedDict
from typing import Any, Callable, Iterable, NamedTuple, Union

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

__all__ = [
    "grad_norms", "total_norm", "register", "notify_clipped", "forget",
    "is_dtensor", "local", "stored_values", "groups", "use_foreach", "tensor_list",
    "check_norm_type", "wide_dtype", "HOST_READ_FREE", "norm_vector",
    "publish", "recall", "SMALL_NUMEL",
]

F32, F64 = torch.float32, torch.float64
_PLAIN = (Tensor, torch.nn.Parameter)
_PLAIN_TYPES = frozenset(_PLAIN)
_SHAPE = operator.attrgetter("shape")
#: Devices with foreach kernels (torch's ``_device_has_foreach_support`` list).
_FOREACH_DEVICE_TYPES = frozenset({"cpu", "cuda", "xpu", "mps", "hpu", "mtia"})
#: Range check of float32 norms (finite ``p > 0``). Each ``|x| ** p`` below float32's
#: smallest normal (2**-126) may be lost (flushed or rounded to a subnormal), so a norm
#: ``N`` of ``n`` entries can be short by at most ``n * 2**-126`` in ``N ** p``; that is
#: under float32's rounding (``RTOL`` = 2**-24 relative) unless ``N ** p < n * 2**-102``.
#: Only those norms (and ``inf`` from finite entries) are redone. A fixed bound would
#: either redo legitimate 1e-13 gradients every step (the old 1e-12 did: 3.8 ms a step on
#: 100 tiny layers) or miss a large tensor of tiny entries; this one depends on ``n``.
RTOL = 2.0 ** -24
_TINY_POWER = 2.0 ** -126
#: Tensors up to this many entries: a first check on the smallest norm alone (no numel
#: read) clears the common case; below it, the per-tensor bound decides.
_CHEAP_NUMEL = 2.0 ** 32
#: A power of two (exact) for the rare redo whose float64 powers overflow too (p > 8):
#: it takes float32's largest entries (3.4e38) to 2.7e8.
_SCALE_DOWN = 2.0 ** -100
#: Device types whose values the host reads without waiting for a queue (the CPU runs
#: its kernels synchronously): there the range check reads two numbers instead of
#: accumulating in float64 (which costs +0.6 ms per 1.6 M values on one CPU thread,
#: 3.3× the float32 norm). Tests empty it to run the accelerator path on the CPU.
HOST_READ_FREE = frozenset({"cpu"})
#: On those devices, 2-norms of same-shape tensors of at most this many entries are
#: taken as the rows of one float64 stack instead of by ``_foreach_norm``, whose cost is
#: a fixed ~2.6 us a tensor at these sizes. Measured on one CPU thread (bench/norms.py
#: route table, 200 tensors of one shape, us per tensor): foreach 2.6 / stack 0.4 at 8-64
#: entries, 2.6 / 0.6 at 256, 3.0 / 1.3 at 1024, 4.6 / 7.2 at 4096 (the stack copies
#: every entry twice: past ~2000 entries a single read wins). Right after a backward the
#: stack's lead grows (64 gradients of 32 entries: 33 us against 139 us).
SMALL_NUMEL = 1024
#: A shape takes the stacked route from this many tensors on (fewer: the stack's three
#: extra operations cost more than their ~2 us each inside the grouped call).
STACK_MIN = 8
#: shapes -> route plan (:func:`_plan`); a few models' worth, cleared when full.
_plans: dict[tuple, "_Plan"] = {}
_PLANS_KEPT = 64

# ------------------------------------------------------------------ tensor helpers


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    if type(t) in _PLAIN:                # the hot path: a failed hasattr on a Tensor is slow
        return False
    return hasattr(t, "to_local") and hasattr(t, "placements") and hasattr(t, "device_mesh")


def local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor; any other tensor unchanged.

    Example:
        >>> local(torch.ones(3)).shape
        torch.Size([3])
    """
    return t.to_local() if is_dtensor(t) else t


def stored_values(t: Tensor) -> Tensor:
    """The entries a tensor stores: itself if dense; a sparse tensor's values (COO is
    coalesced first, so duplicate indices add up as in the dense tensor).

    Example:
        >>> i = torch.tensor([[0, 0]]); v = torch.tensor([3.0, 4.0])
        >>> stored_values(torch.sparse_coo_tensor(i, v, (2,))).tolist()
        [7.0]
    """
    if t.layout == torch.strided:
        return t
    if t.layout == torch.sparse_coo:
        return t.coalesce().values()
    return t.values()  # compressed layouts (CSR/CSC/BSR/BSC) never hold duplicates


def tensor_list(items: Any, argname: str) -> list[Tensor]:
    """``items`` (a Tensor or an iterable of Tensors) as a list, checked, as torch takes it.

    A module passed where its parameters belong is a ``TypeError`` that names the fix;
    an empty generator warns as torch's ``clip_grad_norm_`` does.

    Example:
        >>> len(tensor_list(torch.nn.Linear(2, 2).parameters(), "parameters"))
        2
    """
    if isinstance(items, Tensor):
        return [items]
    if isinstance(items, torch.nn.Module):
        raise TypeError(f"{argname} must be a Tensor or an iterable of Tensors, got the module "
                        f"{type(items).__name__}; pass model.parameters()")
    if items is None:
        raise TypeError(f"{argname} must be a Tensor or an iterable of Tensors, got None")
    was_generator = isinstance(items, types.GeneratorType)
    try:
        out = list(items)
    except TypeError:
        raise TypeError(f"{argname} must be a Tensor or an iterable of Tensors, "
                        f"got {type(items).__name__}") from None
    for t in out:
        if not isinstance(t, Tensor):
            hint = "; pass model.parameters()" if isinstance(t, (tuple, torch.nn.Module)) else ""
            raise TypeError(f"{argname} must contain Tensors, found {type(t).__name__}{hint}")
    if was_generator and not out:
        warnings.warn(f"`{argname}` is an empty generator, no gradient clipping will occur.",
                      stacklevel=3)
    return out


def groups(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
    """Indices of the dense tensors grouped by (device, dtype), in first-seen order.

    Example:
        >>> f64 = torch.ones(1, dtype=torch.float64)
        >>> list(groups([torch.ones(1), f64, torch.ones(2)]).values())
        [[0, 2], [1]]
    """
    out: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    strided = torch.strided
    for i, t in enumerate(tensors):
        if t.layout is strided:
            key = (t.device, t.dtype)
            idx = out.get(key)
            if idx is None:
                out[key] = [i]
            else:
                idx.append(i)
    return out


def use_foreach(tensors: list[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Whether a group takes the foreach kernels, with torch's rules for ``foreach``.

    ``None``: where the device has them and every tensor is a plain Tensor/Parameter;
    ``True`` on a device without them is a ``RuntimeError``, as in torch.

    Example:
        >>> use_foreach([torch.ones(1)], torch.device("cpu"), None)
        True
    """
    supported = device.type in _FOREACH_DEVICE_TYPES
    if foreach is None:
        return supported and all(type(t) in _PLAIN for t in tensors)
    if foreach and not supported:
        raise RuntimeError(f"foreach=True was passed, but can't use the foreach API on "
                           f"{device.type} tensors")
    return bool(foreach)


def check_norm_type(norm_type: Any) -> float:
    """``norm_type`` as a float (``'inf'`` allowed); a TypeError/ValueError otherwise.

    Example:
        >>> check_norm_type("inf")
        inf
    """
    try:
        value = float(norm_type)
    except (TypeError, ValueError):
        raise TypeError(f"norm_type must be a number or 'inf', got {norm_type!r}") from None
    if math.isnan(value):
        raise ValueError("norm_type must not be nan; use e.g. 1.0, 2.0 or 'inf'")
    return value


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return F64 if dtype == F64 else F32


# ------------------------------------------------------------------ computing norms


def _rescue(group: list[Tensor], v: Tensor, p: float, rtol: float = RTOL) -> Tensor | None:
    """``v`` (float32 norms of ``group``) with the norms float32 lost redone in float64
    accumulation (one grouped call), or None when all are trustworthy (the usual case:
    one ``aminmax`` and two host reads, on the CPU only, where a read waits for nothing).
    """
    loss = _TINY_POWER / rtol             # the most a flushed power may cost, per entry
    lo, hi = torch.aminmax(v)
    lo_f, hi_f = float(lo), float(hi)
    # Compared as norms (a root of the bound), so a large p cannot overflow a float power.
    if hi_f < math.inf and lo_f >= (_CHEAP_NUMEL * loss) ** (1.0 / p):
        return None                       # nan falls through to the exact check (harmless)
    if hi_f < math.inf and lo_f > 0.0 and \
            lo_f >= (max(map(Tensor.numel, group)) * loss) ** (1.0 / p):
        return None                       # the per-tensor bound at the largest tensor
    # Each tensor's bound as a norm, (n * loss) ** (1/p): at least 2**-102 ** (1/p), a
    # float32 normal for p >= 2 (and 0 below it, which only trusts more norms for p < 2).
    bound = torch.tensor(list(map(Tensor.numel, group)), dtype=F32).mul_(loss)
    ok = v >= bound.pow_(1.0 / p)
    ok &= v < math.inf                    # False for inf and nan (nan is redone: harmless)
    lost = ~ok
    if p > 1.0:
        # A zero norm is common (dead units, unused parameters) and usually exact: a
        # float32 L1 norm (no power, so nothing underflows) tells an all-zero tensor
        # from one whose powers vanished, at the float32 price instead of float64's.
        zidx = (v == 0).nonzero().flatten()
        if len(zidx):
            l1 = _group_norm_list([group[i] for i in zidx.tolist()], 1.0, F32)
            lost.index_put_((zidx,), l1 != 0)
    idx = lost.nonzero().flatten()
    if not len(idx):
        return None
    pick = [group[i] for i in idx.tolist()]
    redo = _group_norm_list(pick, p, F64)
    if p > 4.0:     # float32 entries to a power <= 4 cannot overflow float64 (3.4e38**4=1e154)
        for j in redo.isinf().nonzero().flatten().tolist():   # past float64 too: scale first
            redo[j] = torch.linalg.vector_norm(pick[j].to(F64) * _SCALE_DOWN, p) / _SCALE_DOWN
    return v.index_copy(0, idx, redo.to(v.dtype))


def _group_norm_list(group: list[Tensor], p: float, acc: torch.dtype) -> Tensor:
    """Norms of one dense (device, dtype) group as a vector, accumulated in ``acc``."""
    if all(map(_PLAIN_TYPES.__contains__, map(type, group))):
        return torch.stack(torch._foreach_norm(group, p, dtype=acc))
    return torch.stack([torch.linalg.vector_norm(t, p, dtype=acc) for t in group])


class _Plan(NamedTuple):
    """How one (device, dtype) group of tensors splits between the two CPU routes."""

    stacks: tuple[Callable[[list], list], ...]   # per repeated small shape: its tensors
    rest: Callable[[list], list] | None          # the others (grouped foreach), or none
    order: Tensor | None                         # results in stack order -> input order


def _plan(shapes: tuple) -> _Plan | None:
    """The route plan for a group of tensors of these shapes, or None when no small shape
    repeats :data:`STACK_MIN` times (then everything takes ``_foreach_norm``). Cached by
    the shapes, so a training loop plans once."""
    if shapes in _plans:
        return _plans[shapes]
    by_shape: dict[Any, list[int]] = {}
    for i, shape in enumerate(shapes):
        if 0 < shape.numel() <= SMALL_NUMEL:         # (empty ones: nothing to stack)
            by_shape.setdefault(shape, []).append(i)
    stacked = [idx for idx in by_shape.values() if len(idx) >= STACK_MIN]
    plan = None
    if stacked:
        done = {i for idx in stacked for i in idx}
        rest = [i for i in range(len(shapes)) if i not in done]
        flat = [i for idx in stacked for i in idx] + rest
        order = None if flat == sorted(flat) else \
            torch.empty(len(flat), dtype=torch.long).index_copy_(
                0, torch.tensor(flat), torch.arange(len(flat)))
        plan = _Plan(tuple(map(_picker, stacked)), _picker(rest) if rest else None, order)
    if len(_plans) >= _PLANS_KEPT:
        _plans.clear()
    _plans[shapes] = plan
    return plan


def _picker(idx: list[int]) -> Callable[[list], list]:
    """``lambda xs: [xs[i] for i in idx]`` without a Python step per item."""
    if len(idx) == 1:
        i = idx[0]
        return lambda xs: [xs[i]]
    get = operator.itemgetter(*idx) if idx else (lambda xs: ())
    return lambda xs: list(get(xs))


def by_shape(tensors: list[Tensor], stacked: Callable[[list[Tensor]], Tensor],
             rest: Callable[[list[Tensor]], Tensor]) -> Tensor | None:
    """One value per tensor, in input order, from ``stacked`` (given each small shape that
    repeats :data:`STACK_MIN` times, its tensors) and ``rest`` (given the others); None
    when no small shape repeats (then the caller's per-tensor route is the right one).
    The CPU routes of the norm engine and of the recorder's max |g| share this plan.

    Example:
        >>> ts = [torch.ones(2)] * STACK_MIN + [torch.ones(3000)]
        >>> v = by_shape(ts, lambda g: torch.full((len(g),), 1.0), lambda g: torch.full((len(g),), 2.0))
        >>> v.tolist()[-2:]
        [1.0, 2.0]
    """
    plan = _plan(tuple(map(_SHAPE, tensors)))
    if plan is None:
        return None
    parts = [stacked(pick(tensors)) for pick in plan.stacks]
    if plan.rest is not None:             # the large tensors and unrepeated small shapes
        parts.append(rest(plan.rest(tensors)))
    v = torch.cat(parts) if len(parts) > 1 else parts[0]
    return v if plan.order is None else v[plan.order]


def _stack_norms(group: list[Tensor]) -> Tensor:
    """2-norms of same-shape small dense CPU tensors, accumulated in float64: the tensors
    as the rows of one stack, one ``vector_norm(dim=1, dtype=float64)`` (one kernel where
    widening, squaring and summing took three; 20-25% faster, measured). No entry of any
    float dtype leaves float64's range when squared: nothing is checked or redone."""
    # torch.stack is looked up at call time: tests count gradient reads through it.
    return torch.linalg.vector_norm(torch.stack(group).reshape(len(group), -1), dim=1, dtype=F64)


def _group_norms(group: list[Tensor], device: torch.device, dtype: torch.dtype, p: float,
                 foreach: bool | None, as_list: bool = True, check: bool = True,
                 wide: bool = False, rtol: float = RTOL) -> tuple[list[Tensor], Tensor]:
    """Norms of one (device, dtype) group, as a list of 0-d tensors (``as_list``; else the
    list may be stale) and as one vector: float64 for float64 tensors (and with ``wide``),
    else float32."""
    # Only a finite p > 0 squares (or powers) entries; float16 and float64 cannot leave
    # the accumulator's range; complex tensors keep torch's own accumulation.
    at_risk = 0.0 < p < math.inf and dtype not in (F64, torch.float16) and not dtype.is_complex
    widen = at_risk and device.type not in HOST_READ_FREE and device.type != "mps"
    plain = use_foreach(group, device, foreach)
    if p == 2.0 and plain and device.type in HOST_READ_FREE and dtype.is_floating_point:
        v = by_shape(group, _stack_norms, lambda rest: _group_norms(
            rest, device, dtype, p, foreach, False, check, wide, rtol)[1].to(F64))
        if v is not None:
            if not wide and dtype != F64:
                v = v.to(F32)
            return (list(v.unbind(0)) if as_list else []), v
    acc = None if dtype.is_complex else (F64 if widen else _out_dtype(dtype))
    if plain:
        out = list(torch._foreach_norm(group, p, dtype=acc))
    else:
        out = [torch.linalg.vector_norm(t, p, dtype=acc) for t in group]
    v = torch.stack(out)
    if widen:                             # accumulated in float64: one cast for the group
        v = v if wide else v.to(F32)
        if as_list:
            out = list(v.unbind(0))
    elif check and at_risk and device.type in HOST_READ_FREE:
        fixed = _rescue(group, v, p, rtol)
        if fixed is not None:
            v = fixed
            if as_list:
                out = list(v.unbind(0))
    if wide and v.dtype != F64:
        v = v.to(F64)
    return out, v


def _dense_norms(group: list[Tensor], device: torch.device, dtype: torch.dtype, p: float,
                 foreach: bool | None) -> list[Tensor]:
    return _group_norms(group, device, dtype, p, foreach)[0]


def _local_norms(tensors: list[Tensor], p: float, foreach: bool | None,
                 grouped: dict | None = None) -> list[Tensor]:
    # Runs under no_grad, so no detach() is needed (it would cost ~0.4 µs a tensor).
    grouped = groups(tensors) if grouped is None else grouped
    if len(grouped) == 1:                 # the usual case: one device, one dtype, all dense
        ((device, dtype), idx), = grouped.items()
        if len(idx) == len(tensors):
            return _dense_norms(tensors, device, dtype, p, foreach)
    norms: list[Tensor | None] = [None] * len(tensors)
    for (device, dtype), idx in grouped.items():
        for i, n in zip(idx, _dense_norms([tensors[i] for i in idx], device, dtype, p, foreach)):
            norms[i] = n
    for i, t in enumerate(tensors):
        if norms[i] is None:              # sparse (rare): one norm each, in float64
            vals = stored_values(t.detach())
            norms[i] = torch.linalg.vector_norm(vals, p, dtype=wide_dtype(vals.device)).to(
                _out_dtype(vals.dtype))
    return norms  # type: ignore[return-value]


def _sharded_norms(tensors: list[Tensor], p: float, foreach: bool | None) -> list[Tensor]:
    """Full norms of DTensors: local shard norms, one all-reduce per (mesh, sharded dims).

    A shard contributes ``norm ** p`` (summed), max|x| (``inf``), min|x| (``-inf``) or its
    nonzero count (``p == 0``). A ``Partial`` placement (unreduced gradient) falls back to
    DTensor's own norm and ``full_tensor()``.
    """
    import torch.distributed as dist
    out: list[Tensor | None] = [None] * len(tensors)
    if p == math.inf:
        op, empty = dist.ReduceOp.MAX, 0.0
    elif p == -math.inf:
        op, empty = dist.ReduceOp.MIN, math.inf
    else:
        op, empty = dist.ReduceOp.SUM, 0.0
    powered = p not in (0.0, math.inf, -math.inf)
    buckets: dict[tuple[Any, tuple[int, ...], torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        placements = tuple(t.placements)
        if any(pl.is_partial() for pl in placements) or t.layout != torch.strided:
            full = torch.linalg.vector_norm(t.detach(), p).full_tensor()
            out[i] = full.to(_out_dtype(full.dtype))
            continue
        dims = tuple(d for d, pl in enumerate(placements) if pl.is_shard())
        buckets.setdefault((t.device_mesh, dims, t.device), []).append(i)
    for (mesh, dims, device), idx in buckets.items():
        locs = [local(tensors[i].detach()) for i in idx]
        present = [j for j, t in enumerate(locs) if t.numel() > 0]
        wdt = wide_dtype(device)            # sums of powers: keep the range
        acc = torch.full((len(idx),), empty, dtype=wdt, device=device)
        if present:
            norms = _local_norms([locs[j] for j in present], p, foreach)
            v = _stack(norms).to(device, wdt)
            acc[torch.tensor(present, device=device)] = v.pow(p) if powered else v
        if dims and mesh.get_coordinate() is not None:
            for d in dims:                   # FSDP2: exactly one sharded mesh dim
                dist.all_reduce(acc, op=op, group=mesh.get_group(d))
        if powered:
            acc = acc.pow(1.0 / p)
        as32 = acc.to(F32).unbind(0)
        as64 = acc.to(F64).unbind(0) if any(t.dtype == F64 for t in locs) else as32
        for k, (i, t) in enumerate(zip(idx, locs)):
            out[i] = as64[k] if t.dtype == F64 else as32[k]
    return out  # type: ignore[return-value]


# ------------------------------------------------------------------ sharing within a step

#: norm_type -> {id(tensor): (weak reference, _version, source, index)}: the norm is
#: ``source[index]`` (a list of norms :func:`grad_norms` computed). Filled only while
#: someone listens; bounded by pruning dead or changed entries when it outgrows the live
#: set. Published vectors (a monitor's, a clipper's post-clip ones) are ``_batches``.
_cache: dict[float, dict[int, tuple[Any, int, Any, int]]] = {}
_cache_limit = 256

NormObserver = Callable[[list, list, Tensor, Union[Tensor, None], float], Any]
#: handle id -> observer (a ``weakref.WeakMethod`` for bound methods)
_observers: "OrderedDict[int, Any]" = OrderedDict()


class _Batch:
    """The norms of a list of tensors as one vector, valid for the tensors' versions at
    publication: a monitor's end-of-backward norms (:func:`publish`), or a clipper's
    post-clip norms ``pre * coef`` (multiplied out on first use only).

    An *owned* batch holds its tensors strongly and is itself held only by its owner (a
    monitor, for one step) and, weakly, by the registry: it lives exactly as long as the
    owner keeps the step's gradients anyway, and costs no weak reference per tensor.
    Post-clip batches derived from it are owned by it. Any other batch holds its tensors
    weakly. Every per-tensor step here is a C-level ``map``: no Python call per tensor."""

    __slots__ = ("tensors", "refs", "versions", "pre", "coef", "squared", "derived", "_key",
                 "_vec", "_index", "__weakref__")

    def __init__(self, tensors: list[Tensor], pre: Any, coef: Tensor | None = None, *,
                 versions: list[int] | None = None, owned: bool = False,
                 squared: bool = False) -> None:
        self.tensors = tensors if owned else None
        self.refs = None if owned else list(map(weakref.ref, tensors))
        self.versions = list(map(_VERSION, tensors)) if versions is None else versions
        self.pre, self.coef, self.squared = pre, coef, squared
        self.derived: list[_Batch] = []
        self._key: Any = False
        self._vec = self._index = None

    def live(self) -> list[Any]:
        """The tensors (None for any that died)."""
        return self.tensors if self.tensors is not None else list(map(operator.call, self.refs))

    @property
    def key(self) -> tuple[torch.device, torch.dtype] | None:
        """(device, dtype) when all are plain dense tensors of one device and dtype (a
        clipper then scales them as one group without grouping them again), else None."""
        if self._key is False:
            ts = self.live()
            kinds = set(zip(map(type, ts), map(_LAYOUT, ts), map(_DTYPE, ts), map(_DEVICE, ts)))
            one = next(iter(kinds)) if len(kinds) == 1 else None
            self._key = one[2:][::-1] if one is not None and one[0] in _PLAIN_TYPES and \
                one[1] == torch.strided else None
        return self._key

    def vector(self) -> Tensor:
        """The norms as a 1-D tensor (post-clip ones computed here, once)."""
        if self._vec is None:
            pre = self.pre if isinstance(self.pre, Tensor) else _stack(list(self.pre))
            with torch.no_grad():
                if self.squared:            # published as squares: the root on first use
                    pre = pre.sqrt()
                self._vec = pre if self.coef is None else pre * self.coef.to(pre.device, pre.dtype)
        return self._vec

    def matches(self, tensors: list[Tensor]) -> bool:
        """The same tensors, in the same order, unchanged since."""
        if len(tensors) != len(self.versions):
            return False
        held = self.tensors if self.tensors is not None else map(operator.call, self.refs)
        return all(map(operator.is_, tensors, held)) and \
            list(map(_VERSION, tensors)) == self.versions

    def find(self, t: Tensor) -> int | None:
        """Position of ``t`` if it is one of these tensors and unchanged since."""
        if self._index is None:
            self._index = {id(x): k for k, x in enumerate(self.live())}
        k = self._index.get(id(t))
        if k is None or self.live()[k] is not t or self.versions[k] != t._version:
            return None
        return k

    def holds_any(self, ids: set[int]) -> bool:
        return any(id(x) in ids for x in self.live())


_VERSION = operator.attrgetter("_version")
_DEVICE, _DTYPE, _LAYOUT = (operator.attrgetter(a) for a in ("device", "dtype", "layout"))
#: norm_type -> published batches, newest first (a handful: a step's pre- and post-clip
#: ones); an owned batch is kept as a weak reference.
_batches: dict[float, list[Any]] = {}
_BATCHES_KEPT = 4


def _live_batches(p: float) -> list[_Batch]:
    out = []
    for entry in _batches.get(p, ()):
        b = entry() if type(entry) is weakref.ReferenceType else entry
        if b is not None:
            out.append(b)
    return out


def _add_batch(batch: _Batch, p: float) -> None:
    entry = weakref.ref(batch) if batch.tensors is not None else batch
    kept = [entry] + [e for e in _batches.get(p, ())
                      if (e() if type(e) is weakref.ReferenceType else e) is not None]
    _batches[p] = kept[:_BATCHES_KEPT]


def _clear() -> None:
    _cache.clear()
    _batches.clear()


def publish(tensors: list[Tensor], norms: Tensor, norm_type: float = 2.0, *,
            versions: list[int] | None = None, squared: bool = False) -> Any:
    """Offer the norms of ``tensors`` (a 1-D tensor, one per tensor, in order) to every
    later norm computation while the returned token is held: while someone listens
    (:func:`register`), a clipper given the same, unchanged tensors uses them instead of
    reading the gradients, and publishes post-clip ones (``norms * coef``) in turn. What a
    monitor calls at the end of backward, holding the token for the step. The token
    holds ``tensors``; drop it to withdraw them. ``versions``: their ``_version``\\ s, if
    the caller has them; ``squared=True``: ``norms`` holds squared 2-norms (a monitor's
    figures), rooted only if a clipper asks. Returns None (nothing published) when nobody
    listens or for DTensors (local shard norms).

    Example:
        >>> g = [torch.full((4,), 3.0)]
        >>> with register(lambda *a: None):
        ...     token = publish(g, torch.tensor([6.0]))
        ...     float(grad_norms(g)[0])
        6.0
    """
    if not tensors or not _observers:
        return None
    if not all(map(_PLAIN_TYPES.__contains__, map(type, tensors))) and \
            any(map(is_dtensor, tensors)):
        return None
    if norms.dim() != 1 or norms.numel() != len(tensors):
        raise ValueError(f"publish: norms must be a 1-D tensor of {len(tensors)} values, "
                         f"got shape {tuple(norms.shape)}")
    if squared and float(norm_type) != 2.0:
        raise ValueError(f"publish: squared=True holds squared 2-norms; norm_type must be 2, got {norm_type}")
    batch = _Batch(list(tensors), norms, versions=versions, owned=True, squared=squared)
    _add_batch(batch, float(norm_type))
    return batch


def recall(tensors: list[Tensor], norm_type: float = 2.0) -> Tensor | None:
    """The published norms of exactly these tensors (same order, unchanged since) as a
    1-D tensor, or None: pre-clip norms a monitor published, or post-clip norms a clipper
    derived from them. No gradient is read.

    Example:
        >>> g = [torch.ones(4)]
        >>> with register(lambda *a: None):
        ...     token = publish(g, torch.tensor([2.0])); recall(g).tolist()
        [2.0]
    """
    batch = _recall_batch(tensors, float(norm_type))
    return None if batch is None else batch.vector()


def _recall_batch(tensors: list[Tensor], p: float) -> _Batch | None:
    for batch in _live_batches(p):
        if batch.matches(tensors):
            return batch
    return None


def _remember(tensors: list[Tensor], source: Any, p: float) -> None:
    global _cache_limit
    ref = weakref.ref
    table = _cache.setdefault(p, {})
    for i, t in enumerate(tensors):
        if type(t) in _PLAIN or not is_dtensor(t):
            table[id(t)] = (ref(t), t._version, source, i)
    if len(table) > _cache_limit:
        for key, (r, version, _, _) in list(table.items()):
            t = r()
            if t is None or t._version != version:
                del table[key]
        _cache_limit = max(256, 2 * len(table))


def _recall(tensors: list[Tensor], p: float) -> list[Tensor | None]:
    """Per tensor: a norm remembered or published for it (unchanged since), else None.
    A Python step per tensor: the path of a clipper given another list than was
    published (a subset, another order); the exact list takes :func:`recall`."""
    table = _cache.get(p) or {}
    batches = _live_batches(p) if _batches else ()
    found: list[Tensor | None] = []
    for t in tensors:
        hit = table.get(id(t))
        if hit is not None and hit[1] == t._version and hit[0]() is t:
            found.append(hit[2][hit[3]])
            continue
        for batch in batches:
            k = batch.find(t)
            if k is not None:
                found.append(batch.vector()[k].to(_out_dtype(t.dtype)))
                break
        else:
            found.append(None)
    return found


def forget(tensors: Iterable[Tensor] | None = None) -> None:
    """Drop remembered norms (of ``tensors``, or all): needed only after writing to a
    gradient in a way autograd's version counter does not see (``grad.data.mul_(…)``,
    ``torch.distributed.all_reduce(grad)``).

    Example:
        >>> forget()
    """
    if tensors is None:
        _clear()
        return
    ts = tensor_list(tensors, "tensors")
    for t in ts:
        for table in _cache.values():
            table.pop(id(t), None)
    ids = set(map(id, ts))
    for p in list(_batches):
        _batches[p] = [b if b.tensors is None else weakref.ref(b)
                       for b in _live_batches(p) if not b.holds_any(ids)]


def register(fn: NormObserver) -> RemovableHandle:
    """Listen to every gradtrace clipper; returns a handle whose ``remove()`` stops it.

    After a clipper has multiplied its coefficient in, it calls
    ``fn(grads, norms, total, coef, norm_type)``: the gradients (already scaled), their
    per-tensor *pre*-clip norms (float32, float64 for float64 gradients), the pre-clip
    total, the 0-d coefficient applied (``None`` when nothing was scaled, as for the
    guard) and the norm type. A bound method is held weakly, so an unclosed monitor can
    be freed; anything else is held until removed. While at least one observer is
    registered, norms are remembered for reuse within the step (module docstring).
    Observers should not sync; their exceptions propagate to the clipper's caller.

    Example:
        >>> seen = []
        >>> with register(lambda g, n, t, c, p: seen.append(float(t))):
        ...     notify_clipped([torch.ones(4)], [torch.tensor(2.0)], torch.tensor(2.0), None, 2.0)
        >>> seen
        [2.0]
    """
    if not callable(fn):
        raise TypeError(f"register: fn must be callable, got {type(fn).__name__}")
    handle = _Handle(_observers)
    _observers[handle.id] = weakref.WeakMethod(fn) if isinstance(fn, types.MethodType) else fn
    _watch_unscale(True)
    return handle


class _Handle(RemovableHandle):
    """A registry handle; removing the last one also drops what was remembered."""

    def remove(self) -> None:
        super().remove()
        if not _observers:
            _clear()
            _watch_unscale(False)


_unscale: Any = None    # torch's GradScaler kernel while a listener is registered


def _watch_unscale(on: bool) -> None:
    """While anyone listens, wrap the kernel ``GradScaler.unscale_`` calls: it divides the
    gradients in place *without* bumping their ``_version``, so their remembered (scaled)
    norms must be forgotten, or a clip after ``unscale_`` would use them. Restored when
    the last listener leaves, so nothing stays patched."""
    global _unscale
    if on and _unscale is None:
        _unscale = torch._amp_foreach_non_finite_check_and_unscale_

        def unscale_and_forget(grads, *args, **kwargs):
            out = _unscale(grads, *args, **kwargs)
            if _cache or _batches:
                forget(grads)
            return out
        torch._amp_foreach_non_finite_check_and_unscale_ = unscale_and_forget
    elif not on and _unscale is not None:
        torch._amp_foreach_non_finite_check_and_unscale_ = _unscale
        _unscale = None


def _live_observers() -> list[NormObserver]:
    out = []
    for key, fn in list(_observers.items()):
        if isinstance(fn, weakref.WeakMethod):
            fn = fn()
            if fn is None:             # its monitor was freed without close()
                _observers.pop(key, None)
                continue
        out.append(fn)
    if not _observers:
        _clear()
        _watch_unscale(False)
    return out


def notify_clipped(grads: list[Tensor], norms: Any, total: Tensor,
                   coef: Tensor | None, norm_type: float, *, source: Any = None) -> None:
    """What a clipper calls after scaling: publish the post-clip norms, call observers.

    ``norms`` are the pre-clip per-tensor norms (a list of 0-d tensors or one 1-D
    tensor); the post-clip ones are ``norms * coef``, published for the gradients' new
    versions (one batch, multiplied out only if someone asks), so a monitor reading them
    after the clip reads no gradient. ``source``: the published batch ``norms`` came
    from, if they did (its full-precision norms are scaled, and it owns the post-clip
    batch, so both live as long as its publisher keeps them). Does nothing when no
    observer is registered.

    Example:
        >>> notify_clipped([torch.ones(4)], [torch.tensor(2.0)], torch.tensor(2.0), None, 2.0)
    """
    if not grads:
        return
    observers = _live_observers()
    if not observers:
        return
    if coef is not None and source is not None and source.tensors is not None:
        post = _Batch(source.tensors, source.vector(), coef, owned=True)
        source.derived.append(post)
        _add_batch(post, float(norm_type))
    elif coef is not None and (all(map(_PLAIN_TYPES.__contains__, map(type, grads)))
                               or not any(map(is_dtensor, grads))):
        _add_batch(_Batch(grads, norms, coef), float(norm_type))
    for fn in observers:
        fn(grads, norms, total, coef, float(norm_type))


# ------------------------------------------------------------------ the public engine


def grad_norms(tensors: Tensor | Iterable[Tensor], norm_type: float = 2.0, *,
               foreach: bool | None = None) -> list[Tensor]:
    """Per-tensor ``norm_type``-norms, one ``_foreach_norm`` per (device, dtype), no sync.

    Returns one 0-d tensor per input, on that tensor's device, float32 (float64 for
    float64 tensors, so their precision is kept). Finite tensors give finite norms (1e20
    and 1e-25 entries included), sparse tensors the norm of their stored values, DTensors
    the norm of the full tensor (a collective: all ranks call together). Norms remembered
    from this step for the same unchanged tensors are reused (see :func:`register`).

    Example:
        >>> [float(n) for n in grad_norms([torch.ones(4), torch.full((2,), -3.0)])]
        [2.0, 4.242640495300293]
    """
    return _grad_norms(tensor_list(tensors, "tensors"), check_norm_type(norm_type), foreach)


def _grad_norms(ts: list[Tensor], p: float, foreach: bool | None,
                grouped: dict | None = None) -> list[Tensor]:
    """:func:`grad_norms` on a checked list; ``grouped`` is ``groups(ts)`` if the caller
    has it (the clippers group once per call and share it)."""
    if not ts:
        return []
    if (_cache or _batches) and not _observers:  # a listener was freed unclosed: nothing shared
        _clear()
        _watch_unscale(False)
    with torch.no_grad():
        batch = _recall_batch(ts, p) if _batches else None
        if batch is not None and batch.key is not None:    # exactly a published list
            return list(batch.vector().to(_out_dtype(batch.key[1])).unbind(0))
        if _cache or _batches:
            norms: list[Tensor | None] = _recall(ts, p)
            todo = [i for i, n in enumerate(norms) if n is None]
            if not todo:
                return norms  # type: ignore[return-value]
        else:
            norms, todo = [None] * len(ts), range(len(ts))
        sub = ts if len(todo) == len(ts) else [ts[i] for i in todo]
        sharded = [j for j, t in enumerate(sub) if type(t) not in _PLAIN and is_dtensor(t)]
        if sharded:
            got: list[Tensor | None] = [None] * len(sub)
            plain = [j for j in range(len(sub)) if not is_dtensor(sub[j])]
            for j, n in zip(sharded, _sharded_norms([sub[j] for j in sharded], p, foreach)):
                got[j] = n
            for j, n in zip(plain, _local_norms([sub[j] for j in plain], p, foreach)):
                got[j] = n
        else:
            got = _local_norms(sub, p, foreach,  # type: ignore[assignment]
                               grouped if sub is ts else None)
        if len(todo) == len(ts):
            norms = got
        else:
            for i, n in zip(todo, got):
                norms[i] = n
        if _observers:
            _remember(sub, got if type(got) is list else list(got), p)
    return norms  # type: ignore[return-value]


def norm_vector(tensors: list[Tensor], norm_type: float = 2.0, *,
                device: torch.device | None = None, uniform: bool = False,
                check: bool = True, wide: bool = False, rtol: float = RTOL) -> Tensor:
    """Per-tensor norms as one 1-D tensor on ``device`` (default: the first tensor's), no
    sync and nothing remembered: the recorder's entry point, taken every step.

    O(1) Python calls in the number of tensors when they share a device and dtype: on the
    CPU, 2-norms of small tensors (up to :data:`SMALL_NUMEL` entries) whose shape repeats
    come from one float64 stack per shape and the rest from one grouped
    ``_foreach_norm``; elsewhere one grouped ``_foreach_norm`` per (device, dtype).
    float32 (float64 if any tensor is float64, or with ``wide=True``, which keeps the
    float64 sums of the stacked tensors unrounded). Same numbers as :func:`grad_norms`: the same range check and redo,
    sparse tensors by their stored values, DTensors as full norms (collective).
    ``uniform=True``: the caller checked once that all are plain dense tensors of one
    device and dtype, so not even the grouping loop runs (a sparse gradient after all is
    caught and grouped). ``check=False`` skips the CPU range check of the large tensors
    (no host read) for a caller that checks them itself. ``rtol``: the relative error
    the range check accepts from float32's flushed powers (default :data:`RTOL`, float32's
    own rounding); a figure read to a few digits (an update ratio) passes a larger one,
    so that norms of tiny entries are redone only when that error could show.

    Example:
        >>> [f"{v:.4g}" for v in norm_vector([torch.ones(4), torch.full((9,), 1e-30)]).tolist()]
        ['2', '3e-30']
    """
    if not tensors:
        return torch.empty(0, dtype=F64 if wide else F32, device=device)
    p = float(norm_type)
    dev = tensors[0].device if device is None else device
    with torch.no_grad():
        if uniform:
            t0 = tensors[0]
            try:
                v = _group_norms(tensors, t0.device, t0.dtype, p, True, False, check, wide, rtol)[1]
                return v if t0.device == dev else v.to(dev, non_blocking=dev.type != "cpu")
            except (TypeError, RuntimeError):   # not dense after all: group below
                pass
        grouped = groups(tensors)
        plain = all(map(_PLAIN_TYPES.__contains__, map(type, tensors)))  # C-level loop
        if len(grouped) == 1 and (plain or not any(map(is_dtensor, tensors))):
            ((gdev, dtype), idx), = grouped.items()
            if len(idx) == len(tensors):  # the usual case: one device, one dtype, all dense
                v = _group_norms(tensors, gdev, dtype, p, None, False, check, wide, rtol)[1]
                return v if gdev == dev else v.to(dev, non_blocking=dev.type != "cpu")
        v = _stack([n.to(dev, non_blocking=dev.type != "cpu")
                    for n in _grad_norms(list(tensors), p, None)])
        return v.to(F64) if wide else v


def total_norm(norms: list[Tensor], norm_type: float = 2.0) -> Tensor:
    """The norm of the vector of per-tensor norms: the norm of all tensors as one vector.

    On the first norm's device; float64 if any norm is, else float32. Combined in float64
    (a float32 sum of squares of two 1e20 norms would overflow), except on MPS. With no
    norms, ``tensor(0.)``. DTensor norms from :func:`grad_norms` are already full norms.

    Example:
        >>> float(total_norm([torch.tensor(3.0), torch.tensor(4.0)]))
        5.0
    """
    p = check_norm_type(norm_type)
    if not norms:
        return torch.tensor(0.0)
    with torch.no_grad():
        v = _stack(norms)
        out = F64 if v.dtype == F64 else F32
        return torch.linalg.vector_norm(v.to(wide_dtype(v.device)), p).to(out)


def _stack(norms: list[Tensor]) -> Tensor:
    """The 0-d norms as one vector on the first one's device (one op, as they all are
    when the gradients share a device; stack promotes float32 + float64 to float64)."""
    try:
        return torch.stack(norms)
    except RuntimeError:               # several devices: bring each to the first one
        first = norms[0].device
        return torch.stack([n.to(first) for n in norms])


def wide_dtype(device: torch.device) -> torch.dtype:
    """float64, or float32 where the device has no float64 (MPS): for running sums and
    statistics that must not lose range.

    Example:
        >>> wide_dtype(torch.device("cpu"))
        torch.float64
    """
    return F32 if device.type == "mps" else F64
