"""The trace directory: readable while written, after SIGKILL, and loud about foreign data."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

import gradtrace as gt
from gradtrace.trace import TraceWarning


def _write_run(path, steps=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, out=path) as mon:
        for _ in range(steps):
            loss = model(torch.randn(5, 3)).pow(2).mean()
            mon.record_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
    return mon


def test_round_trip_and_stats(tmp_path):
    mon = _write_run(tmp_path / "run")
    t = gt.load(tmp_path / "run")
    assert len(t) == 4 and t.meta["format"] == "gradtrace-trace"
    assert {"grad_norm", "total_grad_norm", "loss", "param_norm", "out_flag_nonfinite"} <= set(t.stats())
    assert t.meta["torch_version"] == torch.__version__
    assert [m["activation"] for m in t.meta["modules"]] == [None, "relu", None]
    steps, loss = t.series("loss", with_steps=True)
    assert list(steps) == [0, 1, 2, 3] and loss.dtype == np.float64
    s, names, g = t.matrix("grad_norm")
    assert g.shape == (4, 4) and names == t.params
    assert mon.trace.series("loss").tolist() == loss.tolist()


def test_unknown_names_raise_keyerror_with_close_matches(tmp_path):
    _write_run(tmp_path / "run")
    t = gt.load(tmp_path / "run")
    with pytest.raises(KeyError, match="grad_norm"):
        t.series("grad_nrom", "0.weight")
    with pytest.raises(KeyError, match="0.weight"):
        t.series("grad_norm", "0.weigth")
    with pytest.raises(KeyError, match="takes no name"):
        t.series("loss", "0.weight")


def test_torn_row_and_torn_json_line_are_warnings(tmp_path):
    _write_run(tmp_path / "run")
    with open(tmp_path / "run" / "t0.bin", "ab") as f:
        f.write(b"\x01\x02\x03")                 # a row cut short by a kill
    with open(tmp_path / "run" / "events.jsonl", "a") as f:
        f.write('{"event": "guard_sk')
    with pytest.warns(TraceWarning, match="torn"):
        t = gt.load(tmp_path / "run")
    assert len(t) == 4 and len(t.warnings) == 1      # events are parsed on first use
    with pytest.warns(TraceWarning, match="line .* is torn"):
        assert [e["event"] for e in t.events()] == ["end"]   # the torn line is dropped
    assert len(t.warnings) == 2


def test_corrupt_or_foreign_directories_are_valueerrors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        gt.load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a gradtrace trace"):
        gt.load(tmp_path / "empty")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "meta.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="not a gradtrace trace"):
        gt.load(tmp_path / "foreign")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        gt.load(tmp_path / "bad")
    _write_run(tmp_path / "mid")
    lines = (tmp_path / "mid" / "tables.jsonl").read_text().splitlines()
    (tmp_path / "mid" / "tables.jsonl").write_text("\n".join(["garbage"] + lines) + "\n")
    with pytest.raises(ValueError, match="line 1 is corrupt"):
        gt.load(tmp_path / "mid")


WRITER = textwrap.dedent("""
    import sys, time, torch, gradtrace as gt
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon = gt.watch(model, opt, out=sys.argv[1])
    step = 0
    while True:
        loss = model(torch.randn(5, 3)).pow(2).mean()
        mon.record_loss(loss); loss.backward(); opt.step(); opt.zero_grad()
        step += 1
        if step == 5:
            print("ready", flush=True)
        time.sleep(0.002)
""")


def test_readable_while_written_and_after_sigkill(tmp_path):
    run = tmp_path / "live"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30    # the writer thread lags the loop by a few ms
        live = gt.load(run)                 # the writer is still going
        while len(live) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
            live = gt.load(run)
        assert len(live) >= 5
        time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    after = gt.load(run)                    # a torn last line would only warn
    assert len(after) >= len(live)
    assert np.isfinite(after.series("total_grad_norm")).all()
    assert list(after.steps_recorded) == list(range(len(after)))


def test_events_are_kept_apart_from_steps(tmp_path):
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gt.watch(model, opt, out=tmp_path / "r") as mon:
        model(torch.ones(1, 2)).sum().backward()
        mon.log_event("guard_skip", reason="nonfinite_grad", value=float("nan"))
        opt.step()
    t = gt.load(tmp_path / "r")
    (ev,) = t.events("guard_skip")
    assert ev["step"] == 0 and ev["reason"] == "nonfinite_grad" and ev["value"] == "nan"
    assert len(t) == 1


def test_a_partial_row_write_is_continued():
    from gradtrace.trace.writer import _write_rest

    class Trickle:                     # a file that takes at most 3 bytes per write() call
        def __init__(self):
            self.data = b""

        def write(self, b):
            self.data += bytes(b[:3])
            return min(3, len(b))
    f, row = Trickle(), bytearray(range(10))
    done = f.write(row)
    _write_rest(f, row, done)
    assert f.data == bytes(range(10))
