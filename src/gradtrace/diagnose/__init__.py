"""Diagnosis: pure functions from a :class:`~gradtrace.trace.Trace` to frozen findings.

Each detector is a small function ``(trace, thresholds) -> list[Finding]`` in the module
of its family; :func:`diagnose` runs them all, merges one finding per kind and ranks the
result root cause first. Every finding's evidence is checked against its typed declaration
in :mod:`~gradtrace.diagnose.evidence` (a detector whose keys drifted raises ``ValueError``).
Fixes are added afterwards by :mod:`gradtrace.advise` (the
public ``gt.diagnose`` composes the two); this package never imports it.

Every detector judges each step against the steps before it (or a window ending at it),
so a finding made on a run's first ``s`` steps is made again on any longer prefix:
``diagnose(trace.upto(s))`` is what a live run said at step ``s`` and stays part of the
final diagnosis (with ``evidence["resolved"]`` when the condition has ended).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from . import evidence
from .evidence import EVIDENCE, Evidence
from .finding import KINDS, Finding, Fix
from ..trace import Trace
from . import activations, gradients, headroom, loss, nonfinite, through_time, units
from .loss import spike_indices as _spike_indices
from .thresholds import Thresholds

__all__ = ["diagnose", "rank", "loss_spike_candidates", "Thresholds", "DETECTORS", "Finding", "Fix",
           "KINDS", "Evidence", "EVIDENCE", "evidence"]

#: Every detector, in the order they run. Each is ``(trace, Thresholds) -> list[Finding]``.
DETECTORS: tuple[Callable[[Trace, Thresholds], list[Finding]], ...] = (
    nonfinite.detect,
    loss.detect_nonfinite,
    loss.detect_spike,
    gradients.detect_depth,
    gradients.detect_over_steps,
    activations.detect,
    headroom.detect,
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
        Frozen findings without fixes (``gt.diagnose`` adds them), ranked by :func:`rank`.
        At most one finding per kind (``exploding_gradients`` across depth and over the
        steps are merged).

    Example:
        >>> from gradtrace.diagnose import diagnose
        >>> [f.kind for f in diagnose(gt.load("runs/exp1"))]
        []
    """
    if not isinstance(trace, Trace):
        raise TypeError(f"trace must be a gradtrace Trace (gt.load(path) or mon.trace), "
                        f"got {type(trace).__name__}")
    th = Thresholds.coerce(thresholds)
    found: list[Finding] = []
    for det in DETECTORS:
        found.extend(evidence.check(f) for f in det(trace, th))
    return rank(_merge(found))


def loss_spike_candidates(steps, loss, thresholds: Thresholds | dict[str, Any] | None = None) -> list[int]:
    """Steps whose loss the loss-spike rule flags as a candidate (robust z, fold and rise
    over the trailing baseline; before the corroboration that :func:`diagnose` also
    asks for). For charts of a loss series that has no findings to go with it.

    Example:
        >>> import numpy as np
        >>> loss_spike_candidates(np.arange(30) * 10, np.r_[np.ones(25), 50.0, np.ones(4)])
        [250]
    """
    th = Thresholds.coerce(thresholds)
    steps = np.asarray(steps)
    loss = np.asarray(loss, dtype=np.float64)
    if steps.shape != loss.shape:
        raise ValueError(f"steps and loss must have the same length, got {steps.shape} and {loss.shape}")
    return [int(steps[i]) for i, _, _ in _spike_indices(loss, th)]


#: When two findings start at the same step, the one that usually causes the other comes
#: first: a nan's origin before the nan loss, dead units before the vanishing gradient they
#: cut off, a gradient explosion before the loss spike it makes, saturation last.
CAUSAL_ORDER = ("nonfinite", "dead_units", "exploding_gradients", "exploding_through_time",
                "near_overflow", "growing_activations", "loss_spike", "loss_nonfinite", "vanishing_gradients",
                "vanishing_through_time", "shrinking_activations", "saturated_units")


def rank(findings: list[Finding]) -> list[Finding]:
    """Root cause first: the earliest finding leads (what went wrong first usually made
    the rest), ties broken by :data:`CAUSAL_ORDER`; a finding without a step goes last.

    Example:
        >>> a = Finding("vanishing_gradients", "error", ["0"], 0, 9)
        >>> b = Finding("dead_units", "warning", ["1"], 0, 9)
        >>> [f.kind for f in rank([a, b])]
        ['dead_units', 'vanishing_gradients']
    """
    pos = {k: i for i, k in enumerate(CAUSAL_ORDER)}
    return sorted(findings, key=lambda f: (f.first_step if f.first_step is not None else 1 << 62,
                                           pos.get(f.kind, len(pos)), f.kind))


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
        also = [*(first.evidence.also or ()), second.evidence]   # every merged finding kept
        merged = Finding(first.kind, "error" if "error" in (a.severity, f.severity) else "warning",
                         first.layers + [l for l in second.layers if l not in first.layers],
                         first.first_step, max(lasts) if lasts else None,
                         {**first.evidence, "also": also},
                         first.explanation + " " + second.explanation)
        by_kind[f.kind] = merged
    return list(by_kind.values())
