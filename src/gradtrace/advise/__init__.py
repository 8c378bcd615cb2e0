"""Advice: the chapter's Stable Training Checklist, rendered into fixes for one run.

:data:`CHECKLIST` holds the seven rows (problem -> common fix), :data:`KIND_ROWS` maps every
finding kind to the rows that address it, :data:`RENDERERS` holds one renderer per row.
:func:`advise` returns new findings with their fixes (findings are frozen);
:func:`fixes_for` renders the rows for one kind. Fixes point at gradtrace's remedies
(``gt.clip_grad_norm_``, ``gt.Guard``, ``gt.init_for_activation`` ...) and use the run's
recorded layers, dtype, device and learning rate at the failing step.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterable

from ..diagnose.evidence import Evidence, coerce
from ..diagnose.finding import KINDS, Finding, Fix
from .checklist import CHECKLIST, DEFAULT_MAX_NORM, KIND_ROWS, LR_CUT, MAX_LINES, ChecklistRow
from .context import RunContext, module_ref
from .rows import RENDERERS

__all__ = ["advise", "fixes_for", "CHECKLIST", "KIND_ROWS", "RENDERERS", "ChecklistRow", "module_ref",
           "RunContext", "LR_CUT", "DEFAULT_MAX_NORM", "MAX_LINES"]


def advise(findings: Iterable[Finding], trace: Any = None) -> list[Finding]:
    """The findings again, each with the checklist fixes rendered for this run.

    Findings that already carry fixes (preflight's) are kept as they are; the others are
    copied with ``dataclasses.replace`` (a :class:`Finding` is frozen).

    Args:
        findings: from :func:`gradtrace.diagnose.diagnose` (or preflight).
        trace: the run's :class:`~gradtrace.trace.Trace`, a context dict (see
            :func:`fixes_for`) or ``None`` for generic fixes.

    Example:
        >>> from gradtrace.diagnose import Finding
        >>> f = Finding("loss_nonfinite", "error", [], 7, 7, {"lr": 0.1})
        >>> [x.code for x in advise([f], {"lr": 0.1})[0].fixes][0]
        "for group in optimizer.param_groups: group['lr'] = 0.01"
    """
    ctx = RunContext(trace)
    out = []
    for f in findings:
        if not isinstance(f, Finding):
            raise TypeError(f"findings must be Finding objects, got {type(f).__name__}")
        out.append(f if f.fixes else dataclasses.replace(
            f, fixes=_render(f.kind, ctx, list(f.layers), f.evidence, f.first_step)))
    return out


def fixes_for(kind: str, trace_or_context: Any = None, layers: list[str] | None = None, *,
              evidence: Mapping[str, Any] | None = None, step: int | None = None) -> list[Fix]:
    """Checklist rows for a finding kind, rendered for this model.

    Args:
        kind: a finding kind (see :data:`gradtrace.KINDS`).
        trace_or_context: the run's :class:`~gradtrace.trace.Trace`, or a dict with any of
            ``modules``/``params`` (as in the trace's meta), ``exec_order``, ``lr``,
            ``time_steps``, ``dtype``, ``device``; or ``None`` for generic rows.
        layers: the finding's layers (qualified names, most affected first).
        evidence: the finding's evidence (its typed :mod:`~gradtrace.diagnose.evidence`
            object or a dict of any of its fields), used to tune the rows (e.g. the cause
            of a nan).
        step: the finding's first step (the learning rate quoted is the one in force then).

    Example:
        >>> ctx = {"modules": [{"name": "net.2", "type": "Linear", "activation": None, "params": ["net.2.weight"]},
        ...                    {"name": "net.3", "type": "ReLU", "activation": "relu", "params": []}], "lr": 0.5}
        >>> fixes_for("dead_units", ctx, ["net.3"])[0].code
        'model.net[3] = nn.LeakyReLU(0.01)'
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a finding kind; valid: {', '.join(KINDS)}")
    if layers is None:
        layers = []
    if isinstance(layers, str) or not all(isinstance(l, str) for l in layers):
        raise TypeError("layers must be a list of qualified module names (str)")
    if evidence is not None and not isinstance(evidence, Mapping):
        raise TypeError(f"evidence must be a dict, a typed Evidence or None, got {type(evidence).__name__}")
    return _render(kind, RunContext(trace_or_context), list(layers), coerce(kind, evidence), step)


def _render(kind: str, ctx: RunContext, layers: list[str], evidence: Evidence, step: int | None) -> list[Fix]:
    out: list[Fix] = []
    for key in KIND_ROWS[kind]:
        out.extend(RENDERERS[key](CHECKLIST[key], kind, ctx, layers, evidence, step))
    return out
