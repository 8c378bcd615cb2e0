"""Dead ReLU units and saturated sigmoid/tanh units."""
from __future__ import annotations

import numpy as np

from .finding import Finding
from ..trace import Trace, _decode_vector
from . import _util as U
from .thresholds import Thresholds


def _last_masks(trace: Trace, window: int) -> dict[str, list[tuple[int, np.ndarray, float]]]:
    """The last ``window`` active masks of each ReLU-family module, newest first, with the
    number of inputs each unit saw in that step (``nan`` if the trace predates it)."""
    out: dict[str, list[tuple[int, np.ndarray, float]]] = {}
    modules = trace.modules
    cut = U.first_nonfinite_step(trace)
    for r in reversed(trace.records):
        if cut is not None and r["step"] >= cut:
            continue
        vec = r.get("vectors", {}).get("active_mask")
        if not vec:
            continue
        samples = r.get("module", {}).get("unit_samples")
        for name, packed in vec.items():
            lst = out.setdefault(name, [])
            if len(lst) < window:
                n = samples[modules.index(name)] if samples and name in modules else None
                lst.append((r["step"], _decode_vector(packed), float("nan") if n is None else float(n)))
        if out and all(len(v) >= window for v in out.values()):
            break
    return out


def detect_dead(trace: Trace, th: Thresholds) -> list[Finding]:
    """``dead_units``: ReLU-family units that never fired in any of the last
    ``th.dead_window`` activation steps (their per-step "fired at least once" masks are
    combined: dead = never active in any). A layer is reported when at least
    ``th.dead_frac`` of its units, and ``th.dead_min_units`` of them, are dead; most
    dead first.

    The masks must cover at least ``th.dead_min_samples`` inputs in all.

    Example:
        >>> detect_dead(trace, Thresholds(dead_frac=0.5))    # doctest: +SKIP
    """
    masks = _last_masks(trace, th.dead_window)
    counts: dict[str, tuple[int, int]] = {}
    for name, lst in masks.items():
        sizes = {m.size for _, m, _ in lst}
        if len(sizes) != 1:
            lst = [x for x in lst if x[1].size == lst[0][1].size]
        seen = sum(n for _, _, n in lst)
        if seen < th.dead_min_samples:      # nan (older traces) compares False: kept
            continue
        ever = np.zeros(lst[0][1].size, dtype=bool)
        for _, m, _ in lst:
            ever |= m
        counts[name] = (int((~ever).sum()), int(ever.size))
    if not masks and U.has_stat(trace, "dead_units"):   # a trace without masks
        steps, names, dead = trace.matrix("dead_units")
        _, _, units = trace.matrix("units")
        for j, n in enumerate(names):
            rows = np.nonzero(np.isfinite(dead[:, j]))[0]
            if rows.size:
                counts[n] = (int(dead[rows[-1], j]), int(units[rows[-1], j]))
    flagged = {n: c for n, c in counts.items()
               if c[1] > 0 and c[0] >= th.dead_min_units and c[0] / c[1] >= th.dead_frac}
    if not flagged:
        return []
    order = U.exec_order(trace)
    layers = sorted(flagged, key=lambda n: (-flagged[n][0] / flagged[n][1],
                                            order.index(n) if n in order else 0))
    first_step = None
    last_step = None
    if U.has_stat(trace, "dead_units"):
        steps, names, dead = trace.matrix("dead_units")
        _, _, units = trace.matrix("units")
        col = {n: i for i, n in enumerate(names)}
        with np.errstate(invalid="ignore", divide="ignore"):
            frac = dead / units
        frac[~U.before_nonfinite(steps, trace)] = np.nan
        for n in layers:
            hit = np.nonzero(frac[:, col[n]] >= th.dead_frac)[0]
            if hit.size:
                s0, s1 = int(steps[hit[0]]), int(steps[hit[-1]])
                first_step = s0 if first_step is None else min(first_step, s0)
                last_step = s1 if last_step is None else max(last_step, s1)
    if first_step is None:
        any_list = next(iter(masks.values()), [])
        first_step = int(any_list[-1][0]) if any_list else None
        last_step = int(any_list[0][0]) if any_list else None
    window_steps = sorted({s for n in flagged for s, _, _ in masks.get(n, [])})
    evidence = {
        "dead": {n: flagged[n][0] for n in layers},
        "units": {n: flagged[n][1] for n in layers},
        "dead_fraction": {n: flagged[n][0] / flagged[n][1] for n in layers},
        "window_steps": window_steps,
        "summary": "; ".join(f"{n}: {flagged[n][0]} of {flagged[n][1]} units never fired"
                             for n in layers[:6]) + f" over the last {len(window_steps) or 1} activation steps",
    }
    expl = ("A ReLU unit whose input is negative for every example outputs zero and has zero "
            "derivative, so no gradient reaches the weights feeding it and nothing can bring it "
            "back: it is dead, and the layer has lost that much capacity. Units die when a large "
            "update (high learning rate) or a strongly negative bias pushes their pre-activation "
            "below zero everywhere.")
    records = trace.steps_recorded
    if first_step is not None and records.size and first_step == int(records[0]):
        # Silent from the first record: nothing killed them, the network started that way.
        evidence["from_initialisation"] = True
        expl += (" Here they were silent from the first recorded step, before any large update, so "
                 "the network started that way: a strongly negative bias, or, deep in a stack of "
                 "plain ReLU layers, pre-activations of different inputs that have grown alike "
                 "with depth, leaving some units negative for the whole batch. Normalisation "
                 "(LayerNorm/BatchNorm) or residual connections keep the inputs apart.")
    return [Finding("dead_units", "warning", layers, first_step, last_step, evidence, expl, [])]


