"""Labelled training scenarios: small seeded CPU runs with a known diagnosis.

Each builder trains a small model under ``gt.watch(..., out=None)`` for a few dozen steps
and returns the in-memory :class:`~gradtrace.trace.Trace`. :data:`SCENARIOS` lists them
with the findings a correct diagnosis must produce (kind -> most affected layer, or
``None`` where any layer is acceptable), the kinds that may legitimately appear as well
(true side effects of the same fault), and for non-finite runs the expected cause. The
detection benchmark (``bench/detection.py``), the tests and the demo reuse them.

Example:
    >>> from scenarios import SCENARIOS
    >>> sorted(SCENARIOS)[:2]
    ['backward_nan', 'cnn_batchnorm']
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from gradtrace import watch
from gradtrace.trace import Trace

__all__ = ["Scenario", "SCENARIOS", "run"]

SEED = 0
#: Optimizer steps of the recurrent scenarios (100 time steps each: the slow ones).
RNN_STEPS = 12
#: Input width, hidden width and classes of the MLP tasks (small: the suite runs on CPU).
D_IN, WIDTH, CLASSES, BATCH = 16, 32, 4, 64


@dataclass(frozen=True)
class Scenario:
    """A labelled run: how to build its trace and what a diagnosis must say.

    Example:
        >>> sc = SCENARIOS["inf_injection"]
        >>> sc.expected, sc.cause
        ({'nonfinite': '5', 'loss_nonfinite': None}, 'invalid_operation')
    """

    name: str
    build: Callable[[], Trace]
    expected: dict[str, str | None]
    allowed: tuple[str, ...] = ()
    cause: str | None = None
    description: str = ""
    fast: bool = True

    @property
    def healthy(self) -> bool:
        """A control: nothing expected and nothing allowed, so any finding is a false alarm."""
        return not self.expected and not self.allowed


# ---- helpers ---------------------------------------------------------------------------
def _teacher(seed: int):
    g = torch.Generator().manual_seed(seed + 1000)
    w = torch.randn(D_IN, CLASSES, generator=g)

    def batch(step: int):
        gb = torch.Generator().manual_seed(seed * 7919 + step)
        x = torch.randn(BATCH, D_IN, generator=gb)
        return x, (x @ w).argmax(1)
    return batch


def _mlp(depth: int, act: Callable[[], nn.Module], width: int = WIDTH) -> nn.Sequential:
    layers: list[nn.Module] = []
    d = D_IN
    for _ in range(depth - 1):
        layers += [nn.Linear(d, width), act()]
        d = width
    layers.append(nn.Linear(d, CLASSES))
    return nn.Sequential(*layers)


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def _kaiming(model: nn.Module, a: float = 0.0) -> nn.Module:
    """Kaiming-normal weights, zero biases (PyTorch's default Linear init is ~0.4x too
    small for ReLU and would make every deep scenario vanish a little)."""
    for lin in _linears(model):
        nn.init.kaiming_normal_(lin.weight, a=a, nonlinearity="leaky_relu" if a else "relu")
        nn.init.zeros_(lin.bias)
    return model


def _train(model: nn.Module, batch, *, steps: int = 40, lr: float = 0.05, opt: str = "sgd",
           activations_every: int = 2, time_gradients: bool = False,
           loss_fn: Callable | None = None, before_step: Callable | None = None) -> Trace:
    optimizer = (torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(model.parameters(), lr=lr))
    loss_fn = loss_fn or nn.functional.cross_entropy
    with watch(model, optimizer, out=None, activations_every=activations_every,
               time_gradients=time_gradients) as mon:
        for step in range(steps):
            if before_step is not None:
                before_step(model, step)
            x, y = batch(step)
            loss = loss_fn(model(x), y)
            mon.record_loss(loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return mon.trace


def _seeded(fn: Callable[[], Trace]) -> Callable[[], Trace]:
    def build() -> Trace:
        torch.manual_seed(SEED)
        return fn()
    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


# ---- scenarios ---------------------------------------------------------------------------
@_seeded
def deep_sigmoid_mlp() -> Trace:
    """12 Linear layers with sigmoid between them, PyTorch's default init."""
    return _train(_mlp(12, nn.Sigmoid), _teacher(1), lr=0.1)


