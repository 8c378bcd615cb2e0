"""Per-module hooks of one activation step: they keep references; figures come in batches.

These hooks exist only while a step records activations (or output-gradient flags, with
``backward_flags=True``): the monitor attaches them when such a step begins and removes
them when it ends, so that every other step runs the model with no per-module hook at
all (a module with a forward hook leaves torch's fast call path, about 5-10 us a call).

A forward hook does no math for an output whose module is known not to change it after
return (below): it keeps a reference to the output (and its version counter). When the
root module's forward returns (or the held outputs pass :data:`HOLD_BYTES`, or the step
ends), the held calls are grouped by (shape, dtype, kind) and :func:`batched.figures`
takes every figure of a group in a few kernels (a group of large outputs is copied into
a kept buffer, one pass per figure: about half the time of per-call figures for 24 calls
of 128 x 256, see bench/activations.py). An output over :data:`HOLD_MAX_BYTES`, and
a module's calls before it is known safe, are measured in the hook, copy-free, by
:func:`batched.call_figures` (one vector per call, stacked in call order before the next
group's rows). Memory: held outputs autograd does not keep anyway (a Linear's output
feeding a ReLU) stay alive until the flush, at most :data:`HOLD_BYTES` of them.

Output gradients of small outputs (under :data:`batched.SMALL_ENTRIES` entries):
``retain_grad()`` (a C++ hook that keeps a copy; no Python runs in the backward for the
call) and one grouped norm per shape when the backward ends (an autograd final callback
queued from one hook on the root's output).
This keeps those outputs and their gradient copies alive until then, at most
:data:`HOLD_BYTES` together. Large outputs, and outputs changed in place (below), get a
Python hook on their autograd node that takes the norm at once.

A reference is only good if nothing changes the tensor in place after the module returned
(``ReLU(inplace=True)`` after a BatchNorm, a residual ``out += x``). So a module's first
calls are measured in the hook, as before, and its outputs' version counters are checked
at the end of that forward: untouched -> its later calls are deferred; changed -> its
figures stay in the hook. A deferred output found changed later (data-dependent code)
loses that call's figures for the step, and the module is measured in the hook from then on.

(Over 400 lines: the forward and backward hooks and the flushes share one step's held
state and its ordering rules; split apart, each half would need the other's internals.)
"""
from __future__ import annotations

import operator
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from . import batched
from .selection import floating_tensors

F32 = torch.float32
#: Held outputs (or gradients) are reduced early once they pass this many bytes.
HOLD_BYTES = 64 << 20
SMALL = batched.SMALL_ENTRIES
#: Outputs up to this many bytes are held for the batched reduction; larger ones are
#: measured in the hook. Held megabytes stay alive through the forward and the model's
#: own allocations then pay page faults: a 6-layer transformer's 0.5-2 MiB outputs held
#: cost +8 ms a step where the 24 x 128 KiB of the MLP gained 2.6 ms (measured, whole step).
HOLD_MAX_BYTES = 256 << 10
_FIGS = ("flag", "a_min", "a_max", "a_norm", "a_extra")
_VERSION = operator.attrgetter("_version")
_engine = torch.autograd.Variable._execution_engine


class _Held:
    """Calls whose tensors wait for a batched reduction (parallel lists)."""

    def __init__(self) -> None:
        self.idx: list[int] = []
        self.tensors: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.bytes = 0

    def add(self, idx: int, t: torch.Tensor, nbytes: int) -> None:
        self.idx.append(idx)
        self.tensors.append(t)
        self.versions.append(t._version)
        self.bytes += nbytes

    def take(self) -> tuple[list[int], list[torch.Tensor], list[int]]:
        """The held calls, and the modules of those changed in place since (dropped)."""
        idx, ts, vs = self.idx, self.tensors, self.versions
        self.__init__()
        if list(map(_VERSION, ts)) == vs:
            return idx, ts, []
        keep = [k for k, (t, v) in enumerate(zip(ts, vs)) if t._version == v]
        changed = [idx[k] for k in range(len(idx)) if ts[k]._version != vs[k]]
        return [idx[k] for k in keep], [ts[k] for k in keep], changed


