"""Statistics of the full gradient when training runs on several processes (DDP, FSDP2).

The monitor computes every figure from what *this* process holds, then hands the
list of ``(name, tensor)`` parts to :class:`DistReducer` once per recorded step.
What each process holds depends on the wrapper:

* **DDP** (and any plain tensor under an active process group): after ``backward()``
  every rank holds the same averaged gradient, so per-parameter figures are taken
  from rank 0's copy (other ranks contribute 0 to sums) — bitwise what rank 0 saw.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and gradients are
  ``DTensor`` shards of the reduced gradient. Squared norms add across the shard
  mesh, max-abs values take the maximum. Along ``Replicate`` mesh dimensions
  (HSDP) only the replica at coordinate 0 contributes, so nothing is counted twice.

Losses, forward flags and activation figures are per rank: the recorded ``loss`` is
the mean over every loss noted on every rank (the loss of the global batch when the
ranks see equal batches); activation statistics are rank 0's own micro-batch.

How each part combines is declared, not known here by name: a parameter figure says it
in its ``reduce`` field (:data:`collectors.PARAM_FIGURES`), the few other parts in
:data:`STEP_PARTS` (the loss is a mean, the forward and backward flags stay per rank);
:func:`part_rules` merges the two. Adding a statistic to ``collectors.py`` needs no edit
here.

Collectives (the choice, and why): per recorded step exactly **two all-reduces**,
issued together and awaited together — one ``SUM`` (float64) over every ``"sum"`` part
and the loss sum and count, one ``MAX`` over every ``"max"`` part, a NaN marker per
value and one slot per rank saying what that rank saw go non-finite.
Each buffer's length depends only on the model, the declarations and the world size
(so ranks can never disagree on sizes and hang), and the traffic is O(parameters), not
O(parameters x ranks) as an all-gather would be. NaN is sent as ``+inf`` plus its
marker, because not every backend's ``MAX`` propagates NaN. Nothing is exchanged on
steps that record nothing. (A parameter whose reduced gradient is non-finite reads a
non-finite count of 1: counting every shard's entries would take a third collective.)

The trace is written by rank 0 alone; other ranks keep an in-memory trace and feed
no sinks. The trace's ``nonfinite`` events carry ``ranks`` and ``first_rank``.

Usage, in a script launched with ``torchrun --nproc_per_node=2 train.py`` (nothing
changes on the gradtrace side; the figures equal a single-process run on the global
batch)::

    dist.init_process_group("gloo")
    model = DistributedDataParallel(net)          # or fully_shard(net)
    with gt.watch(model, opt, out="runs/ddp") as mon:
        ...

Example (without a process group, nothing is attached):
    >>> attach(model, list(model.parameters())) is None
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import collectors

F32 = torch.float32

# Bits of the per-rank "what went non-finite here" code carried in the MAX buffer.
NF_FORWARD, NF_BACKWARD, NF_LOSS, NF_GRAD = 1, 2, 4, 8
_NF_NAMES = {NF_FORWARD: "forward", NF_BACKWARD: "backward", NF_LOSS: "loss", NF_GRAD: "grad"}

#: How a part may combine across ranks: added up (float64), largest (NaN kept), the mean
#: of every value on every rank, or this rank's own.
HOWS = ("sum", "max", "mean", "local")


@dataclass(frozen=True)
class PartRule:
    """How one named part of a step's buffer combines across ranks.

    ``per_param``: one value per watched parameter of the step (``"sum"`` and ``"max"``
    need it: their buffer slots are fixed by the model, so ranks never disagree on
    sizes; a rank's empty shard must give the operation's identity, 0 for a sum or for a
    max of absolute values). ``nonfinite``: the ``NF_*`` bit a non-finite value in this
    part sets in the rank's code.

    Example:
        >>> PartRule("mean", nonfinite=NF_LOSS).how
        'mean'
        >>> PartRule("min")
        Traceback (most recent call last):
        ...
        ValueError: how must be one of ('sum', 'max', 'mean', 'local'), got 'min'
    """

    how: str
    per_param: bool = False
    nonfinite: int = 0

    def __post_init__(self) -> None:
        if self.how not in HOWS:
            raise ValueError(f"how must be one of {HOWS}, got {self.how!r}")
        if self.how in ("sum", "max") and not self.per_param:
            raise ValueError(f"a {self.how!r} part must be per_param=True (its size must not "
                             "depend on the rank)")


#: The parts that are not :data:`collectors.PARAM_FIGURES`: the monitor's update, post-clip
#: total and losses, the hooks' forward and backward flags. A part named nowhere is this
#: rank's own (activation figures: rank 0's micro-batch).
STEP_PARTS: dict[str, PartRule] = {
    "dsq": PartRule("sum", per_param=True),         # squared norm of the update (update ratio)
    "post": PartRule("local"),                      # the post-clip total is already global
    "loss": PartRule("mean", nonfinite=NF_LOSS),
    "flag": PartRule("local", nonfinite=NF_FORWARD),
    "bwd": PartRule("local", nonfinite=NF_BACKWARD),
}


def part_rules(figures: tuple | None = None) -> dict[str, PartRule]:
    """Every declared part's rule: each parameter figure's own ``reduce``, then
    :data:`STEP_PARTS`. A non-finite value in an every-step parameter figure sets the
    ``grad`` bit (the figures every recorded step reads, so the code does not depend on
    whether the step records activations).

    Example:
        >>> r = part_rules()
        >>> r["gsq"], r["gmax"].how, r["loss"].how
        (PartRule(how='sum', per_param=True, nonfinite=8), 'max', 'mean')
    """
    figures = collectors.PARAM_FIGURES if figures is None else figures
    rules: dict[str, PartRule] = {}
    for fig in figures:
        if fig.reduce not in ("sum", "max"):
            raise ValueError(f"figure {fig.stat!r}: reduce must be 'sum' or 'max' (a per-parameter "
                             f"value across shards and ranks), got {fig.reduce!r}")
        if fig.part in rules or fig.part in STEP_PARTS:
            raise ValueError(f"part {fig.part!r} of figure {fig.stat!r} is declared twice")
        rules[fig.part] = PartRule(fig.reduce, per_param=True,
                                   nonfinite=NF_GRAD if fig.every_step else 0)
    rules.update(STEP_PARTS)
    return rules


class _Layout:
    """Where each declared part sits in the SUM and MAX buffers (fixed by the model)."""

    def __init__(self, figures: tuple, rules: dict[str, PartRule], n: int, world: int):
        self.figures, self.rules, self.slot = figures, rules, {}
        n_sum = n_max = 0
        for name, rule in rules.items():
            if rule.how == "sum":
                self.slot[name], n_sum = n_sum, n_sum + n
            elif rule.how == "mean":                    # the sum of the values, their count
                self.slot[name], n_sum = n_sum, n_sum + 2
            elif rule.how == "max":                     # max|x| with NaN as +inf, NaN marker
                self.slot[name], n_max = n_max, n_max + 2 * n
        self.n_sum, self.code, self.n_max = n_sum, n_max, n_max + world


def _dist():
    import torch.distributed as dist
    return dist


def is_active() -> bool:
    """True when a ``torch.distributed`` process group with more than one rank is up.

    Example:
        >>> is_active()
        False
    """
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group).

    Example:
        >>> rank()
        0
    """
    return _dist().get_rank() if is_active() else 0


