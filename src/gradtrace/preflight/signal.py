"""The signal pass: one seeded forward and one backward with a Gaussian cotangent, per-block figures.

A VJP with a Gaussian vector (not ``y.sum()``, which would bias the ratios) goes back
from the output. From that one pass we read, per block: the RMS of its input and output,
the gradient norm at both ends (the gain through the residual stream), the norm of the
gradient of its parameters (what an optimizer sees), and for transformer blocks the same
at the ends of each branch (attention, MLP), the entropy of the attention rows, and the
fraction of sigmoid/tanh outputs in their flat ends (the recorder's ``SATURATION_BOUNDS``).
Training mode is kept (dropout, batch statistics); buffers and the RNG are restored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..record.selection import SATURATION_BOUNDS
from .blocks import NORM_TYPES, Capture, first_tensor, input_slot, model_kwargs
from .transformer import AttentionEntropy, find_branches


def rms(t: torch.Tensor | None) -> float:
    """Root mean square of a floating tensor (NaN for None or integer tensors)."""
    if t is None or not t.is_floating_point():
        return float("nan")
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) / math.sqrt(max(t.numel(), 1))


def _named_norms(m: nn.Module) -> tuple[type, ...]:
    # RMSNorm/LayerNorm classes of other libraries (LlamaRMSNorm, T5LayerNorm): by name
    name = type(m).__name__.lower()
    return (type(m),) if name.endswith("norm") and "batch" not in name else ()


def _norm(g: torch.Tensor | None) -> float:
    return float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64)) if g is not None else 0.0


@dataclass
class SignalPass:
    """What one forward/backward pass measured (see the module docstring)."""

    keys: list[str]
    fwd: dict[str, tuple[float, float]]
    gnorm: dict[tuple[str, str], float]
    param_grad: dict[str, float]
    branches: dict[str, dict[str, dict[str, float]]]
    attention: dict[str, dict[str, float]]
    rnn_inputs: dict[str, tuple]
    finite: bool
    #: blocks whose output is the output of a norm layer inside them (post-LN layout)
    ends_in_norm: dict[str, bool]
    #: per block with a sigmoid/tanh: fraction of their outputs beyond SATURATION_BOUNDS
    saturated: dict[str, float]


def _branch_gains(io: dict[tuple[str, str, str], torch.Tensor]) -> dict[tuple[str, str], float]:
    """Hutchinson gain trace(JᵀJ)/n_in of each branch from its output back to its input.

    Differentiating the branch output (not the loss) follows only the path inside the
    branch, even where its input also feeds the residual stream. One Gaussian probe over
    the whole batch: the estimate averages thousands of coordinates.
    """
    out: dict[tuple[str, str], float] = {}
    gen = torch.Generator().manual_seed(0)
    for (k, branch, kind), y in io.items():
        x = io.get((k, branch, "in"))
        if kind != "out" or x is None or not (x.requires_grad and y.requires_grad):
            continue
        u = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.dtype)
        (g,) = torch.autograd.grad(y, x, u, retain_graph=True, allow_unused=True)
        out[(k, branch)] = _norm(g) ** 2 / max(x.numel(), 1) if g is not None else 0.0
    return out


def _block_input(captured: tuple[tuple, dict]) -> torch.Tensor | None:
    slot = input_slot(*captured)
    if slot is None:
        return None
    return captured[0][slot] if isinstance(slot, int) else captured[1][slot]


def signal_pass(model: nn.Module, args: tuple, groups: list[list[str]], loss_fn, seed: int) -> SignalPass:
    """Run the pass; a model that refuses ``args`` raises ValueError in one line."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    mods = dict(model.named_modules())
    cap = Capture(model, groups)
    rnn_inputs: dict[str, tuple] = {}
    branch_io: dict[tuple[str, str, str], torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            def rpre(mod, a, kw, name=name):
                rnn_inputs.setdefault(name, (a, kw))
            handles.append(m.register_forward_pre_hook(rpre, with_kwargs=True))
    sat: dict[str, list[float]] = {}
    for g in groups:
        for m in {id(m): m for n in g for m in mods[n].modules()}.values():
            kind = "tanh" if isinstance(m, nn.Tanh) else "sigmoid" if isinstance(m, nn.Sigmoid) else None
            if kind is None:
                continue

            def spost(mod, a, out, key=g[0], lo=SATURATION_BOUNDS[kind][0], hi=SATURATION_BOUNDS[kind][1]):
                if isinstance(out, torch.Tensor) and out.is_floating_point() and out.numel():
                    o = out.detach()
                    c = sat.setdefault(key, [0.0, 0.0])
                    c[0] += float(((o < lo) | (o > hi)).sum())
                    c[1] += o.numel()
            handles.append(m.register_forward_hook(spost))
    single = {g[0]: mods[g[0]] for g in groups if len(g) == 1}
    norm_out: dict[str, list[torch.Tensor]] = {}
    for key, block in single.items():
        sub = dict(block.named_modules())
        for n, m in sub.items():
            if n and isinstance(m, NORM_TYPES + _named_norms(m)):
                def npost(mod, a, out, key=key):
                    if isinstance(out, torch.Tensor):
                        norm_out.setdefault(key, []).append(out)
                handles.append(m.register_forward_hook(npost))
        for branch, (first, last) in find_branches(block).items():
            def bpre(mod, a, kw, key=key, branch=branch):
                t = _block_input((a, kw))
                if t is not None:
                    branch_io.setdefault((key, branch, "in"), t)

            def bpost(mod, a, out, key=key, branch=branch):
                t = first_tensor(out)
                if t is not None:
                    branch_io.setdefault((key, branch, "out"), t)
            handles.append(sub[first].register_forward_pre_hook(bpre, with_kwargs=True))
            handles.append(sub[last].register_forward_hook(bpost))
    idx = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    args = list(args)
    if idx is not None and args[idx].is_floating_point():
        args[idx] = args[idx].detach().clone().requires_grad_(True)
    probe = AttentionEntropy(single)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.enable_grad():
                try:
                    with probe:
                        out = model(*args, **model_kwargs(model))
                except Exception as e:  # a wrong shape is an input error, said in one line
                    t = first_tensor(args)
                    shape = tuple(t.shape) if t is not None else ()
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ValueError(f"model failed on example_input of shape {shape}: {msg}") from None
                y = first_tensor(out)
                if y is None or not y.is_floating_point():
                    raise ValueError("the model output has no floating-point tensor to differentiate")
                if loss_fn is not None:
                    root, cot = loss_fn(out), None
                else:
                    root, cot = y, torch.randn(y.shape, dtype=y.dtype)
                keys = [k for k in cap.order if k in cap.outputs]
                targets: list[torch.Tensor] = []
                kinds: list[tuple] = []
                for k in keys:
                    for kind, t in (("in", _block_input(cap.inputs[k])), ("out", first_tensor(cap.outputs[k]))):
                        if t is not None and t.requires_grad:
                            targets.append(t)
                            kinds.append(("block", k, kind))
                branch_gain = _branch_gains(branch_io)
                members = {g[0]: g for g in groups}
                for k in keys:
                    seen: set[int] = set()
                    for n in members[k]:
                        for p in mods[n].parameters():
                            if p.requires_grad and id(p) not in seen:
                                seen.add(id(p))
                                targets.append(p)
                                kinds.append(("param", k))
                grads = torch.autograd.grad(root, targets, cot, allow_unused=True,
                                            retain_graph=False) if targets else []
        fwd = {k: (rms(_block_input(cap.inputs[k])), rms(first_tensor(cap.outputs[k]))) for k in keys}
        gnorm: dict[tuple[str, str], float] = {}
        psq: dict[str, float] = {}
        for kind, g in zip(kinds, grads):
            if kind[0] == "block":
                gnorm[(kind[1], kind[2])] = _norm(g)
            else:
                psq[kind[1]] = psq.get(kind[1], 0.0) + _norm(g) ** 2
        branches: dict[str, dict[str, dict[str, float]]] = {}
        for (k, branch, kind), t in branch_io.items():
            if kind != "out" or k not in fwd:
                continue
            branches.setdefault(k, {})[branch] = {
                "forward_ratio": rms(t) / fwd[k][0] if fwd[k][0] > 0 else float("nan"),
                "gain": branch_gain.get((k, branch), float("nan"))}
        finite = bool(torch.isfinite(y.detach()).all())
        ends = {}
        for k in keys:
            if k in single:
                o = first_tensor(cap.outputs[k])
                ends[k] = o is not None and any(t is o or (t.shape == o.shape and t.data_ptr() == o.data_ptr())
                                                for t in norm_out.get(k, []))
        return SignalPass(keys, fwd, gnorm, {k: math.sqrt(v) for k, v in psq.items()}, branches,
                          probe.summary(), rnn_inputs, finite, ends,
                          {k: c[0] / c[1] for k, c in sat.items() if k in fwd})
    finally:
        cap.close()
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])
