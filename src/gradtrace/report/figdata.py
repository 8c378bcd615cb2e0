"""The numbers behind the report's figures, read through the Trace query API only.

Per-layer gradient norms (the parameters of one module combined), activation
statistics per module in forward order, the loss spikes to mark, per-time-step
gradients, and :func:`downsample`, which shrinks a long series to a bounded number of
points keeping each bucket's minimum and maximum (a one-step spike survives).

Example:
    >>> steps, layers, g = layer_grad_norms(gt.load("runs/exp1"))
    >>> g.shape == (30, len(layers))
    True
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np


def layer_order(trace) -> list[str]:
    """Modules that own watched parameters, input side first (forward order).

    Example:
        >>> layer_order(gt.load("runs/exp1"))
        ['0', '2', '4']
    """
    return [layer.name for layer in trace.layers(with_params=True)]


def raw_matrix(trace, stat: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``trace.matrix(stat)`` with "not recorded" and "non-finite" kept apart for drawing.

    Not recorded is NaN; a recorded nan/inf becomes ``+inf`` (drawn red), so a layer
    whose gradient turned to nan is not mistaken for a layer with no data.

    Example:
        >>> steps, names, g = raw_matrix(gt.load("runs/exp1"), "grad_norm")
        >>> g.shape
        (30, 6)
    """
    m = trace.matrix(stat)
    values = np.where(m.recorded & ~np.isfinite(m.values), np.inf, m.values)
    return m.steps, m.names, values


def layer_grad_norms(trace) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Gradient norm per layer (parameters of one module combined) at every recorded step.

    Returns ``(steps, layers, values)`` with ``values`` of shape (steps, layers);
    NaN where nothing was recorded, ``inf`` where a recorded norm was not finite.

    Example:
        >>> steps, layers, g = layer_grad_norms(gt.load("runs/exp1"))
        >>> layers, bool(np.isfinite(g).all())
        (['0', '2', '4'], True)
    """
    layers = layer_order(trace)
    if "grad_norm" not in trace.stats():
        return np.zeros(0, dtype=np.int64), layers, np.zeros((0, len(layers)))
    steps, names, g = raw_matrix(trace, "grad_norm")
    col = {n: i for i, n in enumerate(layers)}
    owner = np.zeros((len(names), len(layers)))          # parameter -> its layer, as a 0/1 matrix
    for j, name in enumerate(names):
        i = col.get(trace.owner(name))
        if i is not None:
            owner[j, i] = 1.0
    got = ~np.isnan(g)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.where(got, g, 0.0) ** 2 @ owner             # inf stays inf: drawn red
    seen = got.astype(np.float64) @ owner > 0
    out = np.full(sq.shape, np.nan)
    out[seen] = np.sqrt(sq[seen])
    return steps, layers, out


def gradient_flow(trace) -> dict[str, Any]:
    """Mean and max gradient norm of each layer over the run, input side first.

    Non-finite steps are left out of the mean (they are reported elsewhere).

    Example:
        >>> flow = gradient_flow(gt.load("runs/exp1"))
        >>> flow["layers"], bool((flow["max"] >= flow["mean"]).all())
        (['0', '2', '4'], True)
    """
    steps, layers, g = layer_grad_norms(trace)
    fin = np.where(np.isfinite(g), g, np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)       # all-nan layers stay nan
        mean = np.nanmean(fin, axis=0) if len(steps) else np.full(len(layers), np.nan)
        mx = np.nanmax(fin, axis=0) if len(steps) else np.full(len(layers), np.nan)
    return {"layers": layers, "mean": mean, "max": mx, "steps": steps}


def module_rows(trace, stat: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A per-module statistic as a (modules × steps) array, forward order, keeping the
    modules that have it.

    Example:
        >>> steps, mods, m = module_rows(gt.load("runs/exp1"), "zero_frac")
        >>> mods, m.shape[0]
        (['1', '3'], 2)
    """
    if stat not in trace.stats():
        return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0))
    have = trace.names(stat)
    order = [n for n in trace.exec_order() if n in set(have)]
    steps, names, v = raw_matrix(trace, stat)
    col = {n: j for j, n in enumerate(names)}
    return steps, order, v[:, [col[n] for n in order]].T


