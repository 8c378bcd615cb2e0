"""Dead ReLU units and saturated sigmoid/tanh units."""
from __future__ import annotations

import math

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from .thresholds import Thresholds


def _mask_history(trace: Trace) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per ReLU-family module, before the first non-finite step: ``(steps, masks, samples)``
    with ``masks`` shaped (activation steps, units) ("fired at least once" per unit) and
    ``samples`` the inputs each unit saw per step (``nan`` if the trace predates it)."""
    if not U.has_stat(trace, "active_mask"):
        return {}
    out = {}
    cut = U.first_nonfinite_step(trace)
    samples = trace.matrix("unit_samples") if U.has_stat(trace, "unit_samples") else None
    for name in trace.names("active_mask"):
        try:
            steps, masks = trace.series("active_mask", name, with_steps=True)
        except (KeyError, ValueError):
            continue
        if masks.dtype == object or masks.ndim != 2:    # unit count changed: keep the last shape
            continue
        keep = steps < cut if cut is not None else np.ones(steps.size, dtype=bool)
        steps, masks = steps[keep], masks[keep].astype(bool)
        n = np.full(steps.size, np.nan)
        if samples is not None and name in samples.names:
            j = samples.names.index(name)
            n = _at_steps(samples.steps, samples.values[:, j], steps)
        if steps.size:
            out[name] = (steps, masks, n)
    return out


def _at_steps(src_steps: np.ndarray, src_values: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """``src_values`` at ``steps`` (``nan`` where ``src_steps`` lacks the step; the last
    value of a repeated step wins, as a dict built from the pairs would have it)."""
    src_steps = np.asarray(src_steps)
    out = np.full(len(steps), np.nan)
    if src_steps.size == 0 or len(steps) == 0:
        return out
    order = np.argsort(src_steps, kind="stable")
    srt = src_steps[order]
    pos = np.searchsorted(srt, steps, side="right") - 1     # the last of equal steps
    ok = (pos >= 0) & (srt[np.maximum(pos, 0)] == steps)
    out[ok] = np.asarray(src_values, dtype=np.float64)[order[pos[ok]]]
    return out


def _dead_windows(steps: np.ndarray, masks: np.ndarray, samples: np.ndarray,
                  th: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """``(window end steps, dead units)`` for each window of up to ``th.dead_window`` masks
    ending at a step, from half a window on, keeping only windows whose known sample counts
    add up to ``th.dead_min_samples`` inputs. A ``nan`` count (not recorded that step)
    adds nothing; a window with no known count at all (a trace that predates the counts)
    is kept, as there is nothing to judge it by. Every window has ``masks.shape[1]`` units."""
    w = th.dead_window
    need = math.ceil(w / 2)          # at least half a window of masks: one batch is not enough
    if steps.size < need:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    csum = np.concatenate([np.zeros((1, masks.shape[1]), dtype=np.int64), np.cumsum(masks, axis=0)])
    # Running sums of the known counts and of how many are known: a running sum with a nan
    # in it would be nan from there on, and every later window would pass unjudged.
    samples = np.asarray(samples, dtype=np.float64)
    known = np.isfinite(samples)
    s = np.concatenate([[0.0], np.cumsum(np.where(known, samples, 0.0))])
    k = np.concatenate([[0], np.cumsum(known)])
    t = np.arange(need - 1, steps.size)
    lo = np.maximum(0, t - w + 1)
    short = (k[t + 1] > k[lo]) & (s[t + 1] - s[lo] < th.dead_min_samples)
    t, lo = t[~short], lo[~short]
    dead = np.zeros(t.size, dtype=np.int64)
    for a in range(0, t.size, 4096):            # bounded memory on long runs, many units
        active = (csum[t[a: a + 4096] + 1] - csum[lo[a: a + 4096]]) > 0
        dead[a: a + 4096] = (~active).sum(axis=1)
    return np.asarray(steps)[t].astype(np.int64), dead


def _feeding_bias(trace: Trace, layer: str, step: int) -> dict | None:
    """The weight layer run just before ``layer``, its bias and that layer's output mean
    (the pre-activation) at the first activation step at or after ``step``."""
    order = trace.exec_order(step)
    if layer not in order:
        return None
    weights = U.weight_modules(trace)
    before = [m for m in order[: order.index(layer)] if m in weights]
    if not before:
        return None
    w = before[-1]
    bias = next((p for p in trace.params if trace.owner(p) == w and p.rsplit(".", 1)[-1] == "bias"), None)
    info: dict = {"module": w, "bias": bias}
    if bias and U.has_stat(trace, "param_norm"):
        m = trace.matrix("param_norm", names=[bias])
        rows = np.flatnonzero(m.recorded[:, 0])
        if rows.size:
            shape = trace.param_info(bias).get("shape") or [1]
            info["bias_rms"] = float(m.values[rows[0], 0]) / math.sqrt(max(1, int(np.prod(shape))))
    for stat, key in (("out_mean", "pre_activation_mean"), ("out_std", "pre_activation_std")):
        if U.has_stat(trace, stat):
            m = trace.matrix(stat, names=[w])
            rows = np.flatnonzero(m.recorded[:, 0])
            if rows.size:
                info[key] = float(m.values[rows[0], 0])
    mean, std, rms = info.get("pre_activation_mean"), info.get("pre_activation_std"), info.get("bias_rms")
    # The bias did it when the pre-activations sit more than one spread below zero (most
    # of them negative) and the bias alone is at least half that far from zero.
    info["bias_pushes_below_zero"] = bool(mean is not None and std is not None and rms is not None
                                          and mean < -std and rms >= 0.5 * abs(mean))
    return info


def detect_dead(trace: Trace, th: Thresholds) -> list[Finding]:
    """``dead_units``: ReLU-family units that never fired in a window of ``th.dead_window``
    activation steps (their per-step "fired at least once" masks are combined: dead =
    never active in any). A layer is reported when, in some window, at least
    ``th.dead_frac`` of its units, and ``th.dead_min_units`` of them, are dead; most dead
    first. Each window ends at a step and looks only back, so once reported a layer stays
    reported (``evidence["resolved"]`` says when its units came back to life).

    The masks of a window must cover at least ``th.dead_min_samples`` inputs in all. When
    the weight layer feeding the dead units has a bias that holds its outputs below zero,
    the evidence names it (``feeding``).

    Example:
        >>> detect_dead(gt.load("runs/exp1"), Thresholds())
        []
    """
    history = _mask_history(trace)
    counts: dict[str, tuple[int, int]] = {}
    first_hit: dict[str, int] = {}
    ongoing: dict[str, bool] = {}
    def qualifies(d: int, u: int) -> bool:
        return u > 0 and d >= th.dead_min_units and d / u >= th.dead_frac
    for name, (st, mk, sm) in history.items():
        wsteps, dead = _dead_windows(st, mk, sm, th)
        u = int(mk.shape[1])
        if u == 0:
            continue
        q = (dead >= th.dead_min_units) & (dead / u >= th.dead_frac)     # qualifies(), per window
        hits = np.flatnonzero(q)
        if not hits.size:
            continue
        first_hit[name] = int(wsteps[hits[0]])
        ongoing[name] = bool(q[-1])
        best = dead.size - 1 if ongoing[name] else int(hits[np.argmax(dead[hits] / u)])
        counts[name] = (int(dead[best]), u)
    if not history and U.has_stat(trace, "dead_units"):   # a trace without masks
        steps, names, dead = trace.matrix("dead_units")
        _, _, units = trace.matrix("units")
        keep = U.before_nonfinite(steps, trace)
        for j, n in enumerate(names):
            rows = np.nonzero(np.isfinite(dead[:, j]) & keep)[0]
            hit = [r for r in rows if qualifies(int(dead[r, j]), int(units[r, j]))]
            if hit:
                counts[n] = (int(dead[hit[-1], j]), int(units[hit[-1], j]))
                first_hit[n] = int(steps[hit[0]])
                ongoing[n] = hit[-1] == rows[-1]
    flagged = counts
    if not flagged:
        return []
    order = trace.exec_order()
    layers = sorted(flagged, key=lambda n: (-flagged[n][0] / flagged[n][1],
                                            order.index(n) if n in order else 0))
    # The span: from the first activation step the layer had that many dead units.
    first_step = min(first_hit.values())
    last_step = max(first_hit.values())
    if U.has_stat(trace, "dead_units"):
        steps, names, dead = trace.matrix("dead_units")
        _, _, units = trace.matrix("units")
        col = {n: i for i, n in enumerate(names)}
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = dead / units
        frac[~U.before_nonfinite(steps, trace)] = np.nan
        for n in layers:
            if n not in col:
                continue
            hit = np.nonzero((frac[:, col[n]] >= th.dead_frac) & (steps <= first_hit[n]))[0]
            if hit.size:
                first_step = min(first_step, int(steps[hit[0]]))
            later = np.nonzero(frac[:, col[n]] >= th.dead_frac)[0]
            if later.size:
                last_step = max(last_step, int(steps[later[-1]]))
    evidence = {
        "dead": {n: flagged[n][0] for n in layers},
        "units": {n: flagged[n][1] for n in layers},
        "dead_fraction": {n: flagged[n][0] / flagged[n][1] for n in layers},
        "window": th.dead_window,
        "resolved": not any(ongoing.get(n, True) for n in layers),
        "summary": "; ".join(f"{n}: {flagged[n][0]} of {flagged[n][1]} units never fired"
                             for n in layers[:6]) + f" over {th.dead_window} activation steps",
    }
    feeding = {n: f for n in layers[:6] if (f := _feeding_bias(trace, n, first_hit[n]))}
    if feeding:
        evidence["feeding"] = feeding
    killers = [f["bias"] for f in feeding.values() if f.get("bias_pushes_below_zero") and f.get("bias")]
    if killers:
        evidence["biases"] = killers
        f0 = next(f for f in feeding.values() if f.get("bias") == killers[0])
        evidence["summary"] += (f"; `{killers[0]}` (RMS {U.sci(f0['bias_rms'])}) holds the outputs of "
                                f"`{f0['module']}` at a mean of {U.sci(f0['pre_activation_mean'])}")
    if evidence["resolved"]:
        evidence["summary"] += "; they have since come back to life"
    expl = ("A ReLU unit whose input is negative for every example outputs zero and has zero "
            "derivative, so no gradient reaches the weights feeding it and nothing can bring it "
            "back: it is dead, and the layer has lost that much capacity. Units die when a large "
            "update (high learning rate) or a strongly negative bias pushes their pre-activation "
            "below zero everywhere.")
    records = trace.steps_recorded
    if records.size and first_step == int(records[0]):
        # Silent from the first record: nothing killed them, the network started that way.
        evidence["from_initialisation"] = True
        if killers:
            expl += (f" Here they were silent from the first step, and the biases {', '.join(killers[:3])} "
                     "hold the pre-activations below zero: the initial biases killed them, and with no "
                     "gradient through a dead unit they cannot learn their way back.")
        else:
            expl += (" Here they were silent from the first recorded step, before any large update, so "
                     "the network started that way: a strongly negative bias, or, deep in a stack of "
                     "plain ReLU layers, pre-activations of different inputs that have grown alike "
                     "with depth, leaving some units negative for the whole batch. Normalisation "
                     "(LayerNorm/BatchNorm) or residual connections keep the inputs apart.")
    return [Finding("dead_units", "warning", layers, first_step, last_step, evidence, expl)]


def detect_saturated(trace: Trace, th: Thresholds) -> list[Finding]:
    """``saturated_units``: sigmoid/tanh layers with on average more than
    ``th.saturated_frac`` of their outputs in the flat range over a window of
    ``th.saturated_window`` activation steps (ending at any step: once flagged, a layer
    stays flagged, ``evidence["resolved"]`` when it no longer is); most saturated first.

    Example:
        >>> detect_saturated(gt.load("runs/exp1"), Thresholds())
        []
    """
    got = U.module_matrix(trace, "saturated_frac")
    if got is None:
        return []
    steps, names, sat = got
    keep = U.before_nonfinite(steps, trace)
    steps, sat = steps[keep], sat[keep]
    flagged: dict[str, float] = {}
    ongoing: dict[str, bool] = {}
    first_step = last_step = None
    for j, n in enumerate(names):
        rows = np.nonzero(np.isfinite(sat[:, j]))[0]
        if rows.size == 0:
            continue
        # the mean over a window ending at each step: causal, so a layer once flagged stays
        avgs = np.array([float(np.mean(sat[rows[max(0, k - th.saturated_window + 1): k + 1], j]))
                         for k in range(rows.size)])
        over = np.flatnonzero(avgs >= th.saturated_frac)
        if over.size:
            ongoing[n] = bool(avgs[-1] >= th.saturated_frac)
            flagged[n] = float(avgs[-1] if ongoing[n] else avgs[over].max())
            hit = rows[sat[rows, j] >= th.saturated_frac]
            hit = hit[hit <= rows[over[0]]][:1] if hit.size else rows[over[:1]]
            s0, s1 = int(steps[hit[0]]), int(steps[rows[over[-1]]])
            first_step = s0 if first_step is None else min(first_step, s0)
            last_step = s1 if last_step is None else max(last_step, s1)
    if not flagged:
        return []
    layers = sorted(flagged, key=lambda n: -flagged[n])
    bounds = trace.meta.get("saturation_bounds", {})
    kinds = {n: U.activation_of(trace, n) for n in layers}
    evidence = {
        "saturated_fraction": {n: flagged[n] for n in layers},
        "activation": kinds,
        "saturation_bounds": bounds,
        "resolved": not any(ongoing.values()),
        "summary": "; ".join(f"{n} ({kinds[n]}): {flagged[n]:.0%} of outputs saturated" for n in layers[:6]),
    }
    expl = ("A sigmoid or tanh output pinned near its limits (0/1 for sigmoid, -1/1 for tanh) sits "
            "where the curve is flat, so its derivative is close to zero and the gradient passing "
            "back through the layer is multiplied by almost nothing. Large pre-activations - weights "
            "or inputs at too large a scale - push units there; the layers before them then stop "
            "learning.")
    return [Finding("saturated_units", "warning", layers, first_step, last_step, evidence, expl)]
