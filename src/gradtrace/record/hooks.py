"""Per-module hooks of one activation step: output figures, output-gradient norms, time steps.

These hooks exist only while a step records activations (or output-gradient flags, with
``backward_flags=True``): the monitor attaches them when such a step begins and removes
them when it ends, so that every other step runs the model with no per-module hook at
all (a module with a forward hook leaves torch's fast call path, about 5-10 us a call).

Per module call, on the device: the output's sum (a non-finite flag: nan and inf
propagate, so it also says whether the call held a nan/inf: counting the entries,
``count_nonzero(td * 0)``, cost 0.2-0.4 ms per 128 x 256 output on CPU, more than every
other figure of the call together) and on activation steps min/max, the spread about the
call's own mean and, by kind, active ReLU entries and units or saturated entries. Calls are kept as columns so the step's end stacks a handful of lists.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from .selection import SATURATION_BOUNDS, floating_tensors, unit_view

F32 = torch.float32


class StepHooks:
    """The module hooks of the current step and what they gathered.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())
        >>> h = StepHooks(list(net), [None, "relu"], on_error=print)
        >>> h.attach(activations=True, backward=False, time_gradients=False)
        >>> _ = net(torch.ones(3, 2)); h.detach()
        >>> h.order
        [0, 1]
    """

    def __init__(self, modules: list[nn.Module], kinds: list[str | None],
                 on_error: Callable[[Exception], None]):
        self.modules, self.kinds, self._on_error = modules, kinds, on_error
        self._handles: list[Any] = []
        self.active = self.act = self.backward = False
        self.reset()

    # ---- lifecycle ----------------------------------------------------------------
    def reset(self) -> None:
        """Forget the previous step's figures."""
        self.call_idx: list[int] = []            # module index of each call
        self.flags: list[torch.Tensor] = []      # each call's output sum (device)
        self.acts: list[tuple[int, int, int]] = []   # (call position, module idx, entries)
        self.cols: tuple[list, ...] = ([], [], [], [])  # min, max, norm, extra
        self.bwd: list[tuple[int, torch.Tensor]] = []    # (module idx, output-grad norm)
        self.order: list[int] = []               # first-call order of modules
        self.seen: set[int] = set()
        self.bwd_order: list[int] = []
        self.bwd_seen: set[int] = set()
        self.masks: dict[int, torch.Tensor] = {}
        self.time: dict[int, list[torch.Tensor]] = {}

    def attach(self, *, activations: bool, backward: bool, time_gradients: bool) -> None:
        """Hook every watched module for this step (once per activation step: O(modules))."""
        self.act, self.backward = activations, backward
        if self.active:
            return
        for i, m in enumerate(self.modules):
            self._handles.append(m.register_forward_hook(partial(self._on_forward, i)))
            if time_gradients and activations and self.kinds[i] == "recurrent":
                self._handles.append(m.register_forward_pre_hook(partial(self._on_rnn_input, i)))
        self.active = True

    def detach(self) -> None:
        """Remove every hook this step attached."""
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
            for t in tensors:
                td = t.detach()
                self.call_idx.append(idx)
                # A sum is finite iff every entry is: one cheap kernel, and on activation
                # steps it doubles as the first moment.
                self.flags.append(self._activation_stats(idx, td) if self.act else td.sum(dtype=F32))
                if t.requires_grad and (self.act or self.backward):
                    t.register_hook(partial(self._on_out_grad, idx))
        except Exception as e:  # a monitoring bug must never stop the user's training
            self._on_error(e)

    def _activation_stats(self, idx: int, td: torch.Tensor) -> torch.Tensor:
        """Queue this call's activation figures; return its sum (reused as the flag)."""
        kind = self.kinds[idx]
        mn, mx = td.aminmax()
        total = td.sum(dtype=F32)
        # Norm about the call's own mean: the spread survives a large offset (100 + 1e-3 x),
        # where E[x^2] - E[x]^2 in float32 would cancel to zero.
        norm = torch.linalg.vector_norm(td - total / td.numel(), dtype=F32)
        # Counts below use sign() and a sum: 3x faster than count_nonzero on CPU (measured).
        if kind == "relu":
            extra = td.sign().sum(dtype=F32)                   # active entries (outputs >= 0)
            active = unit_view(td).amax(0) > 0                 # units that fired at least once
            prev = self.masks.get(idx)
            self.masks[idx] = active if prev is None or prev.shape != active.shape else prev | active
        elif kind in SATURATION_BOUNDS:
            lo, hi = SATURATION_BOUNDS[kind]                   # symmetric about their middle
            extra = (td - (lo + hi) / 2).abs_().sub_((hi - lo) / 2).sign_().clamp_(min=0).sum(dtype=F32)
        else:
            extra = total  # placeholder of the right dtype and device; ignored for this kind
        self.acts.append((len(self.flags), idx, td.numel()))  # the flag about to be appended
        for col, v in zip(self.cols, (mn, mx, norm, extra)):
            col.append(v)
        return total

    def _on_out_grad(self, idx: int, grad: torch.Tensor) -> None:
        if not self.active:
            return
        try:
            if idx not in self.bwd_seen:
                self.bwd_seen.add(idx)
                self.bwd_order.append(idx)
            self.bwd.append((idx, torch.linalg.vector_norm(grad.detach(), dtype=F32)))
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

    # ---- the step's device figures ----------------------------------------------------
    def parts(self, dev: torch.device) -> list[tuple[str, torch.Tensor]]:
        """This step's figures as named 1-D float32 tensors on ``dev``."""
        parts: list[tuple[str, torch.Tensor]] = []
        if self.flags:
            parts.append(("flag", _stack(self.flags, dev)))
            for name, col in zip(("a_min", "a_max", "a_norm", "a_extra"), self.cols):
                if col:
                    parts.append((name, _stack(col, dev)))
        if self.bwd:
            parts.append(("bwd", _stack([b[1] for b in self.bwd], dev)))
        for i, m in self.masks.items():
            parts.append((f"mask{i}", m.to(dev, F32)))
        for i, seqs in self.time.items():
            parts.append((f"time{i}", torch.stack([s.to(dev) for s in seqs]).pow(2).sum(0).sqrt()))
        return parts


def _stack(values: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Stack 0-d tensors into one float32 vector on ``device`` (converting only if needed)."""
    if all(v.dtype == F32 and v.device == device for v in values):
        return torch.stack(values)
    nb = device.type != "cpu"  # a copy to the host must land before it is read
    return torch.stack([v.to(device=device, dtype=F32, non_blocking=nb) for v in values])
