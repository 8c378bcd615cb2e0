"""Tests of gradtrace.advise: the checklist as data and fixes rendered for a model."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.advise import CHECKLIST, KIND_ROWS, fixes_for, module_ref
from gradtrace.diagnose.finding import KINDS, Fix
from gradtrace.trace import Trace

CHAPTER_ROWS = {
    "Activations shrink across layers": "Use better initialization, normalization, residual connections",
    "Activations grow across layers": "Reduce learning rate, improve initialization, use normalization",
    "Gradients vanish in early layers": "Use ReLU-like activations, residual connections, normalization",
    "Gradients explode": "Use gradient clipping, reduce learning rate",
    "Loss becomes nan": "Check learning rate, dtype, invalid operations, gradient norms",
    "ReLU units die": "Lower learning rate, use Leaky ReLU or GELU",
    "RNN training unstable": "Use LSTM or GRU, clip gradients, shorten unroll length",
}


def mlp_context(act: str = "sigmoid", act_type: str = "Sigmoid", depth: int = 4, lr: float | None = 0.5) -> dict:
    modules = []
    for i in range(depth):
        modules.append({"name": f"net.{2 * i}", "type": "Linear", "activation": None,
                        "params": [f"net.{2 * i}.weight", f"net.{2 * i}.bias"]})
        if i < depth - 1:
            modules.append({"name": f"net.{2 * i + 1}", "type": act_type, "activation": act, "params": []})
    return {"modules": modules, "lr": lr}


def test_checklist_is_the_chapter_table():
    assert len(CHECKLIST) == 7
    assert {r.problem: r.fix for r in CHECKLIST.values()} == CHAPTER_ROWS


def test_every_kind_has_a_row_and_every_row_is_reachable():
    assert set(KIND_ROWS) == set(KINDS)
    assert all(KIND_ROWS[k] for k in KINDS)
    reached = {row for rows in KIND_ROWS.values() for row in rows}
    assert reached == set(CHECKLIST)


@pytest.mark.parametrize("kind", KINDS)
def test_fixes_for_every_kind(kind):
    for ctx in (None, mlp_context(), mlp_context("relu", "ReLU")):
        fixes = fixes_for(kind, ctx, ["net.3"] if ctx else [])
        assert fixes and all(isinstance(f, Fix) for f in fixes)
        problems = {CHECKLIST[r].problem for r in KIND_ROWS[kind]}
        assert {f.problem for f in fixes} <= problems
        assert all(f.action and f.code for f in fixes)


def test_vanishing_sigmoid_names_layers_replacement_and_init():
    fixes = fixes_for("vanishing_gradients", mlp_context(), ["net.0", "net.2"])
    text = " ".join(f.action for f in fixes)
    codes = "\n".join(f.code for f in fixes)
    assert "net.1, net.3, net.5" in text
    assert "model.net[1] = nn.GELU()" in codes
    assert "`gt.init_for_activation(model)` would switch layers `net.0, net.2, net.4, net.6`" in text
    assert "Kaiming (ReLU)" in text
    assert "residual" in text and "LayerNorm" in text


def test_dead_units_leaky_relu_and_lr_from_context():
    fixes = fixes_for("dead_units", mlp_context("relu", "ReLU", lr=0.5), ["net.3"])
    codes = [f.code for f in fixes]
    assert "model.net[3] = nn.LeakyReLU(0.01)" in codes
    lr = next(f for f in fixes if "learning rate" in f.action)
    assert "0.5" in lr.action and "0.05" in lr.action and "0.05" in lr.code
    assert any("nn.init.zeros_(model.net[2].bias)" in c for c in codes)


def test_exploding_clip_and_lr():
    fixes = fixes_for("exploding_gradients", mlp_context("relu", "ReLU", lr=0.3), ["net.0"])
    codes = [f.code for f in fixes]
    assert "gt.clip_grad_norm_(model.parameters(), max_norm=1.0)" in codes
    assert any("0.03" in c for c in codes)
    # A baseline in the evidence sets max_norm near the run's usual norm.
    tuned = fixes_for("exploding_gradients", None, [], evidence={"baseline_grad_norm": 0.2})
    assert "max_norm=0.4" in tuned[0].code
    # A loss spike's baseline is a loss, not a gradient norm: it must not set max_norm.
    spike = fixes_for("loss_spike", None, [], evidence={"baseline_median": 7.0})
    assert "max_norm=1.0" in spike[0].code


def test_nonfinite_rows_follow_the_cause():
    inv = fixes_for("nonfinite", mlp_context(), ["net.4"], evidence={"cause": "invalid_operation", "step": 7})
    assert "net.4" in inv[0].action and "step 7" in inv[0].action
    assert any(f.code == "optimizer = gt.Guard(optimizer, skip_nonfinite=True)" for f in inv)
    div = fixes_for("nonfinite", mlp_context(), ["net.4"], evidence={"cause": "divergence"})
    assert "learning rate" in div[0].action
    ovf = fixes_for("nonfinite", mlp_context(), [], evidence={"cause": "overflow",
                                                              "cause_evidence": {"dtype": "float16"}})
    assert "float16" in ovf[0].action


def test_rnn_rows():
    ctx = {"modules": [{"name": "rnn", "type": "RNN", "activation": "recurrent", "params": ["rnn.weight_ih_l0"]}],
           "params": [{"name": "rnn.weight_ih_l0", "shape": [32, 8], "dtype": "float32", "module": "rnn"}],
           "time_steps": 100}
    fixes = fixes_for("exploding_through_time", ctx, ["rnn"])
    codes = " ".join(f.code for f in fixes)
    text = " ".join(f.action for f in fixes)
    assert "model.rnn = nn.LSTM(8, 32)" in codes
    assert "truncated BPTT" in text and "100 steps" in text and "25" in text
    assert "gt.clip_grad_norm_" in codes
    lstm = dict(ctx, modules=[dict(ctx["modules"][0], type="LSTM")])
    assert "already a gated LSTM" in fixes_for("vanishing_through_time", lstm, ["rnn"])[0].action


def test_fixes_from_a_real_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with gt.watch(model, opt, out=None, activations_every=1) as mon:
        for _ in range(3):
            loss = model(torch.randn(16, 4)).pow(2).mean()
            mon.record_loss(loss)
            opt.zero_grad()
            loss.backward()
            opt.step()
    fixes = fixes_for("dead_units", mon.trace, ["1"])
    assert fixes[0].code == "model[1] = nn.LeakyReLU(0.01)"
    assert any("0.2" in f.action and "0.02" in f.action for f in fixes)


def test_module_ref():
    assert module_ref("net.3") == "model.net[3]"
    assert module_ref("3") == "model[3]"
    assert module_ref("encoder.layers.0.linear1") == "model.encoder.layers[0].linear1"
    with pytest.raises(TypeError, match="name"):
        module_ref(3)


def test_bad_input():
    with pytest.raises(ValueError, match="kind="):
        fixes_for("gradient_sadness", None, [])
    with pytest.raises(TypeError, match="layers"):
        fixes_for("dead_units", None, "net.3")
    with pytest.raises(TypeError, match="trace_or_context"):
        fixes_for("dead_units", 42, [])
    with pytest.raises(ValueError, match="unknown keys"):
        fixes_for("dead_units", {"modulez": []}, [])
    with pytest.raises(TypeError, match="evidence"):
        fixes_for("dead_units", None, [], evidence=[1])


def test_diagnose_attaches_rendered_fixes():
    meta = {"format": "gradtrace-trace", "format_version": 1, "modules": [], "params": []}
    recs = [{"step": s, "scalars": {"loss": 1.0 if s < 5 else "nan", "lr": 0.1}} for s in range(8)]
    f = gt.diagnose(Trace(meta, recs))
    assert [x.kind for x in f] == ["loss_nonfinite"]
    assert any("0.01" in fx.code for fx in f[0].fixes)


def test_units_dead_from_initialisation_get_the_depth_fix_not_the_lr_fix():
    ctx = {"modules": [{"name": "0", "type": "Linear", "activation": None, "params": ["0.weight"]},
                       {"name": "1", "type": "ReLU", "activation": "relu", "params": []}], "lr": 0.5}
    start = fixes_for("dead_units", ctx, ["1"], evidence={"from_initialisation": True})
    later = fixes_for("dead_units", ctx, ["1"], evidence={})
    assert any("residual" in f.action for f in start) and not any("learning rate" in f.action.lower() for f in start)
    assert any("learning rate" in f.action.lower() for f in later)


def _sample(tp, name: str):
    """A value of the annotated evidence type (the first non-None member of a union)."""
    import types
    import typing

    from gradtrace.diagnose.evidence import Detail

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _sample(next(a for a in args if a is not type(None)), name)
    if origin is dict:
        return {_sample(args[0], name): _sample(args[1], name)}
    if origin is list:
        return [_sample(args[0], name)]
    if isinstance(tp, type) and issubclass(tp, Detail):
        return _full(tp)
    return {float: 0.25, int: 3, bool: True, typing.Any: 1.0}.get(
        tp, {"phase": "forward", "cause": "overflow", "dtype": "float16", "bias": "net.0.bias",
             "biases": "net.0.bias"}.get(name, "net.1"))


def _full(cls):
    import dataclasses
    import typing

    from gradtrace.diagnose import evidence as E

    hints = typing.get_type_hints(cls, vars(E))
    return cls.from_mapping({f.name: _sample(hints[f.name], f.name) for f in dataclasses.fields(cls)
                             if f.name != "also"})


@pytest.mark.parametrize("kind", KINDS)
def test_rows_read_every_evidence_class_of_the_kind_by_attribute(kind):
    """Every renderer of the kind runs on each of its typed evidence classes, empty and with
    every field set: a row reading a field its evidence does not declare fails here."""
    from gradtrace.diagnose.evidence import EVIDENCE, problems

    for cls in EVIDENCE[kind]:
        full = _full(cls)
        assert problems(full) == []
        for ev in (cls.from_mapping({}), full):
            fixes = fixes_for(kind, mlp_context("relu", "ReLU"), ["net.1"], evidence=ev)
            assert fixes and all(isinstance(f, Fix) and f.action for f in fixes)


def test_rows_use_typed_evidence():
    from gradtrace.diagnose import evidence as E

    surge = _full(E.GradientNormSurge)
    surge = E.GradientNormSurge.from_mapping({**surge, "baseline_grad_norm": 0.2})
    assert "max_norm=0.4" in fixes_for("exploding_gradients", None, [], evidence=surge)[0].code
    depth = _full(E.ExplodingGradients)     # a depth profile adds the initialisation row
    assert any("init_for_activation" in f.code for f in fixes_for("exploding_gradients", None, [], evidence=depth))
    assert not any("init_for_activation" in f.code for f in fixes_for("exploding_gradients", None, [], evidence=surge))
    nf = E.NonFinite.from_mapping({**_full(E.NonFinite), "phase": "loss", "step": 11})
    assert "log space" in fixes_for("nonfinite", None, ["net.1"], evidence=nf)[0].action
    cev = {**_full(E.NonFiniteCause), "optimizer": "AdamW", "dtype": "float16"}
    opt = E.NonFinite.from_mapping({**_full(E.NonFinite), "cause": "optimizer_step", "cause_evidence": cev})
    assert "AdamW" in fixes_for("nonfinite", None, ["net.1"], evidence=opt)[0].action
    tt = E.VanishingThroughTime.from_mapping({**_full(E.VanishingThroughTime), "time_steps": 40})
    assert any("40 steps" in f.action for f in fixes_for("vanishing_through_time", None, [], evidence=tt))
    with pytest.raises(ValueError, match="GradientNormSurge is not evidence of a dead_units finding"):
        fixes_for("dead_units", None, [], evidence=surge)


def test_a_merged_explosion_uses_both_parts():
    """Depth profile first, the norm surge merged under ``also``: the clip limit comes from
    the surge's baseline and the initialisation row from the depth profile, in either order."""
    from gradtrace.diagnose import evidence as E

    depth = _full(E.ExplodingGradients)
    surge = E.GradientNormSurge.from_mapping({**_full(E.GradientNormSurge), "baseline_grad_norm": 0.2})
    for first, other in ((depth, surge), (surge, depth)):
        f = gt.Finding("exploding_gradients", "error", ["net.0"], 3, 9, {**first, "also": [other]})
        codes = [x.code for x in gt.advise([f])[0].fixes]
        assert any("max_norm=0.4" in c for c in codes) and any("init_for_activation" in c for c in codes)
