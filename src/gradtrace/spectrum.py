"""Singular values of block input-output Jacobians, per example, before training.

For each block of a model (a transformer layer, a child of a ``Sequential``, a leaf
layer) we look at the Jacobian ``J = d out / d in`` of one example and report:

* its singular values: all of them when the block is narrow enough (the Jacobian is
  built with ``torch.func.vjp`` / ``jvp`` under ``vmap`` and reduced with
  ``torch.linalg.svdvals``), else the top-k and bottom-k from a matrix-free Lanczos
  iteration (a Krylov refinement of power iteration) on ``JᵀJ`` or ``JJᵀ``;
* the *gain* ``trace(JᵀJ) / input width``, the mean squared singular value per input
  direction. Exact when ``J`` was built, else a Hutchinson estimate ``E‖Jv‖² / n`` with
  Gaussian ``v``;
* the *spread*, the relative variance of the eigenvalues of ``JᵀJ`` (Pennington et al.
  2017, "Resurrecting the sigmoid": dynamical isometry means a spread near 0).

The same figures for the whole model (``spec.end_to_end()``) tell whether the signal
survives the full depth. Blocks must treat examples independently (no batch statistics):
the model runs in eval mode while its spectrum is measured.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = ["spectrum", "Spectrum", "BlockSpectrum", "END_TO_END", "default_blocks"]

#: Name under which the whole model's Jacobian is stored.
END_TO_END = "<end-to-end>"

_METHODS = ("auto", "full", "lanczos")

# Modules that start a new block when grouping the children of a Sequential.
_NORM_TYPES: tuple[type, ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                                 nn.LocalResponseNorm)
if hasattr(nn, "RMSNorm"):
    _NORM_TYPES = _NORM_TYPES + (nn.RMSNorm,)


@dataclass
class BlockSpectrum:
    """Jacobian figures of one block (or of the whole model), one row per example.

    ``singular_values`` is ``examples × values``, descending. With ``method == "full"``
    it holds all ``min(in_width, out_width)`` values; with ``"lanczos"`` the top k then
    the bottom k (estimates; the top ones converge fastest).

    Example:
        >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
        >>> b.gain, b.sigma_max
        (1.0, 1.0)
    """

    name: str
    members: list[str]
    in_width: int
    out_width: int
    method: str
    singular_values: np.ndarray
    gain_per_example: np.ndarray
    spread_per_example: np.ndarray

    @property
    def gain(self) -> float:
        """Mean squared singular value per input direction, averaged over examples."""
        return float(np.mean(self.gain_per_example))

    @property
    def spread(self) -> float:
        """Relative variance of the eigenvalues of JᵀJ, averaged over examples."""
        return float(np.mean(self.spread_per_example))

    @property
    def sigma_max(self) -> float:
        return float(np.mean(self.singular_values[:, 0]))

    @property
    def sigma_min(self) -> float:
        return float(np.mean(self.singular_values[:, -1]))

    def row(self) -> dict[str, Any]:
        """One flat row of the table form.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> b.row()["condition"]
            1.0
        """
        smin = self.sigma_min
        return {"block": self.name, "members": list(self.members), "in_width": self.in_width,
                "out_width": self.out_width, "method": self.method, "gain": self.gain,
                "sigma_max": self.sigma_max, "sigma_min": smin,
                "condition": self.sigma_max / smin if smin > 0 else float("inf"),
                "spread": self.spread}


class Spectrum:
    """Result of :func:`spectrum`: per-block and end-to-end Jacobian spectra.

    Example:
        >>> import gradtrace as gt
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> spec = gt.spectrum(net, torch.randn(16, 8))
        >>> spec.blocks
        ['0', '2']
        >>> spec.singular_values("0").shape
        (8, 8)
        >>> round(spec.gain("0"), 3) > 0
        True
    """

    def __init__(self, blocks: dict[str, BlockSpectrum], end_to_end: BlockSpectrum | None,
                 skipped: dict[str, str] | None = None) -> None:
        self._blocks = dict(blocks)
        self._end = end_to_end
        #: blocks that could not be measured, name -> reason
        self.skipped = dict(skipped or {})

    @property
    def blocks(self) -> list[str]:
        """Block names (qualified names of their first module) in execution order."""
        return list(self._blocks)

    def block(self, name: str) -> BlockSpectrum:
        """All figures of one block; ``END_TO_END`` names the whole model.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).block("0").in_width
            4
        """
        if name == END_TO_END and self._end is not None:
            return self._end
        if name not in self._blocks:
            raise KeyError(f"no block named {name!r}; blocks: {', '.join(self._blocks) or '(none)'}")
        return self._blocks[name]

    def singular_values(self, name: str) -> np.ndarray:
        """Singular values of block ``name``'s Jacobian, ``examples × values``, descending.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).singular_values("0").shape
            (2, 4)
        """
        return self.block(name).singular_values

    def gain(self, name: str) -> float:
        """trace(JᵀJ) / input width of block ``name``, averaged over examples.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).gain("0")
            1.0
        """
        return self.block(name).gain

    def spread(self, name: str) -> float:
        """Relative variance of the squared singular values (0 = isometry).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).spread("0")
            0.0
        """
        return self.block(name).spread

    def method(self, name: str) -> str:
        """``"full"`` (all values exact) or ``"lanczos"`` (top-k and bottom-k estimates).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).method("0")
            'full'
        """
        return self.block(name).method

    def members(self, name: str) -> list[str]:
        """Qualified names of the modules a block covers, in order.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).members("0")
            ['0']
        """
        return list(self.block(name).members)

    def end_to_end(self) -> BlockSpectrum:
        """The whole model's input-output Jacobian (``.singular_values``, ``.gain``, ``.spread``).

        Raises ValueError when the model input is not floating point (no Jacobian exists).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({}, b).end_to_end().gain
            1.0
        """
        if self._end is None:
            raise ValueError("no end-to-end spectrum: the model input is not floating point "
                             "or end_to_end=False was passed")
        return self._end

    def table(self) -> list[dict[str, Any]]:
        """One row per block (then the end-to-end row), for terminal and report tables.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> [r["block"] for r in Spectrum({"0": b}, b).table()]
            ['0', '0']
        """
        rows = [b.row() for b in self._blocks.values()]
        if self._end is not None:
            rows.append(self._end.row())
        return rows

    def to_dict(self, values: bool = False, bins: int = 30) -> dict[str, Any]:
        """JSON-ready form: table rows, log10 histograms of singular values per block.

        ``values=True`` also includes the raw singular values (large for wide models).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).to_dict(bins=5)["histogram"]["counts"]["0"]
            [0, 0, 8, 0, 0]
        """
        allb = list(self._blocks.values()) + ([self._end] if self._end is not None else [])
        logs = [np.log10(np.clip(b.singular_values.ravel(), 1e-30, None)) for b in allb]
        finite = np.concatenate([x[np.isfinite(x)] for x in logs]) if logs else np.zeros(0)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        hist = {b.name: np.histogram(x, edges)[0].tolist() for b, x in zip(allb, logs)}
        out: dict[str, Any] = {
            "blocks": self.blocks,
            "rows": [b.row() for b in self._blocks.values()],
            "end_to_end": self._end.row() if self._end is not None else None,
            "histogram": {"log10_edges": edges.tolist(), "counts": hist},
            "skipped": dict(self.skipped),
        }
        if values:
            out["singular_values"] = {b.name: b.singular_values.tolist() for b in allb}
        return out

    def __repr__(self) -> str:
        return f"Spectrum(blocks={len(self._blocks)}, end_to_end={self._end is not None})"


# ----------------------------------------------------------------------------- blocks


def _is_weight_layer(m: nn.Module) -> bool:
    return any(True for _ in m.parameters()) and not isinstance(m, _NORM_TYPES)


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
    most parameters wins, the outermost on ties: transformer layer lists, the body of an
    MLP. Children of a Sequential are grouped so that each block starts at a weight layer
    (``Linear``, ``Conv``…) and takes the activations and norms after it. Without such a
    container, each leaf module with parameters is a block; failing that, the model.

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


def _select_blocks(model: nn.Module, blocks: Any) -> list[list[str]]:
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


# ----------------------------------------------------------------------------- capture


def _first_tensor(x: Any) -> torch.Tensor | None:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)):
        for v in x:
            t = _first_tensor(v)
            if t is not None:
                return t
    if isinstance(x, dict):
        for v in x.values():
            t = _first_tensor(v)
            if t is not None:
                return t
    return None


def _as_args(example_input: Any) -> tuple:
    if isinstance(example_input, torch.Tensor):
        return (example_input,)
    if isinstance(example_input, (tuple, list)) and example_input:
        return tuple(example_input)
    raise TypeError("example_input must be a tensor or a non-empty tuple of positional "
                    f"arguments, got {type(example_input).__name__}")


def _slice_batch(args: tuple, n: int) -> tuple:
    b = _first_tensor(args).shape[0] if _first_tensor(args) is not None and _first_tensor(args).dim() else None
    if b is None:
        return args
    return tuple(a[:n] if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == b else a
                 for a in args)


class _Capture:
    """Forward hooks that record each block's inputs (at its first member) and output
    (at its last member). Handles are removed by ``close``; nothing is stored on modules."""

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


def _block_fn(model: nn.Module, members: list[str], args: tuple, kwargs: dict
              ) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor] | str:
    """A function of the block's first floating tensor argument, and that argument;
    a reason string when the block cannot be differentiated."""
    mods = dict(model.named_modules())
    idx = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if idx is None:
        return "no tensor positional input"
    x = args[idx]
    if not x.is_floating_point():
        return f"input is {x.dtype}, not floating point"
    first, rest = mods[members[0]], [mods[n] for n in members[1:]]

    def f(t: torch.Tensor) -> torch.Tensor:
        a = list(args)
        a[idx] = t
        y = first(*a, **kwargs)
        for m in rest:
            y = m(y)
        y = _first_tensor(y)
        if y is None:
            raise ValueError(f"block {members[0]!r} returned no tensor")
        return y

    return f, x


# ----------------------------------------------------------------------------- linear algebra


def _jvp(f, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        return torch.func.jvp(f, (x,), (v,))[1]
    except (RuntimeError, NotImplementedError):
        # forward AD missing for some op: J v via the double-backward trick
        return torch.autograd.functional.jvp(f, x, v)[1]


def _full_jacobian(f, x: torch.Tensor) -> torch.Tensor:
    """Per-example Jacobians ``(B, n_out, n_in)`` of a batched, example-wise function."""
    B = x.shape[0]
    y = f(x)
    n_in, n_out = x[0].numel(), y[0].numel()
    try:
        if n_out <= n_in:  # reverse mode: one VJP per output coordinate
            _, vjp_fn = torch.func.vjp(f, x)
            basis = torch.eye(n_out, dtype=y.dtype).reshape(n_out, 1, *y.shape[1:])
            basis = basis.expand(n_out, B, *y.shape[1:])
            J = torch.vmap(vjp_fn)(basis)[0].reshape(n_out, B, n_in).transpose(0, 1)
        else:  # forward mode: one JVP per input coordinate
            basis = torch.eye(n_in, dtype=x.dtype).reshape(n_in, 1, *x.shape[1:])
            basis = basis.expand(n_in, B, *x.shape[1:])
            J = torch.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(basis)
            J = J.reshape(n_in, B, n_out).permute(1, 2, 0)
    except (RuntimeError, NotImplementedError):
        # No batching rule (e.g. fused RNN kernels): repeat the batch once per output
        # coordinate and take one ordinary backward pass.
        xr = x.detach().unsqueeze(0).expand(n_out, *x.shape).reshape(n_out * B, *x.shape[1:])
        xr.requires_grad_(True)
        with torch.enable_grad():
            yr = f(xr).reshape(n_out, B, n_out)
            eye = torch.eye(n_out, dtype=yr.dtype).unsqueeze(1).expand(n_out, B, n_out)
            (g,) = torch.autograd.grad(yr, xr, eye)
        J = g.reshape(n_out, B, n_in).transpose(0, 1)
    return J.detach()


class _one_thread:
    """Run on ``n`` intra-op threads (default one), restoring the setting after.

    The spectrum is many small ops (Lanczos steps, batched decompositions). On shared
    cores OpenMP's thread teams stall on every one of them: measured on 2 busy cores,
    4×512×512 ``svdvals`` 0.2 s on one thread vs 1.1–5.6 s on two, and a 50-block
    spectrum 1.7 s on one thread vs 1.8–39 s on two. ``n=None`` leaves torch's setting.
    """

    def __init__(self, n: int | None = 1) -> None:
        self.want = n

    def __enter__(self) -> None:
        self.n = torch.get_num_threads()
        if self.want is not None:
            torch.set_num_threads(self.want)

    def __exit__(self, *exc: Any) -> None:
        torch.set_num_threads(self.n)


def _singular_values(J: torch.Tensor) -> torch.Tensor:
    """Batched singular values, descending.

    A float32 (or narrower) Jacobian goes through the float64 Gram matrix of its
    smaller side and ``eigvalsh``: about 1.6× faster than ``svdvals`` here and, since
    the Gram matrix is formed in float64, as accurate for every σ above ~1e-7·σ_max.
    float64 Jacobians use ``svdvals`` directly.
    """
    if J.dtype == torch.float64:
        with _one_thread():
            return torch.linalg.svdvals(J)
    Jd = J.double()
    G = Jd @ Jd.mT if J.shape[1] <= J.shape[2] else Jd.mT @ Jd
    with _one_thread():
        return torch.linalg.eigvalsh(G).flip(-1).clamp_min(0).sqrt()


def _moments(s2_sum: torch.Tensor, s4_sum: torch.Tensor, n_in: int, n_out: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gain (Σσ² / n_in) and spread from Σσ² and Σσ⁴.

    The spread is taken over the r = min(n_in, n_out) singular values a rectangular J
    has, so that a wide-to-narrow layer is not called anisotropic only for its rank.
    """
    r = min(n_in, n_out)
    m1 = s2_sum / r
    spread = (s4_sum / r) / m1.clamp_min(1e-300) ** 2 - 1.0
    return s2_sum / n_in, torch.where(m1 > 0, spread, torch.zeros_like(spread))


