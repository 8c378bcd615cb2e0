"""Integrations: CSV, TensorBoard and W&B sinks, the Lightning and Transformers callbacks,
and the ImportError a missing extra raises. Everything is local: nothing is downloaded."""
from __future__ import annotations

import csv
import importlib
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import gradtrace as gt

SEED = 0
REL_TOL = 1e-5           # same figure computed two ways
STEPS = 4


def _model() -> nn.Module:
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def _run(sinks, steps: int = STEPS):
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(SEED)
    with gt.watch(model, opt, out=None, activations_every=2, sinks=sinks) as mon:
        for _ in range(steps):
            x = torch.randn(16, 4, generator=g)
            loss = model(x).pow(2).mean()
            mon.record_loss(loss)
            loss.backward()
            opt.step()
            opt.zero_grad()
        mon.log_event("note", text="hello")
    return mon.trace


# ---- optional extras ------------------------------------------------------------------
def test_import_gradtrace_pulls_no_extra():
    code = ("import sys, gradtrace as gt, gradtrace.record, gradtrace.integrations; "
            "bad = [m for m in ('lightning', 'transformers', 'wandb', 'tensorboard', "
            "'pytorch_lightning') if m in sys.modules]; print(bad); sys.exit(bool(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("module, blocked, extra", [
    ("gradtrace.integrations.hf", "transformers", "hf"),
    ("gradtrace.integrations.wandb", "wandb", "wandb"),
    ("gradtrace.integrations.lightning", "lightning", "lightning"),
])
def test_missing_extra_names_the_pip_install(monkeypatch, module, blocked, extra):
    monkeypatch.setitem(sys.modules, blocked, None)           # import of it now fails
    monkeypatch.setitem(sys.modules, blocked + ".pytorch", None)
    monkeypatch.setitem(sys.modules, "pytorch_lightning", None)
    monkeypatch.delitem(sys.modules, module, raising=False)
    with pytest.raises(ImportError, match=rf"pip install gradtrace\[{extra}\]"):
        mod = importlib.import_module(module)
        if extra == "wandb":
            mod.WandbSink(mode="offline")                    # the extra is needed on use


def test_missing_tensorboard_names_the_pip_install(monkeypatch, tmp_path):
    from gradtrace.integrations.tensorboard import TensorBoardSink
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install gradtrace\[tensorboard\]"):
        TensorBoardSink(tmp_path)


# ---- sinks ------------------------------------------------------------------------------
def test_csv_sink_long_format(tmp_path):
    from gradtrace.integrations.csv import CSVSink
    path = tmp_path / "sub" / "stats.csv"
    trace = _run([CSVSink(path)])
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["step", "stat", "name", "value"]
    got = {(int(r["step"]), r["stat"], r["name"]): float(r["value"]) for r in rows if r["stat"] != "event"}
    for step, v in zip(*trace.series("total_grad_norm", with_steps=True)):
        assert math.isclose(got[(step, "total_grad_norm", "")], v, rel_tol=REL_TOL)
    for step, v in zip(*trace.series("grad_norm", "2.weight", with_steps=True)):
        assert math.isclose(got[(step, "grad_norm", "2.weight")], v, rel_tol=REL_TOL)
    assert ("0", "out_std", "1") in {(r["step"], r["stat"], r["name"]) for r in rows}  # module figures
    assert any(r["stat"] == "event" and r["name"] == "note" for r in rows)


