"""Export: the long pandas table, Parquet, and ``gradtrace export``."""
from __future__ import annotations

import sys

import numpy as np
import pytest

import gradtrace as gt
from gradtrace.cli import main as cli
from gradtrace.trace import TraceWriter

META = {"params": [{"name": "w", "shape": [2], "module": "m"}, {"name": "b", "shape": [1], "module": "m"}],
        "modules": [{"name": "m", "type": "Linear"}]}
RECS = [{"step": 0, "scalars": {"loss": 2.0}, "param": {"grad_norm": [0.5, None]}},
        {"step": 1, "scalars": {"loss": float("nan")}, "param": {"grad_norm": [0.25, 4.0]}},
        {"step": 2, "scalars": {"loss": 1.0}, "param": {"grad_norm": [float("inf"), 8.0]},
         "vectors": {"active_mask": {"m": "2:01"}}}]


def _run(path):
    w = TraceWriter(path, META)
    for r in RECS:
        w.write(r)
    w.close()
    return gt.load(path)


def test_to_pandas_long_table_has_every_recorded_number_once(tmp_path):
    pd = pytest.importorskip("pandas")
    df = _run(tmp_path / "r").to_pandas()
    assert list(df.columns) == ["step", "name", "stat", "value"]
    got = {(int(r.step), r.name, r.stat): r.value for r in df.itertuples()}
    want = {(0, "", "loss"): 2.0, (1, "", "loss"): np.nan, (2, "", "loss"): 1.0,
            (0, "w", "grad_norm"): 0.5, (1, "w", "grad_norm"): 0.25, (1, "b", "grad_norm"): 4.0,
            (2, "w", "grad_norm"): np.inf, (2, "b", "grad_norm"): 8.0}
    assert got.keys() == want.keys()                        # (0, b) not recorded: no row
    for k, v in want.items():
        assert got[k] == v or (np.isnan(v) and np.isnan(got[k])), k
    assert len(_run(tmp_path / "r2").to_pandas(["loss"])) == 3
    with pytest.raises(ValueError, match="vector"):
        _run(tmp_path / "r3").to_pandas(["active_mask"])
    with pytest.raises(TypeError, match="list"):
        _run(tmp_path / "r4").to_pandas("loss")
    assert isinstance(df, pd.DataFrame)


def test_parquet_round_trip_and_cli(tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    _run(tmp_path / "r")
    out = tmp_path / "r.parquet"
    assert cli(["export", str(tmp_path / "r"), "--parquet", str(out)]) == 0
    assert "8 rows written" in capsys.readouterr().out
    table = pq.read_table(out).to_pydict()
    assert table["stat"].count("grad_norm") == 5 and len(table["step"]) == 8
    rows = sorted(zip(table["step"], table["name"], table["stat"], table["value"]), key=str)
    assert (1, "b", "grad_norm", 4.0) in rows and (0, "", "loss", 2.0) in rows
    assert cli(["export", str(tmp_path / "r"), "--parquet", str(out), "--stats", "grad_nrom"]) == 2
    assert "grad_norm" in capsys.readouterr().err        # the close match is named


def test_export_without_pyarrow_names_the_extra(tmp_path, capsys, monkeypatch):
    _run(tmp_path / "r")
    monkeypatch.setitem(sys.modules, "pyarrow", None)          # as if not installed
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    assert cli(["export", str(tmp_path / "r"), "--parquet", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err
    assert "pip install gradtrace[parquet]" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.parquet").exists()
