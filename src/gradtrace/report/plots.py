"""Figures of a trace: the numbers behind them, inline SVG, and optional PNG files.

Everything a report draws is first reduced to plain numpy by the ``*_data`` helpers
(per-layer gradient norms, loss spikes, ...). The SVG builders write the markup
themselves, so an HTML page needs neither matplotlib nor any script. :func:`write_pngs`
draws the same figures with matplotlib, which is imported only there.

Example:
    >>> from gradtrace.report import plots
    >>> svg = plots.line_chart([plots.Series("loss", [0, 1, 2], [2.3, 1.1, 0.7])],
    ...                        title="Loss", xlabel="step", ylabel="loss")
    >>> svg.startswith("<svg")
    True
"""
from __future__ import annotations

import html
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: Line colours, chosen to stay apart for colour-blind readers (Okabe-Ito order).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")

# Anchors of a perceptually ordered colour map (viridis-like), low -> high.
_CMAP = np.array([[68, 1, 84], [65, 68, 135], [42, 120, 142], [34, 168, 132],
                  [122, 209, 81], [253, 231, 37]], dtype=np.float64)

FONT = "system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif"


# ---- the numbers --------------------------------------------------------------------------
def layer_order(trace) -> list[str]:
    """Modules that own watched parameters, input side first (execution order when known).

    Example:
        >>> layer_order(trace)                 # doctest: +SKIP
        ['net.0', 'net.2', 'net.4']
    """
    owners: list[str] = []
    for p in trace.meta.get("params", []):
        m = p.get("module") or p["name"].rpartition(".")[0]
        if m not in owners:
            owners.append(m)
    order = None
    for r in trace.records:
        if "exec_order" in r:
            order = r["exec_order"]
            break
    if order:
        rank = {n: i for i, n in enumerate(order)}
        orig = {n: i for i, n in enumerate(owners)}
        owners = sorted(owners, key=lambda n: (rank.get(n, len(rank)), orig[n]))
    return owners


