"""HTML report, PNG plots and the figures' numbers."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.diagnose import Finding, Fix


def make_trace(path: Path, broken: bool = False, steps: int = 12, act: type = nn.Sigmoid) -> Path:
    """A small watched run; ``broken`` feeds a nan batch at step 6 (non-finite values)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with gt.watch(model, opt, out=str(path), activations_every=2) as mon:
            for step in range(steps):
                xb = x * float("nan") if (broken and step == 6) else x
                loss = nn.functional.cross_entropy(model(xb), y)
                mon.record_loss(loss)
                opt.zero_grad()
                loss.backward()
                opt.step()
            mon.log_event("guard_skip", reason="nonfinite_grad", value=float("nan"))
    return path


def fake_findings(trace) -> list[Finding]:
    """Stand-in for gradtrace.diagnose: one finding per non-finite event kind, else none."""
    if not trace.events("nonfinite"):
        return []
    return [Finding("nonfinite", "error", ["0"], 6, 6, {"events": len(trace.events("nonfinite"))},
                    "Gradients became nan at step 6; the first module with a nan output was 0.",
                    [Fix("Loss becomes nan", "Clip the gradient norm and check the input batch",
                         "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)")]),
            Finding("vanishing_gradients", "warning", ["0", "2"], 0, 11, {"ratio": 1.5e-7},
                    "Early layers receive 1e-7 of the last layer's gradient.",
                    [Fix("Gradients vanish in early layers", "Use ReLU-like activations",
                         "nn.ReLU()")])]


@pytest.fixture()
def traces(tmp_path):
    return make_trace(tmp_path / "healthy"), make_trace(tmp_path / "broken", broken=True)


def test_html_is_self_contained_and_has_plots_and_findings(traces, tmp_path):
    _, broken = traces
    trace = gt.load(broken)
    out = gt.report(trace, tmp_path / "r.html", findings=fake_findings(trace))
    page = Path(out).read_text()
    assert page.startswith("<!DOCTYPE html>")
    # no resource loaded over the network: no src/href to http(s), no scripts, no @import
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert "https://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert page.count("<svg") >= 5
    for title in ("Gradient flow", "Gradient norm per layer over steps", "Loss", "Activation std per layer"):
        assert title in page
    assert "Non-finite values" in page and "Vanishing gradients" in page
    assert "<code>torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)</code>" in page
    assert "Guard skipped 1 optimizer step" in page


def test_report_default_path_and_healthy_badge(traces):
    healthy, _ = traces
    out = gt.report(gt.load(healthy), findings=[])
    assert Path(out) == healthy / "report.html"
    assert "No problems found" in Path(out).read_text()


def test_report_accepts_path_and_is_callable_after_submodule_import(traces, tmp_path):
    import gradtrace.report.html  # noqa: F401  binds gradtrace.report to the module
    healthy, _ = traces
    out = gt.report(str(healthy), tmp_path / "x.html", findings=[])
    assert Path(out).exists()


def test_png_files_written(traces, tmp_path):
    pytest.importorskip("matplotlib")
    from gradtrace.report.plots import write_pngs

    _, broken = traces
    files = write_pngs(gt.load(broken), tmp_path / "png")
    names = {f.name for f in files}
    assert {"gradient_flow.png", "grad_norm_heatmap.png", "loss.png", "out_std_heatmap.png"} <= names
    for f in files:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_matplotlib_names_the_install(monkeypatch, traces, tmp_path):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    from gradtrace.report.plots import write_pngs

    with pytest.raises(ImportError, match="pip install matplotlib"):
        write_pngs(gt.load(traces[0]), tmp_path / "png")


def test_layer_grad_norms_combine_parameters(traces):
    from gradtrace.report.plots import layer_grad_norms

    trace = gt.load(traces[0])
    steps, layers, g = layer_grad_norms(trace)
    assert layers == ["0", "2", "4"]
    w = trace.series("grad_norm", "0.weight")
    b = trace.series("grad_norm", "0.bias")
    np.testing.assert_allclose(g[:, 0], np.sqrt(w ** 2 + b ** 2), rtol=1e-6)


def test_loss_spikes_and_sparkline():
    from gradtrace.report.plots import fmt, loss_spikes
    from gradtrace.report.terminal import sparkline

    loss = np.r_[np.ones(30) + 0.01 * np.sin(np.arange(30)), 40.0, np.ones(5), np.nan]
    assert loss_spikes(np.arange(len(loss)), loss) == [30, 36]
    assert sparkline([1e-8, 1e-4, 1.0], log=True) == "▁▄█"
    assert len(sparkline(np.arange(100.0), width=24)) == 24
    assert fmt(9.5367e-7) == "9.54e-07" and fmt(0.25) == "0.25"