def _lanczos_extremes(op, B: int, n: int, k: int, iters: int, gen: torch.Generator,
                      dtype: torch.dtype) -> torch.Tensor:
    """Eigenvalues of a batch of PSD operators (B independent n×n) by Lanczos with full
    reorthogonalisation; returns the top-k then bottom-k Ritz values, descending."""
    m = min(n, iters)
    V = torch.zeros(m + 1, B, n, dtype=dtype)
    v = torch.randn(B, n, generator=gen, dtype=dtype)
    V[0] = v / v.norm(dim=1, keepdim=True)
    alpha = torch.zeros(m, B, dtype=dtype)
    beta = torch.zeros(m, B, dtype=dtype)
    steps = m
    for j in range(m):
        w = op(V[j])
        alpha[j] = (w * V[j]).sum(1)
        # full reorthogonalisation (twice is enough) against all previous vectors
        for _ in range(2):
            coef = torch.einsum("jbn,bn->jb", V[: j + 1], w)
            w = w - torch.einsum("jb,jbn->bn", coef, V[: j + 1])
        beta[j] = w.norm(dim=1)
        if j + 1 < m:
            if bool((beta[j] <= 1e-10 * alpha[: j + 1].abs().amax(0).clamp_min(1e-30)).all()):
                steps = j + 1
                break
            V[j + 1] = w / beta[j].clamp_min(1e-30).unsqueeze(1)
    T = torch.diag_embed(alpha[:steps].T) + torch.diag_embed(beta[: steps - 1].T, 1) \
        + torch.diag_embed(beta[: steps - 1].T, -1)
    with _one_thread():
        theta = torch.linalg.eigvalsh(T.double()).flip(-1).clamp_min(0)  # descending
    if theta.shape[1] > 2 * k:
        theta = torch.cat([theta[:, :k], theta[:, -k:]], 1)
    return theta


