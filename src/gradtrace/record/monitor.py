"""The monitor's lifecycle: attach, one step from forward to record, close.

Over the ~400-line guide because the step lifecycle is one story best read in one place;
the statistics, hooks, copies, record building and replay live in their own modules.

Step lifecycle (with an optimizer; without one, ``mon.step()`` closes a step by hand)::

    root forward pre-hook   keep the inputs and RNG state (StepCapture, for the replay)
    root forward hook       a hook on the output's gradient, which queues the
                            end-of-backward callback (autograd's final callbacks, as DDP)
    end of backward         parameter figures (collectors.PARAM_FIGURES) of the gradient
                            as backward left it: pre-clip, accumulated, unscaled; its
                            norms published to the norm registry for a gradtrace clipper
    optimizer pre-step      (after clip=) whether anyone changed the gradients since
                            (version counters): then the post-clip total (a gradtrace
                            clipper's is derived from its coefficient: no re-measure);
                            a look at the figures if they have landed (never waiting):
                            non-finite -> count, replay the forward to name the first
                            module, flight recorder
    optimizer post-step     update ratios (activation steps), then one flat buffer ->
                            non-blocking copy to the host; a record is written once its
                            copy has landed (this step on CPU, a later one or close())

Module hooks exist only on steps that record activations (or ``backward_flags``).
"""
from __future__ import annotations

import collections
import itertools
import operator
import os
import sys
import time
import traceback
import warnings
import weakref
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from .. import norms
from ..errors import NonFiniteError
from ..trace import MemoryWriter, Trace, TraceWriter, load
from . import distributed
from .assemble import Assembler, StepInfo
from .capture import StepCapture, first_nonfinite_module, rng_state
from .collectors import PARAM_FIGURES, squares
from .hooks import StepHooks
from .reduce import nonfinite_counts
from .selection import SATURATION_BOUNDS, activation_kind, floating_tensors, select
from .transfer import HostCopies

F32, F64 = torch.float32, torch.float64
_engine = torch.autograd.Variable._execution_engine
_GRAD, _VERSION = operator.attrgetter("grad"), operator.attrgetter("_version")
#: Relative error accepted in an update's norm (read as a ratio to a few digits): a
#: parameter update is often tiny, and float32's exact range check would redo most of
#: them in float64 (3.9 ms of a 20 ms step on bench/overhead.py's 24-layer MLP, measured).
UPDATE_RTOL = 1e-4

#: Named trade-offs between cost and insight (pass ``preset=`` to :func:`watch`).
PRESETS: dict[str, dict[str, Any]] = {
    # every 10th step, activations every 100th: near-free on any model
    "economy": {"every": 10, "activations_every": 100, "backward_flags": False},
    # the defaults: gradient norms every step, activations (and max|g|, |w|) every 10th
    "default": {"every": 1, "activations_every": 10, "backward_flags": False},
    # everything every step, including output-gradient non-finite flags
    "full": {"every": 1, "activations_every": 1, "backward_flags": True},
}

# Models currently watched; a WeakSet keeps no model alive and puts nothing on it.
_WATCHED: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


