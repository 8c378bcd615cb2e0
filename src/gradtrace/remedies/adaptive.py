"""Clippers whose threshold follows the run: AutoClip (a percentile of past norms) and
ZClip (an EMA z-score of the total norm).

* :class:`AutoClip` -- Seetharaman, Wichern, Pardo & Le Roux 2020, "AutoClip: Adaptive
  Gradient Clipping for Source Separation Networks".
* :class:`ZClip` -- Kumar, Owen, Roy Chowdhury & Güra 2025, "ZClip: Adaptive Spike
  Mitigation for LLM Pre-Training" (arXiv:2504.02507).

Both keep their statistics as device tensors and never read a value back to the host
(only step counters are Python ints); both take norms from :mod:`gradtrace.norms`, clip
with :func:`gradtrace.remedies.clip.clip_with_norms_` and tell the norm registry what
they did, and both return the pre-clip total norm.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import torch
from torch import Tensor

from .. import norms as N
from .clip import CLIP_EPS, _grads_of, _scale_, clip_with_norms_

__all__ = ["AutoClip", "ZClip"]


def _norms_and_total(grads: list[Tensor], p: float, foreach: bool | None
                     ) -> tuple[list[Tensor], Tensor]:
    norms = N.grad_norms(grads, p, foreach=foreach)
    return norms, N.total_norm(norms, p)


class AutoClip:
    """AutoClip (Seetharaman et al. 2020): clip to a percentile of past gradient norms.

    At each call the pre-clip total norm is appended to the history (current one
    included) and the gradients are norm-clipped to the ``percentile``-th percentile
    (linear interpolation, like ``numpy.percentile``) of that history. ``percentile=10``
    is the paper's value; it is a percentile in [1, 100], so a fraction such as ``0.9``
    is refused with a hint (pass ``90``). ``history=None`` keeps every norm; an int keeps
    the last ``history`` (a ring buffer). Non-finite norms are stored as nan and ignored
    by the percentile. The history lives on the gradients' device (float64, float32 on
    MPS); no host sync. Returns the pre-clip total norm (a tensor) and tells the norm
    registry (:func:`gradtrace.norms.register`).

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> clipper = AutoClip(percentile=10, history=1000)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> total = clipper(model.parameters())
        >>> state = clipper.state_dict()
    """

    def __init__(self, percentile: float = 10.0, history: int | None = None,
                 norm_type: float = 2.0, foreach: bool | None = None) -> None:
        if isinstance(percentile, bool) or not isinstance(percentile, numbers.Real):
            raise TypeError(f"percentile must be a number in [1, 100], got {percentile!r}")
        percentile = float(percentile)
        if not 1.0 <= percentile <= 100.0:
            hint = (f"; it is a percentile, not a fraction: for the {percentile:g} quantile "
                    f"pass percentile={100 * percentile:g}" if 0.0 < percentile < 1.0 else "")
            raise ValueError(f"percentile must be in [1, 100] (the paper uses 10), "
                             f"got {percentile:g}{hint}")
        if history is not None and (isinstance(history, bool) or not isinstance(history, int)
                                    or history < 1):
            raise ValueError(f"history must be None (unbounded) or an int >= 1, got {history!r}")
        self.percentile = percentile
        self.history = history
        self.norm_type = N.check_norm_type(norm_type)
        self.foreach = foreach
        self._buf: Tensor | None = None
        self._count = 0

    @property
    def count(self) -> int:
        """Number of norms recorded so far."""
        return self._count

    def _record(self, total: Tensor) -> Tensor:
        device = total.device
        dtype = N.wide_dtype(device)
        if self._buf is None:
            self._buf = torch.empty(self.history or 64, dtype=dtype, device=device)
        elif self._buf.device != device:
            self._buf = self._buf.to(device)
        value = total.detach().to(self._buf.dtype)
        value = torch.where(torch.isfinite(value), value, torch.full_like(value, math.nan))
        if self.history is not None:
            if self._buf.numel() < self.history:  # restored from a partly filled state
                grown = torch.empty(self.history, dtype=self._buf.dtype, device=device)
                grown[: self._buf.numel()] = self._buf
                self._buf = grown
            self._buf[self._count % self.history] = value
            n = min(self._count + 1, self.history)
        else:
            if self._count >= self._buf.numel():
                grown = torch.empty(max(64, 2 * self._buf.numel()), dtype=self._buf.dtype,
                                    device=device)
                grown[: self._count] = self._buf[: self._count]
                self._buf = grown
            self._buf[self._count] = value
            n = self._count + 1
        self._count += 1
        return self._buf[:n]

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> Tensor:
        """Record the total norm, clip to the percentile threshold, return the pre-clip norm."""
        grads = _grads_of(parameters)
        norms, total = _norms_and_total(grads, self.norm_type, self.foreach)
        if not grads:
            return total
        window = self._record(total)
        with torch.no_grad():
            threshold = torch.nanquantile(window, self.percentile / 100.0)
            coef = clip_with_norms_(grads, total, threshold, self.foreach)
        N.notify_clipped(grads, norms, total, coef, self.norm_type)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Settings, count and stored norms (a tensor), enough to resume identically.

        Example:
            >>> AutoClip(percentile=10).state_dict()["count"]
            0
        """
        n = self._count if self.history is None else min(self._count, self.history)
        norms = self._buf[:n].clone() if self._buf is not None else torch.zeros(0)
        return {"percentile": self.percentile, "history": self.history,
                "norm_type": self.norm_type, "count": self._count, "norms": norms}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (settings included).

        Example:
            >>> c = AutoClip(); c.load_state_dict(AutoClip(percentile=50, history=8).state_dict())
            >>> c.percentile, c.history
            (50.0, 8)
        """
        self.__init__(state["percentile"], state["history"], state.get("norm_type", 2.0),
                      self.foreach)
        self._count = int(state["count"])
        norms = state["norms"]
        self._buf = norms.detach().clone() if norms.numel() else None


_ZCLIP_MODES = ("adaptive", "mean", "fixed")


class ZClip:
    """ZClip (Kumar et al. 2025): clip total-norm spikes by an EMA z-score.

    The first ``warmup`` norms are only collected (no clipping, except an optional
    ``max_norm`` cap); then the mean ``mu`` and (population) variance ``var`` are set
    from the finite ones. Afterwards, for a total norm ``g`` with
    ``z = (g - mu) / (sqrt(var) + eps)``, when ``z > z_thresh`` the gradients are
    norm-clipped to a threshold that depends on ``mode``:

    * ``"adaptive"`` (paper default): ``mu + z_thresh**2 * sigma / z`` -- the larger the
      outlier, the harder it is clipped;
    * ``"mean"``: the EMA mean ``mu`` (the reference implementation's ``clip_option="mean"``);
    * ``"fixed"``: ``mu + z_thresh * sigma``, i.e. the z-score boundary itself.

    Then the EMA is updated with the clipped value ``x`` (``g`` if not clipped), mean
    first: ``mu <- a*mu + (1-a)*x``, ``var <- a*var + (1-a)*(x - mu)**2`` (with the new
    ``mu``, as in the reference code). Non-finite norms leave the statistics unchanged.
    ``max_norm`` (optional) is an absolute cap applied on top. Statistics are 0-d device
    tensors (float64; float32 on MPS); no host sync. Returns the pre-clip total norm.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> zclip = ZClip(alpha=0.97, z_thresh=2.5, warmup=25)
        >>> model(torch.randn(4, 3)).sum().backward()
        >>> total = zclip(model.parameters())
    """

    def __init__(self, alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
                 mode: str = "adaptive", *, max_norm: float | None = None, eps: float = 1e-6,
                 norm_type: float = 2.0, foreach: bool | None = None) -> None:
        alpha, z_thresh = float(alpha), float(z_thresh)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if not z_thresh > 0.0:
            raise ValueError(f"z_thresh must be > 0, got {z_thresh}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if mode not in _ZCLIP_MODES:
            raise ValueError(f"mode must be one of {_ZCLIP_MODES}, got {mode!r}")
        if max_norm is not None and not float(max_norm) > 0.0:
            raise ValueError(f"max_norm must be None or > 0, got {max_norm}")
        if not float(eps) > 0.0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.alpha, self.z_thresh, self.warmup, self.mode = alpha, z_thresh, warmup, mode
        self.max_norm = None if max_norm is None else float(max_norm)
        self.eps = float(eps)
        self.norm_type = N.check_norm_type(norm_type)
        self.foreach = foreach
        self.step_count = 0
        self._warm: list[Tensor] = []
        self._mean: Tensor | None = None
        self._var: Tensor | None = None

    @property
    def warmed_up(self) -> bool:
        """True once the EMA statistics are initialised (and clipping is active)."""
        return self._mean is not None

    @property
    def mean(self) -> Tensor | None:
        """EMA mean of the total norm (0-d tensor) or None during warmup."""
        return self._mean

    @property
    def var(self) -> Tensor | None:
        """EMA variance of the total norm (0-d tensor) or None during warmup."""
        return self._var

    def _init_stats(self) -> None:
        x = torch.stack(self._warm)
        finite = torch.isfinite(x)
        n = finite.sum().clamp(min=1).to(x.dtype)
        xz = torch.where(finite, x, torch.zeros_like(x))
        mean = xz.sum() / n
        var = torch.where(finite, (x - mean) ** 2, torch.zeros_like(x)).sum() / n
        self._mean, self._var = mean, var
        self._warm = []

    def __call__(self, parameters: Tensor | Iterable[Tensor]) -> Tensor:
        """Clip a spike (after warmup), update the statistics, return the pre-clip norm."""
        grads = _grads_of(parameters)
        norms, total = _norms_and_total(grads, self.norm_type, self.foreach)
        if not grads:
            return total
        self.step_count += 1
        dtype = N.wide_dtype(total.device)
        g = total.detach().to(dtype)
        coef: Tensor | None = None
        with torch.no_grad():
            if self._mean is None:
                self._warm.append(g)
                if len(self._warm) >= self.warmup:
                    self._init_stats()
                if self.max_norm is not None:
                    coef = clip_with_norms_(grads, total, self.max_norm, self.foreach)
            else:
                if self._mean.device != g.device:
                    self._mean, self._var = self._mean.to(g.device), self._var.to(g.device)
                mean, var = self._mean, self._var
                std = var.sqrt()
                z = (g - mean) / (std + self.eps)
                spike = z > self.z_thresh
                if self.mode == "adaptive":
                    threshold = mean + self.z_thresh ** 2 * std / z
                elif self.mode == "mean":
                    threshold = mean
                else:
                    threshold = mean + self.z_thresh * std
                x = torch.where(spike, threshold, g)
                limit = x if self.max_norm is None else torch.clamp(x, max=self.max_norm)
                one = torch.ones_like(g)
                coef = torch.where(g > limit, limit / (g + CLIP_EPS), one).clamp(max=1.0)
                _scale_(grads, coef, self.foreach)
                finite = torch.isfinite(g)
                new_mean = self.alpha * mean + (1.0 - self.alpha) * x
                new_var = self.alpha * var + (1.0 - self.alpha) * (x - new_mean) ** 2
                self._mean = torch.where(finite, new_mean, mean)
                self._var = torch.where(finite, new_var, var)
        N.notify_clipped(grads, norms, total, coef, self.norm_type)
        return total

    def state_dict(self) -> dict[str, Any]:
        """Settings, step count, warmup buffer and EMA statistics (tensors).

        Example:
            >>> ZClip(warmup=5).state_dict()["warmup"]
            5
        """
        return {
            "alpha": self.alpha, "z_thresh": self.z_thresh, "warmup": self.warmup,
            "mode": self.mode, "max_norm": self.max_norm, "eps": self.eps,
            "norm_type": self.norm_type, "step_count": self.step_count,
            "warm": torch.stack(self._warm).clone() if self._warm else torch.zeros(0),
            "mean": None if self._mean is None else self._mean.clone(),
            "var": None if self._var is None else self._var.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict` (settings included).

        Example:
            >>> z = ZClip(); z.load_state_dict(ZClip(z_thresh=3.0).state_dict()); z.z_thresh
            3.0
        """
        self.__init__(state["alpha"], state["z_thresh"], state["warmup"], state["mode"],
                      max_norm=state["max_norm"], eps=state["eps"],
                      norm_type=state.get("norm_type", 2.0), foreach=self.foreach)
        self.step_count = int(state["step_count"])
        self._warm = list(state["warm"].detach().clone().unbind(0))
        self._mean = None if state["mean"] is None else state["mean"].detach().clone()
        self._var = None if state["var"] is None else state["var"].detach().clone()
