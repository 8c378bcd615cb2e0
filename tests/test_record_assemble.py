"""Record building: a gradient-only step's short path gives the general path's record, checked
against figures computed independently in float64 Python."""
from __future__ import annotations

import math

import numpy as np
import pytest

from gradtrace.record.assemble import Assembler, StepInfo
from gradtrace.trace import MISSING, MemoryWriter, is_missing

NAMES = [f"l{i}.weight" for i in range(7)]
REL = 1e-15            # float64 sqrt and sum of a few terms: within an ulp or two


def _assembler():
    return Assembler(NAMES, ["l0", "l1"], [None, "relu"])


def _same(a: dict, b: dict) -> None:
    """Two records alike: the same keys in the same order, scalars equal, per-name arrays
    equal bit for bit (MISSING is a NaN, so compare the bits)."""
    assert list(a) == list(b)
    for k in a:
        if k in ("param", "module"):
            assert list(a[k]) == list(b[k])
            for stat in a[k]:
                x, y = np.asarray(a[k][stat], dtype=np.float64), np.asarray(b[k][stat], dtype=np.float64)
                assert x.view(np.uint64).tolist() == y.view(np.uint64).tolist(), stat
        else:
            assert a[k] == b[k], k


CASES = [  # (parameters with a gradient, losses copied with the figures, losses noted as numbers, lr)
    (list(range(7)), [0.75], [], 0.1),
    (list(range(7)), [], [], None),
    (list(range(7)), [], [2.5], 0.01),
    (list(range(7)), [0.5], [1.5, 2.0], 0.1),
    ([0, 2, 3, 6], [0.25], [], 0.1),            # frozen / unused parameters: no gradient
]


@pytest.mark.parametrize("idx,host_losses,py_losses,lr", CASES)
def test_gradient_only_record_matches_the_general_path_and_float64(idx, host_losses, py_losses, lr):
    rng = np.random.default_rng(len(idx) + len(host_losses) + 3 * len(py_losses))
    gsq = rng.uniform(1e-6, 4.0, size=len(idx)) ** 2
    host = {"gsq": gsq.copy()}
    if host_losses:
        host["loss"] = np.array(host_losses)
    info = StepInfo(step=5, time=1.7e9, idx=idx, losses=list(py_losses), lr=lr)
    a = _assembler()
    rec, event = a.build(host, info)
    assert event is None
    assert a._grad_only(host, info) is not None          # the short path was the one taken
    general, general_event = a._build(host, info)
    assert general_event is None
    _same(rec, general)
    # independent reference: per-element float64 Python
    want = [MISSING] * len(NAMES)
    for k, i in enumerate(idx):
        want[i] = math.sqrt(float(gsq[k]))
    got = rec["param"]["grad_norm"]
    assert is_missing(got).tolist() == [i not in idx for i in range(len(NAMES))]
    for i in idx:
        assert got[i] == pytest.approx(want[i], rel=REL)
        assert rec["param"]["grad_nonfinite"][i] == 0.0
    assert rec["scalars"]["total_grad_norm"] == pytest.approx(math.sqrt(math.fsum(gsq.tolist())), rel=REL)
    losses = host_losses + py_losses
    if losses:
        assert rec["scalars"]["loss"] == pytest.approx(math.fsum(losses) / len(losses), rel=REL)
    else:
        assert "loss" not in rec["scalars"]
    assert rec["scalars"].get("lr") == lr
    host["gsq"][:] = -1.0                                 # the host buffer is reused next step
    assert (got[idx] > 0).all()


@pytest.mark.parametrize("bad", ["grad_inf", "grad_nan", "loss_nan"])
def test_a_non_finite_gradient_only_step_takes_the_general_path_and_names_it(bad):
    gsq = np.array([1.0, 4.0, 9.0, 16.0, 25.0, 36.0, 49.0])
    loss = np.array([0.5])
    if bad == "grad_inf":
        gsq[2] = math.inf
    elif bad == "grad_nan":
        gsq[4] = math.nan
    else:
        loss[0] = math.nan
    info = StepInfo(step=3, time=0.0, idx=list(range(7)), counts={2: 5} if bad == "grad_inf" else {})
    a = _assembler()
    host = {"gsq": gsq, "loss": loss}
    assert a._grad_only(host, info) is None
    rec, event = a.build(host, info)
    assert event is not None and event["step"] == 3
    if bad == "loss_nan":
        assert event["loss_nonfinite"] and event["params"] == []
        assert rec["scalars"]["total_grad_norm"] == pytest.approx(math.sqrt(140.0), rel=REL)
    else:
        k = 2 if bad == "grad_inf" else 4
        assert event["params"] == [NAMES[k]]
        assert rec["param"]["grad_nonfinite"][k] == (5.0 if bad == "grad_inf" else 1.0)
        assert not math.isfinite(rec["scalars"]["total_grad_norm"])


def test_other_parts_or_a_replay_note_take_the_general_path():
    a = _assembler()
    gsq = np.arange(1.0, 8.0)
    info = StepInfo(step=0, time=0.0, idx=list(range(7)))
    rec, _ = a.build({"gsq": gsq, "psq": gsq * 4, "gmax": gsq}, info)
    assert rec["param"]["param_norm"] == pytest.approx(2 * np.sqrt(gsq), rel=REL)
    assert list(rec["param"]) == ["grad_norm", "grad_maxabs", "param_norm", "grad_nonfinite"]
    info.replayed = "l1"                     # a replay named a module: the event must say so
    rec, event = a.build({"gsq": gsq}, info)
    assert event["forward"] == "l1" and event["params"] == []


def test_shared_zero_column_is_read_only_and_records_encode_alike():
    a = _assembler()
    info = StepInfo(step=0, time=1.0, idx=list(range(7)), lr=0.1)
    r0, _ = a.build({"gsq": np.full(7, 4.0), "loss": np.array([1.0])}, info)
    with pytest.raises(ValueError):
        r0["param"]["grad_nonfinite"][0] = 1.0       # cannot change another record's zeros
    mem = MemoryWriter({"params": [{"name": n} for n in NAMES]})
    for s in range(3):
        info = StepInfo(step=s, time=1.0 + s, idx=list(range(7)), lr=0.1)
        rec, _ = a.build({"gsq": np.full(7, float(s + 1) ** 2), "loss": np.array([1.0 / (s + 1)])}, info)
        mem.write(rec)
    t = mem.trace
    assert t.matrix("grad_norm").values[:, 3].tolist() == [1.0, 2.0, 3.0]
    assert t.series("grad_nonfinite", NAMES[0]).tolist() == [0.0, 0.0, 0.0]
    assert t.series("total_grad_norm") == pytest.approx([math.sqrt(7 * (s + 1) ** 2) for s in range(3)], rel=REL)
