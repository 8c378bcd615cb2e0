"""Statistics of the full gradient when training runs on several processes (DDP, FSDP2).

The monitor computes every figure from what *this* process holds, then hands the
list of ``(name, tensor)`` parts to :class:`DistReducer` once per recorded step.
What each process holds depends on the wrapper:

* **DDP** (and any plain tensor under an active process group): after ``backward()``
  every rank holds the same averaged gradient, so per-parameter figures are taken
  from rank 0's copy (other ranks contribute 0 to sums) — bitwise what rank 0 saw.
* **FSDP2** (``torch.distributed.fsdp.fully_shard``): parameters and gradients are
  ``DTensor`` shards of the reduced gradient. Squared norms add across the shard
  mesh, max-abs values take the maximum, non-finite counts add. Along ``Replicate``
  mesh dimensions (HSDP) only the replica at coordinate 0 contributes, so nothing
  is counted twice.

Losses, forward flags and activation figures are per rank: the recorded ``loss`` is
the mean over every loss noted on every rank (the loss of the global batch when the
ranks see equal batches); activation statistics are rank 0's own micro-batch.

Collectives (the choice, and why): per recorded step exactly **two all-reduces**,
issued together and awaited together — one ``SUM`` over a flat buffer of squared
norms and loss sums, one ``MAX`` over a flat buffer of max-abs values, a NaN marker
per parameter and one slot per rank saying what that rank saw go non-finite.
Each buffer's length depends only on the model and the world size (so ranks can
never disagree on sizes and hang), and the traffic is O(parameters), not
O(parameters x ranks) as an all-gather would be. NaN is sent as ``+inf`` plus its
marker, because not every backend's ``MAX`` propagates NaN. Nothing is exchanged
on steps that record nothing. A third, tiny ``SUM`` runs only on a step where a
gradient norm came out non-finite, to add up the per-shard non-finite counts.

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

from typing import Any

import torch
from torch import nn

F32 = torch.float32

# Bits of the per-rank "what went non-finite here" code carried in the MAX buffer.
NF_FORWARD, NF_BACKWARD, NF_LOSS, NF_GRAD = 1, 2, 4, 8
_NF_NAMES = {NF_FORWARD: "forward", NF_BACKWARD: "backward", NF_LOSS: "loss", NF_GRAD: "grad"}


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

        ``idx`` lists the watched-parameter indices the per-parameter parts
        (``gsq``, ``gmax``, ``psq``, ``dsq``) are aligned with. A ``dist_ranks`` part
        (one non-finite code per rank) is appended for :meth:`nonfinite_info`. Every rank
        calls it on the same recorded step (the class docstring shows a call).
        """
        dist = _dist()
        dev, n, w = self.device, self.n, self.world_size
        # A DTensor part (e.g. a clipper's total norm over FSDP2 shards) becomes the full
        # value; every rank holds the same parts, so every rank joins this collective.
        parts = [(k, t.full_tensor() if is_dtensor(t) else t) for k, t in parts]
        got = dict(parts)
        out_dev = next((t.device for _, t in parts), dev)
        where = torch.tensor(idx if idx is not None else [], dtype=torch.long, device=dev)
        owner = self._owner[where]
        zero = torch.zeros((), dtype=F32, device=dev)

        # SUM buffer: [gsq | psq | dsq] in per-parameter slots, then loss sum and count.
        # float64: squares of norms below ~1e-19 would underflow in float32.
        sums = torch.zeros(3 * n + 2, dtype=torch.float64, device=dev)
        for k, name in enumerate(("gsq", "psq", "dsq")):
            if name in got and where.numel():
                v = got[name].to(dev, torch.float64).reshape(-1)
                sums[k * n + where] = torch.where(owner, v, zero.double())  # where(): 0*NaN would be NaN
        losses = got.get("loss")
        if losses is not None and losses.numel():
            lv = losses.to(dev, torch.float64).reshape(-1)
            sums[3 * n] = lv.sum()
            sums[3 * n + 1] = float(lv.numel())

        # MAX buffer: [max|g| with NaN as +inf | NaN marker] per parameter, then one code per rank.
        maxes = torch.zeros(2 * n + w, dtype=F32, device=dev)
        if "gmax" in got and where.numel():
            g = got["gmax"].to(dev, F32).reshape(-1)
            nan = torch.isnan(g)
            maxes[where] = torch.where(nan, torch.full_like(g, float("inf")), g)
            maxes[n + where] = nan.to(F32)
        code = zero.clone()
        bad = lambda t: (~torch.isfinite(t.to(dev, F32).sum())).to(F32)  # noqa: E731
        if "flag" in got:
            code = code + NF_FORWARD * bad(got["flag"])
        if "bwd" in got:
            code = code + NF_BACKWARD * bad(got["bwd"])
        if losses is not None and losses.numel():
            code = code + NF_LOSS * bad(losses)
        if "gsq" in got:
            code = code + NF_GRAD * bad(got["gsq"])
        maxes[2 * n + self.rank] = code

        h1 = dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        h2 = dist.all_reduce(maxes, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        h1.wait()
        h2.wait()
        self.collectives += 2

        out: list[tuple[str, torch.Tensor]] = []
        for name, t in parts:
            if name in ("gsq", "psq", "dsq"):
                k = ("gsq", "psq", "dsq").index(name)
                t = sums[k * n + where]
            elif name == "gmax":
                t = torch.where(maxes[n + where] > 0, torch.full_like(maxes[where], float("nan")),
                                maxes[where])
            elif name == "loss":
                t = (sums[3 * n] / sums[3 * n + 1]).reshape(1)
            out.append((name, t.to(out_dev)))
        out.append(("dist_ranks", maxes[2 * n:].to(out_dev)))
        return out

    def nonfinite_counts(self, counts: list[int], params: list[int]) -> list[int]:
        """Add per-shard non-finite counts of the watched parameters ``params`` across ranks.

        Called only on a step where a reduced norm came out non-finite; every rank sees
        the same reduced norms, so every rank calls it together.
        With 3 non-finite entries on this rank's shard of parameter 0 and 4 on the other
        rank's, ``red.nonfinite_counts([3], [0])`` returns ``[7]`` on both.
        """
        dist = _dist()
        c = torch.tensor(counts, dtype=torch.float64, device=self.device)
        c = torch.where(self._owner[torch.tensor(params, dtype=torch.long, device=self.device)],
                        c, torch.zeros_like(c))
        dist.all_reduce(c, op=dist.ReduceOp.SUM, group=self.group)
        self.collectives += 1
        return [int(v) for v in c.tolist()]

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
