"""Gradient figures are those backward left, whoever clips or scales afterwards.

Each case is checked against an independent reference: the same seeded model trained
without gradtrace, its norms taken by torch before and after the change.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt

RTOL = 1e-6          # float32 norms of the same tensors, summed in float64 either way


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))


def batches(n, seed=1, scale=10.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 8, generator=g) * scale for _ in range(n)]


def norms_of(model):
    return {n: p.grad.norm().item() for n, p in model.named_parameters()}


def total_of(model):
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]).item()


CHANGES = {
    "clip_grad_norm_": lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05),
    "clip_grad_value_": lambda m: torch.nn.utils.clip_grad_value_(m.parameters(), 1e-3),
    "manual_mul": lambda m: [p.grad.mul_(0.1) for p in m.parameters()],
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_changes_after_backward_leave_figures_pre_clip(change):
    model, ref = mlp(), mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x,) = batches(1)
    with gt.watch(model, opt) as mon:
        model(x).pow(2).mean().backward()
        CHANGES[change](model)
        opt.step()
    ref(x).pow(2).mean().backward()
    pre, pre_total = norms_of(ref), total_of(ref)
    CHANGES[change](ref)
    post_total = total_of(ref)
    assert post_total < pre_total
    t = mon.trace
    for n, v in pre.items():
        np.testing.assert_allclose(t.series("grad_norm", n)[0], v, rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm")[0], pre_total, rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm_post_clip")[0], post_total, rtol=RTOL)
    np.testing.assert_allclose(t.series("grad_changed_ratio")[0], post_total / pre_total, rtol=RTOL)


def test_unchanged_gradients_record_no_post_clip_figure():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt) as mon:
        for x in batches(2):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    assert "total_grad_norm_post_clip" not in mon.trace.stats()


def test_four_micro_batches_record_the_accumulated_gradient_then_the_clip():
    model, ref = mlp(3), mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xs = batches(4, seed=5)
    with gt.watch(model, opt) as mon:
        for x in xs:
            (model(x).pow(2).mean() / len(xs)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    for x in xs:
        (ref(x).pow(2).mean() / len(xs)).backward()
    pre, pre_total = norms_of(ref), total_of(ref)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    t = mon.trace
    for n, v in pre.items():
        np.testing.assert_allclose(t.series("grad_norm", n)[0], v, rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm")[0], pre_total, rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm_post_clip")[0], total_of(ref), rtol=RTOL)


def test_grad_scaler_figures_are_unscaled_and_a_clip_after_unscale_is_seen():
    model, ref = mlp(4), mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)   # a power of two: exact
    (x,) = batches(1, seed=7)
    with gt.watch(model, opt, scaler=scaler) as mon:
        scaler.scale(model(x).pow(2).mean()).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        scaler.step(opt)
        scaler.update()
    ref(x).pow(2).mean().backward()
    pre, pre_total = norms_of(ref), total_of(ref)
    pre_max = {n: p.grad.abs().max().item() for n, p in ref.named_parameters()}
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    t = mon.trace
    for n, v in pre.items():
        np.testing.assert_allclose(t.series("grad_norm", n)[0], v, rtol=RTOL)
        np.testing.assert_allclose(t.series("grad_maxabs", n)[0], pre_max[n], rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm")[0], pre_total, rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm_post_clip")[0], total_of(ref), rtol=RTOL)


@pytest.mark.parametrize("factor", [1e20, 1e-25])
def test_finite_gradients_give_finite_norms(factor):
    model = mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for p in model.parameters():                 # backward itself leaves huge / tiny grads
        p.register_hook(lambda g: g * factor)
    (x,) = batches(1)
    with gt.watch(model, opt) as mon:
        model(x).pow(2).mean().backward()
        ref = {n: torch.linalg.vector_norm(p.grad.double()).item() for n, p in model.named_parameters()}
        ref_max = {n: p.grad.abs().max().item() for n, p in model.named_parameters()}
        total = math.sqrt(sum(v * v for v in ref.values()))
        opt.step()
    t = mon.trace
    for n, v in ref.items():
        assert math.isfinite(v) and v > 0
        np.testing.assert_allclose(t.series("grad_norm", n)[0], v, rtol=RTOL)
        np.testing.assert_allclose(t.series("grad_maxabs", n)[0], ref_max[n], rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm")[0], total, rtol=RTOL)
    assert t.events("nonfinite") == []


def test_root_never_called_still_records_pre_clip():
    """A ModuleDict whose parts are called one by one: its own forward never runs."""
    def make():
        torch.manual_seed(2)
        return nn.ModuleDict({"a": nn.Linear(8, 16), "b": nn.Linear(16, 1)})
    model, ref = make(), make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    (x,) = batches(1)
    with gt.watch(model, opt) as mon:
        model["b"](torch.tanh(model["a"](x))).pow(2).mean().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        opt.step()
    ref["b"](torch.tanh(ref["a"](x))).pow(2).mean().backward()
    pre, pre_total = norms_of(ref), total_of(ref)
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
    for n, v in pre.items():
        np.testing.assert_allclose(mon.trace.series("grad_norm", n)[0], v, rtol=RTOL)
    np.testing.assert_allclose(mon.trace.series("total_grad_norm")[0], pre_total, rtol=RTOL)
    np.testing.assert_allclose(mon.trace.series("total_grad_norm_post_clip")[0], total_of(ref), rtol=RTOL)


class GradReads:
    """Counts the norm engine's reads of the given gradients (foreach, per tensor, flat)."""

    def __init__(self, monkeypatch, grads):
        self.calls, ids = 0, {id(g) for g in grads}
        for owner, name in ((torch, "_foreach_norm"), (torch.linalg, "vector_norm"),
                            (torch, "stack")):
            real = getattr(owner, name)

            def counted(x, *a, _real=real, **k):
                xs = x if isinstance(x, (list, tuple)) else [x]
                self.calls += any(id(t) in ids for t in xs)
                return _real(x, *a, **k)
            monkeypatch.setattr(owner, name, counted)


def wide_mlp(seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 1))
    m.register_parameter("unused", nn.Parameter(torch.ones(3)))   # its .grad stays None
    return m


@pytest.mark.parametrize("how", ["user_call", "watch_arg"])
def test_gradtrace_clip_reuses_the_monitors_norms_and_derives_the_post_clip_total(monkeypatch, how):
    # Small (flat route) and large (foreach) gradients, one None: gradtrace's clip reads
    # no gradient (the monitor's end-of-backward norms are reused), and the post-clip total
    # comes from its coefficient; all of it equals torch's clip on a twin model.
    model, ref = wide_mlp(), wide_mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    (x,) = batches(1)
    max_norm = 0.05
    with gt.watch(model, opt, **({"clip": max_norm} if how == "watch_arg" else {})) as mon:
        model(x).pow(2).mean().backward()
        reads = GradReads(monkeypatch, [p.grad for p in model.parameters() if p.grad is not None])
        if how == "user_call":
            gt.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
        assert reads.calls == 0
        monkeypatch.undo()
    ref(x).pow(2).mean().backward()
    pre = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], max_norm)
    post = total_of_present(ref)
    ref_opt.step()
    t = mon.trace
    np.testing.assert_allclose(t.series("total_grad_norm")[0], pre.item(), rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm_post_clip")[0], post, rtol=RTOL)
    np.testing.assert_allclose(t.series("grad_changed_ratio")[0], post / pre.item(), rtol=RTOL)
    assert post < pre.item()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def total_of_present(model):
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]).item()
