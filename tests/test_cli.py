"""`gradtrace doctor / show / report` exit codes and output."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gradtrace.cli import main
from test_report import fake_findings, make_trace

SCHEMA_KEYS = {"kind", "severity", "layers", "first_step", "last_step", "evidence", "explanation", "fixes"}


@pytest.fixture()
def runs(tmp_path):
    return make_trace(tmp_path / "healthy"), make_trace(tmp_path / "broken", broken=True)


@pytest.fixture()
def fake_detect(monkeypatch):
    """Deterministic findings (healthy run: none; broken run: two), whatever detect says."""
    import importlib

    rep = importlib.import_module("gradtrace.report")
    monkeypatch.setattr(rep, "diagnose_trace", fake_findings)


def _one_line_error(err: str) -> None:
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err


def test_doctor_exit_codes(runs, fake_detect, capsys, tmp_path):
    healthy, broken = runs
    assert main(["doctor", str(healthy)]) == 0
    assert "Healthy" in capsys.readouterr().out
    assert main(["doctor", str(broken)]) == 3
    out = capsys.readouterr().out
    assert "Non-finite values" in out and "clip_grad_norm_" in out
    assert main(["doctor", str(tmp_path / "missing")]) == 2
    _one_line_error(capsys.readouterr().err)
    (tmp_path / "notatrace").mkdir()
    assert main(["doctor", str(tmp_path / "notatrace")]) == 2
    _one_line_error(capsys.readouterr().err)


def test_doctor_json_schema(runs, fake_detect, capsys):
    healthy, broken = runs
    assert main(["doctor", str(broken), "--json"]) == 3
    obj = json.loads(capsys.readouterr().out)
    assert set(obj) == {"run", "healthy", "findings", "summary"}
    assert obj["healthy"] is False and obj["run"] == str(broken)
    assert obj["findings"] and all(set(f) == SCHEMA_KEYS for f in obj["findings"])
    assert set(obj["findings"][0]["fixes"][0]) == {"problem", "action", "code"}
    s = obj["summary"]
    assert s["steps_recorded"] == 12 and s["findings"] == 2 and s["errors"] == 1 and s["warnings"] == 1
    assert s["nonfinite_events"] >= 1 and s["guard_skips"] == 1
    assert main(["doctor", str(healthy), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["healthy"] is True and obj["findings"] == []


def test_show_prints_table_with_findings_on_top(runs, fake_detect, capsys, monkeypatch):
    _, broken = runs
    monkeypatch.setenv("GRADTRACE_PLAIN", "1")
    assert main(["show", str(broken)]) == 3      # same verdict codes as doctor
    out = capsys.readouterr().out
    assert out.index("Findings") < out.index("Layers (input side first)")
    assert "grad norm" in out and "grad trend (log)" in out
    rows = [l for l in out.splitlines() if l.startswith(("0 ", "2 ", "4 "))]
    assert len(rows) == 3
    assert any(ch in out for ch in "▁▂▃▄▅▆▇█")


def test_show_with_rich(runs, fake_detect, capsys, monkeypatch):
    pytest.importorskip("rich")
    monkeypatch.delenv("GRADTRACE_PLAIN", raising=False)
    assert main(["show", str(runs[0])]) == 0
    out = capsys.readouterr().out
    assert "Layers (input side first)" in out and "Linear" in out


def test_report_command_writes_html_and_png(runs, fake_detect, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    _, broken = runs
    html = tmp_path / "out" / "page.html"
    assert main(["report", str(broken), "--html", str(html), "--png", str(tmp_path / "png")]) == 0
    assert html.exists() and "<svg" in html.read_text()
    assert len(list((tmp_path / "png").glob("*.png"))) >= 4
    assert main(["report", str(tmp_path / "nope")]) == 2
    _one_line_error(capsys.readouterr().err)


def test_doctor_subprocess(runs, tmp_path):
    """The installed console entry point, real detection when it is installed."""
    healthy, broken = runs
    cmd = [sys.executable, "-m", "gradtrace", "doctor"]
    r = subprocess.run(cmd + [str(tmp_path / "missing")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    _one_line_error(r.stderr)
    r = subprocess.run(cmd + [str(broken), "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    obj = json.loads(r.stdout)
    assert obj["healthy"] is False and any(f["kind"] in ("nonfinite", "loss_nonfinite") for f in obj["findings"])
    r = subprocess.run(cmd + [str(healthy)], capture_output=True, text=True, timeout=120)
    assert r.returncode in (0, 3) and "Traceback" not in r.stderr


def test_bad_out_and_bad_shape_are_one_line_errors(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["demo", "--out", str(afile)]) == 2
    _one_line_error(capsys.readouterr().err)
    mod = tmp_path / "tiny_models.py"
    mod.write_text("import torch\ndef make():\n    return torch.nn.Linear(8, 2)\n")
    import sys as _sys
    _sys.path.insert(0, str(tmp_path))
    try:
        assert main(["preflight", "tiny_models:make", "--input-shape", "4,5"]) == 2   # wrong width
        _one_line_error(capsys.readouterr().err)
    finally:
        _sys.path.remove(str(tmp_path))
