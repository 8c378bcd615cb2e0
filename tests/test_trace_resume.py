"""Nothing is lost: no silent overwrite, explicit overwrite, resume (also after SIGKILL), next_run_dir."""
from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import gradtrace as gt
from gradtrace.errors import UsageError
from gradtrace.trace import Sink, TraceWriter, next_run_dir

META = {"params": [{"name": "w", "shape": [3], "module": ""}, {"name": "b", "shape": [1], "module": ""}],
        "modules": [{"name": "", "type": "Linear"}]}


def _rec(s):
    return {"step": s, "time": 0.0, "scalars": {"loss": 1.0 / (s + 1)},
            "param": {"grad_norm": [float(s), 2.0 * s]}, "module": {"out_flag_nonfinite": [0]}}


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def _watch_run(out, steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, out=out) as mon:
        for _ in range(steps):
            model(torch.randn(5, 3)).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    return mon


def test_second_watch_into_the_same_directory_leaves_the_first_intact(tmp_path):
    run = tmp_path / "exp1"
    _watch_run(run)
    before = _digest(run)
    with pytest.raises(UsageError) as e:
        _watch_run(run)
    msg = str(e.value)
    assert "resume=True" in msg and "overwrite=True" in msg and "next_run_dir" in msg and "exp1-2" in msg
    assert _digest(run) == before
    assert len(gt.load(run)) == 3


def test_overwrite_replaces_only_trace_files(tmp_path):
    run = tmp_path / "r"
    w = TraceWriter(run, META)
    for s in range(5):
        w.write(_rec(s))
    w.close()
    (run / "notes.txt").write_text("mine")
    w = TraceWriter(run, META, overwrite=True)
    w.write(_rec(0))
    w.close()
    assert gt.load(run).steps.tolist() == [0] and (run / "notes.txt").read_text() == "mine"
    with pytest.raises(UsageError, match="not both"):
        TraceWriter(run, META, resume=True, overwrite=True)


def test_resume_continues_reports_gaps_and_refuses_another_model(tmp_path):
    run = tmp_path / "r"
    w = TraceWriter(run, META, resume=True)          # nothing there yet: a new trace
    assert w.next_step == 0
    for s in range(4):
        w.write(_rec(s))
    w.close()
    w = TraceWriter(run, META, resume=True)
    assert w.next_step == 4
    for s in (6, 7):                                  # the job lost steps 4 and 5
        w.write(_rec(s))
    with pytest.raises(ValueError, match="must not go back"):
        w.write(_rec(2))
    w.close()
    t = gt.load(run)
    assert t.steps.tolist() == [0, 1, 2, 3, 6, 7]
    np.testing.assert_array_equal(t.series("grad_norm", "b"), [0, 2, 4, 6, 12, 14])
    (ev,) = t.events("resume")
    assert (ev["step"], ev["expected_step"], ev["gap"]) == (6, 4, 2)
    other = {**META, "params": [{"name": "w", "shape": [4], "module": ""}, META["params"][1]]}
    with pytest.raises(UsageError, match="parameters differ"):
        TraceWriter(run, other, resume=True)


KILLED = textwrap.dedent("""
    import sys, time
    from gradtrace.trace import TraceWriter
    meta = {"params": [{"name": "w", "shape": [3], "module": ""}, {"name": "b", "shape": [1], "module": ""}],
            "modules": [{"name": "", "type": "Linear"}]}
    w = TraceWriter(sys.argv[1], meta, resume=True)
    s = w.next_step
    while True:
        w.write({"step": s, "time": 0.0, "scalars": {"loss": 1.0 / (s + 1)},
                 "param": {"grad_norm": [float(s), 2.0 * s]}, "module": {"out_flag_nonfinite": [0]},
                 "vectors": {"active_mask": {"": "3:05"}}})
        if s == 20:
            print("ready", flush=True)
        s += 1
""")


def test_resume_after_sigkill_continues_the_step_numbers(tmp_path):
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    with open(run / "t0.bin", "ab") as f:             # make sure the tail is torn
        f.write(b"\x07" * 5)
    with pytest.warns(gt.TraceWarning):
        t = gt.load(run)
    n = len(t)
    assert n > 20 and t.steps.tolist() == list(range(n))
    np.testing.assert_array_equal(t.series("grad_norm", "b"), 2.0 * np.arange(n))
    w = TraceWriter(run, META, resume=True)           # cuts the torn row, continues
    assert w.next_step == n
    w.write(_rec(n))
    w.close()
    t = gt.load(run)
    assert t.steps.tolist() == list(range(n + 1)) and t.events("resume")[0]["gap"] == 0
    assert t.series("grad_norm", "w")[-1] == n


def test_next_run_dir_and_sink_protocol(tmp_path):
    base = tmp_path / "exp"
    assert next_run_dir(base) == str(base)
    TraceWriter(base, META).close()
    assert next_run_dir(base) == f"{base}-2"
    TraceWriter(f"{base}-2", META).close()
    assert next_run_dir(str(base) + "/") == f"{base}-3"
    assert gt.next_run_dir(base) == f"{base}-3"

    class Half:
        def write(self, record): ...
    assert not isinstance(Half(), Sink)
    with pytest.raises(UsageError, match="is a file"):
        (tmp_path / "f").write_text("x")
        TraceWriter(tmp_path / "f", META)


def test_sinks_implement_the_protocol_and_skip_missing(tmp_path):
    from gradtrace.integrations._extras import flatten
    from gradtrace.integrations.csv import CSVSink
    from gradtrace.trace import MISSING

    sink = CSVSink(tmp_path / "s.csv")
    assert isinstance(sink, Sink)
    with pytest.raises(RuntimeError, match="before start"):
        sink.write({"step": 0})
    rec = {"step": 0, "param": {"grad_norm": np.array([MISSING, float("nan")])}}
    got = list(flatten(rec, META))
    assert [(s, n) for s, n, _ in got] == [("grad_norm", "b")] and np.isnan(got[0][2])
