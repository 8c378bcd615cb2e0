"""Blocks of a model from its structure, and replaying one block with the arguments it really got.

A block is a list of module names run one after another (a transformer layer, a child
of a ``Sequential``). Forward pre-hooks with ``with_kwargs=True`` capture each block's
real positional and keyword arguments (attention masks, rotary position embeddings...),
so a replay calls the block exactly as the model did. Key/value caches are the one
exception: a replay must not append to a cache, so cache objects become ``None`` and
``use_cache`` becomes ``False`` (and the model itself is called with ``use_cache=False``
when its ``forward`` takes that argument).
"""
from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable

import torch
from torch import nn

__all__ = ["default_blocks"]

# Modules that start a new block when grouping the children of a Sequential.
NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                 nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    NORM_TYPES = NORM_TYPES + (nn.RMSNorm,)


def _is_weight_layer(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) and not isinstance(m, NORM_TYPES)


def _group_sequential(prefix: str, seq: nn.Module) -> list[list[str]]:
    """Children of a Sequential as blocks: each weight layer starts a block; norms,
    activations and other parameter-free children join the block before them."""
    names = [f"{prefix}.{n}" if prefix else n for n, _ in seq.named_children()]
    mods = list(seq.children())
    if not any(_is_weight_layer(m) for m in mods):
        return [[n] for n in names]
    groups: list[list[str]] = []
    pending: list[str] = []  # parameter-free children before the first weight layer
    for n, m in zip(names, mods):
        if _is_weight_layer(m):
            groups.append(pending + [n])
            pending = []
        elif groups:
            groups[-1].append(n)
        else:
            pending.append(n)
    return groups


def default_blocks(model: nn.Module) -> list[list[str]]:
    """The model's natural blocks, each a list of module names run one after another.

    The ``ModuleList`` or ``Sequential`` (with at least two children) that covers the
    most parameters wins, the outermost on ties: transformer layer lists (``h.*``,
    ``layers.*``, ``encoder.layer.*``), the body of an MLP. Children of a Sequential are
    grouped so that each block starts at a weight layer (``Linear``, ``Conv``…) and takes
    the activations and norms after it. Without such a container, each leaf module with
    parameters is a block; failing that, the model.

    Example:
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> default_blocks(net)
        [['0', '1'], ['2']]
    """
    best: tuple[int, int, str, nn.Module] | None = None
    for name, m in model.named_modules():
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2:
            covered = sum(p.numel() for p in m.parameters())
            depth = name.count(".") + (1 if name else 0)
            key = (covered, -depth)
            if best is None or key > best[:2]:
                best = (covered, -depth, name, m)
    if best is not None and best[0] > 0:
        _, _, name, m = best
        if isinstance(m, nn.Sequential):
            return _group_sequential(name, m)
        return [[f"{name}.{n}" if name else n] for n, _ in m.named_children()]
    leaves = [[n] for n, m in model.named_modules()
              if n and not any(True for _ in m.children()) and any(True for _ in m.parameters())]
    return leaves or [[""]]


def select_blocks(model: nn.Module, blocks: Any) -> list[list[str]]:
    """``blocks=None`` → :func:`default_blocks`; else names/globs, one block per match."""
    if blocks is None:
        return default_blocks(model)
    if isinstance(blocks, str):
        blocks = [blocks]
    if not isinstance(blocks, (list, tuple)):
        raise TypeError(f"blocks must be None, a name/glob or a list of them, got {type(blocks).__name__}")
    names = [n for n, _ in model.named_modules()]
    out: list[list[str]] = []
    for pat in blocks:
        if not isinstance(pat, str):
            raise TypeError(f"blocks entries must be strings, got {type(pat).__name__}")
        hits = [n for n in names if n == pat or (n and fnmatch.fnmatchcase(n, pat))]
        if not hits:
            raise ValueError(f"blocks={pat!r} matches no module; module names include: "
                             f"{', '.join(n for n in names[1:13] if n)}")
        out.extend([h] for h in hits if [h] not in out)
    return out


# ----------------------------------------------------------------------------- arguments


def first_tensor(x: Any) -> torch.Tensor | None:
    """The first tensor in ``x`` (a tensor, tuple, list, dict or model-output mapping)."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = first_tensor(v)
            if t is not None:
                return t
    return None


def as_args(example_input: Any) -> tuple:
    """``example_input`` as a tuple of positional arguments."""
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input:
        return tuple(example_input)
    raise TypeError("example_input must be a tensor or a non-empty tuple of positional "
                    f"arguments, got {type(example_input).__name__}")


def slice_batch(args: tuple, n: int) -> tuple:
    """The first ``n`` examples of every argument that shares the batch dimension."""
    t = first_tensor(args)
    if t is None or not t.dim():
        return args
    b = t.shape[0]
    return tuple(a[:n] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == b else a
                 for a in args)


def model_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra keyword arguments for calling the model: no key/value cache when it has one."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in params else {}


def _no_cache(x: Any) -> Any:
    # A cache object updated by the capture forward would be appended to by every replay
    # (the "Sizes of tensors must match" crash of Hugging Face blocks): replay without it.
    if type(x).__name__.endswith("Cache") and not isinstance(x, torch.Tensor):
        return None
    return x


def replay_args(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Captured block arguments made safe to call again: caches dropped, ``use_cache`` off."""
    a = tuple(_no_cache(v) for v in args)
    kw = {k: _no_cache(v) for k, v in kwargs.items()}
    if "use_cache" in kw:
        kw["use_cache"] = False
    for k in ("past_key_value", "past_key_values", "layer_past"):
        if k in kw:
            kw[k] = None
    return a, kw