def is_dtensor(t: Any) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (FSDP2 parameters and gradients).

    Example:
        >>> is_dtensor(torch.zeros(2))
        False
    """
    return hasattr(t, "to_local") and hasattr(t, "placements") and hasattr(t, "device_mesh")


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor; any other tensor unchanged.

    Example:
        >>> local(torch.ones(3)).shape
        torch.Size([3])
    """
    return t.to_local() if is_dtensor(t) else t


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a ``DistributedDataParallel`` wrapper (names then match
    a single-process run: ``0.weight``, not ``module.0.weight``).

    Example:
        >>> unwrap(nn.Linear(2, 2)).__class__.__name__
        'Linear'
    """
    from torch.nn.parallel import DistributedDataParallel
    return model.module if isinstance(model, DistributedDataParallel) else model


def _contributes(p: torch.Tensor, my_rank: int) -> bool:
    """Whether this rank's copy of ``p`` adds into cross-rank sums (one copy per shard)."""
    if not is_dtensor(p):
        return my_rank == 0                  # replicated (DDP): rank 0's copy stands for all
    coord = p.device_mesh.get_coordinate()
    if coord is None:                        # this rank is not on the parameter's mesh
        return False
    for dim, placement in enumerate(p.placements):
        if not placement.is_shard() and coord[dim] != 0:
            return False                     # a replica (Replicate/Partial) other than the first
    return True


