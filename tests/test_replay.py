"""The flight-recorder bundle and ``gt.replay``: the first op that made a nan, told apart
by where it happened (forward, backward only, the optimizer step, an earlier update)."""
from __future__ import annotations

import copy
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.record import flight
from gradtrace.replay import replay


def _line(func, marker: str) -> int:
    src, start = inspect.getsourcelines(func)
    return start + next(i for i, t in enumerate(src) if marker in t)


class Exp16(nn.Module):
    """A float16 exp: overflows once its input passes ~11.1."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.exp(self.fc(x).half()).float()  # EXP


class Norms(nn.Module):
    """Row norms: sqrt is finite at 0, its gradient is not."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4, bias=False)

    def forward(self, x):
        return torch.sqrt(self.fc(x).pow(2).sum(-1))  # SQRT


class LogLayer(nn.Module):
    def forward(self, x):
        return torch.log(x)  # LOG


class Dropped(nn.Module):
    """log after dropout: which entries are 0 (and the scale of the rest) is the RNG's."""

    def __init__(self):
        super().__init__()
        self.fc, self.drop, self.log = nn.Linear(4, 8), nn.Dropout(0.5), LogLayer()

    def forward(self, x):
        return self.log(self.drop(torch.sigmoid(self.fc(x))))


def _train(model, opt, batches, out, on_step=None):
    with gt.watch(model, opt, out=str(out)) as mon:
        for step, x in enumerate(batches):
            opt.zero_grad()
            loss = model(x).float().pow(2).mean()
            loss.backward()
            mon.record_loss(loss)
            if on_step:
                on_step(step)
            opt.step()
    return mon


def test_float16_forward_overflow(tmp_path):
    torch.manual_seed(0)
    model = Exp16()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)     # lr 0: the inputs alone grow
    batches = [torch.randn(8, 4) * (1 + 3 * s) for s in range(6)]
    # the independent reference: the float16 input of exp at each step
    with torch.no_grad():
        pre = [model.fc(x).half() for x in batches]
    first = next(s for s, p in enumerate(pre) if not torch.isfinite(torch.exp(p)).all())
    _train(model, opt, batches, tmp_path / "t")
    bundles = list((tmp_path / "t").rglob("flight-*.pt"))
    assert [b.name for b in bundles] == [f"flight-{first}.pt"]
    r = replay(tmp_path / "t")
    assert (r.phase, r.step, r.origin.op, r.origin.aten) == ("forward", first, "torch.exp", "aten.exp.default")
    assert r.origin.location[1] == _line(Exp16.forward, "# EXP")
    assert r.origin.module == "(root) (Exp16)"
    assert r.origin.inputs[0]["max"] == float(pre[first].max())
    assert r.origin.inputs[0]["dtype"] == "float16" and r.origin.outputs[0]["inf"] > 0
    assert "float16 overflow" in r.cause
    assert r.headline.startswith(f"torch.exp at test_replay.py:{_line(Exp16.forward, '# EXP')} in Exp16.forward")


def test_backward_only_nan_names_the_forward_op(tmp_path):
    torch.manual_seed(0)
    model = Norms()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 4)
    x[3] = 0.0                                  # a zero row: norm 0, finite; its gradient inf
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()   # the forward alone is finite
    _train(model, opt, [x, x], tmp_path / "t")
    r = replay(tmp_path / "t")
    assert r.phase == "backward" and r.step == 0
    assert (r.origin.op, r.origin.node) == ("torch.sqrt", "SqrtBackward0")
    assert r.origin.location[1] == _line(Norms.forward, "# SQRT")
    assert r.origin.outputs[0]["inf"] + r.origin.outputs[0]["nan"] > 0
    assert "backward of torch.sqrt" in r.headline and "(SqrtBackward0:" in r.headline
    # the same with the real loss given
    r2 = replay(tmp_path / "t", loss=lambda out: out.float().pow(2).mean())
    assert r2.loss_source == "the loss factory" and r2.origin.node == "SqrtBackward0"


def _adam16():
    torch.manual_seed(0)
    model = nn.Linear(4, 1).half()
    x = torch.randn(8, 4).half()
    x[:, 0] = 0                                 # weight[0, 0] gets a gradient of exactly 0
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), x