@_seeded
def deep_tanh_small_init() -> Trace:
    """12 Linear layers with tanh, weights drawn at 0.3/sqrt(fan_in) (too small)."""
    model = _mlp(12, nn.Tanh)
    for lin in _linears(model):
        nn.init.normal_(lin.weight, std=0.3 / math.sqrt(lin.in_features))
        nn.init.zeros_(lin.bias)
    return _train(model, _teacher(2), lr=0.05)


def _relu30(init: str) -> Trace:
    model = _mlp(30, nn.ReLU)
    for lin in _linears(model):
        if init == "xavier":
            nn.init.xavier_normal_(lin.weight)
        else:
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        nn.init.zeros_(lin.bias)
    return _train(model, _teacher(3), lr=0.01)


@_seeded
def relu30_xavier() -> Trace:
    """30-layer ReLU MLP with Xavier init: each layer loses about 1/sqrt(2)."""
    return _relu30("xavier")


@_seeded
def relu30_kaiming() -> Trace:
    """The same 30-layer ReLU MLP with Kaiming init (healthy)."""
    return _relu30("kaiming")


@_seeded
def exploding_weights() -> Trace:
    """12-layer ReLU MLP with Kaiming weights scaled by 2: gradients grow ~2x per layer."""
    model = _mlp(12, nn.ReLU)
    for lin in _linears(model):
        nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
        lin.weight.data.mul_(2.0)
        nn.init.zeros_(lin.bias)
    return _train(model, _teacher(4), lr=1e-7)


@_seeded
def high_lr_nan() -> Trace:
    """6-layer leaky-ReLU regression MLP, SGD lr 0.2: the loss climbs for a few steps, then inf/nan."""
    model = _kaiming(_mlp(6, lambda: nn.LeakyReLU(0.1)), a=0.1)
    batch = _teacher(5)

    def reg_batch(step):
        x, y = batch(step)
        return x, x[:, :CLASSES] * 3.0

    return _train(model, reg_batch, lr=0.2, loss_fn=nn.functional.mse_loss, steps=30)


@_seeded
def dead_relu_bias() -> Trace:
    """5-layer ReLU MLP; Linear ``6`` gets a bias of -20 on 24 of its 32 units, killing
    those units of ReLU ``7``."""
    model = _kaiming(_mlp(6, nn.ReLU))
    with torch.no_grad():
        model[6].bias[:24] = -20.0
    return _train(model, _teacher(6), lr=0.05)


class InjectInf(nn.Module):
    """Identity until step ``at``, then writes ``inf`` into one entry of its output."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls - 1 >= self.at:
            x = x.clone()
            x[0, 0] = math.inf
        return x


@_seeded
def inf_injection() -> Trace:
    """A module at ``5`` injects inf from step 20 on (an invalid operation mid-network)."""
    model = _kaiming(_mlp(6, nn.ReLU))
    layers = list(model)
    layers.insert(5, InjectInf(at=20))
    return _train(nn.Sequential(*layers), _teacher(7), lr=0.05, steps=30)


class ZeroThenNormalize(nn.Module):
    """Normalises rows by their L2 norm; at step ``at`` its input is zeroed first, so the
    forward stays finite (0 / (0 + eps)) but sqrt's derivative at 0 makes the backward nan."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls - 1 == self.at:
            x = x * 0.0
        return x / (x.pow(2).sum(-1, keepdim=True).sqrt() + 1e-6)


@_seeded
def backward_nan() -> Trace:
    """nan born in the backward pass of ``5`` (after Linear ``4``) at step 13, a step without
    output-gradient flags: localised from the parameter gradients."""
    model = _kaiming(_mlp(6, nn.ReLU))
    layers = list(model)
    layers.insert(5, ZeroThenNormalize(at=13))
    return _train(nn.Sequential(*layers), _teacher(8), lr=0.05, steps=30, activations_every=5)


