"""The monitor: attaches hooks, reduces statistics on the device, writes one record a step.

Step lifecycle (with an optimizer; without one, ``mon.step()`` closes a step by hand)::

    forward hooks     per watched module: a one-kernel non-finite flag; on activation
                      steps also mean/std/max|x|, ReLU zeros and active units, saturation,
                      and a tensor hook for the gradient arriving at the output
    optimizer pre     per parameter: grad L2 norm, max|g|, parameter norm (foreach kernels)
    optimizer post    on activation steps: the update ||dw|| / ||w|| just applied;
                      then one device-to-host copy of the flat buffer, one record written

Steps that record nothing do no device work and no host sync: every hook returns at once.
"""
from __future__ import annotations

import math
import sys
import time
import traceback
import warnings
import weakref
from functools import partial
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from . import distributed, stats
from .probe import SATURATION_BOUNDS, activation_kind, floating_tensors, select, unit_view
from .errors import NonFiniteError
from .trace import MemoryWriter, Trace, TraceWriter, load, pack_mask

F32 = torch.float32

#: Named trade-offs between cost and insight (pass ``preset=`` to :func:`watch`).
PRESETS: dict[str, dict[str, Any]] = {
    # every 10th step, activations every 100th: near-free on any model
    "economy": {"every": 10, "activations_every": 100, "backward_flags": False},
    # the defaults: parameter figures every step, activations every 10th
    "default": {"every": 1, "activations_every": 10, "backward_flags": False},
    # everything every step, including output-gradient non-finite flags for localisation
    "full": {"every": 1, "activations_every": 1, "backward_flags": True},
}

