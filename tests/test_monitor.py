"""The recorder's figures against independent references, its cost rules and its hygiene."""
from __future__ import annotations

import gc
import math
import re
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.errors import NonFiniteError
import gradtrace.record.selection  # noqa: F401

RTOL = 1e-6          # the chapter's per-parameter loop vs gradtrace (float32 norms)
STAT_RTOL = 1e-4     # activation mean/std (float32 accumulations)


def mlp(width=16, depth=3, act=nn.ReLU, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Linear(8, width), act()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), act()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def train(model, opt, mon=None, steps=5, seed=1, batch=32):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(batch, 8, generator=g)
        loss = model(x).pow(2).mean()
        if mon is not None:
            mon.record_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()


def chapter_grad_stats(model):
    """The chapter's own per-parameter loop, collecting instead of printing."""
    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        out[name] = (param.grad.norm().item(), param.data.norm().item())
    return out


def one_step_reference(model, x):
    loss = model(x).pow(2).mean()
    loss.backward()
    return loss


def test_param_figures_match_chapter_loop_and_clip_grad_norm():
    model = mlp()
    ref_model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    with gt.watch(model, opt) as mon:
        loss = model(x).pow(2).mean()
        mon.record_loss(loss)
        loss.backward()
        opt.step()
    ref_loss = one_step_reference(ref_model, x)
    ref = chapter_grad_stats(ref_model)
    grads = {n: p.grad.clone() for n, p in ref_model.named_parameters()}
    total = torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm=float("inf"))
    trace = mon.trace
    for name, (gnorm, pnorm) in ref.items():
        np.testing.assert_allclose(trace.series("grad_norm", name)[0], gnorm, rtol=RTOL)
        np.testing.assert_allclose(trace.series("param_norm", name)[0], pnorm, rtol=RTOL)
        np.testing.assert_allclose(trace.series("grad_maxabs", name)[0], grads[name].abs().max().item(), rtol=RTOL)
        assert trace.series("grad_nonfinite", name)[0] == 0
    np.testing.assert_allclose(trace.series("total_grad_norm")[0], total.item(), rtol=RTOL)
    np.testing.assert_allclose(trace.series("loss")[0], ref_loss.item(), rtol=RTOL)


def test_update_ratio_is_the_real_step():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with gt.watch(model, opt, activations_every=1) as mon:
        train(model, opt, mon, steps=1)
    for n, p in model.named_parameters():
        expect = (p.detach() - before[n]).norm().item() / before[n].norm().item()
        np.testing.assert_allclose(mon.trace.series("update_ratio", n)[0], expect, rtol=1e-5)


def test_output_gradient_norms_match_plain_autograd():
    model = mlp(act=nn.Tanh)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    # reference: retain the gradient of every module output
    outs = {}
    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            outs[name] = output
        return hook
    hooks = [m.register_forward_hook(keep(n)) for n, m in model.named_modules() if n]
    model(x).pow(2).mean().backward()
    for h in hooks:
        h.remove()
    ref = {n: o.grad.norm().item() for n, o in outs.items()}
    model.zero_grad()
    with gt.watch(model, None, activations_every=1) as mon:
        model(x).pow(2).mean().backward()
        mon.step()
    for n, v in ref.items():
        np.testing.assert_allclose(mon.trace.series("outgrad_norm", n)[0], v, rtol=1e-5)


def test_activation_statistics_match_torch():
    model = mlp(act=nn.ReLU)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2))
    outs = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o.detach().clone()))
             for n, m in model.named_modules() if n]
    model(x)
    for h in hooks:
        h.remove()
    with gt.watch(model, None, activations_every=1) as mon:
        model(x).sum().backward()
        mon.step()
    t = mon.trace
    for n, o in outs.items():
        np.testing.assert_allclose(t.series("out_mean", n)[0], o.mean().item(), rtol=STAT_RTOL, atol=1e-6)
        np.testing.assert_allclose(t.series("out_std", n)[0], o.std(unbiased=False).item(), rtol=STAT_RTOL)
        np.testing.assert_allclose(t.series("out_maxabs", n)[0], o.abs().max().item(), rtol=RTOL)
    relu = "1"
    np.testing.assert_allclose(t.series("zero_frac", relu)[0], (outs[relu] == 0).float().mean().item(), rtol=RTOL)
    dead = int((outs[relu].amax(0) <= 0).sum())
    assert t.series("dead_units", relu)[0] == dead
    mask = t.series("active_mask", relu)[0]
    np.testing.assert_array_equal(mask, (outs[relu].amax(0) > 0).numpy())


