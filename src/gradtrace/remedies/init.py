"""Activation-aware initialisation: each layer initialised for the activation that follows it.

* :func:`init_for_activation` -- picks, for every Linear/Conv layer, the initialisation
  that matches the activation that follows it: He/Kaiming (He, Zhang, Ren & Sun 2015,
  "Delving Deep into Rectifiers") for the ReLU family, Glorot/Xavier (Glorot & Bengio
  2010, "Understanding the difficulty of training deep feedforward neural networks")
  with the ``torch.nn.init.calculate_gain`` gain for tanh/sigmoid, LeCun normal for SELU
  (Klambauer et al. 2017), and Xavier with gain 1 for output layers.

The activation that follows each layer is found by tracing the model with ``torch.fx``
(or, failing that, from module registration order). LSUV and residual-branch scaling
live in :mod:`gradtrace.remedies.lsuv` and :mod:`gradtrace.remedies.residual` (their
names are importable from here too).
"""
from __future__ import annotations

import operator
import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._report import CONV_T as _CONV_T
from ._report import LAYERS as _LAYERS
from ._report import InitRow, LSUVRow, Report, ResidualRow  # noqa: F401
from ._report import weight_std as _std

__all__ = ["init_for_activation", "lsuv_", "scale_residual_branches_", "InitRow", "LSUVRow",
           "ResidualRow", "Report"]

_TRANSPARENT_MODULES: tuple[type, ...] = (
    nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
    nn.GroupNorm, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_GELU_CHOICES = ("kaiming", "xavier")

# activation family of a module type; the parameter (leaky slope) is read separately
_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.ReLU6: "relu", nn.LeakyReLU: "leaky_relu", nn.PReLU: "leaky_relu",
    nn.RReLU: "leaky_relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.GELU: "gelu",
    nn.SiLU: "gelu", nn.Mish: "gelu", nn.ELU: "gelu", nn.CELU: "gelu", nn.Softplus: "gelu",
    nn.SELU: "selu", nn.Softmax: "output", nn.LogSoftmax: "output",
}
_ACT_FUNCTIONS: dict[Any, str] = {
    torch.relu: "relu", F.relu: "relu", torch.relu_: "relu", F.relu_: "relu", F.relu6: "relu",
    F.leaky_relu: "leaky_relu", torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid",
    F.sigmoid: "sigmoid", F.gelu: "gelu", F.silu: "gelu", F.mish: "gelu", F.elu: "gelu",
    F.celu: "gelu", F.softplus: "gelu", F.selu: "selu", torch.selu: "selu",
    F.softmax: "output", F.log_softmax: "output", torch.softmax: "output",
    torch.log_softmax: "output",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh",
                "sigmoid": "sigmoid", "sigmoid_": "sigmoid", "softmax": "output",
                "log_softmax": "output"}
_TRANSPARENT_FUNCTIONS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.layer_norm, F.batch_norm,
    F.group_norm, torch.flatten, operator.add, operator.iadd, torch.add, operator.getitem,
    torch.reshape,
}
_TRANSPARENT_METHODS = {"view", "reshape", "flatten", "contiguous", "permute", "transpose",
                        "squeeze", "unsqueeze", "add", "add_", "__add__", "view_as"}


# ------------------------------------------------------------ activation discovery

def _module_activation(m: nn.Module) -> tuple[str, float | None, str] | None:
    """(family, slope, display) for an activation module, None if not one."""
    for cls, fam in _ACT_MODULES.items():
        if type(m) is cls or isinstance(m, cls):
            slope = None
            if isinstance(m, nn.LeakyReLU):
                slope = float(m.negative_slope)
            elif isinstance(m, nn.PReLU):
                slope = float(m.weight.detach().float().mean())
            elif isinstance(m, nn.RReLU):
                slope = (float(m.lower) + float(m.upper)) / 2
            return fam, slope, type(m).__name__
    return None


