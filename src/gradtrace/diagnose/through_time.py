"""Gradients vanishing or exploding through time in RNN/LSTM/GRU layers."""
from __future__ import annotations

import math

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from .thresholds import Thresholds


def _log_ratios(trace: Trace, name: str, th: Thresholds) -> tuple[np.ndarray, np.ndarray, int]:
    """``(steps, log(earliest / latest time-step gradient), T)`` over the finite profiles."""
    steps, arr = trace.series("time_grad_norm", name, with_steps=True)
    keep, logr, T = [], [], 0
    for s, v in zip(steps.tolist(), arr):
        v = np.asarray(v, dtype=np.float64)
        if v.size < 2 or not np.all(np.isfinite(v)):
            continue
        T = v.size
        v = np.maximum(v, th.floor)
        keep.append(int(s))
        logr.append(math.log(v[0] / v[-1]))
    return np.asarray(keep, dtype=np.int64), np.asarray(logr), T


def layer_movement(trace: Trace, module: str) -> tuple[np.ndarray, np.ndarray] | None:
    """How far ``module``'s parameters travelled, as a fraction of their norm: ``(steps,
    per_step)`` where ``per_step[r]`` is the module's update ``||dW|| / ||W||`` (all its
    parameters as one vector) at update record ``r``, or ``None`` when the trace has no
    ``update_ratio`` for it.

    Example:
        >>> steps, per = layer_movement(gt.load("runs/exp1"), "0")   # Linear "0": weight and bias
        >>> len(steps) > 0 and bool((per > 0).all() and (per < 1).all())
        True
    """
    if not (U.has_stat(trace, "update_ratio") and U.has_stat(trace, "param_norm")):
        return None
    params = [p for p in trace.params if trace.owner(p) == module]
    if not params:
        return None
    steps, _, ur = trace.matrix("update_ratio", params)
    _, _, pn = trace.matrix("param_norm", params, steps=steps.tolist())
    if pn.shape != ur.shape:
        return None
    with np.errstate(invalid="ignore"):
        ok = np.isfinite(ur) & np.isfinite(pn)
        upd = np.where(ok, ur * pn, 0.0)
        norm = np.where(ok, pn, 0.0)
        den = np.sqrt(np.sum(norm ** 2, axis=1))
        per = np.where(den > 0, np.sqrt(np.sum(upd ** 2, axis=1)) / np.where(den > 0, den, 1.0), np.nan)
    good = np.isfinite(per)
    if not good.any():
        return None
    return steps[good], per[good]


def _path(move: tuple[np.ndarray, np.ndarray] | None, at: np.ndarray) -> np.ndarray:
    """Path length of the relative updates applied before each step in ``at`` (summed
    ``||dW|| / ||W||``); each update record stands for the steps until the next record, as
    update ratios may be recorded only every few steps. All ``inf`` without records."""
    at = np.asarray(at, dtype=np.float64)
    if move is None:
        return np.full(at.shape, math.inf)      # nothing to judge by: the profile decides
    steps, per = move
    steps = steps.astype(np.float64)
    width = np.append(np.diff(steps), 1.0)
    before = np.concatenate([[0.0], np.cumsum(per * width)])
    r = np.searchsorted(steps, at, side="left") - 1       # last record strictly before
    rr = np.clip(r, 0, None)
    part = per[rr] * np.minimum(at - steps[rr], width[rr])
    return np.where(r >= 0, before[rr] + part, 0.0)


