"""Tests of gradtrace.diagnose: each detector on hand-built traces, thresholds, speed,
and the labelled scenario suite (the fast ones always; the rest are marked slow)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradtrace as gt
from gradtrace.diagnose import DETECTORS, Thresholds
from gradtrace.api import diagnose
from gradtrace.diagnose.finding import KINDS, Finding
from gradtrace.trace import Trace, pack_mask

#: A hand-built trace's recorded values are exact; estimates agree with them this closely.
REL_TOL = 1e-6


# ---- building traces by hand --------------------------------------------------------------
def mlp_meta(depth: int, act: str | None = "relu", act_type: str = "ReLU") -> dict:
    """Meta of Sequential(Linear, act, Linear, act, ..., Linear): names "0", "1", ..."""
    modules, params = [], []
    for i in range(depth):
        lin = str(2 * i)
        modules.append({"name": lin, "type": "Linear", "activation": None,
                        "params": [f"{lin}.weight", f"{lin}.bias"]})
        params += [{"name": f"{lin}.weight", "shape": [8, 8], "dtype": "float32", "module": lin},
                   {"name": f"{lin}.bias", "shape": [8], "dtype": "float32", "module": lin}]
        if i < depth - 1 and act is not None:
            modules.append({"name": str(2 * i + 1), "type": act_type, "activation": act, "params": []})
    return {"format": "gradtrace-trace", "format_version": 1, "modules": modules, "params": params,
            "saturation_bounds": {"sigmoid": [0.015, 0.985], "tanh": [-0.97, 0.97]}}


def rec(meta: dict, step: int, *, loss: float | None = 1.0, grad: float | list = 0.1,
        module: dict | None = None, vectors: dict | None = None, total: float | None = None,
        lr: float = 0.1, exec_order: bool = False, **param_stats) -> dict:
    n_p = len(meta["params"])
    g = grad if isinstance(grad, list) else [grad] * n_p
    r = {"step": step, "scalars": {"lr": lr}, "param": {"grad_norm": g, "grad_maxabs": [abs(x) for x in g],
                                                        "param_norm": [1.0] * n_p,
                                                        "grad_nonfinite": [0] * n_p}, "module": module or {}}
    r["param"].update(param_stats)
    if loss is not None:
        r["scalars"]["loss"] = loss
    r["scalars"]["total_grad_norm"] = total if total is not None else float(np.sqrt(np.sum(np.square(g))))
    if vectors:
        r["vectors"] = vectors
    if exec_order:
        r["exec_order"] = [m["name"] for m in meta["modules"]]
    return r


def module_col(meta: dict, values: dict) -> list:
    return [values.get(m["name"]) for m in meta["modules"]]


def kinds(findings) -> list[str]:
    return [f.kind for f in findings]


def noisy(n: int, center: float, rel: float, seed: int) -> np.ndarray:
    return center * (1 + rel * np.random.default_rng(seed).standard_normal(n))


def profile_trace(depth: int, gain: float, steps: int = 10, stat: str = "outgrad_norm",
                  act: str | None = "relu") -> Trace:
    """outgrad_norm (or out_std) falling/growing by ``gain`` per weight layer."""
    meta = mlp_meta(depth, act)
    rng = np.random.default_rng(0)
    records = []
    for s in range(steps):
        vals = {}
        for i in range(depth):
            k = (depth - 1 - i) if stat == "outgrad_norm" else i
            vals[str(2 * i)] = float(gain ** k * np.exp(0.05 * rng.standard_normal()))
        records.append(rec(meta, s, module={stat: module_col(meta, vals)}, exec_order=(s == 0)))
    return Trace(meta, records)


# ---- depth profiles ------------------------------------------------------------------------
def test_vanishing_gradients_gain_and_first_layer():
    f = diagnose(profile_trace(20, 0.52))
    v = [x for x in f if x.kind == "vanishing_gradients"]
    assert len(v) == 1
    assert v[0].layers[0] == "0"
    assert abs(v[0].evidence["per_layer_gain"] - 0.52) < 0.02
    assert "0.52" in v[0].evidence["summary"] and "20 layers" in v[0].evidence["summary"]
    assert v[0].severity == "error" and v[0].fixes          # 0.52^19 = 4e-6: early layers frozen
    mild = [x for x in diagnose(profile_trace(20, 0.75)) if x.kind == "vanishing_gradients"]
    assert [x.severity for x in mild] == ["warning"]         # 0.75^19 = 4e-3


def test_exploding_gradients_across_depth():
    f = diagnose(profile_trace(10, 2.0))
    e = [x for x in f if x.kind == "exploding_gradients"]
    assert e and e[0].layers[0] == "0" and e[0].severity == "error"
    assert abs(e[0].evidence["per_layer_gain"] - 2.0) < 0.1


def test_flat_profile_is_silent():
    assert diagnose(profile_trace(20, 1.0)) == []


def test_short_profile_not_fitted():
    # Fewer weight layers than depth_min_layers: nothing is claimed.
    assert diagnose(profile_trace(3, 0.01)) == []


def test_shrinking_and_growing_activations():
    s = diagnose(profile_trace(12, 0.5, stat="out_std"))
    assert kinds(s) == ["shrinking_activations"]
    assert s[0].layers[0] == "22"          # the deepest (smallest) is the most affected
    g = diagnose(profile_trace(12, 2.0, stat="out_std"))
    assert kinds(g) == ["growing_activations"]
    assert g[0].layers[0] == "22"


def _normed_profile(norm_every: int, gain: float = 3.0, depth: int = 12, steps: int = 10) -> Trace:
    """out_std of ``depth`` Linear layers growing by ``gain`` per layer within a stretch, a
    LayerNorm after every ``norm_every`` layers resetting it to 1 (independent reference:
    the scale a layer sees is the one the last normaliser handed on)."""
    modules, params, order, vals = [], [], [], {}
    for i in range(depth):
        name = f"l{i}"
        modules.append({"name": name, "type": "Linear", "activation": None, "params": [f"{name}.weight"]})
        params.append({"name": f"{name}.weight", "shape": [8, 8], "dtype": "float32", "module": name})
        order.append(name)
        vals[name] = gain ** (i % norm_every + 1)
        if (i + 1) % norm_every == 0:
            modules.append({"name": f"n{i}", "type": "LayerNorm", "activation": "norm", "params": []})
            order.append(f"n{i}")
    meta = {"modules": modules, "params": params}
    recs = [rec(meta, s, module={"out_std": [vals.get(m["name"], 1.0) for m in modules]}) for s in range(steps)]
    recs[0]["exec_order"] = order
    return Trace(meta, recs)


def test_activation_scale_compounds_only_between_normalisers():
    from gradtrace.diagnose.activations import chains
    # three layers between norms, x3 each: no stretch of 4 layers to judge, though the
    # execution-order profile rises x27 within each block (a pre-LN transformer's branches)
    short = _normed_profile(norm_every=3)
    assert chains(short, [f"l{i}" for i in range(12)]) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert diagnose(short) == []
    # six layers between norms, x3 each: x243 along a stretch: growing, named in that stretch
    long = _normed_profile(norm_every=6)
    (g,) = diagnose(long)
    assert g.kind == "growing_activations" and g.layers[0] == "l5"
    assert g.evidence["per_layer_gain"] == pytest.approx(3.0, rel=REL_TOL)
    assert g.evidence["ratio_to_first_layer"] == pytest.approx(3.0 ** 5, rel=REL_TOL)
    assert set(g.evidence["out_std_median"]) == {f"l{i}" for i in range(6)}


# ---- reduced-precision headroom -----------------------------------------------------------
F16_MAX = float(torch.finfo(torch.float16).max)


def overflow_trace(maxabs: list[float], *, dtype: str = "float16", every: int = 10, nan_at: int | None = None):
    """A 2-layer net whose layer "2" outputs ``dtype`` with the given largest magnitudes."""
    meta = mlp_meta(2)
    recs = []
    for i, m in enumerate(maxabs):
        r = rec(meta, i * every, module={"out_maxabs": module_col(meta, {"0": 3.0, "1": 3.0, "2": m})},
                loss=math.nan if nan_at is not None and i * every >= nan_at else 1.0)
        if i == 0:
            r["out_dtypes"] = {"0": "float32", "1": "float32", "2": dtype}
        recs.append(r)
    return Trace(meta, recs)


def test_near_overflow_names_module_headroom_and_growth():
    vals = [1000.0 * 1.5 ** i for i in range(12)]         # x1.5 per record of 10 steps
    f = [x for x in diagnose(overflow_trace(vals)) if x.kind == "near_overflow"]
    assert len(f) == 1 and f[0].layers == ["2"] and f[0].severity == "warning"
    first = next(i for i, v in enumerate(vals) if v >= F16_MAX / 2)     # independent: 1000 * 1.5^i >= 32752
    ev = f[0].evidence
    assert f[0].first_step == 10 * first and ev.max_abs == vals[first]
    assert ev.headroom == pytest.approx(F16_MAX / vals[first], rel=REL_TOL)
    assert ev.growth_per_step == pytest.approx(1.5 ** 0.1, rel=REL_TOL)
    assert ev.steps_to_overflow == pytest.approx(math.log(F16_MAX / vals[first]) / math.log(1.5 ** 0.1), rel=REL_TOL)
    assert ev.dtype == "float16" and ev.dtype_max == F16_MAX and len(ev.window) == Thresholds().overflow_trend_window
    assert not ev.resolved and f[0].last_step == 10 * (len(vals) - 1)
    assert "float16" in ev.summary and f[0].fixes
    # a looser headroom flags it a record earlier, a tighter one a record later
    looser = diagnose(overflow_trace(vals), {"overflow_headroom": 3.0})
    assert next(x for x in looser if x.kind == "near_overflow").first_step == 10 * (first - 1)


def test_near_overflow_needs_a_rising_reduced_precision_output():
    high_flat = [40000.0, 41000.0, 40000.0, 39000.0, 40500.0, 39500.0, 39000.0, 40800.0, 40200.0]
    assert "near_overflow" not in kinds(diagnose(overflow_trace(high_flat)))        # not rising
    # a trend needs a full window: four records climbing to 0.9 x max are not yet one
    climb = [F16_MAX * x for x in (0.6, 0.7, 0.8, 0.9)]
    assert "near_overflow" not in kinds(diagnose(overflow_trace(climb)))
    assert "near_overflow" in kinds(diagnose(overflow_trace(climb), {"overflow_trend_window": 4}))
    rising = [1000.0 * 1.5 ** i for i in range(12)]
    assert "near_overflow" not in kinds(diagnose(overflow_trace(rising, dtype="float32")))
    # bfloat16 shares float32's range: the same values are nowhere near its limit
    assert "near_overflow" not in kinds(diagnose(overflow_trace(rising, dtype="bfloat16")))
    # only records before the first non-finite step are judged
    assert "near_overflow" not in kinds(diagnose(overflow_trace(rising, nan_at=90)))


def test_near_overflow_names_every_flagged_module_earliest_then_least_headroom():
    meta = mlp_meta(3)                                  # Linear 0, ReLU 1, Linear 2, ReLU 3, Linear 4
    grow = [1000.0 * 1.5 ** i for i in range(12)]
    recs = [rec(meta, 10 * i, module={"out_maxabs": module_col(meta, {"0": 0.8 * g, "2": 3.0, "4": g})})
            for i, g in enumerate(grow)]
    recs[0]["out_dtypes"] = {"0": "float16", "2": "float32", "4": "float16"}
    (f,) = [x for x in diagnose(Trace(meta, recs)) if x.kind == "near_overflow"]
    # "4" crosses 32752 at record 9 (38443), "0" at record 10 (0.8 x 57665 = 46132: less headroom)
    assert f.layers == ["4", "0"] and f.first_step == 90 and f.evidence.module == "4"
    assert list(f.evidence.headroom_per_module) == ["0", "4"]     # least headroom first
    assert f.evidence.headroom_per_module["0"] == pytest.approx(F16_MAX / (0.8 * grow[10]), rel=REL_TOL)


def test_trace_out_dtypes_are_recorded_and_read_back(tmp_path):
    class HalfOut(torch.nn.Module):
        def forward(self, x):
            return x.half()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), HalfOut())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, out=str(tmp_path / "run"), activations_every=1) as mon:
        for _ in range(3):
            loss = model(torch.randn(2, 4)).float().pow(2).mean()
            mon.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    want = {"0": "float32", "1": "float16"}
    assert gt.load(str(tmp_path / "run")).out_dtypes() == want == mon.trace.out_dtypes()
    # written once, not on every record
    assert sum("out_dtypes" in r for r in gt.load(str(tmp_path / "run"))._store.extras) == 1


def test_depth_threshold_override():
    tr = profile_trace(20, 0.75)
    assert "vanishing_gradients" in kinds(diagnose(tr))
    assert "vanishing_gradients" not in kinds(diagnose(tr, {"vanish_gain": 0.7}))


# ---- over the steps ---------------------------------------------------------------------------
def test_exploding_gradients_spike_over_steps():
    meta = mlp_meta(3)
    norms = noisy(40, 1.0, 0.1, 1)
    norms[30:34] = 500.0                  # persists: the 3 records after it stay that high
    tr = Trace(meta, [rec(meta, s, grad=float(n), loss=float(1 + 0.01 * (s % 3))) for s, n in enumerate(norms)])
    f = [x for x in diagnose(tr) if x.kind == "exploding_gradients"]
    assert f and f[0].first_step == 30
    assert f[0].evidence["fold_over_baseline"] > 100
    # live: reported once the records after it are in, never before, never taken back
    assert not any(x.kind == "exploding_gradients" for x in diagnose(tr.upto(30)))
    assert any(x.kind == "exploding_gradients" for x in diagnose(tr.upto(31)))   # 31 repeats it


def test_isolated_gradient_spike_the_run_absorbs_is_not_reported():
    # one record of a large gradient, the next ones back at the baseline, the loss flat: a hard
    # batch (or Adam bounding the step) - mirrors the loss-spike corroboration rule
    meta = mlp_meta(3)
    norms = noisy(40, 1.0, 0.1, 1)
    norms[30] = 500.0
    loss = [float(1 + 0.01 * (s % 3)) for s in range(40)]
    tr = Trace(meta, [rec(meta, s, grad=float(n), loss=loss[s]) for s, n in enumerate(norms)])
    assert [x for x in diagnose(tr) if x.kind == "exploding_gradients"] == []
    # the same spike with the loss jumping at the next step: corroborated
    loss[31] = 50.0
    tr = Trace(meta, [rec(meta, s, grad=float(n), loss=loss[s]) for s, n in enumerate(norms)])
    f = [x for x in diagnose(tr) if x.kind == "exploding_gradients"]
    assert f and f[0].first_step == 30 and f[0].severity == "warning"
    # a second spike within the baseline window: both count (it repeats)
    norms[40 - 5] = 500.0
    loss[31] = loss[30]
    tr = Trace(meta, [rec(meta, s, grad=float(n), loss=loss[s]) for s, n in enumerate(norms)])
    f = [x for x in diagnose(tr) if x.kind == "exploding_gradients"]
    assert f and f[0].first_step == 30 and f[0].evidence["steps_flagged"] == [30, 35]


def test_exploding_gradients_steady_climb():
    meta = mlp_meta(3)
    norms = 1.0 * 1.3 ** np.arange(40) * (1 + 0.05 * np.random.default_rng(2).standard_normal(40))
    tr = Trace(meta, [rec(meta, s, grad=float(n)) for s, n in enumerate(norms)])
    f = [x for x in diagnose(tr) if x.kind == "exploding_gradients"]
    assert f, "a steady exponential climb must be caught against the early baseline"


def test_exploding_severity_isolated_spike_vs_climb_vs_clipped():
    meta = mlp_meta(3)
    norms = noisy(40, 1.0, 0.1, 1)
    norms[30] = 500.0                     # one spike the loss answers (corroborated), then gone
    spike = Trace(meta, [rec(meta, s, grad=float(n), loss=50.0 if s == 30 else 1.0) for s, n in enumerate(norms)])
    assert [f.severity for f in diagnose(spike) if f.kind == "exploding_gradients"] == ["warning"]
    climb = 1.3 ** np.arange(40) * (1 + 0.05 * np.random.default_rng(2).standard_normal(40))
    records = [rec(meta, s, grad=float(n)) for s, n in enumerate(climb)]
    assert [f.severity for f in diagnose(Trace(meta, records)) if f.kind == "exploding_gradients"] == ["error"]
    for r in records:                      # the same climb, held by clipping, the loss flat:
        r["scalars"]["total_grad_norm_post_clip"] = min(r["scalars"]["total_grad_norm"], 1.0)
    # the remedy is working, nothing to report (the rising-loss case: the test below)
    assert [f for f in diagnose(Trace(meta, records)) if f.kind == "exploding_gradients"] == []


def test_loss_spike_and_override():
    meta = mlp_meta(3)
    loss = noisy(40, 2.0, 0.02, 3)
    loss[25] = 9.0
    # A spike that comes with a gradient norm 10x its usual level is corroborated ...
    tr = Trace(meta, [rec(meta, s, loss=float(l), total=1.0 if s == 25 else 0.1) for s, l in enumerate(loss)])
    f = [x for x in diagnose(tr) if x.kind == "loss_spike"]
    assert f and f[0].first_step == 25 and f[0].severity == "warning"
    assert f[0].evidence["robust_z"] > 8 and f[0].evidence["corroborated_by"] == {25: "gradient"}
    # ... a lone high loss on one batch with an ordinary gradient is not (issue 11) ...
    lone = Trace(meta, [rec(meta, s, loss=float(l), total=0.1) for s, l in enumerate(loss)])
    assert "loss_spike" not in kinds(diagnose(lone))
    # ... unless it persists.
    loss[26:29] = [8.0, 8.5, 9.0]
    kept = Trace(meta, [rec(meta, s, loss=float(l), total=0.1) for s, l in enumerate(loss)])
    (g,) = [x for x in diagnose(kept) if x.kind == "loss_spike"]
    assert g.evidence["corroborated_by"][25] == "persists"
    assert "loss_spike" not in kinds(diagnose(tr, Thresholds(spike_z=1e6)))
    assert "loss_spike" not in kinds(diagnose(tr, {"spike_min_fold": 10.0}))


def test_loss_nonfinite():
    meta = mlp_meta(3)
    tr = Trace(meta, [rec(meta, s, loss=(1.0 if s < 7 else "nan")) for s in range(10)])
    f = [x for x in diagnose(tr) if x.kind == "loss_nonfinite"]
    assert f and f[0].first_step == 7 and f[0].severity == "error"
    assert f[0].evidence["lr"] == 0.1


# ---- non-finite localisation -------------------------------------------------------------
def nan_trace(events: list[dict], steps: int = 10, grads=None, param_order=None, **kw) -> Trace:
    meta = mlp_meta(4)
    if param_order is not None:   # meta order need not be forward order
        meta["params"] = [meta["params"][i] for i in param_order]
    records = []
    for s in range(steps):
        g = grads(s) if grads else 0.1
        records.append(rec(meta, s, grad=g, exec_order=(s == 0), **kw))
    return Trace(meta, records + events)


def test_nonfinite_names_forward_origin_not_later_layer_nor_next_step():
    names = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias", "6.weight", "6.bias"]
    events = [
        {"event": "nonfinite", "step": 5, "forward": "2", "backward": "6", "params": names[:4],
         "loss_nonfinite": True},
        # step+1: the optimizer has spread nan into every weight; the first layer is now first.
        {"event": "nonfinite", "step": 6, "forward": "0", "backward": "6", "params": names,
         "loss_nonfinite": True},
    ]
    f = [x for x in diagnose(nan_trace(events)) if x.kind == "nonfinite"]
    assert len(f) == 1
    assert f[0].first_step == 5
    assert f[0].layers[0] == "2"
    assert f[0].evidence["phase"] == "forward"
    assert f[0].evidence["cause"] == "invalid_operation"
    assert f[0].severity == "error"


def test_nonfinite_backward_localised_from_last_param_in_forward_order():
    # Output-gradient flags off (backward None): the last parameter in forward order
    # with a non-finite gradient is 2.bias, owned by module "2". Meta lists params in
    # a scrambled order to make sure forward order (exec_order) is what counts.
    events = [{"event": "nonfinite", "step": 4, "forward": None, "backward": None,
               "params": ["2.weight", "0.bias", "0.weight", "2.bias"], "loss_nonfinite": False}]
    tr = nan_trace(events, param_order=[6, 7, 2, 3, 0, 1, 4, 5])
    f = [x for x in diagnose(tr) if x.kind == "nonfinite"][0]
    assert f.layers[0] == "2"
    assert f.first_step == 4
    assert "last parameter in forward order" in f.evidence["localised_by"]
    assert f.evidence["suspects"] == ["3", "4"]   # modules run after "2" up to the next weight layer
    assert "`3, 4`" in f.fixes[0].action


def test_nonfinite_backward_event_names_module():
    events = [{"event": "nonfinite", "step": 3, "forward": None, "backward": "4",
               "params": ["0.weight", "2.weight", "4.weight"], "loss_nonfinite": False}]
    f = [x for x in diagnose(nan_trace(events)) if x.kind == "nonfinite"][0]
    assert f.layers[0] == "4" and f.evidence["phase"] == "backward"
    assert f.evidence["suspect_backward_of"] == "5"


def test_nonfinite_without_events_rebuilt_from_records():
    meta = mlp_meta(3)
    recs = [rec(meta, s, grad=[0.1] * 6) for s in range(5)]
    recs.append(rec(meta, 5, grad=[float("nan"), float("nan"), float("nan"), float("nan"), 0.1, 0.1],
                    exec_order=True))
    f = [x for x in diagnose(Trace(meta, recs)) if x.kind == "nonfinite"][0]
    assert f.first_step == 5 and f.layers[0] == "2"


def test_nonfinite_cause_divergence():
    events = [{"event": "nonfinite", "step": 15, "forward": "0", "backward": None, "params": [],
               "loss_nonfinite": True}]
    tr = nan_trace(events, steps=15, grads=lambda s: float(0.1 * 3.0 ** s))
    f = [x for x in diagnose(tr) if x.kind == "nonfinite"][0]
    assert f.evidence["cause"] == "divergence"
    assert "learning rate" in f.explanation


def test_nonfinite_cause_divergence_from_one_huge_update():
    # The run breaks at step 1: no history to grow over, but step 0's update was 900x the weights.
    meta = mlp_meta(3)
    recs = [rec(meta, 0, update_ratio=[900.0] * 6, exec_order=True), rec(meta, 1)]
    events = [{"event": "nonfinite", "step": 1, "forward": "0", "backward": None, "params": [],
               "loss_nonfinite": True}]
    f = [x for x in diagnose(Trace(meta, recs + events)) if x.kind == "nonfinite"][0]
    assert f.evidence["cause"] == "divergence"
    assert f.evidence["cause_evidence"]["max_update_ratio"] == 900.0
    strict = diagnose(Trace(meta, recs + events), {"divergence_update_ratio": 1e4})
    assert [x for x in strict if x.kind == "nonfinite"][0].evidence["cause"] == "invalid_operation"


def test_nonfinite_cause_overflow():
    meta = mlp_meta(4)
    big = float(torch.finfo(torch.float32).max) * 0.5
    recs = [rec(meta, s, exec_order=(s == 0),
                module={"out_maxabs": module_col(meta, {"4": big if s == 8 else 1.0})}) for s in range(10)]
    events = [{"event": "nonfinite", "step": 9, "forward": "4", "backward": None, "params": [],
               "loss_nonfinite": True}]
    f = [x for x in diagnose(Trace(meta, recs + events)) if x.kind == "nonfinite"][0]
    assert f.evidence["cause"] == "overflow"
    assert f.evidence["cause_evidence"]["fraction_of_dtype_max"] == pytest.approx(0.5, rel=REL_TOL)


# ---- units -----------------------------------------------------------------------------------
def test_dead_units_counts_and_window():
    meta = mlp_meta(4)
    units = 40
    recs = []
    for s in range(10):
        m1 = np.ones(units, bool)
        m1[:30] = False                 # 30 of 40 units of "1" never fire
        m3 = np.ones(units, bool)
        m3[s % units] = False           # "3": a different unit silent each step: none dead
        recs.append(rec(meta, s, vectors={"active_mask": {"1": pack_mask(m1), "3": pack_mask(m3)}},
                        module={"dead_units": module_col(meta, {"1": 30.0, "3": 1.0}),
                                "units": module_col(meta, {"1": 40.0, "3": 40.0})},
                        exec_order=(s == 0)))
    f = [x for x in diagnose(Trace(meta, recs)) if x.kind == "dead_units"]
    assert len(f) == 1
    assert f[0].layers == ["1"]
    assert f[0].evidence["dead"] == {"1": 30} and f[0].evidence["units"] == {"1": 40}
    assert "dead_units" not in kinds(diagnose(Trace(meta, recs), {"dead_frac": 0.9}))


def test_dead_units_ignores_steps_after_nan():
    meta = mlp_meta(3)
    recs = []
    for s in range(10):
        m = np.ones(16, bool) if s < 6 else np.zeros(16, bool)   # nan outputs look "never active"
        recs.append(rec(meta, s, vectors={"active_mask": {"1": pack_mask(m)}}))
    events = [{"event": "nonfinite", "step": 6, "forward": "0", "backward": None, "params": [],
               "loss_nonfinite": False}]
    assert "dead_units" not in kinds(diagnose(Trace(meta, recs + events)))


def test_saturated_units():
    meta = mlp_meta(3, act="sigmoid", act_type="Sigmoid")
    recs = [rec(meta, s, module={"saturated_frac": module_col(meta, {"1": 0.1, "3": 0.8})}) for s in range(8)]
    f = [x for x in diagnose(Trace(meta, recs)) if x.kind == "saturated_units"]
    assert f and f[0].layers == ["3"]
    assert f[0].evidence["saturated_fraction"]["3"] == pytest.approx(0.8, rel=REL_TOL)


# ---- through time ----------------------------------------------------------------------------
def rnn_trace(gain: float, T: int = 100) -> Trace:
    meta = {"format": "gradtrace-trace", "format_version": 1,
            "modules": [{"name": "rnn", "type": "RNN", "activation": "recurrent",
                         "params": ["rnn.weight_ih_l0", "rnn.weight_hh_l0"]},
                        {"name": "head", "type": "Linear", "activation": None, "params": ["head.weight"]}],
            "params": [{"name": "rnn.weight_ih_l0", "shape": [16, 4], "dtype": "float32", "module": "rnn"},
                       {"name": "rnn.weight_hh_l0", "shape": [16, 16], "dtype": "float32", "module": "rnn"},
                       {"name": "head.weight", "shape": [2, 16], "dtype": "float32", "module": "head"}]}
    prof = [gain ** (T - 1 - t) for t in range(T)]
    recs = [rec(meta, s, vectors={"time_grad_norm": {"rnn": prof}}) for s in range(6)]
    return Trace(meta, recs)


def test_vanishing_and_exploding_through_time():
    v = diagnose(rnn_trace(0.9))
    assert kinds(v) == ["vanishing_through_time"] and v[0].layers == ["rnn"]
    assert v[0].evidence["per_step_gain"] == pytest.approx(0.9, rel=1e-6)
    e = diagnose(rnn_trace(1.1))
    assert kinds(e) == ["exploding_through_time"] and e[0].severity == "error"
    assert diagnose(rnn_trace(1.0)) == []
    codes = " ".join(x.code for x in v[0].fixes)
    assert "nn.LSTM(4, 16)" in codes and "detach" in codes


# ---- vanishing through time waits for a stretch training could change (issue 11) -------------
def rnn_run(logratios, moves, T: int = 50, every: int = 1) -> Trace:
    """An RNN trace whose earliest/latest time-gradient ratio at record k is
    ``exp(logratios[k])`` and whose ``rnn`` module moves by ``moves[k]`` of its norm at the
    update of that record's step (both weights of norm 2 and 1: the layer's relative update is
    the same ``moves[k]`` when each parameter moves by it). Records every ``every`` steps."""
    meta = rnn_trace(1.0).meta
    recs = []
    for k, (lr, m) in enumerate(zip(logratios, moves)):
        gain = math.exp(lr / (T - 1))
        prof = [gain ** (T - 1 - t) for t in range(T)]
        recs.append(rec(meta, k * every, vectors={"time_grad_norm": {"rnn": prof}},
                        update_ratio=[m, m, 0.01], param_norm=[2.0, 1.0, 1.0]))
    return Trace(meta, recs)


def test_vanishing_through_time_flat_is_found_once_the_weights_moved():
    flat = [math.log(1e-12)] * 12
    f = [x for x in diagnose(rnn_run(flat, [0.03] * 12)) if x.kind == "vanishing_through_time"]
    # 5 records (persist_window) and 0.03 x 4 updates = 0.12 >= time_min_movement by step 4
    assert len(f) == 1 and f[0].first_step == 4
    assert f[0].evidence["per_layer"]["rnn"]["weights_moved"] == pytest.approx(0.12, rel=REL_TOL)
    assert f[0].evidence["ratio_earliest_to_latest"] == pytest.approx(1e-12, rel=1e-6)
    # the same flat profile while the weights barely move: nothing can be concluded yet
    assert diagnose(rnn_run(flat, [0.001] * 12)) == []
    # ... until they have moved: 0.001 x 6 + 0.05 x 2 = 0.106 >= 0.1 by step 8
    late = [x for x in diagnose(rnn_run(flat, [0.001] * 6 + [0.05] * 6)) if x.kind == "vanishing_through_time"]
    assert late and late[0].first_step == 8


def test_vanishing_through_time_that_is_climbing_out_is_not_a_finding():
    # gates learning to remember: 1e-12 at initialisation, up 1.5 decades a record (the
    # trend carried one stretch ahead is out of the range: no record qualifies)
    rising = [math.log(10.0) * (-12 + 1.5 * k) for k in range(10)]
    assert diagnose(rnn_run(rising, [0.05] * 10)) == []
    # too slow to get out: up a decade per 20 records, still far below 1e-3 one stretch ahead
    slow = [math.log(10.0) * (-11 + k / 20) for k in range(14)]
    f = [x for x in diagnose(rnn_run(slow, [0.05] * 14)) if x.kind == "vanishing_through_time"]
    assert f and f[0].first_step == 4
    # a worsening one is found as well
    worse = [math.log(10.0) * (-5 - k / 4) for k in range(14)]
    assert [x.kind for x in diagnose(rnn_run(worse, [0.05] * 14))] == ["vanishing_through_time"]


def test_vanishing_through_time_never_disappears_and_sparse_updates_count_their_steps():
    flat = [math.log(1e-12)] * 10
    tr = rnn_run(flat, [0.01] * 10, every=10)       # records every 10 steps, 0.01 per step
    seen = False
    for s in tr.steps_recorded.tolist():
        now = any(x.kind == "vanishing_through_time" for x in diagnose(tr.upto(int(s))))
        assert now or not seen, f"vanished at step {s}"
        seen = seen or now
    f = [x for x in diagnose(tr) if x.kind == "vanishing_through_time"]
    # a record stands for the 10 steps until the next: 0.01 x 40 steps = 0.4 by record 4
    assert f and f[0].first_step == 40
    assert f[0].evidence["per_layer"]["rnn"]["weights_moved"] == pytest.approx(0.4, rel=REL_TOL)


def test_layer_movement_is_the_module_update_as_one_vector():
    from gradtrace.diagnose.through_time import layer_movement
    meta = rnn_trace(1.0).meta
    tr = Trace(meta, [rec(meta, 0, update_ratio=[0.3, 0.1, 0.9], param_norm=[2.0, 1.0, 5.0])])
    steps, per = layer_movement(tr, "rnn")
    # reference: ||(0.3 * 2, 0.1 * 1)|| / ||(2, 1)||, the head's parameter not included
    assert per[0] == pytest.approx(math.hypot(0.6, 0.1) / math.hypot(2.0, 1.0), rel=REL_TOL)


# ---- exploding pre-clip norms held by the user's clipping ---------------------------------------
def _clipped_climb(loss_fn) -> Trace:
    meta = mlp_meta(3)
    climb = 1.3 ** np.arange(40) * (1 + 0.05 * np.random.default_rng(2).standard_normal(40))
    records = []
    for s, n in enumerate(climb):
        r = rec(meta, s, grad=float(n), loss=loss_fn(s))
        r["scalars"]["total_grad_norm_post_clip"] = min(r["scalars"]["total_grad_norm"], 1.0)
        records.append(r)
    return Trace(meta, records)


def test_clipping_that_holds_and_a_loss_that_holds_is_not_a_finding():
    # four batches cycling: a periodic loss, flat on average (the chapter's clipped RNN)
    cyc = [0.78, 0.76, 0.98, 0.92]
    assert [f for f in diagnose(_clipped_climb(lambda s: cyc[s % 4])) if f.kind == "exploding_gradients"] == []
    # the loss rising despite the clipping: reported, with the applied norm in the evidence
    (f,) = [f for f in diagnose(_clipped_climb(lambda s: cyc[s % 4] * (1 + 0.05 * max(0, s - 20))))
            if f.kind == "exploding_gradients"]
    assert f.first_step > 20 and f.evidence["post_clip_max"] <= 1.0 and f.severity == "warning"


# ---- depth counted in blocks ---------------------------------------------------------------------
def block_trace(blocks: int, block_gain: float, steps: int = 10) -> Trace:
    """A post-LN-like stack: emb, then per block attn/norm1/fc1/fc2/norm2, then head; the
    output gradient shrinks by ``block_gain`` per block going backward, with a sawtooth
    inside each block (fc1 a third lower) that carries no trend."""
    names = ["emb"] + [f"enc.layers.{b}.{m}" for b in range(blocks)
                       for m in ("attn", "norm1", "fc1", "fc2", "norm2")] + ["head"]
    modules = [{"name": n, "type": "Linear", "activation": "norm" if "norm" in n else None,
                "params": [f"{n}.weight"]} for n in names]
    params = [{"name": f"{n}.weight", "shape": [8, 8], "dtype": "float32", "module": n} for n in names]
    meta = {"format": "gradtrace-trace", "format_version": 1, "modules": modules, "params": params}
    rng = np.random.default_rng(0)
    recs = []
    for s in range(steps):
        vals = []
        for n in names:
            b = -1 if n == "emb" else blocks if n == "head" else int(n.split(".")[2])
            v = block_gain ** (blocks - b) * (0.7 if n.endswith("fc1") else 1.0)
            vals.append(float(v * np.exp(0.05 * rng.standard_normal())))
        recs.append(rec(meta, s, module={"outgrad_norm": vals}, exec_order=(s == 0)))
    return Trace(meta, recs)


def test_depth_rule_counts_blocks_not_modules():
    from gradtrace.diagnose.gradients import blocks
    # 12 blocks losing 0.5 each: 2.4e-4 from emb to head, 0.87 per module (> vanish_gain)
    f = [x for x in diagnose(block_trace(12, 0.5)) if x.kind == "vanishing_gradients"]
    assert len(f) == 1 and f[0].evidence["layers_in_profile"] == 14
    assert f[0].evidence["per_layer_gain"] == pytest.approx(0.5, rel=0.05)
    assert f[0].layers[0] == "emb" and f[0].layers[1] == "enc.layers.0.attn"
    assert "each block" in f[0].evidence["summary"]
    assert [x for x in diagnose(block_trace(12, 0.97)) if x.kind == "vanishing_gradients"] == []
    # nested repeats: the stack that repeats most is the unit
    names = ["0.conv", "0.layer1.0.a", "0.layer1.0.b", "0.layer1.1.a", "0.layer1.2.a", "1"]
    assert [u for u, _ in blocks(names)] == ["0", "0.layer1.0", "0.layer1.1", "0.layer1.2", "1"]


# ---- API ---------------------------------------------------------------------------------------
def test_thresholds_validation():
    with pytest.raises(ValueError, match="spike_zz"):
        Thresholds().replace(spike_zz=3)
    with pytest.raises(ValueError, match="unknown threshold"):
        diagnose(profile_trace(5, 1.0), {"no_such": 1})
    with pytest.raises(TypeError, match="thresholds"):
        diagnose(profile_trace(5, 1.0), 3)
    with pytest.raises(ValueError, match="vanish_gain"):
        Thresholds(vanish_gain=2.0)
    with pytest.raises(ValueError, match="dead_frac"):
        Thresholds(dead_frac=-1)
    with pytest.raises(TypeError, match="dead_window"):
        Thresholds(dead_window=2.5)
    assert Thresholds.coerce({"spike_z": 5}).spike_z == 5
    assert Thresholds.__doc__ and all(f"{name}:" in Thresholds.__doc__
                                      for name in Thresholds.__dataclass_fields__)


def test_diagnose_rejects_non_trace():
    with pytest.raises(TypeError, match="trace"):
        diagnose({"not": "a trace"})


def test_empty_trace_is_silent():
    assert diagnose(Trace(mlp_meta(3), [])) == []


def test_ranked_root_cause_first():
    # Issue 11: the earliest finding leads (what went wrong first made the rest), not the
    # first error; ties follow the causal order (nonfinite before loss_nonfinite).
    meta = mlp_meta(4)
    loss = list(noisy(30, 2.0, 0.02, 5))
    loss[12] = 20.0
    loss[25:] = ["nan"] * 5
    recs = [rec(meta, s, loss=l if isinstance(l, str) else float(l), exec_order=(s == 0),
                total=1.0 if s == 12 else 0.1) for s, l in enumerate(loss)]
    events = [{"event": "nonfinite", "step": 25, "forward": None, "backward": None, "params": [],
               "loss_nonfinite": True}]
    f = diagnose(Trace(meta, recs + events))
    assert [x.first_step for x in f] == sorted(x.first_step for x in f)
    assert kinds(f)[0] == "loss_spike" and f[0].first_step == 12
    assert kinds(f).index("nonfinite") < kinds(f).index("loss_nonfinite")
    for x in f:
        assert x.kind in KINDS and x.to_dict()["kind"] == x.kind


def test_every_detector_pure_and_documented():
    tr = profile_trace(10, 0.5)
    before = repr(tr.records)
    th = Thresholds()
    for det in DETECTORS:
        assert det.__doc__ and "Example" in det.__doc__
        out = det(tr, th)
        assert all(isinstance(x, Finding) for x in out)
    assert repr(tr.records) == before


def test_noisy_healthy_200_steps_50_layers_has_no_finding():
    # Speed lives in bench/trace_scale.py (diagnose of a 100k-step trace), not in a timed test.
    depth = 50
    meta = mlp_meta(depth)
    rng = np.random.default_rng(0)
    n_m = len(meta["modules"])
    recs = []
    for s in range(200):
        mod = {"outgrad_norm": list(rng.uniform(0.5, 1.5, n_m)), "out_std": list(rng.uniform(0.5, 1.5, n_m)),
               "out_maxabs": list(rng.uniform(1, 3, n_m)), "out_flag_nonfinite": [0.0] * n_m}
        masks = {m["name"]: pack_mask(rng.uniform(size=64) > 0.01) for m in meta["modules"] if m["activation"]}
        recs.append(rec(meta, s, grad=list(rng.uniform(0.05, 0.15, 2 * depth)), module=mod,
                        loss=float(2 + 0.1 * rng.standard_normal()), vectors={"active_mask": masks},
                        exec_order=(s == 0)))
    tr = Trace(meta, recs)
    assert diagnose(tr) == []


# ---- the labelled scenarios ---------------------------------------------------------------------
from scenarios import SCENARIOS, evaluate  # noqa: E402

_PARAMS = [pytest.param(n, marks=() if s.fast else pytest.mark.slow, id=n) for n, s in SCENARIOS.items()]


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny models: one thread is fastest, spinning workers only cost
    yield
    torch.set_num_threads(old)


@pytest.mark.parametrize("name", _PARAMS)
def test_scenario(name):
    sc = SCENARIOS[name]
    findings = diagnose(sc.build())
    out = evaluate(sc, findings)
    assert not out.missed, f"{name}: missed {out.missed}; found {out.found}"
    assert not out.wrong_layer, f"{name}: wrong first layer for {out.wrong_layer}: {out.found}"
    assert not out.false_alarms, f"{name}: false alarms {out.false_alarms}"
    if sc.healthy:
        assert findings == []
    if sc.cause:
        assert out.cause_ok, f"{name}: cause {[f.evidence.get('cause') for f in findings]}"
    for f in findings:
        assert f.fixes and f.explanation and f.evidence.get("summary")


def test_suite_covers_required_cases():
    names = set(SCENARIOS)
    assert len(names) >= 14
    assert {"deep_sigmoid_mlp", "deep_tanh_small_init", "relu30_xavier", "relu30_kaiming",
            "exploding_weights", "high_lr_nan", "dead_relu_bias", "inf_injection", "rnn_tanh_small",
            "rnn_tanh_large", "lstm_memory", "residual_layernorm_mlp", "pre_ln_transformer",
            "cnn_batchnorm"} <= names
    covered = {k for s in SCENARIOS.values() for k in s.expected}
    assert covered == set(KINDS), f"kinds no scenario expects: {set(KINDS) - covered}"


def test_scenario_run_rejects_unknown():
    from scenarios import run
    with pytest.raises(ValueError, match="name="):
        run("nope")



def test_dead_units_need_enough_inputs_seen():
    """A unit silent on three examples is not evidence; on 64+ examples it is."""
    torch.manual_seed(0)

    def run(batch):
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        with torch.no_grad():
            model[0].bias[:4] = -50.0                      # four units that can never fire
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        with gt.watch(model, opt, activations_every=1) as mon:
            for _ in range(5):
                model(torch.randn(batch, 8)).pow(2).mean().backward()
                opt.step()
                opt.zero_grad()
        return [f for f in diagnose(mon.trace, {"dead_frac": 0.1}) if f.kind == "dead_units"]

    assert run(batch=3) == []          # 15 inputs in the window: below dead_min_samples
    (f,) = run(batch=32)               # 160 inputs: the four dead units are reported
    assert f.layers == ["1"]


def test_late_wobble_of_a_tiny_loss_is_not_a_spike():
    meta = mlp_meta(3)
    rng = np.random.default_rng(0)
    loss = np.r_[np.linspace(2.0, 0.002, 60), 0.002 * (1 + 0.01 * rng.standard_normal(40))]
    wobble = loss.copy()
    wobble[80] = 0.006                  # 3x, z huge, but 0.2% of the starting loss
    spike = loss.copy()
    spike[80] = 1.5                     # back to most of the starting loss: an event
    # both come with a gradient 10x its usual norm (corroborated); only the rise differs
    find = lambda l: [f for f in diagnose(Trace(meta, [rec(meta, s, loss=float(v), total=1.0 if s == 80 else 0.1)
                                                       for s, v in enumerate(l)]))
                      if f.kind == "loss_spike"]
    assert find(wobble) == []
    assert [f.first_step for f in find(spike)] == [80]


# --- the vectorised rolling statistics against plain-Python references ---------------

def _series_cases(seed: int = 0):
    """Seeded series with nan/inf, flat stretches, spikes, and short lengths."""
    rng = np.random.default_rng(seed)
    for n in (0, 1, 2, 3, 5, 7, 24, 61, 300):
        for _ in range(4):
            x = np.exp(rng.normal(0, 1, n)) * rng.choice([1e-8, 1.0, 1e6])
            if n:
                bad = rng.random(n) < 0.15
                x[bad] = rng.choice([np.nan, np.inf, -np.inf], size=int(bad.sum()))
                x[rng.random(n) < 0.05] *= 1e4                       # spikes
                if n > 10:
                    x[3:9] = 2.5                                      # a flat stretch
            yield x


def _ref_trailing_spikes(values, warmup, window, min_baseline, z_limit):
    from gradtrace import numerics
    out = []
    for i in range(max(warmup, 1), len(values)):
        if not np.isfinite(values[i]):
            continue
        base = [v for v in values[max(0, i - window): i] if np.isfinite(v)]
        if len(base) < min_baseline:
            continue
        z = numerics.robust_z(float(values[i]), np.array(base))
        if z > z_limit:
            out.append((i, z, float(np.median(base))))
    return out


def test_trailing_spikes_identical_to_per_step_reference():
    from gradtrace.diagnose._util import trailing_robust_z, trailing_spikes
    from gradtrace import numerics
    cases = 0
    for x in _series_cases():
        for window, warmup, min_base, zl in ((20, 5, 5, 10.0), (3, 0, 1, 2.0), (7, 2, 7, 0.5)):
            got = trailing_spikes(x, warmup=warmup, window=window, min_baseline=min_base, z_limit=zl)
            assert got == _ref_trailing_spikes(x, warmup, window, min_base, zl)  # bit-for-bit
            cases += len(got)
        z, med, cnt = trailing_robust_z(x, 4)
        for i in range(x.size):
            base = x[max(0, i - 4): i]
            assert cnt[i] == np.isfinite(base).sum()
            if cnt[i] and np.isfinite(x[i]):
                assert z[i] == numerics.robust_z(float(x[i]), base)
                assert med[i] == np.median(base[np.isfinite(base)])
            elif not cnt[i]:
                assert np.isnan(z[i]) and np.isnan(med[i])
    assert cases > 20          # the cases do contain spikes


def test_window_medians_identical_to_numpy_median():
    from gradtrace.diagnose._util import window_medians
    rng = np.random.default_rng(3)
    for n in (0, 1, 4, 5, 33, 200):
        x = rng.normal(size=n) * 1e3
        for w in (1, 2, 5, 20):
            got = window_medians(x, w)
            ref = [np.median(x[r: r + w]) for r in range(n - w + 1)]
            assert got.tolist() == [float(v) for v in ref]


def test_dead_windows_identical_to_per_step_reference():
    import math
    from gradtrace.diagnose.units import _dead_windows
    rng = np.random.default_rng(5)
    th = Thresholds()
    for n, units in ((1, 4), (3, 4), (40, 16), (9000, 8)):
        steps = np.arange(n) * 10
        masks = rng.random((n, units)) > rng.choice([0.3, 0.97])
        samples = rng.choice([8.0, 32.0, 64.0], size=n)
        if n == 40:
            samples[20] = np.nan        # one step without a sample count
            samples[30:36] = np.nan     # and a stretch longer than a window
        ref = []
        need = math.ceil(th.dead_window / 2)
        for t in range(need - 1, n):
            lo = max(0, t - th.dead_window + 1)
            # Changed on purpose (issue 11): this reference used to take a running sum, so
            # from the first nan count on every window passed dead_min_samples unjudged. A
            # nan count now adds nothing; only a window with no known count at all (a trace
            # older than the counts) is kept without a judgement.
            known = samples[lo: t + 1][np.isfinite(samples[lo: t + 1])]
            if known.size and known.sum() < th.dead_min_samples:
                continue
            active = masks[lo: t + 1].any(axis=0)
            ref.append((int(steps[t]), int((~active).sum()), units))
        got_steps, got_dead = _dead_windows(steps, masks, samples, th)
        assert [(int(a), int(b), units) for a, b in zip(got_steps, got_dead)] == ref


def test_values_at_steps_like_a_dict_lookup():
    from gradtrace.diagnose.units import _at_steps
    rng = np.random.default_rng(2)
    src = rng.integers(0, 50, size=80)                   # unsorted, with repeats
    vals = rng.normal(size=80)
    want = rng.integers(-5, 60, size=100)
    by_step = dict(zip(src.tolist(), vals.tolist()))
    ref = [by_step.get(int(t), np.nan) for t in want]
    np.testing.assert_array_equal(_at_steps(src, vals, want), np.array(ref))
    assert _at_steps(np.array([], dtype=int), np.array([]), want).shape == (100,)


def test_loss_spike_candidates_public_and_checked():
    from gradtrace.diagnose import loss_spike_candidates
    from gradtrace.diagnose.loss import spike_indices
    loss = np.r_[np.ones(30) + 0.01 * np.sin(np.arange(30)), 40.0, np.ones(5)]
    steps = np.arange(loss.size) * 4
    assert loss_spike_candidates(steps, loss) == [120]
    rule = spike_indices(loss, Thresholds())
    assert loss_spike_candidates(steps, loss) == [int(steps[i]) for i, _, _ in rule]
    assert loss_spike_candidates(steps, loss, {"spike_z": 1e9}) == []
    with pytest.raises(ValueError, match="same length"):
        loss_spike_candidates(steps[:-1], loss)


def _watched_layers(model, x, loss_fn) -> list[str]:
    """The modules of the output-gradient depth profile of ``model`` after 2 watched steps."""
    from gradtrace.diagnose.gradients import depth_profile
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    with gt.watch(model, opt, out=None, activations_every=1) as mon:
        for _ in range(2):
            loss = loss_fn(model(x))
            mon.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return depth_profile(mon.trace, "outgrad_norm", Thresholds(depth_min_layers=2))[1]


def test_blocks_of_real_transformer_stacks():
    from gradtrace.diagnose.gradients import blocks
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=False)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16),
                                torch.nn.TransformerEncoder(layer, 6, enable_nested_tensor=False),
                                torch.nn.Linear(16, 1))
    mods = _watched_layers(model, torch.randn(4, 5, 8), lambda y: y.pow(2).mean())
    units = [u for u, _ in blocks(mods)]
    # the input projection, one unit per encoder block (5 watched modules each), the head
    assert units == ["0"] + [f"1.layers.{i}" for i in range(6)] + ["2"]
    assert sum(len(ix) for _, ix in blocks(mods)) == len(mods) > len(units)
    pytest.importorskip("transformers")
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=8, n_embd=16, n_layer=3, n_head=2))
    ids = torch.randint(0, 32, (2, 8))
    units = [u for u, _ in blocks(_watched_layers(gpt, ids, lambda out: out.logits.pow(2).mean()))]
    assert [u for u in units if u.startswith("transformer.h.")] == [f"transformer.h.{i}" for i in range(3)]


def test_a_float16_output_far_from_its_limit_is_no_overflow_cause():
    # float16 output held at 700 (1% of 65504, 93x headroom): a nan then is an invalid
    # operation, as it would be in float32; near the limit (40000) it is an overflow.
    def trace(level):
        meta = mlp_meta(2)
        recs = [rec(meta, s, exec_order=(s == 0), module={"out_maxabs": module_col(meta, {"2": level})})
                for s in range(10)]
        recs[0]["out_dtypes"] = {"0": "float32", "1": "float32", "2": "float16"}
        events = [{"event": "nonfinite", "step": 9, "forward": "2", "backward": None, "params": [],
                   "loss_nonfinite": True}]
        return [x for x in diagnose(Trace(meta, recs + events)) if x.kind == "nonfinite"][0]
    assert trace(700.0).evidence["cause"] == "invalid_operation"
    near = trace(40000.0).evidence
    assert near["cause"] == "overflow" and near["cause_evidence"]["value_dtype"] == "float16"
    assert near["cause_evidence"]["fraction_of_dtype_max"] == pytest.approx(40000.0 / F16_MAX, rel=REL_TOL)


def test_overflow_trend_window_needs_two_points():
    with pytest.raises(ValueError, match="overflow_trend_window"):
        Thresholds(overflow_trend_window=1)
