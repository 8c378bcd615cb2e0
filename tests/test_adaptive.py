"""AutoClip and ZClip (remedies.adaptive) against plain-float references; resuming."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from clip_models import REF_RTOL, SEED
from gradtrace.remedies.adaptive import AutoClip, ZClip


def _norm_stream(n_steps, seed=SEED):
    """(param, list of grads) whose norms vary, with occasional spikes."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for t in range(n_steps):
        scale = 1.0 + 0.3 * math.sin(t) + (25.0 if t % 17 == 16 else 0.0)
        grads.append(torch.randn(6, generator=gen) * scale)
    return grads

def _run(clipper, grads):
    p = nn.Parameter(torch.zeros(6))
    out, totals = [], []
    for g in grads:
        p.grad = g.clone()
        totals.append(float(clipper(p)))
        out.append(p.grad.clone())
    return out, totals

@pytest.mark.parametrize("history", [None, 7])
def test_autoclip_matches_float_reference(history):
    grads = _norm_stream(40)
    out, totals = _run(AutoClip(percentile=10, history=history), grads)
    hist = []
    for g, got, total in zip(grads, out, totals):
        norm = math.sqrt(sum(float(v) ** 2 for v in g))
        assert total == pytest.approx(norm, rel=REF_RTOL)
        hist.append(norm)
        window = hist if history is None else hist[-history:]
        thr = float(np.percentile(window, 10))
        coef = min(1.0, thr / (norm + 1e-6))
        torch.testing.assert_close(got, g * coef, rtol=REF_RTOL, atol=1e-7)

@pytest.mark.parametrize("history", [None, 7])
def test_autoclip_resume_identical(history):
    grads = _norm_stream(30)
    full, _ = _run(AutoClip(10, history), grads)
    first = AutoClip(10, history)
    part1, _ = _run(first, grads[:13])
    state = copy.deepcopy(first.state_dict())
    resumed = AutoClip(50, None)
    resumed.load_state_dict(state)
    part2, _ = _run(resumed, grads[13:])
    for a, b in zip(full, part1 + part2):
        assert torch.equal(a, b)
    assert resumed.count == 30

def test_autoclip_bad_args():
    with pytest.raises(ValueError, match="percentile"):
        AutoClip(percentile=150)
    with pytest.raises(ValueError, match="history"):
        AutoClip(history=0)

def test_autoclip_percentile_is_not_a_fraction():
    with pytest.raises(ValueError, match=r"percentile, not a fraction.*percentile=90"):
        AutoClip(percentile=0.9)
    for bad in (0, -5, 100.5):
        with pytest.raises(ValueError, match=r"percentile must be in \[1, 100\]"):
            AutoClip(percentile=bad)
    with pytest.raises(TypeError, match="percentile"):
        AutoClip(percentile="10")
    assert AutoClip(percentile=np.int64(10)).percentile == 10.0
    assert AutoClip(percentile=100).percentile == 100.0

def _zclip_reference(norms, alpha, z_thresh, warmup, mode, eps=1e-6):
    """Plain-float ZClip: returns the coefficient applied at each step."""
    buf, mean, var, coefs = [], None, None, []
    for g in norms:
        if mean is None:
            buf.append(g)
            if len(buf) >= warmup:
                mean = sum(buf) / len(buf)
                var = sum((x - mean) ** 2 for x in buf) / len(buf)
            coefs.append(1.0)
            continue
        std = math.sqrt(var)
        z = (g - mean) / (std + eps)
        x = g
        if z > z_thresh:
            if mode == "adaptive":
                x = mean + z_thresh ** 2 * std / z
            elif mode == "mean":
                x = mean
            else:
                x = mean + z_thresh * std
        coefs.append(min(1.0, x / (g + 1e-6)) if g > x else 1.0)
        mean = alpha * mean + (1 - alpha) * x
        var = alpha * var + (1 - alpha) * (x - mean) ** 2
    return coefs

@pytest.mark.parametrize("mode", ["adaptive", "mean", "fixed"])
def test_zclip_matches_float_reference(mode):
    grads = _norm_stream(60)
    warmup = 10
    out, totals = _run(ZClip(alpha=0.9, z_thresh=2.0, warmup=warmup, mode=mode), grads)
    norms = [math.sqrt(sum(float(v) ** 2 for v in g)) for g in grads]
    coefs = _zclip_reference(norms, 0.9, 2.0, warmup, mode)
    assert sum(c < 1.0 for c in coefs) >= 2  # spikes were clipped
    for g, got, c, total, n in zip(grads, out, coefs, totals, norms):
        assert total == pytest.approx(n, rel=REF_RTOL)
        torch.testing.assert_close(got, g * c, rtol=REF_RTOL, atol=1e-7)

def test_zclip_resume_identical_and_state_dict():
    grads = _norm_stream(50)
    full, _ = _run(ZClip(warmup=8), grads)
    for k in (5, 20):  # interrupted during and after warmup
        first = ZClip(warmup=8)
        part1, _ = _run(first, grads[:k])
        state = copy.deepcopy(first.state_dict())
        resumed = ZClip(alpha=0.5, warmup=3, mode="mean")
        resumed.load_state_dict(state)
        assert resumed.mode == "adaptive" and resumed.warmup == 8
        part2, _ = _run(resumed, grads[k:])
        for a, b in zip(full, part1 + part2):
            assert torch.equal(a, b)

def test_zclip_nonfinite_kept_out_of_statistics():
    z = ZClip(warmup=3)
    p = nn.Parameter(torch.zeros(2))
    for v in (1.0, 1.1, 0.9, 1.0):
        p.grad = torch.tensor([v, 0.0])
        z(p)
    mean, var = z.mean.clone(), z.var.clone()
    p.grad = torch.tensor([math.inf, 0.0])
    z(p)
    assert torch.equal(z.mean, mean) and torch.equal(z.var, var)

def test_zclip_bad_args():
    with pytest.raises(ValueError, match="mode must be one of"):
        ZClip(mode="zscore")
    with pytest.raises(ValueError, match="alpha"):
        ZClip(alpha=1.5)
    with pytest.raises(ValueError, match="warmup"):
        ZClip(warmup=0)
