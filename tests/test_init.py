"""Tests for the initialisation remedies (remedies.init, .lsuv, .residual): measured effects."""
from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from gradtrace.remedies.init import init_for_activation, lsuv_, scale_residual_branches_

STD_FACTOR = 2.0          # last/first activation std after init_for_activation
LSUV_TOL = 0.1
XAVIER_MAX_DROP = 0.05    # a 30-layer ReLU net with Xavier init barely moves ...
KAIMING_MIN_DROP = 0.5    # ... and learns after init_for_activation
GPT2_STD_RTOL = 0.1




def relu_mlp(depth, width, din, dout=1):
    layers = [nn.Linear(din, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, dout))
    return nn.Sequential(*layers)


def relu_stds(model, x):
    stds = []
    with torch.no_grad():
        for layer in model:
            x = layer(x)
            if isinstance(layer, nn.ReLU):
                stds.append(float(x.std()))
    return stds


def test_deep_relu_mlp_keeps_activation_scale():
    ratios, default_ratios = [], []
    for seed in range(5):
        torch.manual_seed(seed)
        model = relu_mlp(50, 256, din=256)
        x = torch.randn(512, 256)
        s = relu_stds(model, x)
        default_ratios.append(s[-1] / s[0])
        report = init_for_activation(model)
        s = relu_stds(model, x)
        ratios.append(s[-1] / s[0])
    # finite width makes the log-variance a random walk; the median over seeds is stable
    ratio = statistics.median(ratios)
    assert 1 / STD_FACTOR < ratio < STD_FACTOR, ratios
    assert max(default_ratios) < 1 / STD_FACTOR ** 2  # PyTorch's default init shrinks it
    assert report[0].activation == "ReLU" and "kaiming" in report[0].init
    assert report[-1].activation == "none (output layer)" and "linear" in report[-1].init
    assert all(r.found_by == "fx trace" for r in report)
    assert all(bool(torch.all(m.bias == 0)) for m in model if isinstance(m, nn.Linear))


def _train(use_remedy, seed=2, steps=150, lr=0.02):
    torch.manual_seed(seed)
    model = relu_mlp(30, 32, din=16)
    for m in model:
        if isinstance(m, nn.Linear):
            nn.init.xavier_normal_(m.weight)
            nn.init.zeros_(m.bias)
    if use_remedy:
        init_for_activation(model)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 16, generator=gen)
    y = torch.sin(x @ torch.randn(16, 1, generator=gen))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    first = None
    for _ in range(steps):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    return first, float(loss.detach())


def test_init_for_activation_makes_deep_relu_net_learn():
    x0, x1 = _train(False)
    k0, k1 = _train(True)
    xavier_drop, kaiming_drop = 1 - x1 / x0, 1 - k1 / k0
    assert xavier_drop < XAVIER_MAX_DROP, (x0, x1)
    assert kaiming_drop > KAIMING_MIN_DROP, (k0, k1)


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 8)
        self.d = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)
        self.e = nn.Linear(8, 8)
        self.f = nn.Linear(8, 8)
        self.g = nn.Linear(8, 8)
        self.weird = nn.Hardswish()
        self.h = nn.Linear(8, 2)

    def forward(self, x):
        x = torch.tanh(self.a(x))
        x = F.leaky_relu(self.b(x), negative_slope=0.2)
        x = torch.sigmoid(self.c(x))
        x = F.gelu(self.norm(self.d(x)))
        x = x + F.relu(self.e(x))        # residual around a ReLU branch
        x = F.selu(self.f(x))
        x = self.weird(self.g(x))
        return self.h(x)


def test_fx_finds_functional_activations_and_reports_unknown():
    torch.manual_seed(0)
    model = Functional()
    g_before = model.g.weight.detach().clone()
    g_bias = model.g.bias.detach().clone()
    rows = {r.layer: r for r in init_for_activation(model)}
    assert "tanh" in rows["a"].init and "5/3" not in rows["a"].init
    assert rows["a"].init.startswith("xavier") and "1.667" in rows["a"].init
    assert "a=0.2" in rows["b"].init
    assert rows["c"].init.startswith("xavier") and "sigmoid" in rows["c"].init
    assert rows["d"].init.startswith("kaiming")  # GELU -> kaiming (through LayerNorm)
    assert rows["e"].init.startswith("kaiming")
    assert "lecun" in rows["f"].init
    assert rows["g"].init == "left unchanged: unknown activation Hardswish"
    assert torch.equal(model.g.weight, g_before) and torch.equal(model.g.bias, g_bias)
    assert rows["h"].activation == "none (output layer)"
    # xavier for tanh: std = gain * sqrt(2 / (fan_in + fan_out))
    assert rows["a"].std_after == pytest.approx(5 / 3 * math.sqrt(2 / 12), rel=0.35)
    table = str(init_for_activation(model, gelu="xavier"))
    assert "unknown activation Hardswish" in table and "layer" in table.splitlines()[0]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.LeakyReLU(0.1), nn.Dropout(0.1),
                                  nn.Linear(16, 3))

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow defeats symbolic tracing
            return self.body(x)
        return self.body(-x)


