"""Skip optimizer steps that would damage the model.

:class:`Guard` wraps an optimizer and replaces ``optimizer.step()`` the way
``torch.amp.GradScaler.step`` does: the update is skipped -- ``optimizer.step()`` is not
called at all, so parameters and optimizer state (e.g. Adam moments, step counts) stay
bitwise unchanged -- when

* any gradient is non-finite (one fused flag: the total gradient norm, computed with one
  ``_foreach_norm`` per (device, dtype), is inf/nan -- as in GradScaler's inf check), or
  the loss is non-finite;
* optionally, the loss or the total gradient norm is a *spike*: its robust z-score
  ``(x - median) / (1.4826 * MAD)`` (:func:`gradtrace.numerics.robust_z`, the one
  diagnosis uses, with the same floor) over the last ``window`` finite values exceeds
  ``spike_zscore``. This follows the skip-step rule of OLMo-core's ``SkipStepOptimizer``
  (OLMo 2, Team OLMo 2024, "2 OLMo 2 Furious": z-score > 6 over the last 128 steps),
  with median/MAD instead of mean/std so that earlier spikes do not inflate the scale.
  The rule is inactive until ``min_samples`` values have been seen; non-finite values
  never enter the statistics.

Cost: the decision needs the loss and norm on the host, so ``step`` performs exactly one
device-to-host copy per call (both values packed in one tensor), like GradScaler's
``found_inf`` check. Nothing is synced when neither check needs a value.

Distributed training: every rank must take the same decision, or DDP/FSDP ranks drift
apart (one steps, another skips) and later collectives may hang. When
``torch.distributed`` is initialised with more than one rank (and ``sync=True``, the
default), ``step`` all-reduces the decision inputs in **one** small ``SUM`` collective
per call over ``process_group`` (``None``: the default group): per signal the sum of the
finite values, how many ranks passed one, and how many were nan / +inf / -inf. Every
rank then decides on the same numbers -- the loss is the mean over the ranks (the loss
of the global batch for equal per-rank batches), non-finite if it is non-finite on any
rank -- so skip decisions, spike windows, counters and learning-rate backoffs are
identical everywhere. The collective replaces the host copy (still one sync per call).
Gradient norms of FSDP2 ``DTensor`` shards are taken over the full gradient
(:func:`gradtrace.norms.grad_norms`). All ranks must call ``step`` together.

After ``backoff_after`` consecutive skips, ``lr_backoff`` (if set) multiplies every param
group's learning rate by that factor (and the count restarts), for runs whose instability
persists rather than being a one-off spike.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any, Iterable

import torch
from torch import Tensor

from .. import norms as N
from ..numerics import robust_z

__all__ = ["Guard"]

_SPIKE_SIGNALS = ("loss", "grad_norm")


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> None:
    """A wrong type is a TypeError, a value out of range a ValueError; both name the argument."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")


