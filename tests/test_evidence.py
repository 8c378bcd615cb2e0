"""Tests of gradtrace.diagnose.evidence: every finding any producer makes carries its kind's
typed evidence, complete, of the declared types, and serialises exactly as the dict it came from."""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import types
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.diagnose import evidence as E
from gradtrace.diagnose.finding import KINDS, Finding
from gradtrace.preflight import PreflightThresholds
from scenarios import SCENARIOS

D = importlib.import_module("gradtrace.diagnose")     # the package (gt.diagnose is the function)

DOCS = Path(__file__).resolve().parents[1] / "docs" / "evidence.md"
PREFLIGHT = {c for cs in E.EVIDENCE.values() for c in cs if c.__name__.startswith("Preflight")}


# ---- an independent reference: the annotation check and the pre-typed JSON form ----------

def conforms(value, tp) -> bool:
    """``value`` matches the (evaluated) annotation ``tp``; float accepts int, never bool."""
    if tp is typing.Any:
        return True
    if tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is dict:
        return isinstance(value, typing.Mapping) and all(
            conforms(k, args[0]) and conforms(v, args[1]) for k, v in value.items())
    if origin is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value)
    if origin is tuple:
        return isinstance(value, tuple) and all(conforms(v, args[0]) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type) and issubclass(tp, E.Detail):
        return isinstance(value, tp) and all_conform(value) == []
    return isinstance(value, tp)


def all_conform(ev) -> list[str]:
    hints = typing.get_type_hints(type(ev), vars(E))
    return [f"{type(ev).__name__}.{k}={ev[k]!r} is not {hints[k]}" for k in ev
            if not conforms(ev[k], hints[k])]