def _measure(name: str, members: list[str], f, x: torch.Tensor, *, method: str, full_max: int,
             k: int, iters: int, n_probes: int, gen: torch.Generator) -> BlockSpectrum:
    B = x.shape[0]
    work = x.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    y = f(work)
    n_in, n_out = work[0].numel(), y[0].numel()
    use_full = method == "full" or (method == "auto" and min(n_in, n_out) <= full_max)
    if use_full:
        J = _full_jacobian(f, work)
        s = _singular_values(J)
        s2 = s.double() ** 2
        gain, spread = _moments(s2.sum(1), (s2**2).sum(1), n_in, n_out)
        return BlockSpectrum(name, members, n_in, n_out, "full", s.float().numpy(),
                             gain.numpy(), spread.numpy())
    # Matrix-free. Hutchinson: repeat the batch once per probe so one JVP/VJP covers all.
    P = n_probes
    xr = work.unsqueeze(0).expand(P, *work.shape).reshape(P * B, *work.shape[1:])
    v = torch.randn(xr.shape, generator=gen, dtype=work.dtype)
    Jv = _jvp(f, xr, v)
    _, vjp_r = torch.func.vjp(f, xr)
    JtJv = vjp_r(Jv)[0]
    s2_sum = (Jv.reshape(P, B, -1).double() ** 2).sum(2).mean(0)
    s4_sum = (JtJv.reshape(P, B, -1).double() ** 2).sum(2).mean(0)
    gain, spread = _moments(s2_sum, s4_sum, n_in, n_out)
    # Lanczos on the smaller Gram matrix (its nonzero eigenvalues are the σ²).
    _, vjp_fn = torch.func.vjp(f, work)
    if n_in <= n_out:
        def op(u):  # JᵀJ u
            return vjp_fn(_jvp(f, work, u.reshape(work.shape)))[0].reshape(B, -1)
        n = n_in
    else:
        def op(u):  # J Jᵀ u
            return _jvp(f, work, vjp_fn(u.reshape(y.shape))[0]).reshape(B, -1)
        n = n_out
    theta = _lanczos_extremes(lambda u: op(u.to(work.dtype)).to(torch.float64), B, n, k, iters,
                              gen, torch.float64)
    s = theta.sqrt()
    return BlockSpectrum(name, members, n_in, n_out, "lanczos", s.float().numpy(),
                         gain.numpy(), spread.numpy())


