"""Record building: one step's host values and bookkeeping become the trace's record dict.

Input: ``host`` maps each part name of the step's flat buffer to its numpy slice (already
reduced across ranks), and a :class:`StepInfo` says what the hooks saw. Output: the record
``{"step", "time", "exec_order"?, "scalars", "param", "module", "vectors"?}`` (see
``docs/trace-format.md``) and, when something was non-finite, the ``nonfinite`` event.
Per-name values are 1-D float64 arrays with :data:`~gradtrace.trace.MISSING` for a name
not recorded: the trace writer stores them without a Python float per value. A
gradient-only step (the common one) takes a short path with the same result; its
all-zero ``grad_nonfinite`` is one read-only array shared by those records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..trace import MISSING
from .collectors import PARAM_FIGURES
from .selection import SATURATION_BOUNDS

#: Parts of a gradient-only step's host values (squared gradient norms, the loss).
_GRAD_ONLY = frozenset(("gsq", "loss"))
_F64 = np.dtype(np.float64)


@dataclass
class StepInfo:
    """Host-side facts of one step, gathered while it ran (no tensors).

    Example:
        >>> StepInfo(step=0, time=0.0, idx=[0]).counts
        {}
    """

    step: int
    time: float
    idx: list[int]                             # watched parameters with a gradient
    losses: list[float] = field(default_factory=list)   # losses noted as Python numbers
    lr: float | None = None
    call_idx: list[int] = field(default_factory=list)
    acts: list[tuple[int, int, int]] = field(default_factory=list)
    order: list[int] = field(default_factory=list)
    seen: set[int] = field(default_factory=set)
    bwd: list[int] = field(default_factory=list)
    bwd_order: list[int] = field(default_factory=list)
    mask_ids: list[int] = field(default_factory=list)      # per mask row: module, -1 to skip
    mask_units: list[int] = field(default_factory=list)    # per mask row: its unit count
    time_ids: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)    # position -> non-finite entries
    counted: bool = False                      # counts were taken (else: at least one)
    replayed: str | None = None                # first non-finite module found by replay
    replay_note: str | None = None             # why no replay ran on a non-finite step


class Assembler:
    """Builds records for one monitor's watched names.

    Example:
        >>> a = Assembler(["w"], ["0"], [None])
        >>> rec, ev = a.build({"gsq": np.array([4.0])}, StepInfo(step=0, time=0.0, idx=[0]))
        >>> rec["param"]["grad_norm"].tolist(), rec["scalars"]["total_grad_norm"], ev
        ([2.0], 2.0, None)
    """

    def __init__(self, param_names: list[str], module_names: list[str], kinds: list[str | None]):
        self.param_names, self.module_names, self.kinds = param_names, module_names, kinds
        self._relu = np.array([k == "relu" for k in kinds], dtype=bool)
        self._sat = np.array([k in SATURATION_BOUNDS for k in kinds], dtype=bool)
        # Every gradient-only record's grad_nonfinite when all are finite: one read-only
        # array shared by those records (a consumer that wrote to it would get an error,
        # not change the others).
        self._no_nonfinite = np.zeros(len(param_names))
        self._no_nonfinite.flags.writeable = False

    def build(self, host: dict[str, np.ndarray], info: StepInfo,
              dist_info: dict | None = None) -> tuple[dict, dict | None]:
        """``(record, nonfinite event or None)`` of one step.

        A gradient-only step (squared gradient norms and at most the loss, everything
        finite) takes :meth:`_grad_only`, a handful of numpy calls; any other step, or
        one that finds something non-finite, the general path. Both give the same record.
        """
        if not dist_info and host.keys() <= _GRAD_ONLY and "gsq" in host and info.replayed is None:
            rec = self._grad_only(host, info)
            if rec is not None:
                return rec, None
        return self._build(host, info, dist_info)

    def _grad_only(self, host: dict[str, np.ndarray], info: StepInfo) -> dict | None:
        """The record of a gradient-only step, or None when something in it is not finite
        (the general path then names it). Kept to the fewest numpy calls: right after
        backward each one costs several times its isolated time (measured in the loop)."""
        gsq = host["gsq"]
        if gsq.dtype is not _F64:             # (``!=`` with a type converts it first: slower)
            gsq = gsq.astype(np.float64)
        total_sq = float(np.add.reduce(gsq))      # gsq.sum() without its Python wrapper
        # Squared norms are >= 0, so a finite sum means every one is finite (a nan or inf
        # anywhere makes it nan or inf): one reduction instead of an isfinite pass.
        if not 0.0 <= total_sq < math.inf:
            return None
        scalars = {"total_grad_norm": math.sqrt(total_sq)}
        loss = host.get("loss")
        if loss is not None and not loss.size:
            loss = None
        if loss is not None or info.losses:
            if loss is not None and loss.size == 1 and not info.losses:
                value = float(loss[0])
            else:                                # several losses: the general path's mean
                value = float(np.mean([float(v) for v in (() if loss is None else loss)] + list(info.losses)))
            if not math.isfinite(value):
                return None
            scalars["loss"] = value
        if info.lr is not None:
            scalars["lr"] = info.lr
        # sqrt makes a new array: ``host`` views a buffer the next step's copy reuses.
        if len(info.idx) == len(self.param_names):
            param = {"grad_norm": np.sqrt(gsq), "grad_nonfinite": self._no_nonfinite}
        else:
            where = np.asarray(info.idx, dtype=np.intp)
            norm = np.full(len(self.param_names), MISSING)
            norm[where] = np.sqrt(gsq)
            zero = norm.copy()
            zero[where] = 0.0
            param = {"grad_norm": norm, "grad_nonfinite": zero}
        return {"step": info.step, "time": info.time, "scalars": scalars, "param": param, "module": {}}

    def _build(self, host: dict[str, np.ndarray], info: StepInfo,
               dist_info: dict | None = None) -> tuple[dict, dict | None]:
        n_p, n_m = len(self.param_names), len(self.module_names)
        idx = info.idx
        rec: dict[str, Any] = {"step": info.step, "time": info.time}
        scalars: dict[str, Any] = {}
        param: dict[str, Any] = {}
        module: dict[str, Any] = {}
        vectors: dict[str, dict] = {}

        where = np.asarray(idx, dtype=np.intp)

        def scatter(values) -> np.ndarray:
            # A copy either way: ``host`` views a buffer the next step's copy reuses.
            if where.size == n_p:  # every parameter had a gradient
                return np.array(values, dtype=np.float64)
            col = np.full(n_p, MISSING)
            col[where] = values
            return col

        bad_params: list[str] = []
        if "gsq" in host:
            gsq = host["gsq"].astype(np.float64)
            for fig in PARAM_FIGURES:
                if fig.part in host:
                    param[fig.stat] = scatter(fig.decode(gsq if fig.part == "gsq" else host[fig.part]))
            broken = np.flatnonzero(~np.isfinite(gsq)).tolist()
            nonfinite = np.zeros(len(idx))
            for k in broken:
                nonfinite[k] = info.counts.get(k, 1)
            bad_params = [self.param_names[idx[k]] for k in broken if nonfinite[k] > 0]
            param["grad_nonfinite"] = scatter(nonfinite)
            total_sq = float(np.sum(gsq))
            scalars["total_grad_norm"] = math.sqrt(total_sq) if total_sq >= 0 else float("nan")
            if "dsq" in host and "psq" in host:
                pn = np.sqrt(host["psq"].astype(np.float64))
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.sqrt(host["dsq"].astype(np.float64)) / pn
                col = scatter(ratio)
                col[where[pn == 0]] = MISSING  # a zero weight (zero-initialised bias) has no relative update
                param["update_ratio"] = col
            if "post" in host:
                # The gradients changed between backward and the step (someone clipped or
                # scaled them): the optimizer saw this total.
                post = math.sqrt(max(float(host["post"][0]), 0.0)) if math.isfinite(host["post"][0]) \
                    else float(host["post"][0])
                scalars["total_grad_norm_post_clip"] = post
                pre = scalars["total_grad_norm"]
                scalars["grad_changed_ratio"] = post / pre if pre > 0 else (1.0 if post == 0 else math.inf)
        loss_vals = [float(v) for v in host.get("loss", [])] + list(info.losses)
        if loss_vals:
            scalars["loss"] = float(np.mean(loss_vals))
        if info.lr is not None:
            scalars["lr"] = info.lr

        first_fwd = None
        if "flag" in host:
            flags = host["flag"]
            nonfinite_mod = np.zeros(n_m, dtype=bool)
            nonfinite_mod[np.asarray(info.call_idx, dtype=np.intp)[~np.isfinite(flags)]] = True
            seen = np.fromiter(info.seen, dtype=np.intp, count=len(info.seen))
            col = np.full(n_m, MISSING)
            col[seen] = 0.0
            col[nonfinite_mod] = 1.0
            module["out_flag_nonfinite"] = col
            if nonfinite_mod.any():      # a Python walk only on a non-finite step
                first_fwd = next((self.module_names[i] for i in info.order if nonfinite_mod[i]), None)
            if len(info.acts):
                self._activations(host, flags, info, module, vectors)
        if first_fwd is None:
            first_fwd = info.replayed
        first_bwd = None
        if "bwd" in host:
            bwd = np.asarray(info.bwd, dtype=np.intp)
            sq = np.bincount(bwd, weights=np.square(host["bwd"].astype(np.float64)), minlength=n_m)
            col = np.full(n_m, MISSING)
            got = np.flatnonzero(np.bincount(bwd, minlength=n_m))
            col[got] = np.sqrt(sq[got])
            module["outgrad_norm"] = col
            if not np.isfinite(sq).all():
                first_bwd = next((self.module_names[i] for i in info.bwd_order if not math.isfinite(sq[i])), None)
        for i in info.time_ids:
            vectors.setdefault("time_grad_norm", {})[self.module_names[i]] = [float(v) for v in host[f"time{i}"]]

        rec["scalars"], rec["param"], rec["module"] = scalars, param, module
        if vectors:
            rec["vectors"] = vectors
        loss_bad = "loss" in scalars and not math.isfinite(scalars["loss"])
        dist_info = dist_info or {}
        event = None
        if first_fwd or first_bwd or bad_params or loss_bad or dist_info:
            event = {"event": "nonfinite", "step": info.step, "forward": first_fwd, "backward": first_bwd,
                     "params": bad_params, "loss_nonfinite": loss_bad, **dist_info}
            if info.replay_note and first_fwd is None:
                event["localisation"] = info.replay_note
        return rec, event

    def _activations(self, host: dict, flags: np.ndarray, info: StepInfo, module: dict,
                     vectors: dict) -> None:
        """Combine per-call figures into per-module ones (a module may run many times)."""
        n_m = len(self.module_names)
        acts = np.asarray(info.acts, dtype=np.int64).reshape(-1, 3)
        mod, n = acts[:, 1], acts[:, 2].astype(np.float64)
        mn, mx, norm, extra = (np.asarray(host[k], dtype=np.float64) for k in ("a_min", "a_max", "a_norm", "a_extra"))
        total = np.asarray(flags, dtype=np.float64)[acts[:, 0]]    # each call's sum of outputs
        calls = np.bincount(mod, minlength=n_m)
        entries = np.bincount(mod, weights=n, minlength=n_m)
        got = np.flatnonzero(calls)
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            mean = np.bincount(mod, weights=total, minlength=n_m) / np.maximum(entries, 1)
            # Sum of squared deviations over all calls of a module: each call's own plus
            # its entries times its mean's squared distance from the module's mean (exact
            # pooling). A module called once keeps its own figure untouched, so a nan sum
            # does not turn a finite spread into nan.
            between = n * np.square(total / n - mean[mod])
            between[calls[mod] == 1] = 0.0
            m2 = np.bincount(mod, weights=norm * norm + between, minlength=n_m)
            std = np.where(np.isfinite(m2), np.sqrt(m2 / np.maximum(entries, 1)), np.nan)
        bad = np.bincount(mod, weights=(~np.isfinite(total)).astype(np.float64), minlength=n_m)
        maxabs = np.zeros(n_m)
        with np.errstate(invalid="ignore"):
            np.maximum.at(maxabs, mod, np.maximum(np.abs(mn), np.abs(mx)))    # nan propagates
        active = np.bincount(mod, weights=extra, minlength=n_m)  # ReLU: active; sigmoid/tanh: saturated
        cols = {k: np.full(n_m, MISSING) for k in ("out_mean", "out_std", "out_maxabs", "out_nonfinite")}
        for k, v in (("out_mean", mean), ("out_std", std), ("out_maxabs", maxabs), ("out_nonfinite", bad)):
            cols[k][got] = v[got]
        module.update(cols)
        # nan > 0 is false: a non-finite output would read as dead or saturated units
        broken = bad > 0
        ok = np.zeros(n_m, dtype=bool)
        ok[got] = True
        ok &= ~broken
        relu = {k: np.full(n_m, MISSING) for k in ("zero_frac", "dead_units", "units", "unit_samples")}
        is_relu, is_sat = ok & self._relu, ok & self._sat
        relu["zero_frac"][is_relu] = 1.0 - active[is_relu] / entries[is_relu]
        if info.mask_ids:
            self._masks(host["masks"], info, broken, entries, relu, vectors)
        if is_relu.any():
            module.update(relu)
        if is_sat.any():
            sat = np.full(n_m, MISSING)
            sat[is_sat] = active[is_sat] / entries[is_sat]
            module["saturated_frac"] = sat

    def _masks(self, flat: np.ndarray, info: StepInfo, broken: np.ndarray, entries: np.ndarray,
               relu: dict, vectors: dict) -> None:
        """Per ReLU module: its active-unit mask (OR over its calls), dead units, packed
        masks; numpy over all rows of one unit count at once (no loop per module)."""
        mods = np.asarray(info.mask_ids, dtype=np.intp)
        units = np.asarray(info.mask_units, dtype=np.intp)
        start = np.concatenate(([0], np.cumsum(units)[:-1]))
        use = mods >= 0
        use[use] = ~broken[mods[use]]       # a non-finite output would read as dead units
        names, out = self.module_names, vectors.setdefault("active_mask", {})
        for u in np.unique(units[use]).tolist():     # one pass per distinct unit count
            rows = np.flatnonzero(use & (units == u))
            on = flat[start[rows, None] + np.arange(u)] > 0.5       # (rows, u)
            ids, inv = np.unique(mods[rows], return_inverse=True)
            if ids.size < rows.size:          # a module called several times: OR its calls
                acc = np.zeros((ids.size, u), dtype=bool)
                np.logical_or.at(acc, inv, on)
                on = acc
            else:
                on = on[np.argsort(inv)]
            n_on = on.sum(1)
            relu["dead_units"][ids] = u - n_on
            relu["units"][ids] = float(u)
            relu["unit_samples"][ids] = entries[ids] / u      # rows each unit saw this step
            packed = np.packbits(on, axis=1, bitorder="little")
            head = f"{u}:"
            out.update(zip([names[i] for i in ids.tolist()], [head + r.tobytes().hex() for r in packed]))
        if not out:
            del vectors["active_mask"]