def test_fallback_to_module_order_with_warning():
    with pytest.warns(UserWarning, match="registration order"):
        rows = init_for_activation(Untraceable())
    assert [r.found_by for r in rows] == ["module order"] * 2
    assert "a=0.1" in rows[0].init
    assert rows[1].activation == "none (output layer)"


def test_invalid_options():
    with pytest.raises(ValueError, match="gelu must be one of"):
        init_for_activation(nn.Linear(2, 2), gelu="he")
    with pytest.raises(TypeError, match="nn.Module"):
        init_for_activation("model")
    with pytest.raises(ValueError, match="tol"):
        lsuv_(nn.Linear(2, 2), torch.randn(3, 2), tol=0)


def test_lsuv_gives_unit_output_std_and_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Dropout(0.2), nn.Linear(64, 64),
                          nn.ReLU(), nn.BatchNorm1d(64), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 5))
    model.train()
    model[2].eval()  # a mixed state must come back exactly
    batch = torch.randn(256, 20) * 3.0
    report = lsuv_(model, batch, tol=LSUV_TOL)
    assert model.training and not model[2].training and model[5].training
    assert len(report) == 4 and all(r.converged for r in report)
    outs = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, k=k: outs.__setitem__(k, o))
             for k, m in enumerate(model) if isinstance(m, nn.Linear)]
    model.eval()
    with torch.no_grad():
        model(batch)
    for h in hooks:
        h.remove()
    assert len(outs) == 4
    for k, out in outs.items():
        assert abs(float(out.std()) - 1.0) < LSUV_TOL, (k, float(out.std()))
    assert not model[0]._forward_hooks  # lsuv_ removed its hooks
    assert "out_std_final" in str(report)


class TinyGPT(nn.Module):
    def __init__(self, n_layers=6, d=64):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(n_layers):
            blk = nn.Module()
            blk.attn = nn.Module()
            blk.attn.qkv = nn.Linear(d, 3 * d)
            blk.attn.proj = nn.Linear(d, d)
            blk.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
            self.blocks.append(blk)


def test_scale_residual_branches_gpt2_and_zero():
    torch.manual_seed(0)
    model = TinyGPT(n_layers=6, d=64)
    rows = scale_residual_branches_(model, ["blocks.*.attn.proj", "blocks.*.mlp"])
    assert len(rows) == 12 and rows[1].layer == "blocks.0.mlp.2"
    expected = 0.02 / math.sqrt(12)  # 2L = 12 residual branches
    w = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks]
                  + [b.mlp[2].weight.flatten() for b in model.blocks])
    assert float(w.detach().std()) == pytest.approx(expected, rel=GPT2_STD_RTOL)
    assert all(bool(torch.all(b.attn.proj.bias == 0)) for b in model.blocks)
    qkv_std = float(model.blocks[0].attn.qkv.weight.detach().std())
    assert qkv_std > 5 * expected  # untouched

    scale_residual_branches_(model, [b.attn.proj for b in model.blocks], n_layers=2)
    proj = torch.cat([b.attn.proj.weight.flatten() for b in model.blocks])
    assert float(proj.detach().std()) == pytest.approx(0.02 / 2, rel=GPT2_STD_RTOL)

    scale_residual_branches_(model, "blocks.*.mlp.2", mode="zero")
    assert all(bool(torch.all(b.mlp[2].weight == 0)) for b in model.blocks)

    with pytest.raises(ValueError, match="no module matched"):
        scale_residual_branches_(model, "decoder.*.out")
    with pytest.raises(ValueError, match="mode must be one of"):
        scale_residual_branches_(model, "blocks.*.mlp", mode="deepnorm")