def _mode(model: nn.Module, params: list[torch.Tensor]) -> str:
    from torch.nn.parallel import DistributedDataParallel
    if any(is_dtensor(p) for p in params):
        return "fsdp2"
    if isinstance(model, DistributedDataParallel) or isinstance(getattr(model, "_orig_mod", None),
                                                                DistributedDataParallel):
        return "ddp"
    return "replicated"


class DistReducer:
    """Reduces one recorded step's figures across ranks (see the module docstring).

    The monitor creates one through :func:`attach`; you need not build it yourself. On
    every rank of a group, ``red.reduce([("gsq", sq), ("gmax", mx)], idx=[0, 1])`` gives
    the whole run's parts (``tests/test_distributed.py`` runs it on two processes).

    Example (it needs a process group of two or more ranks):
        >>> DistReducer(list(model.parameters()))
        Traceback (most recent call last):
        ...
        RuntimeError: DistReducer needs an initialised torch.distributed process group with world size > 1 (dist.init_process_group(...))
    """

    def __init__(self, params: list[torch.Tensor], *, model: nn.Module | None = None,
                 group: Any = None, device: torch.device | None = None):
        dist = _dist()
        if not is_active():
            raise RuntimeError("DistReducer needs an initialised torch.distributed process group "
                               "with world size > 1 (dist.init_process_group(...))")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        self.mode = _mode(model, params) if model is not None else (
            "fsdp2" if any(is_dtensor(p) for p in params) else "replicated")
        self.n = len(params)
        if device is None:
            device = (torch.device("cuda", torch.cuda.current_device())
                      if "nccl" in self.backend else torch.device("cpu"))
        self.device = device
        self._owner = torch.tensor([_contributes(p, dist.get_rank()) for p in params],
                                   dtype=torch.bool, device=device)
        self.collectives = 0                 # all-reduces issued so far (tests, benchmarks)
        self._lay: _Layout | None = None

    @property
    def is_writer(self) -> bool:
        """True on the rank that writes the trace and feeds the sinks (rank 0)."""
        return self.rank == 0

    def meta(self) -> dict[str, Any]:
        """What the trace's ``meta.json`` records about the distributed run.

        On two ranks over gloo, ``red.meta()["world_size"]`` is 2 and ``["backend"]`` is
        ``"gloo"``; a trace's ``meta.json`` carries it under ``distributed``.
        """
        return {"world_size": self.world_size, "backend": self.backend, "mode": self.mode,
                "writer_rank": 0, "reduction": "sum+max all-reduce per recorded step",
                "activations": "rank 0's micro-batch", "loss": "mean over all ranks"}

    # ---- the per-step reduction -------------------------------------------------------
    def reduce(self, parts: list[tuple[str, torch.Tensor]], idx: list[int] | None = None
               ) -> list[tuple[str, torch.Tensor]]:
        """Turn this rank's parts into the parts of the whole run (same names and sizes).

        Each part combines as :func:`part_rules` declares it: per-parameter parts are
        aligned with ``idx`` (the watched-parameter indices of the step), ``"sum"`` ones
        come back float64, ``"max"`` ones in their own dtype, a ``"mean"`` part as one
        value; an undeclared part is this rank's own. A ``dist_ranks`` part (one
        non-finite code per rank) is appended for :meth:`nonfinite_info`. Every rank
        calls it on the same recorded step (the class docstring shows a call).
        """
        dist = _dist()
        lay = self._layout()
        dev, n = self.device, self.n
        # A DTensor part (e.g. a clipper's total norm over FSDP2 shards) becomes the full
        # value; every rank holds the same parts, so every rank joins this collective.
        parts = [(k, t.full_tensor() if is_dtensor(t) else t) for k, t in parts]
        out_dev = next((t.device for _, t in parts), dev)
        where = torch.tensor(idx if idx is not None else [], dtype=torch.long, device=dev)
        owner = self._owner[where]
        m = where.numel()
        F64 = torch.float64
        zero = torch.zeros((), dtype=F64, device=dev)
        # float64 for both buffers: squares of norms below ~1e-19 would underflow in
        # float32, and a float32 maximum is exact in float64 (it comes back in its dtype).
        sums = torch.zeros(lay.n_sum, dtype=F64, device=dev)
        maxes = torch.zeros(lay.n_max, dtype=F64, device=dev)
        code = zero.clone()
        for name, t in parts:
            rule = lay.rules.get(name)
            if rule is None:
                continue
            if rule.nonfinite:
                code = code + rule.nonfinite * (~torch.isfinite(t).all()).to(F64)
            at = lay.slot.get(name)
            if at is None:                               # "local": this rank's own
                continue
            if rule.how == "mean":
                if t.numel():
                    v = t.to(dev, F64).reshape(-1)
                    sums[at] = v.sum()
                    sums[at + 1] = float(v.numel())
                continue
            if not m:
                continue
            v = t.to(dev, F64).reshape(-1)
            if v.numel() != m:
                raise ValueError(f"part {name!r} has {v.numel()} values for {m} parameters "
                                 f"(a per-parameter part must have one per entry of idx)")
            if rule.how == "sum":
                sums[at + where] = torch.where(owner, v, zero)    # where(): 0*NaN would be NaN
            else:
                # Not every backend's MAX propagates NaN: send +inf and a marker.
                nan = torch.isnan(v)
                maxes[at + where] = torch.where(nan, torch.full_like(v, float("inf")), v)
                maxes[at + n + where] = nan.to(F64)
        maxes[lay.code + self.rank] = code

        h1 = dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        h2 = dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        h1.wait()
        h2.wait()
        self.collectives += 2

        out: list[tuple[str, torch.Tensor]] = []
        for name, t in parts:
            rule = lay.rules.get(name)
            how = rule.how if rule is not None else "local"
            at = lay.slot.get(name, 0)
            if how == "sum":
                t = sums[at + where]
            elif how == "max":
                t = torch.where(maxes[at + n + where] > 0, torch.full((m,), float("nan"), dtype=F64,
                                                                     device=dev),
                                maxes[at + where]).to(t.dtype)
            elif how == "mean" and t.numel():
                t = (sums[at] / sums[at + 1]).reshape(1)
            out.append((name, t.to(out_dev)))
        out.append(("dist_ranks", maxes[lay.code:].to(out_dev, torch.float32)))
        return out

    def _layout(self) -> "_Layout":
        """Slots of each declared part in the two buffers (rebuilt if the figures change)."""
        figs = collectors.PARAM_FIGURES
        if self._lay is None or self._lay.figures is not figs:
            self._lay = _Layout(figs, part_rules(figs), self.n, self.world_size)
        return self._lay

    @staticmethod
    def nonfinite_info(host: dict) -> dict[str, Any]:
        """From the reduced step: which ranks saw a non-finite value, and the first of them.

        ``first_rank`` is the lowest rank whose own forward, backward or loss went
        non-finite; when no rank's did (only gradient shards did), the lowest rank whose
        gradient shard held one. Empty when everything was finite.

        Example:
            >>> DistReducer.nonfinite_info({"dist_ranks": [0.0, 5.0]})
            {'ranks': [1], 'first_rank': 1, 'by_rank': {'1': ['forward', 'loss']}}
        """
        codes = [int(round(float(c))) for c in host.get("dist_ranks", [])]
        origin = [r for r, c in enumerate(codes) if c & (NF_FORWARD | NF_BACKWARD | NF_LOSS)]
        ranks = origin or [r for r, c in enumerate(codes) if c]
        if not ranks:
            return {}
        by_rank = {str(r): [name for bit, name in _NF_NAMES.items() if codes[r] & bit] for r in ranks}
        return {"ranks": ranks, "first_rank": min(ranks), "by_rank": by_rank}


def attach(model: nn.Module, params: list[torch.Tensor]) -> DistReducer | None:
    """A :class:`DistReducer` for ``params`` when a multi-rank process group is active, else None.

    Example:
        >>> attach(nn.Linear(2, 2), []) is None      # no process group here
        True
    """
    if not is_active():
        return None
    return DistReducer(params, model=model)
