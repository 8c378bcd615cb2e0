"""HTML section for Jacobian spectra: singular-value histograms per block, gain across depth.

Self-contained: inline SVG, no scripts, no network. Accepts a :class:`gradtrace.Spectrum`
or its ``to_dict()`` form (as stored with ``--json`` output).
"""
from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["render_spectrum_section"]

_W, _H, _PAD = 560, 180, 36


def _as_dict(spec: Any) -> dict[str, Any]:
    if hasattr(spec, "to_dict"):
        return spec.to_dict()
    if isinstance(spec, dict) and "rows" in spec and "histogram" in spec:
        return spec
    raise TypeError("render_spectrum_section expects a gradtrace.Spectrum or Spectrum.to_dict(), "
                    f"got {type(spec).__name__}")


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _gain_plot(rows: list[dict[str, Any]]) -> str:
    """log10(gain) per block as a polyline, with the isometry line at gain 1."""
    gains = [_num(r["gain"]) for r in rows]
    logs = [math.log10(g) if g > 0 and math.isfinite(g) else float("nan") for g in gains]
    ok = [v for v in logs if math.isfinite(v)]
    if not ok:
        return "<p>No finite gains.</p>"
    lo, hi = min(ok + [0.0]) - 0.1, max(ok + [0.0]) + 0.1
    n = len(rows)

    def xy(i: int, v: float) -> tuple[float, float]:
        x = _PAD + (i + 0.5) * (_W - 2 * _PAD) / n
        y = _H - _PAD + (v - lo) / (hi - lo) * (2 * _PAD - _H)
        return x, y

    pts = " ".join(f"{x:.1f},{y:.1f}" for i, v in enumerate(logs) if math.isfinite(v) for x, y in [xy(i, v)])
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="#1f77b4"><title>{html.escape(str(r["block"]))}: '
        f'gain {gains[i]:.4g}</title></circle>'
        for i, (r, v) in enumerate(zip(rows, logs)) if math.isfinite(v) for x, y in [xy(i, v)])
    y1 = xy(0, 0.0)[1]
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
            f'aria-label="gain across depth">'
            f'<line x1="{_PAD}" y1="{y1:.1f}" x2="{_W - _PAD}" y2="{y1:.1f}" stroke="#999" stroke-dasharray="4 3"/>'
            f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>{dots}'
            f'<text x="4" y="14" font-size="11">log₁₀ gain (dashed: 1, isometry)</text>'
            f'<text x="{_PAD}" y="{_H - 8}" font-size="11">first block</text>'
            f'<text x="{_W - _PAD}" y="{_H - 8}" font-size="11" text-anchor="end">last block</text>'
            f'<text x="4" y="{_PAD}" font-size="10">{hi:.2g}</text>'
            f'<text x="4" y="{_H - _PAD}" font-size="10">{lo:.2g}</text></svg>')


def _histogram(name: str, counts: list[int], edges: list[float]) -> str:
    w, h = 170, 80
    top = max(counts) if counts and max(counts) > 0 else 1
    bw = (w - 10) / max(len(counts), 1)
    bars = "".join(
        f'<rect x="{5 + i * bw:.1f}" y="{h - 16 - c / top * (h - 30):.1f}" width="{max(bw - 0.5, 0.5):.1f}" '
        f'height="{c / top * (h - 30):.1f}" fill="#ff7f0e"><title>10^{edges[i]:.2f}–10^{edges[i + 1]:.2f}: '
        f'{c}</title></rect>'
        for i, c in enumerate(counts) if c)
    return (f'<figure style="display:inline-block;margin:4px"><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{w}" height="{h}" role="img" aria-label="singular values of {html.escape(name)}">'
            f'{bars}<text x="5" y="{h - 3}" font-size="9">{edges[0]:.1f}</text>'
            f'<text x="{w - 5}" y="{h - 3}" font-size="9" text-anchor="end">{edges[-1]:.1f}</text></svg>'
            f'<figcaption style="font-size:11px">{html.escape(name)}</figcaption></figure>')


def render_spectrum_section(spec_or_dict: Any, max_histograms: int = 48) -> str:
    """HTML fragment: a table per block, gain across depth and singular-value histograms.

    Histograms share one log₁₀ axis; with more than ``max_histograms`` blocks an evenly
    spaced subset is drawn (the end-to-end one always).

    Example:
        >>> import torch, gradtrace as gt
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Tanh())
        >>> html_text = render_spectrum_section(gt.spectrum(net, torch.randn(2, 4)))
        >>> html_text.startswith("<section") and "<svg" in html_text
        True
    """
    d = _as_dict(spec_or_dict)
    if not isinstance(max_histograms, int) or max_histograms < 1:
        raise ValueError(f"max_histograms must be a positive int, got {max_histograms!r}")
    rows = list(d["rows"])
    end = d.get("end_to_end")
    edges = d["histogram"]["log10_edges"]
    counts = d["histogram"]["counts"]
    parts = ['<section class="gt-spectrum"><h2>Jacobian spectra</h2>',
             "<p>Singular values of each block's input–output Jacobian at initialisation. A gain "
             "(mean squared singular value per input direction) near 1 across depth keeps "
             "gradients alive; a small spread (relative variance of σ²) means dynamical isometry.</p>"]
    if rows:
        parts.append("<h3>Gain across depth</h3>" + _gain_plot(rows))
    parts.append('<table class="gt-table"><thead><tr><th>block</th><th>in</th><th>out</th><th>method</th>'
                 "<th>gain</th><th>σ_max</th><th>σ_min</th><th>spread</th><th>estimate</th></tr></thead><tbody>")
    for r in rows + ([end] if end else []):
        parts.append("<tr>" + "".join(
            f"<td>{html.escape(str(v)) if isinstance(v, str) else (f'{_num(v):.4g}' if isinstance(v, float) else v)}</td>"
            for v in (r["block"], r["in_width"], r["out_width"], r["method"], _num(r["gain"]),
                      _num(r["sigma_max"]), _num(r["sigma_min"]), _num(r["spread"]),
                      r.get("estimate", "-"))) + "</tr>")
    for name, why in d.get("skipped", {}).items():  # a block that could not be measured says why
        parts.append(f'<tr><td>{html.escape(str(name))}</td><td colspan="8">not measured: '
                     f"{html.escape(str(why))}</td></tr>")
    parts.append("</tbody></table>")
    names = [r["block"] for r in rows]
    if len(names) > max_histograms:
        step = len(names) / max_histograms
        names = [names[int(i * step)] for i in range(max_histograms)]
    if end:
        names.append(end["block"])
    parts.append("<h3>Singular values per block (log₁₀ σ)</h3><div>")
    parts.extend(_histogram(n, counts[n], edges) for n in names if n in counts)
    parts.append("</div></section>")
    return "\n".join(parts)