def stuck(steps: np.ndarray, logr: np.ndarray, limit: float,
          move: tuple[np.ndarray, np.ndarray] | None, th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(out, moved)``: ``out[i]`` when record ``i`` ends a stretch of consecutive records
    whose log-ratio ``logr`` is below ``limit`` that is long enough to judge and is not
    recovering; ``moved[i]`` is how far the weights travelled over that stretch.

    Long enough: at least ``th.persist_window`` records, over which the layer's weights
    moved by at least ``th.time_min_movement`` of their norm (a profile the optimizer has
    not yet had the chance to change says nothing about whether it can). Not recovering:
    the least-squares trend of the log-ratio over the stretch, carried forward as many steps
    as the stretch has lasted, is still below ``limit``. A ratio that is climbing out of the
    range (gates learning to remember) is not a finding; a flat or worsening one is. Each
    ``out[i]`` uses records up to ``i`` only, so the live view and the final one agree.

    Example:
        >>> s = np.arange(8) * 10
        >>> flat, rising = np.full(8, -20.0), np.linspace(-20.0, -8.0, 8)
        >>> stuck(s, flat, math.log(1e-3), None, Thresholds())[0].tolist()
        [False, False, False, False, True, True, True, True]
        >>> bool(stuck(s, rising, math.log(1e-3), None, Thresholds())[0].any())
        False
    """
    logr = np.asarray(logr, dtype=np.float64)
    x = np.asarray(steps, dtype=np.float64)
    hit = logr < limit
    out = np.zeros(hit.size, dtype=bool)
    moved = np.full(hit.size, np.nan)
    path = _path(move, x)
    # prefix sums make each stretch's least-squares fit O(1) (x shifted for precision)
    xs = x - (x[0] if x.size else 0.0)
    c = [np.concatenate([[0.0], np.cumsum(v)]) for v in (np.ones_like(xs), xs, logr, xs * xs, xs * logr)]
    start = 0
    for i in range(hit.size):
        if not hit[i]:
            start = i + 1
            continue
        if i - start + 1 < th.persist_window:
            continue
        n, sx, sy, sxx, sxy = (v[i + 1] - v[start] for v in c)
        var = sxx - sx * sx / n
        slope = (sxy - sx * sy / n) / var if var > 0 else 0.0
        fit_end = sy / n + slope * (xs[i] - sx / n)
        # the trend carried one stretch ahead: still below the limit = not getting out
        if fit_end + max(slope, 0.0) * (x[i] - x[start]) >= limit:
            continue
        moved[i] = path[i] - path[start] if move is not None else math.inf
        out[i] = moved[i] >= th.time_min_movement
    return out, moved


def detect(trace: Trace, th: Thresholds) -> list[Finding]:
    """``vanishing_through_time`` / ``exploding_through_time`` from ``time_grad_norm``
    (the gradient reaching each input time step of a recurrent layer; record it with
    ``gt.watch(..., time_gradients=True)``).

    Per record the ratio earliest / latest time-step gradient is compared with
    ``th.time_vanish_ratio`` and ``th.time_explode_ratio``. Exploding must persist
    (:func:`~gradtrace.diagnose._util.persistent`): its damage is fast. Vanishing is slow
    damage (the long dependency is never learnt), so it may wait until it is clear: it
    must hold over a stretch the optimizer had the chance to change and show no trend out
    of it (:func:`stuck`); a gated cell at initialisation forgets quickly and learns to
    remember within tens of steps, and that is how it should train. The evidence ratio is
    the median over the flagged stretch, and the per-step gain is that ratio to the power
    ``1 / (T - 1)``. Only meaningful when the loss depends on the sequence mainly through
    its end (a per-step loss adds a local gradient at every time step and flattens the
    profile).

    Example:
        >>> detect(gt.load("runs/exp1"), Thresholds())   # no recurrent layer
        []
    """
    if not U.has_stat(trace, "time_grad_norm"):
        return []
    per_kind: dict[str, list[tuple[str, dict, int, int]]] = {}
    for name in trace.names("time_grad_norm"):
        steps, arr, T = _log_ratios(trace, name, th)
        if arr.size == 0:
            continue
        van, moved = stuck(steps, arr, math.log(th.time_vanish_ratio), layer_movement(trace, name), th)
        exp_hit = arr > math.log(th.time_explode_ratio)
        for kind, hit, flagged in (("vanishing_through_time", arr < math.log(th.time_vanish_ratio), van),
                                   ("exploding_through_time", exp_hit, U.persistent(exp_hit, th))):
            if not flagged.any():
                continue
            i0 = int(np.flatnonzero(flagged)[0])
            if kind == "vanishing_through_time":
                # the stretch that first qualified: its records are the evidence
                j = i0
                while j > 0 and hit[j - 1]:
                    j -= 1
                sel = np.zeros(hit.size, dtype=bool)
                sel[j: i0 + 1] = True
                sel |= flagged
            else:
                sel = hit
            med = float(np.median(arr[sel]))
            ratio = math.exp(med)
            gain = math.exp(med / (T - 1))
            ev = {"ratio": ratio, "per_step_gain": gain, "time_steps": T, "resolved": not bool(hit[-1]),
                  "steps_flagged": int(hit.sum()), "steps_examined": int(hit.size),
                  "summary": (f"{name}: the gradient reaching time step 0 is {U.sci(ratio)} of the one "
                              f"reaching step {T - 1}; each step back multiplies it by about {U.sci(gain)}")}
            if kind == "vanishing_through_time" and math.isfinite(moved[i0]):
                ev["weights_moved"] = float(moved[i0])
                ev["summary"] += (f", and it did not improve from step {int(steps[j])} to {int(steps[i0])} "
                                  f"while the layer's weights moved {U.sci(moved[i0])} of their norm")
            per_kind.setdefault(kind, []).append((name, ev, int(steps[i0]), int(steps[hit][-1])))
    out = []
    for kind, items in per_kind.items():
        items.sort(key=lambda it: it[1]["ratio"] if kind.startswith("vanishing") else -it[1]["ratio"])
        layers = [it[0] for it in items]
        ev0 = items[0][1]
        evidence = {"per_layer": {it[0]: {k: v for k, v in it[1].items() if k != "summary"} for it in items},
                    "ratio_earliest_to_latest": ev0["ratio"], "per_step_gain": ev0["per_step_gain"],
                    "time_steps": ev0["time_steps"], "resolved": all(it[1]["resolved"] for it in items),
                    "summary": "; ".join(it[1]["summary"] for it in items)}
        T = ev0["time_steps"]
        if kind == "vanishing_through_time":
            expl = ("An RNN applies the same transition at every time step, so a sequence of "
                    f"{T} steps is a {T}-layer network with shared weights. The gradient reaching "
                    f"early inputs is a product of {T - 1} step Jacobians, each shrinking it by "
                    f"about {U.sci(ev0['per_step_gain'])} here, and training is not changing that, "
                    "so the model cannot learn dependencies that span many steps.")
            sev = "warning"
        else:
            expl = ("An RNN applies the same transition at every time step, so a sequence of "
                    f"{T} steps is a {T}-layer network with shared weights. When the recurrent "
                    "Jacobian amplifies, the gradient reaching early inputs grows by about "
                    f"{U.sci(ev0['per_step_gain'])} per step back, {U.sci(ev0['ratio'])} in all: "
                    "updates become huge and training unstable.")
            sev = "error"
        out.append(Finding(kind, sev, layers, min(it[2] for it in items), max(it[3] for it in items),
                           evidence, expl, []))
    return out
