"""Where a ``nan``/``inf`` first appeared, and why (divergence, overflow, invalid op)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from . import headroom
from .thresholds import Thresholds

CAUSES = ("overflow", "divergence", "invalid_operation", "optimizer_step")


def _optimizer_step_origin(trace: Trace, step: int) -> dict | None:
    """Evidence that the optimizer step itself wrote the first nan/inf: at ``step`` some
    weights were already non-finite (``param_norm``, read before this step's update, i.e.
    the weights its forward used), or the previous step's update ratio was nan, while that
    previous step had finite gradients and a finite loss. ``None`` when that is not the
    case or the figures are missing (both are recorded on activation steps only)."""
    if not U.has_stat(trace, "grad_norm"):
        return None
    g = trace.matrix("grad_norm")
    prev = np.flatnonzero(g.steps < step)
    if prev.size == 0:
        return None
    k = prev[-1]
    bad: list[str] = []
    if U.has_stat(trace, "param_norm"):        # the weights this step's forward used
        m = trace.matrix("param_norm", steps=[step])
        if m.values.shape[0]:
            bad = [n for n, v, r in zip(m.names, m.values[0], m.recorded[0]) if r and not math.isfinite(v)]
    if not bad and U.has_stat(trace, "update_ratio"):   # the update of the step before: nan
        m = trace.matrix("update_ratio", steps=[int(g.steps[k])])
        if m.values.shape[0]:
            bad = [n for n, v, r in zip(m.names, m.values[0], m.recorded[0]) if r and np.isnan(v)]
    if not bad:
        return None
    rec = g.recorded[k]
    if not rec.any() or not np.all(np.isfinite(g.values[k][rec])):
        return None
    if U.has_stat(trace, "loss"):
        ls, lv = trace.scalar("loss", with_steps=True)
        at = lv[ls == g.steps[k]]
        if at.size and not np.isfinite(at[0]):
            return None
    return {"updated_at_step": int(g.steps[k]), "params_nonfinite_after_step": len(bad),
            "nonfinite_weights": bad[:20], "optimizer": trace.meta.get("optimizer")}


def _first_event(trace: Trace) -> dict | None:
    """The earliest ``nonfinite`` event; rebuilt from the records when a trace has none."""
    events = sorted(trace.events("nonfinite"), key=lambda e: e["step"])
    if events:
        return events[0]
    steps = trace.steps_recorded
    bad_p: dict[int, list[str]] = {}
    for stat in ("grad_nonfinite", "grad_norm"):
        if not U.has_stat(trace, stat):
            continue
        m = trace.matrix(stat)
        bad = (m.values > 0) if stat == "grad_nonfinite" else ~np.isfinite(m.values)
        bad &= m.recorded
        for r, j in zip(*np.nonzero(bad)):
            lst = bad_p.setdefault(int(m.steps[r]), [])
            if m.names[j] not in lst:
                lst.append(m.names[j])
    bad_m: dict[int, set[str]] = {}
    if U.has_stat(trace, "out_flag_nonfinite"):
        m = trace.matrix("out_flag_nonfinite")
        for r, j in zip(*np.nonzero(m.recorded & (np.nan_to_num(m.values) > 0))):
            bad_m.setdefault(int(m.steps[r]), set()).add(m.names[j])
    # a bad loss alone is loss_nonfinite's; the recorder's event says more
    hit = sorted(set(bad_p) | set(bad_m))
    if not hit:
        return None
    step = hit[0]
    loss_bad = False
    if U.has_stat(trace, "loss"):
        ls, lv = trace.scalar("loss", with_steps=True)
        at = lv[ls == step]
        loss_bad = bool(at.size and not np.isfinite(at[0]))
    fwd = next((m for m in trace.exec_order(step) if m in bad_m.get(step, ())), None)
    return {"event": "nonfinite", "step": step, "forward": fwd, "backward": None,
            "params": bad_p.get(step, []), "loss_nonfinite": loss_bad, "_rebuilt": True}


def _forward_param_order(trace: Trace, step: int) -> list[str]:
    """Parameters in forward order: by their owner's execution position, then meta order."""
    pos = {m: i for i, m in enumerate(U.exec_order_at(trace, step))}
    owner = U.param_owner(trace)
    names = trace.params
    big = len(pos) + 1
    return sorted(names, key=lambda p: (pos.get(owner.get(p, ""), big), names.index(p)))