class StepHooks:
    """The module hooks of the current step and what they gathered.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> h = StepHooks(list(net), [None, "relu"], on_error=print, root=net)
        >>> h.attach(activations=True, backward=False, time_gradients=False)
        >>> _ = net(torch.ones(3, 2)); h.detach()
        >>> h.order, [name for name, _ in h.parts(torch.device("cpu"))]
        ([0, 1], ['flag', 'a_min', 'a_max', 'a_norm', 'a_extra', 'masks'])
    """

    def __init__(self, modules: list[nn.Module], kinds: list[str | None],
                 on_error: Callable[[Exception], None], root: nn.Module | None = None):
        self.modules, self.kinds, self._on_error, self.root = modules, kinds, on_error, root
        self._handles: list[Any] = []
        self._direct: list[dict] = []              # module hook dicts holding self._fns[i]
        # An int key like torch's own handle ids (code that sorts a module's hook keys keeps
        # working), negative so that it never meets one of them (they count up from 0).
        self._key = -id(self)
        self._fns = [partial(self._on_forward, i) for i in range(len(modules))]
        self.active = self.act = self.backward = False
        self._safe: set[int] = set()          # outputs never changed after return: deferred
        self._unsafe: set[int] = set()        # changed in place after return: measured in the hook
        self._grad_unsafe: set[int] = set()   # output gradients changed before the backward's end
        self._units: dict[int, tuple[int, int]] = {}   # ReLU module -> (unit count, run number)
        #: Module index -> dtype name ("float16") of its first floating output, as of the
        #: latest hooked step that saw the module (the diagnosis reads overflow by dtype);
        #: ``dtype_changes`` counts the updates, so the monitor writes them when they happen.
        self.out_dtypes: dict[int, str] = {}
        self.dtype_changes = 0
        self._dtype_of: dict[int, torch.dtype] = {}
        self.reset()

    # ---- lifecycle ----------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous step's figures."""
        self.order: list[int] = []               # first-call order of modules
        self.seen: set[int] = set()
        self.bwd_order: list[int] = []
        self.bwd_seen: set[int] = set()
        self.time: dict[int, list[torch.Tensor]] = {}
        self._fwd, self._learn, self._grads = _Held(), _Held(), _Held()
        self._bwd_queued = self._ret_hooked = False
        # Outputs whose gradient a C++ hook retains (read at the end of the backward).
        self._ret: list[torch.Tensor] = []
        self._ret_idx: list[int] = []
        self._ret_bytes = 0
        # Reduced so far: figure name -> list of 1-D tensors, and per row the module,
        # its entry count; mask rows with their module, unit count and run number.
        self._figs: dict[str, list[torch.Tensor]] = {k: [] for k in _FIGS}
        self.call_idx: list[int] = []
        self._entries: list[int] = []
        self._mask_rows: list[torch.Tensor] = []
        self._mask_meta: list[tuple[int, int, int]] = []
        self._bwd_vals: list[torch.Tensor] = []
        self.bwd_idx: list[int] = []
        # Single calls measured one by one (figure vectors, 0-d gradient norms): stacked
        # into the lists above before anything else is appended, so the order holds.
        self._one: list[torch.Tensor] = []
        self._bwd_one: list[torch.Tensor] = []
        # Filled by parts(): what the assembler needs to read the step's parts.
        self.acts: Any = []
        self.mask_ids: list[int] = []
        self.mask_units: list[int] = []

    @property
    def flags(self) -> bool:
        """Whether any call's forward figures were taken (or are held) this step."""
        return bool(self.call_idx or self._fwd.idx)

    def attach(self, *, activations: bool, backward: bool, time_gradients: bool) -> None:
        """Hook every watched module for this step (once per activation step: O(modules))."""
        self.act, self.backward = activations, backward
        if self.active:
            return
        # A forward hook goes straight into each module's hook dict under this object's key:
        # register_forward_hook builds a handle per call (3-7 us, 1.4 ms a step for 200
        # modules, measured) and these hooks come and go on every activation step.
        key, fns = self._key, self._fns
        for i, m in enumerate(self.modules):
            d = getattr(m, "_forward_hooks", None)
            if isinstance(d, dict):
                d[key] = fns[i]
                self._direct.append(d)
            else:                       # a torch without the dict: the public call
                self._handles.append(m.register_forward_hook(fns[i]))
            if time_gradients and activations and self.kinds[i] == "recurrent":
                self._handles.append(m.register_forward_pre_hook(partial(self._on_rnn_input, i)))
        if self.root is not None:   # after the modules' own: the root's output is final
            self._handles.append(self.root.register_forward_hook(self._on_root_output))
        self.active = True

    def detach(self) -> None:
        """Remove every hook this step attached."""
        key = self._key
        for d in self._direct:
            d.pop(key, None)
        self._direct.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self.active = False

    # ---- the hooks ----------------------------------------------------------------
    def _on_forward(self, idx: int, module: nn.Module, inputs: Any, output: Any) -> None:
        # Forward passes without autograd (evaluation inside a training step, the
        # non-finite replay) are not part of the step being trained.
        if not torch.is_grad_enabled():
            return
        try:
            if isinstance(output, torch.Tensor):   # the common case, without the walk
                tensors = [output] if output.is_floating_point() and output.numel() else []
            else:
                tensors = floating_tensors(output)
            if not tensors:
                return
            if idx not in self.seen:
                self.seen.add(idx)
                self.order.append(idx)
                dt = tensors[0].dtype
                if self._dtype_of.get(idx) is not dt:   # first seen, or autocast switched on
                    self._dtype_of[idx] = dt
                    self.out_dtypes[idx] = str(dt).removeprefix("torch.")
                    self.dtype_changes += 1
            grads = self.act or self.backward
            held = self._fwd
            for t in tensors:
                # Held as returned (no detach: 1-2 us a call); reduced under no_grad.
                nb = t.numel() * t.element_size()
                if nb > HOLD_MAX_BYTES:
                    # Too large to hold: measured now, nothing held or learnt.
                    self._measure(idx, t.detach())
                elif idx in self._safe:
                    held.add(idx, t, nb)
                    if grads and t.requires_grad and t.grad_fn is not None and not t.retains_grad \
                            and t.numel() < SMALL and self._ret_bytes < HOLD_BYTES:
                        # A C++ hook keeps the gradient (a copy): no Python runs in the
                        # backward for this call (2-3x cheaper than a Python hook, measured;
                        # for a large output the copy costs more than the hook).
                        t.retain_grad()
                        self._ret.append(t)
                        self._ret_idx.append(idx)
                        self._ret_bytes += 2 * nb
                        continue
                else:
                    self._measure(idx, t.detach())
                    if idx not in self._unsafe:
                        self._learn.add(idx, t, nb)
                if grads and t.requires_grad:
                    fn = t.grad_fn
                    if fn is None:          # a leaf output: only a tensor hook sees its gradient
                        t.register_hook(partial(self._on_grad, idx))
                    else:                   # the gradient of the output as the module returned it
                        fn.register_prehook(partial(self._on_node_grad, idx, t.output_nr))
            if held.bytes > HOLD_BYTES:
                self.flush_forward()
        except Exception as e:  # a monitoring bug must never stop the user's training
            self._on_error(e)

    def _on_root_output(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if not torch.is_grad_enabled():
            return
        try:
            self.flush_forward()
            if self._ret and not self._ret_hooked:
                # One hook per forward, on the root's output: it queues the read of the
                # retained gradients for the end of the backward.
                outs = [output] if isinstance(output, torch.Tensor) else floating_tensors(output)
                t = next((o for o in outs if o.grad_fn is not None), None)
                if t is not None:
                    self._ret_hooked = True
                    t.grad_fn.register_prehook(self._on_root_grad)
        except Exception as e:
            self._on_error(e)

    def _on_root_grad(self, grads: tuple) -> None:
        if self.active and not self._bwd_queued:
            self._bwd_queued = True
            _engine.queue_callback(self._on_backward_end)

    def _on_node_grad(self, idx: int, nr: int, grads: tuple) -> None:
        g = grads[nr] if nr < len(grads) else None
        if g is not None:
            self._on_grad(idx, g)

    def _on_grad(self, idx: int, grad: torch.Tensor) -> None:
        if not self.active:
            return
        try:
            if idx not in self.bwd_seen:
                self.bwd_seen.add(idx)
                self.bwd_order.append(idx)
            g = grad.detach() if grad.requires_grad else grad   # set only under create_graph
            n = g.numel()
            if idx in self._grad_unsafe or n >= SMALL:
                self._bwd_one.append(torch.linalg.vector_norm(g, dtype=F32))
                self.bwd_idx.append(idx)
                return
            self._grads.add(idx, g, n * g.element_size())
            if not self._bwd_queued:
                self._bwd_queued = True
                _engine.queue_callback(self._on_backward_end)
            if self._grads.bytes > HOLD_BYTES:
                self.flush_grads()
        except Exception as e:
            self._on_error(e)

    def _on_backward_end(self) -> None:
        self._bwd_queued = False
        try:
            self.flush_grads()
        except Exception as e:
            self._on_error(e)

    def _on_rnn_input(self, idx: int, module: nn.Module, args: tuple):
        """Make the sequence input of a recurrent layer report the gradient per time step."""
        if not args or not torch.is_grad_enabled():
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
            if self.active:
                self.time.setdefault(idx, []).append(
                    torch.linalg.vector_norm(g.detach(), dim=dims, dtype=F32))
        x.register_hook(per_step)
        return (x,) + tuple(args[1:])

    # ---- batched reductions ----------------------------------------------------------
    def flush_forward(self) -> None:
        """Reduce the held outputs, and learn which modules' outputs were left unchanged."""
        idx, ts, changed = self._fwd.take()
        for i in changed:
            self._safe.discard(i)
            self._unsafe.add(i)
        if idx:
            self._reduce(idx, ts)
        lidx, _, lchanged = self._learn.take()
        self._unsafe.update(lchanged)
        self._safe.update(i for i in lidx if i not in self._unsafe)

    def _measure(self, idx: int, t: torch.Tensor) -> None:
        """Take one call's figures now (no group: whole-tensor reductions, one vector)."""
        if not self.act:
            self._reduce([idx], [t])
            return
        vec, units = batched.call_figures(t, self.kinds[idx])
        self._one.append(vec)
        self.call_idx.append(idx)
        self._entries.append(t.shape.numel())
        if units is not None:
            u = units.shape[0]
            cur = self._units.get(idx)
            if cur is None or cur[0] != u:   # a new run, as in _reduce
                cur = self._units[idx] = (u, (cur[1] + 1) if cur else 0)
            self._mask_rows.append(units)
            self._mask_meta.append((idx, u, cur[1]))

    def _take_one(self) -> None:
        """Move the single calls' figure vectors into the per-figure lists, in order."""
        if self._one:
            m = torch.stack(self._one)
            self._one = []
            for j, name in enumerate(_FIGS):
                self._figs[name].append(m[:, j])
        if self._bwd_one:
            self._bwd_vals.append(torch.stack(self._bwd_one))
            self._bwd_one = []

    def _reduce(self, idx: list[int], ts: list[torch.Tensor]) -> None:
        self._take_one()
        groups: dict[tuple, list[int]] = {}
        kinds, act = self.kinds, self.act
        runs: dict[int, int] = {}
        for k, (i, t) in enumerate(zip(idx, ts)):
            kind = kinds[i]
            groups.setdefault((t.shape, t.dtype, t.device, kind), []).append(k)
            if act and kind == "relu":
                # In call order: a module called with another unit count starts a new run,
                # and only its last run's calls make its mask (as when masks were per call).
                u = batched.units_of(t.shape)
                cur = self._units.get(i)
                if cur is None or cur[0] != u:
                    cur = self._units[i] = (u, (cur[1] + 1) if cur else 0)
                runs[k] = cur[1]
        figs = self._figs
        for (shape, _, _, kind), pos in groups.items():
            mods = [idx[k] for k in pos] if len(pos) < len(idx) else idx
            with torch.no_grad():       # the outputs are held as returned (not detached)
                out = batched.figures([ts[k] for k in pos], kind, act)
            for name, v in out.items():
                if name in figs:
                    figs[name].append(v)
            self.call_idx.extend(mods)
            self._entries.extend([shape.numel()] * len(mods))
            if "units" in out:
                u = batched.units_of(shape)
                self._mask_rows.append(out["units"].reshape(-1))
                self._mask_meta.extend((i, u, runs[k]) for i, k in zip(mods, pos))

    def flush_grads(self) -> None:
        """Reduce the held output gradients: one grouped norm per (shape, dtype, device)."""
        idx, gs, changed = self._grads.take()
        self._grad_unsafe.update(changed)
        if self._ret:
            got = self._take_retained()
            if got:
                # No hook saw their order: for a chain of modules the backward visits
                # them in reverse call order, so that order names the first non-finite.
                for i in reversed(got[0]):
                    if i not in self.bwd_seen:
                        self.bwd_seen.add(i)
                        self.bwd_order.append(i)
                idx, gs = idx + got[0], gs + got[1]
        self._take_one()
        groups: dict[tuple, list[int]] = {}
        for k, g in enumerate(gs):
            groups.setdefault((g.shape, g.dtype, g.device), []).append(k)
        for pos in groups.values():
            with torch.no_grad():       # retained gradients are not detached
                self._bwd_vals.append(batched.grad_norms([gs[k] for k in pos]))
            self.bwd_idx.extend(idx[k] for k in pos)

    def _take_retained(self) -> tuple[list[int], list[torch.Tensor]] | None:
        """The retained gradients that arrived (cleared from their tensors); outputs that
        got none yet stay for a later backward of the step."""
        grads = [t.grad for t in self._ret]
        if not any(g is not None for g in grads):
            return None
        if not any(g is None for g in grads):      # the common case: all arrived
            for t in self._ret:
                t.grad = None
            idx = self._ret_idx
            self._ret, self._ret_idx = [], []
            self._ret_hooked = False
            return idx, grads
        idx, gs, wait, wait_idx = [], [], [], []
        for i, t, g in zip(self._ret_idx, self._ret, grads):
            if g is None:
                wait.append(t)
                wait_idx.append(i)
            else:
                t.grad = None
                idx.append(i)
                gs.append(g)
        self._ret, self._ret_idx = wait, wait_idx
        self._ret_hooked = False
        return idx, gs

    # ---- the step's device figures ----------------------------------------------------
    def parts(self, dev: torch.device) -> list[tuple[str, torch.Tensor]]:
        """This step's figures as named 1-D float32 tensors on ``dev``; fills ``acts``,
        ``mask_ids`` and ``mask_units`` (per mask row: its module, -1 for a row left out,
        and its unit count) for the assembler."""
        self.flush_forward()
        self.flush_grads()
        self._take_one()
        parts: list[tuple[str, torch.Tensor]] = []
        self.seen = set(self.call_idx)     # a call dropped above was not measured
        if self.call_idx:
            for name in _FIGS:
                if self._figs[name]:
                    parts.append((name, _cat(self._figs[name], dev)))
            if self.act:
                n = len(self.call_idx)
                self.acts = np.stack([np.arange(n), np.asarray(self.call_idx), np.asarray(self._entries)], 1)
        if self._bwd_vals:
            parts.append(("bwd", _cat(self._bwd_vals, dev)))
        if self._mask_rows:
            units = self._units
            self.mask_ids = [i if units[i][1] == run else -1 for i, _, run in self._mask_meta]
            self.mask_units = [u for _, u, _ in self._mask_meta]
            parts.append(("masks", _cat(self._mask_rows, dev)))
        for i, seqs in self.time.items():
            parts.append((f"time{i}", torch.stack([s.to(dev) for s in seqs]).pow(2).sum(0).sqrt()))
        return parts


def _cat(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Concatenate 1-D float32 tensors onto ``device`` (converting only if needed)."""
    if len(values) == 1 and values[0].device == device:
        return values[0]
    if all(v.device == device for v in values):
        return torch.cat(values)
    nb = device.type != "cpu"  # a copy to the host must land before it is read
    return torch.cat([v.to(device=device, non_blocking=nb) for v in values])
