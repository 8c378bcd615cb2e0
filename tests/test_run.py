"""``gradtrace run``: an unmodified script is watched, and stays the script it was."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.autowatch import AutoWatch, find_root
from gradtrace.record import flight

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}

MODEL_PY = '''\
import torch
from torch import nn


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        return torch.log(h + self.shift)  # LOG LINE


class Net(nn.Module):
    def __init__(self, shift=1.0):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.inner = Inner()
        self.inner.shift = shift
        self.drop = nn.Dropout(0.25)
        self.b = nn.Linear(4, 1)

    def forward(self, x):
        return self.b(self.inner(self.drop(torch.tanh(self.a(x)))))
'''

TRAIN_PY = '''\
import sys
import torch
from model import Net

EXPLICIT = "--explicit" in sys.argv
torch.manual_seed(0)
net = Net(shift=float(sys.argv[2]))
opt = torch.optim.SGD(net.parameters(), lr=0.05)
gen = torch.Generator().manual_seed(1)
x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 1, generator=gen)
if EXPLICIT:
    import gradtrace as gt
    mon = gt.watch(net, opt, out=sys.argv[3])
for step in range(12):
    opt.zero_grad()
    loss = ((net(x) - y) ** 2).mean()
    loss.backward()
    opt.step()
if EXPLICIT:
    mon.close()
torch.save({k: v.clone() for k, v in net.state_dict().items()}, sys.argv[1])
print("name", __name__, "argv", sys.argv[1:])
'''


def _write(d: Path, files: dict) -> None:
    for name, text in files.items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(textwrap.dedent(text))


def _gt(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gradtrace", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=120)


def _py(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=120)


@pytest.fixture
def inproc(tmp_path, monkeypatch, capsys):
    """Run ``gradtrace <args>`` in this process (cheaper than a fresh interpreter), in
    ``tmp_path``; returns ``(exit code, stdout, stderr)``. Modules the script imported from
    ``tmp_path`` are forgotten afterwards, so the next test's ``model.py`` is its own."""
    from gradtrace.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))

    def run(*args: str):
        capsys.readouterr()
        try:
            code = main(list(args))
        finally:
            for name, mod in list(sys.modules.items()):
                if str(getattr(mod, "__file__", "") or "").startswith(str(tmp_path)):
                    del sys.modules[name]
        out, err = capsys.readouterr()
        return code, out, err
    yield run


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_log_zero_deep_in_a_module_ends_with_finding_bundle_and_the_exact_line(tmp_path, inproc):
    _write(tmp_path, {"model.py": MODEL_PY, "train.py": TRAIN_PY})
    r = _gt(tmp_path, "run", "--out", "runs/r", "train.py", "w.pt", "0.0")   # python -m gradtrace
    assert r.returncode == 0, r.stderr
    # the script's stdout is its own: nothing of gradtrace's goes there
    assert r.stdout == "name __main__ argv ['w.pt', '0.0']\n"
    assert "Non-finite" in r.stderr and "gradtrace replay" in r.stderr
    assert "report: runs/r/Net/report.html" in r.stderr and (tmp_path / "runs/r/Net/report.html").is_file()
    bundles = list((tmp_path / "runs" / "r").rglob("flight-*.pt"))
    assert [b.name for b in bundles] == ["flight-0.pt"]       # relu's zeros reach log at step 0
    line = next(i for i, t in enumerate(MODEL_PY.splitlines(), 1) if "LOG LINE" in t)
    code, out, err = inproc("replay", "runs/r")
    assert code == 3, err
    assert f"torch.log at model.py:{line} in Inner.forward: input min 0 " in out
    assert "module: inner (Inner)" in out and "→ -inf" in out
    js = json.loads(inproc("replay", "runs/r", "--json")[1])
    assert js["phase"] == "forward" and js["origin"]["aten"] == "aten.log.default"


def _plain(tmp_path, *argv):        # `python train.py argv...`, in this process
    import runpy
    saved = sys.argv[:]
    sys.argv = ["train.py", *argv]
    sys.path.insert(0, str(tmp_path))
    try:
        runpy.run_path("train.py", run_name="__main__")
    finally:
        sys.argv = saved
        sys.path.remove(str(tmp_path))
        sys.modules.pop("model", None)


def _plain_script(tmp_path, script, *argv):     # `python script argv...`, in this process
    import runpy
    saved = sys.argv[:]
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(tmp_path / script), run_name="__main__")
    finally:
        sys.argv = saved