def old_jsonable(x):
    """The JSON form findings had before evidence was typed (dicts only)."""
    if isinstance(x, dict):
        return {str(k): old_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [old_jsonable(v) for v in x]
    if hasattr(x, "tolist"):
        return old_jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


@pytest.fixture()
def raw_dicts(monkeypatch):
    """Every mapping handed to ``coerce`` by a Finding, keyed by the id of the typed result."""
    seen: dict[int, tuple] = {}
    real = E.coerce

    def spy(kind, data):
        out = real(kind, data)
        if isinstance(data, dict):
            seen[id(out)] = (out, dict(data))
        return out
    monkeypatch.setattr(E, "coerce", spy)
    return seen


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_scenario_finding_has_complete_typed_evidence(name, raw_dicts):
    trace = SCENARIOS[name].build()
    th = D.Thresholds()
    direct = [f for det in D.DETECTORS for f in det(trace, th)]
    merged = D.diagnose(trace)       # raises if a detector's evidence does not fit its class
    assert {f.kind for f in direct} == {f.kind for f in merged}
    for f in direct:
        ev = f.evidence
        assert type(ev) in E.EVIDENCE[f.kind] and type(ev) not in PREFLIGHT, (f.kind, type(ev))
        assert E.problems(ev) == [], (name, f.kind)
        assert all_conform(ev) == [], (name, f.kind)
        out, raw = raw_dicts[id(ev)]
        assert out is ev and ev == raw and list(ev) == list(raw)     # same keys, same order
        assert f.to_dict()["evidence"] == old_jsonable(raw)
        json.dumps(f.to_dict())
    for f in merged:
        assert E.problems(f.evidence) == [] and all_conform(f.evidence) == []
        # _merge keeps the earliest (ties: detector order) and lists the others under "also"
        parts = sorted((g for g in direct if g.kind == f.kind), key=lambda g: g.first_step or 0)
        raws = [old_jsonable(raw_dicts[id(g.evidence)][1]) for g in parts]
        ev = f.to_dict()["evidence"]
        assert {k: v for k, v in ev.items() if k != "also"} == raws[0]
        assert ev.get("also", []) == raws[1:]


# ---- preflight findings ------------------------------------------------------------------

def _mlp(depth, act, init, width=64):
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        init(lin.weight)
        nn.init.zeros_(lin.bias)
        layers += [lin, act()]
    return nn.Sequential(*layers)


class _RNN(nn.Module):
    def __init__(self, sigma_max):
        super().__init__()
        torch.manual_seed(0)
        self.rnn = nn.RNN(8, 32, batch_first=True)
        with torch.no_grad():
            w = self.rnn.weight_hh_l0
            w.mul_(sigma_max / torch.linalg.matrix_norm(w, 2))

    def forward(self, x):
        return self.rnn(x)[0][:, -1]


class _Inf(nn.Module):
    def forward(self, x):
        return x * float("inf")


def _encoder(norm_first, qk_scale=1.0, d=32):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
    model = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
    with torch.no_grad():
        for blk in model.layers:
            blk.self_attn.in_proj_weight[:2 * d].mul_(qk_scale)     # queries and keys only
    return nn.Sequential(model, nn.Linear(d, 10))


def _big(w):
    nn.init.kaiming_normal_(w)
    w.data.mul_(2.0)


PREFLIGHT_CASES = {
    "sigmoid": (lambda: _mlp(30, nn.Sigmoid, lambda w: None), lambda: torch.randn(16, 64)),
    "xavier_relu": (lambda: _mlp(30, nn.ReLU, nn.init.xavier_normal_), lambda: torch.randn(16, 64)),
    "big_relu": (lambda: _mlp(30, nn.ReLU, _big), lambda: torch.randn(16, 64)),
    "rnn_small": (lambda: _RNN(0.5), lambda: torch.randn(4, 40, 8)),
    "rnn_large": (lambda: _RNN(3.0), lambda: torch.randn(4, 40, 8)),
    "tanh_chaotic": (lambda: _mlp(20, nn.Tanh, lambda w: nn.init.xavier_normal_(w, gain=2.5 * 5 / 3)),
                     lambda: torch.randn(16, 64)),
    "inf": (lambda: nn.Sequential(nn.Linear(8, 8), _Inf()), lambda: torch.randn(4, 8)),
    "post_ln": (lambda: _encoder(False, d=64),
                lambda: torch.randn(8, 16, 64, generator=torch.Generator().manual_seed(0)),
                # a low bar: the evidence's shape is under test here, not the threshold
                {"blocks": [f"0.layers.{i}" for i in range(6)],
                 "thresholds": PreflightThresholds(post_ln_block_gain=1.01)}),
    "attention": (lambda: _encoder(True, 30.0), lambda: torch.randn(2, 16, 32)),
}


def test_preflight_findings_have_complete_typed_evidence():
    seen = set()
    for name, (model, x, *kw) in PREFLIGHT_CASES.items():
        torch.manual_seed(0)
        for f in gt.preflight(model(), x(), compute_spectrum=False, **(kw[0] if kw else {})):
            assert type(f.evidence) in E.EVIDENCE[f.kind], (name, f.kind)
            assert E.check(f) is f
            assert all_conform(f.evidence) == [], name
            assert f.to_dict()["evidence"] == old_jsonable(dict(f.evidence))
            seen.add((f.kind, type(f.evidence)))
    # every preflight class was produced by one of the cases above
    assert {c for _, c in seen} == PREFLIGHT, sorted(c.__name__ for c in PREFLIGHT - {c for _, c in seen})


# ---- the registry and the classes --------------------------------------------------------

def test_every_kind_has_evidence_and_every_field_is_documented():
    assert set(E.EVIDENCE) == set(KINDS)
    for kind, classes in E.EVIDENCE.items():
        assert classes and all(kind in c.kinds for c in classes)
        for c in classes:
            assert c.__doc__ and "Example:" in c.__doc__, c
            hints = typing.get_type_hints(c, vars(E))
            for f in dataclasses.fields(c):
                assert f.metadata.get("doc"), (c.__name__, f.name)
                assert f.name in hints
    for c in (E.NonFiniteCause, E.FeedingBias, E.TimeLayer, E.SteadyClimb):
        assert all(f.metadata.get("doc") for f in dataclasses.fields(c))


def test_docs_list_every_kind_and_field():
    text = DOCS.read_text()
    for kind in KINDS:
        assert f"## `{kind}`" in text
        assert E.describe(kind) in text, f"docs/evidence.md is stale for {kind}: regenerate it"


def test_mapping_view_attributes_and_frozen():
    raw = {"dead": {"net.1": 30}, "units": {"net.1": 40}, "dead_fraction": {"net.1": 0.75},
           "window": 5, "resolved": False, "summary": "net.1: 30 of 40 units never fired"}
    f = Finding("dead_units", "warning", ["net.1"], 0, 9, raw)
    ev = f.evidence
    assert isinstance(ev, E.DeadUnits) and E.problems(ev) == []
    assert ev.dead == {"net.1": 30} and ev["units"] == {"net.1": 40} and ev.get("window") == 5
    assert ev.biases is None and "biases" not in ev and ev.get("biases", "absent") == "absent"
    with pytest.raises(KeyError):
        ev["biases"]
    with pytest.raises(AttributeError):
        ev.bias            # a misspelt field fails loudly
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.window = 6
    assert len(ev) == len(raw) and list(ev) == list(raw) and dict(ev) == raw and ev == raw
    assert {**ev} == raw and json.dumps(f.to_dict()["evidence"]) == json.dumps(raw)
    assert Finding.from_dict(json.loads(json.dumps(f.to_dict()))) == f


def test_unknown_key_and_missing_field_are_reported():
    f = Finding("loss_nonfinite", "error", [], 3, 3, {"first_step": 3, "frist_value": 1.0})
    assert f.evidence.first_step == 3 and f.evidence["frist_value"] == 1.0   # a hand-built note kept
    bad = E.problems(f.evidence)
    assert "unknown key frist_value" in bad and "missing summary" in bad
    with pytest.raises(ValueError, match="frist_value"):
        E.check(f)
    with pytest.raises(TypeError):
        E.LossNonFinite(first_step=3)          # the constructor wants every required field


def test_diagnose_rejects_a_detector_whose_evidence_drifted(monkeypatch):
    def typo(trace, th):
        return [Finding("loss_spike", "warning", [], 1, 1,
                        {"recovered": True, "summary": "x", "spike_step": [1]})]

    def missing(trace, th):
        return [Finding("loss_spike", "warning", [], 1, 1, {"recovered": True})]

    trace = _small_trace()
    for det, word in ((typo, "unknown key spike_step"), (missing, "missing summary")):
        monkeypatch.setattr(D, "DETECTORS", (det,))
        with pytest.raises(ValueError, match=word):
            D.diagnose(trace)


def _small_trace():
    from gradtrace.trace import Trace
    return Trace({}, [{"step": s, "scalars": {"loss": 1.0}} for s in range(5)])


def test_coerce_picks_the_producers_class_and_converts_nested_records():
    depth = E.coerce("exploding_gradients", {"per_layer_gain": 2.0, "resolved": False})
    surge = E.coerce("exploding_gradients", {"baseline_grad_norm": 0.3, "steady_climb": {"growth": 9.0}})
    assert type(depth) is E.ExplodingGradients and type(surge) is E.GradientNormSurge
    assert isinstance(surge.steady_climb, E.SteadyClimb) and surge.steady_climb.growth == 9.0
    assert type(E.coerce("exploding_gradients", {})) is E.ExplodingGradients   # the detector's first
    nf = E.coerce("nonfinite", {"cause": "overflow", "cause_evidence": {"dtype": "float16"}})
    assert isinstance(nf.cause_evidence, E.NonFiniteCause) and nf["cause_evidence"]["dtype"] == "float16"
    dead = E.coerce("dead_units", {"feeding": {"1": {"module": "0", "bias": "0.bias"}}})
    assert isinstance(dead.feeding["1"], E.FeedingBias) and dead.feeding["1"].bias == "0.bias"
    tt = E.coerce("vanishing_through_time", {"per_layer": {"rnn": {"ratio": 1e-4}}})
    assert isinstance(tt.per_layer["rnn"], E.TimeLayer)
    assert type(E.coerce("vanishing_gradients", {"layout": "post-LN"})) is E.PreflightPostLN
    merged = Finding("exploding_gradients", "error", ["0"], 1, 9, {**depth, "also": [dict(surge)]})
    assert isinstance(merged.evidence.also[0], E.GradientNormSurge)
    assert merged.to_dict()["evidence"]["also"] == [{"baseline_grad_norm": 0.3, "steady_climb": {"growth": 9.0}}]


def test_bad_evidence_input():
    with pytest.raises(TypeError, match="evidence"):
        Finding("dead_units", "warning", [], 0, 0, [1, 2])
    with pytest.raises(ValueError, match="LossSpike is not evidence of a dead_units finding"):
        Finding("dead_units", "warning", [], 0, 0, E.coerce("loss_spike", {}))
    with pytest.raises(ValueError, match="kind='nope'"):
        E.coerce("nope", {})


def test_numpy_values_serialise_as_before():
    raw = {"saturated_fraction": {"3": np.float64(0.8)}, "activation": {"3": "sigmoid"},
           "saturation_bounds": {}, "resolved": False, "summary": "3 (sigmoid): 80% saturated",
           "also": []}
    f = Finding("saturated_units", "warning", ["3"], 0, 9, raw)
    assert f.to_dict()["evidence"] == old_jsonable(raw)
    assert f.evidence.also == ()


def test_report_shows_nested_records_as_fields():
    from gradtrace.report.html import render_findings

    f = Finding("nonfinite", "error", ["net.2"], 7, 7,
                {"cause": "overflow", "cause_evidence": {"dtype": "float16", "dtype_max": 65504.0}})
    page = render_findings([f])
    assert "dtype: float16, dtype_max: 6.55e+04" in page and "NonFiniteCause" not in page


def test_no_field_is_declared_twice():
    """A second declaration silently replaces the first (it happened once, when two people
    added the same fields): each class body names each field once."""
    import ast

    tree = ast.parse(Path(E.__file__).read_text())
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    assert len(classes) > 20
    for node in classes:
        names = [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)]
        assert len(names) == len(set(names)), (node.name, sorted({n for n in names if names.count(n) > 1}))
