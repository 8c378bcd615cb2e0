"""gt.preflight on seeded scenarios, the CLI, and the 50-layer speed budget."""
from __future__ import annotations

import json
import math
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.cli import main as cli
from gradtrace.diagnose import KINDS, Finding
from gradtrace.preflight import PreflightResult, PreflightThresholds, mean_field

CHI1_RTOL = 0.05           # mean-field χ₁ vs measured backward gain, per hidden layer
NARROW_SPREAD = 1.0        # end-to-end spread counted as "narrow" (isometry)
SPREAD_FACTOR = 10.0       # Gaussian weights at the same χ₁ spread at least this much more
SAT_ATOL = 0.03            # saturated fraction, ≥ 2048 outputs per layer vs mean-field theory


def mlp(depth: int, width: int, act: type, init, d_in: int = 64, d_out: int = 10, seed: int = 0):
    torch.manual_seed(seed)
    layers, w = [], d_in
    for _ in range(depth - 1):
        lin = nn.Linear(w, width)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
        w = width
    head = nn.Linear(w, d_out)
    init(head.weight)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, head)


def kaiming(w):
    nn.init.kaiming_normal_(w, nonlinearity="relu")


def batch(d_in: int = 64, n: int = 32) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(1))


def kinds(result) -> list[str]:
    return [f.kind for f in result]


def test_deep_sigmoid_vanishes():
    r = gt.preflight(mlp(20, 128, nn.Sigmoid, lambda w: None), batch(), compute_spectrum=False)
    assert "vanishing_gradients" in kinds(r)
    f = r[kinds(r).index("vanishing_gradients")]
    assert f.first_step is None and f.last_step is None
    assert f.layers[0] == "0"  # the first block is the most affected
    assert f.evidence["grad_ratio_first_last"] < 1e-3
    assert any("ReLU" in fx.action for fx in f.fixes)


def test_relu_xavier_shrinks():
    r = gt.preflight(mlp(30, 128, nn.ReLU, nn.init.xavier_normal_), batch(), compute_spectrum=False)
    assert "shrinking_activations" in kinds(r)
    assert r.summary["forward_ratio_last_first"] < 1e-2


def test_relu_kaiming_is_healthy_and_matches_mean_field():
    r = gt.preflight(mlp(30, 256, nn.ReLU, kaiming), batch())
    assert list(r) == [] and r.healthy
    rows = r.summary["blocks"]
    hidden = [row for row in rows[1:-1]]
    measured = np.exp(np.mean(np.log([row["backward_gain"] for row in hidden])))
    predicted = np.mean([row["chi1_mean_field"] for row in hidden])
    assert measured == pytest.approx(predicted, rel=CHI1_RTOL)
    assert r.summary["mean_field"]["chi1"] == pytest.approx(1.0, rel=CHI1_RTOL)
    assert r.spectrum is not None and r.spectrum.blocks == [row["block"] for row in rows]


def test_tanh_orthogonal_critical_is_healthy_with_narrow_spectrum():
    def orth(w):
        nn.init.orthogonal_(w)

    def gauss(w):
        nn.init.normal_(w, 0, w.shape[1] ** -0.5)

    r = gt.preflight(mlp(30, 128, nn.Tanh, orth, d_in=128, d_out=128), 0.5 * batch(128))
    assert list(r) == []
    spread = r.summary["end_to_end"]["spread"]
    assert spread < NARROW_SPREAD
    g = gt.preflight(mlp(30, 128, nn.Tanh, gauss, d_in=128, d_out=128), 0.5 * batch(128))
    assert g.summary["end_to_end"]["spread"] > SPREAD_FACTOR * spread


def test_scaled_up_weights_explode():
    def big(w):
        kaiming(w)
        w.data.mul_(2.0)

    r = gt.preflight(mlp(30, 128, nn.ReLU, big), batch(), compute_spectrum=False)
    assert "exploding_gradients" in kinds(r)
    f = r[kinds(r).index("exploding_gradients")]
    assert any("clip_grad_norm_" in fx.code for fx in f.fixes)


