"""The HTML report: one self-contained page per run, and a page comparing runs.

Pages carry their own CSS and inline SVG figures: no scripts, no fonts, no network
requests, so they open from disk anywhere (an air-gapped cluster, an e-mail attachment).

Example:
    >>> from gradtrace.report.html import render_html
    >>> render_html(gt.load("runs/exp1"), findings=[]).startswith("<!DOCTYPE html>")
    True
"""
from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Mapping
from typing import Any, Sequence

import numpy as np

from ..numerics import fmt
from . import figdata, figures
from .svg import Series, line_chart

CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d2330;line-height:1.45}
main{max-width:1360px;margin:0 auto;padding:22px 28px 60px}
h1{font-size:24px;margin:0 0 4px}
h2{font-size:19px;margin:30px 0 10px;padding-bottom:4px;border-bottom:2px solid #dde1e8}
h3{font-size:15px;margin:14px 0 6px}
.sub{color:#5a6372;margin:0 0 14px}
.cards{display:flex;flex-wrap:wrap;gap:10px;margin:10px 0}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px;min-width:150px}
.card .k{font-size:12px;color:#5a6372}.card .v{font-size:19px;font-weight:600}
.badge{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:600;color:#fff;vertical-align:middle}
.badge.error{background:#c0392b}.badge.warning{background:#d68910}.badge.ok{background:#1e8449}
.finding{background:#fff;border:1px solid #dde1e8;border-left:5px solid #d68910;border-radius:8px;padding:12px 16px;margin:10px 0}
.finding.error{border-left-color:#c0392b}
.finding h3{margin:0 0 4px}
details summary{cursor:pointer;color:#2c5d8a;font-size:13px;margin-top:4px}
.finding .meta{color:#5a6372;font-size:13px}
.fix{margin:8px 0 0 0;padding:8px 10px;background:#f3f7fb;border-radius:6px}
.fix .p{font-size:12px;color:#5a6372;text-transform:uppercase;letter-spacing:.03em}
pre{background:#1f2430;color:#e8e8e8;border-radius:6px;padding:9px 11px;overflow-x:auto;font-size:12.5px;margin:6px 0 0}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}
table.ev{border-collapse:collapse;font-size:12.5px;margin-top:6px}
table.ev td{padding:2px 10px 2px 0;vertical-align:top}
table.ev td:first-child{color:#5a6372}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(640px,1fr));gap:14px}
.panel{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px;overflow-x:auto}
.panel svg{max-width:100%;height:auto}
.empty{color:#5a6372;font-style:italic}
.healthy{background:#eafaf1;border:1px solid #a9dfbf;border-radius:8px;padding:10px 14px}
table.facts{border-collapse:collapse;background:#fff;font-size:14px}
table.facts th,table.facts td{border:1px solid #dde1e8;padding:6px 12px;text-align:left}
table.facts th{background:#eef1f5}
.pair{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:12px}
.exp{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px}
.exp h3 a{color:inherit}
.small{font-size:13px;color:#5a6372}
footer{margin-top:40px;color:#8a93a3;font-size:12px}
"""

KIND_TITLES = {
    "vanishing_gradients": "Vanishing gradients",
    "exploding_gradients": "Exploding gradients",
    "nonfinite": "Non-finite values (nan/inf)",
    "loss_spike": "Loss spike",
    "loss_nonfinite": "Loss became nan/inf",
    "dead_units": "Dead ReLU units",
    "saturated_units": "Saturated activations",
    "shrinking_activations": "Activations shrink across layers",
    "growing_activations": "Activations grow across layers",
    "vanishing_through_time": "Gradients vanish through time",
    "exploding_through_time": "Gradients explode through time",
    "near_overflow": "Activations near their dtype's overflow",
}


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def kind_title(kind: str) -> str:
    """A heading for a finding kind, e.g. ``"Dead ReLU units"``.

    Example:
        >>> kind_title("dead_units")
        'Dead ReLU units'
    """
    return KIND_TITLES.get(kind, kind.replace("_", " ").capitalize())


def _evidence_value(v: Any) -> str:
    if isinstance(v, float):
        return fmt(v)
    if isinstance(v, Mapping):       # nested evidence records are typed Mappings
        items = list(v.items())
        s = ", ".join(f"{k}: {_evidence_value(x)}" for k, x in items[:8])
        return s + (f", … ({len(items) - 8} more)" if len(items) > 8 else "")
    if isinstance(v, (list, tuple)):
        s = ", ".join(_evidence_value(x) for x in v[:10])
        return "[" + s + (f", … ({len(v) - 10} more)" if len(v) > 10 else "") + "]"
    return str(v)


def _steps_text(f: Any) -> str:
    if f.first_step is None:
        return "before training" if f.last_step is None else f"until step {f.last_step}"
    if f.last_step is None or f.last_step == f.first_step:
        return f"step {f.first_step}"
    return f"steps {f.first_step}–{f.last_step}"


def render_findings(findings: Sequence[Any] | None, compact: bool = False) -> str:
    """HTML for a list of findings, each with its evidence and fixes (code in ``<code>``).

    ``compact=True`` folds each finding's explanation, evidence and fixes into a
    ``<details>`` element (closed until clicked; no script needed).

    Example:
        >>> from gradtrace.diagnose import Finding, Fix
        >>> "clip" in render_findings([Finding("exploding_gradients", "error", ["rnn"], 3, 9, {},
        ...     "Norms grew.", [Fix("Gradients explode", "Clip", "clip_grad_norm_(p, 1.0)")])])
        True
    """
    if findings is None:
        return ('<p class="empty">Diagnosis is not available in this installation '
                '(<code>gradtrace.diagnose</code> is missing); the figures below still show the run.</p>')
    if not findings:
        return '<div class="healthy"><span class="badge ok">healthy</span> No problems found in this run.</div>'
    out = []
    # diagnose's order (root cause first), not re-sorted by severity: each shows its badge
    for f in findings:
        layers = ", ".join(f.layers[:6]) + (f" and {len(f.layers) - 6} more" if len(f.layers) > 6 else "")
        out.append(f'<div class="finding {_e(f.severity)}" data-kind="{_e(f.kind)}">')
        out.append(f'<h3><span class="badge {_e(f.severity)}">{_e(f.severity)}</span> {_e(kind_title(f.kind))}</h3>')
        out.append(f'<div class="meta">{_e(_steps_text(f))}' + (f" · layers: <code>{_e(layers)}</code>" if layers else "")
                   + "</div>")
        if compact:
            out.append(f"<details><summary>why, evidence and {len(f.fixes)} fix{'es' if len(f.fixes) != 1 else ''}</summary>")
        if f.explanation:
            out.append(f"<p>{_e(f.explanation)}</p>")
        if f.evidence:
            rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_evidence_value(v))}</td></tr>"
                           for k, v in list(f.evidence.items())[:12])
            out.append(f'<table class="ev">{rows}</table>')
        for fx in f.fixes:
            d = fx.to_dict() if hasattr(fx, "to_dict") else dict(fx)
            out.append('<div class="fix">')
            if d.get("problem"):
                out.append(f'<div class="p">{_e(d["problem"])}</div>')
            out.append(f'<div>{_e(d.get("action", ""))}</div>')
            if d.get("code"):
                out.append(f'<pre><code>{_e(d["code"])}</code></pre>')
            out.append("</div>")
        if compact:
            out.append("</details>")
        out.append("</div>")
    return "\n".join(out)


def _cards(summary: dict[str, Any], spikes: int) -> str:
    def card(k: str, v: Any) -> str:
        return f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(v)}</div></div>'

    def num(v: Any) -> str:
        return fmt(v) if isinstance(v, (int, float)) else ("–" if v is None else str(v))

    span = "–" if summary["first_step"] is None else f'{summary["first_step"]}–{summary["last_step"]}'
    return '<div class="cards">' + "".join([
        card("steps recorded", f'{summary["steps_recorded"]} ({span})'),
        card("loss: first → last", f'{num(summary["first_loss"])} → {num(summary["final_loss"])}'),
        card("max total grad norm", num(summary["max_total_grad_norm"])),
        card("loss spikes marked", spikes),
        card("non-finite events", summary["nonfinite_events"]),
        card("guard skips", summary["guard_skips"]),
    ]) + "</div>"


def _spectrum_html(spectrum: Any) -> str:
    if spectrum is None:
        return ""
    try:
        from .spectrum_section import render_spectrum_section
    except ImportError:
        return ('<h2>Jacobian spectrum</h2><p class="empty">A spectrum was passed but this '
                'installation cannot render it (gradtrace.report.spectrum_section is missing).</p>')
    return render_spectrum_section(spectrum)


def render_html(trace, findings: Sequence[Any] | None = (), *, spectrum: Any = None,
                title: str | None = None) -> str:
    """The full report page of one run as an HTML string (see :func:`gradtrace.report.report`).

    Example:
        >>> page = render_html(gt.load("runs/exp1"), findings=[])
        >>> page.startswith("<!DOCTYPE html>") and "Gradient flow" in page
        True
    """
    from . import summarize

    summary = summarize(trace, findings)
    loss_chart, spikes = figures.loss_svg(trace, findings or ())
    name = title or (trace.path or "in-memory run")
    n_find = len(findings) if findings is not None else None
    badge = ('<span class="badge ok">healthy</span>' if n_find == 0 else
             f'<span class="badge error">{n_find} finding{"s" if n_find != 1 else ""}</span>' if n_find else "")
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gradtrace report: {_e(name)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>gradtrace report {badge}</h1>",
        f'<p class="sub">{_e(name)} · model <code>{_e(trace.meta.get("model"))}</code> · optimizer '
        f'<code>{_e(trace.meta.get("optimizer"))}</code> · {len(trace.params)} parameters watched in '
        f'{len(figdata.layer_order(trace))} layers</p>',
        _cards(summary, len(spikes)),
    ]
    if trace.warnings:
        parts.append("<p class='empty'>" + "<br>".join(_e(w) for w in trace.warnings) + "</p>")
    parts.append('<h2 id="findings">Findings and fixes</h2>')
    parts.append(render_findings(findings))

    parts.append('<h2 id="gradient-flow">Gradient flow across depth</h2>')
    parts.append('<p class="small">Each layer\'s gradient norm (its parameters combined), averaged over the run. '
                 'A line falling steeply towards the input side means early layers barely learn '
                 '(vanishing); one climbing to huge values means exploding gradients.</p>')
    parts.append('<div class="grid">')
    parts.append(f'<div class="panel">{figures.gradient_flow_svg(trace)}</div>')
    parts.append(f'<div class="panel">{figures.grad_heatmap_svg(trace)}</div>')
    parts.append("</div>")

    parts.append('<h2 id="loss">Loss and total gradient norm</h2><div class="grid">')
    parts.append(f'<div class="panel">{loss_chart}</div>')
    tot = figures.total_norm_svg(trace)
    if tot:
        parts.append(f'<div class="panel">{tot}</div>')
    parts.append("</div>")
    skips = trace.events("guard_skip")
    if skips:
        reasons: dict[str, int] = {}
        for e in skips:
            reasons[str(e.get("reason", "unspecified"))] = reasons.get(str(e.get("reason", "unspecified")), 0) + 1
        parts.append(f'<p id="guard-skips"><b>Guard skipped {len(skips)} optimizer step(s)</b>: '
                     + ", ".join(f"{_e(r)} × {n}" for r, n in sorted(reasons.items())) + "</p>")
    else:
        parts.append('<p id="guard-skips" class="small">Guard skips: 0.</p>')

    acts = [(s, figures.activation_heatmap_svg(trace, s)) for s in figures.ACT_STATS]
    acts = [(s, svg) for s, svg in acts if svg]
    parts.append('<h2 id="activations">Activations per layer over steps</h2>')
    if acts:
        parts.append('<div class="grid">' + "".join(f'<div class="panel">{svg}</div>' for _, svg in acts) + "</div>")
    else:
        parts.append('<p class="empty">No activation statistics recorded (watch with activations_every &gt; 0).</p>')

    tg = figures.time_gradient_svg(trace)
    if tg:
        parts.append('<h2 id="time">Gradients through time</h2>')
        parts.append(f'<div class="grid"><div class="panel">{tg}</div></div>')

    parts.append(_spectrum_html(spectrum))
    parts.append(_footer())
    parts.append("</main></body></html>")
    return "\n".join(p for p in parts if p)


def _footer() -> str:
    from gradtrace import __version__

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return f"<footer>Written by gradtrace {__version__} on {now}. Self-contained: no scripts, no network.</footer>"


# ---- comparison page (used by `gradtrace demo`) ----------------------------------------------
def flow_overlay_svg(runs: Sequence[tuple[str, Any]], title: str, width: int = 640) -> str:
    """Gradient-flow lines of several runs on one log chart, over relative depth.

    Depth is the layer's position divided by the number of layers (0 = input side,
    1 = output), so networks with different layer counts line up.

    Example:
        >>> t = gt.load("runs/exp1")
        >>> flow_overlay_svg([("a", t), ("b", t)], "Depth").count("<polyline")
        2
    """
    series = []
    for label, trace in runs:
        flow = figdata.gradient_flow(trace)
        n = len(flow["layers"])
        if n == 0:
            continue
        x = np.arange(n) / max(n - 1, 1)
        series.append(Series(f"{label} ({n} layers)", x, flow["mean"]))
    return line_chart(series, title=title, xlabel="relative depth (0 = input layer, 1 = output layer)",
                            ylabel="mean gradient norm", logy=True, width=width)


def loss_overlay_svg(runs: Sequence[tuple[str, Any]], title: str, width: int = 640) -> str:
    """Loss curves of several runs on one chart (log scale when they span > 50x).

    Example:
        >>> t = gt.load("runs/exp1")
        >>> "<svg" in loss_overlay_svg([("a", t), ("b", t)], "Loss")
        True
    """
    series = []
    vals = []
    for label, trace in runs:
        if "loss" not in trace.stats():
            continue
        s, v = trace.series("loss", with_steps=True)
        series.append(Series(label, s, v, style="line"))
        vals.append(v[np.isfinite(v)])
    allv = np.concatenate(vals) if vals else np.zeros(0)
    logy = bool(allv.size and allv.min() > 0 and allv.max() / allv.min() > 50)
    return line_chart(series, title=title, xlabel="step", ylabel="training loss", logy=logy, width=width)


def total_norm_overlay_svg(runs: Sequence[tuple[str, Any]], title: str, width: int = 640) -> str:
    """Total gradient norm (pre-clip) of several runs over steps, log scale.

    Example:
        >>> from gradtrace.trace import Trace
        >>> t = Trace({}, [{"step": i, "scalars": {"total_grad_norm": 1.0 + i}} for i in range(3)])
        >>> "<svg" in total_norm_overlay_svg([("run", t)], title="total norm")
        True
    """
    series = []
    for label, trace in runs:
        if "total_grad_norm" in trace.stats():
            s, v = trace.series("total_grad_norm", with_steps=True)
            series.append(Series(label, s, v, style="line"))
    return line_chart(series, title=title, xlabel="step", ylabel="total gradient norm (pre-clip)",
                            logy=True, width=width)


def time_overlay_svg(runs: Sequence[tuple[str, Any]], title: str, width: int = 640) -> str | None:
    """Gradient norm reaching each time step, first recorded step of each run, log scale.

    Example:
        >>> from gradtrace.trace import Trace
        >>> time_overlay_svg([("run", Trace({}))], title="through time") is None   # no RNN recorded
        True
    """
    series = []
    for label, trace in runs:
        for name, v in figdata.time_gradients(trace).items():
            series.append(Series(label, np.arange(v.shape[1]), v[0], style="line"))
    if not series:
        return None
    return line_chart(series, title=title, xlabel="input time step (loss at the last step)",
                            ylabel="gradient norm at step 0", logy=True, width=width)


def render_comparison(groups: Sequence[dict[str, Any]], *, title: str, intro: str = "",
                      facts: Sequence[dict[str, Any]] = (), footer_note: str = "") -> str:
    """A page comparing experiments: per group, overlaid charts and findings side by side.

    Each group is ``{"title", "text", "runs": [{"name", "label", "trace", "findings",
    "href", "note"}], "charts": ["flow", "loss", "total", "time"]}``. ``facts`` are rows
    ``{"fact", "expected", "measured"}`` shown as a table.

    Example:
        >>> page = render_comparison([], title="demo")
        >>> "<svg" not in page and "demo" in page
        True
    """
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             '<meta name="viewport" content="width=device-width, initial-scale=1">',
             f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>",
             f"<h1>{_e(title)}</h1>"]
    if intro:
        parts.append(f'<p class="sub">{_e(intro)}</p>')
    if facts:
        parts.append('<h2 id="facts">The chapter\'s numbers, measured with torch</h2>')
        rows = "".join(f"<tr><td>{_e(r['fact'])}</td><td>{_e(r['expected'])}</td><td><b>{_e(r['measured'])}</b></td></tr>"
                       for r in facts)
        parts.append(f'<table class="facts"><tr><th>quantity</th><th>chapter says</th><th>measured</th></tr>{rows}</table>')
    for g in groups:
        gid = g.get("id", "")
        parts.append(f'<h2 id="{_e(gid)}">{_e(g["title"])}</h2>')
        if g.get("text"):
            parts.append(f'<p class="small">{_e(g["text"])}</p>')
        runs = [(r["label"], r["trace"]) for r in g["runs"]]
        charts = []
        for c in g.get("charts", ("flow", "loss")):
            if c == "flow":
                charts.append(flow_overlay_svg(runs, "Gradient flow across depth (mean over steps)"))
            elif c == "loss":
                charts.append(loss_overlay_svg(runs, "Training loss"))
            elif c == "total":
                charts.append(total_norm_overlay_svg(runs, "Total gradient norm"))
            elif c == "time":
                svg = time_overlay_svg(runs, "Gradient reaching each time step")
                if svg:
                    charts.append(svg)
        parts.append('<div class="grid">' + "".join(f'<div class="panel">{c}</div>' for c in charts) + "</div>")
        parts.append('<div class="pair">')
        for r in g["runs"]:
            fs = r.get("findings")
            n = None if fs is None else len(fs)
            badge = ("" if n is None else '<span class="badge ok">healthy</span>' if n == 0 else
                     f'<span class="badge error">{n} finding{"s" if n != 1 else ""}</span>')
            link = f' <a href="{_e(r["href"])}">full report</a>' if r.get("href") else ""
            parts.append(f'<div class="exp" data-run="{_e(r["name"])}"><h3>{_e(r["label"])} {badge}</h3>')
            if r.get("note"):
                parts.append(f'<div class="small">{_e(r["note"])}{link}</div>')
            elif link:
                parts.append(f'<div class="small">{link}</div>')
            parts.append(render_findings(fs, compact=True))
            parts.append("</div>")
        parts.append("</div>")
    if footer_note:
        parts.append(f'<p class="small">{_e(footer_note)}</p>')
    parts.append(_footer())
    parts.append("</main></body></html>")
    return "\n".join(parts)


