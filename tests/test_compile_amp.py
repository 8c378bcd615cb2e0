"""torch.compile'd models, bf16 autocast and torch.amp.GradScaler (all on CPU)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt

SEED = 0
STEPS = 4
EXACT = 1e-6            # same arithmetic, different bookkeeping
COMPILED_TOL = 1e-4     # inductor may fuse/reorder float ops


def _model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def _batches(n: int = STEPS):
    g = torch.Generator().manual_seed(SEED)
    return [(torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g)) for _ in range(n)]


def _eager_reference():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gt.watch(model, opt, out=None, activations_every=0) as mon:
        for x, y in _batches():
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            gt.clip_grad_norm_(model.parameters(), 0.3)
            opt.step()
            opt.zero_grad()
    return mon.trace


@pytest.mark.timeout(300)
def test_compiled_model_gradients_clipping_and_guard():
    model = _model()
    compiled = torch.compile(model, backend="inductor")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mon = gt.watch(compiled, opt, out=None)
    why = [w for w in caught if "compile" in str(w.message)]
    assert len(why) == 1 and "activation statistics are skipped" in str(why[0].message)
    guard = gt.Guard(opt)
    batches = _batches()
    with mon:
        for s, (x, y) in enumerate(batches + batches[:1]):
            loss = nn.functional.mse_loss(compiled(x), y)
            loss.backward()
            if s == STEPS:                                   # one poisoned step at the end
                next(model.parameters()).grad[0, 0] = float("nan")
            gt.clip_grad_norm_(model.parameters(), 0.3)
            guard.step(loss)
            opt.zero_grad()
    trace = mon.trace
    ref = _eager_reference()
    assert trace.params == ref.params                        # the user's names, no "_orig_mod."
    np.testing.assert_allclose(trace.series("total_grad_norm"), ref.series("total_grad_norm"),
                               rtol=COMPILED_TOL)
    np.testing.assert_allclose(trace.matrix("grad_norm")[2], ref.matrix("grad_norm")[2], rtol=COMPILED_TOL)
    post = trace.series("total_grad_norm_post_clip")
    assert np.all(post <= 0.3 + 1e-5)
    assert "out_std" not in trace.stats()                    # activations skipped, as warned
    assert [s for s, _ in guard.skips] == [STEPS]            # the poisoned step was skipped
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_bf16_autocast_records_float32_gradients():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gt.watch(model, opt, out=None, activations_every=1) as mon:
        for x, y in _batches():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
                assert out.dtype == torch.bfloat16
                loss = nn.functional.mse_loss(out.float(), y)
            mon.record_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    tr = mon.trace
    assert len(tr) == STEPS and not tr.events("nonfinite")
    assert np.isfinite(tr.matrix("grad_norm")[2]).all()
    assert np.isfinite(tr.matrix("out_std")[2][:, 0]).all()          # bf16 activations summarised
    assert np.isfinite(tr.series("loss")).all()


def _scaled_run(scaler, poison_step: int | None, clip: float | None = None):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with gt.watch(model, opt, out=None, activations_every=0, scaler=scaler) as mon:
        for s, (x, y) in enumerate(_batches()):
            loss = nn.functional.mse_loss(model(x), y)
            if s == poison_step:
                loss = loss * float("inf")                   # an overflow the scaler must catch
            mon.record_loss(loss)
            if scaler is None:
                loss.backward()
                if clip is not None:
                    gt.clip_grad_norm_(model.parameters(), clip)
                opt.step()
            else:
                scaler.scale(loss).backward()
                if clip is not None:
                    scaler.unscale_(opt)
                    gt.clip_grad_norm_(model.parameters(), clip)
                scaler.step(opt)
                scaler.update()
            opt.zero_grad()
    return mon.trace, model


@pytest.mark.parametrize("clip", [None, 0.3])
def test_grad_scaler_unscaled_figures_and_skips(clip):
    plain, _ = _scaled_run(None, poison_step=None, clip=clip)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    tr, model = _scaled_run(scaler, poison_step=2, clip=clip)
    steps = list(tr.steps_recorded)
    assert steps == [0, 1, 3]                                # the skipped step left no record
    skip = tr.events("amp_skip")
    assert [e["step"] for e in skip] == [2] and skip[0]["scale"] == 2.0 ** 12
    assert skip[0]["new_scale"] < skip[0]["scale"]           # the scaler backed off
    assert not tr.events("nonfinite")                        # not reported as an explosion
    # Figures are of unscaled gradients: the first two steps equal an unscaled run.
    want = plain.series("total_grad_norm")[:2]
    np.testing.assert_allclose(tr.series("total_grad_norm")[:2], want, rtol=EXACT)
    assert all(math.isfinite(v) for v in tr.series("total_grad_norm"))
    assert "update" not in vars(scaler)                      # the wrapper was removed


def test_scaler_needs_optimizer():
    with pytest.raises(ValueError, match="scaler="):
        gt.watch(_model(), None, scaler=torch.amp.GradScaler("cpu"))
