"""The recorder's batched activation figures equal per-call references, step after step.

A module's first activation step is measured call by call in its hook; from its next
one on, its calls are held and reduced in groups (``record/batched.py``) and its output
gradients come from retained gradients. These tests therefore compare several steps of
each run with figures computed by the test's own hooks (float64, from clones taken when
each module returned): mixed shapes, conv outputs, a ReLU shared across calls of
different shapes, RNN time steps, tuple outputs, in-place changes after return, early
flushes, and non-finite outputs.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.record import hooks as hooks_mod
from gradtrace.record.selection import SATURATION_BOUNDS

STAT_RTOL = 1e-4      # float32 reductions against float64 references
NORM_RTOL = 1e-5
ATOL = 1e-6


class Pair(nn.Module):
    """Returns a tuple of two tensors of different shapes (owns its weight: watched)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16) * 0.25)

    def forward(self, x):
        h = x @ self.weight
        return h, h[:, :4] * 2.0


class Mixed(nn.Module):
    """Mixed shapes, kinds and repeated calls in one forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.crelu = nn.ReLU()
        self.fc = nn.Linear(3 * 4 * 4, 16)
        self.shared = nn.ReLU()           # called on (B, 16) and (B, 8) outputs
        self.pair = Pair()
        self.down = nn.Linear(16, 8)
        self.tanh = nn.Tanh()
        self.sig = nn.Sigmoid()
        self.cell = nn.RNNCell(8, 8)      # called once per time step
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = self.crelu(self.conv(x)).flatten(1)
        h = self.shared(self.fc(h))
        a, b = self.pair(h)
        h = self.shared(self.down(a)) + b.sum(1, keepdim=True)
        h = self.tanh(h * 3.0)
        s = self.sig(h * 4.0)
        state = torch.zeros_like(s)
        for _ in range(3):
            state = self.cell(s, state)
        return self.head(state)


class Reference:
    """The test's own hooks: each call's output and output gradient, cloned at once."""

    def __init__(self, model: nn.Module):
        self.outs: dict[str, list[torch.Tensor]] = {}
        self.grads: dict[str, list[torch.Tensor]] = {}
        watched = gt.record.selection.select(model).modules
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules() if n in watched]

    def _hook(self, name):
        def hook(module, inputs, output):
            outs = [output] if isinstance(output, torch.Tensor) else [o for o in output if isinstance(o, torch.Tensor)]
            for o in outs:
                self.outs.setdefault(name, []).append(o.detach().clone().double())
                if o.requires_grad:
                    o.register_hook(lambda g, n=name: self.grads.setdefault(n, []).append(g.detach().clone().double()))
        return hook

    def clear(self):
        self.outs, self.grads = {}, {}

    def remove(self):
        for h in self.handles:
            h.remove()


def _units(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, -1).reshape(-1, t.shape[1]) if t.dim() >= 4 else t.reshape(-1, t.shape[-1])


def at(t: gt.Trace, stat: str, name: str, step: int):
    """The value of ``stat`` for ``name`` at ``step`` (nan where it was not recorded)."""
    steps, values = t.series(stat, name, with_steps=True)
    hit = np.flatnonzero(steps == step)
    return values[hit[0]] if hit.size else np.nan


def check_step(t: gt.Trace, row: int, ref: Reference, kinds: dict[str, str | None], outgrad: bool = True):
    """Every module figure of recorded row ``row`` against the reference's calls."""
    for name, outs in ref.outs.items():
        flat = torch.cat([o.reshape(-1) for o in outs])
        np.testing.assert_allclose(at(t, "out_mean", name, row), flat.mean().item(), rtol=STAT_RTOL, atol=ATOL,
                                   err_msg=f"out_mean {name}")
        np.testing.assert_allclose(at(t, "out_std", name, row), flat.std(unbiased=False).item(),
                                   rtol=STAT_RTOL, atol=ATOL, err_msg=f"out_std {name}")
        np.testing.assert_allclose(at(t, "out_maxabs", name, row), flat.abs().max().item(), rtol=NORM_RTOL,
                                   err_msg=f"out_maxabs {name}")
        kind = kinds[name]
        if kind == "relu":
            np.testing.assert_allclose(at(t, "zero_frac", name, row), (flat <= 0).double().mean().item(),
                                       rtol=NORM_RTOL, atol=ATOL, err_msg=f"zero_frac {name}")
            # the mask of the last run of calls with one unit count, OR-ed over those calls
            k = len(outs)
            while k > 0 and _units(outs[k - 1]).shape[1] == _units(outs[-1]).shape[1]:
                k -= 1
            last = outs[k:]
            want = torch.stack([(_units(o).amax(0) > 0) for o in last]).any(0).numpy()
            np.testing.assert_array_equal(at(t, "active_mask", name, row), want, err_msg=f"mask {name}")
            assert at(t, "dead_units", name, row) == (~want).sum()
        elif kind in SATURATION_BOUNDS:
            lo, hi = SATURATION_BOUNDS[kind]
            np.testing.assert_allclose(at(t, "saturated_frac", name, row),
                                       ((flat < lo) | (flat > hi)).double().mean().item(), rtol=NORM_RTOL,
                                       atol=ATOL, err_msg=f"saturated_frac {name}")
    if outgrad:
        for name, gs in ref.grads.items():
            want = torch.sqrt(sum(g.pow(2).sum() for g in gs)).item()
            np.testing.assert_allclose(at(t, "outgrad_norm", name, row), want, rtol=NORM_RTOL, atol=1e-9,
                                       err_msg=f"outgrad_norm {name}")


