"""Residual-branch scaling: shrink (GPT-2) or zero (Fixup) the last layer of each branch.

GPT-2 style ``N(0, 0.02 / sqrt(2L))`` (Radford et al. 2019), or zero init as in Fixup
(Zhang, Dauphin & Ma 2019) and "ReZero"-like schemes, so a deep residual stack starts
close to the identity.
"""
from __future__ import annotations

import fnmatch
import math
from typing import Any

import torch
import torch.nn as nn

from ._report import LAYERS as _LAYERS
from ._report import Report, ResidualRow
from ._report import weight_std as _std

__all__ = ["scale_residual_branches_"]

_RESIDUAL_MODES = ("gpt2", "zero")


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