def test_dead_units_named_and_saturation_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10), nn.ReLU(), nn.Linear(10, 6), nn.Sigmoid(), nn.Linear(6, 1))
    with torch.no_grad():
        model[0].bias[:4] = -100.0          # units 0..3 can never fire
        model[2].weight.mul_(50.0)          # drive the sigmoid into its flat ends
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))
    with gt.watch(model, None, activations_every=1) as mon:
        model(x).sum().backward()
        mon.step()
    t = mon.trace
    mask = t.series("active_mask", "1")[0]
    assert not mask[:4].any()
    assert t.series("dead_units", "1")[0] >= 4
    s = torch.sigmoid(model[2](model[1](model[0](x)))).detach()
    lo, hi = gt.record.selection.SATURATION_BOUNDS["sigmoid"]
    expect = ((s < lo) | (s > hi)).float().mean().item()
    np.testing.assert_allclose(t.series("saturated_frac", "3")[0], expect, rtol=RTOL)
    assert expect > 0.3


class _CountingSyncs:
    """Counts host conversions of tensors (the ways Python code forces a device sync)."""

    NAMES = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy", "__index__")

    def __init__(self, monkeypatch):
        self.count = 0
        self.where: list[str] = []
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=orig, _name=name, **k):
                self.count += 1
                self.where.append(_name)
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, wrapper)


def test_no_host_sync_on_non_recording_steps(monkeypatch):
    model = mlp(act=nn.Tanh)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with gt.watch(model, opt, every=2, activations_every=4) as mon:
        for step in range(6):
            counter = _CountingSyncs(monkeypatch) if step in (1, 3, 5) else None
            loss = model(x).pow(2).mean()
            mon.record_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if counter is not None:
                assert counter.count == 0, f"host syncs on non-recording step {step}: {counter.where}"
                monkeypatch.undo()
    # and a recording step does exactly one bulk copy (numpy() of the flat buffer)
    assert len(mon.trace) == 3


def test_bitwise_identical_training_with_and_without_monitor():
    def run(preset):
        model = mlp(act=nn.GELU, seed=4)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        if preset is None:
            train(model, opt, steps=20, seed=9)
        else:
            with gt.watch(model, opt, preset=preset) as mon:
                train(model, opt, mon, steps=20, seed=9)
        return [p.detach().clone() for p in model.parameters()]

    bare = run(None)
    for preset in ("default", "full"):
        for a, b in zip(bare, run(preset)):
            assert torch.equal(a, b), preset


def _hook_count(model, opt):
    n = 0
    for m in model.modules():
        n += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        n += len(getattr(m, "_backward_pre_hooks", {}))
    for p in model.parameters():
        n += len(getattr(p, "_post_accumulate_grad_hooks", None) or {})
    if opt is not None:
        n += len(opt._optimizer_step_pre_hooks) + len(opt._optimizer_step_post_hooks)
    return n


def test_close_removes_every_hook_and_is_idempotent():
    model = nn.LSTM(4, 8)
    seq = nn.Sequential(mlp(), nn.Tanh())
    opt = torch.optim.SGD(seq.parameters(), lr=0.1)
    mon = gt.watch(seq, opt, preset="full")
    assert _hook_count(seq, opt) > 0
    mon.close()
    mon.close()
    assert _hook_count(seq, opt) == 0
    mon2 = gt.watch(model, None, time_gradients=True)
    mon2.close()
    assert _hook_count(model, None) == 0


def test_exception_inside_with_closes_and_is_recorded(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ZeroDivisionError):
        with gt.watch(model, opt, out=tmp_path / "run") as mon:
            train(model, opt, mon, steps=2)
            1 / 0
    assert _hook_count(model, opt) == 0
    trace = gt.load(tmp_path / "run")
    assert len(trace) == 2
    (exc,) = trace.events("exception")
    assert exc["type"] == "ZeroDivisionError" and "1 / 0" in exc["traceback"]