def _kinds(mon) -> dict[str, str | None]:
    return dict(zip(mon._mod_names, mon._kinds))


def run_and_check(model: nn.Module, make_x, steps: int = 4, **watch):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model)
    g = torch.Generator().manual_seed(3)
    with gt.watch(model, opt, preset="full", **watch) as mon:
        for step in range(steps):
            ref.clear()
            model(make_x(g)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
            check_step(mon.trace, step, ref, _kinds(mon))
    ref.remove()
    return mon


def test_mixed_shapes_shared_modules_tuples_and_time_steps_match_per_call_reference():
    torch.manual_seed(0)
    model = Mixed()
    mon = run_and_check(model, lambda g: torch.randn(6, 2, 4, 4, generator=g))
    t = mon.trace
    # the shared ReLU saw (6, 16) then (6, 8): its mask is the last call's 8 units
    assert t.series("units", "shared")[-1] == 8
    assert t.series("units", "crelu")[-1] == 3          # conv channels are the units
    # from the second step on the calls were held and reduced in groups
    assert mon._hooks._safe and not mon._hooks._unsafe


def test_batched_path_is_what_ran():
    """Guard for the other tests: after the first step, no call is measured in its hook."""
    torch.manual_seed(0)
    model = Mixed()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []
    orig, orig_one = hooks_mod.StepHooks._reduce, hooks_mod.StepHooks._measure

    def spy(self, idx, ts):
        calls.append(len(idx))
        return orig(self, idx, ts)

    def spy_one(self, idx, t):     # one call measured in its hook
        calls.append(1)
        return orig_one(self, idx, t)
    hooks_mod.StepHooks._reduce, hooks_mod.StepHooks._measure = spy, spy_one
    try:
        with gt.watch(model, opt, preset="full"):
            for step in range(3):
                calls.clear()
                model(torch.randn(6, 2, 4, 4)).sum().backward()
                opt.step()
                opt.zero_grad()
                if step == 0:
                    assert set(calls) == {1}            # learning: one call per reduction
                else:
                    assert len(calls) == 1 and calls[0] > 10   # one batch for the whole forward
    finally:
        hooks_mod.StepHooks._reduce, hooks_mod.StepHooks._measure = orig, orig_one


def test_outputs_changed_in_place_after_return_keep_their_figures():
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(8, 8), nn.Linear(8, 8), nn.ReLU(inplace=True)
            self.out = nn.Linear(8, 1)

        def forward(self, x):
            h = self.b(x)
            h += x                      # changes b's output after b returned
            return self.out(self.relu(self.a(h)))   # the in-place ReLU changes a's output

    model = Residual()
    mon = run_and_check(model, lambda g: torch.randn(16, 8, generator=g))
    assert {"a", "b"} <= {mon._mod_names[i] for i in mon._hooks._unsafe}


def test_a_deferred_output_changed_later_is_dropped_for_that_step_not_misread():
    torch.manual_seed(0)

    class Sometimes(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.out = nn.Linear(8, 8), nn.Linear(8, 1)
            self.change = False

        def forward(self, x):
            h = self.lin(x)
            if self.change:
                h.mul_(100.0)          # after lin returned: its held output is no longer its output
            return self.out(h)

    model = Sometimes()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model)
    g = torch.Generator().manual_seed(0)
    with gt.watch(model, opt, preset="full") as mon:
        for step in range(4):
            model.change = step == 2
            ref.clear()
            model(torch.randn(16, 8, generator=g)).sum().backward()
            opt.step()
            opt.zero_grad()
            if step != 2:
                check_step(mon.trace, step, ref, _kinds(mon))
            else:
                out_mean = ref.outs["out"][0].mean().item()
    t = mon.trace
    assert np.isnan(at(t, "out_mean", "lin", 2))       # missing, not the changed values
    np.testing.assert_allclose(at(t, "out_mean", "out", 2), out_mean, rtol=STAT_RTOL)
    assert mon._mod_names.index("lin") in mon._hooks._unsafe   # measured in its hook from then on


def test_early_flushes_under_a_small_hold_budget_give_the_same_figures(monkeypatch):
    monkeypatch.setattr(hooks_mod, "HOLD_BYTES", 256)
    torch.manual_seed(0)
    run_and_check(Mixed(), lambda g: torch.randn(6, 2, 4, 4, generator=g), steps=3)


def test_gradient_accumulation_pools_every_micro_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model)
    g = torch.Generator().manual_seed(1)
    with gt.watch(model, opt, preset="full") as mon:
        for step in range(3):
            ref.clear()
            for _ in range(3):
                model(torch.randn(4, 8, generator=g)).sum().backward()
            opt.step()
            opt.zero_grad()
            check_step(mon.trace, step, ref, _kinds(mon))