def test_nan_made_by_the_optimizer_step(tmp_path):
    model, opt, x = _adam16()
    model(x).float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    cap = SimpleNamespace(args=(x,), kwargs={}, rng_state=flight.rng_state())
    path = flight.save_bundle(tmp_path, model=model, optimizer=opt, capture=cap, step=0,
                              reason="test")
    opt.step()
    assert not torch.isfinite(model.weight).all()       # the reference: the step made it
    r = replay(path, loss=lambda out: out.float().pow(2).mean())
    assert r.phase == "optimizer" and r.origin.aten == "aten.addcdiv_.default"
    assert all(i["nan"] == i["inf"] == 0 for i in r.origin.inputs)
    assert "eps=1e-08 rounds to 0 in float16" in r.cause
    assert r.headline.startswith("optimizer step: aten.addcdiv_.default")


def test_nan_from_an_earlier_update_is_named_as_such(tmp_path):
    model, opt, x = _adam16()
    _train(model, opt, [x, x, x], tmp_path / "t")     # recorder: bundle at step 1
    r = replay(tmp_path / "t")
    assert (r.phase, r.step) == ("before", 1)
    assert any(n.startswith("weight:") for n in r.nonfinite)
    assert "eps=1e-08 rounds to 0 in float16" in r.cause
    assert "previous optimizer update" in r.headline
    assert not any(n.startswith("optimizer state") for n in r.nonfinite)   # Adam's moments stay finite


def test_nonfinite_input_is_the_datas_and_torch_modules_are_named_by_module(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)                # 4 x 3e38 overflows float32 in the first Linear
    x = torch.randn(3, 4)
    for name, value, phase in (("inf", float("inf"), "input"), ("big", 3e38, "forward")):
        x[0, :] = value
        cap = SimpleNamespace(args=(x,), kwargs={}, rng_state=flight.rng_state())
        path = flight.save_bundle(tmp_path / name, model=model, optimizer=None, capture=cap,
                                  step=2, reason="t")
        r = replay(path)
        assert r.phase == phase, r
    assert r.nonfinite == [] and r.origin.module == "0 (Linear)"
    assert r.origin.location is None              # torch's own Linear: no user line to show
    assert r.headline.startswith("torch.nn.functional.linear in module 0 (Linear): inputs ")
    assert (r.origin.op, r.origin.aten) == ("torch.nn.functional.linear", "aten.addmm.default")
    assert max(i["max"] for i in r.origin.inputs) == float(torch.tensor(3e38))


def test_replay_restores_the_rng_of_the_step(tmp_path):
    torch.manual_seed(3)
    model = Dropped()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    seen = []
    model.log.register_forward_hook(lambda m, i, o: seen.append(i[0].detach().clone()))
    torch.manual_seed(11)                        # the dropout masks come from here
    _train(model, opt, [torch.randn(4, 4) for _ in range(3)], tmp_path / "t")
    r = replay(tmp_path / "t", factory=Dropped)
    ref = seen[r.step]
    assert r.origin.op == "torch.log" and r.origin.module == "log (LogLayer)"
    # the very input the training saw: same dropout mask, same scale
    assert r.origin.inputs[0]["max"] == float(ref.max())
    assert r.origin.inputs[0]["min"] == float(ref.min()) == 0.0
    assert r.origin.inputs[0]["shape"] == list(ref.shape)