class Guard:
    """Skip optimizer updates on non-finite gradients/loss and on loss or grad-norm spikes.

    Args:
        optimizer: the wrapped optimizer; ``guard.step(loss)`` replaces ``optimizer.step()``.
        skip_nonfinite: skip when the total gradient norm or the loss is inf/nan.
        spike_zscore: if set (e.g. 6.0), skip when the robust z-score of the loss or of the
            total gradient norm exceeds it (see module docstring). ``None`` disables.
        window: number of recent finite values kept for the spike statistics.
        lr_backoff: if set (0 < f < 1), multiply every param group's ``lr`` by it after
            ``backoff_after`` consecutive skips.
        monitor: object with ``log_event(kind, **data)``; every skip is reported as
            ``log_event("guard_skip", step=..., reason=..., value=...)`` and every backoff as
            ``log_event("guard_lr_backoff", step=..., factor=..., lrs=[...])``. Can be set
            later with ``guard.monitor = mon``.
        min_samples: values needed before spike detection is active (default
            ``max(2, window // 2)``).
        backoff_after: consecutive skips that trigger an ``lr_backoff`` (default 3).
        spike_on: which signals the spike rule watches, subset of ``("loss", "grad_norm")``.
        sync: under an initialised multi-rank ``torch.distributed`` run, agree on the
            decision inputs across ranks (one all-reduce per ``step``; see the module
            docstring). ``False`` decides on this rank's values alone -- only safe when
            each rank's loss and gradient norm are already identical.
        process_group: the group to agree over (``None``: the default group).

    Skip reasons: ``"nonfinite_grad"``, ``"nonfinite_loss"``, ``"loss_spike"``,
    ``"grad_norm_spike"``. Steps are numbered from 0 by calls to :meth:`step`.

    When gradtrace computes the gradient norm here it tells the norm registry
    (:func:`gradtrace.norms.register`, with ``coef=None``) and a monitor reuses it. If
    you clip first, pass the pre-clip norm the clipper returned as ``grad_norm=`` so
    nothing is computed twice.

    Example:
        >>> import torch
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> guard = Guard(opt, spike_zscore=6.0)
        >>> loss = model(torch.randn(4, 3)).pow(2).mean()
        >>> loss.backward()
        >>> guard.step(loss)
        True
    """

    def __init__(self, optimizer: torch.optim.Optimizer, skip_nonfinite: bool = True,
                 spike_zscore: float | None = None, window: int = 128,
                 lr_backoff: float | None = None, monitor: Any = None, *,
                 min_samples: int | None = None, backoff_after: int = 3,
                 spike_on: Iterable[str] = _SPIKE_SIGNALS, sync: bool = True,
                 process_group: Any = None) -> None:
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if spike_zscore is not None and not float(spike_zscore) > 0:
            raise ValueError(f"spike_zscore must be None or > 0, got {spike_zscore}")
        _check_int("window", window, 2)
        if lr_backoff is not None and not 0.0 < float(lr_backoff) < 1.0:
            raise ValueError(f"lr_backoff must be None or in (0, 1), got {lr_backoff}")
        if min_samples is None:
            min_samples = max(2, window // 2)
        _check_int("min_samples", min_samples, 2, window)
        _check_int("backoff_after", backoff_after, 1)
        spike_on = (spike_on,) if isinstance(spike_on, str) else tuple(spike_on)
        bad = [s for s in spike_on if s not in _SPIKE_SIGNALS]
        if bad or not spike_on:
            raise ValueError(f"spike_on must be a non-empty subset of {_SPIKE_SIGNALS}, "
                             f"got {spike_on!r}")
        if monitor is not None and not callable(getattr(monitor, "log_event", None)):
            raise TypeError("monitor must have a log_event(kind, **data) method")
        self.optimizer = optimizer
        self.skip_nonfinite = bool(skip_nonfinite)
        self.spike_zscore = None if spike_zscore is None else float(spike_zscore)
        self.window = window
        self.lr_backoff = None if lr_backoff is None else float(lr_backoff)
        self.monitor = monitor
        self.min_samples = min_samples
        self.backoff_after = backoff_after
        self.spike_on = spike_on
        self.sync = bool(sync)
        self.process_group = process_group
        self.step_count = 0
        self.skipped = 0
        self.skips: list[tuple[int, str]] = []
        self.backoffs = 0
        self.last_grad_norm: float | None = None
        self.last_loss: float | None = None
        self._consecutive = 0
        self._loss_window: deque[float] = deque(maxlen=window)
        self._norm_window: deque[float] = deque(maxlen=window)

    # -------------------------------------------------------------------- hot path
    def _grads(self) -> list[Tensor]:
        return [p.grad for group in self.optimizer.param_groups for p in group["params"]
                if p.grad is not None]

    def _values(self, loss: Any, grad_norm: Any) -> tuple[float | None, float | None]:
        """Return (loss, grad_norm) as Python floats with at most one host sync."""
        spike_norm = self.spike_zscore is not None and "grad_norm" in self.spike_on
        spike_loss = self.spike_zscore is not None and "loss" in self.spike_on
        want_norm = self.skip_nonfinite or spike_norm
        want_loss = loss is not None and (self.skip_nonfinite or spike_loss)
        if grad_norm is None and want_norm:
            grads = self._grads()
            if grads:
                norms = N.grad_norms(grads)
                grad_norm = N.total_norm(norms)
                N.notify_clipped(grads, norms, grad_norm, None, 2.0)
        vals = [loss if want_loss else None, grad_norm if want_norm else None]
        for i, v in enumerate(vals):
            if isinstance(v, Tensor):
                if v.numel() != 1:
                    name = "loss" if i == 0 else "grad_norm"
                    raise ValueError(f"{name} must be a scalar, got shape {tuple(v.shape)}")
                if hasattr(v, "full_tensor"):     # a DTensor, e.g. a clipper's FSDP2 total
                    v = v.full_tensor()
                vals[i] = v.detach().reshape(())
            elif v is not None:
                vals[i] = float(v)
        if not (self.skip_nonfinite or self.spike_zscore is not None):
            return None, None    # nothing to decide (the same on every rank: settings only)
        dist = self._dist()
        if dist is not None:
            return self._agree(dist, vals)
        pending = [v for v in vals if isinstance(v, Tensor)]
        if pending:
            dev = pending[0].device
            packed = torch.stack([t.to(dev, N.wide_dtype(dev)) for t in pending])
            values = iter(packed.tolist())  # the one host sync of this step
            vals = [next(values) if isinstance(v, Tensor) else v for v in vals]
        return vals[0], vals[1]

    def _dist(self) -> Any:
        """``torch.distributed`` when the decision must be agreed across ranks, else None."""
        if not self.sync:
            return None
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return None
        return dist if dist.get_world_size(self.process_group) > 1 else None

    def _comm_device(self, dist: Any, vals: list) -> torch.device:
        backend = str(dist.get_backend(self.process_group)).lower()
        if "gloo" in backend or "mpi" in backend:
            return torch.device("cpu")
        dev = next((v.device for v in vals if isinstance(v, Tensor)), None)
        if dev is not None and dev.type != "cpu":
            return dev
        acc = torch.accelerator.current_accelerator()
        return torch.device(acc.type, torch.accelerator.current_device_index()) \
            if acc is not None else torch.device("cpu")

    def _agree(self, dist: Any, vals: list) -> tuple[float | None, float | None]:
        """Reduce (loss, grad_norm) over the ranks with ONE all-reduce; same result everywhere.

        Per signal five numbers are summed: the finite value (0 otherwise), 1 if this rank
        passed a value, and nan / +inf / -inf indicators (NaN is never sent, so the
        result does not depend on how a backend propagates it). The agreed value is the
        mean over the ranks that passed one, with IEEE semantics for non-finite values.
        """
        dev = self._comm_device(dist, vals)
        dtype = N.wide_dtype(dev)
        rows = []
        for v in vals:
            if v is None:
                rows.append(torch.zeros(5, dtype=dtype, device=dev))
                continue
            x = v.to(dev, dtype) if isinstance(v, Tensor) else torch.tensor(v, dtype=dtype,
                                                                          device=dev)
            finite = torch.isfinite(x)
            rows.append(torch.stack([torch.where(finite, x, torch.zeros_like(x)),
                                     torch.ones_like(x), torch.isnan(x).to(dtype),
                                     torch.isposinf(x).to(dtype), torch.isneginf(x).to(dtype)]))
        buf = torch.cat(rows)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.process_group)
        flat = buf.tolist()  # the one host sync of this step
        out: list[float | None] = []
        for k in range(2):
            total, count, nan, pinf, ninf = flat[5 * k:5 * k + 5]
            if count == 0:
                out.append(None)
            elif nan or (pinf and ninf):
                out.append(math.nan)
            elif pinf or ninf:
                out.append(math.inf if pinf else -math.inf)
            else:
                out.append(total / count)
        return out[0], out[1]

    def step(self, loss: Any = None, *, grad_norm: Any = None) -> bool:
        """Apply ``optimizer.step()`` unless the step must be skipped; True if applied.

        ``loss`` (tensor or float, optional) feeds the non-finite and spike checks;
        ``grad_norm`` (optional) is a precomputed *pre-clip* total gradient norm, e.g. the
        return value of ``clip_grad_norm_``; without it the norm is computed here.

        Example:
            >>> import torch
            >>> p = torch.nn.Parameter(torch.ones(2)); p.grad = torch.tensor([1., float("nan")])
            >>> guard = Guard(torch.optim.SGD([p], lr=1.0))
            >>> guard.step(), guard.skips
            (False, [(0, 'nonfinite_grad')])
        """
        step = self.step_count
        self.step_count += 1
        loss_v, norm_v = self._values(loss, grad_norm)
        self.last_loss, self.last_grad_norm = loss_v, norm_v
        reason: str | None = None
        value: float | None = None
        if self.skip_nonfinite:
            if norm_v is not None and not math.isfinite(norm_v):
                reason, value = "nonfinite_grad", norm_v
            elif loss_v is not None and not math.isfinite(loss_v):
                reason, value = "nonfinite_loss", loss_v
        if self.spike_zscore is not None:
            for name, v, win in (("loss", loss_v, self._loss_window),
                                 ("grad_norm", norm_v, self._norm_window)):
                if name not in self.spike_on or v is None or not math.isfinite(v):
                    continue
                if reason is None and len(win) >= self.min_samples \
                        and robust_z(v, win) > self.spike_zscore:
                    reason, value = f"{name}_spike", v
                win.append(v)  # finite values only; spikes included so level shifts adapt
        if reason is None:
            self._consecutive = 0
            self.optimizer.step()
            return True
        self._record_skip(step, reason, value)
        return False

    def _record_skip(self, step: int, reason: str, value: float | None) -> None:
        self.skipped += 1
        self.skips.append((step, reason))
        self._consecutive += 1
        backoff = None
        if self.lr_backoff is not None and self._consecutive >= self.backoff_after:
            for group in self.optimizer.param_groups:
                if isinstance(group["lr"], Tensor):
                    group["lr"].mul_(self.lr_backoff)
                else:
                    group["lr"] = group["lr"] * self.lr_backoff
            self.backoffs += 1
            self._consecutive = 0
            backoff = {"factor": self.lr_backoff, "lrs": [float(g["lr"]) for g in self.optimizer.param_groups]}
        mon = self.monitor
        if mon is None:
            return
        if hasattr(mon, "skip_step"):
            # A gradtrace monitor: the skipped batch's step ends unrecorded, so the next
            # batch starts a fresh step, and events carry the monitor's step numbers.
            mon.skip_step("guard_skip", reason=reason, value=value, guard_step=step)
            if backoff is not None:
                mon.log_event("guard_lr_backoff", step=mon.step_count - 1, guard_step=step, **backoff)
        else:
            mon.log_event("guard_skip", step=step, reason=reason, value=value)
            if backoff is not None:
                mon.log_event("guard_lr_backoff", step=step, **backoff)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Counters, skip log and spike windows (plain Python values).

        Example:
            >>> g = Guard(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
            >>> g.state_dict()["step_count"]
            0
        """
        return {
            "step_count": self.step_count, "skipped": self.skipped,
            "skips": list(self.skips), "backoffs": self.backoffs,
            "consecutive": self._consecutive,
            "loss_window": list(self._loss_window), "norm_window": list(self._norm_window),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`; settings come from the constructor.

        Example:
            >>> g = Guard(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1))
            >>> g.load_state_dict({"step_count": 5, "skipped": 1, "skips": [(3, "loss_spike")]}); g.skips
            [(3, 'loss_spike')]
        """
        self.step_count = int(state["step_count"])
        self.skipped = int(state["skipped"])
        self.skips = [(int(s), str(r)) for s, r in state["skips"]]
        self.backoffs = int(state.get("backoffs", 0))
        self._consecutive = int(state.get("consecutive", 0))
        self._loss_window = deque(state.get("loss_window", []), maxlen=self.window)
        self._norm_window = deque(state.get("norm_window", []), maxlen=self.window)

    def __repr__(self) -> str:
        return (f"Guard(skip_nonfinite={self.skip_nonfinite}, spike_zscore={self.spike_zscore}, "
                f"window={self.window}, lr_backoff={self.lr_backoff}, steps={self.step_count}, "
                f"skipped={self.skipped})")