def detect_saturated(trace: Trace, th: Thresholds) -> list[Finding]:
    """``saturated_units``: sigmoid/tanh layers with on average more than
    ``th.saturated_frac`` of their outputs in the flat range over the last
    ``th.saturated_window`` activation steps; most saturated first.

    Example:
        >>> detect_saturated(trace, Thresholds())        # doctest: +SKIP
    """
    got = U.module_matrix(trace, "saturated_frac")
    if got is None:
        return []
    steps, names, sat = got
    keep = U.before_nonfinite(steps, trace)
    steps, sat = steps[keep], sat[keep]
    flagged: dict[str, float] = {}
    first_step = last_step = None
    for j, n in enumerate(names):
        rows = np.nonzero(np.isfinite(sat[:, j]))[0]
        if rows.size == 0:
            continue
        recent = rows[-th.saturated_window:]
        avg = float(np.mean(sat[recent, j]))
        if avg >= th.saturated_frac:
            flagged[n] = avg
            hit = rows[sat[rows, j] >= th.saturated_frac]
            if hit.size:
                first_step = int(steps[hit[0]]) if first_step is None else min(first_step, int(steps[hit[0]]))
                last_step = int(steps[hit[-1]]) if last_step is None else max(last_step, int(steps[hit[-1]]))
    if not flagged:
        return []
    layers = sorted(flagged, key=lambda n: -flagged[n])
    bounds = trace.meta.get("saturation_bounds", {})
    kinds = {n: U.activation_of(trace, n) for n in layers}
    evidence = {
        "saturated_fraction": {n: flagged[n] for n in layers},
        "activation": kinds,
        "saturation_bounds": bounds,
        "summary": "; ".join(f"{n} ({kinds[n]}): {flagged[n]:.0%} of outputs saturated" for n in layers[:6]),
    }
    expl = ("A sigmoid or tanh output pinned near its limits (0/1 for sigmoid, -1/1 for tanh) sits "
            "where the curve is flat, so its derivative is close to zero and the gradient passing "
            "back through the layer is multiplied by almost nothing. Large pre-activations - weights "
            "or inputs at too large a scale - push units there; the layers before them then stop "
            "learning.")
    return [Finding("saturated_units", "warning", layers, first_step, last_step, evidence, expl, [])]
