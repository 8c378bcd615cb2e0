"""Online diagnosis: findings as of a step, the live sink, watch(on_finding=), doctor --follow."""
from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.diagnose import diagnose as find
from gradtrace.diagnose.online import OnlineDiagnosis, log_finding

from scenarios import SCENARIOS


def _kinds(findings) -> set[str]:
    return {f.kind for f in findings}


def _nan_run(on_finding=None, sinks=(), out=None, steps: int = 40):
    """A 6-layer regression MLP at SGD lr 0.2: the loss climbs, then goes inf/nan."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(16, 16), nn.LeakyReLU(0.1))], nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    x, y = torch.randn(64, 16) * 3, torch.randn(64, 1) * 3
    kw = {"on_finding": on_finding} if on_finding is not None else {}
    with gt.watch(model, opt, out=out, activations_every=2, sinks=list(sinks), **kw) as mon:
        for _ in range(steps):
            loss = (model(x) - y).pow(2).mean()
            mon.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return mon


@pytest.mark.parametrize("name", ["high_lr_nan", "dead_relu_bias", "exploding_weights", "rnn_tanh_small"])
def test_findings_never_disappear_as_the_run_grows(name):
    # The invariant of issue 11: what the run said at step s stays in every later diagnosis.
    torch.manual_seed(0)
    trace = SCENARIOS[name].build()
    before: set[str] = set()
    for s in trace.steps_recorded.tolist():
        now = _kinds(find(trace.upto(int(s))))
        assert before <= now, f"{name}: {before - now} vanished at step {s}"
        before = now
    assert before == _kinds(find(trace))


def test_live_sink_equals_diagnosis_of_the_prefix():
    live = OnlineDiagnosis(lambda f: None, every=1, budget=1.0)
    mon = _nan_run(sinks=[live])
    trace = mon.trace
    assert live.findings, "the run goes non-finite: something must be reported"
    for f in live.findings:
        # reported live at some step s: diagnose(trace.upto(s)) has it, and so does the end
        assert f.kind in _kinds(find(trace))
    assert _kinds(live.findings) == _kinds(find(trace))
    assert len(live.findings) == len(_kinds(live.findings))    # each kind once


def test_on_finding_callback_once_per_kind_and_default_logs():
    got = []
    mon = _nan_run(on_finding=got.append)
    assert got and [f.kind for f in got] == list(dict.fromkeys(f.kind for f in got))
    assert _kinds(got) == _kinds(find(mon.trace))
    assert "nonfinite" in _kinds(got)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        _nan_run(on_finding=True)
    lines = [str(x.message) for x in w if str(x.message).startswith("gradtrace: ")]
    assert any(l.startswith("gradtrace: nonfinite (error) from step") for l in lines)
    assert len(lines) == len(set(lines))


def test_budget_limits_how_often_the_detectors_run():
    every = OnlineDiagnosis(lambda f: None, every=1, budget=1.0)
    sparse = OnlineDiagnosis(lambda f: None, every=10, budget=1.0)
    _nan_run(sinks=[every, sparse])
    assert every.runs >= 30
    # every 10 records, plus the immediate checks on non-finite records and the last one
    assert sparse.runs <= 40 // 10 + 1 + (40 - 10)
    assert sparse.runs < every.runs
    with pytest.raises(ValueError, match="every"):
        OnlineDiagnosis(print, every=0)
    with pytest.raises(ValueError, match="budget"):
        OnlineDiagnosis(print, budget=2)
    with pytest.raises(TypeError, match="callback"):
        OnlineDiagnosis(42)
    with pytest.raises(TypeError, match="on_finding"):
        _nan_run(on_finding=42, steps=1)


def test_log_finding_is_one_line():
    f = gt.Finding("dead_units", "warning", ["net.1"], 3, 9, {"summary": "net.1: 30 of 40 units never fired"})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        log_finding(f)
    assert str(w[0].message) == ("gradtrace: dead_units (warning) from step 3 in net.1: "
                                 "net.1: 30 of 40 units never fired")


def test_doctor_follow_prints_findings_and_stops(tmp_path):
    run = tmp_path / "run"
    _nan_run(out=str(run))
    p = subprocess.run([sys.executable, "-m", "gradtrace", "doctor", str(run), "--follow",
                        "--interval", "0.1", "--idle", "0.5"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr
    assert "nonfinite (error)" in p.stdout and "no new record" not in p.stdout   # stopped at "end"
    bad = subprocess.run([sys.executable, "-m", "gradtrace", "doctor", str(run), "--follow", "--idle", "0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--idle" in bad.stderr and "Traceback" not in bad.stderr


def test_live_sink_reports_a_loss_climb_at_the_step_it_ends():
    # A slow divergence (issue 11): fed record by record, the sink says loss_spike at the
    # record that ends the climb, the same step the final diagnosis gives as its start.
    import numpy as np

    rng = np.random.default_rng(4)
    loss = np.r_[3.0 + 0.1 * rng.standard_normal(40), 3.1 * 1.12 ** np.arange(1, 9)]
    said: list[tuple[int, str]] = []
    live = OnlineDiagnosis(lambda f: said.append((step, f.kind)), every=1, budget=1.0)
    live.start({})
    for step, v in enumerate(loss.tolist()):
        live.write({"step": step, "scalars": {"loss": v}})
    live.close()
    (final,) = [f for f in find(live.trace) if f.kind == "loss_spike"]
    assert said == [(final.first_step, "loss_spike")]
    assert final.first_step == final.evidence["climb_at"] < loss.size - 1


def _first_prefix_with(trace, kind: str) -> int | None:
    for s in trace.steps_recorded.tolist():
        if kind in _kinds(find(trace.upto(int(s)))):
            return int(s)
    return None


def _feed(loss, every: int = 10):
    """Feed a loss series record by record (default interval); the steps the callback spoke at."""
    said: list[tuple[int, str]] = []
    step = 0
    live = OnlineDiagnosis(lambda f: said.append((step, f.kind)), every=every, budget=1.0)
    live.start({})
    for step, v in enumerate(loss):
        live.write({"step": step, "scalars": {"loss": float(v)}})
    return live, said


@pytest.mark.parametrize("shape", ["slow_climb", "jump_2x", "early_divergence"])
def test_urgent_loss_trigger_speaks_at_the_first_step_the_prefix_has_it(shape):
    # Issue 11: between two scheduled diagnoses (every 10 records) a loss record that can
    # complete the loss-spike rule is diagnosed at once, so the callback comes at the same
    # step as the first prefix diagnosis that holds the finding, not up to 10 records late.
    import numpy as np

    rng = np.random.default_rng(7)
    noise = 1.0 + 0.03 * rng.standard_normal(200)
    if shape == "slow_climb":      # rises step after step from record 153 (not a multiple of 10)
        loss = np.r_[noise[:153], 1.05 * 1.06 ** np.arange(1, 30)]
    elif shape == "jump_2x":       # one step to ~2.3x that stays there (confirmed by persisting)
        loss = np.r_[noise[:147], 2.3 * noise[147:]]
    else:                          # doubles within the records the spike rule cannot judge yet
        loss = np.r_[4.0, 3.9, 3.8, 8.5, noise[4:60] * 9]
    live, said = _feed(loss)
    first = _first_prefix_with(live.trace, "loss_spike")
    assert first is not None
    assert said == [(first, "loss_spike")]
    if shape == "early_divergence":
        return                     # early records are diagnosed one by one anyway
    # without the trigger the scheduled interval would have been late on this run
    late = OnlineDiagnosis(lambda f: None, every=10, budget=1.0)
    late._loss.update = lambda record: False
    late_said: list[int] = []
    late.callback = lambda f: late_said.append(int(late.trace.steps_recorded[-1]))
    late.start({})
    for step, v in enumerate(loss):
        late.write({"step": step, "scalars": {"loss": float(v)}})
    assert late_said and late_said[0] > first


def test_urgent_loss_trigger_stays_rare_on_a_healthy_loss():
    # The trigger costs a diagnosis each time it fires; on a noisy, slowly falling loss it
    # must add only a few to the scheduled ones (every 10 records).
    import numpy as np

    rng = np.random.default_rng(11)
    loss = 2.0 * np.exp(-np.arange(500) / 300) * (1 + 0.15 * rng.standard_normal(500))
    live, said = _feed(loss)
    plain = OnlineDiagnosis(lambda f: None, every=10, budget=1.0)
    plain._loss.update = lambda record: False
    plain.start({})
    for step, v in enumerate(loss):
        plain.write({"step": step, "scalars": {"loss": float(v)}})
    assert said == [] and live.runs <= plain.runs + 10, (live.runs, plain.runs)
    with pytest.raises(ValueError, match="spike_zz"):
        OnlineDiagnosis(print, thresholds={"spike_zz": 3})     # a typo fails here, not mid-run
