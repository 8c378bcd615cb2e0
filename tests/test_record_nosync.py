"""No step, recorded or not, reads a tensor value on the host or waits on a device.

On CPU nothing can be timed as a sync, so the test counts every way Python code turns a
tensor into a host value (``item``, ``tolist``, ``__bool__``, ``__float__``, ``numpy``...)
and every explicit wait (``torch.cuda.synchronize``, ``Event.synchronize``/``wait``), and
names the caller. The allowed callers run only for tensors on the CPU, where reading
waits for nothing: the norm engine's range check (``norms._rescue``; on an accelerator
the engine accumulates in float64 instead) and the host copy's CPU path
(``HostCopies.start`` takes a CPU buffer's own numpy view; elsewhere it calls ``numpy()``
only on a pinned host buffer it has just made).
"""
from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace import norms
from gradtrace.record import transfer

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "__index__")
CPU_ONLY = {(norms.__file__, "_rescue"), (transfer.__file__, "start")}
RTOL_WIDE = 1e-12    # float64 sums of squares of the same float32 entries, another order
RTOL = 1e-6          # float32 foreach norms (range-checked) against a float64 reference


class Counter:
    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str]] = []
        for name in CONVERSIONS:
            orig = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=orig, _name=name, **k):
                f = sys._getframe(1)
                self.calls.append((_name, f.f_code.co_filename, f.f_code.co_name))
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)
        for owner, name in ((torch.cuda, "synchronize"), (torch.cuda.Event, "synchronize"),
                            (torch.cuda.Event, "wait")):
            def waiter(*a, _name=name, **k):
                self.calls.append((_name, "", ""))
            monkeypatch.setattr(owner, name, waiter)

    def syncs(self):
        return [c for c in self.calls if (c[1], c[2]) not in CPU_ONLY]


def test_no_host_read_on_any_step_recorded_or_not(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 8, generator=g) for _ in range(14)]
    with gt.watch(model, opt, activations_every=5) as mon:
        counter = None
        for step, x in enumerate(xs):
            if step == 2:           # host buffers for both kinds of step exist by now
                counter = Counter(monkeypatch)
            loss = model(x).pow(2).mean()
            mon.record_loss(loss)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)   # a change to notice
            opt.step()
            opt.zero_grad()
        assert counter.syncs() == [], counter.syncs()
        monkeypatch.undo()
    t = mon.trace
    assert list(t.steps_recorded) == list(range(14))
    assert "out_mean" in t.stats() and "total_grad_norm_post_clip" in t.stats()  # both kinds ran


def test_one_read_of_the_gradients_per_step_and_nothing_measured_again(monkeypatch):
    # A vanishing network (norms down to ~1e-17, squares below float32's normal range)
    # with a dead layer (earlier gradients exactly zero): every step reads the gradients
    # once (one float64 stack per repeated shape: weights and biases) and re-measures none
    # of them, and the figures match a float64 reference.
    torch.manual_seed(0)
    layers = []
    for _ in range(30):
        lin = nn.Linear(8, 8)
        nn.init.normal_(lin.weight, std=0.1)
        layers += [lin, nn.Tanh()]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        model[10].weight.zero_()                      # layers before it get zero gradients
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    reads = []
    for owner, name in ((torch, "_foreach_norm"), (torch.linalg, "vector_norm"),
                        (torch, "stack"), (torch, "aminmax")):
        real = getattr(owner, name)

        def counted(x, *a, _real=real, _name=name, **k):
            grads = {id(p.grad) for p in model.parameters() if p.grad is not None}
            if any(id(t) in grads for t in (x if isinstance(x, (list, tuple)) else [x])):
                reads.append((_name, len(x) if isinstance(x, (list, tuple)) else 1))
            return _real(x, *a, **k)
        monkeypatch.setattr(owner, name, counted)
    g = torch.Generator().manual_seed(2)
    refs = []
    with gt.watch(model, opt, activations_every=0) as mon:
        for _ in range(3):
            model(torch.randn(16, 8, generator=g)).pow(2).mean().backward()
            refs.append([float(p.grad.double().pow(2).sum().sqrt()) for p in model.parameters()])
            opt.step()
            opt.zero_grad()
    assert reads == [("stack", 30), ("stack", 30)] * 3, reads
    monkeypatch.undo()
    t = mon.trace
    names = [n for n, _ in model.named_parameters()]
    for step, ref in enumerate(refs):
        got = [float(t.series("grad_norm", n)[step]) for n in names]
        assert min(v for v in ref if v > 0) < 1e-16 and ref[0] == 0.0   # vanishing, dead
        for a, b in zip(got, ref):
            assert a == pytest.approx(b, rel=RTOL_WIDE, abs=0.0)


@pytest.mark.parametrize("when", ["before_backward", "after_backward", "twice"])
def test_a_gradient_only_step_copies_to_the_host_once_and_records_the_same_figures(monkeypatch, when):
    # On a step with only gradient norms (and at most the one loss noted before backward
    # ended) the record reuses the end-of-backward copy; with a loss noted later, or two,
    # it makes its own. Either way the figures match a float64 reference.
    from gradtrace.record.transfer import HostCopies
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    starts = []
    real = HostCopies.start

    def counted(self, flat):
        starts.append(flat.numel())
        return real(self, flat)
    monkeypatch.setattr(HostCopies, "start", counted)
    g = torch.Generator().manual_seed(3)
    refs, losses = [], []
    with gt.watch(model, opt, activations_every=0) as mon:
        for _ in range(4):
            loss = model(torch.randn(12, 6, generator=g)).pow(2).mean()
            extra = loss.detach() * 2
            if when != "after_backward":
                mon.record_loss(loss)
            if when == "twice":
                mon.record_loss(extra)
            loss.backward()
            if when == "after_backward":
                mon.record_loss(loss)
            refs.append([float(p.grad.double().norm()) for p in model.parameters()])
            losses.append((float(loss.detach()) + float(extra)) / 2 if when == "twice" else float(loss.detach()))
            opt.step()
            opt.zero_grad()
    n = len(refs[0])
    per_step = [n + (when != "after_backward")] + ([] if when == "before_backward" else [n + 1 + (when == "twice")])
    assert starts == per_step * 4, starts
    t = mon.trace
    names = [name for name, _ in model.named_parameters()]
    for step, ref in enumerate(refs):
        for name, r in zip(names, ref):
            assert float(t.series("grad_norm", name)[step]) == pytest.approx(r, rel=RTOL, abs=0.0)
    assert t.series("loss").tolist() == pytest.approx(losses, rel=1e-6)