@pytest.mark.parametrize("where", ["0", "2"])
def test_nonfinite_output_on_a_batched_step_is_flagged_at_its_module(where):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))

    def poison(module, inputs, output):
        if poison.on:
            output = output.clone()
            output[0, 0] = float("inf")
            return output
    poison.on = False
    model[int(where)].register_forward_hook(poison)
    with gt.watch(model, None, preset="full") as mon:      # no update: the weights stay finite
        for step in range(4):
            poison.on = step == 2
            model(torch.randn(4, 8)).sum().backward()
            mon.step()
            model.zero_grad()
    t = mon.trace
    flags = t.series("out_flag_nonfinite", where)
    assert flags.tolist() == [0, 0, 1, 0]
    assert t.series("out_nonfinite", where)[2] == 1
    ev = t.events("nonfinite")
    assert [e["step"] for e in ev] == [2] and ev[0]["forward"] == where
    if where == "2":          # inf reached the ReLU: not read as dead or live units
        assert np.isnan(at(t, "dead_units", "3", 2))


def test_unit_count_runs_keep_the_last_run_like_per_call_masks():
    """A ReLU called on 4, then 6, then 4 units: its mask is the last call's alone."""
    torch.manual_seed(0)

    class Runs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.relu = nn.Linear(3, 4), nn.Linear(3, 6), nn.ReLU()

        def forward(self, x):
            first = self.relu(self.a(x))
            mid = self.relu(self.b(x))
            last = self.relu(self.a(-x))
            return first.sum() + mid.sum() + last.sum()

    run_and_check(Runs(), lambda g: torch.randn(5, 3, generator=g), steps=3)