def test_same_figures_as_explicit_watch_and_bitwise_identical_training(tmp_path, inproc):
    _write(tmp_path, {"model.py": MODEL_PY, "train.py": TRAIN_PY})
    _plain(tmp_path, "plain.pt", "1.0")
    assert inproc("run", "--out", "runs/auto", "train.py", "auto.pt", "1.0")[0] == 0
    _plain(tmp_path, "expl.pt", "1.0", "runs/explicit", "--explicit")
    load = lambda n: torch.load(tmp_path / n, weights_only=True)   # noqa: E731
    assert _same(load("plain.pt"), load("auto.pt"))               # bitwise, dropout included
    assert _same(load("plain.pt"), load("expl.pt"))
    a, e = gt.load(tmp_path / "runs/auto/Net"), gt.load(tmp_path / "runs/explicit")
    ra = {r["step"]: r for r in a.records}
    re_ = {r["step"]: r for r in e.records}
    assert sorted(ra) == sorted(re_) == list(range(12))
    # exec_order and out_dtypes are written when they change: the explicit run wrote them at step 0
    drop = lambda r: {k: v for k, v in r.items() if k not in ("time", "exec_order", "out_dtypes")}  # noqa: E731
    for s in range(1, 12):
        assert drop(ra[s]) == drop(re_[s]), s
    assert a.exec_order(10) == e.exec_order(10) == ["a", "drop", "inner.fc", "b"]
    assert a.out_dtypes() == e.out_dtypes() == {m: "float32" for m in ("a", "drop", "inner.fc", "b")}
    # step 0: the monitor came in after that step's forward: parameter figures only
    for key in ("param", "scalars"):
        assert ra[0][key] == re_[0][key]
    assert "module" in re_[0] and "module" not in ra[0]
    run = json.loads((tmp_path / "runs/auto/run.json").read_text())
    assert run["traces"] == [{"dir": "Net", "model": "Net", "optimizer": "SGD", "first_step": 0}]
    assert run["argv"] == ["train.py", "auto.pt", "1.0"]


def test_exit_code_exception_and_module_mode(tmp_path, inproc):
    _write(tmp_path, {
        "boom.py": """\
            import sys, torch
            m = torch.nn.Linear(2, 1); o = torch.optim.SGD(m.parameters(), lr=0.1)
            m(torch.ones(1, 2)).sum().backward(); o.step()
            if sys.argv[1] == "raise":
                raise ValueError("boom from the script")
            print("exiting", sys.argv[1], file=sys.stderr)
            sys.exit(int(sys.argv[1]))
            """,
        "pkg/__init__.py": "",
        "pkg/train.py": """\
            import sys
            print(__name__, sys.argv[1:], sys.argv[0].endswith("train.py"))
            sys.exit(4)
            """,
    })
    code, out, err = inproc("run", "--out", "runs/b", "boom.py", "5")
    assert code == 5 and "exiting 5" in err and out == ""
    code, out, err = inproc("run", "--out", "runs/c", "boom.py", "raise")
    assert code == 1
    assert "ValueError: boom from the script" in err
    tb = err.split("Traceback (most recent call last):")[1].split("ValueError")[0]
    assert "boom.py" in tb and "gradtrace" not in tb and "runpy" not in tb
    # the exception is in the trace, too
    events = gt.load(tmp_path / "runs/c/Linear").events
    assert [ev["type"] for ev in events("exception")] == ["ValueError"]
    r = _gt(tmp_path, "run", "--out", "runs/m", "-m", "pkg.train", "--lr", "3")   # a fresh interpreter
    assert r.returncode == 4, r.stderr
    assert r.stdout == "__main__ ['--lr', '3'] True\n"
    assert "no optimizer stepped" in r.stderr
    code, out, err = inproc("run", "missing.py")
    assert code == 2 and err.count("\n") == 1 and "missing.py" in err


def test_gan_two_models_two_traces(tmp_path, inproc):
    _write(tmp_path, {"gan.py": """\
        import torch
        from torch import nn

        class Generator(nn.Module):
            def __init__(self):
                super().__init__(); self.net = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 4))
            def forward(self, z): return self.net(z)

        class Discriminator(nn.Module):
            def __init__(self):
                super().__init__(); self.net = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
            def forward(self, x): return self.net(x)

        torch.manual_seed(0)
        G, D = Generator(), Discriminator()
        og, od = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
        bce = nn.BCEWithLogitsLoss()
        real = torch.randn(16, 4)
        for step in range(6):
            fake = G(torch.randn(16, 2))
            od.zero_grad()
            ld = bce(D(real), torch.ones(16, 1)) + bce(D(fake.detach()), torch.zeros(16, 1))
            ld.backward(); od.step()
            og.zero_grad()
            lg = bce(D(fake), torch.ones(16, 1))
            lg.backward(); og.step()
        """})
    code, _, err = inproc("run", "--out", "runs/gan", "gan.py")
    assert code == 0, err
    run = json.loads((tmp_path / "runs/gan/run.json").read_text())
    assert [(t["model"], t["optimizer"]) for t in run["traces"]] == [("Discriminator", "Adam"), ("Generator", "Adam")]
    for name, n_params in (("Discriminator", 4), ("Generator", 4)):
        t = gt.load(tmp_path / "runs/gan" / name)
        assert len(t.params) == n_params and list(t.steps_recorded) == list(range(6))
        assert all(p.startswith("net.") for p in t.params)