def _scaled(gain: float):
    """Gaussian weights at ``gain`` × the tanh-critical scale (Xavier with gain 5/3)."""
    def init(w):
        nn.init.normal_(w, 0.0, gain * (5 / 3) / math.sqrt(w.shape[1]))
    return init


def test_saturated_fraction_matches_mean_field():
    """Measured fraction of tanh outputs beyond the recorder's bound vs mean-field theory,
    erfc(atanh(0.97)/√(2q)) at each layer's pre-activation variance q (wide layers)."""
    r = gt.preflight(mlp(6, 512, nn.Tanh, _scaled(2.5)), batch(n=64), compute_spectrum=False)
    rows = [row for row in r.summary["blocks"] if "saturated_fraction" in row]
    assert len(rows) == 5
    for row in rows:
        assert row["saturated_fraction"] == pytest.approx(row["saturated_mean_field"], abs=SAT_ATOL)
    q = r.summary["mean_field"]["q_star"]
    assert r.summary["mean_field"]["saturated_fraction"] == pytest.approx(
        math.erfc(math.atanh(0.97) / math.sqrt(2 * q)), rel=1e-12)
    assert rows[-1]["saturated_fraction"] > PreflightThresholds().saturated_frac


def test_chaotic_tanh_predicts_saturation_not_overflow():
    """Chaotic tanh (2.5× critical): deep enough to explode, the prediction is saturation
    (error) with the explosion a warning; the shallow twin, as saturated, is no finding;
    an exploding ReLU net (unbounded) keeps its exploding error and no saturation."""
    deep = gt.preflight(mlp(20, 64, nn.Tanh, _scaled(2.5)), batch(), compute_spectrum=False)
    sev = {f.kind: f.severity for f in deep}
    assert sev == {"exploding_gradients": "warning", "saturated_units": "error"}, sev
    f = deep[kinds(deep).index("saturated_units")]
    assert f.evidence["median_saturated_fraction"] > PreflightThresholds().saturated_frac
    assert f.evidence["mean_field_saturated_fraction"] == pytest.approx(
        f.evidence["median_saturated_fraction"], abs=SAT_ATOL)
    shallow = gt.preflight(mlp(6, 64, nn.Tanh, _scaled(2.5)), batch(), compute_spectrum=False)
    assert kinds(shallow) == []
    assert all(row["saturated_fraction"] > PreflightThresholds().saturated_frac
               for row in shallow.summary["blocks"] if "saturated_fraction" in row)

    def big(w):
        kaiming(w)
        w.data.mul_(2.0)
    relu = gt.preflight(mlp(30, 128, nn.ReLU, big), batch(), compute_spectrum=False)
    sev = {f.kind: f.severity for f in relu}
    assert sev.get("exploding_gradients") == "error" and "saturated_units" not in sev


class RNNModel(nn.Module):
    def __init__(self, sigma_max: float | None):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(16, 64, batch_first=True)
        self.head = nn.Linear(64, 4)
        if sigma_max is not None:
            with torch.no_grad():
                w = self.rnn.weight_hh_l0
                w.mul_(sigma_max / torch.linalg.matrix_norm(w, 2))

    def forward(self, x):
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


def test_rnn_with_small_recurrent_weights_vanishes_through_time():
    x = torch.randn(8, 40, 16, generator=torch.Generator().manual_seed(2))
    r = gt.preflight(RNNModel(0.5), x)
    assert "vanishing_through_time" in kinds(r)
    f = r[kinds(r).index("vanishing_through_time")]
    assert f.layers == ["rnn"]
    rec = r.summary["recurrent"][0]
    assert rec["sigma_max_whh"] == pytest.approx(0.5, rel=1e-4)
    assert rec["pascanu_bound"] == pytest.approx(0.5**40, rel=1e-3)
    # the measured Jacobian obeys Pascanu's bound: ‖∂h_T/∂h_0‖ ≤ (γ σ_max)^T
    assert rec["jacobian_norm"] <= rec["pascanu_bound"] * (1 + 1e-3)
    curve = rec["norm_over_time"]
    assert len(curve) == 40 and curve[-1] < curve[0]
    assert any("LSTM" in fx.action for fx in f.fixes)


