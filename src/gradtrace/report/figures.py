"""The report's figures: gradient flow, gradient and activation heatmaps, loss, total norm, BPTT.

Each takes a trace (and findings where they mark something) and returns inline SVG built
from :mod:`~gradtrace.report.figdata` numbers with :mod:`~gradtrace.report.svg` primitives.

Example:
    >>> gradient_flow_svg(gt.load("runs/exp1")).startswith("<svg")
    True
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .figdata import gradient_flow, layer_grad_norms, module_rows, spike_marks, time_gradients
from .svg import Marker, Series, heatmap, line_chart


def _short_layers(layers: Sequence[str]) -> list[str]:
    return [n if n else "(root)" for n in layers]


def gradient_flow_svg(trace, width: int = 640) -> str:
    """Mean and max gradient norm per layer across depth, log scale.

    Example:
        >>> "Gradient flow" in gradient_flow_svg(gt.load("runs/exp1"))
        True
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
        >>> grad_heatmap_svg(gt.load("runs/exp1")).count("<rect") > 90
        True
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
        >>> activation_heatmap_svg(gt.load("runs/exp1"), "saturated_frac") is None   # no sigmoid/tanh
        True
    """
    steps, mods, m = module_rows(trace, stat)
    if not mods:
        return None
    title, label, log = ACT_STATS.get(stat, (stat, stat, False))
    return heatmap(m, mods, steps, title=title, value_label=label, log=log, width=width,
                   vmin=None if log else 0.0, vmax=None if log else 1.0)


def loss_svg(trace, findings: Sequence[Any] = (), width: int = 640) -> tuple[str, list[int]]:
    """The loss curve with the diagnosed spikes, non-finite stretches and guard skips
    marked; returns ``(svg, marked_steps)``.

    Example:
        >>> svg, spikes = loss_svg(gt.load("runs/exp1"))
        >>> spikes
        []
    """
    if "loss" not in trace.stats():
        return '<p class="empty">No loss recorded (call <code>mon.record_loss(loss)</code> each step).</p>', []
    steps, loss = trace.series("loss", with_steps=True)
    spikes = spike_marks(steps, loss, findings)
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
        >>> "Total gradient norm" in total_norm_svg(gt.load("runs/exp1"))
        True
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
        >>> time_gradient_svg(gt.load("runs/exp1")) is None     # no time_gradients=True
        True
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