def raw_matrix(trace, stat: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Like ``trace.matrix(stat)`` but keeps "not recorded" and "non-finite" apart.

    Missing values are NaN; values recorded as nan/inf become ``+inf`` (drawn red), so
    a layer whose gradient turned to nan is not mistaken for a layer with no data.

    Example:
        >>> steps, names, g = raw_matrix(trace, "grad_norm")     # doctest: +SKIP
    """
    section = trace.kind_of(stat)
    names = trace.params if section == "param" else trace.modules
    steps, rows = [], []
    for r in trace.records:
        col = r.get(section, {}).get(stat)
        if col is None:
            continue
        row = np.full(len(names), np.nan)
        for j, v in enumerate(col[: len(names)]):
            if v is None:
                continue
            x = float(v)
            row[j] = x if math.isfinite(x) else np.inf
        steps.append(r["step"])
        rows.append(row)
    values = np.stack(rows) if rows else np.zeros((0, len(names)))
    return np.asarray(steps, dtype=np.int64), names, values


def layer_grad_norms(trace) -> tuple[np.ndarray, list[str], np.ndarray]:
    """Gradient norm per layer (parameters of one module combined) at every recorded step.

    Returns ``(steps, layers, values)`` with ``values`` of shape (steps, layers);
    NaN where nothing was recorded.

    Example:
        >>> steps, layers, g = layer_grad_norms(trace)      # doctest: +SKIP
        >>> g[:, 0] / g[:, -1]        # doctest: +SKIP
    """
    layers = layer_order(trace)
    if "grad_norm" not in trace.stats():
        return np.zeros(0, dtype=np.int64), layers, np.zeros((0, len(layers)))
    steps, names, g = raw_matrix(trace, "grad_norm")
    owner = {p["name"]: (p.get("module") or p["name"].rpartition(".")[0]) for p in trace.meta.get("params", [])}
    out = np.full((len(steps), len(layers)), np.nan)
    col = {n: i for i, n in enumerate(layers)}
    sq = np.zeros_like(out)
    seen = np.zeros(out.shape, dtype=bool)
    for j, name in enumerate(names):
        i = col.get(owner.get(name, ""))
        if i is None:
            continue
        v = g[:, j]
        ok = ~np.isnan(v)
        sq[ok, i] += v[ok] ** 2
        seen[ok, i] = True
    out[seen] = np.sqrt(sq[seen])
    return steps, layers, out


def gradient_flow(trace) -> dict[str, Any]:
    """Mean and max gradient norm of each layer over the run, input side first.

    Non-finite steps are left out of the mean (they are reported elsewhere).

    Example:
        >>> flow = gradient_flow(trace)                 # doctest: +SKIP
        >>> flow["layers"], flow["mean"], flow["max"]   # doctest: +SKIP
    """
    steps, layers, g = layer_grad_norms(trace)
    with np.errstate(all="ignore"):
        fin = np.where(np.isfinite(g), g, np.nan)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean = np.nanmean(fin, axis=0) if len(steps) else np.full(len(layers), np.nan)
            mx = np.nanmax(fin, axis=0) if len(steps) else np.full(len(layers), np.nan)
    return {"layers": layers, "mean": mean, "max": mx, "steps": steps}


def module_rows(trace, stat: str) -> tuple[np.ndarray, list[str], np.ndarray]:
    """A per-module statistic as a (modules × steps) array, keeping modules that have it.

    Example:
        >>> steps, mods, m = module_rows(trace, "out_std")    # doctest: +SKIP
    """
    if stat not in trace.stats():
        return np.zeros(0, dtype=np.int64), [], np.zeros((0, 0))
    steps, names, v = raw_matrix(trace, stat)
    keep = [j for j in range(len(names)) if np.any(~np.isnan(v[:, j]))]
    order = layer_exec_rank(trace)
    keep.sort(key=lambda j: order.get(names[j], len(order) + j))
    return steps, [names[j] for j in keep], v[:, keep].T


def layer_exec_rank(trace) -> dict[str, int]:
    """Module name -> position in forward order (the order the detectors use).

    Example:
        >>> from gradtrace.trace import Trace
        >>> t = Trace({"modules": [{"name": "a"}, {"name": "b"}]}, [{"step": 0, "exec_order": ["b"]}])
        >>> layer_exec_rank(t)
        {'b': 0, 'a': 1}
    """
    from ..detect._util import exec_order

    return {n: i for i, n in enumerate(exec_order(trace))}


def loss_spikes(steps: np.ndarray, loss: np.ndarray, thresholds=None) -> list[int]:
    """Steps the loss-spike detector flags (same rule and ``Thresholds`` as
    :func:`gradtrace.diagnose`), plus the start of each non-finite stretch.

    Example:
        >>> loss_spikes(np.arange(30), np.r_[np.ones(25), 50.0, np.ones(4)])
        [25]
    """
    from ..detect.loss import spike_indices
    from ..detect.thresholds import Thresholds

    th = Thresholds.coerce(thresholds)
    out = {int(steps[i]) for i, _, _ in spike_indices(loss, th)}
    bad = ~np.isfinite(loss)
    out |= {int(steps[k]) for k in np.nonzero(bad)[0] if k == 0 or not bad[k - 1]}
    return sorted(out)


def time_gradients(trace) -> dict[str, np.ndarray]:
    """Gradient norm reaching each input time step of each recurrent layer, per record.

    Example:
        >>> tg = time_gradients(trace)          # doctest: +SKIP
        >>> tg["rnn"].shape                     # doctest: +SKIP
    """
    if "time_grad_norm" not in trace.stats():
        return {}
    names = sorted({n for r in trace.records for n in r.get("vectors", {}).get("time_grad_norm", {})})
    out = {}
    for n in names:
        v = trace.series("time_grad_norm", n)
        if v.dtype != object:
            out[n] = v
    return out


# ---- SVG building blocks ------------------------------------------------------------------
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


def fmt(v: float, digits: int = 3) -> str:
    """A number for people: ``3.2e-07``, ``0.0412``, ``12.5``, ``nan``.

    Example:
        >>> fmt(0.00000095367), fmt(0.04123), fmt(640000000.0), fmt(12.5)
        ('9.54e-07', '0.0412', '6.4e+08', '12.5')
    """
    if v is None:
        return "–"
    v = float(v)
    if not math.isfinite(v):
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e5 or a < 1e-3:
        s = f"{v:.{max(digits - 1, 0)}e}"
        mant, exp = s.split("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{exp}"
    return f"{v:.{digits}g}"


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
        xs = np.asarray(s.x, dtype=np.float64)
        ys = np.asarray(s.y, dtype=np.float64)
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


def _colour(t: float) -> str:
    t = min(max(t, 0.0), 1.0) * (len(_CMAP) - 1)
    i = min(int(t), len(_CMAP) - 2)
    c = _CMAP[i] + (_CMAP[i + 1] - _CMAP[i]) * (t - i)
    return "#%02x%02x%02x" % tuple(int(round(x)) for x in c)


def _bin_columns(steps: np.ndarray, m: np.ndarray, max_cols: int) -> tuple[np.ndarray, np.ndarray]:
    if m.shape[1] <= max_cols:
        return steps, m
    edges = np.linspace(0, m.shape[1], max_cols + 1).astype(int)
    cols, st = [], []
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for a, b in zip(edges[:-1], edges[1:]):
            block = m[:, a:b]
            # keep non-finite values visible: a bin with inf/nan stays non-finite
            bad = np.any(np.isinf(block), axis=1)
            col = np.nanmean(np.where(np.isinf(block), np.nan, block), axis=1)
            col[bad] = np.inf
            cols.append(col)
            st.append(steps[a])
    return np.asarray(st), np.stack(cols, axis=1)


def heatmap(matrix: np.ndarray, row_labels: Sequence[str], steps: Sequence[int], *, title: str,
            log: bool = True, value_label: str = "", width: int = 640, max_cols: int = 160,
            vmin: float | None = None, vmax: float | None = None) -> str:
    """An SVG heatmap (rows = layers, input side on top; columns = steps) with a colour bar.

    Missing values are light grey; non-finite ones red. Long runs are averaged into at
    most ``max_cols`` columns.

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
    steps, m = _bin_columns(steps, m, max_cols)
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
        for c in range(n_cols):
            v = m[r, c]
            if np.isnan(v):
                fill = "#eeeeee"
            elif not np.isfinite(v):
                fill = "#d62728"
            elif log and v <= 0:
                fill = _colour(0.0)
            else:
                fill = _colour(norm(v))
            o.append(f'<rect x="{ml + c * cw:.2f}" y="{y}" width="{cw + 0.35:.2f}" height="{cell_h}" fill="{fill}"/>')
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


# ---- the report's figures ---------------------------------------------------------------------
def _short_layers(layers: Sequence[str]) -> list[str]:
    return [n if n else "(root)" for n in layers]


def gradient_flow_svg(trace, width: int = 640) -> str:
    """Mean and max gradient norm per layer across depth, log scale.

    Example:
        >>> svg = gradient_flow_svg(trace)      # doctest: +SKIP
    """
    flow = gradient_flow(trace)
    layers = flow["layers"]
    if not layers or not len(flow["steps"]):
        return '<p class="empty">No gradient norms recorded.</p>'
    x = list(range(len(layers)))
    s = [Series("mean over steps", x, flow["mean"]), Series("max over steps", x, flow["max"], dash=True)]
    return line_chart(s, title="Gradient flow: gradient norm per layer (input → output)",
                      xlabel="layer (input side left)", ylabel="gradient L2 norm", logy=True,
                      xticklabels=_short_layers(layers), width=width)


def grad_heatmap_svg(trace, width: int = 640) -> str:
    """Layer × step heatmap of the per-layer gradient norm (log colour scale).

    Example:
        >>> svg = grad_heatmap_svg(trace)      # doctest: +SKIP
    """
    steps, layers, g = layer_grad_norms(trace)
    return heatmap(g.T, _short_layers(layers), steps, title="Gradient norm per layer over steps",
                   value_label="grad norm", width=width)


ACT_STATS = {
    "out_std": ("Activation std per layer over steps", "output std", True),
    "zero_frac": ("Fraction of zero outputs (ReLU family)", "zero fraction", False),
    "saturated_frac": ("Fraction of saturated outputs (sigmoid/tanh)", "saturated fraction", False),
}


def activation_heatmap_svg(trace, stat: str, width: int = 640) -> str | None:
    """Layer × step heatmap of an activation statistic, or ``None`` if not recorded.

    Example:
        >>> activation_heatmap_svg(trace, "out_std")     # doctest: +SKIP
    """
    steps, mods, m = module_rows(trace, stat)
    if not mods:
        return None
    title, label, log = ACT_STATS.get(stat, (stat, stat, False))
    return heatmap(m, mods, steps, title=title, value_label=label, log=log, width=width,
                   vmin=None if log else 0.0, vmax=None if log else 1.0)


def loss_svg(trace, findings: Sequence[Any] = (), width: int = 640) -> tuple[str, list[int]]:
    """The loss curve with spikes (and guard skips) marked; returns ``(svg, spike_steps)``.

    Example:
        >>> svg, spikes = loss_svg(trace)      # doctest: +SKIP
    """
    if "loss" not in trace.stats():
        return '<p class="empty">No loss recorded (call <code>mon.record_loss(loss)</code> each step).</p>', []
    steps, loss = trace.series("loss", with_steps=True)
    spikes = set(loss_spikes(steps, loss))
    for f in findings:
        if getattr(f, "kind", "") in ("loss_spike", "loss_nonfinite") and f.first_step is not None:
            spikes.update(int(s) for s in (f.evidence or {}).get("steps", [f.first_step]) if isinstance(s, (int, float)))
    marks = [Marker(s, f"loss spike at step {s}") for s in sorted(spikes)]
    marks += [Marker(e["step"], f"guard skipped step {e['step']}: {e.get('reason', '')}", "#7f7f7f")
              for e in trace.events("guard_skip")]
    finite = loss[np.isfinite(loss)]
    logy = bool(finite.size and finite.min() > 0 and finite.max() / finite.min() > 50)
    note = f"{len(spikes)} spike(s) marked" if spikes else ""
    return line_chart([Series("loss", steps, loss, style="line")], title="Loss", xlabel="step",
                      ylabel="loss", logy=logy, markers=marks, width=width, note=note), sorted(spikes)


def total_norm_svg(trace, width: int = 640) -> str | None:
    """Total gradient norm over steps (pre-clip, and post-clip when gradtrace clipped).

    Example:
        >>> total_norm_svg(trace)       # doctest: +SKIP
    """
    if "total_grad_norm" not in trace.stats():
        return None
    steps, tot = trace.series("total_grad_norm", with_steps=True)
    series = [Series("total gradient norm (pre-clip)", steps, tot, style="line")]
    if "total_grad_norm_post_clip" in trace.stats():
        s2, post = trace.series("total_grad_norm_post_clip", with_steps=True)
        series.append(Series("after clipping", s2, post, style="line", dash=True))
    return line_chart(series, title="Total gradient norm", xlabel="step", ylabel="L2 norm", logy=True,
                      width=width)


def time_gradient_svg(trace, width: int = 640) -> str | None:
    """Gradient norm reaching each time step of each recurrent layer (first and last record).

    Example:
        >>> time_gradient_svg(trace)        # doctest: +SKIP
    """
    tg = time_gradients(trace)
    if not tg:
        return None
    series = []
    for name, v in tg.items():
        t = np.arange(v.shape[1])
        series.append(Series(f"{name}: first recorded step", t, v[0], style="line"))
        if v.shape[0] > 1:
            series.append(Series(f"{name}: last recorded step", t, v[-1], style="line", dash=True))
    return line_chart(series, title="Gradient reaching each time step (backprop through time)",
                      xlabel="input time step (the loss is at the end)", ylabel="gradient norm", logy=True,
                      width=width)


# ---- PNG ----------------------------------------------------------------------------------------
def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG plots need matplotlib: pip install matplotlib "
                          "(or pip install gradtrace[plots])") from None
    return plt