def test_bundle_holds_the_step_before_the_update_and_is_bounded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(2):
        opt.zero_grad(); model(torch.randn(5, 3)).sum().backward(); opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 3)
    cap = SimpleNamespace(args=(x,), kwargs={}, rng_state=flight.rng_state(),
                          buffers={k: v for k, v in before.items() if "running" in k or "batches" in k})
    opt.zero_grad(); model(x).sum().backward()              # BN running stats move here
    p = flight.save_bundle(tmp_path, model=model, optimizer=opt, capture=cap, step=7, reason="r")
    assert flight.save_bundle(tmp_path, model=model, optimizer=opt, capture=cap, step=8, reason="r") is None
    b = flight.load_bundle(p)
    assert (b["step"], b["reason"]) == (7, "r") and torch.equal(b["args"][0], x)
    for k, v in before.items():     # parameters and buffers as that step's forward saw them
        assert torch.equal(b["model_state"][k], v), k
    assert not torch.equal(model.state_dict()["1.running_mean"], before["1.running_mean"])
    assert b["optimizer_params"] == [["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]]
    rebuilt = flight.unpickle_model(b["model_pickle"])
    rebuilt.load_state_dict(b["model_state"])
    assert [type(m).__name__ for m in rebuilt] == ["Linear", "BatchNorm1d", "Linear"]
    ref = copy.deepcopy(model)
    ref.load_state_dict(before)
    assert torch.equal(rebuilt.eval()(x), ref.eval()(x))    # running stats of before the step
    assert not torch.equal(model.eval()(x), ref(x))


def test_cli_replay_errors_are_one_line(tmp_path, capsys):
    from gradtrace.cli import main
    assert main(["replay", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no flight-recorder bundle" in err
    (tmp_path / "flight-0.pt").write_bytes(b"not a bundle")
    with pytest.raises(ValueError, match="not a gradtrace flight-recorder bundle"):
        flight.load_bundle(tmp_path / "flight-0.pt")
    assert main(["replay", str(tmp_path)]) == 2


class Masked(nn.Module):
    """Attention-style masking: -inf on purpose; a row with every key masked is the bug."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(4, 4)

    def forward(self, x, mask):
        scores = self.q(x) @ x.transpose(-1, -2)
        scores = scores.masked_fill(mask, float("-inf"))   # MASK
        return scores.softmax(-1)  # SOFTMAX


def test_a_chosen_minus_inf_mask_is_not_the_origin_the_all_masked_softmax_is(tmp_path):
    torch.manual_seed(0)
    model = Masked()
    x = torch.randn(3, 4)
    mask = torch.tensor([[False, True, True], [False, False, True], [False, False, False]])
    for name, m, phase in (("ok", mask, "none"), ("bad", mask | torch.tensor([True, False, False]), "forward")):
        cap = SimpleNamespace(args=(x, m), kwargs={}, rng_state=flight.rng_state())
        r = replay(flight.save_bundle(tmp_path / name, model=model, optimizer=None, capture=cap,
                                      step=0, reason="t"))
        assert r.phase == phase, r
    assert (r.origin.op, r.origin.location[1]) == ("Tensor.softmax", _line(Masked.forward, "# SOFTMAX"))
    assert r.origin.inputs[0]["inf"] == 3 + 2 + 1 and r.origin.outputs[0]["nan"] == 3


FACTORY_PY = '''\
import torch
from torch import nn


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = lambda t: torch.log(t)        # a lambda attribute: the model does not pickle

    def forward(self, x):
        return self.act(self.fc(x))


def build():
    return Odd()


def loss():
    return lambda out: out.sum()
'''


def test_factory_and_loss_from_the_command_line(tmp_path, monkeypatch, capsys):
    from gradtrace.cli import main
    (tmp_path / "oddmodels.py").write_text(FACTORY_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [str(tmp_path)] + __import__("sys").path)
    import oddmodels
    model = oddmodels.build()
    with torch.no_grad():                     # fc is the identity: log(-1) is the nan
        model.fc.weight.copy_(torch.eye(2))
        model.fc.bias.zero_()
    x = torch.tensor([[1.0, -1.0], [0.5, 0.25]])
    cap = SimpleNamespace(args=(x,), kwargs={}, rng_state=flight.rng_state())
    b = flight.save_bundle(tmp_path / "t", model=model, optimizer=None, capture=cap, step=0, reason="t")
    assert flight.load_bundle(b)["model_pickle"] is None
    assert main(["replay", "t"]) == 2
    assert "--factory" in capsys.readouterr().err
    assert main(["replay", "t", "--factory", "oddmodels:build", "--loss", "oddmodels:loss"]) == 3
    out = capsys.readouterr().out
    line = next(i for i, t in enumerate(FACTORY_PY.splitlines(), 1) if "self.act = lambda" in t)
    assert f"torch.log at oddmodels.py:{line} in Odd.__init__.<locals>.<lambda>: input min -1 max 1 → nan" in out
    assert "module: (root) (Odd)" in out
    __import__("sys").modules.pop("oddmodels", None)