# ---- in process ---------------------------------------------------------------------------
def _global_hooks() -> tuple[int, int, int]:
    from torch.nn.modules import module as mm
    from torch.optim import optimizer as oo
    return len(mm._global_forward_pre_hooks), len(mm._global_forward_hooks), len(oo._global_optimizer_pre_hooks)


def test_module_hooks_leave_once_the_loop_came_round_and_all_hooks_on_close(tmp_path):
    base = _global_hooks()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aw = AutoWatch(str(tmp_path)).start()
    assert _global_hooks() == (base[0] + 1, base[1] + 1, base[2] + 1)
    for step in range(3):
        opt.zero_grad()
        model(torch.randn(5, 3)).pow(2).mean().backward()
        opt.step()
        if step == 0:    # one optimizer seen once: the loop may still hold another one
            assert _global_hooks()[0] == base[0] + 1
    assert _global_hooks() == (base[0], base[1], base[2] + 1)
    (path, mon), = aw.monitors
    assert mon.model is model and mon.optimizer is opt and path == tmp_path / "Sequential"
    aw.close()
    assert _global_hooks() == base
    assert list(gt.load(path).steps_recorded) == [0, 1, 2]


def test_find_root_prefers_the_model_the_optimizer_trains():
    enc, head = nn.Linear(4, 4), nn.Linear(4, 2)
    whole = nn.Sequential(enc, nn.ReLU(), head)
    # frozen parameters outside the optimizer do not narrow the root
    enc.requires_grad_(False)
    assert find_root([whole], torch.optim.SGD(head.parameters(), lr=0.1)) is whole
    # trainable ones (someone else's) do
    enc.requires_grad_(True)
    assert find_root([whole], torch.optim.SGD(head.parameters(), lr=0.1)) is head
    assert find_root([nn.Linear(2, 2)], torch.optim.SGD(head.parameters(), lr=0.1)) is None


def test_cli_usage_errors(tmp_path):
    from gradtrace.cli import main
    assert main(["run"]) == 2
    assert main(["run", "--every", "0", "x.py"]) == 2
    assert main(["run", "--preset", "nope", "x.py"]) == 2
    assert main(["run", "-m", "no_such_module_xyz"]) == 2


LIT_PY = '''\
import sys, torch, lightning as L
from torch import nn

class Lit(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    def training_step(self, batch, i):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

torch.manual_seed(0)
ds = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randn(32, 1))
callbacks = []
if len(sys.argv) > 1:
    from gradtrace.integrations.lightning import GradTraceCallback
    callbacks = [GradTraceCallback(out=sys.argv[1], log_scalars=False)]
trainer = L.Trainer(max_steps=4, logger=False, enable_checkpointing=False, callbacks=callbacks,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
trainer.fit(Lit(), torch.utils.data.DataLoader(ds, batch_size=8))
'''


def test_lightning_script_matches_the_explicit_callback_from_step_0(tmp_path, inproc):
    pytest.importorskip("lightning")
    _write(tmp_path, {"lit.py": LIT_PY})
    assert inproc("run", "--out", "runs/auto", "lit.py")[0] == 0
    _plain_script(tmp_path, "lit.py", "runs/explicit")
    a, e = gt.load(tmp_path / "runs/auto/Lit"), gt.load(tmp_path / "runs/explicit")
    drop = lambda r: {k: v for k, v in r.items() if k != "time"}   # noqa: E731
    # Lightning steps inside optimizer.step(closure): attached before step 0's closure,
    # the callback records step 0 whole, with the right step's gradients
    assert [drop(r) for r in a.records] == [drop(r) for r in e.records]
    assert len(a.records) == 4 and "loss" in a.records[0]["scalars"]


HF_PY = '''\
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
torch.manual_seed(0)
cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=40, n_positions=8, bos_token_id=0, eos_token_id=0)
model = GPT2LMHeadModel(cfg)
ids = torch.randint(0, 40, (12, 8))
args = TrainingArguments(output_dir="hf_out", per_device_train_batch_size=4, max_steps=3,
                         report_to=[], logging_steps=1, save_strategy="no", use_cpu=True,
                         max_grad_norm=1e-3, disable_tqdm=True)
trainer = Trainer(model=model, args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids])
trainer.train()
json.dump(trainer.state.log_history, open("history.json", "w"))
'''


