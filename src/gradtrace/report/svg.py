"""SVG primitives of the report: axes, line charts and heatmaps, written as plain markup.

No matplotlib and no scripts: a page built from these opens anywhere. Long series are
drawn from :func:`~gradtrace.report.figdata.downsample` (bucket minimum and maximum), and
heatmaps bin long runs into at most ``max_cols`` columns keeping each bucket's largest
value, so a one-step explosion stays visible.

Example:
    >>> svg = line_chart([Series("loss", [0, 1, 2], [2.3, 1.1, 0.7])],
    ...                  title="Loss", xlabel="step", ylabel="loss")
    >>> svg.startswith("<svg")
    True
"""
from __future__ import annotations

import html
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..numerics import fmt
from .figdata import downsample

#: Line colours, chosen to stay apart for colour-blind readers (Okabe-Ito order).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")

# Anchors of a perceptually ordered colour map (viridis-like), low -> high.
_CMAP = np.array([[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132],
                  [122, 209, 81], [253, 231, 37]], dtype=np.float64)

FONT = "system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif"
#: Most points one line of a chart draws (a 640-pixel plot shows no more).
MAX_POINTS = 1200


@dataclass
class Series:
    """One line of a chart. ``style`` is ``"line"``, ``"points"`` or ``"both"``.

    Example:
        >>> Series("mean", [0, 1], [1.0, 0.5]).label
        'mean'
    """

    label: str
    x: Sequence[float]
    y: Sequence[float]
    color: str | None = None
    style: str = "both"
    dash: bool = False
    width: float = 2.0


@dataclass
class Marker:
    """A vertical mark on a chart (a loss spike, a guard skip) at ``x``.

    Example:
        >>> Marker(25, "loss spike").color
        '#D55E00'
    """

    x: float
    label: str = ""
    color: str = "#D55E00"


