"""Which modules and parameters a monitor watches, and what kind of activation each is.

Nothing here keeps state on modules or parameters: selection returns names, and the
monitor keys everything by the qualified names of ``named_modules()`` /
``named_parameters()``.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Union

import torch
from torch import nn

LayerSpec = Union[None, str, re.Pattern, type, Callable[[str, nn.Module], bool], Iterable]

# Activation kinds. "relu" units can die (zero output and zero derivative for x < 0);
# "saturating" units have a derivative near zero at the ends of their range.
RELU_FAMILY = (nn.ReLU, nn.ReLU6)
LEAKY_FAMILY = (nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.CELU, nn.SELU)
SMOOTH_FAMILY = (nn.GELU, nn.SiLU, nn.Mish, nn.Softplus)
SATURATING = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh", nn.Hardsigmoid: "sigmoid",
              nn.Hardtanh: "tanh", nn.Softsign: "tanh", nn.LogSigmoid: None}
RECURRENT = (nn.RNN, nn.LSTM, nn.GRU)

#: Saturation bounds on the *output* of a squashing activation. Chosen where the local
#: derivative has fallen below about 6% of its peak:
#: sigmoid: y(1-y) < 0.059 * 0.25  <=>  y < 0.015 or y > 0.985
#: tanh:    1 - y^2 < 0.06          <=>  |y| > 0.97
SATURATION_BOUNDS = {"sigmoid": (0.015, 0.985), "tanh": (-0.97, 0.97)}


def activation_kind(module: nn.Module) -> str | None:
    """Classify a module: ``"relu"``, ``"leaky"``, ``"smooth"``, ``"sigmoid"``, ``"tanh"``,
    ``"recurrent"``, ``"norm"`` or ``None`` (a plain layer or container).

    Example:
        >>> activation_kind(torch.nn.ReLU())
        'relu'
        >>> activation_kind(torch.nn.Tanh())
        'tanh'
    """
    if isinstance(module, RELU_FAMILY):
        return "relu"
    if isinstance(module, LEAKY_FAMILY):
        return "leaky"
    if isinstance(module, SMOOTH_FAMILY):
        return "smooth"
    for cls, kind in SATURATING.items():
        if isinstance(module, cls) and kind is not None:
            return kind
    if isinstance(module, RECURRENT):
        return "recurrent"
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)):
        return "norm"
    return None


@dataclass(frozen=True)
class Selection:
    """The names a monitor watches, in ``named_modules()`` / ``named_parameters()`` order.

    Example:
        >>> Selection(["0"], ["0.weight", "0.bias"]).params
        ['0.weight', '0.bias']
    """

    modules: list[str]
    params: list[str]


def _matcher(spec: LayerSpec) -> Callable[[str, nn.Module], bool]:
    if isinstance(spec, str):
        if any(c in spec for c in "*?["):
            return lambda name, m: fnmatch.fnmatchcase(name, spec)
        return lambda name, m: name == spec or name.startswith(spec + ".")
    if isinstance(spec, re.Pattern):
        return lambda name, m: spec.search(name) is not None
    if isinstance(spec, type) and issubclass(spec, nn.Module):
        return lambda name, m: isinstance(m, spec)
    if callable(spec):
        return lambda name, m: bool(spec(name, m))
    if isinstance(spec, (list, tuple, set, frozenset)):
        parts = [_matcher(s) for s in spec]
        return lambda name, m: any(p(name, m) for p in parts)
    raise TypeError(
        f"layers={spec!r} is not understood; pass a glob string ('encoder.*'), a compiled "
        f"regex, an nn.Module subclass, a predicate (name, module) -> bool, or a list of these")


def select(model: nn.Module, layers: LayerSpec = None) -> Selection:
    """Choose the watched modules and parameters.

    ``layers=None`` watches every leaf module (one with no children) and every module
    that owns parameters directly (e.g. ``nn.MultiheadAttention``), and every parameter.
    Otherwise ``layers`` selects modules by name glob, regex, type, predicate or a list
    of these; the parameters watched are those owned by
    selected modules (directly or below them). An empty match is an error.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
        >>> select(net, torch.nn.Linear).modules
        ['0']
    """
    named = [(n, m) for n, m in model.named_modules() if n != ""]
    if layers is None:
        # Leaves, plus modules that own parameters directly (nn.MultiheadAttention keeps
        # in_proj_weight itself and computes without calling its out_proj child).
        mods = [n for n, m in named if not any(True for _ in m.children())
                or any(p is not None for p in m._parameters.values())]
        if not named:  # a bare layer: watch the model itself
            mods = [""]
        params = [n for n, _ in model.named_parameters()]
        return Selection(mods, params)
    match = _matcher(layers)
    mods = [n for n, m in named if match(n, m)]
    if not mods:
        names = [n for n, _ in named][:12]
        raise ValueError(f"layers={layers!r} matched no module; module names look like {names}")
    chosen = set(mods)
    params = []
    for pname, _ in model.named_parameters():
        owner = pname.rpartition(".")[0]
        if any(owner == c or owner.startswith(c + ".") for c in chosen):
            params.append(pname)
    return Selection(mods, params)


def floating_tensors(out) -> list[torch.Tensor]:
    """Floating-point tensors inside a module output (tensors, tuples, lists, dicts,
    dataclasses, named tuples); integer and bool tensors are skipped.

    Example:
        >>> len(floating_tensors((torch.ones(2), {"k": torch.zeros(2, dtype=torch.long)})))
        1
    """
    found: list[torch.Tensor] = []
    _walk(out, found, 0)
    return found


def _walk(x, found: list, depth: int) -> None:
    if depth > 6:
        return
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() and x.numel() > 0 and not x.is_sparse:
            found.append(x)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _walk(v, found, depth + 1)
    elif isinstance(x, dict):
        for v in x.values():
            _walk(v, found, depth + 1)
    elif hasattr(x, "__dataclass_fields__"):
        for k in x.__dataclass_fields__:
            _walk(getattr(x, k, None), found, depth + 1)


def unit_view(t: torch.Tensor) -> torch.Tensor:
    """View an activation as (samples, units): channels are dim 1 for 4-D/5-D (conv)
    outputs, the last dim otherwise (MLP, sequence models).

    Example:
        >>> unit_view(torch.zeros(8, 3, 5, 5)).shape
        torch.Size([200, 3])
    """
    if t.dim() >= 4:
        return t.transpose(1, -1).reshape(-1, t.shape[1])
    if t.dim() == 1:
        return t.reshape(1, -1)
    return t.reshape(-1, t.shape[-1])
