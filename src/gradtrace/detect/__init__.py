"""Diagnosis: pure functions from a :class:`~gradtrace.trace.Trace` to findings.

Each detector is a small function ``(trace, thresholds) -> list[Finding]`` in the module
of its family; :func:`diagnose` runs them all, attaches the checklist fixes rendered for
this model (:mod:`gradtrace.advice`) and sorts the result.
"""
from __future__ import annotations

from typing import Any, Callable

from ..findings import Finding
from ..trace import Trace
from . import activations, gradients, loss, nonfinite, through_time, units
from .thresholds import Thresholds

__all__ = ["diagnose", "Thresholds", "DETECTORS"]

#: Every detector, in the order they run. Each is ``(trace, Thresholds) -> list[Finding]``.
DETECTORS: tuple[Callable[[Trace, Thresholds], list[Finding]], ...] = (
    nonfinite.detect,
    loss.detect_nonfinite,
    loss.detect_spike,
    gradients.detect_depth,
    gradients.detect_over_steps,
    activations.detect,
    units.detect_dead,
    units.detect_saturated,
    through_time.detect,
)


def diagnose(trace: Trace, thresholds: Thresholds | dict[str, Any] | None = None) -> list[Finding]:
    """Find what went wrong in a recorded run.

    Args:
        trace: a :class:`~gradtrace.trace.Trace` (``gt.load(path)`` or ``mon.trace``).
        thresholds: a :class:`Thresholds`, a dict of overrides (``{"spike_z": 6}``) or
            ``None`` for the calibrated defaults. Unknown names raise ``ValueError``.

    Returns:
        Findings sorted errors first, then by ``first_step``. At most one finding per
        kind (``exploding_gradients`` across depth and over the steps are merged).

    Example:
        >>> import gradtrace as gt
        >>> findings = gt.diagnose(mon.trace)                    # doctest: +SKIP
        >>> [(f.kind, f.layers[:1]) for f in findings]           # doctest: +SKIP
        [('nonfinite', ['net.5']), ('loss_nonfinite', [])]
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a gradtrace Trace (gt.load(path) or mon.trace), "
                        f"got {type(trace).__name__}")
    th = Thresholds.coerce(thresholds)
    found: list[Finding] = []
    for det in DETECTORS:
        found.extend(det(trace, th))
    found = _merge(found)
    from ..advice import fixes_for

    for f in found:
        if not f.fixes:
            f.fixes = fixes_for(f.kind, trace, f.layers, evidence=f.evidence)
    found.sort(key=lambda f: (f.severity != "error", f.first_step if f.first_step is not None else 1 << 62,
                              f.kind))
    return found


def _merge(found: list[Finding]) -> list[Finding]:
    """One finding per kind: the earliest keeps its place, later ones add their evidence."""
    by_kind: dict[str, Finding] = {}
    for f in found:
        if f.kind not in by_kind:
            by_kind[f.kind] = f
            continue
        a = by_kind[f.kind]
        first, second = (a, f) if (a.first_step or 0) <= (f.first_step or 0) else (f, a)
        lasts = [x for x in (a.last_step, f.last_step) if x is not None]
        also = first.evidence.get("also", []) + [second.evidence]   # every merged finding kept
        merged = Finding(first.kind, "error" if "error" in (a.severity, f.severity) else "warning",
                         first.layers + [l for l in second.layers if l not in first.layers],
                         first.first_step, max(lasts) if lasts else None,
                         {**first.evidence, "also": also},
                         first.explanation + " " + second.explanation, [])
        by_kind[f.kind] = merged
    return list(by_kind.values())
