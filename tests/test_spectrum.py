"""gt.spectrum against an explicit Jacobian + SVD reference, and against mean-field theory."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.report.spectrum_section import render_spectrum_section
from gradtrace.preflight import END_TO_END, default_blocks

SVD_RTOL = 1e-4          # singular values vs the explicit reference
POWER_RTOL = 0.01        # top singular value from the matrix-free method vs exact
HUTCHINSON_RTOL = 0.15   # Hutchinson gain (16 probes) vs exact
CHI1_RTOL = 0.05         # measured per-layer gain vs mean-field χ₁


def reference_singular_values(fn, x: torch.Tensor) -> np.ndarray:
    """Slow reference: torch.autograd.functional.jacobian one example at a time + full SVD."""
    out = []
    for i in range(x.shape[0]):
        J = torch.autograd.functional.jacobian(lambda t: fn(t.unsqueeze(0))[0], x[i])
        out.append(torch.linalg.svd(J.reshape(-1, x[i].numel()).double())[1].numpy())
    return np.stack(out)


def _rel(a: np.ndarray, b: np.ndarray, dtype: torch.dtype = torch.float32) -> float:
    """Largest relative error per value. A singular value below 10·√eps·σ_max is
    at rounding level of the Jacobian entries themselves (LayerNorm's mean direction is
    exactly 0), so it is compared with that floor as denominator."""
    floor = 10 * math.sqrt(torch.finfo(dtype).eps) * np.abs(b[:, :1])
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), floor)))


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(),
                         nn.LayerNorm(16), nn.Linear(16, 7), nn.Sigmoid())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_spectrum_matches_reference_svd(dtype):
    model = _small_model().to(dtype)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(1)).to(dtype)
    spec = gt.spectrum(model, x, n_samples=5)
    assert spec.blocks == ["0", "2", "5"]
    assert spec.members("2") == ["2", "3", "4"]
    seq = list(model)
    fns = {"0": nn.Sequential(*seq[0:2]), "2": nn.Sequential(*seq[2:5]), "5": nn.Sequential(*seq[5:])}
    h = x
    for name in spec.blocks:
        ref = reference_singular_values(fns[name], h.detach())
        got = spec.singular_values(name)
        assert got.shape == ref.shape
        assert np.all(np.diff(got, axis=1) <= 0), "descending"
        assert _rel(got, ref, dtype) < SVD_RTOL
        # gain = trace(JᵀJ) / input width
        assert spec.gain(name) == pytest.approx(float((ref**2).sum(1).mean() / h.shape[1]), rel=SVD_RTOL)
        assert spec.method(name) == "full"
        h = fns[name](h).detach()
    ref = reference_singular_values(model, x)
    assert _rel(spec.end_to_end().singular_values, ref, dtype) < SVD_RTOL
    assert spec.singular_values(END_TO_END).shape == (5, 7)


def test_forward_mode_path_matches_reference():
    """A widening block (out > in) is built with JVPs; same answer."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 20))
    x = torch.randn(3, 6)
    spec = gt.spectrum(model, x, blocks=["0"])
    ref = reference_singular_values(model[0], x)
    assert _rel(spec.singular_values("0"), ref) < SVD_RTOL


def test_lanczos_top_value_and_hutchinson_gain():
    torch.manual_seed(3)
    width = 600
    model = nn.Sequential(nn.Linear(width, width), nn.Tanh())
    x = torch.randn(3, width)
    exact = gt.spectrum(model, x, method="full", end_to_end=False)
    approx = gt.spectrum(model, x, method="lanczos", k=4, end_to_end=False)
    assert approx.method("0") == "lanczos"
    s_ex, s_ap = exact.singular_values("0"), approx.singular_values("0")
    assert s_ap.shape == (3, 8)
    assert np.max(np.abs(s_ap[:, 0] / s_ex[:, 0] - 1)) < POWER_RTOL
    assert approx.gain("0") == pytest.approx(exact.gain("0"), rel=HUTCHINSON_RTOL)
    # "auto" switches to the matrix-free method above full_max
    auto = gt.spectrum(model, x, full_max=256, end_to_end=False)
    assert auto.method("0") == "lanczos"


def _gauss_hermite_chi1(sigma_w2: float, sigma_b2: float, n: int = 80) -> float:
    """Independent reference: tanh mean-field fixed point with numpy's Gauss–Hermite nodes."""
    z, w = np.polynomial.hermite.hermgauss(n)  # weight exp(-x²): z·√2 is standard normal
    z, w = z * math.sqrt(2), w / math.sqrt(math.pi)
    q = 1.0
    for _ in range(1000):
        q = sigma_w2 * float(w @ np.tanh(math.sqrt(q) * z) ** 2) + sigma_b2
    return sigma_w2 * float(w @ (1 - np.tanh(math.sqrt(q) * z) ** 2) ** 2)