def test_attaching_twice_is_an_error():
    model = mlp()
    with gt.watch(model):
        with pytest.raises(RuntimeError, match="already watched"):
            gt.watch(model)
    gt.watch(model).close()  # fine again after close


def test_bad_arguments_name_the_argument():
    model = mlp()
    with pytest.raises(ValueError, match="preset="):
        gt.watch(model, preset="turbo")
    with pytest.raises(ValueError, match="every"):
        gt.watch(model, every=0)
    with pytest.raises(TypeError, match="activations_every"):
        gt.watch(model, activations_every=2.5)
    with pytest.raises(TypeError, match="model"):
        gt.watch("not a model")
    with pytest.raises(ValueError, match="matched no module"):
        gt.watch(model, layers="encoder.*")
    with pytest.raises(TypeError, match="layers="):
        gt.watch(model, layers=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="clip="):
        gt.watch(model, opt, clip=-1.0)
    with pytest.raises(TypeError, match="clip="):
        gt.watch(model, opt, clip="1.0")
    with pytest.raises(ValueError, match="needs the optimizer"):
        gt.watch(model, clip=1.0)


def test_layer_selection_forms():
    model = mlp(depth=2)
    cases = {
        "glob": ("[02]", ["0", "2"]),
        "type": (nn.ReLU, ["1", "3"]),
        "regex": (re.compile(r"^4$"), ["4"]),
        "predicate": (lambda name, m: isinstance(m, nn.Linear) and name != "4", ["0", "2"]),
    }
    for label, (spec, expect) in cases.items():
        with gt.watch(model, layers=spec) as mon:
            assert mon.trace.modules == expect, label
    with gt.watch(model, layers=nn.Linear) as mon:
        assert mon.trace.params == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


class SharedBlock(nn.Module):
    """One block applied three times, returning a tuple with an integer tensor."""

    def __init__(self):
        super().__init__()
        self.block = nn.Linear(6, 6)
        self.act = nn.Tanh()

    def forward(self, x):
        for _ in range(3):
            x = self.act(self.block(x))
        return x, torch.arange(3)


def test_multi_call_modules_aggregate_over_calls():
    torch.manual_seed(0)
    model = SharedBlock()
    x = torch.randn(10, 6)
    outs = []
    h = model.block.register_forward_hook(lambda m, i, o: outs.append(o.detach().clone()))
    model(x)
    h.remove()
    allout = torch.cat([o.reshape(-1) for o in outs])
    with gt.watch(model, None, activations_every=1) as mon:
        model(x)[0].sum().backward()
        mon.step()
    t = mon.trace
    np.testing.assert_allclose(t.series("out_mean", "block")[0], allout.mean().item(), rtol=STAT_RTOL, atol=1e-6)
    np.testing.assert_allclose(t.series("out_std", "block")[0], allout.std(unbiased=False).item(), rtol=STAT_RTOL)


def test_tuple_dict_outputs_walked_and_integers_skipped():
    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            y = self.lin(x)
            return {"a": y, "idx": torch.arange(4), "pair": (y * 2, torch.ones(2, dtype=torch.bool))}

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.m = Multi()

        def forward(self, x):
            return self.m(x)["a"].sum()

    model = Wrap()
    with gt.watch(model, None, layers="m", activations_every=1) as mon:
        model(torch.randn(3, 4)).backward()
        mon.step()
    assert mon.trace.series("out_flag_nonfinite", "m")[0] == 0
    assert math.isfinite(mon.trace.series("out_std", "m")[0])


def test_tied_parameters_counted_once_and_frozen_ones_null():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight            # tied
    frozen = nn.Linear(4, 4)
    frozen.requires_grad_(False)
    model = nn.Sequential(emb, frozen, head)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with gt.watch(model, opt) as mon:
        model(torch.tensor([[1, 2, 3]])).sum().backward()
        opt.step()
    t = mon.trace
    assert t.params == ["0.weight", "1.weight", "1.bias"]
    assert np.isfinite(t.series("grad_norm", "0.weight")).all()
    assert len(t.series("grad_norm", "1.weight")) == 0     # no gradient: not recorded