def _classify_node(node: Any, gm: Any) -> tuple[str, Any]:
    """Kind of an fx node consuming a layer output: act/transparent/layer/output/unknown."""
    if node.op == "output":
        return "output", None
    if node.op == "call_module":
        m = gm.get_submodule(node.target)
        if isinstance(m, _LAYERS):
            return "layer", type(m).__name__
        if isinstance(m, _TRANSPARENT_MODULES):
            return "transparent", None
        act = _module_activation(m)
        if act is not None:
            return "act", act
        return "unknown", type(m).__name__
    if node.op == "call_function":
        fn = node.target
        if fn in _ACT_FUNCTIONS:
            fam = _ACT_FUNCTIONS[fn]
            slope = None
            if fam == "leaky_relu":
                slope = node.kwargs.get("negative_slope",
                                        node.args[1] if len(node.args) > 1 else 0.01)
                slope = float(slope)
            return "act", (fam, slope, getattr(fn, "__name__", str(fn)))
        if fn in _TRANSPARENT_FUNCTIONS:
            return "transparent", None
        return "unknown", getattr(fn, "__name__", str(fn))
    if node.op == "call_method":
        if node.target in _ACT_METHODS:
            return "act", (_ACT_METHODS[node.target], None, f".{node.target}()")
        if node.target in _TRANSPARENT_METHODS:
            return "transparent", None
        return "unknown", f".{node.target}()"
    return "unknown", node.op


def _follow(node: Any, gm: Any, depth: int = 0) -> set[tuple]:
    found: set[tuple] = set()
    if not node.users:
        return {("output", None)}
    for user in node.users:
        kind, info = _classify_node(user, gm)
        if kind == "transparent" and depth < 64:
            found |= _follow(user, gm, depth + 1)
        else:
            found.add((kind, info))
    return found


def _discover_fx(model: nn.Module) -> dict[str, set[tuple]]:
    gm = torch.fx.symbolic_trace(model)
    out: dict[str, set[tuple]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), _LAYERS):
            out.setdefault(node.target, set()).update(_follow(node, gm))
    return out


def _discover_order(model: nn.Module) -> dict[str, set[tuple]]:
    leaves = [(n, m) for n, m in model.named_modules() if not any(True for _ in m.children())]
    out: dict[str, set[tuple]] = {}
    for i, (name, m) in enumerate(leaves):
        if not isinstance(m, _LAYERS):
            continue
        found: tuple = ("output", None)
        for _, nxt in leaves[i + 1:]:
            if isinstance(nxt, _TRANSPARENT_MODULES):
                continue
            if isinstance(nxt, _LAYERS):
                found = ("layer", type(nxt).__name__)
            else:
                act = _module_activation(nxt)
                found = ("act", act) if act is not None else ("unknown", type(nxt).__name__)
            break
        out[name] = {found}
    return out


# ------------------------------------------------------------------------- init

def _apply_init(layer: nn.Module, fam: str, slope: float | None, gelu: str) -> str:
    w = layer.weight
    mode = "fan_out" if isinstance(layer, _CONV_T) else "fan_in"  # [in, out, *k] layout
    if fam == "gelu":
        fam = "relu" if gelu == "kaiming" else "linear_xavier"
    if fam == "relu":
        nn.init.kaiming_normal_(w, a=0.0, mode=mode, nonlinearity="relu")
        return "kaiming_normal (relu, gain=sqrt(2))"
    if fam == "leaky_relu":
        nn.init.kaiming_normal_(w, a=slope, mode=mode, nonlinearity="leaky_relu")
        return f"kaiming_normal (leaky_relu a={slope:g}, gain={nn.init.calculate_gain('leaky_relu', slope):.4g})"
    if fam == "tanh":
        gain = nn.init.calculate_gain("tanh")
        nn.init.xavier_normal_(w, gain=gain)
        return f"xavier_normal (tanh gain={gain:.4g})"
    if fam == "sigmoid":
        nn.init.xavier_normal_(w, gain=1.0)
        return "xavier_normal (sigmoid gain=1)"
    if fam == "selu":
        nn.init.kaiming_normal_(w, mode=mode, nonlinearity="linear")
        return "lecun_normal (selu: kaiming_normal, linear gain)"
    nn.init.xavier_normal_(w, gain=1.0)
    return "xavier_normal (linear gain=1)"


