"""Format v2 on disk: tables inferred from records, MISSING vs nan, widths, numpy-only reading, v1 loading."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import gradtrace as gt
from gradtrace.trace import MISSING, MemoryWriter, TraceWriter, is_missing, pack_mask

DOC = Path(__file__).resolve().parents[1] / "docs" / "trace-format.md"
META = {"modules": [{"name": "a", "type": "Linear"}, {"name": "b", "type": "ReLU", "activation": "relu"},
                    {"name": "c", "type": "Linear"}],
        "params": [{"name": "a.weight", "shape": [2, 2], "module": "a"},
                   {"name": "c.weight", "shape": [1, 2], "module": "c"}]}
F32 = np.float32


def _records(n=6, seed=0):
    """Every-step records plus an activation record every third step (own statistics,
    a module statistic only for the ReLU, numpy-array input with MISSING, a recorded nan)."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        g = rng.uniform(0.1, 2.0, size=2)
        rec = {"step": s, "time": 1.7e9 + s * 0.123456, "scalars": {"loss": float(rng.uniform()), "lr": 0.1},
               "param": {"grad_norm": g.tolist()}, "module": {"out_flag_nonfinite": [0, 0, 0]}}
        if s % 3 == 0:
            rec["param"]["update_ratio"] = np.array([rng.uniform(), MISSING])
            rec["module"]["zero_frac"] = [None, float(rng.uniform()), None]
            rec["module"]["out_std"] = [float("nan"), 1.0, 2.0]
            rec["vectors"] = {"active_mask": {"b": pack_mask(rng.uniform(size=5) > 0.5)}}
        if s == 2:
            rec["exec_order"] = ["c", "a", "b"]
        out.append(rec)
    return out


def _write(path, records, meta=META):
    w = TraceWriter(path, meta)
    for r in records:
        w.write(r)
    w.close()
    return gt.load(path)


def test_values_round_trip_at_their_documented_widths(tmp_path):
    recs = _records()
    t = _write(tmp_path / "r", recs)
    steps, g = t.series("grad_norm", "c.weight", with_steps=True)
    assert steps.tolist() == list(range(6))
    # float32 per-name figures: exactly the float32 rounding of what was written
    np.testing.assert_array_equal(g, [F32(r["param"]["grad_norm"][1]) for r in recs])
    # float64 scalars and time: exact
    assert t.series("lr").tolist() == [0.1] * 6
    assert t.series("loss").tolist() == [r["scalars"]["loss"] for r in recs]
    m = t.matrix("update_ratio")
    assert m.steps.tolist() == [0, 3] and m.recorded[:, 1].tolist() == [False, False]
    np.testing.assert_array_equal(m.values[:, 0], [F32(r["param"]["update_ratio"][0]) for r in recs[::3]])
    std = t.matrix("out_std")                      # a recorded nan stays a recorded nan
    assert std.recorded.all() and np.isnan(std.values[:, 0]).all()
    zf = t.matrix("zero_frac")
    assert zf.recorded.tolist() == [[False, True, False]] * 2
    assert t.exec_order(step=1) == ["c", "a", "b"] and t.exec_order() == ["c", "a", "b"]
    assert t.series("active_mask", "b").shape == (2, 5)
    mem = MemoryWriter(META)                        # the in-memory trace answers alike
    for r in recs:
        mem.write(r)
    np.testing.assert_allclose(mem.trace.matrix("grad_norm").values, t.matrix("grad_norm").values, rtol=1e-7)


def test_tables_follow_the_statistics_and_cover_late_names(tmp_path):
    recs = _records(6)
    recs[4]["scalars"]["clip_coef"] = 0.5                       # a statistic appearing mid-run
    recs[5]["module"]["zero_frac"] = [0.25, 0.5, None]        # a name the table lacks ...
    recs[5]["param"]["update_ratio"] = [0.1, None]
    recs[5]["module"]["out_std"] = [1.0, 1.0, 1.0]
    recs[5]["vectors"] = {}
    t = _write(tmp_path / "r", recs)
    tables = [json.loads(x) for x in (tmp_path / "r" / "tables.jsonl").read_text().splitlines()]
    layouts = [(d["scalars"], [(c[1], c[2]) for c in d["columns"]]) for d in tables if "table" in d]
    assert len(layouts) == 4                       # activation, every-step, +clip_coef, activation ∪ {a}
    assert ("zero_frac", [0, 1]) in layouts[3][1] and ("zero_frac", [1]) in layouts[0][1]
    assert t.series("clip_coef").tolist() == [0.5]
    assert t.steps.tolist() == list(range(6))
    zf = t.matrix("zero_frac")
    assert zf.steps.tolist() == [0, 3, 5]
    assert zf.recorded.tolist() == [[False, True, False], [False, True, False], [True, True, False]]
    assert zf.values[2, 0] == 0.25