@pytest.mark.parametrize("sigma_w2", [1.0, 1.76, 3.0], ids=["ordered", "critical", "chaotic"])
def test_gain_matches_mean_field_chi1(sigma_w2):
    width, depth, skip, sigma_b2 = 512, 16, 6, 0.05
    gen = torch.Generator().manual_seed(4)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        with torch.no_grad():
            lin.weight.normal_(0, math.sqrt(sigma_w2 / width), generator=gen)
            lin.bias.normal_(0, math.sqrt(sigma_b2), generator=gen)
        layers.append(nn.Sequential(lin, nn.Tanh()))
    net = nn.Sequential(*layers)
    spec = gt.spectrum(net, torch.randn(2, width, generator=gen), n_samples=2, end_to_end=False)
    assert len(spec.blocks) == depth
    measured = float(np.mean([spec.gain(b) for b in spec.blocks[skip:]]))
    chi1 = _gauss_hermite_chi1(sigma_w2, sigma_b2)
    assert measured == pytest.approx(chi1, rel=CHI1_RTOL)
    from gradtrace.preflight import mean_field
    assert mean_field("tanh", sigma_w2, sigma_b2)["chi1"] == pytest.approx(chi1, rel=1e-6)


def test_default_blocks_and_selection():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.ff = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

        def forward(self, x, scale=1.0):
            return x + scale * self.ff(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(Layer() for _ in range(3))
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x, scale=0.5)
            return self.head(x)

    torch.manual_seed(5)
    net = Net()
    assert default_blocks(net) == [["layers.0"], ["layers.1"], ["layers.2"]]
    spec = gt.spectrum(net, torch.randn(4, 8))
    assert spec.blocks == ["layers.0", "layers.1", "layers.2"]
    spec = gt.spectrum(net, torch.randn(4, 8), blocks="layers.*.ff.0")
    assert spec.blocks == ["layers.0.ff.0", "layers.1.ff.0", "layers.2.ff.0"]
    with pytest.raises(ValueError, match="blocks="):
        gt.spectrum(net, torch.randn(4, 8), blocks="nope.*")
    with pytest.raises(ValueError, match="method="):
        gt.spectrum(net, torch.randn(4, 8), method="svd")
    with pytest.raises(ValueError, match="n_samples"):
        gt.spectrum(net, torch.randn(4, 8), n_samples=0)
    with pytest.raises(TypeError, match="model"):
        gt.spectrum("not a model", torch.randn(4, 8))
    with pytest.raises(KeyError, match="no block"):
        spec.gain("head")


def test_model_left_unchanged():
    model = _small_model()
    model.train()
    model[2].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    gt.spectrum(model, torch.randn(4, 12))
    gt.spectrum(model, torch.randn(4, 12), method="lanczos", k=2)
    assert all(m.training for m in model.modules())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_isometry_orthogonal_vs_gaussian():
    """Pennington et al.: tanh at χ=1 keeps a narrow end-to-end spectrum with orthogonal
    weights; Gaussian weights spread it out with depth."""
    width, depth = 128, 24

    def net(init):
        torch.manual_seed(6)
        layers = []
        for _ in range(depth):
            lin = nn.Linear(width, width, bias=False)
            init(lin.weight)
            layers += [lin, nn.Tanh()]
        return nn.Sequential(*layers)

    x = 0.1 * torch.randn(4, width, generator=torch.Generator().manual_seed(7))
    orth = gt.spectrum(net(nn.init.orthogonal_), x).end_to_end()
    gauss = gt.spectrum(net(lambda w: nn.init.normal_(w, 0, width**-0.5)), x).end_to_end()
    assert orth.spread < 0.5
    assert gauss.spread > 5 * orth.spread


def test_dict_form_and_html_section():
    spec = gt.spectrum(_small_model(), torch.randn(4, 12))
    d = spec.to_dict()
    json.dumps(d)
    assert d["blocks"] == spec.blocks and len(d["rows"]) == 3
    assert set(d["histogram"]["counts"]) == set(spec.blocks) | {END_TO_END}
    assert "singular_values" in spec.to_dict(values=True)
    for src in (spec, d):
        html_text = render_spectrum_section(src)
        assert html_text.startswith("<section") and html_text.count("<svg") == 5
        assert "<script" not in html_text and "http://" not in html_text.replace("http://www.w3.org", "")
    with pytest.raises(TypeError):
        render_spectrum_section([1, 2])