def test_tensorboard_sink_groups_by_statistic(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from gradtrace.integrations.tensorboard import TensorBoardSink
    trace = _run([TensorBoardSink(tmp_path, histograms=True)])
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "gradtrace/total_grad_norm" in tags["scalars"]
    assert "grad_norm/0.weight" in tags["scalars"] and "update_ratio/2.bias" in tags["scalars"]
    assert "hist/grad_norm" in tags["histograms"]
    assert not [t for t in tags["scalars"] if t.count("/") == 0]   # nothing ungrouped
    tb = [e.value for e in acc.Scalars("grad_norm/0.weight")]
    np.testing.assert_allclose(tb, trace.series("grad_norm", "0.weight"), rtol=REL_TOL)


def test_wandb_sink_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    from gradtrace.integrations.wandb import WandbSink
    sink = WandbSink(project="gradtrace-test", dir=str(tmp_path))
    logged: list[dict] = []
    orig_write = sink.write          # count what goes to W&B, then let W&B write it

    def write(record):
        orig_write(record)
        if "event" not in record:
            logged.append(record)
    sink.write = write
    trace = _run([sink])
    assert sink.run is None                                  # finished by close()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and any(f.stat().st_size > 0 for f in runs[0].glob("*.wandb"))
    assert len(logged) == len(trace)
    assert sink.events == 1


# ---- Lightning ----------------------------------------------------------------------------
def test_lightning_callback(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.loggers import CSVLogger

    from gradtrace.integrations.lightning import GradTraceCallback

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()
            self.pre_clip: list[float] = []

        def training_step(self, batch, batch_idx):
            (x,) = batch
            return self.net(x).pow(2).mean() * 50           # big enough to be clipped

        def on_before_optimizer_step(self, optimizer):       # runs before Lightning clips
            g = [p.grad for p in self.parameters() if p.grad is not None]
            self.pre_clip.append(float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(t) for t in g]))))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    torch.manual_seed(SEED)
    data = torch.utils.data.TensorDataset(torch.randn(32, 4))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    module = Tiny()
    cb = GradTraceCallback(out=str(tmp_path / "trace"), activations_every=2)
    trainer = L.Trainer(max_steps=STEPS, callbacks=[cb], gradient_clip_val=0.5,
                        logger=CSVLogger(tmp_path, name="logs"), enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, accelerator="cpu")
    trainer.fit(module, loader)
    trace = gt.load(tmp_path / "trace")
    assert len(trace) == STEPS
    np.testing.assert_allclose(trace.series("total_grad_norm"), module.pre_clip, rtol=REL_TOL)
    post = trace.series("total_grad_norm_post_clip")
    assert np.all(post <= 0.5 + 1e-4) and np.all(trace.series("total_grad_norm") > post)
    assert "update_ratio" in trace.stats() and "out_std" in trace.stats()
    assert trace.params[0] == "net.0.weight"
    metrics = (tmp_path / "logs" / "version_0" / "metrics.csv").read_text()
    assert "gradtrace/total_grad_norm" in metrics and "gradtrace/total_grad_norm_post_clip" in metrics
    assert cb._hook is None and not cb.monitor._handles              # nothing left behind


# ---- Hugging Face Transformers ------------------------------------------------------------
def test_hf_callback_matches_trainer_grad_norm(tmp_path):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from gradtrace.integrations.hf import GradTraceCallback

    torch.manual_seed(SEED)
    cfg = tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100, n_positions=32)
    model = tf.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, 100, (16, 16), generator=g)
    ds = [{"input_ids": r, "labels": r} for r in ids]
    args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=STEPS,
                                per_device_train_batch_size=4, learning_rate=1e-3,
                                max_grad_norm=1.0, logging_steps=1, report_to=[], use_cpu=True,
                                save_strategy="no", seed=SEED, disable_tqdm=True)
    cb = GradTraceCallback(out=str(tmp_path / "trace"), activations_every=2)
    trainer = tf.Trainer(model=model, args=args, train_dataset=ds, callbacks=[cb])
    trainer.train()
    logged = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    trace = gt.load(tmp_path / "trace")
    assert len(logged) == STEPS == len(trace)
    np.testing.assert_allclose(trace.series("total_grad_norm"), logged, rtol=REL_TOL)
    assert np.all(trace.series("total_grad_norm_post_clip") <= 1.0 + 1e-4)
    assert np.isfinite(trace.series("loss")).all()
