"""Reduced-precision outputs running out of range: ``near_overflow`` before the inf.

float16 holds nothing above 65504. A module that computes in it (an attention-logit
product under autocast, a half-precision model) and whose largest output keeps growing
will pass that value, turn it into ``inf``, and the next softmax, norm or loss turns the
``inf`` into nan. The nan itself is the ``nonfinite`` detector's; this one reads the
recorded output dtype (:meth:`~gradtrace.trace.Trace.out_dtypes`) and the largest output
magnitude (``out_maxabs``, on activation steps) and says so while there is still room.
"""
from __future__ import annotations

import math

import numpy as np

from . import _util as U
from .finding import Finding
from ..trace import Trace
from .thresholds import Thresholds

__all__ = ["detect", "dtype_max", "REDUCED"]

#: Floating dtypes judged here (8 and 16 bits). float32 and float64 are left out on purpose:
#: a value near 3.4e38 is a divergence the gradient and loss rules have long reported.
REDUCED = ("float16", "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")


def dtype_max(name: str) -> float | None:
    """Largest finite value of a reduced-precision dtype named as in the trace, else ``None``.

    Example:
        >>> dtype_max("float16"), dtype_max("float32")
        (65504.0, None)
    """
    if name not in REDUCED:
        return None
    import torch

    dt = getattr(torch, name, None)
    return float(torch.finfo(dt).max) if isinstance(dt, torch.dtype) else None


def _growth(steps: np.ndarray, logs: np.ndarray) -> float:
    """Factor per step of a least-squares line through ``log(max)`` against the step."""
    if steps.size < 2 or np.ptp(steps) == 0:
        return 1.0
    return math.exp(float(np.polyfit(steps.astype(np.float64), logs, 1)[0]))


def detect(trace: Trace, th: Thresholds) -> list[Finding]:
    """``near_overflow``: a module whose output dtype has 8 or 16 bits, whose largest
    output magnitude is within ``th.overflow_headroom`` of that dtype's largest finite
    value and still rising.

    Per module and activation record (before the first non-finite step): the record is
    flagged when ``out_maxabs >= dtype_max / th.overflow_headroom`` and it is rising: the
    largest value of the run so far, with a growth per step above 1, fitted (least squares
    on the log) over the module's last ``th.overflow_trend_window`` records up to it (a full
    window: a few records show no trend). A large output that has stopped growing, or
    wanders about one level, is no warning. The finding starts at the first flagged record;
    layers: every flagged module, least headroom first. Its evidence projects the steps
    left at that growth.

    Example:
        >>> detect(gt.load("runs/exp1"), Thresholds())      # a float32 run
        []
    """
    got = U.module_matrix(trace, "out_maxabs")
    if got is None:
        return []
    steps, names, values = got
    reduced = {m: (d, dtype_max(d)) for m, d in trace.out_dtypes().items() if dtype_max(d)}
    if not reduced:
        return []
    before = U.before_nonfinite(steps, trace)
    hits = []   # per flagged module: (first flagged step, headroom there, module, figures, last flagged step)
    for j, name in enumerate(names):
        if name in reduced:
            ok = before & np.isfinite(values[:, j]) & (values[:, j] > 0)
            hit = _module(steps[ok], values[ok, j].astype(np.float64), name, *reduced[name], th)
            if hit is not None:
                hits.append(hit)
    if not hits:
        return []
    hits.sort(key=lambda h: (h[0], h[1]))
    first, _, module, ev, _ = hits[0]
    last = max(h[4] for h in hits)
    ev["headroom_per_module"] = {h[2]: h[1] for h in sorted(hits, key=lambda h: h[1])}
    fmax, dtype = ev["dtype_max"], ev["dtype"]
    ev["summary"] = (f"{module} ({dtype}) output reached |{U.sci(ev['max_abs'])}| at step {first}, "
                     f"{U.sci(ev['headroom'])}x below {dtype}'s largest value {U.sci(fmax)}, growing "
                     f"x{U.sci(ev['growth_per_step'], 4)} per step (about {ev['steps_to_overflow']:.0f} "
                     "steps to inf at that rate)")
    expl = (f"`{module}` computes in {dtype}, whose largest finite value is {U.sci(fmax)}. Its largest output "
            f"magnitude was {U.sci(ev['max_abs'])} at step {first} and has grown by about "
            f"x{U.sci(ev['growth_per_step'], 4)} per step over its last {len(ev['window'])} records: at that "
            f"rate it passes {U.sci(fmax)} in about {ev['steps_to_overflow']:.0f} steps, becomes inf, and the "
            "softmax, normalisation or loss after it turns the inf into nan. Attention logits q.k do this "
            "when nothing bounds the query and key norms (no 1/sqrt(head_dim) scaling, no qk-LayerNorm) and "
            "the learning rate lets the projections grow.")
    layers = [module] + [m for m in ev["headroom_per_module"] if m != module]
    return [Finding("near_overflow", "warning", layers, first, last, ev, expl)]


def _module(s: np.ndarray, v: np.ndarray, name: str, dtype: str, fmax: float, th: Thresholds):
    """The rule on one module's finite records (steps ``s``, largest magnitudes ``v``):
    ``(first flagged step, headroom, name, figures, last flagged step)`` or ``None``."""
    logs = np.log(v)
    w = th.overflow_trend_window
    high = np.maximum.accumulate(v) if v.size else v
    flagged = []
    for i in np.flatnonzero((v >= fmax / th.overflow_headroom) & (v >= high)):
        lo = i - w + 1
        if lo < 0:
            continue                 # too few records for a trend
        g = _growth(s[lo:i + 1], logs[lo:i + 1])
        if g > 1.0:
            flagged.append((int(i), g, lo))
    if not flagged:
        return None
    i, g, lo = flagged[0]
    room = fmax / float(v[i])
    figures = {"module": name, "dtype": dtype, "dtype_max": fmax, "max_abs": float(v[i]),
               "headroom": room, "growth_per_step": g, "steps_to_overflow": math.log(room) / math.log(g),
               "window": {str(int(a)): float(b) for a, b in zip(s[lo:i + 1], v[lo:i + 1])},
               "steps_flagged": len(flagged), "steps_examined": int(s.size),
               "resolved": flagged[-1][0] != s.size - 1}
    return int(s[i]), room, name, figures, int(s[flagged[-1][0]])
