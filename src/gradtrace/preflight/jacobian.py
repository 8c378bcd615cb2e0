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
survives the full depth; for token-id inputs they start at the first block's input (the
embedding output, the first differentiable point). Blocks must treat examples
independently (no batch statistics): the model runs in eval mode while its spectrum is
measured. A block that cannot be measured lands in ``Spectrum.skipped`` with the reason.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import ad
from .blocks import (Capture, as_args, block_fn, input_slot, model_kwargs, root_fn, select_blocks,
                     slice_batch)
from .spectra import END_TO_END, BlockSpectrum, Spectrum

__all__ = ["spectrum"]

_METHODS = ("auto", "full", "lanczos")


def _full_jacobian(f, x: torch.Tensor, used: set[str]) -> torch.Tensor:
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
            used.add("reverse-mode")
        else:  # forward mode: one JVP per input coordinate
            basis = torch.eye(n_in, dtype=x.dtype).reshape(n_in, 1, *x.shape[1:])
            basis = basis.expand(n_in, B, *x.shape[1:])
            J = torch.vmap(lambda t: torch.func.jvp(f, (x,), (t,))[1])(basis)
            J = J.reshape(n_in, B, n_out).permute(1, 2, 0)
            used.add("forward-mode")
    except Exception:  # noqa: BLE001 - no batching or forward rule for some kernel
        # Repeat the batch once per output coordinate and take one ordinary backward
        # pass (reverse mode only, so it works wherever training itself works).
        xr = x.detach().unsqueeze(0).expand(n_out, *x.shape).reshape(n_out * B, *x.shape[1:])
        xr.requires_grad_(True)
        with torch.enable_grad():
            yr = f(xr).reshape(n_out, B, n_out)
            eye = torch.eye(n_out, dtype=yr.dtype).unsqueeze(1).expand(n_out, B, n_out)
            (g,) = torch.autograd.grad(yr, xr, eye)
        J = g.reshape(n_out, B, n_in).transpose(0, 1)
        used.add("reverse-mode")
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


def _floating_input(captured: tuple[tuple, dict]) -> bool:
    slot = input_slot(*captured)
    if slot is None:
        return False
    x = captured[0][slot] if isinstance(slot, int) else captured[1][slot]
    return x.is_floating_point()


def _measure(name: str, members: list[str], f, x: torch.Tensor, *, method: str, full_max: int,
             k: int, iters: int, n_probes: int, gen: torch.Generator) -> BlockSpectrum:
    B = x.shape[0]
    work = x.detach()
    if work.dtype in (torch.float16, torch.bfloat16):
        work = work.float()
    y = f(work)
    n_in, n_out = work[0].numel(), y[0].numel()
    used: set[str] = set()
    use_full = method == "full" or (method == "auto" and min(n_in, n_out) <= full_max)
    if use_full:
        J = _full_jacobian(f, work, used)
        s = _singular_values(J)
        s2 = s.double() ** 2
        gain, spread = _moments(s2.sum(1), (s2**2).sum(1), n_in, n_out)
        return BlockSpectrum(name, members, n_in, n_out, "full", s.float().numpy(),
                             gain.numpy(), spread.numpy(), ad.describe(used))
    # Matrix-free. Hutchinson: repeat the batch once per probe so one JVP/VJP covers all.
    P = n_probes
    xr = work.unsqueeze(0).expand(P, *work.shape).reshape(P * B, *work.shape[1:])
    v = torch.randn(xr.shape, generator=gen, dtype=work.dtype)
    Jv = ad.jvp(f, xr, v, used)
    _, vjp_r = ad.vjp_fn(f, xr)
    JtJv = vjp_r(Jv)
    s2_sum = (Jv.reshape(P, B, -1).double() ** 2).sum(2).mean(0)
    s4_sum = (JtJv.reshape(P, B, -1).double() ** 2).sum(2).mean(0)
    gain, spread = _moments(s2_sum, s4_sum, n_in, n_out)
    # Lanczos on the smaller Gram matrix (its nonzero eigenvalues are the σ²).
    _, vjp_fn = ad.vjp_fn(f, work)
    if n_in <= n_out:
        def op(u):  # JᵀJ u
            return vjp_fn(ad.jvp(f, work, u.reshape(work.shape), used)).reshape(B, -1)
        n = n_in
    else:
        def op(u):  # J Jᵀ u
            return ad.jvp(f, work, vjp_fn(u.reshape(y.shape)), used).reshape(B, -1)
        n = n_out
    theta = _lanczos_extremes(lambda u: op(u.to(work.dtype)).to(torch.float64), B, n, k, iters,
                              gen, torch.float64)
    s = theta.sqrt()
    return BlockSpectrum(name, members, n_in, n_out, "lanczos", s.float().numpy(),
                         gain.numpy(), spread.numpy(), ad.describe(used))


# ----------------------------------------------------------------------------- public entry


class Frozen:
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

    Blocks are replayed with the positional and keyword arguments they received in a
    real forward pass (no key/value cache). Fused kernels without forward-mode AD are
    handled by the math attention backend, the transformer fast path off, and the
    fallbacks of :mod:`gradtrace.preflight.ad`; each block's ``estimate`` says which ran.
    A block that still fails is listed in ``.skipped`` with the reason.

    Args:
        model: any ``nn.Module`` whose blocks treat examples independently (it runs in
            eval mode; mode, ``requires_grad`` flags and gradients are left unchanged).
        example_input: a batch tensor (examples along dim 0) or a tuple of positional args;
            token ids are fine (the end-to-end figures then start at the first block).
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
        end_to_end: also measure the whole model.
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
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be None or a positive int, got {num_threads!r}")
    k = k or 8
    iters = iters or max(4 * k, 40)
    args = slice_batch(as_args(example_input), n_samples)
    groups = select_blocks(model, blocks)
    members = {g[0]: g for g in groups}
    mods = dict(model.named_modules())
    gen = torch.Generator().manual_seed(seed)
    opts = dict(method=method, full_max=full_max, k=k, iters=iters, n_probes=n_probes, gen=gen)

    with Frozen(model), _one_thread(num_threads), ad.differentiable():
        cap = Capture(model, groups)
        try:
            with torch.no_grad():
                model(*args, **model_kwargs(model))
        finally:
            cap.close()
        measured: dict[str, BlockSpectrum] = {}
        skipped: dict[str, str] = {}
        for key in cap.order:
            fa = block_fn(model, members[key], *cap.inputs[key])
            if isinstance(fa, str):
                skipped[key] = fa
                continue
            try:
                measured[key] = _measure(key, members[key], fa[0], fa[1], **opts)
            except Exception as e:  # noqa: BLE001 - a block we cannot measure is a row, not a crash
                skipped[key] = ad.reason(e)
        for g in groups:
            if g[0] not in cap.inputs:
                skipped[g[0]] = "not called in the forward pass"
        end = None
        if end_to_end:
            # token ids in: start at the first block whose input is floating point (the
            # embedding's output), since nothing before it can be differentiated
            first = next((k for k in cap.order if _floating_input(cap.inputs[k])), None)
            fa = root_fn(model, args, mods[first] if first is not None else None,
                         cap.inputs.get(first) if first is not None else None)
            if fa is not None:
                start = [""] if fa[2] == "input" else [first]
                try:
                    end = _measure(END_TO_END, start, fa[0], fa[1], **opts)
                except Exception as e:  # noqa: BLE001
                    skipped[END_TO_END] = ad.reason(e)
    return Spectrum(measured, end, skipped)