@dataclass
class _Axis:
    lo: float
    hi: float
    log: bool
    ticks: list[float] = field(default_factory=list)

    def f(self, v: float) -> float:
        if self.log:
            v = math.log10(max(v, 1e-300))
            lo, hi = math.log10(self.lo), math.log10(self.hi)
        else:
            lo, hi = self.lo, self.hi
        return 0.0 if hi == lo else (v - lo) / (hi - lo)


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _nice_linear(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    out, v = [], start
    while v <= hi + 1e-9 * step:
        out.append(round(v, 12))
        v += step
    return out


def _axis(values: np.ndarray, log: bool, include_zero: bool = False) -> _Axis:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if log:
        v = v[v > 0]
    if v.size == 0:
        return _Axis(1e-3 if log else 0.0, 1.0, log, [1e-3, 1e-2, 1e-1, 1.0] if log else [0, 0.5, 1])
    lo, hi = float(v.min()), float(v.max())
    if log:
        dlo, dhi = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
        if dhi == dlo:
            dhi += 1
        span = dhi - dlo
        stride = max(1, math.ceil(span / 8))
        ticks = [10.0 ** e for e in range(dlo, dhi + 1, stride)]
        return _Axis(10.0 ** dlo, 10.0 ** dhi, True, ticks)
    if include_zero:
        lo = min(lo, 0.0)
    if hi == lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    pad = 0.05 * (hi - lo)
    lo2 = lo if (include_zero and lo == 0) else lo - pad
    ticks = _nice_linear(lo2, hi + pad)
    return _Axis(min(lo2, ticks[0]), max(hi + pad, ticks[-1]), False, ticks)


def _tick_label(v: float, log: bool, ticks: Sequence[float] = ()) -> str:
    if log:
        e = round(math.log10(v))
        return {0: "1", 1: "10", -1: "0.1", 2: "100"}.get(e, f"1e{e}")
    if len(ticks) > 1:
        step = abs(ticks[1] - ticks[0])
        big = max(abs(t) for t in ticks)
        if step > 0 and 1e-3 <= big < 1e5:
            dec = max(0, -math.floor(math.log10(step) + 1e-9))
            if abs(round(step * 10 ** dec) - step * 10 ** dec) > 1e-6:
                dec += 1
            return f"{v:.{dec}f}"
    return fmt(v, 3)


def line_chart(series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               logy: bool = False, markers: Sequence[Marker] = (), xticklabels: Sequence[str] | None = None,
               width: int = 640, height: int = 300, note: str = "") -> str:
    """An SVG line chart with labelled axes, grid, legend and optional vertical markers.

    Non-finite points (and non-positive ones on a log axis) are drawn as gaps; a
    non-finite y is marked by a small red cross at the top edge.

    Example:
        >>> svg = line_chart([Series("grad", [0, 1, 2], [1e-6, 1e-3, 1.0])], title="Flow",
        ...                  xlabel="layer", ylabel="grad norm", logy=True)
        >>> "<polyline" in svg and "Flow" in svg
        True
    """
    ml, mr, mt, mb = 72, 16, 34, 48
    pw = width - ml - mr
    # legend: items flow left to right and wrap (label width estimated from its length)
    legend: list[tuple[float, int]] = []
    lx, row = 0.0, 0
    for s in series if len(series) > 1 else ():
        w = 28 + 6.4 * min(len(s.label), 60) + 18
        if lx > 0 and lx + w > pw:
            lx, row = 0.0, row + 1
        legend.append((lx, row))
        lx += w
    legend_rows = (legend[-1][1] + 1) if legend else 0
    mb += 8 + 18 * legend_rows
    ph = height - mt - mb
    all_x = np.concatenate([np.asarray(s.x, dtype=np.float64) for s in series]) if series else np.zeros(0)
    all_y = np.concatenate([np.asarray(s.y, dtype=np.float64) for s in series]) if series else np.zeros(0)
    ax_y = _axis(all_y, logy)
    if xticklabels is not None:
        ax_x = _Axis(-0.5, len(xticklabels) - 0.5, False, list(range(len(xticklabels))))
    else:
        ax_x = _axis(all_x, False)
        fx = all_x[np.isfinite(all_x)]
        if fx.size:
            ax_x = _Axis(float(fx.min()), float(fx.max()) if fx.max() > fx.min() else float(fx.min()) + 1,
                         False, [t for t in _nice_linear(float(fx.min()), float(fx.max()) or 1.0)
                                 if fx.min() <= t <= max(fx.max(), fx.min() + 1)])

    def X(v: float) -> float:
        return ml + ax_x.f(v) * pw

    def Y(v: float) -> float:
        return mt + (1 - ax_y.f(v)) * ph

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" viewBox="0 0 {width} {height}" '
         f'width="{width}" height="{height}" role="img" aria-label="{_esc(title)}" '
         f'font-family="{FONT}" font-size="11">']
    o.append(f'<title>{_esc(title)}</title>')
    o.append(f'<text x="{ml}" y="18" font-size="13" font-weight="600" fill="#222">{_esc(title)}</text>')
    if note:
        o.append(f'<text x="{width - mr}" y="18" text-anchor="end" fill="#666">{_esc(note)}</text>')
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="#fff" stroke="#bbb"/>')
    for t in ax_y.ticks:
        y = Y(t)
        if mt - 0.5 <= y <= mt + ph + 0.5:
            o.append(f'<line x1="{ml}" x2="{ml + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            o.append(f'<text x="{ml - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#444">'
                     f'{_tick_label(t, logy, ax_y.ticks)}</text>')
    if xticklabels is not None:
        n = len(xticklabels)
        stride = max(1, math.ceil(n / max(1, pw // 46)))
        for i in range(0, n, stride):
            x = X(i)
            o.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt + ph}" y2="{mt + ph + 4}" stroke="#888"/>')
            lab = xticklabels[i]
            lab = lab if len(lab) <= 10 else "…" + lab[-9:]
            o.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" fill="#444">{_esc(lab)}</text>')
    else:
        for t in ax_x.ticks:
            x = X(t)
            o.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" stroke="#f2f2f2"/>')
            o.append(f'<text x="{x:.1f}" y="{mt + ph + 16}" text-anchor="middle" fill="#444">{fmt(t, 4)}</text>')
    o.append(f'<text x="{ml + pw / 2:.1f}" y="{mt + ph + 34}" text-anchor="middle" fill="#222">{_esc(xlabel)}</text>')
    o.append(f'<text transform="translate(16,{mt + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
             f'fill="#222">{_esc(ylabel)}{" (log scale)" if logy else ""}</text>')
    for m in markers:
        x = X(m.x)
        if ml - 0.5 <= x <= ml + pw + 0.5:
            o.append(f'<line class="marker" x1="{x:.1f}" x2="{x:.1f}" y1="{mt}" y2="{mt + ph}" '
                     f'stroke="{m.color}" stroke-dasharray="4 3" stroke-width="1.2"><title>{_esc(m.label)}</title></line>')
    for k, s in enumerate(series):
        color = s.color or PALETTE[k % len(PALETTE)]
        xs, ys = downsample(np.asarray(s.x, dtype=np.float64), np.asarray(s.y, dtype=np.float64), MAX_POINTS)
        ok = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if logy else True)
        dash = ' stroke-dasharray="6 4"' if s.dash else ""
        if s.style in ("line", "both"):
            run: list[str] = []

            def flush(run: list[str]) -> None:
                if len(run) == 1:   # an isolated point (e.g. the last finite value) still shows
                    cx, cy = run[0].split(",")
                    o.append(f'<circle cx="{cx}" cy="{cy}" r="3.5" fill="{color}"/>')
                elif run:
                    o.append(f'<polyline fill="none" stroke="{color}" stroke-width="{s.width}"{dash} '
                             f'points="{" ".join(run)}"/>')

            for i in range(len(xs)):
                if ok[i]:
                    run.append(f"{X(xs[i]):.1f},{Y(ys[i]):.1f}")
                elif run:
                    flush(run)
                    run = []
            flush(run)
        if s.style in ("points", "both") and len(xs) <= 120:
            for i in range(len(xs)):
                if ok[i]:
                    o.append(f'<circle cx="{X(xs[i]):.1f}" cy="{Y(ys[i]):.1f}" r="2.6" fill="{color}">'
                             f'<title>{_esc(s.label)}: {fmt(ys[i])}</title></circle>')
        bad = ~np.isfinite(ys) & np.isfinite(xs)
        idx = np.nonzero(bad)[0]
        if idx.size:
            # one red band per stretch of non-finite values, labelled where it starts
            starts = [i for i in idx if i == 0 or not bad[i - 1]]
            for a in starts:
                b = a
                while b + 1 < len(xs) and bad[b + 1]:
                    b += 1
                x0, x1 = X(xs[a]), X(xs[b])
                o.append(f'<rect x="{x0 - 2:.1f}" y="{mt}" width="{max(x1 - x0, 0) + 4:.1f}" height="{ph}" '
                         f'fill="{color}" opacity="0.10"/>')
                o.append(f'<text x="{x0:.1f}" y="{mt + 12}" fill="#c00" font-weight="700">× '
                         f'<tspan font-weight="400">{_esc(fmt(ys[a]))} from {fmt(xs[a], 6)}</tspan>'
                         f'<title>{_esc(s.label)}: {fmt(ys[a])} at steps {fmt(xs[a], 6)}–{fmt(xs[b], 6)}</title></text>')
    if len(series) > 1:
        ly0 = mt + ph + 54
        for k, s in enumerate(series):
            color = s.color or PALETTE[k % len(PALETTE)]
            lx = ml + legend[k][0]
            ly = ly0 + legend[k][1] * 18
            dash = ' stroke-dasharray="6 4"' if s.dash else ""
            o.append(f'<line x1="{lx:.1f}" x2="{lx + 22:.1f}" y1="{ly - 4}" y2="{ly - 4}" stroke="{color}" '
                     f'stroke-width="3"{dash}/>')
            lab = s.label if len(s.label) <= 60 else s.label[:59] + "…"
            o.append(f'<text class="legend" x="{lx + 28:.1f}" y="{ly}" fill="#222">{_esc(lab)}</text>')
    o.append("</svg>")
    return "".join(o)


def _interp(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(_CMAP) - 1)
    i = min(int(t), len(_CMAP) - 2)
    c = _CMAP[i] + (_CMAP[i + 1] - _CMAP[i]) * (t - i)
    return "#%02x%02x%02x" % tuple(int(round(x)) for x in c)


_LEVELS = [_interp(k / 63) for k in range(64)]


def _colour(t: float) -> str:
    """The colour map at ``t`` in [0, 1], in 64 levels (the eye sees no more)."""
    return _LEVELS[int(round(min(max(t, 0.0), 1.0) * 63))]


def _bin_columns(steps: np.ndarray, m: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ``max_cols`` columns: each bucket keeps, per row, its largest finite value
    (a spike survives), a non-finite one if the bucket has any, NaN if nothing recorded."""
    if m.shape[1] <= max_cols:
        return steps, m
    edges = np.linspace(0, m.shape[1], max_cols + 1).astype(int)
    bad = np.isinf(m)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)      # all-NaN buckets stay NaN
        fin = np.where(np.isinf(m), np.nan, m)
        cols = np.fmax.reduceat(fin, edges[:-1], axis=1)
        any_bad = np.logical_or.reduceat(bad, edges[:-1], axis=1)
    cols[any_bad] = np.inf
    return np.asarray(steps)[edges[:-1]], cols


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], steps: Sequence[int], *, title: str,
            log: bool = True, value_label: str = "", width: int = 640, max_cols: int = 160,
            vmin: float | None = None, vmax: float | None = None) -> str:
    """An SVG heatmap (rows = layers, input side on top; columns = steps) with a colour bar.

    Missing values are light grey; non-finite ones red. Long runs are binned into at
    most ``max_cols`` columns (fewer when there are many rows: about 8,000 cells in all),
    each showing its bucket's largest value.

    Example:
        >>> svg = heatmap(np.array([[1e-6, 1e-5], [1e-2, 1e-1]]), ["l0", "l1"], [0, 1],
        ...               title="grad norm", value_label="grad norm")
        >>> svg.count("<rect") > 4
        True
    """
    m = np.asarray(matrix, dtype=np.float64)
    steps = np.asarray(steps)
    n_rows = m.shape[0]
    if n_rows == 0 or m.shape[1] == 0:
        return f'<p class="empty">{_esc(title)}: not recorded in this run.</p>'
    # at most ~8,000 cells a heatmap (a page with three stays near 2 MB), 40 columns at least
    steps, m = _bin_columns(steps, m, min(max_cols, max(40, 8000 // n_rows)))
    n_cols = m.shape[1]
    label_w = min(150, 12 + 6.6 * max(len(r) for r in row_labels))
    ml, mr, mt, mb = label_w, 92, 34, 40
    cell_h = max(8, min(22, 360 // max(n_rows, 1)))
    ph = cell_h * n_rows
    height = mt + ph + mb
    pw = width - ml - mr
    cw = pw / n_cols
    fin = m[np.isfinite(m)]
    if log:
        fin = fin[fin > 0]
    if fin.size:
        lo = vmin if vmin is not None else float(fin.min())
        hi = vmax if vmax is not None else float(fin.max())
    else:
        lo, hi = (vmin if vmin is not None else 0.0), (vmax if vmax is not None else 1.0)
    if log:
        lo, hi = max(lo, 1e-300), max(hi, 1e-300)
        llo, lhi = math.floor(math.log10(lo) * 2) / 2, math.ceil(math.log10(hi) * 2) / 2
        if lhi <= llo:
            lhi = llo + 1
    else:
        llo, lhi = lo, hi if hi > lo else lo + 1

    def norm(v: float) -> float:
        x = math.log10(v) if log else v
        return (x - llo) / (lhi - llo)

    o = [f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" viewBox="0 0 {width} {height}" '
         f'width="{width}" height="{height}" role="img" aria-label="{_esc(title)}" font-family="{FONT}" font-size="11">']
    o.append(f'<title>{_esc(title)}</title>')
    o.append(f'<text x="{ml}" y="18" font-size="13" font-weight="600" fill="#222">{_esc(title)}</text>')
    for r in range(n_rows):
        y = mt + r * cell_h
        lab = row_labels[r] if len(row_labels[r]) <= 22 else "…" + row_labels[r][-21:]
        if cell_h >= 10 or r % max(1, math.ceil(11 / cell_h)) == 0:
            o.append(f'<text x="{ml - 5}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="end" fill="#333">{_esc(lab)}</text>')
        fills = []
        for c in range(n_cols):
            v = m[r, c]
            if np.isnan(v):
                fills.append("#eeeeee")
            elif not np.isfinite(v):
                fills.append("#d62728")
            elif log and v <= 0:
                fills.append(_colour(0.0))
            else:                   # 64 levels, so equal neighbours merge below
                fills.append(_colour(norm(v)))
        c = 0
        while c < n_cols:           # one rect per run of equal colour keeps long runs' pages small
            e = c + 1
            while e < n_cols and fills[e] == fills[c]:
                e += 1
            o.append(f'<rect x="{ml + c * cw:.2f}" y="{y}" width="{(e - c) * cw + 0.35:.2f}" '
                     f'height="{cell_h}" fill="{fills[c]}"/>')
            c = e
    o.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>')
    for t in _nice_linear(float(steps[0]), float(steps[-1]) if steps[-1] > steps[0] else float(steps[0]) + 1, 6):
        if steps[0] <= t <= steps[-1] or n_cols == 1:
            c = np.searchsorted(steps, t)
            x = ml + (min(c, n_cols - 1) + 0.5) * cw
            o.append(f'<text x="{x:.1f}" y="{mt + ph + 14}" text-anchor="middle" fill="#444">{fmt(t, 5)}</text>')
    o.append(f'<text x="{ml + pw / 2:.1f}" y="{mt + ph + 32}" text-anchor="middle" fill="#222">step</text>')
    if np.any(np.isinf(m)) or np.any(np.isnan(m)):
        o.append(f'<text x="{ml + pw}" y="{mt + ph + 32}" text-anchor="end" fill="#666" font-size="10">'
                 f'<tspan fill="#d62728">■</tspan> nan/inf   <tspan fill="#bbbbbb">■</tspan> not recorded</text>')
    # colour bar
    bx, bw = ml + pw + 14, 12
    nseg = 24
    for k in range(nseg):
        o.append(f'<rect x="{bx}" y="{mt + ph * (1 - (k + 1) / nseg):.2f}" width="{bw}" '
                 f'height="{ph / nseg + 0.4:.2f}" fill="{_colour((k + 0.5) / nseg)}"/>')
    for frac, val in ((0, llo), (0.5, (llo + lhi) / 2), (1, lhi)):
        y = mt + ph * (1 - frac)
        txt = fmt(10 ** val, 2) if log else fmt(val, 3)
        o.append(f'<text x="{bx + bw + 4}" y="{y + 4:.1f}" fill="#333">{txt}</text>')
    if value_label:
        o.append(f'<text transform="translate({width - 6},{mt + ph / 2:.1f}) rotate(-90)" text-anchor="middle" '
                 f'fill="#222">{_esc(value_label)}{" (log)" if log else ""}</text>')
    o.append("</svg>")
    return "".join(o)