def test_numpy_only_reading_example_in_the_doc_runs(tmp_path, monkeypatch):
    code = re.search(r"\*\*Reading with numpy alone\*\*.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    recs = _records()
    t = _write(tmp_path / "runs" / "exp1", recs)
    monkeypatch.chdir(tmp_path)
    printed: list = []
    exec(compile(code, "trace-format.md", "exec"), {"print": lambda *a: printed.append(a)})
    assert [p[2] for p in printed] == [["a.weight", "c.weight"]] * 2     # both tables hold it
    # the doc's reading gives the same numbers as gt.load
    got = {int(s): v for _, steps, _, vals in printed for s, v in zip(steps, vals[:, 0])}
    want = dict(zip(*t.series("grad_norm", "a.weight", with_steps=True)))
    assert got == {int(k): F32(v) for k, v in want.items()}


def test_bad_per_name_values_are_errors(tmp_path):
    w = TraceWriter(tmp_path / "r", META)
    with pytest.raises(ValueError, match="1-D"):
        w.write({"step": 0, "param": {"grad_norm": np.zeros((2, 1))}})
    w.close()
    assert is_missing(np.array([MISSING, math.nan], dtype=np.float32)).tolist() == [True, False]
    with pytest.raises(TypeError, match="float32 or float64"):
        is_missing(np.array([1]))


def test_version_1_traces_still_load(tmp_path):
    run = tmp_path / "v1"
    run.mkdir()
    (run / "meta.json").write_text(json.dumps({"format": "gradtrace-trace", "format_version": 1, **META}))
    lines = [{"step": 0, "time": 1.0, "exec_order": ["a", "b", "c"], "scalars": {"loss": 2.0},
              "param": {"grad_norm": [0.5, None]}, "module": {"zero_frac": [None, 0.25, None]},
              "vectors": {"active_mask": {"b": "3:05"}}},
             {"event": "guard_skip", "step": 1, "value": "nan"},
             {"step": 1, "scalars": {"loss": "nan"}, "param": {"grad_norm": ["inf", 0.75]}}]
    text = "\n".join(json.dumps(x) for x in lines) + '\n{"step": 2, "sca'
    (run / "records.jsonl").write_text(text)
    with pytest.warns(gt.TraceWarning, match="torn"):
        t = gt.load(run)
    assert len(t) == 2 and t.steps.tolist() == [0, 1]
    m = t.matrix("grad_norm")
    assert m.values[0, 0] == 0.5 and m.values[1, 0] == math.inf and m.values[1, 1] == 0.75
    assert m.recorded.tolist() == [[True, False], [True, True]]
    assert np.isnan(t.series("loss")[1]) and t.events("guard_skip")[0]["value"] == "nan"
    assert t.names("zero_frac") == ["b"] and t.series("active_mask", "b").tolist() == [[True, False, True]]
    assert t.exec_order() == ["a", "b", "c"]


def test_array_and_list_inputs_encode_alike(tmp_path):
    lists = _records(6, seed=3)
    arrays = []
    for r in _records(6, seed=3):
        for sec in ("param", "module"):
            for stat, v in list(r[sec].items()):
                if isinstance(v, list) and stat != "zero_frac":    # keep one list beside arrays
                    r[sec][stat] = np.array([MISSING if x is None else x for x in v], dtype=np.float64)
        arrays.append(r)
    a, b = _write(tmp_path / "lists", lists), _write(tmp_path / "arrays", arrays)
    for stat in ("grad_norm", "update_ratio", "zero_frac", "out_std", "out_flag_nonfinite"):
        ma, mb = a.matrix(stat), b.matrix(stat)
        np.testing.assert_array_equal(ma.recorded, mb.recorded)
        np.testing.assert_array_equal(ma.values, mb.values)
        assert ma.steps.tolist() == mb.steps.tolist()
    short = MemoryWriter(META)                       # a short array: the rest not recorded
    short.write({"step": 0, "param": {"grad_norm": np.array([0.5])}})
    assert short.trace.matrix("grad_norm").recorded.tolist() == [[True, False]]


def _encode_both(records, n_params=2, n_modules=3, dtype="<f4"):
    """Each record through an encoder that keeps its row recipes and one that must take
    the general path every time: (schema, new, row) of both."""
    from gradtrace.trace.encode import Encoder
    fast, general = Encoder(n_params, n_modules, dtype), Encoder(n_params, n_modules, dtype)
    out = []
    for r in records:
        general._fast.clear()
        a, b = fast.encode(r), general.encode(r)
        out.append((a, b, fast))
    return out


def test_repeated_layouts_encode_like_the_general_path():
    big = float(np.finfo(np.float32).max) * 4           # beyond float32: inf in the row
    recs = []
    for s in range(12):
        g = np.array([0.5 + s, 2.0 ** -s])
        rec = {"step": np.int64(s), "time": 1.7e9 + s, "scalars": {"loss": 1.0 / (s + 1), "lr": 0.1},
               "param": {"grad_norm": g, "grad_nonfinite": np.zeros(2)}, "module": {}}
        if s in (3, 4):
            rec["param"]["grad_norm"] = np.array([MISSING, 1.0])     # a name left out
        if s == 5:
            rec["param"]["grad_norm"] = np.array([math.nan, big], dtype=np.float64)
        if s == 6:
            rec["scalars"]["loss"] = None                            # a scalar not recorded
        if s == 7:
            rec["param"]["grad_norm"] = [0.5, None]                  # a list
        if s == 8:
            rec["param"]["grad_norm"] = g.astype(np.float32)
        if s == 9:
            rec["module"] = {"out_std": np.array([MISSING, 1.0, MISSING])}   # another table
        if s in (10, 11):
            rec["module"] = {"out_std": np.array([MISSING, 2.0 + s, 3.0])}   # a name it lacks
        recs.append(rec)
    with np.errstate(over="ignore"):            # the float32 cast of ``big``
        both = _encode_both(recs)
    rows = []
    for (a, b, _), rec in zip(both, recs):
        assert a[0].k == b[0].k and a[0].columns == b[0].columns and a[1] == b[1]
        assert a[2] == b[2], rec["step"]
        rows.append(np.frombuffer(a[2], a[0].dtype())[0])
        assert rows[-1]["step"] == rec["step"] and rows[-1]["time"] == rec["time"]
    assert [r[0].k for r, _, _ in both] == [0] * 9 + [1, 2, 2]     # out_std's wider table from step 10
    assert {k: f.schema.k for k, f in both[-1][2]._fast.items()} == {
        (("loss", "lr"), ("grad_norm", "grad_nonfinite"), ()): 0,
        (("loss", "lr"), ("grad_norm", "grad_nonfinite"), ("out_std",)): 2}
    v = rows[5]["values"]
    assert np.isnan(v[0]) and not is_missing(v[:1])[0] and v[1] == np.inf
    assert is_missing(rows[3]["values"][:1])[0] and rows[6]["scalars"][0] != rows[6]["scalars"][0]
    assert rows[11]["values"][-2:].tolist() == [13.0, 3.0]


def test_a_table_that_leaves_names_out_still_takes_a_new_name(tmp_path):
    # Frozen parameter 1 has no gradient: its table leaves it out, and the row recipe
    # checks that it stays out; once it is recorded a new table holds it.
    recs = [{"step": s, "time": float(s), "scalars": {"loss": 1.0},
             "param": {"grad_norm": np.array([1.0 + s, MISSING if s < 3 else 7.0])}} for s in range(5)]
    t = _write(tmp_path / "r", recs)
    m = t.matrix("grad_norm")
    assert m.steps.tolist() == list(range(5))
    assert m.recorded[:, 1].tolist() == [False, False, False, True, True]
    assert m.values[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0] and m.values[3:, 1].tolist() == [7.0, 7.0]
    tables = [json.loads(x) for x in (tmp_path / "r" / "tables.jsonl").read_text().splitlines()]
    assert [d["columns"][0][2] for d in tables] == [[0], [0, 1]]


def test_rows_are_in_the_file_before_close(tmp_path):
    w = TraceWriter(tmp_path / "r", META)
    for s in range(3):
        w.write({"step": s, "time": 1.0, "scalars": {"loss": 2.0}, "param": {"grad_norm": np.array([1.0, 2.0])}})
        assert len(gt.load(tmp_path / "r")) == s + 1         # no buffer holds a row back
    w.close()


def test_records_that_need_the_general_path_keep_one_recipe():
    from gradtrace.trace.encode import Encoder
    enc = Encoder(2, 0, "<f8")
    recipes = []
    for s in range(3):           # a list value: the general path every time
        schema, new, row = enc.encode({"step": s, "time": 0.0, "param": {"grad_norm": [1.0 + s, None]}})
        recipes.append(enc._fast[((), ("grad_norm",), ())])
        assert new == (s == 0) and np.frombuffer(row, schema.dtype("<f8"))["values"][0].tolist() == [1.0 + s]
    assert recipes[0] is recipes[1] is recipes[2]