def init_for_activation(model: nn.Module, *, zero_bias: bool = True,
                        gelu: str = "kaiming") -> Report:
    """Initialise every Linear/Conv layer for the activation that follows it.

    The activation is found by tracing ``model`` with :func:`torch.fx.symbolic_trace`
    (which also sees functional calls such as ``F.relu``/``torch.tanh`` and looks
    through dropout, normalisation, pooling, reshapes and residual additions). If tracing
    fails (data-dependent control flow), the fallback assumes that leaf modules run in
    registration order -- right for ``nn.Sequential`` stacks, a guess for custom
    ``forward`` code -- and says so in the ``found_by`` column (a warning is issued too).

    Rules:

    * ReLU/ReLU6 -> Kaiming normal, gain sqrt(2); LeakyReLU/PReLU/RReLU -> Kaiming with
      the negative slope as ``a``.
    * Tanh -> Xavier normal with gain 5/3; Sigmoid -> Xavier normal, gain 1.
    * GELU, SiLU, Mish, ELU, CELU, Softplus -> ``gelu="kaiming"`` (default): Kaiming
      with the ReLU gain, because these functions equal ReLU for large ``|x|`` and, at
      unit pre-activation variance, pass on about as much second moment as ReLU, so the
      ReLU fixed point ``fan_in * Var(w) = 2`` keeps activations from shrinking with
      depth; ``gelu="xavier"``: Xavier with gain 1 (smaller, more conservative).
    * SELU -> LeCun normal (Kaiming with linear gain), as self-normalising nets require.
    * Nothing follows (output layer), another Linear/Conv follows, or a softmax
      follows -> Xavier normal with gain 1, reported as "linear".
    * Anything else -> left unchanged and reported as ``unknown activation X``.

    Biases are zeroed when ``zero_bias`` (except for unchanged layers). Returns a
    :class:`Report` of :class:`InitRow` (layer, activation, init, weight std before and
    after, how the activation was found).

    Example:
        >>> import torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> report = init_for_activation(net)
        >>> [(row.layer, row.activation) for row in report]
        [('0', 'ReLU'), ('2', 'none (output layer)')]
        >>> str(report).split()[:6]       # str() is a table, one row per layer
        ['layer', 'activation', 'init', 'std_before', 'std_after', 'found_by']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if gelu not in _GELU_CHOICES:
        raise ValueError(f"gelu must be one of {_GELU_CHOICES}, got {gelu!r}")
    try:
        found = _discover_fx(model)
        source = "fx trace"
    except Exception as exc:  # noqa: BLE001 - any tracing failure means "use the fallback"
        warnings.warn(f"init_for_activation: torch.fx could not trace the model ({exc!s:.80}); "
                      "assuming leaf modules run in registration order", stacklevel=2)
        found = _discover_order(model)
        source = "module order"
    report = Report()
    with torch.no_grad():
        for name, layer in model.named_modules():
            if not isinstance(layer, _LAYERS):
                continue
            before = _std(layer.weight)
            kinds = found.get(name)
            if not kinds:
                report.append(InitRow(name, "-", "left unchanged: not called in forward",
                                      before, before, source))
                continue
            if len(kinds) > 1:
                desc = ", ".join(sorted(_describe(k) for k in kinds))
                report.append(InitRow(name, f"ambiguous ({desc})",
                                      f"left unchanged: unknown activation ({desc})",
                                      before, before, source))
                continue
            (kind, info), = kinds
            if kind == "unknown":
                report.append(InitRow(name, f"unknown ({info})",
                                      f"left unchanged: unknown activation {info}",
                                      before, before, source))
                continue
            if kind == "act" and info[0] != "output":
                fam, slope, shown = info
            else:
                fam, slope, shown = "linear", None, _describe((kind, info))
            applied = _apply_init(layer, fam, slope, gelu)
            if zero_bias and getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
            report.append(InitRow(name, shown, applied, before, _std(layer.weight), source))
    return report


def _describe(kind: tuple) -> str:
    k, info = kind
    if k == "act":
        return info[2] if info[0] != "output" else f"none (output: {info[2]})"
    if k == "output":
        return "none (output layer)"
    if k == "layer":
        return f"none (feeds {info})"
    return str(info)



from .lsuv import lsuv_  # noqa: E402  (re-exported: gradtrace 0.1 imported it from here)
from .residual import scale_residual_branches_  # noqa: E402
