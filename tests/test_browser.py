"""Open the HTML report in headless Chromium: plots and findings must render.

The screenshot is kept as ``artifacts/report.png`` under the repository root.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import gradtrace as gt
from test_report import fake_findings, make_trace

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                                 "(apt-get install chromium); the HTML itself is tested in test_report.py")]


def _chromium(*args: str, timeout: int = 90) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
           "--disable-dev-shm-usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def test_report_renders_in_chromium(tmp_path):
    run = make_trace(tmp_path / "broken", broken=True, steps=30)
    trace = gt.load(run)
    page = gt.report(trace, tmp_path / "report.html", findings=fake_findings(trace))
    url = Path(page).resolve().as_uri()

    dom = _chromium("--dump-dom", url)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert html.count("<svg") >= 5                        # the inline plots are in the rendered DOM
    assert "<polyline" in html and "<rect" in html        # lines and heatmap cells drawn
    assert 'class="finding error"' in html and "Non-finite values" in html
    assert "clip_grad_norm_" in html

    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shot = artifacts / "report.png"
    if shot.exists():
        shot.unlink()
    r = _chromium(f"--screenshot={shot}", "--window-size=1400,3000", url)
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 50_000   # a blank page is much smaller


def test_demo_index_renders_in_chromium(tmp_path):
    from gradtrace.demo import TINY, run_demo

    index = run_demo(tmp_path / "demo", progress=False, config=TINY, only=["depth", "rnn-explode"])
    dom = _chromium("--dump-dom", index.resolve().as_uri())
    assert dom.returncode == 0
    assert dom.stdout.count("<svg") >= 4 and "Gradient flow across depth" in dom.stdout
    artifacts = ROOT / "artifacts"
    artifacts.mkdir(exist_ok=True)
    r = _chromium(f"--screenshot={artifacts / 'demo-report.png'}", "--window-size=1400,3000",
                  index.resolve().as_uri())
    assert r.returncode == 0