def _weak(method: Any) -> Any:
    """A callable that calls ``method`` while its object lives, holding it weakly."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        m = ref()
        if m is not None:
            m(*args)
    return call


def _make_clipper(clip: Any):
    # A max norm given as a number is turned into gradtrace's clipper by gt.watch (api.py):
    # the recorder takes only callables, so it never imports the remedies.
    if clip is None or callable(clip):
        return clip
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

    Create it with :func:`watch` (its docstring lists the arguments). Use as a context
    manager, or call :meth:`close`. ``monitor.capture`` is the latest forward's
    :class:`~gradtrace.record.capture.StepCapture`.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.ReLU())
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with Monitor(net, opt) as mon:
        ...     net(torch.ones(4, 3)).sum().backward(); opt.step()
        >>> len(mon.trace)
        1
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                 out: str | None = None, every: int = 1, activations_every: int = 10,
                 layers: Any = None, preset: str | None = None, backward_flags: bool = False,
                 time_gradients: bool = False, raise_on_nonfinite: bool = False,
                 clip: Any = None, sinks: Iterable[Any] = (), fsync: bool = False,
                 scaler: Any = None, update_ratio: bool = True, flight_recorder: bool = True,
                 resume: bool = False, overwrite: bool = False):
        # Everything close() touches exists before anything can fail.
        self._closed, self._handles, self._sinks, self._writer = False, [], [], None
        self._scaler, self._scaler_update, self._stepped = None, None, False
        self._snap: list[torch.Tensor] = []
        self._snap_key: tuple | None = None
        self._root = None
        self._queue: collections.deque = collections.deque()
        self._hooks: StepHooks | None = None
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
        self.flight_recorder = bool(flight_recorder)
        self.time_gradients = bool(time_gradients)
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
        self._sharded = any(distributed.is_dtensor(p) for p in self._params)
        # Dense parameters of one dtype on one device (the usual case): their gradients
        # are measured in one foreach call, without grouping them in Python each step.
        self._uniform = not self._sharded and len({(p.device, p.dtype, p.layout) for p in self._params}) <= 1
        self._all_idx = list(range(len(self._params)))
        self._assembler = Assembler(self._param_names, self._mod_names, self._kinds)
        self._copies = HostCopies()
        self._hooks = StepHooks(self._modules, self._kinds, self._internal_error, root=root)

        # Cross-rank reductions when a process group is active (DDP, FSDP2); else None.
        self._dist = distributed.attach(model, self._params)
        self.step_count = 0           # optimizer steps closed so far (index of the current step)
        self.capture: StepCapture | None = None
        self._last_order: list[int] | None = None
        self._dtypes_written = 0      # StepHooks.dtype_changes already written to the trace
        self._flight_done = False
        self._replaying = False
        meta = self._meta(root, layers, out, preset)
        if self._dist is not None:
            meta["distributed"] = self._dist.meta()
            if not self._dist.is_writer:          # one trace, written by rank 0
                out, sinks = None, ()
        self.out = out
        _WATCHED.add(root)
        self._root = root
        try:
            if out is None:
                self._writer = MemoryWriter(meta)
            else:
                flags = {k: True for k, v in (("resume", resume), ("overwrite", overwrite)) if v}
                self._writer = TraceWriter(out, meta, fsync=fsync, **flags)
                self.step_count = int(getattr(self._writer, "next_step", 0) or 0) if resume else 0
            for s in sinks:
                if hasattr(s, "start"):
                    s.start(meta)
                self._sinks.append(s)
            self._attach()
            if scaler is not None:
                self._watch_scaler(scaler)
        except Exception:
            self.close()
            raise
        self._begin_step()

    # ---- setup ------------------------------------------------------------------------
    def _meta(self, root, layers, out, preset) -> dict:
        from .. import __version__

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
                       "backward_flags": self.backward_flags, "time_gradients": self.time_gradients,
                       "out": None if out is None else str(out)},
            "saturation_bounds": SATURATION_BOUNDS,
            "modules": [{"name": n, "type": type(m).__name__, "activation": k,
                         "params": [p for p, o in owner.items() if o == n]}
                        for n, m, k in zip(self._mod_names, self._modules, self._kinds)],
            "params": [{"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", ""),
                        "module": owner.get(n, n.rpartition(".")[0])}
                       for n, p in zip(self._param_names, self._params)],
        }

    def _attach(self) -> None:
        if self.compiled:
            warnings.warn("gradtrace: the model is torch.compile'd; module hooks would break its "
                          "graphs, so activation statistics are skipped. Parameter-gradient "
                          "statistics, clipping and the guard work as usual.", stacklevel=4)
        # Two hooks on what the user calls, on every step: O(1), whatever the model's size.
        self._handles.append(self.model.register_forward_pre_hook(self._on_root_input, with_kwargs=True))
        self._handles.append(self.model.register_forward_hook(self._on_root_output))
        # Models whose root is never called (a ModuleDict whose parts are called one by
        # one): the first and last parameters also signal a backward (O(1) hooks).
        ends = {id(p): p for p in self._params[:1] + self._params[-1:] if p.requires_grad}
        for p in ends.values():   # held weakly: a tensor's hooks live in C++, out of gc's sight
            self._handles.append(p.register_post_accumulate_grad_hook(_weak(self._on_param_grad)))
        if self.optimizer is not None:
            self._handles.append(self.optimizer.register_step_pre_hook(self._on_pre_step))
            self._handles.append(self.optimizer.register_step_post_hook(self._on_post_step))
        # Listening to the norm registry is what lets a gradtrace clipper reuse the norms
        # published at the end of backward, and publish its post-clip ones (pre * coef)
        # that _check_changed reads back: neither reads a gradient again.
        self._handles.append(norms.register(self._on_clipped))

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
        want = not self.compiled and self._rec and (self._act or self.backward_flags or self._dist is not None)
        if want or self._hooks.active:        # a step without module hooks gathers nothing
            self._hooks.reset()
        prev = self._bwd.get("early") if getattr(self, "_bwd", None) else None
        if prev is not None and prev.ready():   # a skipped step's: its buffer goes back
            self._copies.release(prev)
        # Under a process group the forward flags stay on every recorded step: a replay
        # would have to run on every rank together, and FSDP2 ranks judge their own shards.
        if want:
            self._hooks.attach(activations=self._act, backward=self.backward_flags,
                               time_gradients=self.time_gradients)
        elif self._hooks.active:
            self._hooks.detach()
        self._losses: list[Any] = []
        self._queued = False
        self._bwd: dict[str, Any] | None = None    # end-of-backward figures
        self._post: torch.Tensor | None = None     # squared total after a change
        self._old: list[torch.Tensor] | None = None
        self._looked = self._checked = False
        self._info = StepInfo(step=s, time=0.0, idx=[])

    def _on_root_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._closed or self._replaying or not torch.is_grad_enabled():
            return
        # A reference, not a copy: the inputs stay alive until the next forward.
        self.capture = StepCapture(self.step_count, args, kwargs, rng_state())

    def _on_root_output(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._closed or self._replaying or not self._rec or not torch.is_grad_enabled():
            return
        try:
            outs = [output] if isinstance(output, torch.Tensor) else floating_tensors(output)
            for t in outs:
                if t.requires_grad:
                    t.register_hook(self._on_backward_start)
        except Exception as e:
            self._internal_error(e)

    def _on_param_grad(self, param: torch.Tensor) -> None:
        if self._rec and not self._replaying:
            self._on_backward_start(param)

    def _on_backward_start(self, grad: torch.Tensor) -> None:
        if not self._queued and not self._closed:
            self._queued = True
            _engine.queue_callback(self._after_other_callbacks)

    def _after_other_callbacks(self) -> None:
        # Queued again, so it runs after every callback queued during this backward
        # (DDP's reducer queues its finalisation there: then the gradients are reduced).
        _engine.queue_callback(self._on_backward_end)

    def _on_backward_end(self) -> None:
        self._queued = False
        if self._closed or not self._rec:
            return
        try:
            self._take_grad_figures()       # every backward of the step; the last one stays
        except Exception as e:
            self._internal_error(e)

    def _take_grad_figures(self) -> None:
        grads = list(map(_GRAD, self._params))          # C-level loops: O(1) Python calls
        if any(map(operator.is_, grads, itertools.repeat(None))):   # (`in` would call ==)
            present = list(map(operator.is_not, grads, itertools.repeat(None)))
            idx = list(itertools.compress(range(len(grads)), present))
            grads = list(itertools.compress(grads, present))
        else:
            idx = self._all_idx
        local = [distributed.local(g) for g in grads] if self._sharded else grads  # FSDP2: shards
        params = self._values(idx) if self._act else []
        parts: dict[str, torch.Tensor] = {}
        versions = list(map(_VERSION, local))
        published = None
        if grads:
            with torch.no_grad():           # the parameters are read as they are
                for fig in PARAM_FIGURES:
                    if fig.every_step or self._act:
                        parts[fig.part] = fig.compute(local, params, self._device, self._uniform)
            if not self._sharded:           # for a clipper of these very gradients
                published = norms.publish(local, parts["gsq"], 2.0, versions=versions, squared=True)
            inv = self._inverse_scale()
            if inv is not None:             # GradScaler: figures of the unscaled gradient
                parts["gsq"] = parts["gsq"] * inv.square()
                if "gmax" in parts:
                    parts["gmax"] = parts["gmax"] * inv.to(F32)
        early, n_losses = None, 0
        if grads and self._dist is None:
            losses = [l for l in self._losses if isinstance(l, torch.Tensor)]
            n_losses = len(losses)
            head = [parts["gsq"]]
            if n_losses == 1 and losses[0].device == self._device:
                head.append(losses[0].reshape(1))      # cat widens it to float64
            elif losses:
                head.append(torch.stack(losses).sum().reshape(1).to(self._device, F64))
            early = self._copies.start(torch.cat(head))
        prev = self._bwd.get("early") if self._bwd is not None else None
        if prev is not None and prev.ready():      # an earlier micro-batch's: superseded
            self._copies.release(prev)
        # "published" keeps the published norms valid for this step (the registry holds
        # them weakly): a new backward or the next step withdraws them.
        self._bwd = {"idx": idx, "grads": grads, "versions": versions, "parts": parts,
                     "early": early, "early_losses": n_losses, "published": published}

    def _on_clipped(self, grads: list, pre: Any, total: torch.Tensor, coef: Any, norm_type: float) -> None:
        """The norm registry's observer: nothing to do here, since a gradtrace clipper
        publishes its post-clip norms and :meth:`_check_changed` reads them back; being
        registered is what turns the sharing on."""

    def _inverse_scale(self) -> torch.Tensor | None:
        scaler = self._scaler
        scale = getattr(scaler, "_scale", None) if scaler is not None and scaler.is_enabled() else None
        return None if scale is None else scale.to(self._device, F64).reciprocal()

    def _before_update(self, check_changes: bool = True) -> None:
        """Everything that must happen before the optimizer applies the step (idempotent)."""
        if self._closed or not self._rec:
            return
        try:
            if self._bwd is None:
                # No backward went through the root's output (a sub-module called
                # directly, a compiled wrapper...): the gradients as they are now.
                self._take_grad_figures()
            if not self._looked:
                self._looked = True
                self._look()
            if self._act and self.update_ratio and self.optimizer is not None and self._old is None:
                self._old = self._snapshot()
            if check_changes and not self._checked:
                self._checked = True
                self._check_changed()
        except Exception as e:
            self._internal_error(e)

    def _check_changed(self) -> None:
        """Record the total the optimizer will see if anyone changed the gradients."""
        b = self._bwd
        params = self._params if b["idx"] is self._all_idx else map(self._params.__getitem__, b["idx"])
        now = list(map(_GRAD, params))
        # Version counters of the local tensors (FSDP2: the shard a clipper scales).
        loc = distributed.local
        if all(map(operator.is_, now, b["grads"])):
            versions = list(map(_VERSION, map(loc, now) if self._sharded else now))
            if versions == b["versions"]:
                return
        got = list(itertools.compress(now, map(operator.is_not, now, itertools.repeat(None))))
        if self._sharded and any(distributed.is_dtensor(g) for g in got):
            # Full norms of the shards (one collective; every rank changed its shards alike).
            post = torch.stack([loc(n).to(self._device, F64) for n in norms.grad_norms(got)]).square().sum()
        else:
            # After gradtrace's own clip, its post-clip norms (published: the ones of
            # backward times its coefficient); only a foreign change is measured again.
            known = norms.recall(got, 2.0)
            post = known.to(self._device, F64).square().sum() if known is not None else \
                squares(got, self._device, self._uniform).sum()
        self._post = post.reshape(1)

    def _look(self) -> None:
        """Read the end-of-backward figures if they have landed (never waits): on a
        non-finite step count, replay, and write the flight-recorder bundle."""
        b, info = self._bwd, self._info
        early = b.get("early") if b else None
        if early is None:
            return
        if not early.ready():
            info.replay_note = "figures not on the host before the optimizer step: not replayed"
            return
        vals = early.values
        if np.isfinite(vals).all():       # the usual step: one numpy call
            return
        n = len(b["idx"])
        gsq, loss = vals[:n], vals[n:]
        bad = np.flatnonzero(~np.isfinite(gsq))
        loss_bad = bool(loss.size and not np.isfinite(loss).all())
        # (Finite gradients gave finite squares: the norm engine keeps float32's range.)
        # The copy stays with the step: on a step whose record holds nothing else it is
        # the record's copy too (_finish_step), else it is released there.
        info.counted = True
        for k, c in zip(bad, nonfinite_counts([distributed.local(b["grads"][k]) for k in bad])):
            info.counts[int(k)] = c
        cap = self.capture
        fresh = cap is not None and cap.step == self.step_count
        if fresh and not (self._hooks.active and self._hooks.flags) and self._dist is None:
            self._replaying = True
            try:
                info.replayed = first_nonfinite_module(self.model, self._modules, self._mod_names, cap)
            finally:
                self._replaying = False
        elif not fresh:
            info.replay_note = "no forward of this step was captured: not replayed"
        if self.flight_recorder and not self._flight_done and self.out is not None and fresh:
            self._flight_done = True
            self._save_flight(cap, "nonfinite_loss" if loss_bad and not len(bad) else "nonfinite_grad")

    def _save_flight(self, cap: StepCapture, reason: str) -> None:
        try:
            import importlib
            flight = importlib.import_module("gradtrace.record.flight")
        except ImportError:
            return
        try:
            flight.save_bundle(os.path.join(str(self.out), "flight"), model=distributed.unwrap(self._root),
                               optimizer=self.optimizer, capture=cap, step=self.step_count, reason=reason)
        except Exception as e:     # the bundle is a help; it must never stop training
            self._internal_error(e)

    def _values(self, idx: list[int]) -> list[torch.Tensor]:
        """The watched parameters at ``idx`` as tensors to read (FSDP2: the local shards).

        The parameters themselves, not ``detach()``-ed aliases (a new tensor object each,
        7 us apiece right after a backward, measured): every reader runs under no_grad."""
        if self._sharded:
            return [distributed.local(self._params[i].detach()) for i in idx]
        return self._params if idx is self._all_idx else list(map(self._params.__getitem__, idx))

    def _snapshot(self) -> list[torch.Tensor]:
        """Copy the parameters before the optimizer step, into buffers reused across steps."""
        idx = self._bwd["idx"] if self._bwd else []
        params = self._values(idx)
        key = tuple(idx)
        if self._snap_key != key:
            self._snap = [torch.empty_like(p, requires_grad=False) for p in params]
            self._snap_key = key
        if params:
            with torch.no_grad():
                torch._foreach_copy_(self._snap, params)
        return self._snap

    def _on_pre_step(self, optimizer, args, kwargs) -> None:
        if self._clipper is not None and self._rec and not self._closed and self._bwd is None:
            self._before_update(check_changes=False)   # figures before clip= scales the grads
        if self._clipper is not None and not self._closed:
            # Every parameter the optimizer updates, not only the watched layers.
            self._clipper([p for g in optimizer.param_groups for p in g["params"] if p.grad is not None])
        self._before_update()

    def _on_post_step(self, optimizer, args, kwargs) -> None:
        if self._closed:
            return
        self._stepped = True
        try:
            if self._rec:
                self._before_update()       # frameworks without optimizer hooks
                self._finish_step_safely()
            else:
                self._drain()
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

    def _finish_step(self) -> None:
        dev, b, info = self._device, self._bwd or {"idx": [], "parts": {}}, self._info
        losses = [l for l in self._losses if isinstance(l, torch.Tensor)]
        hooks = self._hooks if self._hooks.active else None    # module hooks ran this step
        hook_parts = hooks.parts(dev) if hooks is not None else []
        # A gradient-only step holds what the end of backward already sent to the host:
        # the squared norms and, if one loss was noted before backward ended, that loss.
        # That copy is then this record's copy: no second flat buffer, no second copy.
        early, b["early"] = b.get("early"), None
        if early is not None and not (not hook_parts and self._post is None and not self._old
                                      and len(b["parts"]) == 1 and len(losses) <= 1
                                      and len(losses) == b.get("early_losses")):
            if early.ready():
                self._copies.release(early)
            early = None
        parts: list[tuple[str, torch.Tensor]] = list(b["parts"].items())
        if early is None:
            if self._old is not None and self._old:
                with torch.no_grad():                        # old - new, in the snapshot buffer
                    torch._foreach_sub_(self._old, self._values(b["idx"]))
                parts.append(("dsq", norms.norm_vector(self._old, 2.0, device=dev, uniform=self._uniform,
                                                       wide=True, rtol=UPDATE_RTOL).square()))
            if self._post is not None:
                parts.append(("post", self._post))
            if losses:
                parts.append(("loss", torch.stack([l.reshape(()).to(dev, F32) for l in losses])))
            parts += hook_parts
        if self._dist is not None:
            parts = self._dist.reduce(parts, b["idx"])
        info.time, info.idx = time.time(), b["idx"]
        info.losses = [float(l) for l in self._losses if not isinstance(l, torch.Tensor)]
        lr = self.optimizer.param_groups[0].get("lr") if self.optimizer is not None and self.optimizer.param_groups else None
        info.lr = float(lr) if isinstance(lr, (int, float)) else None
        if hooks is not None:
            info.call_idx, info.acts, info.order, info.seen = hooks.call_idx, hooks.acts, hooks.order, hooks.seen
            info.bwd, info.bwd_order = hooks.bwd_idx, hooks.bwd_order
            info.mask_ids, info.mask_units, info.time_ids = hooks.mask_ids, hooks.mask_units, list(hooks.time)
        layout = [(name, t.numel()) for name, t in parts]
        if early is not None:               # gsq, then the loss: the early copy's order
            layout += [("loss", 1)] * len(losses)
            copy = early
        else:
            copy = self._copies.start(torch.cat([t.reshape(-1).to(F64) for _, t in parts])) if parts else None
        self._queue.append((copy, layout, info))
        self._drain(wait=bool(self.raise_on_nonfinite))

    def _drain(self, wait: bool = False) -> None:
        """Write every queued record whose copy has landed (all of them when ``wait``)."""
        while self._queue:
            copy, layout, info = self._queue[0]
            if copy is not None and not copy.ready():
                if not wait:
                    return
                copy.wait()
            self._queue.popleft()
            host: dict[str, np.ndarray] = {}
            off = 0
            for name, size in layout:
                host[name] = copy.values[off: off + size]
                off += size
            try:
                dist_info = self._dist.nonfinite_info(host) if self._dist is not None else None
                rec, event = self._assembler.build(host, info, dist_info)
            finally:
                if copy is not None:
                    self._copies.release(copy)
            if info.order and info.order != self._last_order:
                rec["exec_order"] = [self._mod_names[i] for i in info.order]
                self._last_order = list(info.order)
            hooks = self._hooks
            if hooks.dtype_changes != self._dtypes_written:
                rec["out_dtypes"] = {self._mod_names[i]: d for i, d in hooks.out_dtypes.items()}
                self._dtypes_written = hooks.dtype_changes
            if event is not None:
                self._write(event)
            self._write(rec)
            if self.raise_on_nonfinite and event is not None:
                raise NonFiniteError(f"non-finite values at step {info.step}: first forward module "
                                     f"{event['forward']}, first backward module {event['backward']}, "
                                     f"parameters with non-finite gradients {event['params'][:5]}")

    @property
    def recording(self) -> bool:
        """Whether the current step is recorded (``every`` / ``activations_every``).

        Example:
            >>> with Monitor(torch.nn.Linear(2, 1), every=3) as mon:
            ...     mon.recording
            True
        """
        return self._rec and not self._closed

    # ---- driving the step from a framework ----------------------------------------------
    # Trainers that clip between backward and optimizer.step() (Lightning, Transformers)
    # watch without optimizer hooks and call these instead. The figures themselves are
    # taken at the end of backward either way.
    def collect(self) -> None:
        """Before the framework clips: make sure this step's gradient figures exist (taken
        now if no backward went through the model's output) and look at them.

        Example:
            >>> net = torch.nn.Linear(2, 1); mon = Monitor(net)
            >>> net(torch.ones(1, 2)).sum().backward()
            >>> mon.collect(); mon.note_clipped(); mon.finish(); len(mon.trace)
            1
        """
        self._before_update(check_changes=False)

    def note_clipped(self) -> None:
        """Just before the optimizer step: if the gradients changed since backward (the
        framework clipped), record the total the optimizer sees (on the device).

        Example:
            >>> net = torch.nn.Linear(2, 1); mon = Monitor(net)
            >>> net(torch.ones(1, 2)).sum().backward(); _ = net.weight.grad.mul_(0.5)
            >>> mon.note_clipped(); mon.finish()
            >>> float(mon.trace.series("grad_changed_ratio")[0]) < 1
            True
        """
        self._before_update()

    def finish(self) -> None:
        """Close the step after the optimizer stepped: one record (if this step records).

        Example:
            >>> net = torch.nn.Linear(2, 1); mon = Monitor(net)
            >>> net(torch.ones(1, 2)).sum().backward(); mon.finish(); len(mon.trace)
            1
        """
        self._on_post_step(self.optimizer, (), {})

    def skip_step(self, kind: str = "skip", **data: Any) -> None:
        """Close the current step without recording it, writing a ``kind`` event instead.

        For a step whose update was not applied (``gt.Guard`` skipping a non-finite or
        spiking step, a ``GradScaler`` overflow): its statistics are dropped so the next
        batch starts a fresh step, and the event carries this step's number.

        Example:
            >>> mon = Monitor(torch.nn.Linear(2, 1))
            >>> mon.skip_step("guard_skip", reason="nonfinite_grad"); mon.step_count
            1
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
            >>> net = torch.nn.Linear(2, 1); mon = Monitor(net)
            >>> net(torch.ones(1, 2)).sum().backward(); mon.step(); mon.close()
        """
        if self._closed:
            raise RuntimeError("this monitor is closed; start a new one with gt.watch(...)")
        if self.optimizer is not None:
            raise RuntimeError("this monitor closes steps on optimizer.step(); do not call mon.step() too")
        self._on_post_step(None, (), {})

    def record_loss(self, loss: torch.Tensor | float) -> None:
        """Note this step's loss without a host sync (several calls in one step average).

        Example:
            >>> mon = Monitor(torch.nn.Linear(2, 1)); mon.record_loss(torch.tensor(0.5))
        """
        if self._rec and not self._closed:
            # A per-example loss vector is averaged (on the device: no sync); a float32
            # scalar is copied (later in-place changes to the user's tensor, or a reused
            # buffer it views, must not reach the record).
            if isinstance(loss, torch.Tensor):
                loss = loss.detach()
                loss = loss.clone() if loss.dim() == 0 and loss.dtype == F32 else loss.float().mean()
                self._losses.append(loss)
            else:
                self._losses.append(float(loss))

    def log_event(self, kind: str, step: int | None = None, **data: Any) -> None:
        """Write an event (a guard skip, a note) into the trace at this step.

        Example:
            >>> mon = Monitor(torch.nn.Linear(2, 1)); mon.log_event("note", text="lr lowered")
            >>> mon.trace.events("note")[0]["text"]
            'lr lowered'
        """
        if self._closed:
            return
        self._write({"event": kind, "step": self.step_count if step is None else step, **data})

    # ---- output ----------------------------------------------------------------------------
    def _write(self, record: dict) -> None:
        self._writer.write(record)
        for s in self._sinks:
            s.write(record)

    def _internal_error(self, e: Exception) -> None:
        if not getattr(self, "_warned", False):
            self._warned = True
            warnings.warn(f"gradtrace: monitoring error ignored so training can go on: {e!r}",
                          RuntimeWarning, stacklevel=3)

    @property
    def trace(self) -> Trace:
        """The trace so far: in memory when ``out=None``, else read back from ``out``.

        Records whose copy to the host has not landed yet (on an accelerator) appear at a
        later step or at :meth:`close`.

        Example:
            >>> len(Monitor(torch.nn.Linear(2, 1)).trace)
            0
        """
        if isinstance(self._writer, MemoryWriter):
            return self._writer.trace
        return load(self.out)

    def close(self, exc: BaseException | None = None) -> None:
        """Write the records still in flight, remove every hook, close the trace. Safe twice.

        Example:
            >>> mon = Monitor(torch.nn.Linear(2, 1)); mon.close(); mon.close()
        """
        if self._closed:
            return
        try:
            if self._writer is not None:
                self._drain(wait=True)
        except Exception as e:                 # NonFiniteError included: it was written
            if not isinstance(e, NonFiniteError):
                self._internal_error(e)
        self._closed = True
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._hooks is not None:
            self._hooks.detach()
        if self._scaler is not None:
            del self._scaler.update                       # restore the scaler's own method
            self._scaler = None
        if exc is not None and self._writer is not None:
            self._writer.write({"event": "exception", "step": getattr(self, "step_count", 0),
                                "type": type(exc).__name__, "message": str(exc)[:2000],
                                "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-8000:]})
        elif self._writer is not None:
            # The run's closing marker: a reader following the trace (doctor --follow)
            # stops at once instead of waiting out its idle time.
            self._writer.write({"event": "end", "step": max(self.step_count - 1, 0), "time": time.time()})
        if self._writer is not None:
            self._writer.close()
        self._snap, self._snap_key, self.capture = [], None, None
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
        resume / overwrite: what to do when ``out`` already holds a trace: continue it
            (step numbers go on from its last step) or replace it; without either, an
            existing trace is an error.
        every: record every N optimizer steps (default 1).
        activations_every: activation and output-gradient statistics, max|g| and
            parameter norms every N steps (default 10; 0 turns them off). Gradient norms
            are taken on every recorded step.
        layers: which modules: glob (``"encoder.*"``), compiled regex, module type,
            predicate ``(name, module) -> bool``, or a list of these. Default: every leaf.
        preset: ``"economy"``, ``"default"`` or ``"full"`` (overrides the three above).
        backward_flags: also flag non-finite output gradients on non-activation steps.
        time_gradients: for RNN/LSTM/GRU, record the gradient reaching each time step.
        raise_on_nonfinite: raise :class:`NonFiniteError` after a step with nan/inf
            (the trace is written first). On an accelerator this waits for each recorded
            step's figures to reach the host: one sync per recorded step.
        clip: clip before every optimizer step: a stateful clipper (``gt.ZClip()``,
            ``gt.AutoClip()``) or any callable taking the list of parameters; ``gt.watch``
            also takes a max norm (``1.0``) and turns it into ``gt.clip_grad_norm_``.
        sinks: extra writers (TensorBoard, W&B, CSV) receiving every record and event.
        update_ratio: record ||dw||/||w|| on activation steps. This keeps one copy of the
            watched parameters (a reused buffer) while the monitor is open; pass False to
            save that memory on a large model.
        scaler: a ``torch.amp.GradScaler``; figures are of the unscaled gradients, and
            steps it skips after an overflow are written as ``amp_skip`` events.
        flight_recorder: on the first non-finite step, before the optimizer applies it,
            write a replay bundle into ``out/flight`` (default True; needs ``out``).

    Gradient figures are those of the gradient backward left (accumulated over
    micro-batches, unscaled, DDP-reduced), whoever clips later; when the gradients
    changed before the optimizer step, ``total_grad_norm_post_clip`` and
    ``grad_changed_ratio`` say what the optimizer saw.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
        >>> opt = torch.optim.SGD(net.parameters(), lr=0.1)
        >>> with watch(net, opt) as mon:
        ...     for _ in range(3):
        ...         loss = net(torch.randn(8, 3)).pow(2).mean()
        ...         mon.record_loss(loss)
        ...         loss.backward(); opt.step(); opt.zero_grad()
        >>> mon.trace.steps_recorded.tolist()
        [0, 1, 2]
    """
    return Monitor(model, optimizer, **kwargs)