def write_pngs(trace, out_dir: str | os.PathLike, findings: Sequence[Any] = ()) -> list[Path]:
    """Write each figure of the report as a PNG file (matplotlib needed; imported here).

    Returns the files written. Raises ``ImportError`` naming ``pip install matplotlib``
    when matplotlib is missing.

    Example:
        >>> write_pngs(gt.load("runs/exp1"), "runs/exp1/plots")    # doctest: +SKIP
        [PosixPath('runs/exp1/plots/gradient_flow.png'), ...]
    """
    plt = _matplotlib()
    from matplotlib.colors import LogNorm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    flow = gradient_flow(trace)
    if flow["layers"] and len(flow["steps"]):
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(flow["layers"]))
        ax.semilogy(x, flow["mean"], "o-", label="mean over steps")
        ax.semilogy(x, flow["max"], "s--", label="max over steps")
        ax.set_xticks(x, flow["layers"], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("layer (input side left)")
        ax.set_ylabel("gradient L2 norm (log)")
        ax.set_title("Gradient flow per layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "gradient_flow.png")

        steps, layers, g = layer_grad_norms(trace)
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(layers) + 1.5)))
        gm = np.ma.masked_invalid(np.where(g > 0, g, np.nan)).T
        if gm.count():
            im = ax.imshow(gm, aspect="auto", interpolation="nearest", norm=LogNorm(),
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
            fig.colorbar(im, ax=ax, label="grad norm (log)")
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set_xlabel("step")
        ax.set_title("Gradient norm per layer over steps")
        save(fig, "grad_norm_heatmap.png")

    for stat, (title, label, log) in ACT_STATS.items():
        steps, mods, m = module_rows(trace, stat)
        if not mods:
            continue
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(mods) + 1.5)))
        mm = np.ma.masked_invalid(np.where((m > 0) if log else np.isfinite(m), m, np.nan))
        if mm.count():
            kw = {"norm": LogNorm()} if log else {"vmin": 0.0, "vmax": 1.0}
            im = ax.imshow(mm, aspect="auto", interpolation="nearest",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, len(mods) - 0.5, -0.5), **kw)
            fig.colorbar(im, ax=ax, label=label)
        ax.set_yticks(range(len(mods)), mods, fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(title)
        save(fig, f"{stat}_heatmap.png")

    if "loss" in trace.stats():
        steps, loss = trace.series("loss", with_steps=True)
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(steps, loss, label="loss")
        for i, s in enumerate(loss_spikes(steps, loss)):
            ax.axvline(s, color="#D55E00", ls="--", lw=1, label="spike" if i == 0 else None)
        for i, e in enumerate(trace.events("guard_skip")):
            ax.axvline(e["step"], color="grey", ls=":", lw=1, label="guard skip" if i == 0 else None)
        fin = loss[np.isfinite(loss)]
        if fin.size and fin.min() > 0 and fin.max() / fin.min() > 50:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    tg = time_gradients(trace)
    if tg:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for name, v in tg.items():
            ax.semilogy(np.arange(v.shape[1]), v[0], label=f"{name}: first recorded step")
            if v.shape[0] > 1:
                ax.semilogy(np.arange(v.shape[1]), v[-1], "--", label=f"{name}: last recorded step")
        ax.set_xlabel("input time step")
        ax.set_ylabel("gradient norm (log)")
        ax.set_title("Gradient reaching each time step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "time_gradients.png")
    return written
