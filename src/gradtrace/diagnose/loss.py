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


def corroborated(steps: np.ndarray, loss: np.ndarray, hits: list[tuple[int, float, float]],
                 trace: Trace, th: Thresholds) -> dict[int, str]:
    """Which candidate spikes (indices into ``loss``) are corroborated, and by what:
    ``"persists"``, ``"repeats"``, ``"gradient"`` or ``"unchecked"`` (no gradient norms
    recorded, so nothing could refute it). See :class:`Thresholds` ``spike_persist``,
    ``explode_fold``. Each verdict uses records up to ``spike_persist`` after the spike.

    Example:
        >>> tr = Trace({}, [{"step": s, "scalars": {"loss": 1.0 + 0.01 * (s % 3)}} for s in range(30)])
        >>> corroborated(np.arange(30), np.r_[np.ones(25), 50.0, np.ones(4)], [(25, 1e3, 1.0)], tr, Thresholds())
        {25: 'unchecked'}
    """
    gsteps, gnorm = (trace.scalar("total_grad_norm", with_steps=True) if U.has_stat(trace, "total_grad_norm")
                     else (np.array([]), np.array([])))
    gpos = {int(s): k for k, s in enumerate(gsteps.tolist())}
    out: dict[int, str] = {}
    idx = [h[0] for h in hits]
    for n, (i, _, med) in enumerate(hits):
        after = loss[i + 1: i + 1 + th.spike_persist]
        after = after[np.isfinite(after)]
        if after.size == th.spike_persist and float(np.median(after)) >= th.spike_min_fold * med:
            out[i] = "persists"
            continue
        near = [j for j in idx if j != i and abs(j - i) <= th.baseline_window]
        if near:
            out[i] = "repeats"
            continue
        if not gpos:
            out[i] = "unchecked"
            continue
        k = gpos.get(int(steps[i]))
        if k is None:
            continue
        base = gnorm[max(0, k - th.baseline_window): k]
        base = base[np.isfinite(base)]
        g = float(gnorm[k])
        if base.size >= th.min_baseline and (not math.isfinite(g) or g >= th.explode_fold * float(np.median(base))):
            out[i] = "gradient"
    return out


def divergence_index(loss: np.ndarray, th: Thresholds) -> int | None:
    """First index whose loss is ``th.diverge_fold`` times the first finite loss, among the
    records the spike rule cannot judge yet (its warm-up plus a minimal baseline), or None.

    Example:
        >>> divergence_index(np.array([4.5, 3.9, 9.2, 12.0]), Thresholds())
        2
    """
    fin = np.flatnonzero(np.isfinite(loss))
    if fin.size < 2 or loss[fin[0]] <= 0:
        return None
    early = fin[1:][fin[1:] < th.warmup_steps + th.min_baseline]
    over = early[loss[early] >= th.diverge_fold * loss[fin[0]]]
    return int(over[0]) if over.size else None


def climb_index(loss: np.ndarray, th: Thresholds) -> tuple[int, dict] | None:
    """First index that ends a climb: ``th.climb_steps`` rises in a row, each record above
    the one before, ending ``th.spike_z`` robust z-scores above the ``th.baseline_window``
    records before the climb began (and at least ``th.spike_min_rise`` of the early loss
    level above their median). Returns ``(index, details)`` or None.

    This is how a slow divergence looks (a learning rate past the edge of stability): no
    single jump stands out against a window that already holds the rising records, but
    the loss goes up step after step until it is far above where it was. Noise makes a
    few rises in a row now and then; it does not end them far outside the earlier spread.
    Only records before the first non-finite loss count; each index depends on earlier
    records only.

    Example:
        >>> loss = np.r_[3.0 + 0.1 * np.sin(np.arange(30)), 3.2, 3.5, 3.9, 4.6]
        >>> climb_index(loss, Thresholds())[0]
        33
    """
    k = th.climb_steps
    bad = np.flatnonzero(~np.isfinite(loss))
    x = np.asarray(loss[: bad[0]] if bad.size else loss, dtype=np.float64)
    if x.size <= k:
        return None
    fin = x[: th.baseline_window]
    level = float(np.median(fin)) if fin.size else 0.0
    up = np.r_[False, x[1:] > x[:-1]]
    # length of the run of rises ending at each index
    idx = np.arange(x.size)
    last_flat = np.maximum.accumulate(np.where(up, 0, idx))
    rises = idx - last_flat
    for t in np.flatnonzero((rises >= k) & (idx - k >= th.warmup_steps)):
        c = t - int(rises[t])                  # the record the climb started from
        base = x[max(0, c - th.baseline_window + 1): c + 1]
        if base.size < th.min_baseline:
            continue
        z, med = U.robust_z(float(x[t]), base)
        if z >= th.spike_z and x[t] - med >= th.spike_min_rise * level:
            return int(t), {"climb_from_index": c, "baseline_median": med, "robust_z": float(z),
                            "rises": int(rises[t])}
    return None