def test_spectrum_section_included_when_available(traces, tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("gradtrace.report.spectrum_section")
    mod.render_spectrum_section = lambda spec: "<section id='spectrum-test'>spectrum here</section>"
    monkeypatch.setitem(sys.modules, "gradtrace.report.spectrum_section", mod)
    out = gt.report(gt.load(traces[0]), tmp_path / "s.html", findings=[], spectrum={"blocks": []})
    assert "spectrum-test" in Path(out).read_text()


def _long_trace(n_steps: int, spike_at: int):
    """A synthetic long run in memory: 4 layers, a loss spike and one exploding gradient step."""
    from gradtrace.trace import MemoryWriter

    meta = {"modules": [{"name": str(i), "type": "Linear", "params": [f"{i}.weight"]} for i in range(4)],
            "params": [{"name": f"{i}.weight", "module": str(i)} for i in range(4)]}
    w = MemoryWriter(meta)
    rng = np.random.default_rng(0)
    for s in range(n_steps):
        g = rng.uniform(0.5, 1.5, size=4) * np.array([1e-3, 1e-2, 1e-1, 1.0])
        if s == spike_at:
            g[0] = 1e4
        rec = {"step": s, "scalars": {"loss": 100.0 if s == spike_at else 1.0 + 0.01 * rng.standard_normal(),
                                      "total_grad_norm": float(np.sqrt((g ** 2).sum()))},
               "param": {"grad_norm": g.tolist()}}
        if s == 0:
            rec["exec_order"] = ["0", "1", "2", "3"]
        w.write(rec)
    return w.trace


def test_long_runs_are_downsampled_keeping_spikes(tmp_path):
    from gradtrace.report import figdata, svg

    n, spike = 30_000, 17_771
    trace = _long_trace(n, spike)
    steps, loss = trace.series("loss", with_steps=True)
    xs, ys = figdata.downsample(steps, loss, 1000)
    assert len(xs) <= 1000 and 100.0 in ys.tolist() and int(xs[np.argmax(ys)]) == spike
    assert np.all(np.diff(xs) > 0)                       # still in step order
    s, layers, g = figdata.layer_grad_norms(trace)
    cols_steps, cols = svg._bin_columns(s, g.T, 160)
    assert cols.shape == (4, 160) and cols[0].max() == pytest.approx(1e4, rel=1e-6)
    page = tmp_path / "long.html"
    gt.report(trace, page, findings=[])
    size = page.stat().st_size
    assert size < 600_000, size                           # 30k steps, still a small page
    # each chart draws at most svg.MAX_POINTS points per line
    longest = max(len(m.split()) for m in re.findall(r'points="([^"]*)"', page.read_text()))
    assert longest <= svg.MAX_POINTS


def test_report_reads_only_the_query_api(tmp_path, monkeypatch):
    from gradtrace.trace import Trace

    trace = gt.load(make_trace(tmp_path / "r", steps=6))
    monkeypatch.setattr(Trace, "records", property(lambda self: pytest.fail("report read raw records")))
    gt.report(trace, tmp_path / "page.html", findings=[])
    from gradtrace.report.terminal import render_plain
    assert "gradtrace" in render_plain(trace, [])


def test_findings_shown_in_diagnosis_order_not_by_severity(tmp_path):
    """The root cause leads (issue 11): a warning ranked first stays first in the terminal
    and HTML reports, ahead of the error it caused; each row shows its own severity."""
    from gradtrace.diagnose import rank
    from gradtrace.report.html import render_findings
    from gradtrace.report.terminal import render_plain

    cause = Finding("dead_units", "warning", ["1"], 2, 9, {}, "Units died.", [])
    effect = Finding("vanishing_gradients", "error", ["0"], 2, 9, {}, "Gradients vanished.", [])
    later = Finding("loss_spike", "error", [], 7, 7, {"spike_steps": [7]}, "Loss jumped.", [])
    ranked = rank([later, effect, cause])
    assert [f.kind for f in ranked] == ["dead_units", "vanishing_gradients", "loss_spike"]
    trace = gt.load(make_trace(tmp_path / "r", steps=6))
    text = render_plain(trace, ranked)
    heads = [text.index(t) for t in ("WARNING Dead", "ERROR   Vanishing", "ERROR   Loss")]
    assert heads == sorted(heads)
    html = render_findings(ranked)
    kinds = [html.index(f'data-kind="{k}"') for k in ("dead_units", "vanishing_gradients", "loss_spike")]
    assert kinds == sorted(kinds)
    assert html.index('badge warning') < html.index('badge error')
    # the same findings in another order come out in that order: nothing re-sorts them
    rev = render_findings(ranked[::-1])
    assert rev.index('data-kind="loss_spike"') < rev.index('data-kind="dead_units"')


def test_every_finding_kind_has_a_report_title():
    from gradtrace.diagnose.finding import KINDS
    from gradtrace.report.html import KIND_TITLES
    assert set(KINDS) <= set(KIND_TITLES), set(KINDS) - set(KIND_TITLES)
