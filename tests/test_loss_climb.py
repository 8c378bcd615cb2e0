"""The loss-climb rule (a slow divergence): against a plain per-index reference, where it
must fire, where it must not, and that a live run says the same as the final diagnosis."""
from __future__ import annotations

import numpy as np
import pytest

from gradtrace.diagnose import diagnose
from gradtrace.diagnose.loss import climb_index
from gradtrace.diagnose.thresholds import Thresholds
from gradtrace.numerics import robust_z
from gradtrace.trace import Trace


def _reference(loss: np.ndarray, th: Thresholds) -> int | None:
    """The rule read literally, one index at a time (no vectorised run lengths)."""
    x = [float(v) for v in loss]
    for i, v in enumerate(x):
        if not np.isfinite(v):
            x = x[:i]
            break
    level = float(np.median(x[: th.baseline_window])) if x else 0.0
    for t in range(len(x)):
        c = t
        while c > 0 and x[c] > x[c - 1]:
            c -= 1
        if t - c < th.climb_steps or t - th.climb_steps < th.warmup_steps:
            continue
        base = np.array(x[max(0, c - th.baseline_window + 1): c + 1])
        if base.size < th.min_baseline:
            continue
        if robust_z(x[t], base) >= th.spike_z and x[t] - np.median(base) >= th.spike_min_rise * level:
            return t
    return None


def _trace(loss) -> Trace:
    return Trace({}, [{"step": s, "scalars": {"loss": float(v)}} for s, v in enumerate(loss)])


def test_climb_index_equals_the_reference_on_random_series():
    rng = np.random.default_rng(11)
    th = Thresholds()
    fired = 0
    for _ in range(300):
        n = int(rng.integers(3, 80))
        x = 3.0 + 0.1 * rng.standard_normal(n)
        if rng.random() < 0.5:                        # plant a climb of random length and pace
            a = int(rng.integers(0, n))
            k = int(rng.integers(1, 8))
            x[a: a + k] = x[a - 1 if a else 0] * np.cumprod(np.full(min(k, n - a), 1 + rng.random()))
        if rng.random() < 0.1:
            x[int(rng.integers(0, n))] = np.nan
        got = climb_index(x, th)
        assert (got[0] if got else None) == _reference(x, th)
        fired += got is not None
    assert 10 < fired < 290          # both outcomes exercised


def test_fires_on_a_slow_climb_and_live_equals_final():
    rng = np.random.default_rng(0)
    loss = np.r_[3.0 + 0.1 * rng.standard_normal(40), 3.1 * 1.12 ** np.arange(1, 9)]
    th = Thresholds()
    t, info = climb_index(loss, th)
    assert t == _reference(loss, th) and info["rises"] >= th.climb_steps
    (f,) = [x for x in diagnose(_trace(loss)) if x.kind == "loss_spike"]
    assert f.first_step == t and f.evidence["climb_at"] == t
    assert f.evidence["climb_robust_z"] >= th.spike_z
    # a live run says it at step t and not before; every later prefix keeps it
    assert not [x for x in diagnose(_trace(loss[:t])) if x.kind == "loss_spike"]
    for s in range(t + 1, loss.size + 1):
        assert any(x.kind == "loss_spike" and x.first_step == t for x in diagnose(_trace(loss[:s])))


@pytest.mark.parametrize("case", ["rises_within_noise", "too_few_rises", "lone_jump", "hard_batches"])
def test_does_not_fire(case):
    rng = np.random.default_rng(1)
    base = 3.0 + 0.2 * rng.standard_normal(60)
    th = Thresholds()
    if case == "rises_within_noise":        # many rises in a row, all inside the spread
        loss = np.r_[base, 3.0 + 0.03 * np.arange(1, 8)]
    elif case == "too_few_rises":           # far above, but only climb_steps - 1 rises
        loss = np.r_[base, 2.0, 4.0, 6.0, 9.0][: 60 + th.climb_steps]
        assert loss.size - 1 - 60 < th.climb_steps
    elif case == "lone_jump":               # one huge record, no climb into it
        loss = np.r_[base, 2.5, 30.0, 3.0, 2.9]
    else:                                   # a noisy classification loss: hard batches come and go
        loss = np.abs(0.05 + 0.2 * rng.standard_cauchy(300)).clip(0, 5)
    assert climb_index(loss, th) is None and _reference(loss, th) is None


def test_severity_error_when_the_climb_never_comes_back_warning_when_it_does():
    rng = np.random.default_rng(2)
    base = 3.0 + 0.1 * rng.standard_normal(40)
    climb = 3.1 * 1.12 ** np.arange(1, 6)
    cases = {"recovers": (np.r_[base, climb, 3.0, 2.9, 3.05], "warning"),
             "stays_up": (np.r_[base, climb, climb[-1] * 1.5], "error"),     # >= spike_min_fold x
             "ends_in_nan": (np.r_[base, climb, np.nan], "error")}
    for name, (loss, severity) in cases.items():
        (f,) = [x for x in diagnose(_trace(loss)) if x.kind == "loss_spike"]
        assert f.evidence["climb_at"] == _reference(loss, Thresholds()) and f.severity == severity, name
        assert f.evidence["recovered"] == (severity == "warning"), name
