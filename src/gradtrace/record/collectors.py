"""The per-parameter statistics: for each, when it runs, what it computes, how it reduces.

A :class:`ParamFigure` is taken when backward has finished accumulating (before anyone
clips), on every recorded step or on activation steps only; ``compute`` runs grouped
foreach kernels on the device (O(1) Python calls in the number of tensors); ``reduce``
says how shards and ranks combine it; ``decode`` turns the host values into the figure.
Adding a statistic is one entry in :data:`PARAM_FIGURES`.

Which figures run on every step was decided by measurement (CPU, one thread, 24-layer
MLP of width 256, batch 128, 17 ms a step, 50 tensors): ``_foreach_norm`` of the
gradients 0.23-0.31 ms, of the parameters 0.32 ms, ``aminmax`` per gradient 0.24 ms
(50 launches; ``_foreach_max(_foreach_abs(g))`` 3.1 ms and ``_foreach_norm(g, inf)``
4.2 ms take slow paths on CPU). The gradient norm is the figure every detector reads on
every step, so it runs every step; max|g| and the parameter norm (which moves slowly)
run on activation steps, where they cost under 0.4% of the step once amortised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .reduce import max_abs, squared_norms


@dataclass(frozen=True)
class ParamFigure:
    """One per-parameter statistic.

    Example:
        >>> fig = PARAM_FIGURES[0]
        >>> fig.stat, fig.every_step, fig.reduce
        ('grad_norm', True, 'sum')
        >>> fig.compute([torch.ones(4)], [torch.ones(4)], torch.device("cpu"))
        tensor([4.], dtype=torch.float64)
    """

    stat: str           # name in the record's "param" section
    part: str           # name of its slice of the step's flat buffer
    every_step: bool    # False: activation steps only
    reduce: str         # across shards and ranks: "sum" (of squares) or "max"
    compute: Callable[..., torch.Tensor]   # (grads, params, device, uniform) -> 1-D tensor
    decode: Callable[[np.ndarray], np.ndarray]                     # host values -> figure


def squares(tensors: list, dev: torch.device, uniform: bool = False) -> torch.Tensor:
    """Squared L2 norms (float64, on ``dev``) from the one norm engine,
    :func:`gradtrace.norms.norm_vector` (on the CPU small tensors of a repeated shape summed
    in float64 as the rows of one stack, the others by one grouped ``_foreach_norm`` with
    its range check; float64 accumulation elsewhere). Not
    :func:`gradtrace.norms.grad_norms`: that one returns a 0-d tensor per input and keeps
    the per-tensor sharing for the clippers; this one is a vector, remembers nothing.

    Example:
        >>> squares([torch.ones(4), torch.ones(9)], torch.device("cpu")).tolist()
        [4.0, 9.0]
    """
    return squared_norms(tensors, dev, uniform)


def _grad_sq(grads: list, params: list, dev: torch.device, uniform: bool = False) -> torch.Tensor:
    return squares(grads, dev, uniform)


def _grad_max(grads: list, params: list, dev: torch.device, uniform: bool = False) -> torch.Tensor:
    return max_abs(grads, dev, uniform)


def _param_sq(grads: list, params: list, dev: torch.device, uniform: bool = False) -> torch.Tensor:
    return squares(params, dev, uniform)


def _sqrt(v: np.ndarray) -> np.ndarray:
    return np.sqrt(v.astype(np.float64))


def _same(v: np.ndarray) -> np.ndarray:
    return v.astype(np.float64)


#: Parameter figures, in the order they sit in the flat buffer.
PARAM_FIGURES: tuple[ParamFigure, ...] = (
    ParamFigure("grad_norm", "gsq", True, "sum", _grad_sq, _sqrt),
    ParamFigure("grad_maxabs", "gmax", False, "max", _grad_max, _same),
    ParamFigure("param_norm", "psq", False, "sum", _param_sq, _sqrt),
)