def test_gradient_accumulation_records_accumulated_gradient():
    model, ref = mlp(seed=3), mlp(seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(8, 8, generator=g) for _ in range(3)]
    with gt.watch(model, opt) as mon:
        for x in xs:
            model(x).pow(2).mean().backward()
        opt.step()
    for x in xs:
        ref(x).pow(2).mean().backward()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf"))
    np.testing.assert_allclose(mon.trace.series("total_grad_norm")[0], total.item(), rtol=RTOL)


def test_sparse_and_low_precision_parameters():
    emb = nn.Embedding(50, 8, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    idx = torch.tensor([1, 2, 2, 7])
    with gt.watch(emb, opt) as mon:
        emb(idx).sum().backward()
        ref = emb.weight.grad.to_dense().norm().item()
        opt.step()
    np.testing.assert_allclose(mon.trace.series("grad_norm", "weight")[0], ref, rtol=RTOL)

    model = mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt) as mon:
        model(torch.randn(4, 8, dtype=torch.bfloat16)).float().pow(2).mean().backward()
        ref = model[0].weight.grad.float().norm().item()
        opt.step()
    np.testing.assert_allclose(mon.trace.series("grad_norm", "0.weight")[0], ref, rtol=1e-5)


def test_memory_stays_flat_over_200_steps():
    model = mlp(width=32, depth=4)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def live_tensors():
        gc.collect()
        with warnings.catch_warnings():   # isinstance() pokes deprecated lazy attributes
            warnings.simplefilter("ignore")
            return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    with gt.watch(model, opt, activations_every=1) as mon:
        train(model, opt, mon, steps=20)
        early = live_tensors()
        train(model, opt, mon, steps=180)
        late = live_tensors()
    assert late <= early, (early, late)


def test_nonfinite_forward_localised_on_the_step_it_happened():
    class Inject(nn.Module):
        def __init__(self):
            super().__init__()
            self.fire = False

        def forward(self, x):
            return x * float("inf") if self.fire else x

    torch.manual_seed(0)
    inject = Inject()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), inject, nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gt.watch(model, opt) as mon:          # defaults: activation statistics every 10th step
        for step in range(6):
            inject.fire = step == 3
            loss = model(torch.randn(4, 8)).pow(2).mean()
            mon.record_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    events = mon.trace.events("nonfinite")
    assert events[0]["step"] == 3
    assert events[0]["forward"] == "3"
    assert events[0]["loss_nonfinite"]
    assert "0.weight" in events[0]["params"]
    assert mon.trace.series("grad_nonfinite", "6.weight")[3] > 0


def test_raise_on_nonfinite_writes_then_raises(tmp_path):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteError, match="first forward module 0"):
        with gt.watch(model, opt, out=tmp_path / "r", raise_on_nonfinite=True):
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
    assert gt.load(tmp_path / "r").events("nonfinite")[0]["forward"] == "0"


def test_backward_only_nonfinite_found_by_backward_flags():
    class BadGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g * float("nan")

    class Mid(nn.Module):
        def forward(self, x):
            return BadGrad.apply(x)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Mid(), nn.Linear(4, 4), nn.Linear(4, 1))
    with gt.watch(model, None, backward_flags=True, activations_every=0) as mon:
        model(torch.randn(3, 4)).sum().backward()
        mon.step()
    ev = mon.trace.events("nonfinite")[0]
    assert ev["forward"] is None and ev["backward"] == "0"   # backward order: 3, 2, 1, 0
    assert ev["params"] == ["0.weight", "0.bias"]


def test_rnn_time_gradients_per_step():
    torch.manual_seed(0)
    rnn = nn.RNN(3, 5, batch_first=True)
    x = torch.randn(2, 7, 3)
    with gt.watch(rnn, None, time_gradients=True, activations_every=1) as mon:
        out, _ = rnn(x)
        out[:, -1].sum().backward()
        mon.step()
    xr = x.clone().requires_grad_(True)
    out, _ = rnn(xr)
    out[:, -1].sum().backward()
    ref = xr.grad.norm(dim=(0, 2))
    got = mon.trace.series("time_grad_norm", "")[0]
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-5)
    assert got[0] < got[-1]


def test_manual_step_without_optimizer_and_every():
    model = mlp()
    with gt.watch(model, every=3) as mon:
        for _ in range(7):
            model(torch.randn(4, 8)).sum().backward()
            mon.step()
            model.zero_grad()
    assert list(mon.trace.steps_recorded) == [0, 3, 6]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt) as mon:
        with pytest.raises(RuntimeError, match="optimizer.step"):
            mon.step()