# ----------------------------------------------------------------------------- public entry


class _Frozen:
    """Context: eval mode and requires_grad=False on parameters, both restored after."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __enter__(self) -> None:
        self.modes = [(m, m.training) for m in self.model.modules()]
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.model.eval()
        for p, _ in self.flags:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for m, t in self.modes:
            m.training = t
        for p, r in self.flags:
            p.requires_grad_(r)


def spectrum(model: nn.Module, example_input: Any, blocks: Any = None, k: int | None = None,
             n_samples: int = 8, *, method: str = "auto", full_max: int = 512, iters: int | None = None,
             n_probes: int = 16, end_to_end: bool = True, seed: int = 0,
             num_threads: int | None = 1) -> Spectrum:
    """Jacobian singular values of each block and of the whole model, per example.

    Args:
        model: any ``nn.Module`` whose blocks treat examples independently (it runs in
            eval mode; mode, ``requires_grad`` flags and gradients are left unchanged).
        example_input: a batch tensor (examples along dim 0) or a tuple of positional args.
        blocks: ``None`` for :func:`default_blocks`, or module names / globs
            (``"layers.*"``), each matched module becoming one block.
        k: how many top and bottom singular values the matrix-free method keeps
            (default 8). Full spectra keep all values.
        n_samples: number of examples (first rows of the batch) measured.
        method: ``"auto"`` (full when ``min(in, out width) <= full_max``), ``"full"`` or
            ``"lanczos"`` (matrix-free, with ``torch.func.jvp``/``vjp``).
        full_max: width limit for the full spectrum under ``"auto"``.
        iters: Lanczos steps (default ``max(4k, 40)``).
        n_probes: Gaussian probes for the Hutchinson gain and spread when matrix-free.
        end_to_end: also measure the whole model (needs a floating-point input).
        seed: seeds the probes and Lanczos start vectors (global RNG untouched).
        num_threads: intra-op threads while measuring (restored after); one is the
            fastest and the steadiest on shared CPU cores. ``None`` keeps torch's setting.

    Example:
        >>> net = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
        >>> spec = spectrum(net, torch.randn(4, 16), n_samples=4)
        >>> spec.blocks, spec.singular_values("2").shape
        (['0', '2'], (4, 16))
        >>> spec.end_to_end().gain > 0
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if method not in _METHODS:
        raise ValueError(f"method={method!r}; valid: {', '.join(_METHODS)}")
    for arg, val in (("n_samples", n_samples), ("n_probes", n_probes), ("full_max", full_max)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"{arg} must be a positive int, got {val!r}")
    if k is not None and (not isinstance(k, int) or k < 1):
        raise ValueError(f"k must be None or a positive int, got {k!r}")
    k = k or 8
    iters = iters or max(4 * k, 40)
    args = _slice_batch(_as_args(example_input), n_samples)
    groups = _select_blocks(model, blocks)
    members = {g[0]: g for g in groups}
    gen = torch.Generator().manual_seed(seed)
    opts = dict(method=method, full_max=full_max, k=k, iters=iters, n_probes=n_probes, gen=gen)

    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be None or a positive int, got {num_threads!r}")
    with _Frozen(model), _one_thread(num_threads):
        cap = _Capture(model, groups)
        try:
            with torch.no_grad():
                model(*args)
        finally:
            cap.close()
        measured: dict[str, BlockSpectrum] = {}
        skipped: dict[str, str] = {}
        for key in cap.order:
            fa = _block_fn(model, members[key], *cap.inputs[key])
            if isinstance(fa, str):
                skipped[key] = fa
                continue
            measured[key] = _measure(key, members[key], fa[0], fa[1], **opts)
        for g in groups:
            if g[0] not in cap.inputs:
                skipped[g[0]] = "not called in the forward pass"
        end = None
        if end_to_end:
            fa = _block_fn_root(model, args)
            if fa is not None:
                end = _measure(END_TO_END, [""], fa[0], fa[1], **opts)
    return Spectrum(measured, end, skipped)


def _block_fn_root(model: nn.Module, args: tuple):
    idx = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    if idx is None or not args[idx].is_floating_point():
        return None

    def f(t: torch.Tensor) -> torch.Tensor:
        a = list(args)
        a[idx] = t
        return _first_tensor(model(*a))

    return f, args[idx]
