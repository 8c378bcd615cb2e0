"""A CPU-sized subset of the realistic suite (bench/realistic.py): real model code on shipped data.

Healthy runs must get no finding at all; broken runs must get the right root cause first,
the right origin and fixes written for the run (dtype, device, learning rate at the step).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.advise import fixes_for
from gradtrace.diagnose import Thresholds
from gradtrace.trace import Trace

pytest.importorskip("sklearn")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
import realistic as bench  # noqa: E402
from realistic_runs import RUNS  # noqa: E402


def _run(name):
    torch.manual_seed(0)
    res = RUNS[name].fn({"out": None, "activations_every": 10})
    return res.trace, gt.diagnose(res.trace)


@pytest.mark.parametrize("name", ["cnn_bn_digits", "mlp_bn_cancer"])
def test_batchnorm_runs_with_hard_batches_are_healthy(name):
    # issue 11: one hard example or BatchNorm batch statistics is not a loss spike
    trace, findings = _run(name)
    assert findings == [], [f.evidence.get("summary") for f in findings]


def test_float16_adamw_nan_is_the_optimizer_step_with_the_eps_fix():
    pytest.importorskip("transformers")
    trace, findings = _run("gpt2_fp16_adamw")
    top = findings[0]
    assert top.kind == "nonfinite"
    assert top.evidence["cause"] == "optimizer_step" and top.evidence["phase"] == "optimizer_step"
    cev = top.evidence["cause_evidence"]
    assert cev["dtype"] == "float16" and cev["updated_at_step"] == 0 and cev["params_nonfinite_after_step"] > 0
    # the eps is the smallest normal float16, computed from the run's dtype
    tiny = torch.finfo(torch.float16).tiny
    assert f"eps={tiny:.2g}".replace("e-05", "e-05") in top.fixes[0].code or "eps=6.1e-05" in top.fixes[0].code
    assert "AdamW" in top.fixes[0].code
    # nothing in the evidence claims a measured update ratio of 0 for a nan update
    assert cev["max_update_ratio"] != 0.0


def test_log_of_softmax_underflow_is_attributed_to_the_loss():
    trace, findings = _run("log_softmax_loss")
    nf = next(f for f in findings if f.kind == "nonfinite")
    assert nf.evidence["phase"] == "loss" and nf.layers == []
    assert "F.cross_entropy" in nf.fixes[0].code
    kinds = [f.kind for f in findings]
    assert kinds.index("nonfinite") < kinds.index("loss_nonfinite")


def test_dead_units_from_negative_biases_come_first_and_name_the_biases():
    trace, findings = _run("relu_bias_neg3")
    top = findings[0]
    assert top.kind == "dead_units"
    assert top.evidence["biases"] and all(b.endswith(".bias") for b in top.evidence["biases"])
    feeding = next(iter(top.evidence["feeding"].values()))
    # the bias RMS recorded is the -3 we set (an independent reference: the model's init)
    assert feeding["bias_rms"] == pytest.approx(3.0, rel=1e-3)
    assert "nn.init.zeros_" in top.fixes[0].code


def test_early_divergence_is_caught_at_once_and_lead_times_never_negative():
    pytest.importorskip("transformers")
    trace, findings = _run("gpt2_lr_high")
    steps, loss = trace.scalar("loss", with_steps=True)
    dmg = bench.damage_step(steps.tolist(), loss.tolist())
    live = bench.live_detection(trace, gt.diagnose, dmg)
    assert dmg is not None and live is not None and dmg - live >= 0
    spike = next(f for f in findings if f.kind == "loss_spike")
    assert spike.severity == "error" and spike.evidence["diverged_at"] <= dmg


def _tiny_encoder_trace(norm_first: bool) -> Trace:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=False), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with gt.watch(model, opt, activations_every=1) as mon:
        for _ in range(2):
            loss = model(torch.randn(4, 5, 16)).pow(2).mean()
            mon.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon.trace


def test_post_ln_blocks_get_norm_first_not_add_a_residual():
    post = fixes_for("vanishing_gradients", _tiny_encoder_trace(False), ["0.layers.0.linear1"])
    assert "norm_first=True" in post[0].code and "already residual" in post[0].action
    pre = fixes_for("vanishing_gradients", _tiny_encoder_trace(True), ["0.layers.0.linear1"])
    assert not any("residual branch" in f.action for f in pre)


def test_fixes_use_the_runs_device_and_the_lr_at_the_failing_step():
    meta = {"modules": [], "params": [{"name": "w", "shape": [2], "dtype": "float32", "module": ""}]}
    recs = [{"step": s, "scalars": {"loss": 1.0 if s < 6 else math.nan, "lr": 0.1 if s < 6 else 0.001}}
            for s in range(10)]
    trace = Trace(meta, recs)
    (f,) = [x for x in gt.diagnose(trace) if x.kind == "loss_nonfinite"]
    lr = next(x for x in f.fixes if "learning rate" in x.action)
    assert "0.1 in this run for the update before step 6" in lr.action and "group['lr'] = 0.01" in lr.code   # not the last 0.001
    dt = next(x for x in f.fixes if "autocast" in x.code)
    assert "device_type=next(model.parameters()).device.type" in dt.code     # not recorded: computed
    cpu = fixes_for("nonfinite", {"device": "cpu"}, [], evidence={"cause": "overflow"})
    assert "device_type='cpu'" in " ".join(x.code for x in cpu)
    assert "parameters are" not in " ".join(x.action for x in fixes_for("nonfinite", None, [], evidence={}))


def test_learning_rate_ramp_is_caught_while_the_loss_climbs():
    # issue 11: a slow divergence (AdamW, lr x1.08 a step) is reported >= 3 steps before the
    # damage, as a climb of the loss, and a live run says it at the same step as the end
    pytest.importorskip("transformers")
    trace, findings = _run("gpt2_lr_ramp")
    steps, loss = trace.scalar("loss", with_steps=True)
    dmg = bench.damage_step(steps.tolist(), loss.tolist())
    live = bench.live_detection(trace, gt.diagnose, dmg)
    assert findings[0].kind == "loss_spike" and "climb_at" in findings[0].evidence
    assert dmg is not None and live is not None and dmg - live >= bench.SLOW_LEAD
    assert live == findings[0].first_step == findings[0].evidence["climb_at"]
    # the climb is really one: the loss rose at every step into it
    c0, c1 = findings[0].evidence["climb_started_at"], findings[0].evidence["climb_at"]
    seg = loss[(steps >= c0) & (steps <= c1)]
    assert seg.size >= 5 and (seg[1:] > seg[:-1]).all()


@pytest.mark.slow          # 60 steps of a 12-block encoder: ~15 s on 2 cores
def test_post_ln_stack_vanishing_is_counted_in_blocks():
    # issue 11: 12 post-LN blocks lose ~1e-4 from the embedding to the head, ~0.89 per watched
    # module (5 a block): the depth rule counts blocks, so it is found
    trace, findings = _run("postln_deep")
    top = findings[0]
    assert top.kind == "vanishing_gradients" and [f.kind for f in findings] == ["vanishing_gradients"]
    assert top.evidence["layers_in_profile"] == 14          # emb, 12 blocks, head
    assert top.evidence["per_layer_gain"] < Thresholds().vanish_gain
    assert "each block" in top.evidence["summary"] and top.layers[0] == "emb"
    # emb and head are one-module units: the ratio is a median of their recorded per-step ratios
    _, _, og = trace.matrix("outgrad_norm", ["emb", "head"])
    per_step = og[:, 0] / og[:, 1]
    per_step = per_step[np.isfinite(per_step)]
    assert per_step.min() <= top.evidence["first_to_last_outgrad_ratio"] <= per_step.max()
    assert top.evidence["first_to_last_outgrad_ratio"] < Thresholds().vanish_total


def test_gated_rnn_that_learns_to_remember_is_healthy(tmp_path):
    # issue 11: the demo's LSTM forgets at initialisation (time ratio ~1e-11 < 1e-3, which the
    # old rule reported by step 20) and learns to remember as Adam trains its gates
    from gradtrace.demo.experiments import QUICK, scaled, train_rnn
    trace = gt.load(train_rnn(str(tmp_path / "lstm"), "lstm", scaled(QUICK, rnn_steps=120)))
    steps, prof = trace.series("time_grad_norm", "rnn", with_steps=True)
    ratio = prof[:, 0] / prof[:, -1]
    assert ratio[0] < Thresholds().time_vanish_ratio < ratio.max()      # starts vanished, climbs out
    assert gt.diagnose(trace) == []