@pytest.mark.parametrize("how", ["user_call", "watch_arg"])
def test_fused_clipping_records_pre_and_post_clip(how):
    model, ref = mlp(seed=6), mlp(seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 10
    max_norm = 0.05
    kwargs = {"clip": max_norm} if how == "watch_arg" else {}
    with gt.watch(model, opt, **kwargs) as mon:
        model(x).pow(2).mean().backward()
        pre = {n: p.grad.norm().item() for n, p in model.named_parameters()}
        pre_max = {n: p.grad.abs().max().item() for n, p in model.named_parameters()}
        if how == "user_call":
            gt.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    ref(x).pow(2).mean().backward()
    total = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    ref_opt.step()
    t = mon.trace
    np.testing.assert_allclose(t.series("total_grad_norm")[0], total.item(), rtol=RTOL)
    np.testing.assert_allclose(t.series("total_grad_norm_post_clip")[0], max_norm, rtol=1e-4)
    np.testing.assert_allclose(t.series("grad_changed_ratio")[0], max_norm / total.item(), rtol=1e-4)
    for n, v in pre.items():
        np.testing.assert_allclose(t.series("grad_norm", n)[0], v, rtol=RTOL)
        np.testing.assert_allclose(t.series("grad_maxabs", n)[0], pre_max[n], rtol=1e-5)
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_evaluation_forward_passes_do_not_count():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with gt.watch(model, opt, activations_every=1) as mon:
        with torch.no_grad():
            model(x * 1000)                 # validation batch: must not show up
        model(x).pow(2).mean().backward()
        opt.step()
    assert mon.trace.series("out_maxabs", "0")[0] < 100


def test_std_survives_a_large_offset_and_nan_steps_do_not_read_as_dead():
    class Offset(nn.Module):
        def forward(self, x):
            return 100.0 + 1e-3 * x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 64), Offset(), nn.ReLU(), nn.Linear(64, 1))
    x = torch.randn(32, 8)
    ref = (100.0 + 1e-3 * model[0](x)).detach().double().std(unbiased=False).item()
    with gt.watch(model, None, activations_every=1) as mon:
        model(x).sum().backward()
        mon.step()
        model.zero_grad()
        model(x * float("nan")).sum().backward()
        mon.step()
    t = mon.trace
    np.testing.assert_allclose(t.series("out_std", "1")[0], ref, rtol=1e-3)
    steps, dead = t.series("dead_units", "2", with_steps=True)
    assert list(steps) == [0]                      # the nan step records no dead units
    assert t.series("out_nonfinite", "2")[1] > 0


def test_update_ratio_of_zero_weights_is_null():
    model = nn.Linear(4, 2)
    nn.init.zeros_(model.bias)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, activations_every=1) as mon:
        model(torch.randn(3, 4)).sum().backward()
        opt.step()
    assert len(mon.trace.series("update_ratio", "bias")) == 0
    assert np.isfinite(mon.trace.series("update_ratio", "weight")).all()


def test_guard_skips_end_the_watched_step_unrecorded():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = gt.Guard(opt, skip_nonfinite=True)
    g = torch.Generator().manual_seed(0)
    with gt.watch(model, opt) as mon:
        guard.monitor = mon
        for step in range(5):
            x = torch.randn(8, 8, generator=g)
            if step in (1, 2):
                x[0, 0] = float("nan")
            loss = model(x).pow(2).mean()
            mon.record_loss(loss)
            loss.backward()
            guard.step(loss)
            opt.zero_grad()
    t = mon.trace
    assert [e["step"] for e in t.events("guard_skip")] == [1, 2]
    assert list(t.steps_recorded) == [0, 3, 4]
    assert np.isfinite(t.series("loss")).all()
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_clipping_another_model_does_not_touch_this_record():
    a, b = mlp(seed=1), mlp(seed=2)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with gt.watch(a, opt) as mon:
        a(x).pow(2).mean().backward()
        (b(x) * 100).pow(2).mean().backward()
        gt.clip_grad_norm_(b.parameters(), 1e-3)          # someone else's model
        ref = torch.nn.utils.clip_grad_norm_(a.parameters(), float("inf"))
        opt.step()
    assert "clip_coef" not in mon.trace.stats()
    np.testing.assert_allclose(mon.trace.series("total_grad_norm")[0], ref.item(), rtol=RTOL)


