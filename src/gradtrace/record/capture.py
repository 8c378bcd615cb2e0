"""What one step's forward needs to run again: the root module's inputs and the RNG state.

The monitor keeps the latest :class:`StepCapture` (``monitor.capture``), taken by a forward
pre-hook on the root module: a reference to the inputs (no copy) and the generators'
states (the CPU one is a 5 kB copy, about 1 us). When a step's gradients or loss come out
non-finite, :func:`first_nonfinite_module` runs that forward once more, before the
optimizer applies the step, with a flag on every watched module, and then puts the RNG
state and every buffer (BatchNorm running statistics, ``num_batches_tracked``) back, so
that the run goes on bitwise as it would have. Its limits: an input changed in place
after the forward, or module state kept outside buffers (a Python counter) is not
restored; with gradient accumulation the last micro-batch is the one replayed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def rng_state() -> dict[str, Any]:
    """The CPU generator's state and, once CUDA is initialised, every CUDA generator's.

    The dict has the shape ``gradtrace.record.flight`` saves (``{"cpu": t, "cuda": [...]}``).

    Example:
        >>> sorted(rng_state())
        ['cpu', 'cuda']
    """
    cuda = (torch.cuda.get_rng_state_all()
            if torch.cuda.is_available() and torch.cuda.is_initialized() else [])
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state taken by :func:`rng_state`.

    Example:
        >>> s = rng_state(); a = torch.rand(1); set_rng_state(s); bool(torch.rand(1) == a)
        True
    """
    torch.set_rng_state(state["cpu"])
    if state.get("cuda"):
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class StepCapture:
    """The root module's inputs of one forward and the RNG state as it began.

    Example:
        >>> cap = StepCapture(3, (torch.ones(1, 2),), {}, rng_state())
        >>> cap.step, len(cap.args)
        (3, 1)
    """

    step: int
    args: tuple
    kwargs: dict
    rng_state: dict[str, Any]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # empty: not kept (cost)


def first_nonfinite_module(call: nn.Module, modules: list[nn.Module], names: list[str],
                           capture: StepCapture) -> str | None:
    """Run the captured forward again and name the first module (in call order) whose
    output holds a nan or inf; ``None`` when the forward is finite. Leaves RNG state and
    buffers as it found them. Reads flags on the host: call it on the rare bad step only.

    ``call`` is what the user called (the root module or its wrapper).

    Example:
        >>> class Bad(torch.nn.Module):
        ...     def forward(self, x): return x * float("inf")
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), Bad(), torch.nn.Tanh())
        >>> cap = StepCapture(0, (torch.ones(1, 2),), {}, rng_state())
        >>> first_nonfinite_module(net, list(net), ["0", "1", "2"], cap)
        '1'
    """
    found: list[str] = []

    def flag(name: str, module: nn.Module, inputs: Any, output: Any) -> None:
        if found:
            return
        from .selection import floating_tensors
        if any(not bool(torch.isfinite(t).all()) for t in floating_tensors(output)):
            found.append(name)

    now = rng_state()
    buffers = [b for b in call.buffers() if b is not None]
    saved = [b.detach().clone() for b in buffers]
    handles = [m.register_forward_hook(lambda mod, i, o, _n=n: flag(_n, mod, i, o))
               for m, n in zip(modules, names)]
    try:
        set_rng_state(capture.rng_state)
        with torch.no_grad():
            call(*capture.args, **capture.kwargs)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)
        set_rng_state(now)
    return found[0] if found else None
