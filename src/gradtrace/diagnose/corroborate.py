"""Whether a gradient-norm surge is corroborated (it persists, repeats, the loss answers it)
or contained (the user's clipping bounded the update while the loss held): the checks
:func:`gradtrace.diagnose.gradients.detect_over_steps` applies before it reports."""
from __future__ import annotations

import math

import numpy as np

from ..trace import Trace
from . import _util as U
from .thresholds import Thresholds


def spikes_corroborated(trace: Trace, steps: np.ndarray, logs: np.ndarray,
                         spikes: list[tuple[int, float, float]], th: Thresholds) -> dict[int, str]:
    """Which gradient-norm spikes (indices) are corroborated, and by what, mirroring the
    loss-spike rule: ``"persists"`` (the median of the ``th.spike_persist`` records after it
    is still ``th.explode_fold`` above the baseline, or one of them is non-finite),
    ``"repeats"`` (another spike within ``th.baseline_window`` records before it) or
    ``"loss"`` (a loss spike candidate at it or within ``spike_persist`` records after).

    A single record of a large gradient that the run absorbs at once - one hard batch, an
    optimizer whose update is bounded whatever the gradient (Adam) - is none of these and
    is not reported. Each verdict uses records up to ``spike_persist`` after the spike, so a
    live run says it that many records later and never takes it back.

    Example:
        >>> one = np.log(np.r_[np.ones(25), 500.0, np.ones(6)])              # absorbed at once
        >>> held = np.log(np.r_[np.ones(25), 500.0, 400.0, 450.0, 500.0, np.ones(3)])
        >>> tr, th = Trace({}, []), Thresholds()
        >>> spikes_corroborated(tr, np.arange(32), one, [(25, 50.0, 0.0)], th)
        {}
        >>> spikes_corroborated(tr, np.arange(32), held, [(25, 50.0, 0.0)], th)
        {25: 'persists'}
    """
    from .loss import spike_indices

    logfold = math.log(th.explode_fold)
    loss_spikes = np.array([], dtype=np.int64)
    if U.has_stat(trace, "loss"):
        lsteps, loss = trace.scalar("loss", with_steps=True)
        loss_spikes = lsteps[[i for i, _, _ in spike_indices(np.asarray(loss, dtype=np.float64), th)]]
    out: dict[int, str] = {}
    prev: list[int] = []
    for i, _, med in spikes:
        nxt = logs[i + 1: i + 1 + th.spike_persist]
        if prev and i - prev[-1] <= th.baseline_window:
            out[i] = "repeats"
            out.setdefault(prev[-1], "repeats")
        elif np.isnan(nxt).any() or (nxt.size == th.spike_persist and float(np.median(nxt)) - med >= logfold):
            out[i] = "persists"
        elif np.any((loss_spikes >= steps[i]) & (loss_spikes <= steps[min(i + th.spike_persist, steps.size - 1)])):
            out[i] = "loss"
        prev.append(i)
    return out


def contained(trace: Trace, steps: list[int], loss_at: dict, level: float, th: Thresholds) -> set[int]:
    """The ``steps`` at which clipping bounded the applied update (a finite post-clip total
    norm was recorded) while the loss held: every loss up to the step finite and no rise
    (:func:`loss_rose`) at it. Empty without post-clip norms or a loss to judge by.

    Example:
        >>> tr = Trace({}, [{"step": s, "scalars": {"loss": 1.0, "total_grad_norm_post_clip": 1.0}}
        ...                 for s in range(30)])
        >>> contained(tr, [25], {s: 1.0 for s in range(30)}, 1.0, Thresholds())
        {25}
        >>> contained(tr, [25], {s: 1.0 + 0.1 * s for s in range(30)}, 1.0, Thresholds())   # rising
        set()
    """
    if not steps or not loss_at or not U.has_stat(trace, "total_grad_norm_post_clip"):
        return set()
    rec_steps, post = trace.series("total_grad_norm_post_clip", with_steps=True)
    post_at = dict(zip(rec_steps.tolist(), post.tolist()))
    lsteps = np.array(sorted(loss_at), dtype=np.int64)
    lvals = np.array([loss_at[k] for k in lsteps.tolist()], dtype=np.float64)
    bad = np.concatenate([[0], np.cumsum(~np.isfinite(lvals))])
    out = set()
    for step in steps:
        v = post_at.get(step)
        n = int(np.searchsorted(lsteps, step, side="right"))
        if v is None or not math.isfinite(v) or n < 4 or bad[n] > 0:
            continue
        if not loss_rose(lvals[max(0, n - 2 * th.baseline_window): n], level, th):
            out.add(step)
    return out


def loss_rose(ls: np.ndarray, level: float, th: Thresholds) -> bool:
    """Did the loss rise at the end of ``ls`` (finite losses in step order)? Over the last
    ``2 * th.baseline_window`` of them (at least 4), the Theil-Sen trend (median of the
    pairwise slopes) times ``th.baseline_window`` (the rise per baseline window: the gap
    between the centres of two adjacent windows) must reach ``th.spike_min_rise`` of the
    run's early loss ``level`` (the spike rule's notion of a real rise).

    A median of pairwise slopes, not the medians of two halves: data loaders that cycle
    through a few batches make the loss periodic, and a half holds an unequal share of the
    hard batches (a 4-batch cycle in a 10-record half reads as a 15 % "rise" that is only
    the phase), while pairwise slopes of a periodic series balance out. One outlier (a
    hard batch) moves the median slope little.

    Example:
        >>> cyc = np.tile([0.78, 0.76, 0.98, 0.92], 10)     # flat, 4 batches cycling
        >>> loss_rose(cyc[:18], 0.9, Thresholds()), loss_rose(cyc * np.linspace(1, 1.3, 40), 0.9, Thresholds())
        (False, True)
    """
    x = ls[-2 * th.baseline_window:]
    if x.size < 4:
        return False
    i, j = np.triu_indices(x.size, 1)
    slope = float(np.median((x[j] - x[i]) / (j - i)))
    return slope * th.baseline_window >= th.spike_min_rise * level


def clipped_norms(trace: Trace, steps: list[int]) -> list[float]:
    """Post-clip total norms at ``steps`` if every one of them was clipped finite, else [].

    Example:
        >>> tr = Trace({}, [{"step": s, "scalars": {"total_grad_norm_post_clip": 1.0}} for s in range(3)])
        >>> clipped_norms(tr, [1, 2]), clipped_norms(tr, [1, 7])
        ([1.0, 1.0], [])
    """
    if not U.has_stat(trace, "total_grad_norm_post_clip"):
        return []
    rec_steps, post = trace.series("total_grad_norm_post_clip", with_steps=True)
    by_step = dict(zip(rec_steps.tolist(), post.tolist()))
    vals = [by_step.get(s) for s in steps]
    if any(v is None or not math.isfinite(v) for v in vals):
        return []
    return vals
