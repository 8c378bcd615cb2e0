"""Initialisation remedies: activation-aware init, LSUV and residual-branch scaling.

* :func:`init_for_activation` -- picks, for every Linear/Conv layer, the initialisation
  that matches the activation that follows it: He/Kaiming (He, Zhang, Ren & Sun 2015,
  "Delving Deep into Rectifiers") for the ReLU family, Glorot/Xavier (Glorot & Bengio
  2010, "Understanding the difficulty of training deep feedforward neural networks")
  with the ``torch.nn.init.calculate_gain`` gain for tanh/sigmoid, LeCun normal for SELU
  (Klambauer et al. 2017), and Xavier with gain 1 for output layers.
* :func:`lsuv_` -- layer-sequential unit-variance init (Mishkin & Matas 2016, "All you
  need is a good init"): orthonormal init (Saxe, McClelland & Ganguli 2014) followed by
  rescaling each layer, in execution order, until its output std on a batch is ~1.
* :func:`scale_residual_branches_` -- shrink the last layer of residual branches:
  GPT-2 style ``N(0, 0.02 / sqrt(2L))`` (Radford et al. 2019) or zero init as in Fixup
  (Zhang, Dauphin & Ma 2019) and "ReZero"-like schemes.

All functions return a report (a list of dataclass rows whose ``str()`` is a table).
"""
from __future__ import annotations

import fnmatch
import math
import operator
import warnings
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["init_for_activation", "lsuv_", "scale_residual_branches_", "InitRow", "LSUVRow",
           "ResidualRow", "Report"]

