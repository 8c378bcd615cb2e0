"""The demo on a test-sized configuration: traces, per-run reports and the index are written."""
from __future__ import annotations

import time

import pytest

import gradtrace as gt
from gradtrace.demo import EXPERIMENTS, TINY, measure_facts, run_demo


def test_facts_match_the_chapter():
    rows = {r["fact"].split(":")[0]: r["measured"] for r in measure_facts()}
    vals = list(rows.values())
    assert vals[0] == "0.2500"
    assert float(vals[1]) == pytest.approx(9.5e-7, rel=0.01)
    assert float(vals[2]) == pytest.approx(6.4e8, rel=0.01)


def test_run_demo_tiny(tmp_path, capsys):
    t0 = time.perf_counter()
    index = run_demo(tmp_path / "demo", progress=False, config=TINY)
    elapsed = time.perf_counter() - t0
    assert elapsed < 90, f"tiny demo took {elapsed:.0f} s"
    assert index == tmp_path / "demo" / "report.html"
    page = index.read_text()
    names = [r[0] for g in EXPERIMENTS for r in g[4]]
    assert len(names) == 12
    for name in names:
        trace = gt.load(tmp_path / "demo" / name)
        assert len(trace) == {"sigmoid": TINY.mlp_steps, "relu_kaiming": TINY.mlp_steps,
                              "residual_layernorm": TINY.mlp_steps}.get(
            name, TINY.relu_steps if "lr" in name else TINY.rnn_steps)
        assert (tmp_path / "demo" / name / "report.html").exists()
        assert f'href="{name}/report.html"' in page
    # the comparison page: overlaid charts, facts, every group
    assert page.count("<svg") >= 8
    assert "0.2500" in page and "9.54e-07" in page and "6.38e+08" in page
    for _, title, *_ in EXPERIMENTS:
        assert title.split(":")[0] in page
    # the recurrent runs recorded gradients through time
    assert "time_grad_norm" in gt.load(tmp_path / "demo" / "rnn_vanishing").stats()
    # the unclipped RNN blows up, the clipped one does not
    assert gt.load(tmp_path / "demo" / "rnn_exploding").events("nonfinite")
    assert not gt.load(tmp_path / "demo" / "rnn_clipped").events("nonfinite")
    out = capsys.readouterr().out
    assert "Report:" in out and str(index.resolve()) in out


def test_cli_main_only_group(tmp_path, monkeypatch, capsys):
    import gradtrace.demo as demo

    calls = {}

    def fake_run(out, quick=False, progress=True, **kw):
        calls.update(out=out, quick=quick, progress=progress)
        return tmp_path / "report.html"

    monkeypatch.setattr(demo, "run_demo", fake_run)
    from gradtrace.cli import main

    assert main(["demo", "--quick", "--out", str(tmp_path / "d"), "--no-progress"]) == 0
    assert calls == {"out": tmp_path / "d", "quick": True, "progress": False}


def test_unknown_group_is_an_input_error(tmp_path):
    with pytest.raises(ValueError, match="unknown experiment group"):
        run_demo(tmp_path, config=TINY, only=["nope"], progress=False)


@pytest.mark.slow
def test_dead_unit_group_makes_the_chapters_point(tmp_path):
    # The chapter: at a too-high learning rate ReLU units die; Leaky ReLU, GELU or a lower
    # rate avoid it. At the demo's own size (QUICK), ReLU at the peak rate must lose units
    # (dead_units first), and the three alternatives must train with no finding at all.
    import torch

    from gradtrace.demo import QUICK
    from gradtrace.demo.experiments import train_relu

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        found = {}
        for name in ("relu_high_lr", "leaky_high_lr", "gelu_high_lr", "relu_low_lr"):
            trace = gt.load(train_relu(str(tmp_path / name), name, QUICK))
            found[name] = gt.diagnose(trace)
    finally:
        torch.set_num_threads(threads)
    dead = found["relu_high_lr"]
    assert dead and dead[0].kind == "dead_units"
    assert max(dead[0].evidence["dead_fraction"].values()) >= 0.25
    assert not dead[0].evidence.get("from_initialisation")     # the rate killed them, not the init
    for name in ("leaky_high_lr", "gelu_high_lr", "relu_low_lr"):
        assert found[name] == [], (name, [(f.kind, f.first_step) for f in found[name]])