def _dtype_max(trace: Trace) -> tuple[str | None, float]:
    """The parameters' most common floating dtype and its largest finite number; ``None``
    when the trace does not say (the float32 limit is then used for the test only)."""
    dtypes = Counter(p.get("dtype") for p in trace.meta.get("params", []) if p.get("dtype"))
    name = dtypes.most_common(1)[0][0] if dtypes else None
    try:
        import torch

        return name, float(torch.finfo(getattr(torch, name or "float32")).max)
    except (AttributeError, TypeError):
        return name, float(np.finfo(np.float32).max)


def classify_cause(trace: Trace, step: int, th: Thresholds) -> tuple[str, dict]:
    """Tell apart ``overflow``, ``divergence`` and ``invalid_operation`` for a first
    non-finite value at ``step`` (see :class:`Thresholds` ``overflow_frac``,
    ``divergence_fold``, ``divergence_window``).

    Example:
        >>> classify_cause(gt.load("runs/exp1"), 17, Thresholds())[0] in CAUSES
        True
    """
    dtype, fmax = _dtype_max(trace)
    ev: dict = {"dtype": dtype, "dtype_max": fmax}
    before = trace.steps_recorded
    before = before[before < step]
    recent = before[-th.divergence_window:].tolist()
    # Largest finite magnitude seen just before the step (at the step itself a diverging
    # run is huge too: only look before).
    big = frac = score = 0.0
    where = None
    # A module output recorded in a narrower dtype than the parameters' (float16 logits
    # under float32 weights) is judged against its own dtype's limit, and called an
    # overflow only within overflow_headroom of it: overflow_frac (1%) is a float32-sized
    # margin, and 1% of float16's range (655) is an ordinary activation.
    dtypes = trace.out_dtypes()
    out_max = {m: x for m, d in dtypes.items() if (x := headroom.dtype_max(d)) and x != fmax}
    narrow_at = max(th.overflow_frac, 1.0 / th.overflow_headroom)
    for stat in ("out_maxabs", "grad_maxabs"):
        if not U.has_stat(trace, stat) or not recent:
            continue
        m = trace.matrix(stat, steps=recent)
        vals = np.where(m.recorded & np.isfinite(m.values), np.abs(m.values), 0.0)
        narrow = [stat == "out_maxabs" and n in out_max for n in m.names]
        limits = np.array([out_max[n] if nr else fmax for n, nr in zip(m.names, narrow)])
        at = np.array([narrow_at if nr else th.overflow_frac for nr in narrow])
        fracs = vals / limits if vals.size else vals
        if vals.size and (fracs / at).max() > score:
            r, j = np.unravel_index(int(np.argmax(fracs / at)), vals.shape)
            big, frac, where = float(vals[r, j]), float(fracs[r, j]), (m.names[j], stat, int(m.steps[r]))
            score = frac / float(at[j])
    ev["largest_finite_value"] = big
    if where:
        ev["largest_value_at"] = {"name": where[0], "stat": where[1], "step": where[2]}
        if where[1] == "out_maxabs" and where[0] in out_max:
            ev["value_dtype"] = dtypes[where[0]]
            ev["value_dtype_max"] = out_max[where[0]]
    ev["fraction_of_dtype_max"] = frac

    # Growth of gradient / parameter norms over the steps before.
    def growth(values) -> float:
        vals = np.asarray(values, dtype=np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size < 3:
            return 1.0
        cut = max(1, vals.size - th.divergence_window)
        base = float(np.median(vals[:cut])) if vals.size > th.divergence_window else float(vals[0])
        return float(np.max(vals[-th.divergence_window:]) / max(base, th.floor))

    def scalar_before(stat: str) -> np.ndarray:
        if not U.has_stat(trace, stat):
            return np.array([])
        st, v = trace.scalar(stat, with_steps=True)
        return v[st < step]

    ptot = np.array([])
    if U.has_stat(trace, "param_norm") and before.size:
        m = trace.matrix("param_norm", steps=before.tolist())
        sq = np.where(m.recorded, m.values, 0.0) ** 2
        ptot = np.where(m.recorded.any(axis=1), np.sqrt(sq.sum(axis=1)), np.nan)
    losses = scalar_before("loss")
    ev["grad_norm_growth"] = growth(scalar_before("total_grad_norm"))
    ev["param_norm_growth"] = growth(ptot)
    ev["loss_growth"] = growth(losses) if losses.size else 1.0
    upd = None
    bad_upd = 0
    if U.has_stat(trace, "update_ratio") and recent:
        m = trace.matrix("update_ratio", steps=recent)
        vals = m.values[m.recorded]
        bad_upd = int(np.isnan(vals).sum())          # the step wrote nan into that parameter
        ok = vals[np.isfinite(vals)]     # inf is a zero-initialised parameter (0 in the denominator)
        upd = float(ok.max()) if ok.size else None
    # Only a measured ratio is evidence: None when no update ratio was recorded.
    ev["max_update_ratio"] = upd
    if bad_upd:
        ev["nonfinite_update_ratios"] = bad_upd
    opt = _optimizer_step_origin(trace, step)
    if opt:
        ev.update(opt)
        return "optimizer_step", ev
    if score >= 1.0:                 # within its dtype's overflow margin (see above)
        return "overflow", ev
    if (max(ev["grad_norm_growth"], ev["param_norm_growth"]) >= th.divergence_fold
            or (upd or 0.0) >= th.divergence_update_ratio):
        return "divergence", ev
    return "invalid_operation", ev


_EXPLAIN = {
    "overflow": ("Just before it, values reached {frac} of the largest finite {dtype} number "
                 "({fmax}): the next multiplication or sum overflowed to inf, and inf - inf or "
                 "0 * inf then turned into nan. In float16 this happens near 65504, so activations "
                 "or gradients of a few thousand are already dangerous."),
    "divergence": ("{why}: the optimisation diverged, each oversized step making the next "
                   "gradient larger until the numbers left the representable range. This is the "
                   "signature of a learning rate too high for this model, or of exploding gradients "
                   "that nothing clipped."),
    "optimizer_step": ("Every gradient of step {upd_step} was finite, yet after its optimizer step "
                       "{n_bad} weight tensors held nan/inf: the update rule itself produced them. With "
                       "{optimizer} in {dtype}, the usual culprit is the optimizer's eps: 1e-8 rounds to 0 in "
                       "float16, so a squared-gradient average that underflows to 0 leaves 0/0 or x/0 "
                       "in the update."),
    "invalid_operation": ("There was no growth before it and no value near the dtype's limit: "
                          "{origin} turned finite inputs into nan/inf in one go. That points to an "
                          "invalid operation (log or sqrt of zero or a negative number, division by "
                          "zero, inf - inf, a custom op) rather than to gradient scale."),
}


def _divergence_why(cev: dict, th: Thresholds) -> str:
    growth = max(cev["grad_norm_growth"], cev["param_norm_growth"])
    if growth >= th.divergence_fold:
        return f"Gradient or parameter norms had been climbing over the preceding steps (x{U.sci(growth)})"
    return (f"One optimizer step just before changed weights by {U.sci(cev['max_update_ratio'])} times "
            "their own size")


def detect(trace: Trace, th: Thresholds) -> list[Finding]:
    """``nonfinite``: the step, the phase and the module where nan/inf first appeared.

    Uses the first ``nonfinite`` event only, so a layer that merely inherited the value,
    or every weight after the optimizer spread it, is never named. With a forward origin
    that module is named; else the first module in backward order whose output gradient
    was non-finite; else (output-gradient flags off on that step) the module owning the
    *last* parameter in forward order whose gradient is non-finite, i.e. the one nearest
    to where the backward pass broke.

    Example:
        >>> detect(gt.load("runs/exp1"), Thresholds())   # a healthy run: no nan
        []
    """
    ev = _first_event(trace)
    if ev is None:
        return []
    step = int(ev["step"])
    params = list(ev.get("params") or [])
    owner = U.param_owner(trace)
    evidence: dict = {"step": step, "forward": ev.get("forward"), "backward": ev.get("backward"),
                      "nonfinite_params": params[:20], "n_nonfinite_params": len(params),
                      "loss_nonfinite": bool(ev.get("loss_nonfinite"))}
    fwd_order = _forward_param_order(trace, step)
    bad_sorted = [p for p in fwd_order if p in set(params)]
    if ev.get("forward"):
        origin, phase = ev["forward"], "forward"
        evidence["localised_by"] = ("first module in execution order whose output held nan/inf "
                                    f"at step {step}")
    elif ev.get("loss_nonfinite"):
        # Every module output was finite and the loss was not: the loss made it. Its
        # gradient is then non-finite everywhere, so the parameters say nothing more.
        origin, phase = None, "loss"
        evidence["localised_by"] = ("every module output was finite at step "
                                    f"{step}; the loss computation itself produced nan/inf")
    elif ev.get("backward"):
        origin, phase = ev["backward"], "backward"
        order = U.exec_order_at(trace, step)
        nxt = order[order.index(origin) + 1] if origin in order and order.index(origin) + 1 < len(order) else None
        evidence["localised_by"] = ("first module in backward order whose output gradient held "
                                    f"nan/inf at step {step}" +
                                    (f"; the backward of the module run after it ({nxt}) produced it"
                                     if nxt else ""))
        if nxt:
            evidence["suspect_backward_of"] = nxt
            evidence["suspects"] = [nxt]
    elif bad_sorted:
        last = bad_sorted[-1]
        origin, phase = owner.get(last, last), "backward"
        evidence["localised_by"] = (
            f"output-gradient flags were not recorded at step {step}; {last} is the last parameter "
            "in forward order whose gradient is non-finite, so the backward pass broke between "
            f"{origin} and the layers after it (their gradients stayed finite)")
        order = U.exec_order_at(trace, step)
        weights = U.weight_modules(trace)
        if origin in order:
            suspects = []
            for m in order[order.index(origin) + 1:]:
                suspects.append(m)
                if m in weights:
                    break
            if suspects:
                evidence["suspects"] = suspects
    else:
        return []
    evidence["phase"] = phase
    cause, cev = classify_cause(trace, step, th)
    evidence["cause"] = cause
    evidence["cause_evidence"] = cev
    if cause == "optimizer_step":
        phase = "optimizer_step"
        weights = [p for p in fwd_order if p in set(cev["nonfinite_weights"])]
        origin = owner.get(weights[0], weights[0]) if weights else origin
        bad_sorted = weights
        evidence["phase"] = phase
        evidence["localised_by"] = (f"every gradient of step {cev['updated_at_step']} was finite, and "
                                    f"{cev['params_nonfinite_after_step']} weight tensors were non-finite "
                                    f"when step {step} began")
    if phase == "loss":
        bad_sorted = []      # every gradient is non-finite after a non-finite loss: no layer to name
    layers: list[str] = [origin] if origin else []
    if phase == "optimizer_step":
        bad_sorted = list(reversed(bad_sorted))
    for p in reversed(bad_sorted):
        m = owner.get(p, p)
        if m not in layers:
            layers.append(m)
    where = {"forward": f"in the forward pass, first in the output of `{origin}`",
             "backward": f"in the backward pass, nearest to `{origin}`",
             "loss": "in the loss, with every module output finite",
             "optimizer_step": (f"written by the optimizer step of step {cev.get('updated_at_step')} "
                                "while every gradient was finite")}[phase]
    evidence["summary"] = f"first non-finite value at step {step}, {where}; likely cause: {cause.replace('_', ' ')}"
    expl = (f"The first nan/inf appeared at step {step} {where}. Once a nan exists it spreads: every "
            "later layer inherits it, and the optimizer step writes it into every weight, so only "
            "this first occurrence points at the origin. " +
            _EXPLAIN[cause].format(frac=U.sci(cev["fraction_of_dtype_max"]),
                                   dtype=cev.get("value_dtype") or cev["dtype"] or "its dtype",
                                   upd_step=cev.get("updated_at_step"), n_bad=cev.get("params_nonfinite_after_step"),
                                   optimizer=cev.get("optimizer") or "the optimizer",
                                   fmax=U.sci(cev.get("value_dtype_max") or cev["dtype_max"]),
                                   growth=U.sci(max(cev["grad_norm_growth"], cev["param_norm_growth"])),
                                   why=_divergence_why(cev, th),
                                   origin=(f"`{origin}`" if phase == "forward" else
                                           "the backward of the module run right after "
                                           f"`{origin}`" if origin else "the loss")))
    steps_bad = [int(e["step"]) for e in trace.events("nonfinite")] or [step]
    evidence["steps_with_nonfinite"] = len(steps_bad)
    return [Finding("nonfinite", "error", layers, step, max(steps_bad), evidence, expl)]