class MemoryTask(nn.Module):
    """Recurrent layer ``rnn`` over a sequence; the label depends on the first input only."""

    def __init__(self, cell: str, hidden: int = 24):
        super().__init__()
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = cls(4, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x):
        out = self.rnn(x)[0]
        return self.head(out[:, -1])


def _memory_batch(seed: int, T: int = 100):
    def batch(step: int):
        g = torch.Generator().manual_seed(seed * 7919 + step)
        x = torch.randn(32, T, 4, generator=g)
        return x, (x[:, 0, 0] > 0).long()
    return batch


def _rnn_scale(model: MemoryTask, scale: float) -> None:
    with torch.no_grad():
        w = model.rnn.weight_hh_l0
        q, _ = torch.linalg.qr(torch.randn(w.shape[0], w.shape[0]))
        w.copy_(scale * q)


@_seeded
def rnn_tanh_small() -> Trace:
    """tanh RNN over 100 steps, recurrent weights orthogonal x 0.5: memory fades. Adam moves
    the weights by ~40 % of their norm in these steps and the profile does not change."""
    model = MemoryTask("rnn")
    _rnn_scale(model, 0.5)
    return _train(model, _memory_batch(9), steps=RNN_STEPS, lr=0.01, opt="adam", activations_every=2,
                  time_gradients=True)


@_seeded
def rnn_tanh_large() -> Trace:
    """tanh RNN over 100 steps, recurrent weights orthogonal x 2, tiny learning rate (a larger one
    lets the huge gradients push the state into saturation within a few steps, where it vanishes)."""
    model = MemoryTask("rnn")
    _rnn_scale(model, 2.0)
    return _train(model, _memory_batch(9), steps=RNN_STEPS, lr=1e-7, activations_every=2, time_gradients=True)


@_seeded
def lstm_memory() -> Trace:
    """LSTM on the same 100-step memory task, forget-gate bias initialised to 5 (the cell
    keeps its memory: sigmoid(5) ~ 0.993 per step)."""
    model = MemoryTask("lstm")
    H = model.rnn.hidden_size
    with torch.no_grad():
        model.rnn.bias_ih_l0[H:2 * H] = 5.0
        model.rnn.bias_hh_l0[H:2 * H] = 0.0
    return _train(model, _memory_batch(9), steps=RNN_STEPS, lr=0.01, activations_every=2, time_gradients=True)


@_seeded
def lstm_default() -> Trace:
    """LSTM on the same task with PyTorch's default init: forget gates near sigmoid(0) = 0.5
    halve the memory every step, so 100 steps back the gradient is gone, and Adam moving the
    weights by ~40 % of their norm does not bring it back within these steps."""
    return _train(MemoryTask("lstm"), _memory_batch(9), steps=RNN_STEPS, lr=0.01, opt="adam",
                  activations_every=2, time_gradients=True)


class ResBlock(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(self.norm(x))))


@_seeded
def residual_layernorm_mlp() -> Trace:
    """Healthy: 12 pre-LN residual blocks."""
    model = nn.Sequential(nn.Linear(D_IN, WIDTH), *[ResBlock(WIDTH) for _ in range(12)],
                          nn.LayerNorm(WIDTH), nn.Linear(WIDTH, CLASSES))
    return _train(model, _teacher(10), lr=0.02)


class TinyTransformer(nn.Module):
    def __init__(self, d: int = 32, layers: int = 4, T: int = 12):
        super().__init__()
        self.embed = nn.Linear(D_IN, d)
        layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)
        self.T = T

    def forward(self, x):
        return self.head(self.norm(self.encoder(self.embed(x))).mean(1))


@_seeded
def pre_ln_transformer() -> Trace:
    """Healthy: 4 pre-LN transformer encoder layers (Adam)."""
    teacher = _teacher(11)

    def batch(step):
        x, y = teacher(step)
        g = torch.Generator().manual_seed(step)
        seq = x[:, None, :] + 0.5 * torch.randn(x.shape[0], 12, D_IN, generator=g)
        return seq, y
    return _train(TinyTransformer(), batch, lr=1e-3, opt="adam", steps=30)


