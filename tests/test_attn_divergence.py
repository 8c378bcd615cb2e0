"""The float16 attention-logit overflow (``bench/attn_overflow.py``): where the damage starts and what gradtrace finds, as measured."""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import torch

import gradtrace as gt

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
from attn_overflow import AttnLM, train   # noqa: E402
from realistic import SLOW_LEAD, damage_step, live_detection   # noqa: E402

STEPS = 175
F16_MAX = float(torch.finfo(torch.float16).max)
#: Measured on seed 0, one CPU thread (the float16 trajectory is chaotic: thread count
#: changes the reduction order): the first non-finite loss ...
DAMAGE = 166
#: ... and the first recorded step (activations every 10) whose logits hold an inf.
FIRST_INF_RECORDED = 160
#: |q(x)| rebuilt from the recorder's mean and std: ddof 0 or 1 over 16384 values differ by 3e-5.
NORM_RTOL = 1e-3


def _run(control):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe: list = []
        res = train({"out": None}, STEPS, control=control, probe=probe)
    finally:
        torch.set_num_threads(threads)
    return res, probe, gt.diagnose(res.trace)


def res_trace(run):
    return run[0].trace


@pytest.fixture(scope="module")
def broken():
    return _run(None)


@pytest.fixture(scope="module")
def qkln():
    return _run("qkln")


@pytest.fixture(scope="module")
def scaled():
    return _run("scaled")


def test_the_logits_overflow_float16_and_the_loss_follows(broken):
    res, probe, _ = broken
    steps, losses = res.trace.series("loss", with_steps=True)
    assert damage_step(steps.tolist(), losses.tolist()) == DAMAGE
    assert all(math.isfinite(v) for v in res.losses[:DAMAGE]) and not math.isfinite(res.losses[DAMAGE])
    step, _, max_logit, q_norm, k_norm = probe[DAMAGE]
    assert step == DAMAGE
    # the first non-finite number is the float16 product: q and k themselves are finite
    assert math.isinf(max_logit) and math.isfinite(q_norm) and math.isfinite(k_norm)
    finite = [p[2] for p in probe[:DAMAGE] if math.isfinite(p[2])]
    assert finite[0] < 10.0                      # starts as ordinary logits ...
    assert max(finite) > 0.9 * F16_MAX           # ... and climbs to the edge of float16
    assert max(finite) <= F16_MAX


def test_the_recorder_sees_the_growth_and_where_the_inf_is(broken):
    res, probe, _ = broken
    trace = res.trace
    n = 8 * 32 * 64                              # batch x seq x dim of the q projection
    q_steps, q_std = trace.series("out_std", "blocks.0.q", with_steps=True)
    _, q_mean = trace.series("out_mean", "blocks.0.q", with_steps=True)
    for s, sd, mu in zip(q_steps.tolist(), q_std.tolist(), q_mean.tolist()):
        if s < DAMAGE:
            assert math.sqrt(n * (sd * sd + mu * mu)) == pytest.approx(probe[s][3], rel=NORM_RTOL)
    assert probe[150][3] / probe[0][3] > 30      # |q(x)| grew ~57x
    l_steps, l_max = trace.series("out_maxabs", "blocks.0.logits", with_steps=True)
    _, l_bad = trace.series("out_nonfinite", "blocks.0.logits", with_steps=True)
    before = [(s, m) for s, m in zip(l_steps.tolist(), l_max.tolist()) if s < FIRST_INF_RECORDED]
    # the recorder's max over all positions bounds the probe's max over the causal ones
    assert all(m >= probe[s][2] for s, m in before)
    assert sum(m == probe[s][2] for s, m in before) >= len(before) // 2
    first_bad = min(s for s, b in zip(l_steps.tolist(), l_bad.tolist()) if b > 0)
    assert first_bad == FIRST_INF_RECORDED


#: Measured: the first activation record whose logits are within OVERFLOW_HEADROOM of 65504
#: while rising (40640 at step 100, after 17808 .. 29504 at steps 60 .. 90).
NEAR_OVERFLOW = 100


def test_findings_as_measured(broken):
    _, probe, findings = broken
    assert [(f.kind, f.first_step) for f in findings] == [
        ("near_overflow", NEAR_OVERFLOW), ("nonfinite", FIRST_INF_RECORDED), ("loss_nonfinite", DAMAGE)]
    near, nonfinite = findings[0], findings[1]
    assert near.layers == ["blocks.0.logits"]
    ev = near.evidence
    assert ev.dtype == "float16" and ev.dtype_max == F16_MAX
    # the recorded max at the flagged step is the probe's (causal positions) or above it
    assert ev.max_abs >= probe[NEAR_OVERFLOW][2] and ev.max_abs >= F16_MAX / 2
    assert ev.headroom == pytest.approx(F16_MAX / ev.max_abs)
    # growth per step: an independent least-squares fit of log(max) on the window's records
    steps = [int(k) for k in ev.window]
    assert steps[-1] == NEAR_OVERFLOW and len(steps) == 5
    slope = np.polyfit(steps, np.log(list(ev.window.values())), 1)[0]
    assert ev.growth_per_step == pytest.approx(math.exp(slope), rel=1e-9)
    assert ev.growth_per_step > 1.0
    assert ev.steps_to_overflow == pytest.approx(math.log(ev.headroom) / slope, rel=1e-9)
    # a live run says it at the same step (the diagnosis of the run so far), 66 steps ahead
    assert live_detection(res_trace(broken), gt.diagnose, DAMAGE) == near.first_step
    assert DAMAGE - near.first_step >= SLOW_LEAD
    assert nonfinite.layers[0] == "blocks.0.logits"
    cause = nonfinite.evidence.cause_evidence
    # the inf is a float16 overflow, judged against float16's limit, not the float32 weights'
    assert nonfinite.evidence.cause == "overflow" and cause.value_dtype == "float16"
    assert cause.fraction_of_dtype_max == pytest.approx(cause.largest_finite_value / F16_MAX)
    fixes = " ".join(f.action for f in gt.advise([near], res_trace(broken))[0].fixes)
    for words in ("qk-LayerNorm", "sqrt(head_dim)", "bfloat16", "learning rate", "Warm"):
        assert words in fixes


def test_the_dtypes_are_recorded(broken):
    dtypes = res_trace(broken).out_dtypes()
    assert dtypes["blocks.0.logits"] == "float16"
    assert dtypes["blocks.0.q"] == dtypes["blocks.0.mlp.2"] == dtypes["head"] == "float32"


@pytest.mark.parametrize("control", ["qkln", "scaled"])
def test_the_controls_have_no_finding(control, request):
    res, probe, findings = request.getfixturevalue(control)
    assert all(math.isfinite(v) for v in res.losses)
    assert findings == []
    # the scaled control's logits grow too (Adam lr 0.1), but stay more than 2x below 65504
    assert max(p[2] for p in probe) < F16_MAX / 2


def test_the_qk_layernorm_control_stays_finite(qkln):
    _, probe, _ = qkln
    assert max(p[2] for p in probe) < 100.0      # measured at most ~23


def test_bad_control_names_the_choices():
    with pytest.raises(ValueError, match="control must be one of"):
        AttnLM(control="bogus")
