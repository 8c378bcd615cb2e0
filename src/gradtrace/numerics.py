"""Numbers shared by every layer: one robust z-score, one way to print a number.

Example:
    >>> round(robust_z(10.0, [1.0, 1.1, 0.9, 1.0, 1.05]), 1)
    121.4
    >>> fmt(0.00000095367), fmt(0.04123), fmt(640000000.0), fmt(12.5)
    ('9.54e-07', '0.0412', '6.4e+08', '12.5')
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

#: Scale turning a median absolute deviation into a standard deviation for normal data.
MAD_TO_SD = 1.4826
#: Smallest robust spread, relative to the baseline median: a perfectly flat baseline
#: must not turn any wobble into an infinite z (Guard and diagnosis share this floor).
MIN_REL_SPREAD = 1e-3


def robust_z(x: float, baseline: Iterable[float] | np.ndarray) -> float:
    """How many robust standard deviations ``x`` lies above the median of ``baseline``.

    ``(x - median) / max(1.4826 * MAD, 1e-3 * |median|)`` (the floor, plus 1e-12, keeps
    a constant history from making every small change a spike). Non-finite baseline
    values are ignored; an empty baseline gives ``nan``.

    Example:
        >>> round(robust_z(10.0, [1.0, 2.0, 3.0]), 2)
        5.4
    """
    arr = np.asarray(list(baseline) if not isinstance(baseline, np.ndarray) else baseline,
                     dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan
    med = float(np.median(arr))
    mad = float(np.median(np.abs(arr - med)))
    spread = max(MAD_TO_SD * mad, MIN_REL_SPREAD * abs(med) + 1e-12)
    return (float(x) - med) / spread


def fmt(v: Any, digits: int = 3) -> str:
    """A number for people: ``3.2e-07``, ``0.0412``, ``12.5``, ``nan``; ``–`` for None.

    Example:
        >>> fmt(None), fmt(float("inf")), fmt(0)
        ('–', 'inf', '0')
    """
    if v is None:
        return "–"
    if isinstance(v, (bool, str)):
        return str(v)
    v = float(v)
    if not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    if abs(v) >= 1e5 or abs(v) < 1e-3:
        mant, exp = f"{v:.{max(digits - 1, 0)}e}".split("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{exp}"
    return f"{v:.{digits}g}"


def fmt_code(x: float) -> str:
    """A number as it reads in Python source, always a float: ``0.05``, ``1.0``, ``3e-05``.

    Example:
        >>> fmt_code(1), fmt_code(3e-05), fmt_code(0.05)
        ('1.0', '3e-05', '0.05')
    """
    out = f"{float(x):.3g}"
    return out if any(c in out for c in ".en") else out + ".0"