def detect_spike(trace: Trace, th: Thresholds) -> list[Finding]:
    """``loss_spike``: a corroborated jump of the loss, a climb (:func:`climb_index`), or a
    gross divergence.

    A candidate is a loss ``th.spike_z`` robust z-scores above the median of the
    ``th.baseline_window`` records before it, at least ``th.spike_min_fold`` times that
    median, and a rise of at least ``th.spike_min_rise`` of the run's early loss level (the
    first ``th.warmup_steps`` records are never candidates). It is reported only when
    :func:`corroborated`. A loss ``th.diverge_fold`` times the run's first loss is reported
    whatever the warm-up, as an error; so is a spike the run never came back from.

    Example:
        >>> tr = Trace({}, [{"step": s, "scalars": {"loss": v}} for s, v in enumerate([4.5, 4.4, 9.3, 9.8])])
        >>> f = detect_spike(tr, Thresholds())[0]
        >>> f.first_step, f.severity, f.evidence["diverged_at"]
        (2, 'error', 2)
    """
    if not U.has_stat(trace, "loss"):
        return []
    steps, loss = trace.scalar("loss", with_steps=True)
    cands = spike_indices(loss, th)
    why = corroborated(steps, loss, cands, trace, th)
    hits = [h for h in cands if h[0] in why]
    div = divergence_index(loss, th)
    climb = climb_index(loss, th)
    if not hits and div is None and climb is None:
        return []
    evidence: dict = {}
    marks = [h[0] for h in hits] + [i for i in (div, climb and climb[0]) if i is not None]
    first = min(marks)
    fin = loss[np.isfinite(loss)]
    last = float(fin[-1]) if fin.size else math.nan
    severity = "warning"
    parts = []
    if div is not None:
        evidence.update({"diverged_at": int(steps[div]), "first_loss": float(loss[np.isfinite(loss)][0]),
                         "diverged_loss": float(loss[div])})
        parts.append(f"loss {U.sci(float(loss[div]))} at step {int(steps[div])} is "
                     f"{U.sci(float(loss[div] / evidence['first_loss']))}x the run's first loss "
                     f"{U.sci(evidence['first_loss'])}")
        severity = "error"
    if hits:
        i0, z0, med0 = hits[0]
        worst = max(hits, key=lambda h: loss[h[0]] / h[2])
        evidence.update({
            "spike_steps": [int(steps[i]) for i, _, _ in hits[:20]],
            "corroborated_by": {int(steps[i]): why[i] for i, _, _ in hits[:20]},
            "loss": float(loss[i0]), "baseline_median": med0, "robust_z": float(z0),
            "fold": float(loss[i0] / med0), "worst_step": int(steps[worst[0]]),
            "worst_fold": float(loss[worst[0]] / worst[2]),
        })
        parts.append(f"loss {U.sci(float(loss[i0]))} at step {int(steps[i0])} is "
                     f"{U.sci(float(loss[i0] / med0))}x the median {U.sci(med0)} of the "
                     f"{th.baseline_window} steps before (robust z = {z0:.1f}; it {why[i0]})")
        if math.isfinite(last) and last >= th.spike_min_fold * med0:
            severity = "error"         # never came back
    if climb is not None:
        t, c = climb
        evidence.update({"climb_at": int(steps[t]), "climb_started_at": int(steps[c["climb_from_index"]]),
                         "climb_loss": float(loss[t]), "climb_baseline_median": c["baseline_median"],
                         "climb_robust_z": c["robust_z"]})
        parts.append(f"the loss rose {c['rises']} steps in a row from step {evidence['climb_started_at']} to "
                     f"{U.sci(float(loss[t]))} at step {int(steps[t])}, {c['robust_z']:.0f} robust z above the "
                     f"median {U.sci(c['baseline_median'])} before the climb")
        ended_nonfinite = bool((~np.isfinite(loss[t:])).any())
        if ended_nonfinite or last >= th.spike_min_fold * c["baseline_median"]:
            severity = "error"         # the climb ended in nan/inf or never came back
    evidence["recovered"] = bool(math.isfinite(last) and severity == "warning")
    evidence["summary"] = "; ".join(parts)
    expl = ("The loss jumped far above where it had been a moment before. A single oversized "
            "update (a learning rate at the edge of stability, an update rule that overshoots) "
            "throws the weights out of the region they had settled in; if the spikes grow or "
            "repeat, they are the prelude to divergence and nan.")
    if climb is not None:
        expl += (" Here it climbed step after step rather than jumping once: the signature of a "
                 "learning rate that has crossed the edge of stability (a schedule that keeps "
                 "raising it, or no decay), caught before the loss runs away.")
    if div is not None:
        expl += (" Here the loss rose to at least twice its starting value: training is moving "
                 "away from a solution, not towards it; a learning rate far too high for this "
                 "model (or no warm-up) is the usual cause.")
    last_step = int(steps[max(marks)])
    return [Finding("loss_spike", severity, [], int(steps[first]), last_step, evidence, expl)]


def detect_nonfinite(trace: Trace, th: Thresholds) -> list[Finding]:
    """``loss_nonfinite``: the recorded loss (or a ``nonfinite`` event) is nan/inf.

    Example:
        >>> tr = Trace({}, [{"step": s, "scalars": {"loss": 1.0 if s < 23 else float("nan")}} for s in range(25)])
        >>> detect_nonfinite(tr, Thresholds())[0].first_step
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
    if U.has_stat(trace, "lr"):     # the rate of the update that led to it, not the last one
        ls, lr = trace.scalar("lr", with_steps=True)
        sel = (ls < first) if (ls < first).any() else (ls <= first)
        if sel.any():
            evidence["lr"] = float(lr[sel][-1])
            evidence["lr_step"] = int(ls[sel][-1])
    expl = ("The loss became nan/inf, so every gradient computed from it is meaningless and "
            "the optimizer step spreads the damage into every weight. It is a symptom with "
            "several possible causes: a learning rate that made training diverge, values "
            "overflowing their dtype, an invalid operation (log(0), 0/0) in the model or the "
            "loss, or exploding gradients. The nonfinite finding, when present, shows where "
            "the first nan/inf came from.")
    return [Finding("loss_nonfinite", "error", [], first, bad_steps[-1], evidence, expl)]
