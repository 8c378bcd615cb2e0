"""The Trace query API: matrix masks, execution order, owners, layers, upto views."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import gradtrace as gt
from gradtrace.trace import MemoryWriter, Trace, pack_mask

META = {"modules": [{"name": "a", "type": "Linear", "activation": None, "params": ["a.weight"]},
                    {"name": "b", "type": "ReLU", "activation": "relu", "params": []},
                    {"name": "c", "type": "Linear", "activation": None, "params": ["c.weight", "c.bias"]}],
        "params": [{"name": "a.weight", "module": "a"}, {"name": "c.weight", "module": "c"},
                   {"name": "c.bias", "module": "c"}]}


def _trace() -> Trace:
    w = MemoryWriter(META)
    w.write({"step": 0, "exec_order": ["c", "a"], "scalars": {"loss": 3.0},
             "param": {"grad_norm": [1.0, None, 2.0]}})
    w.write({"event": "guard_skip", "step": 1})
    w.write({"step": 1, "scalars": {"loss": "nan"}, "param": {"grad_norm": ["inf", 0.5, None]},
             "module": {"zero_frac": [None, 0.25, None]}})
    w.write({"step": 3, "exec_order": ["a", "b", "c"], "scalars": {"loss": 1.0},
             "param": {"grad_norm": [float("nan"), 0.5, 0.75]}})
    w.write({"event": "nonfinite", "step": 3})
    return w.trace


def test_matrix_mask_separates_not_recorded_from_recorded_nan():
    m = _trace().matrix("grad_norm")
    inf, nan = math.inf, math.nan
    want = np.array([[1.0, nan, 2.0], [inf, 0.5, nan], [nan, 0.5, 0.75]])
    want_mask = np.array([[True, False, True], [True, True, False], [True, True, True]])
    np.testing.assert_array_equal(m.recorded, want_mask)
    np.testing.assert_array_equal(m.values, want)          # nan == nan position-wise
    assert m.steps.tolist() == [0, 1, 3] and m.names == ["a.weight", "c.weight", "c.bias"]
    steps, names, values = m                                 # the 0.1 triple still unpacks
    assert values is m.values and m[2] is m.values


def test_matrix_selects_names_and_steps():
    m = _trace().matrix("grad_norm", names=["c.bias", "a.weight"], steps=range(1, 4))
    assert m.steps.tolist() == [1, 3] and m.names == ["c.bias", "a.weight"]
    np.testing.assert_array_equal(m.recorded, [[False, True], [True, True]])
    with pytest.raises(KeyError, match="c.bias"):
        _trace().matrix("grad_norm", names=["c.bais"])
    with pytest.raises(TypeError, match="names"):
        _trace().matrix("grad_norm", names="c.bias")
    with pytest.raises(KeyError, match="per parameter or per module"):
        _trace().matrix("loss")


def test_exec_order_latest_as_of_step_and_fallbacks():
    t = _trace()
    assert t.exec_order() == ["a", "b", "c"]
    assert t.exec_order(step=0) == ["c", "a", "b"]     # unseen module "b" appended
    assert t.exec_order(step=2) == ["c", "a", "b"]
    assert t.exec_order(step=-5) == ["c", "a", "b"]    # before any: the first recorded
    assert Trace(META).exec_order() == ["a", "b", "c"]  # none recorded: meta order


def test_owner_and_layers():
    t = _trace()
    assert [t.owner(p) for p in t.params] == ["a", "c", "c"]
    assert Trace({"params": [{"name": "x.y.z"}]}).owner("x.y.z") == "x.y"   # pre-owner traces
    with pytest.raises(KeyError, match="a.weight"):
        t.owner("a.weigth")
    ls = t.layers()
    assert [(l.name, l.type, l.activation, l.params) for l in ls] == [
        ("a", "Linear", None, ("a.weight",)), ("b", "ReLU", "relu", ()),
        ("c", "Linear", None, ("c.weight", "c.bias"))]
    assert [l.name for l in t.layers(with_params=True)] == ["a", "c"]


def test_owner_of_a_real_watched_model_is_the_deepest_watched_module():
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh())
    model = torch.nn.Sequential(inner, torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt) as mon:
        model(torch.randn(2, 3)).sum().backward()
        opt.step()
    t = mon.trace
    assert t.owner("0.0.weight") == "0.0" and t.owner("1.bias") == "1"
    assert [l.name for l in t.layers(with_params=True)] == ["0.0", "1"]


def test_upto_is_a_view_of_the_past():
    t = _trace()
    v = t.upto(1)
    assert len(v) == 2 and v.steps.tolist() == [0, 1]
    assert [e["event"] for e in v.events()] == ["guard_skip"]
    assert v.exec_order() == ["c", "a", "b"]
    np.testing.assert_array_equal(v.scalar("loss"), [3.0, math.nan])
    assert v.matrix("grad_norm").steps.tolist() == [0, 1]
    assert v.upto(5).steps.tolist() == [0, 1]               # a view never sees past its end
    assert v._store is t._store                              # shares data, no copy
    assert len(t) == 3                                       # the original is untouched
    with pytest.raises(TypeError, match="step"):
        t.upto("3")


def test_names_scalar_and_events():
    t = _trace()
    assert t.names("grad_norm") == ["a.weight", "c.weight", "c.bias"]
    assert t.names("zero_frac") == ["b"]
    assert [e["step"] for e in t.events("nonfinite")] == [3]
    s, loss = t.scalar("loss", with_steps=True)
    assert s.tolist() == [0, 1, 3] and loss[0] == 3.0 and math.isnan(loss[1])
    with pytest.raises(KeyError, match="not per step"):
        t.scalar("grad_norm")
    w = MemoryWriter(META)
    w.write({"step": 0, "vectors": {"active_mask": {"b": pack_mask(np.array([True, False]))}}})
    assert w.trace.names("active_mask") == ["b"]
