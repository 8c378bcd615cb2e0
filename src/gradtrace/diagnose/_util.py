"""Small numeric and naming helpers shared by the detectors (pure functions)."""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import numerics
from ..trace import Trace
from .thresholds import Thresholds

def has_stat(trace: Trace, stat: str) -> bool:
    """True if ``stat`` was recorded anywhere in ``trace``."""
    try:
        trace.kind_of(stat)
        return True
    except KeyError:
        return False


def module_matrix(trace: Trace, stat: str):
    """``(steps, names, values)`` of a per-module statistic, or ``None`` if absent."""
    if not has_stat(trace, stat):
        return None
    steps, names, values = trace.matrix(stat)
    if values.size == 0:
        return None
    return steps, names, values


def exec_order(trace: Trace) -> list[str]:
    """Module names in forward (first-call) order (:meth:`Trace.exec_order`)."""
    return trace.exec_order()


def exec_order_at(trace: Trace, step: int) -> list[str]:
    """The execution order known at ``step`` (:meth:`Trace.exec_order`)."""
    return trace.exec_order(step)


def weight_modules(trace: Trace) -> set[str]:
    """Modules that own parameters (the "layers" of a depth profile)."""
    return {m["name"] for m in trace.meta.get("modules", []) if m.get("params")}


def param_owner(trace: Trace) -> dict[str, str]:
    """Parameter name -> owning module name."""
    return {p["name"]: p.get("module") or p["name"].rpartition(".")[0]
            for p in trace.meta.get("params", [])}


def activation_of(trace: Trace, module: str) -> str | None:
    for m in trace.meta.get("modules", []):
        if m["name"] == module:
            return m.get("activation")
    return None


def robust_z(x: float, baseline: np.ndarray) -> tuple[float, float]:
    """:func:`gradtrace.numerics.robust_z` of ``x`` against ``baseline`` (the one robust
    z-score, shared with ``Guard``), and the baseline median.

    Example:
        >>> round(robust_z(10.0, np.array([1.0, 1.1, 0.9, 1.0, 1.05]))[0])
        121
    """
    return numerics.robust_z(x, baseline), float(np.median(baseline))


