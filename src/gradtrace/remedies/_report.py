"""What the initialisation remedies share: the layer types they act on and their report rows.

Every initialisation remedy returns a :class:`Report`, a list of dataclass rows whose
``str()`` is a plain-text table.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn

from ..numerics import fmt

__all__ = ["Report", "InitRow", "LSUVRow", "ResidualRow", "LAYERS", "CONV_T", "weight_std"]

#: the layers whose weights the remedies initialise
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def weight_std(t: torch.Tensor) -> float:
    """Standard deviation of a weight's entries (0 for a single entry).

    Example:
        >>> weight_std(torch.tensor([1.0, 3.0]))
        1.4142135381698608
    """
    return float(t.detach().float().std()) if t.numel() > 1 else 0.0


class Report(list):
    """A list of dataclass rows that renders as a plain-text table with ``str()``.

    Example:
        >>> str(Report([ResidualRow("0.2", "zero", 0.5, 0.0)])).split()[:4]
        ['layer', 'init', 'std_before', 'std_after']
    """

    def __str__(self) -> str:
        if not self:
            return "(no layers)"
        cols = [f.name for f in fields(self[0])]
        cells = [[_fmt(getattr(r, c)) for c in cols] for r in self]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        line = "  ".join(c.ljust(w) for c, w in zip(cols, widths))
        rule = "  ".join("-" * w for w in widths)
        body = ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
        return "\n".join([line, rule, *body])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list.__repr__(self)})"



def _fmt(v: Any) -> str:
    return fmt(v, 4) if isinstance(v, float) else str(v)


@dataclass
class InitRow:
    """One layer of :func:`init_for_activation`'s report.

    Example:
        >>> InitRow("0", "relu", "kaiming_normal_", 0.33, 0.5, "module order").activation
        'relu'
    """

    layer: str
    activation: str
    init: str
    std_before: float
    std_after: float
    found_by: str


@dataclass
class LSUVRow:
    """One layer of :func:`lsuv_`'s report (output stds measured on the batch).

    Example:
        >>> LSUVRow("0", 3, 0.41, 1.0, True).converged
        True
    """

    layer: str
    iterations: int
    out_std_initial: float
    out_std_final: float
    converged: bool


@dataclass
class ResidualRow:
    """One branch of :func:`scale_residual_branches_`'s report.

    Example:
        >>> ResidualRow("0.2", "zero", 0.5, 0.0).std_after
        0.0
    """

    layer: str
    init: str
    std_before: float
    std_after: float