def layer_exec_rank(trace) -> dict[str, int]:
    """Module name -> position in forward order.

    Example:
        >>> from gradtrace.trace import Trace
        >>> t = Trace({"modules": [{"name": "a"}, {"name": "b"}]}, [{"step": 0, "exec_order": ["b"]}])
        >>> layer_exec_rank(t)
        {'b': 0, 'a': 1}
    """
    return {n: i for i, n in enumerate(trace.exec_order())}


def loss_spikes(steps: np.ndarray, loss: np.ndarray, thresholds=None) -> list[int]:
    """Steps the loss-spike rule of :func:`gradtrace.diagnose` flags (same
    ``Thresholds``), plus the start of each non-finite stretch. The report itself marks
    the findings' spikes (:func:`spike_marks`); this is for callers without findings.

    Example:
        >>> loss_spikes(np.arange(30), np.r_[np.ones(25), 50.0, np.ones(4)])
        [25]
    """
    from ..diagnose import loss_spike_candidates

    out = set(loss_spike_candidates(steps, loss, thresholds))
    bad = ~np.isfinite(loss)
    out |= {int(steps[k]) for k in np.nonzero(bad)[0] if k == 0 or not bad[k - 1]}
    return sorted(out)


def spike_marks(steps: np.ndarray, loss: np.ndarray, findings: Sequence[Any] = ()) -> list[int]:
    """Loss steps a chart marks: the spikes the diagnosis reported (a ``loss_spike``
    finding's ``spike_steps``, a loss finding's first step) and the start of each
    non-finite stretch of the loss. The report draws what :func:`gradtrace.diagnose`
    judged; it does not judge again.

    Example:
        >>> from gradtrace.diagnose import Finding
        >>> f = Finding("loss_spike", "warning", [], 25, 25, {"spike_steps": [25]}, "", [])
        >>> spike_marks(np.arange(30), np.r_[np.ones(27), np.nan, 1.0, 1.0], [f])
        [25, 27]
    """
    from ..diagnose.evidence import LossSpike     # lazily, like the report's other diagnose imports

    out: set[int] = set()
    for f in findings:
        if getattr(f, "kind", "") in ("loss_spike", "loss_nonfinite") and f.first_step is not None:
            ev = f.evidence
            spikes = ev.spike_steps if isinstance(ev, LossSpike) else None
            listed = [f.first_step] if spikes is None else spikes
            out.update(int(s) for s in listed if isinstance(s, (int, float)))
    bad = ~np.isfinite(np.asarray(loss, dtype=np.float64))
    out |= {int(steps[k]) for k in np.nonzero(bad)[0] if k == 0 or not bad[k - 1]}
    return sorted(out)


def time_gradients(trace) -> dict[str, np.ndarray]:
    """Gradient norm reaching each input time step of each recurrent layer, per record.

    Example:
        >>> time_gradients(gt.load("runs/exp1"))      # recorded with time_gradients=True only
        {}
    """
    if "time_grad_norm" not in trace.stats():
        return {}
    out = {}
    for n in trace.names("time_grad_norm"):
        v = trace.series("time_grad_norm", n)
        if v.dtype != object:
            out[n] = v
    return out


def downsample(x: np.ndarray, y: np.ndarray, max_points: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """At most about ``max_points`` points of the line ``(x, y)``: each of ``max_points // 2``
    buckets keeps its minimum and maximum, in step order, so spikes survive; a non-finite
    value in a bucket is kept too (drawn as a gap with a red mark).

    Example:
        >>> x = np.arange(100_000); y = np.ones(100_000); y[54_321] = 1e6
        >>> xs, ys = downsample(x, y, 200)
        >>> len(xs) <= 200, float(ys.max()), int(xs[ys.argmax()])
        (True, 1000000.0, 54321)
    """
    x = np.asarray(x)
    y = np.asarray(y, dtype=np.float64)
    n = y.size
    buckets = max(1, max_points // 2)
    if n <= max_points:
        return x, y
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)
    finite = np.where(np.isfinite(y), y, np.nan)
    keep: list[np.ndarray] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for a, b in zip(edges[:-1], edges[1:]):
            seg = finite[a:b]
            if np.isnan(seg).all():
                keep.append(np.array([a]))
                continue
            lo, hi = a + int(np.nanargmin(seg)), a + int(np.nanargmax(seg))
            bad = np.flatnonzero(~np.isfinite(y[a:b]))
            extra = [a + int(bad[0])] if bad.size else []
            keep.append(np.unique([lo, hi, *extra]))
    idx = np.concatenate(keep)
    return x[idx], y[idx]
