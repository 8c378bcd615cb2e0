"""Reports of a trace: a terminal table, a self-contained HTML page, PNG plots.

* :func:`report` writes one HTML page (inline SVG, no scripts, no network) for a trace.
* :mod:`gradtrace.report.terminal` renders the ``gradtrace show`` table.
* the figures: :mod:`~gradtrace.report.figdata` (their numbers, read through the Trace
  query API), :mod:`~gradtrace.report.svg` (primitives), :mod:`~gradtrace.report.figures`
  (the report's SVG figures) and :mod:`~gradtrace.report.png` (matplotlib, imported only
  when PNGs are asked for).

Example:
    >>> import gradtrace as gt
    >>> gt.report(gt.load("runs/exp1"), "runs/exp1/report.html", findings=[])
    PosixPath('runs/exp1/report.html')
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

__all__ = ["report", "diagnose_trace", "summarize"]


def diagnose_trace(trace) -> list:
    """Findings of :func:`gradtrace.diagnose` for ``trace`` (the reports' one entry to it).

    Example:
        >>> isinstance(diagnose_trace(gt.load("runs/exp1")), list)
        True
    """
    from gradtrace.api import diagnose     # diagnosis plus the advised fixes

    return list(diagnose(trace))


def summarize(trace, findings: Sequence[Any] | None = None) -> dict[str, Any]:
    """Headline figures of a run, JSON-ready (the ``summary`` of ``gradtrace doctor --json``).

    Example:
        >>> summarize(gt.load("runs/exp1"))["steps_recorded"]
        30
    """
    import numpy as np

    steps = trace.steps_recorded
    stats = set(trace.stats())

    def last_finite(stat: str) -> float | None:
        if stat not in stats:
            return None
        v = trace.series(stat)
        v = v[np.isfinite(v)]
        return float(v[-1]) if v.size else None

    def last_value(stat: str) -> float | None:
        if stat not in stats:
            return None
        v = trace.series(stat)
        return float(v[-1]) if v.size else None

    def biggest(stat: str) -> float | str | None:
        if stat not in stats:
            return None
        v = trace.series(stat)
        if v.size == 0:
            return None
        if np.any(~np.isfinite(v)):
            return "nan" if np.any(np.isnan(v)) else "inf"
        return float(v.max())

    first_loss = None
    if "loss" in stats:
        lv = trace.series("loss")
        lv = lv[np.isfinite(lv)]
        first_loss = float(lv[0]) if lv.size else None
    out: dict[str, Any] = {
        "steps_recorded": int(len(steps)),
        "first_step": int(steps[0]) if len(steps) else None,
        "last_step": int(steps[-1]) if len(steps) else None,
        "params": len(trace.params),
        "modules": len(trace.modules),
        "model": trace.meta.get("model"),
        "optimizer": trace.meta.get("optimizer"),
        "first_loss": first_loss,
        "final_loss": last_value("loss"),
        "last_finite_loss": last_finite("loss"),
        "max_total_grad_norm": biggest("total_grad_norm"),
        "final_total_grad_norm": last_finite("total_grad_norm"),
        "nonfinite_events": len(trace.events("nonfinite")),
        "guard_skips": len(trace.events("guard_skip")),
        "exceptions": len(trace.events("exception")),
        "trace_warnings": list(getattr(trace, "warnings", [])),
    }
    if findings is not None:
        out["findings"] = len(findings)
        out["errors"] = sum(1 for f in findings if f.severity == "error")
        out["warnings"] = sum(1 for f in findings if f.severity == "warning")
        out["kinds"] = sorted({f.kind for f in findings})
    for k, v in list(out.items()):
        if isinstance(v, float) and not math.isfinite(v):
            out[k] = str(v)
    return out


def report(trace, path: str | os.PathLike | None = None, *, findings: Sequence[Any] | None = None,
           spectrum: Any = None, png_dir: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """Write a self-contained HTML report of ``trace`` (a :class:`~gradtrace.Trace` or a path).

    ``findings`` default to ``gradtrace.api.diagnose(trace)`` (with fixes). ``spectrum`` (a
    :class:`~gradtrace.Spectrum` or its dict) adds the Jacobian-spectrum section.
    ``png_dir`` also writes every plot as PNG (needs matplotlib). Default ``path``:
    ``report.html`` inside the trace directory.

    Example:
        >>> gt.report(gt.load("runs/exp1"), "out/report.html", findings=[]).stat().st_size > 10_000
        True
    """
    from . import html as _html

    if isinstance(trace, (str, os.PathLike)):
        from gradtrace.trace import load

        trace = load(trace)
    if path is None:
        if not trace.path:
            raise ValueError("this trace is in memory; pass the HTML file to write, e.g. report(trace, 'report.html')")
        path = Path(trace.path) / "report.html"
    if findings is None:
        findings = diagnose_trace(trace)
    page = _html.render_html(trace, findings, spectrum=spectrum, title=title)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    if png_dir is not None:
        from .png import write_pngs

        write_pngs(trace, png_dir, findings or ())
    return out