_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
           nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_TRANSPARENT_MODULES: tuple[type, ...] = (
    nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.LayerNorm,
    nn.GroupNorm, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_GELU_CHOICES = ("kaiming", "xavier")
_RESIDUAL_MODES = ("gpt2", "zero")

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


# ----------------------------------------------------------------------- reports

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
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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

def _std(t: torch.Tensor) -> float:
    return float(t.detach().float().std()) if t.numel() > 1 else 0.0


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
        >>> print(report)  # doctest: +SKIP
        layer  activation           init                                 std_before ...
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


# ------------------------------------------------------------------------- LSUV

class _StopForward(Exception):
    pass


def _run(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def lsuv_(model: nn.Module, batch: Any, tol: float = 0.1, max_iter: int = 10, *,
          zero_bias: bool = True) -> Report:
    """Layer-sequential unit-variance init (Mishkin & Matas 2016), in place.

    Every Linear/Conv weight gets an orthonormal init (biases zeroed when
    ``zero_bias``); then, layer by layer in the order the forward pass calls them, the
    weight is divided by the std of the layer's output on ``batch`` until
    ``|std - 1| < tol`` or ``max_iter`` rescalings were done. The model runs in eval mode
    (every module's training flag is restored afterwards) under ``torch.no_grad``; each
    measurement stops the forward pass right after the layer in question. Forward hooks
    are removed in a ``finally`` block. ``batch`` is passed as ``model(batch)``,
    ``model(*batch)`` for a tuple/list or ``model(**batch)`` for a dict.

    Returns a :class:`Report` of :class:`LSUVRow`.

    Example:
        >>> import torch, torch.nn as nn
        >>> net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
        >>> rows = lsuv_(net, torch.randn(64, 16))
        >>> all(r.converged for r in rows)
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not float(tol) > 0:
        raise ValueError(f"tol must be > 0, got {tol}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]
    if not layers:
        raise ValueError("lsuv_: the model has no Linear/Conv layers")
    names = {id(m): n for n, m in layers}
    training = {m: m.training for m in model.modules()}
    handles: list[Any] = []
    report = Report()
    try:
        model.eval()
        with torch.no_grad():
            for _, m in layers:
                nn.init.orthogonal_(m.weight)
                if zero_bias and getattr(m, "bias", None) is not None:
                    m.bias.zero_()
            order: list[nn.Module] = []

            def record(mod: nn.Module, inp: Any, out: Any) -> None:
                if all(mod is not o for o in order):
                    order.append(mod)

            handles = [m.register_forward_hook(record) for _, m in layers]
            _run(model, batch)
            for h in handles:
                h.remove()
            handles = []
            for layer in order:
                measured: list[torch.Tensor] = []

                def grab(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
                    measured.append(out.detach().float().std())
                    raise _StopForward

                handles = [layer.register_forward_hook(grab)]

                def measure() -> float:
                    measured.clear()
                    try:
                        _run(model, batch)
                    except _StopForward:
                        pass
                    return float(measured[0])

                std = first = measure()
                iters = 0
                while (abs(std - 1.0) >= tol and iters < max_iter and math.isfinite(std)
                       and std > 0.0):
                    layer.weight.div_(std)
                    iters += 1
                    std = measure()
                handles[0].remove()
                handles = []
                report.append(LSUVRow(names[id(layer)], iters, first, std,
                                      abs(std - 1.0) < tol))
            called = {id(m) for m in order}
            for n, m in layers:
                if id(m) not in called:
                    report.append(LSUVRow(n + " (not called: orthogonal only)", 0,
                                          math.nan, math.nan, False))
    finally:
        for h in handles:
            h.remove()
        for m, flag in training.items():
            m.training = flag
    return report


# ------------------------------------------------------------- residual branches

def _last_layer(m: nn.Module) -> tuple[str, nn.Module] | None:
    if isinstance(m, _LAYERS) or isinstance(getattr(m, "weight", None), nn.Parameter):
        return "", m
    last = None
    for n, sub in m.named_modules():
        if isinstance(sub, _LAYERS):
            last = (n, sub)
    return last


def scale_residual_branches_(model: nn.Module, branches: Any, mode: str = "gpt2",
                             n_layers: int | None = None, *, std: float = 0.02) -> Report:
    """Shrink the output layer of each residual branch so deep residual stacks start tame.

    ``branches`` names the branch output layers: a glob or list of globs over module
    names (``"blocks.*.attn.proj"``, ``"blocks.*.mlp.fc2"``), modules, or a mix. A matched
    container stands for its last Linear/Conv (registration order); the report names
    the layer actually changed.

    * ``mode="gpt2"``: weight ~ ``N(0, std / sqrt(2 * n_layers))`` (GPT-2). Each GPT-2
      block adds two residual branches (attention and MLP), so ``2 * n_layers`` is the
      number of residual additions; with ``n_layers=None`` that number is taken to be
      the number of matched branches, i.e. the std is ``std / sqrt(n_branches)``.
    * ``mode="zero"``: weight = 0 (Fixup-style), so every block starts as the identity.

    Biases of the changed layers are zeroed. No match raises ``ValueError``.

    Example:
        >>> import torch.nn as nn
        >>> blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        ...                        for _ in range(4))
        >>> rows = scale_residual_branches_(blocks, "*.2", mode="zero")
        >>> len(rows)
        4
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if mode not in _RESIDUAL_MODES:
        raise ValueError(f"mode must be one of {_RESIDUAL_MODES}, got {mode!r}")
    if n_layers is not None and (isinstance(n_layers, bool) or not isinstance(n_layers, int)
                                 or n_layers < 1):
        raise ValueError(f"n_layers must be None or an int >= 1, got {n_layers!r}")
    if not float(std) > 0:
        raise ValueError(f"std must be > 0, got {std}")
    if isinstance(branches, (str, nn.Module)):
        branches = [branches]
    patterns: list[str] = []
    wanted: list[nn.Module] = []
    for b in branches:
        if isinstance(b, str):
            patterns.append(b)
        elif isinstance(b, nn.Module):
            wanted.append(b)
        else:
            raise TypeError(f"branches must contain name globs (str) or modules, "
                            f"found {type(b).__name__}")
    chosen: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, m in model.named_modules():
        hit = any(m is w for w in wanted) or any(fnmatch.fnmatchcase(name, p) for p in patterns)
        if not hit:
            continue
        last = _last_layer(m)
        if last is None:
            raise ValueError(f"branch {name!r} has no Linear/Conv layer or weight to scale")
        sub, layer = last
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        chosen.append((f"{name}.{sub}" if sub and name else (sub or name), layer))
    missing = [w for w in wanted if all(w is not m for _, m in model.named_modules())]
    if missing:
        raise ValueError(f"{len(missing)} module(s) in branches are not part of model")
    if not chosen:
        sample = [n for n, _ in model.named_modules() if n][:8]
        raise ValueError(f"no module matched branches={patterns or wanted}; module names "
                         f"look like {sample}")
    denom = math.sqrt(2 * n_layers) if n_layers is not None else math.sqrt(len(chosen))
    report = Report()
    with torch.no_grad():
        for name, layer in chosen:
            before = _std(layer.weight)
            if mode == "gpt2":
                s = std / denom
                nn.init.normal_(layer.weight, 0.0, s)
                how = f"normal(0, {std:g}/sqrt({denom ** 2:g}) = {s:.4g})"
            else:
                layer.weight.zero_()
                how = "zero (Fixup-style)"
            if getattr(layer, "bias", None) is not None:
                layer.bias.zero_()
            report.append(ResidualRow(name, how, before, _std(layer.weight)))
    return report