# Models currently watched; a WeakSet keeps no model alive and puts nothing on it.
_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _stack(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-d tensors into one float32 vector on ``device`` (converting only if needed)."""
    if all(v.dtype == F32 and v.device == device for v in values):
        return torch.stack(values)
    nb = device.type != "cpu"  # a copy to the host must land before it is read
    return torch.stack([v.to(device=device, dtype=F32, non_blocking=nb) for v in values])


class _WeakNormObserver:
    """A clip-norm observer that does not keep its monitor alive.

    The observer list is global; holding the monitor strongly would keep an unclosed
    monitor, its model and its open trace alive for the life of the process.
    """

    def __init__(self, monitor: "Monitor"):
        self._ref = weakref.WeakMethod(monitor._on_clip)

    def __call__(self, *args: Any) -> None:
        method = self._ref()
        if method is None:
            self.remove()
        else:
            method(*args)

    def remove(self) -> None:
        from .remedies.clip import remove_norm_observer

        remove_norm_observer(self)


def _make_clipper(clip: Any):
    if clip is None or callable(clip):
        return clip
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if not clip > 0:
            raise ValueError(f"clip={clip!r}: a max norm must be > 0 (or pass None for no clipping)")
        from .remedies.clip import clip_grad_norm_

        return lambda params: clip_grad_norm_(params, max_norm=float(clip))
    raise TypeError(f"clip={clip!r}: pass a max norm (float > 0), a clipper such as gt.ZClip(), "
                    "or a callable taking the list of parameters")


def _check_every(name: str, value: Any, allow_zero: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < (0 if allow_zero else 1):
        raise ValueError(f"{name} must be >= {0 if allow_zero else 1} "
                         f"({'0 turns it off' if allow_zero else 'record every N steps'}), got {value}")
    return value


class Monitor:
    """Watches a model (and optionally its optimizer) and writes a trace.

    Create it with :func:`watch`. Use as a context manager, or call :meth:`close`.

    Example:
        >>> mon = gt.watch(model, optimizer, out=None)        # doctest: +SKIP
        >>> ...train...; mon.close(); mon.trace.stats()        # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 out: str | None = None, every: int = 1, activations_every: int = 10,
                 layers: Any = None, preset: str | None = None, backward_flags: bool = False,
                 time_gradients: bool = False, raise_on_nonfinite: bool = False,
                 clip: Any = None, sinks: Iterable[Any] = (), fsync: bool = False,
                 scaler: Any = None, update_ratio: bool = True):
        # Everything close() touches exists before anything can fail.
        self._closed, self._handles, self._sinks, self._writer = False, [], [], None
        self._scaler, self._scaler_update, self._stepped = None, None, False
        self._snap: list[torch.Tensor] = []
        self._snap_key: tuple | None = None
        self._root = None
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if preset is not None:
            if preset not in PRESETS:
                raise ValueError(f"preset={preset!r} is unknown; valid: {', '.join(PRESETS)}")
            cfg = PRESETS[preset]
            every, activations_every = cfg["every"], cfg["activations_every"]
            backward_flags = cfg["backward_flags"]
        self.every = _check_every("every", every)
        self.activations_every = _check_every("activations_every", activations_every, allow_zero=True)
        self.compiled = hasattr(model, "_orig_mod")
        # The user's module under DDP / torch.compile wrappers: names match a plain run, and
        # watching m and torch.compile(m) at once is caught as watching twice.
        root = distributed.unwrap(model._orig_mod if self.compiled else model)
        if root in _WATCHED:
            raise RuntimeError("this model is already watched by a gradtrace monitor; close that "
                               "monitor first (mon.close() or leave its `with` block)")
        self.model = model
        self.update_ratio = bool(update_ratio)
        self.optimizer = optimizer
        self.backward_flags = bool(backward_flags)
        self.raise_on_nonfinite = raise_on_nonfinite
        self._clipper = _make_clipper(clip)
        if self._clipper is not None and optimizer is None:
            raise ValueError("clip= needs the optimizer (clipping runs just before optimizer.step())")
        sel = select(root, layers)
        mods = dict(root.named_modules())
        params = dict(root.named_parameters())
        self._mod_names = sel.modules
        self._modules = [mods[n] for n in sel.modules]
        self._kinds = [activation_kind(m) for m in self._modules]
        self._param_names = sel.params
        self._params = [params[n] for n in sel.params]
        self._device = self._params[0].device if self._params else torch.device("cpu")

        # Cross-rank reductions when a process group is active (DDP, FSDP2); else None.
        self._dist = distributed.attach(model, self._params)
        self.step_count = 0           # optimizer steps closed so far (index of the current step)
        self._last_order: list[int] | None = None
        self._clip_info: dict | None = None
        meta = self._meta(root, layers, out, time_gradients, preset)
        if self._dist is not None:
            meta["distributed"] = self._dist.meta()
            if not self._dist.is_writer:          # one trace, written by rank 0
                out, sinks = None, ()
        self.out = out
        _WATCHED.add(root)
        self._root = root
        try:
            self._writer = TraceWriter(out, meta, fsync=fsync) if out is not None else MemoryWriter(meta)
            for s in sinks:
                if hasattr(s, "start"):
                    s.start(meta)
                self._sinks.append(s)
            self._attach(time_gradients)
            if scaler is not None:
                self._watch_scaler(scaler)
        except Exception:
            self.close()
            raise
        self._begin_step()

    # ---- setup ------------------------------------------------------------------------
    def _meta(self, root, layers, out, time_gradients, preset) -> dict:
        from . import __version__

        # A parameter belongs to the deepest watched module holding it (out_proj, not the
        # MultiheadAttention around it).
        owner = {}
        for mname, m in sorted(zip(self._mod_names, self._modules), key=lambda t: -len(t[0])):
            for pname, _ in m.named_parameters(prefix=mname, recurse=True):
                owner.setdefault(pname, mname)
        return {
            "gradtrace_version": __version__,
            "torch_version": torch.__version__,
            "created": time.time(),
            "model": type(root).__name__,
            "optimizer": type(self.optimizer).__name__ if self.optimizer else None,
            "config": {"every": self.every, "activations_every": self.activations_every,
                       "layers": None if layers is None else repr(layers), "preset": preset,
                       "backward_flags": self.backward_flags, "time_gradients": bool(time_gradients),
                       "out": None if out is None else str(out)},
            "saturation_bounds": SATURATION_BOUNDS,
            "modules": [{"name": n, "type": type(m).__name__, "activation": k,
                         "params": [p for p, o in owner.items() if o == n]}
                        for n, m, k in zip(self._mod_names, self._modules, self._kinds)],
            "params": [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                        "module": owner.get(n, n.rpartition(".")[0])}
                       for n, p in zip(self._param_names, self._params)],
        }

    def _attach(self, time_gradients: bool) -> None:
        if self.compiled:
            warnings.warn("gradtrace: the model is torch.compile'd; module hooks would break its "
                          "graphs, so activation statistics are skipped. Parameter-gradient "
                          "statistics, clipping and the guard work as usual.", stacklevel=3)
        else:
            for i, m in enumerate(self._modules):
                self._handles.append(m.register_forward_hook(partial(self._on_forward, i)))
                if time_gradients and self._kinds[i] == "recurrent":
                    self._handles.append(m.register_forward_pre_hook(partial(self._on_rnn_input, i)))
        from .remedies.clip import add_norm_observer

        self._handles.append(add_norm_observer(_WeakNormObserver(self)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_post_step))

    def _watch_scaler(self, scaler: Any) -> None:
        # GradScaler.step() skips optimizer.step() after an overflow, so our step hooks
        # never fire; its update() then runs with no step taken. We wrap update() on this
        # one instance (restored by close()) to record such a step as "amp_skip".
        if self.optimizer is None or not callable(getattr(scaler, "update", None)):
            raise ValueError("scaler= needs an optimizer and a torch.amp.GradScaler")
        self._scaler, self._scaler_update = scaler, scaler.update

        def update(*args: Any, **kwargs: Any) -> Any:
            skipped = not self._stepped and scaler.is_enabled()
            old = scaler.get_scale() if skipped else None     # host read only on a skip
            result = self._scaler_update(*args, **kwargs)
            self._stepped = False
            if skipped:
                self.skip_step("amp_skip", scale=old, new_scale=scaler.get_scale())
            return result
        scaler.update = update

    # ---- step lifecycle ----------------------------------------------------------------
    def _begin_step(self) -> None:
        s = self.step_count
        self._act = self.activations_every > 0 and s % self.activations_every == 0
        self._rec = s % self.every == 0 or self._act
        # One entry per module call: the module index (host) and its output sum (device).
        self._call_idx: list[int] = []
        self._flags: list[torch.Tensor] = []
        # Activation-step figures, one entry per call, kept as columns so that the step
        # end stacks a handful of lists instead of one small tensor per call.
        self._acts: list[tuple[int, int, int]] = []   # (call position, module idx, entries)
        self._cols: tuple[list, ...] = ([], [], [], [], [])  # min, max, norm, non-finite, extra
        self._bwd: list[tuple] = []            # (module idx, grad sq-norm tensor)
        self._order: list[int] = []            # first-call order of modules this step
        self._seen: set[int] = set()
        self._bwd_order: list[int] = []
        self._bwd_seen: set[int] = set()
        self._masks: dict[int, torch.Tensor] = {}
        self._time: dict[int, list[torch.Tensor]] = {}
        self._losses: list[Any] = []
        self._pending: dict[str, Any] | None = None
        self._clip_info = None

    def _on_forward(self, idx: int, module: nn.Module, inputs: Any, output: Any) -> None:
        # Forward passes without autograd (evaluation inside a training step) are not
        # part of the step being trained, so they are left out of its statistics.
        if not self._rec or self._closed or not torch.is_grad_enabled():
            return
        try:
            if isinstance(output, torch.Tensor):   # the common case, without the walk
                tensors = [output] if output.is_floating_point() and output.numel() else []
            else:
                tensors = floating_tensors(output)
            if not tensors:
                return
            if idx not in self._seen:
                self._seen.add(idx)
                self._order.append(idx)
            for t in tensors:
                td = t.detach()
                self._call_idx.append(idx)
                # A sum is finite iff every entry is (NaN/inf propagate): one cheap kernel.
                # On activation steps it doubles as the first moment.
                self._flags.append(self._activation_stats(idx, td) if self._act else td.sum(dtype=F32))
                if t.requires_grad and (self._act or self.backward_flags):
                    t.register_hook(partial(self._on_out_grad, idx))
        except Exception as e:  # a monitoring bug must never stop the user's training
            self._internal_error(e)

    def _activation_stats(self, idx: int, td: torch.Tensor) -> torch.Tensor:
        """Queue this call's activation figures; return its sum (reused as the flag)."""
        kind = self._kinds[idx]
        mn, mx = td.aminmax()
        total = td.sum(dtype=F32)
        # Norm about the call's own mean: the spread survives a large offset (100 + 1e-3 x),
        # where E[x^2] - E[x]^2 in float32 would cancel to zero.
        norm = torch.linalg.vector_norm(td - total / td.numel(), dtype=F32)
        bad = torch.count_nonzero(td * 0)   # inf*0 and nan*0 are nan, finite*0 is 0
        if kind == "relu":
            extra = torch.count_nonzero(td)                    # active entries
            active = unit_view(td).amax(0) > 0                 # units that fired at least once
            prev = self._masks.get(idx)
            self._masks[idx] = active if prev is None or prev.shape != active.shape else prev | active
        elif kind in SATURATION_BOUNDS:
            lo, hi = SATURATION_BOUNDS[kind]
            extra = torch.count_nonzero((td < lo) | (td > hi))
        else:
            extra = bad  # placeholder of the right dtype and device; ignored for this kind
        self._acts.append((len(self._flags), idx, td.numel()))  # the flag about to be appended
        for col, v in zip(self._cols, (mn, mx, norm, bad, extra)):
            col.append(v)
        return total

    def _on_out_grad(self, idx: int, grad: torch.Tensor) -> None:
        if self._closed or not self._rec:
            return
        try:
            if idx not in self._bwd_seen:
                self._bwd_seen.add(idx)
                self._bwd_order.append(idx)
            self._bwd.append((idx, torch.linalg.vector_norm(grad.detach(), dtype=F32)))
        except Exception as e:
            self._internal_error(e)

    def _on_rnn_input(self, idx: int, module: nn.Module, args: tuple):
        """Make the sequence input of a recurrent layer report the gradient per time step."""
        if self._closed or not self._act or not args or not torch.is_grad_enabled():
            return None
        x = args[0]
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return None  # packed sequences and the like are left alone
        time_dim = 1 if getattr(module, "batch_first", False) and x.dim() == 3 else 0
        if not x.requires_grad:
            # Data needs no gradient; a leaf copy that asks for one changes no parameter update.
            x = x.detach().requires_grad_(True)
        dims = [d for d in range(x.dim()) if d != time_dim]

        def per_step(g: torch.Tensor) -> None:
            if not self._closed:
                self._time.setdefault(idx, []).append(
                    torch.linalg.vector_norm(g.detach(), dim=dims, dtype=F32))
        x.register_hook(per_step)
        return (x,) + tuple(args[1:])

    def _on_clip(self, grads, norms, total, coef, norm_type) -> None:
        """Norm observer: a gradtrace clipper just computed every gradient norm.

        Kept only when it clipped exactly this model's gradients (another model's clip, or
        a clip of a subset, says nothing about this step) and in float32 or wider (the
        clipper's norms are in the gradients' dtype).
        """
        if not (self._rec and not self._closed and norm_type == 2.0 and coef is not None):
            return
        ours = [p.grad for p in self._params if p.grad is not None]
        if len(ours) == len(grads) and all(a is b for a, b in zip(ours, grads)):
            # Its per-tensor norms are reusable unless they are narrower than float32, or
            # full-tensor values under FSDP2 (the monitor reduces per-shard squares itself).
            reuse = self._dist is None and all(n.dtype in (torch.float32, torch.float64) for n in norms)
            self._clip_info = {"norms": list(norms), "total": total, "coef": coef, "reuse": reuse}

    def _on_pre_step(self, optimizer, args, kwargs) -> None:
        if self._clipper is not None and not self._closed:
            # Every parameter the optimizer updates, not only the watched layers.
            self._clipper([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
        if self._rec and not self._closed:
            try:
                self._collect_params(with_snapshot=self._act)
            except Exception as e:
                self._internal_error(e)

    def _on_post_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        self._stepped = True
        try:
            if self._rec:
                self._finish_step_safely()
        finally:
            self.step_count += 1
            self._begin_step()

    def _finish_step_safely(self) -> None:
        try:
            self._finish_step()
        except NonFiniteError:
            raise                              # asked for with raise_on_nonfinite=True
        except Exception as e:                 # a monitoring bug must never stop training
            self._internal_error(e)

    @property
    def recording(self) -> bool:
        """Whether the current step is recorded (``every`` / ``activations_every``).

        Example:
            >>> gt.watch(torch.nn.Linear(2, 1), every=3).recording      # doctest: +SKIP
            True
        """
        return self._rec and not self._closed

    # ---- driving the step from a framework ----------------------------------------------
    # Trainers that clip between backward and optimizer.step() (Lightning, Transformers)
    # watch without optimizer hooks and call these three instead.
    def collect(self) -> None:
        """Take this step's parameter-gradient figures now (before the framework clips).

        Example:
            >>> mon.collect(); clip(...); mon.note_clipped(); opt.step(); mon.finish()   # doctest: +SKIP
        """
        if self._rec and not self._closed:
            try:
                self._collect_params(with_snapshot=self._act)
            except Exception as e:
                self._internal_error(e)

    def note_clipped(self) -> None:
        """The gradients were clipped since :meth:`collect`: record the post-clip total and
        the coefficient, read from the gradients as they are now (on the device).

        Example:
            >>> mon.note_clipped()     # doctest: +SKIP
        """
        pending = self._pending or {}
        if self._closed or "gsq" not in pending or self._clip_info is not None:
            return
        try:
            grads = [distributed.local(self._params[i].grad) for i in pending["idx"]
                     if self._params[i].grad is not None]
            pre = pending["gsq"].sum().sqrt()
            post = stats.squared_norms(grads, self._device).sum().sqrt() if grads else pre
            self._clip_info = {"total": pre, "coef": post / pre}
        except Exception as e:
            self._internal_error(e)

    def finish(self) -> None:
        """Close the step after the optimizer stepped: one record (if this step records).

        Example:
            >>> mon.finish()           # doctest: +SKIP
        """
        self._on_post_step(self.optimizer, (), {})

    def skip_step(self, kind: str = "skip", **data: Any) -> None:
        """Close the current step without recording it, writing a ``kind`` event instead.

        For a step whose update was not applied (``gt.Guard`` skipping a non-finite or
        spiking step, a ``GradScaler`` overflow): its statistics are dropped so the next
        batch starts a fresh step, and the event carries this step's number.

        Example:
            >>> mon.skip_step("guard_skip", reason="nonfinite_grad")   # doctest: +SKIP
        """
        if self._closed:
            return
        self.log_event(kind, **data)
        self.step_count += 1
        self._begin_step()

    def step(self) -> None:
        """Close a step by hand (when the monitor was given no optimizer).

        Call it after ``loss.backward()`` (and after your own update, before zeroing the
        gradients). Update ratios need an optimizer and are not recorded this way.

        Example:
            >>> loss.backward(); mon.step(); model.zero_grad()   # doctest: +SKIP
        """
        if self._closed:
            raise RuntimeError("this monitor is closed; start a new one with gt.watch(...)")
        if self.optimizer is not None:
            raise RuntimeError("this monitor closes steps on optimizer.step(); do not call mon.step() too")
        try:
            if self._rec:
                self._collect_params(with_snapshot=False)
                self._finish_step_safely()
        finally:
            self.step_count += 1
            self._begin_step()

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Note this step's loss without a host sync (several calls in one step average).

        Example:
            >>> mon.record_loss(loss)            # doctest: +SKIP
        """
        if self._rec and not self._closed:
            # A per-example loss vector is averaged (on the device: no sync).
            self._losses.append(loss.detach().float().mean() if isinstance(loss, torch.Tensor) else float(loss))

    def log_event(self, kind: str, step: int | None = None, **data: Any) -> None:
        """Write an event (a guard skip, a note) into the trace at this step.

        Example:
            >>> mon.log_event("guard_skip", reason="nonfinite_grad")   # doctest: +SKIP
        """
        if self._closed:
            return
        self._write({"event": kind, "step": self.step_count if step is None else step, **data})

    # ---- reductions -----------------------------------------------------------------------
    def _grads(self) -> tuple[list[int], list[torch.Tensor]]:
        idx, grads = [], []
        for i, p in enumerate(self._params):
            if p.grad is not None:
                idx.append(i)
                grads.append(distributed.local(p.grad))  # FSDP2: this rank's shard
        return idx, grads

    def _collect_params(self, with_snapshot: bool) -> None:
        dev = self._device
        idx, grads = self._grads()
        params = [distributed.local(self._params[i].detach()) for i in idx]
        pending: dict[str, Any] = {"idx": idx}
        if grads:
            clip = self._clip_info
            pending["gmax"] = stats.max_abs(grads, dev)
            if clip is not None:
                # Undo the clip coefficient on max|g| so that all figures are pre-clip.
                pending["gmax"] = pending["gmax"] / clip["coef"].to(dev, F32)
            if clip is not None and clip["reuse"]:
                # The clipper already took every per-tensor norm (pre-clip): reuse them.
                pending["gsq"] = torch.stack([n.to(dev, torch.float64) for n in clip["norms"]]).square()
            else:
                pending["gsq"] = stats.squared_norms(grads, dev)
            pending["psq"] = stats.squared_norms(params, dev)
            if with_snapshot and self.update_ratio:
                pending["old"] = self._snapshot(idx, params)
        self._pending = pending

    def _snapshot(self, idx: list[int], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copy the parameters before the optimizer step, into buffers reused across steps.

        Reusing the buffers (one copy of the watched parameters, held while the monitor is
        open and activation statistics are on) avoids allocating and faulting in fresh
        memory on every activation step.
        """
        key = tuple(idx)
        if self._snap_key != key:
            self._snap = [torch.empty_like(p) for p in params]
            self._snap_key = key
        torch._foreach_copy_(self._snap, params)
        return self._snap

    def _finish_step(self) -> None:
        pending = self._pending or {"idx": []}
        self._pending = None
        dev = self._device
        parts: list[tuple[str, torch.Tensor]] = []
        idx = pending["idx"]
        if "gsq" in pending:
            parts += [("gsq", pending["gsq"]), ("gmax", pending["gmax"]), ("psq", pending["psq"])]
            if "old" in pending and self.optimizer is not None:
                new = [distributed.local(self._params[i].detach()) for i in idx]
                delta = pending["old"]
                torch._foreach_sub_(delta, new)          # old - new, in the snapshot buffer
                parts.append(("dsq", stats.squared_norms(delta, dev)))
        if self._clip_info is not None:
            parts.append(("clip", torch.stack([self._clip_info["total"].float(), self._clip_info["coef"].float()]).to(dev)))
        losses = [l for l in self._losses if isinstance(l, torch.Tensor)]
        if losses:
            parts.append(("loss", torch.stack([l.float().reshape(()).to(dev) for l in losses])))
        if self._flags:
            parts.append(("flag", _stack(self._flags, dev)))
            for name, col in zip(("a_min", "a_max", "a_norm", "a_bad", "a_extra"), self._cols):
                if col:
                    parts.append((name, _stack(col, dev)))
        if self._bwd:
            parts.append(("bwd", _stack([b[1] for b in self._bwd], dev)))
        for i, m in self._masks.items():
            parts.append((f"mask{i}", m.to(dev, F32)))
        for i, seqs in self._time.items():
            parts.append((f"time{i}", torch.stack([s.to(dev) for s in seqs]).pow(2).sum(0).sqrt()))

        if self._dist is not None:
            # Sum squares / counts and max the max-abs across ranks and shards, in as few
            # collectives as the backend allows (see distributed.py).
            parts = self._dist.reduce(parts, idx)
        host: dict[str, np.ndarray] = {}
        if parts:
            # float64: squared norms of vanishing gradients live below float32's range
            flat = torch.cat([t.reshape(-1).to(torch.float64) for _, t in parts])
            values = flat.cpu().numpy()            # the one device-to-host copy of this step
            off = 0
            for name, t in parts:
                host[name] = values[off: off + t.numel()]
                off += t.numel()
        record = self._build_record(host, idx, pending)
        self._clip_info = None
        self._write(record)
        if self.raise_on_nonfinite and record.get("_nonfinite"):
            raise NonFiniteError(record["_nonfinite"])

    def _build_record(self, host: dict, idx: list[int], pending: dict) -> dict:
        n_p, n_m = len(self._params), len(self._modules)
        rec: dict[str, Any] = {"step": self.step_count, "time": time.time()}
        scalars: dict[str, Any] = {}
        param: dict[str, list] = {}
        module: dict[str, list] = {}
        vectors: dict[str, dict] = {}

        def scatter(values, n, where) -> list:
            if len(where) == n:  # every parameter had a gradient: one C-level conversion
                return np.asarray(values, dtype=np.float64).tolist()
            col: list = [None] * n
            for j, v in zip(where, values):
                col[j] = float(v)
            return col

        bad_params: list[str] = []
        if "gsq" in host:
            gnorm = np.sqrt(host["gsq"].astype(np.float64))
            param["grad_norm"] = scatter(gnorm, n_p, idx)
            param["grad_maxabs"] = scatter(host["gmax"], n_p, idx)
            param["param_norm"] = scatter(np.sqrt(host["psq"].astype(np.float64)), n_p, idx)
            nonfinite = [0] * len(idx)
            broken = [k for k, v in enumerate(gnorm) if not math.isfinite(v)]
            if broken:  # count entries only where a norm proved something non-finite (rare)
                counts = stats.nonfinite_counts([distributed.local(self._params[idx[k]].grad)
                                                 for k in broken])
                if self._dist is not None:  # add the shards' counts (every rank gets here)
                    counts = self._dist.nonfinite_counts(counts, [idx[k] for k in broken])
                for k, c in zip(broken, counts):
                    nonfinite[k] = c
                bad_params = [self._param_names[idx[k]] for k in broken if nonfinite[k] > 0]
            param["grad_nonfinite"] = scatter(nonfinite, n_p, idx)
            total_sq = float(np.sum(host["gsq"].astype(np.float64)))
            scalars["total_grad_norm"] = math.sqrt(total_sq) if total_sq >= 0 else float("nan")
            if "dsq" in host:
                pn = np.sqrt(host["psq"].astype(np.float64))
                with np.errstate(divide="ignore", invalid="ignore"):
                    ratio = np.sqrt(host["dsq"].astype(np.float64)) / pn
                col = scatter(ratio, n_p, idx)
                for k in np.flatnonzero(pn == 0):
                    col[idx[k]] = None  # a zero weight (zero-initialised bias) has no relative update
                param["update_ratio"] = col
        if "clip" in host:
            total, coef = host["clip"]
            scalars["total_grad_norm"] = float(total)
            scalars["clip_coef"] = float(coef)
            scalars["total_grad_norm_post_clip"] = float(total) * float(coef)  # coef is clamped to <= 1
        loss_vals = [float(v) for v in host.get("loss", [])] + [l for l in self._losses if not isinstance(l, torch.Tensor)]
        if loss_vals:
            scalars["loss"] = float(np.mean(loss_vals))
        if self.optimizer is not None and self.optimizer.param_groups:
            lr = self.optimizer.param_groups[0].get("lr")
            if isinstance(lr, (int, float)):
                scalars["lr"] = float(lr)

        first_fwd = None
        if self._flags:
            flags = host["flag"]
            nonfinite_mod = np.zeros(n_m, dtype=bool)
            nonfinite_mod[[i for i, f in zip(self._call_idx, flags) if not math.isfinite(f)]] = True
            module["out_flag_nonfinite"] = [1.0 if nonfinite_mod[i] else 0.0 if i in self._seen else None
                                            for i in range(n_m)]
            first_fwd = next((self._mod_names[i] for i in self._order if nonfinite_mod[i]), None)
            self._host_masks = {i: host[f"mask{i}"] > 0.5 for i in self._masks}
            if self._acts:
                self._aggregate_activations(host, flags, module, vectors)
        first_bwd = None
        if self._bwd:
            sq = np.zeros(n_m)
            for (i, _), v in zip(self._bwd, host["bwd"]):
                sq[i] += float(v) ** 2
            got = set(b[0] for b in self._bwd)
            module["outgrad_norm"] = [math.sqrt(sq[i]) if i in got else None for i in range(n_m)]
            first_bwd = next((self._mod_names[i] for i in self._bwd_order if not math.isfinite(sq[i])), None)
        for i in self._time:
            vectors.setdefault("time_grad_norm", {})[self._mod_names[i]] = [float(v) for v in host[f"time{i}"]]
        if self._order and self._order != self._last_order:
            rec["exec_order"] = [self._mod_names[i] for i in self._order]
            self._last_order = list(self._order)

        rec["scalars"], rec["param"], rec["module"] = scalars, param, module
        if vectors:
            rec["vectors"] = vectors
        loss_bad = "loss" in scalars and not math.isfinite(scalars["loss"])
        # Distributed: which ranks saw it; the same on every rank, so all raise together.
        dist_info = self._dist.nonfinite_info(host) if self._dist is not None else {}
        if first_fwd or first_bwd or bad_params or loss_bad or dist_info:
            info = {"forward": first_fwd, "backward": first_bwd, "params": bad_params,
                    "loss_nonfinite": loss_bad, **dist_info}
            self._write({"event": "nonfinite", "step": self.step_count, **info})
            rec["_nonfinite"] = (f"non-finite values at step {self.step_count}: first forward module "
                                 f"{first_fwd}, first backward module {first_bwd}, parameters "
                                 f"with non-finite gradients {bad_params[:5]}")
        return rec

    def _aggregate_activations(self, host: dict, flags: np.ndarray, module: dict, vectors: dict) -> None:
        """Combine per-call figures into per-module ones (a module may run many times)."""
        n_m = len(self._modules)
        acc: dict[int, list[float]] = {}
        rows = zip(*(host[k] for k in ("a_min", "a_max", "a_norm", "a_bad", "a_extra")))
        for (pos, i, n), row in zip(self._acts, rows):
            mn, mx, norm, bad, extra = (float(v) for v in row)
            total = flags[pos]
            s = acc.setdefault(i, [0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
            # Combine (entries, mean, sum of squared deviations) across calls (Chan et al.).
            mean_c, m2_c = float(total) / n, norm * norm
            if s[0] == 0:
                s[1], s[2] = mean_c, m2_c
            else:
                delta = mean_c - s[1]
                s[2] += m2_c + delta * delta * s[0] * n / (s[0] + n)
                s[1] += delta * n / (s[0] + n)
            s[0] += n                          # entries
            s[3] += bad                        # non-finite entries
            s[4] += extra                      # ReLU: active entries; sigmoid/tanh: saturated
            big = max(abs(mn), abs(mx))
            s[5] = math.nan if math.isnan(big) or math.isnan(s[5]) else max(s[5], big)
        cols: dict[str, list] = {k: [None] * n_m for k in
                                 ("out_mean", "out_std", "out_maxabs", "out_nonfinite")}
        relu = {k: [None] * n_m for k in ("zero_frac", "dead_units", "units", "unit_samples")}
        sat: list = [None] * n_m
        broken = set()
        for i, (n, mean, m2, bad, extra, maxabs) in acc.items():
            cols["out_mean"][i] = mean
            cols["out_std"][i] = math.sqrt(m2 / n) if math.isfinite(m2) else math.nan
            cols["out_maxabs"][i] = maxabs
            cols["out_nonfinite"][i] = bad
            if bad > 0:
                # nan > 0 is false: a non-finite output would read as dead or saturated units
                broken.add(i)
                continue
            kind = self._kinds[i]
            if kind == "relu":
                relu["zero_frac"][i] = 1.0 - extra / n
            elif kind in SATURATION_BOUNDS:
                sat[i] = extra / n
        module.update(cols)
        for i, mask in self._masks.items():
            if i in broken:
                continue
            active = self._host_masks[i]
            relu["dead_units"][i] = float(active.size - active.sum())
            relu["units"][i] = float(active.size)
            relu["unit_samples"][i] = acc[i][0] / active.size   # rows each unit saw this step
            vectors.setdefault("active_mask", {})[self._mod_names[i]] = pack_mask(active)
        if any(v is not None for v in relu["zero_frac"]):
            module.update(relu)
        if any(v is not None for v in sat):
            module["saturated_frac"] = sat

    # ---- output ----------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        clean = {k: v for k, v in record.items() if not k.startswith("_")}
        self._writer.write(clean)
        for s in self._sinks:
            s.write(clean)

    def _internal_error(self, e: Exception) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"gradtrace: monitoring error ignored so training can go on: {e!r}",
                          RuntimeWarning, stacklevel=3)

    @property
    def trace(self) -> Trace:
        """The trace so far: in memory when ``out=None``, else read back from ``out``."""
        if isinstance(self._writer, MemoryWriter):
            return self._writer.trace
        return load(self.out)

    def close(self, exc: BaseException | None = None) -> None:
        """Remove every hook and close the trace. Safe to call twice.

        Example:
            >>> mon.close()      # doctest: +SKIP
        """
        if self._closed:
            return
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._scaler is not None:
            del self._scaler.update                       # restore the scaler's own method
            self._scaler = None
        if exc is not None and self._writer is not None:
            self._writer.write({"event": "exception", "step": getattr(self, "step_count", 0),
                                "type": type(exc).__name__, "message": str(exc)[:2000],
                                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]})
        if self._writer is not None:
            self._writer.close()
        self._snap, self._snap_key = [], None
        for s in self._sinks:
            if hasattr(s, "close"):
                s.close()
        if self._root is not None:
            _WATCHED.discard(self._root)

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(exc)

    def __del__(self) -> None:
        try:
            if not self._closed and sys is not None:
                self.close()
        except Exception:
            pass


def watch(model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **kwargs: Any) -> Monitor:
    """Start recording layer-by-layer statistics of ``model``.

    Args:
        model: the module to watch (a ``torch.compile``'d model works for parameter figures).
        optimizer: steps close on its ``step()``; without one, call ``mon.step()``.
        out: trace directory, or ``None`` to keep the trace in memory (``mon.trace``).
        every: record every N optimizer steps (default 1).
        activations_every: activation and output-gradient statistics every N steps
            (default 10; 0 turns them off).
        layers: which modules: glob (``"encoder.*"``), compiled regex, module type,
            predicate ``(name, module) -> bool``, or a list of these. Default: every leaf.
        preset: ``"economy"``, ``"default"`` or ``"full"`` (overrides the three above).
        backward_flags: also flag non-finite output gradients on non-activation steps.
        time_gradients: for RNN/LSTM/GRU, record the gradient reaching each time step.
        raise_on_nonfinite: raise :class:`NonFiniteError` after a step with nan/inf
            (the trace is written first). Default: record and carry on.
        clip: clip before every optimizer step, sharing the norms with the monitor:
            a max norm (``1.0``), a stateful clipper (``gt.ZClip()``, ``gt.AutoClip()``)
            or any callable taking the list of parameters. Clipping yourself with
            ``gt.clip_grad_norm_`` inside the ``with`` block is fused the same way.
        sinks: extra writers (TensorBoard, W&B, CSV) receiving every record.
        update_ratio: record ||dw||/||w|| on activation steps. This keeps one copy of the
            watched parameters (a reused buffer) while the monitor is open; pass False to
            save that memory on a large model.
        scaler: a ``torch.amp.GradScaler``; steps it skips after an overflow are written
            as ``amp_skip`` events (not recorded as explosions). Figures are always of
            unscaled gradients (``scaler.step`` unscales before ``optimizer.step``).

    Example:
        >>> with gt.watch(model, optimizer, out="runs/exp1") as mon:   # doctest: +SKIP
        ...     for x, y in loader:
        ...         loss = loss_fn(model(x), y)
        ...         mon.record_loss(loss)
        ...         loss.backward(); optimizer.step(); optimizer.zero_grad()
    """
    return Monitor(model, optimizer, **kwargs)
