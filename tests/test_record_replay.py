"""The first non-finite module is named for the exact step by replaying its forward, and the
replay leaves the run exactly as it would have been (RNG, BatchNorm statistics, weights)."""
from __future__ import annotations

import torch
from torch import nn

import gradtrace as gt


class Inject(nn.Module):
    """Multiplies by inf on the steps listed in ``fire_at`` (set from outside)."""

    def __init__(self):
        super().__init__()
        self.fire = False

    def forward(self, x):
        return x * float("inf") if self.fire else x


def model_with_noise(seed=0):
    torch.manual_seed(seed)
    inject = Inject()
    net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                        nn.Linear(16, 16), inject, nn.Tanh(), nn.Linear(16, 1))
    return net, inject


def run(monitored, steps=8, bad=5, preset=None):
    net, inject = model_with_noise()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(3)
    mon = gt.watch(net, opt, **({"preset": preset} if preset else {})) if monitored else None
    torch.manual_seed(11)                          # dropout's generator, same in both runs
    for step in range(steps):
        inject.fire = step == bad
        loss = net(torch.randn(32, 8, generator=g)).pow(2).mean()
        if mon is not None:
            mon.record_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
    if mon is not None:
        mon.close()
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    return mon, state, torch.get_rng_state()


def test_inf_at_a_named_module_is_reported_at_that_module_and_step_by_default():
    mon, _, _ = run(True, bad=5)                    # step 5: no activation hooks that step
    ev = mon.trace.events("nonfinite")
    assert ev[0]["step"] == 5 and ev[0]["forward"] == "5", ev[0]
    # tanh(inf) = 1: the loss stays finite, only the gradients (0 * inf) show it
    assert not ev[0]["loss_nonfinite"] and "4.weight" in ev[0]["params"], ev[0]


def test_replay_leaves_weights_batchnorm_statistics_and_rng_as_an_unwatched_run():
    _, bare, bare_rng = run(False, bad=5)
    for preset in (None, "full"):
        _, watched, rng = run(True, bad=5, preset=preset)
        assert torch.equal(bare_rng, rng), preset
        for k, v in bare.items():
            torch.testing.assert_close(watched[k], v, rtol=0, atol=0, equal_nan=True, msg=f"{preset} {k}")


def test_healthy_run_with_dropout_and_batchnorm_is_bitwise_identical():
    _, bare, bare_rng = run(False, bad=-1)
    for preset in (None, "economy", "full"):
        _, watched, rng = run(True, bad=-1, preset=preset)
        assert torch.equal(bare_rng, rng)
        for k, v in bare.items():
            assert torch.equal(watched[k], v), (preset, k)


def test_flight_recorder_called_once_before_the_update(tmp_path, monkeypatch):
    import gradtrace.record.flight as flight
    calls = []

    def fake(directory, *, model, optimizer, capture, step, reason):
        calls.append({"dir": directory, "step": step, "reason": reason, "capture_step": capture.step,
                      "w": model[0].weight.detach().clone()})
    monkeypatch.setattr(flight, "save_bundle", fake)
    net, inject = model_with_noise()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    before = {}
    with gt.watch(net, opt, out=tmp_path / "run") as mon:
        for step in range(6):
            inject.fire = step in (2, 4)
            net(torch.randn(32, 8)).pow(2).mean().backward()
            before[step] = net[0].weight.detach().clone()
            opt.step()
            opt.zero_grad()
    assert len(calls) == 1 and calls[0]["step"] == 2 and calls[0]["capture_step"] == 2
    assert calls[0]["reason"] == "nonfinite_grad" and str(calls[0]["dir"]).startswith(str(tmp_path / "run"))
    assert torch.equal(calls[0]["w"], before[2])        # written before the optimizer applied it
    assert [e["step"] for e in mon.trace.events("nonfinite")] == [2, 3, 4, 5]   # nan weights after 2


def test_flight_recorder_errors_become_a_warning(tmp_path, monkeypatch):
    import gradtrace.record.flight as flight

    def broken(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(flight, "save_bundle", broken)
    net, inject = model_with_noise()
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    import pytest
    with pytest.warns(RuntimeWarning, match="disk full"):
        with gt.watch(net, opt, out=tmp_path / "run"):
            inject.fire = True
            net(torch.randn(32, 8)).pow(2).mean().backward()
            opt.step()