def _row_medians(sorted_rows: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Medians of rows sorted ascending with their ``counts`` finite values first (nan
    after), computed as :func:`numpy.median` does: the middle value, or the mean of the two
    middle values ``(a + b) / 2``, so the result is bit-for-bit the same."""
    rows = np.arange(sorted_rows.shape[0])
    hi = np.clip(counts // 2, 0, sorted_rows.shape[1] - 1)
    lo = np.clip((counts - 1) // 2, 0, sorted_rows.shape[1] - 1)
    a, b = sorted_rows[rows, lo], sorted_rows[rows, hi]
    with np.errstate(invalid="ignore", over="ignore"):
        med = np.where(counts % 2 == 1, b, (a + b) / 2.0)
    return np.where(counts > 0, med, np.nan)


#: Cells (rows x window) sorted at once by :func:`trailing_robust_z`: bounds its memory.
_CHUNK_CELLS = 1 << 20


def trailing_robust_z(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For every index ``i``: the robust z-score of ``values[i]`` against the finite values
    among the ``window`` before it (:func:`gradtrace.numerics.robust_z`, same constants and
    the same arithmetic, so identical to calling it per index), their median, and how many
    there were. ``nan`` z and median where that baseline is empty. Vectorised over a
    sliding window, in chunks of rows so memory stays bounded on long runs.

    Example:
        >>> z, med, n = trailing_robust_z(np.array([1.0, 1.1, np.inf, 0.9, 10.0]), 3)
        >>> n.tolist(), float(med[4]), round(float(z[4]), 1)
        ([0, 1, 2, 2, 2], 1.0, 60.7)
    """
    x = np.asarray(values, dtype=np.float64)
    n = x.size
    z, med, cnt = np.full(n, np.nan), np.full(n, np.nan), np.zeros(n, dtype=np.int64)
    if n == 0 or window < 1:
        return z, med, cnt
    clean = np.where(np.isfinite(x), x, np.nan)
    # row i of the view is clean[i - window: i] (nan before the start of the series)
    padded = np.concatenate([np.full(window, np.nan), clean[:-1]]) if n > 1 else np.full(window, np.nan)
    view = np.lib.stride_tricks.sliding_window_view(padded, window)
    step = max(1, _CHUNK_CELLS // window)
    for lo in range(0, n, step):
        rows = np.sort(view[lo: lo + step], axis=1)          # nan sorts last
        c = np.isfinite(rows).sum(axis=1)
        m = _row_medians(rows, c)
        dev = np.sort(np.abs(rows - m[:, None]), axis=1)
        mad = _row_medians(dev, c)
        spread = np.maximum(numerics.MAD_TO_SD * mad, numerics.MIN_REL_SPREAD * np.abs(m) + 1e-12)
        with np.errstate(invalid="ignore", over="ignore"):
            z[lo: lo + step] = (x[lo: lo + step] - m) / spread
        med[lo: lo + step], cnt[lo: lo + step] = m, c
    return z, med, cnt


def window_medians(values: np.ndarray, window: int) -> np.ndarray:
    """``out[r]`` is ``np.median(values[r: r + window])`` for every full window (finite
    values assumed), bit-for-bit; vectorised and chunked like :func:`trailing_robust_z`.

    Example:
        >>> window_medians(np.array([3.0, 1.0, 2.0, 8.0]), 2).tolist()
        [2.0, 1.5, 5.0]
    """
    x = np.asarray(values, dtype=np.float64)
    if window < 1 or x.size < window:
        return np.zeros(0)
    view = np.lib.stride_tricks.sliding_window_view(x, window)
    out = np.empty(view.shape[0])
    step = max(1, _CHUNK_CELLS // window)
    full = np.full(min(step, view.shape[0]), window)
    for lo in range(0, view.shape[0], step):
        rows = np.sort(view[lo: lo + step], axis=1)
        out[lo: lo + step] = _row_medians(rows, full[: rows.shape[0]])
    return out


def trailing_spikes(values: np.ndarray, *, warmup: int, window: int, min_baseline: int,
                    z_limit: float) -> list[tuple[int, float, float]]:
    """Indices whose value is ``z_limit`` robust z-scores above the preceding window.

    Non-finite values never enter a baseline and are never reported.
    Returns ``(index, z, baseline median)`` triples.

    Example:
        >>> [(i, round(z), med) for i, z, med in trailing_spikes(
        ...     np.r_[np.ones(10), 9.0], warmup=5, window=5, min_baseline=3, z_limit=5)]
        [(10, 8000, 1.0)]
    """
    values = np.asarray(values, dtype=np.float64)
    z, med, cnt = trailing_robust_z(values, window)
    judged = np.zeros(values.size, dtype=bool)
    judged[max(warmup, 1):] = True
    with np.errstate(invalid="ignore"):
        hit = judged & np.isfinite(values) & (cnt >= min_baseline) & (z > z_limit)
    return [(int(i), float(z[i]), float(med[i])) for i in np.flatnonzero(hit)]


def persistent(hit: np.ndarray, th: Thresholds) -> np.ndarray:
    """Causal persistence: ``out[i]`` is True when ``hit[i]`` and at least
    ``ceil(th.persist_frac * th.persist_window)`` of the last ``th.persist_window`` judged
    steps up to ``i`` hit (so a condition seen on fewer steps than that is not a finding:
    a network at initialisation is not yet the network that trains).

    Each ``out[i]`` depends on steps ``<= i`` only, so a step flagged on a prefix of the run
    stays flagged on every longer prefix (the live view and the final diagnosis agree).

    Example:
        >>> persistent(np.array([True, False, True, True, False, True]), Thresholds()).tolist()
        [False, False, False, True, False, True]
    """
    hit = np.asarray(hit, dtype=bool)
    out = np.zeros(hit.size, dtype=bool)
    csum = np.concatenate([[0], np.cumsum(hit)])
    w = th.persist_window
    need = max(1, math.ceil(th.persist_frac * w))
    for i in np.flatnonzero(hit):
        out[i] = csum[i + 1] - csum[max(0, i - w + 1)] >= need
    return out


def fit_gain(logs: np.ndarray) -> tuple[float, float]:
    """Least-squares slope of ``logs`` against depth, and the median step.

    Both are per-layer log factors (log of the ratio layer k+1 / layer k).
    """
    n = logs.size
    x = np.arange(n, dtype=np.float64)
    slope = float(np.polyfit(x, logs, 1)[0]) if n >= 2 else 0.0
    med = float(np.median(np.diff(logs))) if n >= 2 else 0.0
    return slope, med


def sci(x: float, digits: int = 3) -> str:
    """Compact number for evidence strings: :func:`gradtrace.numerics.fmt` (the one format).

    Example:
        >>> sci(0.5), sci(2e-06)
        ('0.5', '2e-06')
    """
    return numerics.fmt(x, digits)


def join_names(names: list[str], limit: int = 6) -> str:
    """``a, b, c`` (and ``... and N more``)."""
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" and {len(names) - limit} more"
    return shown


def finite_float(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def first_nonfinite_step(trace: Trace) -> int | None:
    """The step of the first ``nonfinite`` event (or non-finite loss), else ``None``.

    Statistics recorded from then on describe nan-filled weights, not the model: the
    unit and activation detectors only look before it.
    """
    steps = [int(e["step"]) for e in trace.events("nonfinite")]
    if has_stat(trace, "loss"):
        s, loss = trace.series("loss", with_steps=True)
        bad = s[~np.isfinite(loss)]
        if bad.size:
            steps.append(int(bad[0]))
    return min(steps) if steps else None


def before_nonfinite(steps: np.ndarray, trace: Trace) -> np.ndarray:
    """Boolean mask of ``steps`` strictly before the first non-finite step."""
    cut = first_nonfinite_step(trace)
    if cut is None:
        return np.ones(len(steps), dtype=bool)
    return np.asarray(steps) < cut