def test_transformers_trainer_script_records_pre_clip_norms(tmp_path, inproc):
    pytest.importorskip("transformers")
    _write(tmp_path, {"hf.py": HF_PY})
    assert inproc("run", "--out", "runs/hf", "hf.py")[0] == 0
    t = gt.load(tmp_path / "runs/hf/GPT2LMHeadModel")
    assert list(t.steps_recorded) == [0, 1, 2]
    # the Trainer's own pre-clip norm (clip_grad_norm_'s return value) is the reference;
    # step 0 is read at the optimizer step, after the Trainer clipped (see autowatch)
    ref = [h["grad_norm"] for h in json.loads((tmp_path / "history.json").read_text()) if "grad_norm" in h]
    got = t.series("total_grad_norm")
    assert len(ref) == 3 and all(r > 1e-3 for r in ref)
    assert got[1:] == pytest.approx(ref[1:], rel=1e-5)
    assert got[0] == pytest.approx(1e-3, rel=1e-2)        # step 0: the clipped norm (documented)


DDP_PY = '''\
import torch, torch.distributed as dist
from torch import nn
dist.init_process_group("gloo")
rank = dist.get_rank()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(torch.log(torch.relu(self.body(x))))  # LOG


torch.manual_seed(0)
model = nn.parallel.DistributedDataParallel(Net())
opt = torch.optim.SGD(model.parameters(), lr=0.1)
g = torch.Generator().manual_seed(1 + rank)
for step in range(3):
    opt.zero_grad()
    model(torch.randn(4, 4, generator=g)).pow(2).mean().backward()
    opt.step()
open(f"done{rank}.txt", "w").write("ok")
dist.destroy_process_group()
'''


@pytest.mark.slow          # two fresh interpreters with gloo: ~10-25 s
def test_torchrun_two_ranks_one_trace_by_rank_0(tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    _write(tmp_path, {"ddp.py": DDP_PY})
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", str(port), "-m", "gradtrace", "run", "--out", "runs/ddp", "ddp.py"],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "done0.txt").is_file() and (tmp_path / "done1.txt").is_file()
    assert r.stderr.count("gradtrace doctor ·") == 1          # the summary: rank 0 only
    traces = [p.name for p in (tmp_path / "runs/ddp").iterdir() if p.is_dir()]
    assert traces == ["Net"]                                   # named after the user's module
    t = gt.load(tmp_path / "runs/ddp/Net")
    assert list(t.steps_recorded) == [0, 1, 2] and t.params[0] == "body.0.weight"
    # log(relu(.)) of rank 0's batch: its step-0 bundle holds the module inside DDP
    bundle = next((tmp_path / "runs/ddp").rglob("flight-*.pt"))
    assert [(e["path"], e["bytes"]) for e in t.events("flight_bundle")] == [(str(bundle.relative_to(tmp_path)), bundle.stat().st_size)]
    b = flight.load_bundle(bundle)
    assert b["step"] == 0 and next(iter(b["model_state"])) == "body.0.weight"
    r = gt.replay(tmp_path / "runs/ddp")
    line = next(i for i, t in enumerate(DDP_PY.splitlines(), 1) if "# LOG" in t)
    assert (r.phase, r.origin.op, r.origin.location[1]) == ("forward", "torch.log", line)


MAIN_PY = '''\
import torch
from torch import nn

EPS = 0.0
open("ran.txt", "a").write("x")          # training-side code: replay must not run it again


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return torch.sqrt(self.fc(x).abs() * self.scale + EPS).sum()  # SQRT


torch.manual_seed(0)
model = Scaled()
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x = torch.randn(4, 3)
for step in range(4):
    if step == 2:
        x[1] = 0.0
        with torch.no_grad():
            model.fc.bias.zero_()
    opt.zero_grad()
    model(x).backward()
    opt.step()
'''


def test_classes_of_the_script_itself_and_a_later_step(tmp_path, inproc):
    _write(tmp_path, {"main.py": MAIN_PY})
    assert inproc("run", "--out", "runs/m", "main.py")[0] == 0
    bundles = [p.name for p in (tmp_path / "runs/m").rglob("flight-*.pt")]
    assert bundles == ["flight-2.pt"]            # written by the monitor's own recorder
    code, out, err = inproc("replay", "runs/m")
    line = next(i for i, t in enumerate(MAIN_PY.splitlines(), 1) if "# SQRT" in t)
    assert code == 3, err
    assert out.splitlines()[1].startswith(f"backward of torch.sqrt at main.py:{line} in Scaled.forward")
    assert (tmp_path / "ran.txt").read_text() == "x"    # definitions only: no second training
