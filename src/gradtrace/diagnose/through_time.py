"""Gradients vanishing or exploding through time in RNN/LSTM/GRU layers."""
from __future__ import annotations

import math

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from .thresholds import Thresholds


def _time_profiles(trace: Trace) -> dict[str, list[tuple[int, np.ndarray]]]:
    if not U.has_stat(trace, "time_grad_norm"):
        return {}
    out: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name in trace.names("time_grad_norm"):
        steps, arr = trace.series("time_grad_norm", name, with_steps=True)
        out[name] = [(int(s), np.asarray(v, dtype=np.float64)) for s, v in zip(steps.tolist(), arr)]
    return out


def detect(trace: Trace, th: Thresholds) -> list[Finding]:
    """``vanishing_through_time`` / ``exploding_through_time`` from ``time_grad_norm``
    (the gradient reaching each input time step of a recurrent layer; record it with
    ``gt.watch(..., time_gradients=True)``).

    Per step the ratio earliest / latest time-step gradient is compared with
    ``th.time_vanish_ratio`` and ``th.time_explode_ratio``; the rule must persist
    (:func:`~gradtrace.diagnose._util.persistent`). The evidence ratio is the median over the flagged
    steps, and the per-step gain is that ratio to the power ``1 / (T - 1)``. Only meaningful when
    the loss depends on the sequence mainly through its end (a per-step loss adds a
    local gradient at every time step and flattens the profile).

    Example:
        >>> detect(gt.load("runs/exp1"), Thresholds())   # no recurrent layer
        []
    """
    out = []
    per_kind: dict[str, list[tuple[str, dict, int, int]]] = {}
    for name, lst in _time_profiles(trace).items():
        logr, steps = [], []
        T = 0
        for step, v in lst:
            if v.size < 2 or not np.all(np.isfinite(v)):
                continue
            T = v.size
            v = np.maximum(v, th.floor)
            logr.append(math.log(v[0] / v[-1]))
            steps.append(step)
        if not logr:
            continue
        arr = np.array(logr)
        for kind, hit in (("vanishing_through_time", arr < math.log(th.time_vanish_ratio)),
                          ("exploding_through_time", arr > math.log(th.time_explode_ratio))):
            flagged = U.persistent(hit, th)
            if not flagged.any():
                continue
            med = float(np.median(arr[hit]))
            ratio = math.exp(med)
            gain = math.exp(med / (T - 1))
            hs = [s for s, h in zip(steps, flagged) if h] + [s for s, h in zip(steps, hit) if h][-1:]
            ev = {"ratio": ratio, "per_step_gain": gain, "time_steps": T, "resolved": not bool(hit[-1]),
                  "steps_flagged": int(hit.sum()), "steps_examined": int(hit.size),
                  "summary": (f"{name}: the gradient reaching time step 0 is {U.sci(ratio)} of the one "
                              f"reaching step {T - 1}; each step back multiplies it by about {U.sci(gain)}")}
            per_kind.setdefault(kind, []).append((name, ev, hs[0], hs[-1]))
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
                    f"about {U.sci(ev0['per_step_gain'])} here, so the model cannot learn "
                    "dependencies that span many steps.")
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