def rebatch(x: Any, batch: int, k: int) -> Any:
    """Tile every tensor whose first dimension is ``batch`` ``k`` times along it.

    Matrix-free estimates stack ``k`` copies of the batch into one call; the block's other
    arguments (masks, position embeddings) must follow the same layout.
    """
    if k == 1:
        return x
    if isinstance(x, torch.Tensor):
        if x.dim() and x.shape[0] == batch:
            return x.repeat(k, *([1] * (x.dim() - 1)))
        return x
    if isinstance(x, tuple):
        return tuple(rebatch(v, batch, k) for v in x)
    if isinstance(x, list):
        return [rebatch(v, batch, k) for v in x]
    if isinstance(x, dict) and type(x) is dict:
        return {key: rebatch(v, batch, k) for key, v in x.items()}
    return x


class Capture:
    """Forward hooks that record each block's inputs (at its first member, args and
    kwargs) and output (at its last member). ``close`` removes them; nothing is stored
    on modules."""

    def __init__(self, model: nn.Module, groups: list[list[str]]) -> None:
        mods = dict(model.named_modules())
        self.inputs: dict[str, tuple[tuple, dict]] = {}
        self.outputs: dict[str, Any] = {}
        self.order: list[str] = []
        self.handles: list[Any] = []
        for g in groups:
            key = g[0]

            def pre(mod, args, kwargs, key=key):
                if key not in self.inputs:
                    self.inputs[key] = (args, kwargs)
                    self.order.append(key)

            def post(mod, args, out, key=key):
                if key not in self.outputs:
                    self.outputs[key] = out

            self.handles.append(mods[g[0]].register_forward_pre_hook(pre, with_kwargs=True))
            self.handles.append(mods[g[-1]].register_forward_hook(post))

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def input_slot(args: tuple, kwargs: dict) -> int | str | None:
    """Where the block's input is: the first tensor positional argument, else the first
    floating tensor keyword argument (``hidden_states=...``); None when there is none."""
    idx = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if idx is not None:
        return idx
    return next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)


def _put(args: tuple, kwargs: dict, slot: int | str, t: torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(slot, int):
        a = list(args)
        a[slot] = t
        return tuple(a), kwargs
    return args, {**kwargs, slot: t}


def block_fn(model: nn.Module, members: list[str], args: tuple, kwargs: dict
             ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | str:
    """A function of the block's input (first tensor argument), and that input;
    a reason string when the block cannot be differentiated."""
    mods = dict(model.named_modules())
    args, kwargs = replay_args(args, kwargs)
    slot = input_slot(args, kwargs)
    if slot is None:
        return "no tensor input"
    x = args[slot] if isinstance(slot, int) else kwargs[slot]
    if not x.is_floating_point():
        return f"input is {x.dtype}, not floating point"
    first, rest = mods[members[0]], [mods[n] for n in members[1:]]
    B = x.shape[0] if x.dim() else 1

    def f(t: torch.Tensor) -> torch.Tensor:
        k = t.shape[0] // B if x.dim() and t.shape[0] != B else 1
        a, kw = _put(rebatch(args, B, k), rebatch(kwargs, B, k), slot, t)
        y = first(*a, **kw)
        for m in rest:
            y = m(y)
        y = first_tensor(y)
        if y is None:
            raise ValueError(f"block {members[0]!r} returned no tensor")
        return y

    return f, x


def root_fn(model: nn.Module, args: tuple, first_block: nn.Module | None, block_input: tuple | None):
    """The whole model as a function of its floating input, or, for token ids, of the
    first block's input (the embedding output: the first differentiable point).
    Returns ``(f, x, start)`` with start ``"input"`` or ``"first block"``, or None."""
    extra = model_kwargs(model)
    idx = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if idx is None:
        return None
    x0 = args[idx]
    B = x0.shape[0] if x0.dim() else 1
    if x0.is_floating_point():
        def f(t: torch.Tensor) -> torch.Tensor:
            k = t.shape[0] // B if t.shape[0] != B else 1
            a = list(rebatch(args, B, k))
            a[idx] = t
            return first_tensor(model(*a, **extra))
        return f, x0, "input"
    if first_block is None or block_input is None:
        return None
    slot = input_slot(*block_input)
    if slot is None:
        return None
    xb = block_input[0][slot] if isinstance(slot, int) else block_input[1][slot]
    if not xb.is_floating_point():
        return None

    def g(t: torch.Tensor) -> torch.Tensor:
        k = t.shape[0] // B if t.shape[0] != B else 1

        def swap(mod, a, kw):  # the first block sees t in place of the embedding output
            return _put(a, kw, slot, t)

        h = first_block.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            return first_tensor(model(*rebatch(args, B, k), **extra))
        finally:
            h.remove()

    return g, xb, "first block"