def test_unclosed_monitor_is_freed_with_its_model():
    import weakref as _weakref

    model = mlp()
    mon = gt.watch(model, preset="full")
    ref_model, ref_mon = _weakref.ref(model), _weakref.ref(mon)
    del model, mon
    gc.collect()
    assert ref_model() is None and ref_mon() is None


def test_vanishing_norms_below_float32_square_range_and_monitoring_errors_do_not_crash():
    model = nn.Linear(4, 1)
    model.bias.register_hook(lambda g: g * 1e-25)   # backward leaves a one-entry gradient
    with gt.watch(model) as mon:                    # of 2e-25: its square is below
        model(torch.ones(2, 4)).sum().backward()    # float32's range, its norm is not
        mon.step()
    np.testing.assert_allclose(mon.trace.series("grad_norm", "bias")[0], model.bias.grad.norm().item(), rtol=1e-5)
    assert mon.trace.series("total_grad_norm")[0] > 0
    model2 = mlp()
    opt = torch.optim.SGD(model2.parameters(), lr=0.1)
    with gt.watch(model2, opt) as mon2:
        out = model2(torch.randn(4, 8))
        mon2.record_loss(out.pow(2).squeeze(1))        # a per-example loss vector is averaged
        out.pow(2).mean().backward()
        mon2.log_event("note", value=np.float32(1.5), arr=np.arange(3))   # numpy values are fine
        opt.step()
    np.testing.assert_allclose(mon2.trace.series("loss")[0], out.pow(2).mean().item(), rtol=1e-6)


def test_gradients_changed_after_backward_keep_pre_clip_figures_and_record_what_the_optimizer_saw():
    """Figures are those backward left; a gradient changed in place afterwards (here
    doubled) shows as the post-clip total and the ratio, as the optimizer used it."""
    model, ref = mlp(seed=8), mlp(seed=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    with gt.watch(model, opt) as mon:
        model(x).pow(2).mean().backward()
        for p in model.parameters():
            p.grad.mul_(2.0)
        opt.step()
    ref(x).pow(2).mean().backward()
    total = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item()
    for (n, p) in ref.named_parameters():
        np.testing.assert_allclose(mon.trace.series("grad_norm", n)[0], p.grad.norm().item(), rtol=RTOL)
        np.testing.assert_allclose(mon.trace.series("grad_maxabs", n)[0], p.grad.abs().max().item(), rtol=RTOL)
    np.testing.assert_allclose(mon.trace.series("total_grad_norm")[0], total, rtol=RTOL)
    np.testing.assert_allclose(mon.trace.series("total_grad_norm_post_clip")[0], 2 * total, rtol=RTOL)
    np.testing.assert_allclose(mon.trace.series("grad_changed_ratio")[0], 2.0, rtol=RTOL)


def _follow(run, idle):
    import subprocess
    import sys
    import time
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "gradtrace", "doctor", str(run), "--follow",
                        "--interval", "0.1", "--idle", str(idle)], capture_output=True, text=True, timeout=120)
    return p, time.monotonic() - t0


def test_closing_writes_an_end_event_and_doctor_follow_stops_at_it(tmp_path):
    run = tmp_path / "run"
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, out=str(run)) as mon:
        train(model, opt, mon, steps=3)
    ends = gt.load(str(run)).events("end")
    assert [e["step"] for e in ends] == [2]
    # --idle 60: only the end marker can make it return within the 30 s bound.
    p, took = _follow(run, idle=60)
    assert p.returncode in (0, 3), p.stderr
    assert "no new record" not in p.stdout and took < 30
    # A run that raised ends with its exception event, not with "end".
    with pytest.raises(RuntimeError):
        with gt.watch(nn.Linear(2, 1), out=str(tmp_path / "bad")):
            raise RuntimeError("boom")
    assert [e["event"] for e in gt.load(str(tmp_path / "bad")).events()] == ["exception"]
    # Resumed and still open: the old "end" no longer counts, so --follow waits for records.
    mon = gt.watch(model, opt, out=str(run), resume=True)
    try:
        model(torch.randn(4, 8)).sum().backward(); opt.step()
        mon._drain(wait=True)
        p, took = _follow(run, idle=0.5)
        assert "no new record" in p.stdout, p.stdout
    finally:
        mon.close()
    assert [e["step"] for e in gt.load(str(run)).events("end")] == [2, 3]


