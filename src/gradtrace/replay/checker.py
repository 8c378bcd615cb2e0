"""Find the first operation that turned finite inputs into ``nan``/``inf``, and where it ran.

Two modes run together while a step is replayed:

- a ``TorchFunctionMode`` (above autograd) sees each Python-level torch call
  (``torch.log``, ``Tensor.sqrt``, ``F.linear``): it notes the user's source line (the
  innermost stack frame outside torch, gradtrace and the standard library) and the module
  running it, and tags the autograd node of the result with them, so a backward op can
  name the forward call it belongs to;
- a ``TorchDispatchMode`` (below autograd) sees every ATen op of the forward, the backward
  and the optimizer step with its real inputs and outputs, and keeps the first one that made a
  ``nan`` out of nan-free inputs, or an ``inf`` out of finite tensors (a non-finite constant
  the code passes, such as a ``-inf`` attention mask, is taken as meant).

Example:
    >>> m = torch.nn.Linear(2, 2)
    >>> with OpChecker(m) as chk:
    ...     y = torch.log(m(torch.zeros(1, 2)) * 0)
    >>> chk.first.op, chk.first.phase, chk.first.outputs[0]["min"]
    ('torch.log', 'forward', -inf)
"""
from __future__ import annotations

import math
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["OpChecker", "OpOrigin", "tensor_range"]

_TORCH_DIRS = (os.path.dirname(torch.__file__) + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)
# Library model code (transformers, timm) is the user's model code here: never skipped.
_SITE_DIRS = tuple({sysconfig.get_paths()[k] + os.sep for k in ("purelib", "platlib")})
_OWN_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep          # gradtrace itself
_TAG = "gradtrace_forward"


def _floats(obj: Any) -> list[torch.Tensor]:
    return [t for t in tree_leaves(obj) if isinstance(t, torch.Tensor)
            and (t.is_floating_point() or t.is_complex()) and t.numel() > 0]


def tensor_range(t: torch.Tensor) -> dict:
    """``{"dtype", "shape", "min", "max", "nan", "inf"}`` of a tensor (finite part for min/max).

    Example:
        >>> tensor_range(torch.tensor([0.0, float("inf"), 2.0]))["inf"]
        1
    """
    d = t.detach()
    if d.is_complex():
        d = d.abs()
    d = d.float() if d.dtype in (torch.float16, torch.bfloat16) else d
    nan = int(torch.isnan(d).sum())
    inf = int(torch.isinf(d).sum())
    inf_ = float("inf")
    lo = float(d.nan_to_num(nan=inf_, posinf=inf_, neginf=-inf_).min())
    hi = float(d.nan_to_num(nan=-inf_, posinf=inf_, neginf=-inf_).max())
    if nan == d.numel():
        lo = hi = float("nan")
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "min": lo, "max": hi, "nan": nan, "inf": inf}


