"""The scripts in examples/ run as a user would run them (small settings)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("script,args,expect", [
    ("watch_and_diagnose.py", ["--steps", "12"], "vanishing_gradients"),
    ("clip_and_guard.py", ["--steps", "30"], "parameters finite: True"),
    ("preflight_and_init.py", [], "after: healthy"),
])
def test_example_runs(script, args, expect, tmp_path):
    if script == "watch_and_diagnose.py":
        args = args + ["--out", str(tmp_path / "run")]
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout


def test_readme_quick_start_runs(tmp_path):
    readme = (EXAMPLES.parent / "README.md").read_text()
    start = readme.index("## Quick start")
    code = readme[readme.index("```python", start) + len("```python"): readme.index("```", readme.index("```python", start) + 9)]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "runs" / "exp1" / "report.html").exists()
    assert "vanishing_gradients" in proc.stdout