def test_a_module_called_several_times_pools_its_calls_like_torch():
    """Per-module output figures of a module run three times per forward equal torch's
    over the three outputs together (the calls are pooled exactly)."""
    torch.manual_seed(3)
    lin, act = nn.Linear(6, 6), nn.ReLU()
    model = nn.ModuleDict({"lin": lin, "act": act})
    outs = []

    def forward(x):
        for k in range(3):           # different scales: the calls' means and spreads differ
            x = act(lin(x * (k + 1)))
            outs.append(x.detach())
        return x

    with gt.watch(model, None, activations_every=1) as mon:
        forward(torch.randn(10, 6)).sum().backward()
        mon.step()
    allv = torch.cat([o.reshape(-1) for o in outs]).double()
    t = mon.trace
    np.testing.assert_allclose(t.series("out_mean", "act")[0], allv.mean().item(), rtol=RTOL)
    np.testing.assert_allclose(t.series("out_std", "act")[0], allv.std(unbiased=False).item(), rtol=RTOL)
    np.testing.assert_allclose(t.series("out_maxabs", "act")[0], allv.abs().max().item(), rtol=RTOL)
    np.testing.assert_allclose(t.series("zero_frac", "act")[0], (allv == 0).double().mean().item(), rtol=RTOL)


def test_sparse_gradients_of_dense_parameters_keep_every_record():
    # 8 Embedding(sparse=True): dense parameters, sparse gradients of one shape; the
    # activation step's max|g| must fall back from the stacked route, not drop the record.
    torch.manual_seed(0)
    embs = nn.ModuleList(nn.Embedding(10, 8, sparse=True) for _ in range(8))
    opt = torch.optim.SGD(embs.parameters(), lr=0.1)
    idx = torch.tensor([1, 2, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gt.watch(embs, opt, activations_every=2) as mon:
            for _ in range(3):
                sum(e(idx).sum() for e in embs).backward()
                ref = [float(e.weight.grad.to_dense().abs().max()) for e in embs]
                opt.step()
                opt.zero_grad()
    t = mon.trace
    assert len(t.series("grad_norm", "0.weight")) == 3
    assert t.series("grad_maxabs", "0.weight")[-1] == pytest.approx(ref[0], rel=1e-6)


def test_the_recorded_loss_is_the_value_when_noted():
    # record_loss keeps a copy: an in-place change afterwards does not reach the trace.
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt) as mon:
        loss = model(torch.ones(2, 3)).pow(2).mean()
        noted = float(loss.detach())
        mon.record_loss(loss)
        loss.backward()
        loss.detach().mul_(0)
        opt.step()
    assert mon.trace.series("loss").tolist() == pytest.approx([noted], rel=1e-6)


def test_a_float64_model_records_its_activations():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with gt.watch(model, opt, activations_every=1) as mon:
            model(x).pow(2).mean().backward()
            with torch.no_grad():
                h = model[1](model[0](x))        # the output the step saw, before it
            opt.step()
    assert mon.trace.series("out_maxabs", "1")[0] == pytest.approx(float(h.abs().max()), rel=1e-6)


def test_out_dtypes_follow_a_module_that_changes_precision():
    # float32 on step 0, float16 from step 1 (autocast switched on after a warm-up): the
    # trace says so from that step on, and the earlier dtype stays readable at step 0.
    class Half(nn.Module):
        def __init__(self):
            super().__init__()
            self.on = False

        def forward(self, x):
            return x.half() if self.on else x
    torch.manual_seed(0)
    switch = Half()
    model = nn.Sequential(nn.Linear(3, 3), switch)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, activations_every=1) as mon:
        for step in range(3):
            switch.on = step >= 1
            model(torch.ones(2, 3)).float().sum().backward()
            opt.step()
            opt.zero_grad()
    t = mon.trace
    assert t.out_dtypes(step=0)["1"] == "float32" and t.out_dtypes()["1"] == "float16"