@_seeded
def cnn_batchnorm() -> Trace:
    """Healthy: a small CNN with BatchNorm on 12x12 images."""
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(16, CLASSES))
    protos = torch.randn(CLASSES, 1, 12, 12, generator=torch.Generator().manual_seed(12))

    def batch(step):
        g = torch.Generator().manual_seed(12 * 7919 + step)
        y = torch.randint(0, CLASSES, (32,), generator=g)
        return protos[y] + 0.8 * torch.randn(32, 1, 12, 12, generator=g), y
    return _train(model, batch, lr=0.02, steps=30)


@_seeded
def saturated_sigmoid() -> Trace:
    """Sigmoid MLP whose Linear ``2`` has weights 30x too large: Sigmoid ``3`` saturates."""
    model = _mlp(4, nn.Sigmoid)
    with torch.no_grad():
        model[2].weight.mul_(30.0)
    return _train(model, _teacher(13), lr=0.05)


@_seeded
def loss_spike() -> Trace:
    """Healthy 4-layer ReLU MLP; at step 30 one batch arrives with inputs scaled by 30."""
    model = _kaiming(_mlp(4, nn.ReLU))
    teacher = _teacher(14)

    def batch(step):
        x, y = teacher(step)
        if step == 30:
            x = x * 30.0
            y = (y + 1) % CLASSES
        return x, y
    return _train(model, batch, lr=0.02, steps=40)


class HalfLogits(nn.Module):
    """``q @ k^T`` computed in float16 (what autocast does to a matmul): overflows past 65504."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return q.half() @ k.half().transpose(-2, -1)


class KeyScorer(nn.Module):
    """Scores of ``T`` keys for each of ``T`` queries, unscaled q.k in float16."""

    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.logits = nn.Linear(D_IN, d), nn.Linear(D_IN, d), HalfLogits()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.q(x), self.k(x)).float()


@_seeded
def fp16_logits_overflow() -> Trace:
    """Unscaled q.k scores computed in float16, trained on the raw score of the key a teacher
    picks (no softmax: nothing saturates, so nothing stops the growth). Adam at 0.1 grows
    q and k step by step until the scores pass float16's 65504 (inf at step 68)."""
    T = 8
    w = torch.randn(D_IN, generator=torch.Generator().manual_seed(15))

    def batch(step):
        x = torch.randn(BATCH, T, D_IN, generator=torch.Generator().manual_seed(15 * 7919 + step))
        return x, (x @ w).argmax(1)

    def raw_score(scores, y):
        return -scores.gather(2, y[:, None, None].expand(-1, T, 1)).mean()
    return _train(KeyScorer(), batch, lr=0.1, opt="adam", steps=75, loss_fn=raw_score)


SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario("deep_sigmoid_mlp", deep_sigmoid_mlp, {"vanishing_gradients": "0"},
             fast=False, description=deep_sigmoid_mlp.__doc__),
    Scenario("deep_tanh_small_init", deep_tanh_small_init,
             {"vanishing_gradients": "0", "shrinking_activations": None},
             description=deep_tanh_small_init.__doc__),
    Scenario("relu30_xavier", relu30_xavier,
             {"vanishing_gradients": "0", "shrinking_activations": None},
             allowed=("dead_units",), fast=False, description=relu30_xavier.__doc__),
    Scenario("relu30_kaiming", relu30_kaiming, {}, allowed=("dead_units",),
             fast=False, description=relu30_kaiming.__doc__ + " Plain deep ReLU stacks leave many units silent on "
             "every input (the representations of different inputs align with depth), so dead_units is "
             "a true, allowed finding here."),
    Scenario("exploding_weights", exploding_weights,
             {"exploding_gradients": "0", "growing_activations": "22"}, allowed=("dead_units",),
             description=exploding_weights.__doc__),
    Scenario("high_lr_nan", high_lr_nan, {"nonfinite": None, "loss_nonfinite": None},
             allowed=("exploding_gradients", "loss_spike", "growing_activations", "dead_units"),
             cause="divergence", description=high_lr_nan.__doc__),
    Scenario("dead_relu_bias", dead_relu_bias, {"dead_units": "7"}, description=dead_relu_bias.__doc__),
    Scenario("inf_injection", inf_injection, {"nonfinite": "5", "loss_nonfinite": None},
             cause="invalid_operation", description=inf_injection.__doc__),
    Scenario("backward_nan", backward_nan, {"nonfinite": "4", "loss_nonfinite": None}, cause="invalid_operation",
             description=backward_nan.__doc__),
    Scenario("rnn_tanh_small", rnn_tanh_small, {"vanishing_through_time": "rnn"},
             description=rnn_tanh_small.__doc__),
    Scenario("rnn_tanh_large", rnn_tanh_large, {"exploding_through_time": "rnn"},
             fast=False, description=rnn_tanh_large.__doc__),
    Scenario("lstm_memory", lstm_memory, {}, description=lstm_memory.__doc__),
    Scenario("lstm_default", lstm_default, {"vanishing_through_time": "rnn"}, description=lstm_default.__doc__),
    Scenario("residual_layernorm_mlp", residual_layernorm_mlp, {}, fast=False, description=residual_layernorm_mlp.__doc__),
    Scenario("pre_ln_transformer", pre_ln_transformer, {}, fast=False, description=pre_ln_transformer.__doc__),
    Scenario("cnn_batchnorm", cnn_batchnorm, {}, description=cnn_batchnorm.__doc__),
    Scenario("saturated_sigmoid", saturated_sigmoid, {"saturated_units": "3"},
             allowed=("vanishing_gradients",), description=saturated_sigmoid.__doc__),
    Scenario("loss_spike", loss_spike, {"loss_spike": None}, allowed=("exploding_gradients",),
             description=loss_spike.__doc__),
    Scenario("fp16_logits_overflow", fp16_logits_overflow, {"near_overflow": "logits", "nonfinite": "logits"},
             allowed=("exploding_gradients", "loss_nonfinite"), cause="overflow",
             description=fp16_logits_overflow.__doc__),
)}


def run(name: str) -> Trace:
    """Build one scenario's trace by name.

    Example:
        >>> len(run("dead_relu_bias")) > 0
        True
    """
    if name not in SCENARIOS:
        raise ValueError(f"name={name!r} is not a scenario; valid: {', '.join(SCENARIOS)}")
    return SCENARIOS[name].build()


@dataclass
class Outcome:
    """How a diagnosis of one scenario compares with its labels."""

    name: str
    expected: dict[str, str | None]
    found: dict[str, list[str]]
    hits: list[str] = field(default_factory=list)          # expected kinds found, right layer
    wrong_layer: list[str] = field(default_factory=list)   # expected kinds found, wrong first layer
    missed: list[str] = field(default_factory=list)        # expected kinds not found
    false_alarms: list[str] = field(default_factory=list)  # found, neither expected nor allowed
    cause_ok: bool | None = None                           # nonfinite cause as labelled

    @property
    def ok(self) -> bool:
        return not (self.wrong_layer or self.missed or self.false_alarms) and self.cause_ok is not False


def evaluate(scenario: Scenario, findings: list) -> Outcome:
    """Compare findings with a scenario's labels.

    Example:
        >>> s = SCENARIOS["dead_relu_bias"]
        >>> evaluate(s, gt.diagnose(s.build())).ok
        True
    """
    found = {f.kind: list(f.layers) for f in findings}
    out = Outcome(scenario.name, dict(scenario.expected), found)
    for kind, layer in scenario.expected.items():
        if kind not in found:
            out.missed.append(kind)
        elif layer is not None and (not found[kind] or found[kind][0] != layer):
            out.wrong_layer.append(kind)
        else:
            out.hits.append(kind)
    out.false_alarms = [k for k in found if k not in scenario.expected and k not in scenario.allowed]
    if scenario.cause is not None:
        nf = next((f for f in findings if f.kind == "nonfinite"), None)
        out.cause_ok = nf is not None and nf.evidence.get("cause") == scenario.cause
    return out