def test_model_left_unchanged_and_result_shape():
    model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.1),
                          nn.Linear(32, 4))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 16)
    rng = torch.get_rng_state()
    r = gt.preflight(model, x)
    assert torch.equal(rng, torch.get_rng_state())
    assert isinstance(r, PreflightResult) and isinstance(r, list)
    assert all(isinstance(f, Finding) and f.kind in KINDS for f in r)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    json.dumps(r.to_dict())
    assert "bwd gain" in r.table()


def test_thresholds_are_overridable_and_validated():
    model = mlp(8, 64, nn.Tanh, lambda w: None)
    r = gt.preflight(model, batch(), compute_spectrum=False)
    ratio = r.summary["grad_ratio_first_last"]
    strict = gt.preflight(model, batch(), compute_spectrum=False,
                          thresholds=PreflightThresholds(vanishing_ratio=ratio * 2))
    assert "vanishing_gradients" in kinds(strict)
    with pytest.raises(ValueError, match="vanishing_ratio"):
        PreflightThresholds(vanishing_ratio=-1)
    with pytest.raises(TypeError, match="thresholds"):
        gt.preflight(model, batch(), thresholds={"vanishing_ratio": 1})
    with pytest.raises(ValueError, match="example_input of shape"):
        gt.preflight(model, torch.randn(4, 7))
    with pytest.raises(ValueError, match="activation="):
        mean_field("swish", 1.0)


def test_fifty_layers_width_512_all_blocks_matrix_free():
    # Its time (budget 10 s on 2 cores) is printed by bench/spectrum.py: a timed test
    # fails whenever other work shares the cores, so the budget lives in the bench.
    model = mlp(50, 512, nn.ReLU, kaiming, d_in=512)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(3))
    r = gt.preflight(model, x)
    assert len(r.spectrum.blocks) == 50
    assert {r.spectrum.method(b) for b in r.spectrum.blocks[:-1]} == {"lanczos"}


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    (tmp_path / "pf_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def sigmoid_net():
            torch.manual_seed(0)
            return nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(32, 32), nn.Sigmoid())])

        class KaimingNet(nn.Sequential):
            def __init__(self):
                torch.manual_seed(0)
                layers = []
                for _ in range(6):
                    lin = nn.Linear(32, 32)
                    nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
                    nn.init.zeros_(lin.bias)
                    layers += [lin, nn.ReLU()]
                super().__init__(*layers)

        def broken():
            raise RuntimeError("boom")
    """))
    monkeypatch.chdir(tmp_path)
    yield "pf_models"
    sys.modules.pop("pf_models", None)


def test_cli_exit_codes(factory_module, capsys):
    assert cli(["preflight", f"{factory_module}:KaimingNet", "--input-shape", "16,32"]) == 0
    assert "healthy" in capsys.readouterr().out
    assert cli(["preflight", f"{factory_module}:sigmoid_net", "--input-shape", "16,32", "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["findings"][0]["kind"] == "vanishing_gradients"
    assert out["findings"][0]["first_step"] is None and "summary" in out
    for argv in (["nomodule_xyz:f", "--input-shape", "4,32"],
                 [f"{factory_module}:missing", "--input-shape", "4,32"],
                 [f"{factory_module}:broken", "--input-shape", "4,32"],
                 [f"{factory_module}:KaimingNet", "--input-shape", "4,31"],
                 [f"{factory_module}:KaimingNet", "--input-shape", "four"],
                 [f"{factory_module}:KaimingNet", "--input-shape", "4,32", "--dtype", "cplx"],
                 ["no_colon", "--input-shape", "4,32"]):
        assert cli(["preflight", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err


def test_mean_field_helper_known_values():
    assert mean_field("relu", 2.0)["chi1"] == pytest.approx(1.0, abs=1e-12)
    assert mean_field("linear", 0.81)["depth_scale"] == pytest.approx(-1 / math.log(0.81))
