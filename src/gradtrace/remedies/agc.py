"""Unit-wise adaptive gradient clipping (AGC): each output unit's gradient is kept below a
fraction of its weight's norm.

Brock, De, Smith & Simonyan 2021, "High-Performance Large-Scale Image Recognition Without
Normalization" (NFNets): for unit ``i`` with ``W* = max(||W_i||, eps)``, a gradient
``G_i`` with ``||G_i|| / W* > clip_factor`` becomes ``clip_factor * W* / ||G_i|| * G_i``.
The scale is computed and applied in float32 for float16/bfloat16 gradients, so a scale
below float16's smallest normal (6.1e-5) does not round to zero.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Iterable, NamedTuple

import torch
from torch import Tensor

__all__ = ["adaptive_clip_grad_", "agc_param_groups", "AGCParam"]


class AGCParam(NamedTuple):
    """A parameter for :func:`adaptive_clip_grad_` with its unit layout.

    ``unit_dim`` is the dimension that indexes output units (0 for Linear/Conv weights,
    1 for ConvTranspose weights laid out ``[in, out/groups, *k]``); ``groups`` is the
    ConvTranspose ``groups`` (output units are then ``(group, channel)`` pairs);
    ``name`` is used by name-glob exclusion.

    Example:
        >>> AGCParam(torch.nn.Parameter(torch.ones(2, 3)), name="fc.weight").unit_dim
        0
    """

    param: Tensor
    unit_dim: int = 0
    groups: int = 1
    name: str | None = None


def _as_agc_param(item: Any) -> AGCParam:
    if isinstance(item, AGCParam):
        return item
    if isinstance(item, Tensor):
        return AGCParam(item)
    if isinstance(item, tuple) and len(item) == 2:
        a, b = item
        if isinstance(a, str) and isinstance(b, Tensor):
            return AGCParam(b, name=a)
        if isinstance(a, Tensor) and isinstance(b, int) and not isinstance(b, bool):
            return AGCParam(a, unit_dim=b)
    raise TypeError(
        "adaptive_clip_grad_: parameters must contain Tensors, (name, Tensor) pairs from "
        "named_parameters(), (Tensor, unit_dim) pairs or AGCParam entries from "
        f"agc_param_groups(); got {type(item).__name__}")


def _check_patterns_match(patterns: list[str], names: list[tuple[str, str | None]]) -> None:
    """An ``exclude`` glob that matches no parameter is a mistake, not a no-op."""
    for pat in patterns:
        if not any(_name_excluded(n, m, [pat]) for n, m in names):
            sample = [n for n, _ in names][:8]
            raise ValueError(f"exclude pattern {pat!r} matches no parameter; names look like {sample}")


def _name_excluded(name: str | None, module_name: str | None, patterns: list[str]) -> bool:
    if name is None:
        return False
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat):
            return True
        if module_name is not None and fnmatch.fnmatchcase(module_name, pat):
            return True
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        if fnmatch.fnmatchcase(owner, pat):
            return True
    return False


def _split_exclude(exclude: Any) -> tuple[set[int], list[str]]:
    if exclude is None:
        return set(), []
    if isinstance(exclude, (str, Tensor)):
        exclude = [exclude]
    ids: set[int] = set()
    patterns: list[str] = []
    for e in exclude:
        if isinstance(e, str):
            patterns.append(e)
        elif isinstance(e, Tensor):
            ids.add(id(e))
        else:
            raise TypeError(
                f"exclude must contain Tensors or name globs (str), found {type(e).__name__}")
    return ids, patterns


def _unit_scale(w: Tensor, g: Tensor, unit_dim: int, groups: int, clip_factor: float,
                eps: float) -> Tensor:
    """Per-unit AGC scale, broadcastable to (or shaped like) ``g``."""
    if g.ndim <= 1:
        wn = torch.linalg.vector_norm(w)
        gn = torch.linalg.vector_norm(g)
    elif groups == 1:
        dims = tuple(d for d in range(g.ndim) if d != unit_dim % g.ndim)
        wn = torch.linalg.vector_norm(w, dim=dims, keepdim=True)
        gn = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
    else:
        shape = (groups, g.shape[0] // groups) + tuple(g.shape[1:])
        dims = (1,) + tuple(range(3, len(shape)))
        wn = torch.linalg.vector_norm(w.reshape(shape), dim=dims, keepdim=True)
        gn = torch.linalg.vector_norm(g.reshape(shape), dim=dims, keepdim=True)
    max_norm = wn.clamp(min=eps) * clip_factor
    scale = torch.where(gn > max_norm, max_norm / gn.clamp(min=1e-6), torch.ones_like(gn))
    if g.ndim > 1 and groups > 1:
        scale = scale.expand(shape).reshape(g.shape)
    return scale


def adaptive_clip_grad_(parameters: Any, clip_factor: float = 0.01, eps: float = 1e-3,
                        exclude: Any = None) -> None:
    """Unit-wise adaptive gradient clipping (AGC, Brock et al. 2021), in place.

    For every unit ``i`` (output row) of every parameter, with
    ``W* = max(||W_i||, eps)``: if ``||G_i|| / W* > clip_factor`` the unit's gradient is
    rescaled to ``clip_factor * W* / max(||G_i||, 1e-6) * G_i``. Tensors with ndim <= 1
    (biases, gains) use their whole norm. No host sync.

    ``parameters`` may mix:

    * Tensors (unit dim 0, the layout of Linear/Conv weights ``[out, in, *k]``);
    * ``(name, Tensor)`` pairs, e.g. ``model.named_parameters()``, so that ``exclude``
      can name layers;
    * ``(Tensor, unit_dim)`` pairs for other layouts;
    * :class:`AGCParam` entries from :func:`agc_param_groups`, which detects
      ConvTranspose weights (unit dim 1, with their ``groups``) for you -- the
      recommended way for models with transposed convolutions.

    ``exclude`` is an iterable of Tensors (matched by identity) and/or name globs
    (``fnmatch``), matched against the parameter name and its owning module name,
    so ``exclude=("fc",)`` drops ``fc.weight`` and ``fc.bias``. The paper excludes the
    final classifier. Name globs need named entries.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(),
        ...                             torch.nn.Linear(8, 2))
        >>> model(torch.randn(3, 4)).sum().backward()
        >>> adaptive_clip_grad_(model.named_parameters(), exclude=("2",))
        >>> adaptive_clip_grad_(agc_param_groups(model, exclude=("2",)), clip_factor=0.02)
    """
    clip_factor = float(clip_factor)
    eps = float(eps)
    if not clip_factor > 0.0:
        raise ValueError(f"clip_factor must be > 0, got {clip_factor}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    if isinstance(parameters, torch.nn.Module):
        raise TypeError("adaptive_clip_grad_: parameters must be an iterable, got the module "
                        f"{type(parameters).__name__}; pass model.named_parameters() or "
                        "agc_param_groups(model)")
    items = [_as_agc_param(x) for x in parameters]
    ex_ids, patterns = _split_exclude(exclude)
    if patterns and items and all(it.name is None for it in items):
        raise ValueError(
            "exclude contains name patterns but parameters carry no names; pass "
            "model.named_parameters() or agc_param_groups(model, exclude=...)")
    _check_patterns_match(patterns, [(it.name, None) for it in items if it.name is not None])
    with torch.no_grad():
        for it in items:
            p, g = it.param, it.param.grad
            if g is None or id(p) in ex_ids or _name_excluded(it.name, None, patterns):
                continue
            if g.layout != torch.strided:
                raise TypeError(
                    f"adaptive_clip_grad_: sparse gradients are not supported "
                    f"(parameter {it.name or tuple(p.shape)})")
            if g.ndim > 1:
                if not -g.ndim <= it.unit_dim < g.ndim:
                    raise ValueError(
                        f"unit_dim={it.unit_dim} is out of range for a {g.ndim}-d parameter")
                if it.groups < 1 or (it.groups > 1 and (it.unit_dim % g.ndim != 1
                                                        or g.shape[0] % it.groups)):
                    raise ValueError(
                        f"groups={it.groups} needs unit_dim=1 and a first dim divisible by "
                        f"groups (ConvTranspose layout); got shape {tuple(g.shape)}")
            cdt = torch.float32 if g.dtype in (torch.float16, torch.bfloat16) else g.dtype
            g_c = g.to(cdt)
            scale = _unit_scale(p.detach().to(cdt), g_c, it.unit_dim, it.groups,
                                clip_factor, eps)
            if g_c is g:
                g.mul_(scale)
            else:   # multiply in float32, round once: a tiny scale must not become 0
                g.copy_(g_c.mul_(scale))


def agc_param_groups(model: torch.nn.Module, exclude: Iterable[str] | None = None
                     ) -> list[AGCParam]:
    """List ``model``'s parameters as :class:`AGCParam` with the right unit layout.

    ConvTranspose weights (``[in, out/groups, *k]``) get ``unit_dim=1`` and their
    ``groups``; everything else uses dim 0. ``exclude`` is an iterable of name globs
    matched against module names and full parameter names (``("fc",)`` or
    ``("head.*",)``); excluded parameters are left out. Shared parameters appear once.

    Example:
        >>> import torch
        >>> m = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 2), torch.nn.Flatten(),
        ...                         torch.nn.LazyLinear(2))
        >>> [p.unit_dim for p in agc_param_groups(m, exclude=("2",))]
        [1, 0]
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(exclude, str):
        exclude = [exclude]
    patterns = list(exclude or [])
    for pat in patterns:
        if not isinstance(pat, str):
            raise TypeError(f"exclude must contain name globs (str), found {type(pat).__name__}")
    _check_patterns_match(patterns, [(f"{m}.{n}" if m else n, m) for m, mod in model.named_modules()
                                     for n, _ in mod.named_parameters(recurse=False)])
    convt = (torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)
    seen: set[int] = set()
    out: list[AGCParam] = []
    for mname, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            full = f"{mname}.{pname}" if mname else pname
            if _name_excluded(full, mname, patterns):
                continue
            if isinstance(mod, convt) and pname == "weight":
                out.append(AGCParam(p, 1, mod.groups, full))
            else:
                out.append(AGCParam(p, 0, 1, full))
    return out