def _all_finite(ts: list[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def user_frame() -> tuple[str, int, str] | None:
    """``(file, line, qualified function)`` of the innermost frame in the user's code, or
    ``None`` when the op runs in torch's own code called from gradtrace (an ``nn.Linear``
    the replay called: the module names it then).

    Example:
        >>> user_frame()[2]      # doctest: +ELLIPSIS
        '...'
    """
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename.startswith(_OWN_DIR):   # the checker's own
        f = f.f_back
    while f is not None:
        path = f.f_code.co_filename
        if path.startswith(_OWN_DIR):        # reached the replay driver: no user frame
            return None
        if (not path.startswith(_TORCH_DIRS) or (path.startswith(_SITE_DIRS) and not path.startswith(
                _TORCH_DIRS[0]))) and not path.startswith("<frozen"):
            return path, f.f_lineno, getattr(f.f_code, "co_qualname", f.f_code.co_name)
        f = f.f_back
    return None


def _fn_name(func: Any) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    mod = getattr(func, "__module__", None)
    if qual.startswith(("TensorBase.", "Tensor.")):
        return "Tensor." + qual.split(".", 1)[1]
    if qual.startswith("_VariableFunctionsClass."):
        return "torch." + qual.split(".", 1)[1]
    if mod == "torch._C._nn":                # F.linear and friends are these builtins
        return f"torch.nn.functional.{qual}"
    return f"{mod}.{qual}" if mod else qual


@dataclass(frozen=True)
class OpOrigin:
    """The first op whose output was non-finite while its floating inputs were finite.

    ``op`` is the user-level call (``torch.log``; for a backward op, the forward call it
    belongs to when known), ``aten`` the ATen op that produced the value, ``phase`` one of
    ``forward``, ``backward``, ``optimizer``; ``location`` is ``(file, line, function)``
    in the user's code; ``module`` the module running it (``"enc.attn (Attention)"``);
    ``node`` the autograd node for a backward op (``SqrtBackward0``).

    Example:
        >>> OpOrigin("forward", "torch.log", "aten.log.default").phase
        'forward'
    """
    phase: str
    op: str
    aten: str
    location: tuple | None = None
    module: str | None = None
    node: str | None = None
    inputs: list = field(default_factory=list)
    outputs: list = field(default_factory=list)


class _Calls(TorchFunctionMode):
    def __init__(self, checker: "OpChecker"):
        super().__init__()
        self.chk = checker

    def __torch_function__(self, func, types, args=(), kwargs=None):
        chk = self.chk
        outer = chk._call
        chk._call = (_fn_name(func), user_frame(), chk.module)
        try:
            out = func(*args, **(kwargs or {}))
        finally:
            call, chk._call = chk._call, outer
        if outer is None and chk.phase == "forward":
            for t in tree_leaves(out):
                node = getattr(t, "grad_fn", None) if isinstance(t, torch.Tensor) else None
                if node is not None and _TAG not in node.metadata:
                    node.metadata[_TAG] = call
        return out


class _Ops(TorchDispatchMode):
    def __init__(self, checker: "OpChecker"):
        super().__init__()
        self.chk = checker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        chk = self.chk
        kwargs = kwargs or {}
        # once found, or an allocation (uninitialised memory may hold any bit pattern)
        if chk.first is not None or "empty" in func.__name__:
            return func(*args, **kwargs)
        ins = _floats((args, kwargs))
        in_nan, in_inf = _has(ins)
        # A non-finite constant the code chose (a -inf attention mask) is no accident.
        consts = [v for v in tree_leaves((args, kwargs)) if isinstance(v, float) and not math.isfinite(v)]
        if in_nan or any(math.isnan(v) for v in consts) or (in_inf and consts):
            return func(*args, **kwargs)
        # An in-place op overwrites its input: take the ranges before it runs.
        before = [tensor_range(t) for t in ins] if func._schema.is_mutable else None
        out = func(*args, **kwargs)
        outs = _floats(out) or (ins if func._schema.is_mutable else [])
        out_nan, out_inf = _has(outs)
        # nan is never meant; inf counts only out of finite tensors and constants
        if out_nan or (out_inf and ins and not in_inf and not consts):
            chk._found(func, before or [tensor_range(t) for t in ins], [tensor_range(t) for t in outs])
        return out


def _has(ts: list[torch.Tensor]) -> tuple[bool, bool]:
    """(any nan, any inf) over ``ts``; one kernel per tensor on the common all-finite path."""
    if all(bool(torch.isfinite(t).all()) for t in ts):
        return False, False
    return any(bool(torch.isnan(t).any()) for t in ts), any(bool(torch.isinf(t).any()) for t in ts)


class OpChecker:
    """Context manager running both modes; ``first`` is the :class:`OpOrigin` or ``None``.

    ``model`` (optional) names modules; set ``phase`` to ``"backward"`` / ``"optimizer"``
    before those parts run (backward ops are also recognised by their autograd node).

    Example:
        >>> with OpChecker() as chk:
        ...     _ = torch.ones(2).sqrt()
        >>> chk.first is None
        True
    """

    def __init__(self, model: nn.Module | None = None):
        self.model = model
        self.first: OpOrigin | None = None
        self.phase = "forward"
        self._call = None
        self._stack: list[str] = []
        self._handles: list[Any] = []
        self._modes = (_Calls(self), _Ops(self))

    @property
    def module(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def _enter(self, label: str) -> None:
        self._stack.append(label)

    def _leave(self) -> None:        # returns None: a forward hook's value would replace the output
        if self._stack:
            self._stack.pop()

    def __enter__(self) -> "OpChecker":
        if self.model is not None:
            for name, m in self.model.named_modules():
                label = f"{name or '(root)'} ({type(m).__name__})"
                self._handles.append(m.register_forward_pre_hook(lambda *_, l=label: self._enter(l)))
                self._handles.append(m.register_forward_hook(lambda *_: self._leave(), always_call=True))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _found(self, func: Any, ins: list, outs: list) -> None:
        aten = str(func)
        node = torch._C._current_autograd_node()
        if node is not None:                        # running inside the backward pass
            fwd = node.metadata.get(_TAG)
            op, loc, module = fwd if fwd else (None, None, None)
            self.first = OpOrigin("backward", op or aten, aten, loc, module, node.name(), ins, outs)
            return
        if self._call is not None and self.phase != "optimizer":
            op, loc, module = self._call
        else:
            op, loc, module = aten, user_frame(), self.module
        self.first = OpOrigin(self.phase, op, aten, loc, module, None, ins, outs)
