"""Loss spikes (robust z-score against a trailing window) and a non-finite loss."""
from __future__ import annotations

import math

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from .thresholds import Thresholds


def spike_indices(loss: np.ndarray, th: Thresholds) -> list[tuple[int, float, float]]:
    """``(index, z, baseline median)`` of every loss spike under ``th`` (the rule of
    :func:`detect_spike`, shared with the report's loss chart).

    Example:
        >>> spike_indices(np.r_[np.ones(25), 50.0, np.ones(4)], Thresholds())[0][0]
        25
    """
    early = loss[np.isfinite(loss)][: th.baseline_window]
    level = float(np.median(early)) if early.size else 0.0
    return [(i, z, med) for i, z, med in
            U.trailing_spikes(loss, warmup=th.warmup_steps, window=th.baseline_window,
                              min_baseline=th.min_baseline, z_limit=th.spike_z)
            if loss[i] >= th.spike_min_fold * med and med > 0
            and loss[i] - med >= th.spike_min_rise * level]


def detect_spike(trace: Trace, th: Thresholds) -> list[Finding]:
    """``loss_spike``: a loss ``th.spike_z`` robust z-scores above the median of the
    ``th.baseline_window`` records before it, at least ``th.spike_min_fold`` times that
    median, and a rise of at least ``th.spike_min_rise`` of the run's early loss level.
    The first ``th.warmup_steps`` records are never judged.

    Example:
        >>> detect_spike(trace, Thresholds(spike_z=6))     # doctest: +SKIP
    """
    if not U.has_stat(trace, "loss"):
        return []
    steps, loss = trace.series("loss", with_steps=True)
    hits = spike_indices(loss, th)
    if not hits:
        return []
    i0, z0, med0 = hits[0]
    worst = max(hits, key=lambda h: loss[h[0]] / h[2])
    evidence = {
        "spike_steps": [int(steps[i]) for i, _, _ in hits[:20]],
        "loss": float(loss[i0]),
        "baseline_median": med0,
        "robust_z": float(z0),
        "fold": float(loss[i0] / med0),
        "worst_step": int(steps[worst[0]]),
        "worst_fold": float(loss[worst[0]] / worst[2]),
        "summary": (f"loss {U.sci(float(loss[i0]))} at step {int(steps[i0])} is "
                    f"{U.sci(float(loss[i0] / med0))}x the median {U.sci(med0)} of the "
                    f"{th.baseline_window} steps before (robust z = {z0:.1f})"),
    }
    expl = ("The loss jumped far above where it had been a moment before. A single oversized "
            "update (a gradient spike on an unusual batch, a learning rate at the edge of "
            "stability) throws the weights out of the region they had settled in; if the spikes "
            "grow or repeat, they are the prelude to divergence and nan.")
    return [Finding("loss_spike", "warning", [], int(steps[i0]), int(steps[hits[-1][0]]),
                    evidence, expl, [])]


def detect_nonfinite(trace: Trace, th: Thresholds) -> list[Finding]:
    """``loss_nonfinite``: the recorded loss (or a ``nonfinite`` event) is nan/inf.

    Example:
        >>> detect_nonfinite(trace, Thresholds())[0].first_step    # doctest: +SKIP
        23
    """
    bad_steps: list[int] = []
    values: list[float] = []
    last_finite = None
    if U.has_stat(trace, "loss"):
        steps, loss = trace.series("loss", with_steps=True)
        bad = ~np.isfinite(loss)
        bad_steps = [int(s) for s in steps[bad]]
        values = [float(v) for v in loss[bad]]
        fin = np.nonzero(~bad)[0]
        if fin.size and bad.any():
            before = fin[fin < np.argmax(bad)]
            if before.size:
                last_finite = (int(steps[before[-1]]), float(loss[before[-1]]))
    bad_steps = sorted(set(bad_steps) | {int(e["step"]) for e in trace.events("nonfinite")
                                         if e.get("loss_nonfinite")})
    if not bad_steps:
        return []
    first = bad_steps[0]
    evidence = {"first_step": first, "steps_with_nonfinite_loss": len(bad_steps),
                "first_value": values[0] if values else math.nan,
                "summary": f"the loss was non-finite at {len(bad_steps)} recorded steps, first at step {first}"}
    if last_finite:
        evidence["last_finite_loss"] = {"step": last_finite[0], "value": last_finite[1]}
    if U.has_stat(trace, "lr"):
        lr = trace.series("lr")
        if lr.size:
            evidence["lr"] = float(lr[-1])
    expl = ("The loss became nan/inf, so every gradient computed from it is meaningless and "
            "the optimizer step spreads the damage into every weight. It is a symptom with "
            "several possible causes: a learning rate that made training diverge, values "
            "overflowing their dtype, an invalid operation (log(0), 0/0) in the model or the "
            "loss, or exploding gradients. The nonfinite finding, when present, shows where "
            "the first nan/inf came from.")
    return [Finding("loss_nonfinite", "error", [], first, bad_steps[-1], evidence, expl, [])]
