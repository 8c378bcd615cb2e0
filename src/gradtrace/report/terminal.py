"""The terminal view of a run (``gradtrace show``): findings on top, then a per-layer table.

Each layer's row has its latest gradient norm and activation figures plus a trend, a
sparkline over the recorded steps (``▁▂▃▄▅▆▇█``, log-scaled for norms). The table uses
rich when it is installed and plain text otherwise.

Example:
    >>> from gradtrace.report.terminal import sparkline
    >>> sparkline([1e-6, 1e-4, 1e-2, 1.0], log=True)
    '▁▃▆█'
"""
from __future__ import annotations

import math
import os
import shutil
import sys
from typing import Any, Sequence

import numpy as np

from ..numerics import fmt
from .figdata import layer_grad_norms, raw_matrix

BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float], width: int = 24, log: bool = False) -> str:
    """A one-line trend of ``values`` (binned to ``width`` characters by their mean).

    Missing values become a space, non-finite ones ``!``. ``log=True`` scales by log10,
    so a norm falling 1000x shows as clearly as one falling 2x would on a linear scale.

    Example:
        >>> sparkline([1, 2, 3, 4, 5, 6, 7, 8])
        '▁▂▃▄▅▆▇█'
        >>> sparkline([1.0, float("inf"), 1.0])
        '▄!▄'
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return ""
    if v.size > width:
        edges = np.linspace(0, v.size, width + 1).astype(int)
        binned = []
        for a, b in zip(edges[:-1], edges[1:]):
            block = v[a:b]
            if np.any(np.isinf(block)):
                binned.append(np.inf)
            elif np.all(np.isnan(block)):
                binned.append(np.nan)
            else:
                binned.append(float(np.nanmean(block)))
        v = np.asarray(binned)
    with np.errstate(all="ignore"):
        t = np.log10(np.where(v > 0, v, np.nan)) if log else v.copy()
    t = np.where(np.isinf(v), np.nan, t)
    fin = t[np.isfinite(t)]
    lo, hi = (float(fin.min()), float(fin.max())) if fin.size else (0.0, 1.0)
    out = []
    for raw, x in zip(v, t):
        if np.isinf(raw):
            out.append("!")
        elif not np.isfinite(x):
            out.append("_" if (log and raw <= 0) else " ")
        elif hi - lo < 1e-12:
            out.append(BARS[3])
        else:
            out.append(BARS[min(7, int((x - lo) / (hi - lo) * 7.999))])
    return "".join(out)


def layer_rows(trace) -> list[dict[str, Any]]:
    """One dict per layer (input side first) with its latest figures and trends.

    Keys: ``layer``, ``type``, ``activation``, ``grad_norm``, ``grad_trend``,
    ``out_std``, ``std_trend``, ``zero_frac``/``saturated_frac``, ``dead_units``.

    Example:
        >>> layer_rows(gt.load("runs/exp1"))[0]["layer"]
        '0'
    """
    steps, layers, g = layer_grad_norms(trace)
    stats = set(trace.stats())
    info = {lay.name: {"type": lay.type, "activation": lay.activation} for lay in trace.layers()}
    mats = {}
    for stat in ("out_std", "zero_frac", "saturated_frac", "dead_units", "units"):
        if stat in stats:
            _, names, vals = raw_matrix(trace, stat)
            mats[stat] = {n: vals[:, j] for j, n in enumerate(names)}

    def last(v: np.ndarray) -> float | None:
        v = v[~np.isnan(v)]
        return float(v[-1]) if v.size else None

    # Activation modules (ReLU, Sigmoid...) follow the layer they act on; show each layer
    # with the activation right after it in execution order.
    exec_order = trace.exec_order()
    rows = []
    for j, layer in enumerate(layers):
        mi = info.get(layer, {})
        row: dict[str, Any] = {"layer": layer or "(root)", "type": mi.get("type", "?"),
                               "activation": mi.get("activation")}
        col = g[:, j] if len(steps) else np.zeros(0)
        row["grad_norm"] = last(col) if col.size else None
        row["grad_trend"] = sparkline(col, log=True)
        # the module whose outputs describe this layer: the next activation, else itself
        act_name = layer
        if layer in exec_order:
            k = exec_order.index(layer)
            nxt = exec_order[k + 1] if k + 1 < len(exec_order) else None
            if nxt and nxt not in layers and info.get(nxt, {}).get("activation") in ("relu", "leaky", "smooth", "sigmoid", "tanh"):
                act_name = nxt
                row["activation"] = info[nxt].get("type")
        std = mats.get("out_std", {}).get(act_name)
        if std is not None:
            row["out_std"] = last(std)
            row["std_trend"] = sparkline(std[~np.isnan(std)], log=True)
        for stat in ("zero_frac", "saturated_frac"):
            v = mats.get(stat, {}).get(act_name)
            if v is not None and last(v) is not None:
                row[stat] = last(v)
        dead = mats.get("dead_units", {}).get(act_name)
        units = mats.get("units", {}).get(act_name)
        if dead is not None and last(dead) is not None:
            row["dead_units"] = f"{int(last(dead))}/{int(last(units) or 0)}"
        rows.append(row)
    return rows


def _wrap(text: str, first: str, rest: str) -> str:
    """Wrap prose to the terminal width, continuation lines indented under the first."""
    import shutil
    import textwrap

    width = max(60, min(shutil.get_terminal_size((100, 20)).columns, 120))
    return textwrap.fill(text, width=width, initial_indent=first, subsequent_indent=rest)


def _finding_lines(findings: Sequence[Any] | None) -> list[tuple[str, str]]:
    """(style, text) lines for the findings block."""
    from .html import kind_title

    if not findings:
        return [("green", "✓ Healthy: no problems found.")]
    out: list[tuple[str, str]] = []
    # diagnose's order (root cause first), not re-sorted by severity: each row shows its own
    for f in findings:
        where = ", ".join(f.layers[:4]) + (f" (+{len(f.layers) - 4})" if len(f.layers) > 4 else "")
        steps = "" if f.first_step is None else f" from step {f.first_step}"
        style = "bold red" if f.severity == "error" else "bold yellow"
        out.append((style, f"{f.severity.upper():7s} {kind_title(f.kind)}{steps}" + (f" in {where}" if where else "")))
        if f.explanation:
            out.append(("", _wrap(f.explanation, "        ", "        ")))
        for fx in f.fixes:
            d = fx.to_dict() if hasattr(fx, "to_dict") else dict(fx)
            out.append(("cyan", _wrap(d.get("action", ""), "        fix: ", "             ")))
            for line in str(d.get("code", "")).splitlines():
                out.append(("green", f"             {line}"))
    return out


def _header(trace, summary: dict[str, Any]) -> str:
    span = "no steps" if summary["first_step"] is None else f"steps {summary['first_step']}–{summary['last_step']}"
    loss = ""
    if summary.get("final_loss") is not None:
        loss = f" · loss {fmt(summary['first_loss'])} → {fmt(summary['final_loss'])}"
    extra = ""
    if summary["nonfinite_events"] or summary["guard_skips"]:
        extra = f" · non-finite events {summary['nonfinite_events']} · guard skips {summary['guard_skips']}"
    return (f"gradtrace · {trace.path or 'in-memory run'} · {trace.meta.get('model')} · "
            f"{summary['steps_recorded']} records ({span}){loss}{extra}")


COLUMNS = [("layer", "layer"), ("type", "type"), ("activation", "act."), ("grad_norm", "grad norm"),
           ("grad_trend", "grad trend (log)"), ("out_std", "out std"), ("std_trend", "std trend (log)"),
           ("zero_frac", "zero frac"), ("saturated_frac", "saturated"), ("dead_units", "dead")]


def _cell(row: dict, key: str) -> str:
    v = row.get(key)
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan/inf" if math.isinf(v) else fmt(v)
    return str(v)


def render_plain(trace, findings: Sequence[Any] | None) -> str:
    """The ``gradtrace show`` output as plain text (no colours, fixed-width table).

    Example:
        >>> render_plain(gt.load("runs/exp1"), []).startswith("gradtrace")
        True
    """
    from . import summarize

    summary = summarize(trace, findings)
    rows = layer_rows(trace)
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) not in (None, "") for r in rows) or k in ("layer", "grad_norm")]
    lines = [_header(trace, summary), "", "Findings"]
    lines += [t for _, t in _finding_lines(findings)]
    lines += ["", "Layers (input side first)"]
    widths = [max(len(h), *(len(_cell(r, k)) for r in rows)) if rows else len(h) for k, h in cols]
    lines.append("  ".join(h.ljust(w) for (k, h), w in zip(cols, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(_cell(r, k).ljust(w) for (k, _), w in zip(cols, widths)).rstrip())
    return "\n".join(lines)


def print_show(trace, findings: Sequence[Any] | None, file: Any = None, use_rich: bool | None = None) -> None:
    """Print the ``gradtrace show`` view: findings on top, then the per-layer table.

    Uses rich (colours, box table) when installed and ``use_rich`` is not ``False``;
    otherwise plain text.

    Example:
        >>> import io; out = io.StringIO()
        >>> print_show(gt.load("runs/exp1"), [], file=out, use_rich=False)
        >>> "layer" in out.getvalue()
        True
    """
    file = file or sys.stdout
    if use_rich is None:
        use_rich = os.environ.get("GRADTRACE_PLAIN", "") == ""
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
            from rich.text import Text
        except ImportError:
            use_rich = False
    if not use_rich:
        print(render_plain(trace, findings), file=file)
        return
    from . import summarize

    width = shutil.get_terminal_size((140, 40)).columns
    console = Console(file=file, width=max(width, 120), highlight=False)
    summary = summarize(trace, findings)
    console.print(Text(_header(trace, summary), style="bold"))
    console.print()
    console.print(Text("Findings", style="bold underline"))
    for style, text in _finding_lines(findings):
        console.print(Text(text, style=style or None))
    console.print()
    rows = layer_rows(trace)
    cols = [(k, h) for k, h in COLUMNS if any(r.get(k) not in (None, "") for r in rows) or k in ("layer", "grad_norm")]
    table = Table(title="Layers (input side first)", title_justify="left", show_lines=False)
    for k, h in cols:
        table.add_column(h, justify="right" if k in ("grad_norm", "out_std", "zero_frac", "saturated_frac", "dead_units") else "left",
                         no_wrap=True)
    for r in rows:
        cells = []
        for k, _ in cols:
            c = _cell(r, k)
            style = None
            if k == "grad_norm" and isinstance(r.get(k), float) and not math.isfinite(r[k]):
                style = "bold red"
            cells.append(Text(c, style=style) if style else c)
        table.add_row(*cells)
    console.print(table)