def test_large_outputs_measured_in_their_hook_match_the_reference():
    """Outputs of SMALL_ENTRIES entries or more are measured at once, without stacking."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 4), nn.Sigmoid(), nn.Linear(4, 1))
    assert 128 * 256 >= hooks_mod.SMALL
    mon = run_and_check(model, lambda g: torch.randn(128, 8, generator=g), steps=3)
    assert mon._hooks._safe          # the small ones were held


@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid", None])
def test_the_reused_scratch_changes_no_figure(monkeypatch, kind):
    from gradtrace.record import batched
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(4, 6, generator=g) for _ in range(3)]
    monkeypatch.setattr(batched, "SCRATCH_MIN_BYTES", 0)  # these small ones reuse the scratch
    kept = batched.figures(xs, kind, True)
    assert batched._local.bufs                            # it was used
    monkeypatch.setattr(batched, "SCRATCH_BYTES", 0)      # a fresh temporary every time
    fresh = batched.figures(xs, kind, True)
    assert kept.keys() == fresh.keys()
    for k in kept:
        torch.testing.assert_close(kept[k], fresh[k], rtol=0, atol=0)
    # and the figures themselves, from float64
    x = torch.stack(xs).double().reshape(3, -1)
    torch.testing.assert_close(kept["a_norm"].double(), (x - x.mean(1, keepdim=True)).norm(dim=1),
                               rtol=NORM_RTOL, atol=ATOL)


@pytest.mark.parametrize("kind", ["relu", "tanh", "sigmoid", None])
@pytest.mark.parametrize("shape", [(6, 2, 3, 3), (5, 7), (9,)])
def test_one_call_figures_match_float64_and_the_group_path(kind, shape):
    """A call measured in its hook has the figures a group row of it has."""
    from gradtrace.record import batched
    g = torch.Generator().manual_seed(11)
    t = torch.randn(shape, generator=g) * 3 + 0.5
    t[t.abs() < 0.3] = 0.0                                    # exact zeros for the sign count
    vec, units = batched.call_figures(t, kind)
    assert vec.dtype == torch.float32 and vec.shape == (5,)
    x = t.double()
    lo, hi = SATURATION_BOUNDS.get(kind, (0.0, 0.0))
    extra = {"relu": float((x > 0).sum() - (x < 0).sum()),
             "tanh": float(((x < lo) | (x > hi)).sum()), "sigmoid": float(((x < lo) | (x > hi)).sum()),
             None: float(x.sum())}[kind]
    want = [float(x.sum()), float(x.min()), float(x.max()), float((x - x.mean()).norm()), extra]
    torch.testing.assert_close(vec.double(), torch.tensor(want, dtype=torch.float64), rtol=STAT_RTOL, atol=ATOL)
    row = batched.figures([t], kind, True)
    torch.testing.assert_close(vec, torch.stack([row[k][0] for k in ("flag", "a_min", "a_max", "a_norm", "a_extra")]),
                               rtol=NORM_RTOL, atol=ATOL)
    if kind == "relu":
        per_unit = x.transpose(0, 1).reshape(shape[1], -1) if len(shape) == 4 else x.reshape(-1, shape[-1]).T
        assert units.tolist() == (per_unit.amax(1) > 0).double().tolist()
        assert units.tolist() == row["units"][0].tolist()
    else:
        assert units is None


def test_one_call_figures_keep_non_finite_and_low_precision():
    from gradtrace.record import batched
    t = torch.tensor([[1.0, float("nan")], [2.0, -3.0]], dtype=torch.float16)
    vec, _ = batched.call_figures(t, None)
    assert vec.dtype == torch.float32 and torch.isnan(vec[:4]).all()
    vec, _ = batched.call_figures(torch.tensor([[1.0, float("inf")]]), "relu")
    assert vec[0] == float("inf") and vec[2] == float("inf")


def test_out_dtypes_name_each_modules_first_floating_output_dtype():
    """Filled on the first activation step a module is seen, kept across steps."""
    torch.manual_seed(0)

    class Half(nn.Module):
        def forward(self, x):
            return x.half(), torch.ones(2, dtype=torch.long)   # floating first, then an int

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), Half())
    with gt.watch(model, None, activations_every=2) as mon:
        for _ in range(3):
            model(torch.randn(3, 4))[0].float().sum().backward()
            mon.step()
            model.zero_grad()
    names = dict(enumerate(mon._mod_names))
    got = {names[i]: d for i, d in mon._hooks.out_dtypes.items()}
    assert got == {"0": "float32", "1": "float32", "2": "float16"}


def test_large_outputs_are_held_and_batched_after_the_first_step():
    """From the second step on, outputs of SMALL_ENTRIES or more up to HOLD_MAX_BYTES are
    held too (none measured in its hook), and their figures still match the reference."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))
    measured = []
    orig = hooks_mod.StepHooks._measure

    def spy(self, idx, t):
        measured.append(t.numel())
        return orig(self, idx, t)
    hooks_mod.StepHooks._measure = spy
    try:
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        ref = Reference(model)
        g = torch.Generator().manual_seed(2)
        with gt.watch(model, opt, preset="full") as mon:
            for step in range(3):
                ref.clear()
                measured.clear()
                model(torch.randn(128, 8, generator=g)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
                check_step(mon.trace, step, ref, _kinds(mon))
                assert (len(measured) > 0) == (step == 0)
    finally:
        hooks_mod.StepHooks._measure = orig
        ref.remove()
    assert 128 * 256 >= hooks_mod.SMALL and 128 * 256 * 4 <= hooks_mod.HOLD_MAX_BYTES
    assert {0, 1, 2, 3} <= mon._hooks._safe


def test_outputs_over_the_hold_bound_are_measured_in_their_hook(monkeypatch):
    monkeypatch.setattr(hooks_mod, "HOLD_MAX_BYTES", 1000)  # 16 x 16 float32 outputs exceed it
    measured = []
    orig = hooks_mod.StepHooks._measure

    def spy(self, idx, t):
        measured.append(t.numel())
        return orig(self, idx, t)
    monkeypatch.setattr(hooks_mod.StepHooks, "_measure", spy)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    mon = run_and_check(model, lambda g: torch.randn(16, 8, generator=g), steps=3)
    assert measured.count(256) == 2 * 3                     # both 16 x 16 outputs, every step
    assert mon._hooks._safe == {2}                          # only the small one was learnt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("kept", [True, False])
def test_group_figures_leave_the_outputs_untouched_and_match_float64(monkeypatch, dtype, k, kept):
    """The stack is centred in place: only when it is a copy, never the caller's tensors."""
    from gradtrace.record import batched
    if kept:
        monkeypatch.setattr(batched, "SCRATCH_MIN_BYTES", 0)     # the kept stack and temporary
    else:
        monkeypatch.setattr(batched, "SCRATCH_BYTES", 0)         # fresh ones (a view for k = 1)
    g = torch.Generator().manual_seed(7)
    xs = [(torch.randn(2, 3, 4, 5, generator=g) * 2 + 0.25).to(dtype) for _ in range(k)]
    before = [x.clone() for x in xs]
    for kind in ("relu", "tanh", None):
        out = batched.figures(xs, kind, True)
        for x, b in zip(xs, before):
            assert torch.equal(x, b)
        x64 = torch.stack(xs).double().reshape(k, -1)
        torch.testing.assert_close(out["flag"].double(), x64.sum(1), rtol=STAT_RTOL, atol=1e-3)
        torch.testing.assert_close(out["a_min"].double(), x64.amin(1), rtol=0, atol=0)
        torch.testing.assert_close(out["a_max"].double(), x64.amax(1), rtol=0, atol=0)
        torch.testing.assert_close(out["a_norm"].double(), (x64 - x64.mean(1, keepdim=True)).norm(dim=1),
                                   rtol=1e-3 if dtype == torch.float16 else NORM_RTOL, atol=ATOL)
        if kind == "relu":
            per_unit = torch.stack(xs).double().transpose(1, 2).reshape(k, 3, -1)   # channels of each call
            assert out["units"].tolist() == (per_unit.amax(2) > 0).double().tolist()
            assert out["a_extra"].tolist() == x64.sign().sum(1).tolist()


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_create_graph_backward_keeps_the_figures_and_builds_no_graph_of_ours(monkeypatch):
    """Held outputs are not detached and retained gradients require grad under
    create_graph: their reductions must still give plain, exact figures."""
    from gradtrace.record import batched
    made = []

    def spy(f):
        def run(*a, **k):
            out = f(*a, **k)
            made.extend(out.values() if isinstance(out, dict) else [out])
            return out
        return run
    monkeypatch.setattr(batched, "figures", spy(batched.figures))
    monkeypatch.setattr(batched, "grad_norms", spy(batched.grad_norms))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    ref = Reference(model)
    g = torch.Generator().manual_seed(4)
    with gt.watch(model, opt, preset="full") as mon:
        for step in range(3):
            ref.clear()
            model(torch.randn(16, 8, generator=g)).pow(2).mean().backward(create_graph=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            check_step(mon.trace, step, ref, _kinds(mon))
    ref.remove()
    assert len(made) > 10 and not any(v.requires_grad for v in made)
