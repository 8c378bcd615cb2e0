"""Adaptive gradient clipping (remedies.agc) against a per-unit float64 loop."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from clip_models import REF_RTOL, SEED, _make
from gradtrace.remedies.agc import adaptive_clip_grad_, agc_param_groups


def _agc_reference(param, grad, unit_dim, clip_factor, eps):
    """Explicit per-unit loop in float64."""
    w = param.detach().double()
    g = grad.detach().double().clone()
    if g.ndim <= 1:
        wn = max(float(w.norm()), eps)
        gn = float(g.norm())
        if gn / wn > clip_factor:
            g *= clip_factor * wn / max(gn, 1e-6)
        return g
    w = w.movedim(unit_dim, 0)
    g = g.movedim(unit_dim, 0)
    for i in range(g.shape[0]):
        wn = max(float(w[i].norm()), eps)
        gn = float(g[i].norm())
        if gn / wn > clip_factor:
            g[i] *= clip_factor * wn / max(gn, 1e-6)
    return g.movedim(0, unit_dim)

def test_agc_matches_loop_reference_including_conv_transpose():
    model = _make("cnn", scale=50.0)
    clip_factor, eps = 0.01, 1e-3
    groups = agc_param_groups(model, exclude=("fc",))
    names = [g.name for g in groups]
    assert "fc.weight" not in names and "fc.bias" not in names
    assert {g.name: g.unit_dim for g in groups}["up.weight"] == 1
    expected = {}
    for it in groups:
        if it.param.grad is not None:
            expected[it.name] = _agc_reference(it.param, it.param.grad, it.unit_dim,
                                               clip_factor, eps)
    fc_before = model.fc.weight.grad.clone()
    adaptive_clip_grad_(groups, clip_factor, eps)
    n_clipped_units = 0
    for it in groups:
        if it.param.grad is None:
            continue
        torch.testing.assert_close(it.param.grad.double(), expected[it.name],
                                   rtol=REF_RTOL, atol=1e-12)
        n_clipped_units += 1
    assert n_clipped_units >= 3
    assert torch.equal(model.fc.weight.grad, fc_before)

def test_agc_named_parameters_exclude_and_tensor_exclude():
    model = _make("mlp", scale=100.0)
    last = model[4]
    before = last.weight.grad.clone()
    adaptive_clip_grad_(model.named_parameters(), exclude=("4",))
    assert torch.equal(last.weight.grad, before)
    ref = _agc_reference(model[2].weight, model[2].weight.grad, 0, 0.01, 1e-3)
    torch.testing.assert_close(model[2].weight.grad.double(), ref, rtol=REF_RTOL, atol=0)

    model = _make("mlp", scale=100.0)
    before = model[4].weight.grad.clone()
    adaptive_clip_grad_(model.parameters(), exclude=[model[4].weight])
    assert torch.equal(model[4].weight.grad, before)
    with pytest.raises(ValueError, match="names"):
        adaptive_clip_grad_(model.parameters(), exclude=("4",))
    with pytest.raises(ValueError, match="clip_factor"):
        adaptive_clip_grad_(model.parameters(), clip_factor=0.0)
    with pytest.raises(TypeError, match="parameters must contain"):
        adaptive_clip_grad_([3])

def test_agc_grouped_conv_transpose():
    torch.manual_seed(SEED)
    layer = nn.ConvTranspose2d(4, 6, 3, groups=2)
    layer(torch.randn(2, 4, 5, 5)).pow(2).sum().mul(100).backward()
    (it,) = [g for g in agc_param_groups(layer) if g.name == "weight"]
    assert (it.unit_dim, it.groups) == (1, 2)
    w, g = layer.weight.detach().double(), layer.weight.grad.double().clone()
    # output channel j of group k is the slice [k*2:(k+1)*2, j]
    for k in range(2):
        for j in range(3):
            wn = max(float(w[2 * k:2 * k + 2, j].norm()), 1e-3)
            gn = float(g[2 * k:2 * k + 2, j].norm())
            if gn / wn > 0.01:
                g[2 * k:2 * k + 2, j] *= 0.01 * wn / gn
    adaptive_clip_grad_([it])
    torch.testing.assert_close(layer.weight.grad.double(), g, rtol=REF_RTOL, atol=0)

def test_agc_exclude_pattern_matching_nothing_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model(torch.randn(5, 3)).sum().backward()
    with pytest.raises(ValueError, match="'fc' matches no parameter"):
        adaptive_clip_grad_(model.named_parameters(), exclude=["fc"])
    with pytest.raises(ValueError, match="matches no parameter"):
        agc_param_groups(model, exclude=("head",))
    adaptive_clip_grad_(model.named_parameters(), exclude=["1"])    # the last layer: fine

def test_agc_float16_scale_applied_in_float32():
    # target unit norm clip_factor * ||W_i|| = 1e-4 and ||G_i|| = 4000: scale 2.5e-8,
    # which float16 rounds to 0 (its smallest subnormal is 6e-8)
    w = nn.Parameter(torch.full((2, 4), 0.005, dtype=torch.float16))
    w.grad = torch.full((2, 4), 2000.0, dtype=torch.float16)
    want = _agc_reference(w, w.grad, 0, 0.01, 1e-3).half()   # float64, rounded once
    assert torch.tensor(2.5e-8, dtype=torch.float16) == 0
    adaptive_clip_grad_([w], clip_factor=0.01)
    assert w.grad.dtype == torch.float16 and bool((w.grad != 0).all())
    F16_SUBNORMAL = 6e-8   # one float16 step at these magnitudes
    torch.testing.assert_close(w.grad, want, rtol=0, atol=F16_SUBNORMAL)
    unit = torch.linalg.vector_norm(w.grad.float(), dim=1)
    torch.testing.assert_close(unit, torch.full((2,), 1e-4), rtol=1e-2, atol=0)
