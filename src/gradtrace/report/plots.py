"""Old import path of the report's figures; they now live in ``figdata`` (numbers),
``svg`` (primitives), ``figures`` (the report's SVG figures) and ``png`` (matplotlib).

Example:
    >>> from gradtrace.report import plots
    >>> plots.line_chart([plots.Series("loss", [0, 1], [2.0, 1.0])], title="Loss",
    ...                  xlabel="step", ylabel="loss").startswith("<svg")
    True
"""
from __future__ import annotations

from ..numerics import fmt  # noqa: F401
from .figdata import (downsample, gradient_flow, layer_exec_rank, layer_grad_norms,  # noqa: F401
                      layer_order, loss_spikes, module_rows, raw_matrix, time_gradients)
from .figures import (ACT_STATS, activation_heatmap_svg, grad_heatmap_svg,  # noqa: F401
                      gradient_flow_svg, loss_svg, time_gradient_svg, total_norm_svg)
from .png import _matplotlib, write_pngs  # noqa: F401
from .svg import FONT, PALETTE, Marker, Series, heatmap, line_chart  # noqa: F401

__all__ = ["fmt", "downsample", "gradient_flow", "layer_exec_rank", "layer_grad_norms", "layer_order",
           "loss_spikes", "module_rows", "raw_matrix", "time_gradients", "ACT_STATS",
           "activation_heatmap_svg", "grad_heatmap_svg", "gradient_flow_svg", "loss_svg",
           "time_gradient_svg", "total_norm_svg", "_matplotlib", "write_pngs", "FONT", "PALETTE",
           "Marker", "Series", "heatmap", "line_chart"]
