"""The realistic suite's training runs: real model code on data that ships with a package.

Each run is a small, seeded CPU training loop on real model code (Hugging Face GPT-2 and
BERT from tiny local configs, ``nn.TransformerEncoder``, ``nn.LSTM``, a BatchNorm CNN) and
real data (sklearn's bundled digits and breast-cancer tables, byte-level text read from
the standard library's own sources and docs). Nothing is downloaded.

A run is written once and called twice: without a monitor (its plain cost) and under
``gt.watch`` (its trace), so the overhead is measured on exactly the same work.
:data:`RUNS` maps a name to a :class:`Run` saying whether it is healthy and, if not, which
finding kind must come first and which others are expected. ``bench/realistic.py`` prints
the table; ``tests/test_realistic.py`` runs a quick subset.
"""
from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


# ---- data ------------------------------------------------------------------------------------
def text_bytes(n: int = 200_000) -> torch.Tensor:
    """Bytes of standard-library Python source (real, varied, ships with Python)."""
    import argparse, collections, dataclasses, difflib, json, textwrap   # noqa: E401
    src = "".join(inspect.getsource(m) for m in (argparse, collections, dataclasses, difflib, json, textwrap))
    return torch.tensor(list(src.encode("utf-8")[:n]), dtype=torch.long)


def prose_bytes(n: int = 200_000) -> torch.Tensor:
    """Bytes of English prose: the interpreter's own help topics (``pydoc_data``)."""
    from pydoc_data.topics import topics
    txt = " ".join(topics[k] for k in sorted(topics))
    return torch.tensor(list(txt.encode("utf-8", "ignore")[:n]), dtype=torch.long)


def lm_batch(data: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, data.numel() - seq - 1, (batch,), generator=g)
    x = torch.stack([data[i:i + seq] for i in idx.tolist()])
    y = torch.stack([data[i + 1:i + seq + 1] for i in idx.tolist()])
    return x, y


def code_vs_prose(batch: int, seq: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte snippets labelled 0 (prose) or 1 (Python source)."""
    code, prose = cached("code"), cached("prose")
    y = torch.randint(0, 2, (batch,), generator=g)
    rows = []
    for lab in y.tolist():
        d = code if lab else prose
        i = int(torch.randint(0, d.numel() - seq, (1,), generator=g))
        rows.append(d[i:i + seq])
    return torch.stack(rows), y


_CACHE: dict[str, torch.Tensor] = {}


def cached(which: str) -> torch.Tensor:
    """The byte corpora, read once (``"code"`` or ``"prose"``)."""
    if which not in _CACHE:
        _CACHE[which] = text_bytes() if which == "code" else prose_bytes()
    return _CACHE[which]


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8), torch.tensor(d.target)


def breast_cancer() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_breast_cancer
    d = load_breast_cancer()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    return x, torch.tensor(d.target)


def minibatches(x: torch.Tensor, y: torch.Tensor, batch: int, g: torch.Generator):
    """An endless stream of shuffled epochs."""
    while True:
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - batch + 1, batch):
            j = perm[i:i + batch]
            yield x[j], y[j]


# ---- the loop --------------------------------------------------------------------------------
@dataclass
class Result:
    """What one call of a run returns."""

    trace: object | None
    losses: list[float]
    seconds: float


def loop(model: nn.Module, opt: torch.optim.Optimizer, steps: int, loss_at: Callable[[int], torch.Tensor],
         watch: dict | None, *, clip: float | None = None, lr_at: Callable[[int], float] | None = None,
         time_gradients: bool = False) -> Result:
    """Train ``steps`` steps; under ``gt.watch(**watch)`` unless ``watch`` is None."""
    losses: list[float] = []
    if watch is not None:
        import gradtrace as gt
    ctx = gt.watch(model, opt, time_gradients=time_gradients, **watch) if watch is not None else nullcontext()
    t0 = time.perf_counter()
    with ctx as mon:
        for step in range(steps):
            if lr_at is not None:
                for gr in opt.param_groups:
                    gr["lr"] = lr_at(step)
            loss = loss_at(step)
            if mon is not None:
                mon.record_loss(loss)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            losses.append(float(loss.detach()))
    secs = time.perf_counter() - t0
    return Result(mon.trace if mon is not None else None, losses, secs)


def warmup_cosine(base: float, warm: int, total: int) -> Callable[[int], float]:
    return lambda s: base * (s + 1) / warm if s < warm else base * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm)))


# ---- models ----------------------------------------------------------------------------------
def gpt2(n_layer: int = 2, dim: int = 64, ctx: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=256, n_positions=ctx, n_embd=dim, n_layer=n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def bert_classifier(n_layer: int = 2, dim: int = 64):
    from transformers import BertConfig, BertForSequenceClassification
    cfg = BertConfig(vocab_size=256, hidden_size=dim, num_hidden_layers=n_layer, num_attention_heads=4,
                     intermediate_size=4 * dim, max_position_embeddings=64, num_labels=2,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg)


class EncoderClassifier(nn.Module):
    """Byte embedding -> ``nn.TransformerEncoder`` -> mean pool -> linear."""

    def __init__(self, layers: int, dim: int = 64, norm_first: bool = True, classes: int = 2):
        super().__init__()
        self.emb = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(64, dim) * 0.02)
        block = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(self.emb(x) + self.pos[: x.shape[1]])
        return self.head(h.mean(1))


class CharLSTM(nn.Module):
    def __init__(self, hidden: int = 128, layers: int = 1):
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.lstm = nn.LSTM(32, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(x))[0])


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 16, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TanhRNN(nn.Module):
    def __init__(self, hidden: int = 32):
        super().__init__()
        self.emb = nn.Embedding(256, 16)
        self.rnn = nn.RNN(16, hidden, batch_first=True, nonlinearity="tanh")
        self.out = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.emb(x))[0][:, -1])


# ---- the runs --------------------------------------------------------------------------------
def _seed(s: int = 0) -> torch.Generator:
    torch.manual_seed(s)
    return torch.Generator().manual_seed(s)


def _xy_loss(model, it, loss_fn=F.cross_entropy):
    def f(step):
        xb, yb = next(it)
        return loss_fn(model(xb), yb)
    return f


def run_cnn_bn_digits(watch, steps=250):
    g = _seed()
    x, y = digits()
    model = SmallCNN()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    return loop(model, opt, steps, _xy_loss(model, minibatches(x, y, 32, g)), watch)


def run_mlp_bn_cancer(watch, steps=300):
    g = _seed()
    x, y = breast_cancer()
    model = nn.Sequential(nn.Linear(30, 64), nn.BatchNorm1d(64), nn.ReLU(),
                          nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return loop(model, opt, steps, _xy_loss(model, minibatches(x, y, 32, g)), watch)


def _gpt2_lm(watch, steps, lr, warm, dtype=torch.float32, eps=1e-8, layers=2):
    g = _seed()
    data = cached("code")
    model = gpt2(layers).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=eps, weight_decay=0.01)

    def loss_at(step):
        xb, yb = lm_batch(data, 8, 64, g)
        logits = model(xb).logits
        return F.cross_entropy(logits.float().reshape(-1, 256), yb.reshape(-1))
    lr_at = warmup_cosine(lr, warm, steps) if warm else None
    return loop(model, opt, steps, loss_at, watch, lr_at=lr_at)


def run_gpt2_healthy(watch, steps=120):
    return _gpt2_lm(watch, steps, 3e-3, warm=20)


def run_gpt2_lr_high(watch, steps=40):
    return _gpt2_lm(watch, steps, 0.3, warm=0)


def run_gpt2_fp16(watch, steps=10):
    return _gpt2_lm(watch, steps, 1e-3, warm=0, dtype=torch.float16, eps=1e-8)


def run_bert_healthy(watch, steps=120):
    g = _seed()
    model = bert_classifier()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_at(step):
        xb, yb = code_vs_prose(16, 32, g)
        return F.cross_entropy(model(input_ids=xb).logits, yb)
    return loop(model, opt, steps, loss_at, watch, lr_at=warmup_cosine(1e-3, 10, steps))


def run_lstm_clip(watch, steps=150):
    g = _seed()
    data = cached("code")
    model = CharLSTM()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(step):
        xb, yb = lm_batch(data, 16, 48, g)
        return F.cross_entropy(model(xb).reshape(-1, 256), yb.reshape(-1))
    return loop(model, opt, steps, loss_at, watch, clip=1.0)


def run_char_lstm_noclip(watch, steps=60):
    g = _seed()
    data = cached("code")
    model = CharLSTM()
    opt = torch.optim.SGD(model.parameters(), lr=20.0)

    def loss_at(step):
        xb, yb = lm_batch(data, 16, 48, g)
        return F.cross_entropy(model(xb).reshape(-1, 256), yb.reshape(-1))
    return loop(model, opt, steps, loss_at, watch)


def run_preln_transformer(watch, steps=120):
    g = _seed()
    model = EncoderClassifier(4, norm_first=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss_at(step):
        xb, yb = code_vs_prose(16, 32, g)
        return F.cross_entropy(model(xb), yb)
    return loop(model, opt, steps, loss_at, watch, lr_at=warmup_cosine(1e-3, 10, steps))


def run_postln_deep(watch, steps=60):
    g = _seed()
    model = EncoderClassifier(12, norm_first=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_at(step):
        xb, yb = code_vs_prose(16, 32, g)
        return F.cross_entropy(model(xb), yb)
    return loop(model, opt, steps, loss_at, watch)


def run_log_softmax_loss(watch, steps=320):
    g = _seed()
    x, y = digits()
    x = x.flatten(1) * 2.0
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    it = minibatches(x, y, 32, g)

    def loss_at(step):   # the hand-written loss: log of a probability that can underflow to 0
        xb, yb = next(it)
        p = torch.softmax(model(xb), dim=1)
        return -torch.log(p[torch.arange(len(yb)), yb]).mean()
    return loop(model, opt, steps, loss_at, watch)


def run_relu_bias_neg3(watch, steps=100):
    g = _seed()
    x, y = breast_cancer()
    layers = []
    for i in range(6):
        lin = nn.Linear(30 if i == 0 else 64, 64)
        nn.init.constant_(lin.bias, -3.0)
        layers += [lin, nn.ReLU()]
    model = nn.Sequential(*layers, nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return loop(model, opt, steps, _xy_loss(model, minibatches(x, y, 64, g)), watch)


def run_deep_sigmoid(watch, steps=150):
    g = _seed()
    x, y = digits()
    x = x.flatten(1)
    layers = []
    for i in range(16):
        layers += [nn.Linear(64, 64), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return loop(model, opt, steps, _xy_loss(model, minibatches(x, y, 64, g)), watch)


def run_long_tanh_rnn(watch, steps=100):
    g = _seed()
    model = TanhRNN()
    with torch.no_grad():   # small recurrent weights: the gradient shrinks at every time step
        model.rnn.weight_hh_l0.mul_(0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def loss_at(step):      # the label is decided by the first bytes of a long sequence
        xb, yb = code_vs_prose(16, 64, g)
        return F.cross_entropy(model(xb.flip(1)), yb)
    return loop(model, opt, steps, loss_at, watch, time_gradients=True)


def run_lr_ramp(watch, steps=120):
    g = _seed()
    x, y = breast_cancer()
    model = nn.Sequential(nn.Linear(30, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    # the rate grows by 8 % a step: fine for ~60 steps, past the edge of stability after
    return loop(model, opt, steps, _xy_loss(model, minibatches(x, y, 64, g)), watch,
                lr_at=lambda s: 1e-3 * 1.08 ** s)


def run_gpt2_lr_ramp(watch, steps=120):
    """GPT-2 under AdamW with a rate that grows 8 % a step from 1e-4 (a schedule bug, or a
    range test left running): the loss falls, bottoms out near lr 3e-2, then climbs for
    some ten steps before it blows up - the slow divergence past the edge of stability."""
    g = _seed()
    data = cached("code")
    model = gpt2(2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def loss_at(step):
        xb, yb = lm_batch(data, 8, 64, g)
        return F.cross_entropy(model(xb).logits.reshape(-1, 256), yb.reshape(-1))
    return loop(model, opt, steps, loss_at, watch, lr_at=lambda s: 1e-4 * 1.08 ** s)


def run_attn_logits(watch, steps=175, control=None):
    """Attention logits overflow float16: a 1-block byte LM (``bench/attn_overflow.py``)
    whose unscaled q.k product is computed in float16, Adam lr 0.1. The logits grow from
    ~10 to past 65504 (step 166) while the loss stays flat near 2.9, then softmax turns
    nan. ``control="scaled"`` / ``"qkln"``: the same run with 1/sqrt(d) scaling / qk-LayerNorm.
    (In float32 the same growth only stalls the loss: a 2-layer LM at AdamW 1e-2..3e-2
    reached logits of 1e4-1e5 and never diverged.)"""
    from attn_overflow import train
    return train(watch, steps, control=control)


def run_attn_scaled(watch, steps=175):
    """The attention-logit run with q.k divided by sqrt(head_dim): its logits grow too at
    Adam 0.1 (to ~1.7e4 by step 170, a quarter of float16's limit) but stay finite."""
    return run_attn_logits(watch, steps, control="scaled")


def run_attn_qkln(watch, steps=175):
    """The attention-logit run with qk-LayerNorm and 1/sqrt(head_dim): logits stay below ~25."""
    return run_attn_logits(watch, steps, control="qkln")


# ---- the catalogue ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """A labelled run. ``first``: the kind that must be the top finding (the root cause);
    ``expect``: kinds that must all be found; ``allowed``: side findings that are not
    false alarms. A healthy run expects nothing and allows nothing. ``slow``: a slow
    divergence (the first finding must come ``>= 3`` steps before the damage)."""

    name: str
    fn: Callable
    healthy: bool
    first: str | None = None
    expect: tuple[str, ...] = ()
    allowed: tuple[str, ...] = ()
    slow: bool = False
    quick: bool = False
    note: str = ""


RUNS: dict[str, Run] = {r.name: r for r in (
    Run("cnn_bn_digits", run_cnn_bn_digits, True, quick=True, note="BatchNorm CNN, batch 32, digits"),
    Run("mlp_bn_cancer", run_mlp_bn_cancer, True, quick=True, note="BatchNorm MLP, breast cancer"),
    Run("gpt2_warmup", run_gpt2_healthy, True, note="GPT-2 2x64, AdamW 3e-3 + warm-up, stdlib bytes"),
    Run("bert_cls", run_bert_healthy, True, note="BERT 2x64 classifier, code vs prose"),
    Run("lstm_clip", run_lstm_clip, True, note="char LSTM, Adam, clip 1.0"),
    Run("preln_encoder", run_preln_transformer, True, note="nn.TransformerEncoder norm_first, 4 layers"),
    Run("attn_fp16_scaled", run_attn_scaled, True, note="byte LM, float16 q.k / sqrt(d), Adam 0.1"),
    Run("attn_fp16_qkln", run_attn_qkln, True, note="byte LM, float16 q.k with qk-LayerNorm, Adam 0.1"),
    Run("gpt2_lr_high", run_gpt2_lr_high, False, "loss_spike", ("loss_spike",),
        ("exploding_gradients", "nonfinite", "loss_nonfinite", "growing_activations"), note="AdamW lr 0.3, no warm-up"),
    Run("gpt2_fp16_adamw", run_gpt2_fp16, False, "nonfinite", ("nonfinite",), ("loss_nonfinite",),
        quick=True, note="float16 weights, AdamW eps=1e-8"),
    # SGD lr 0.5 first diverges at once (loss 2.4 -> 17 by step 5, then recovers): that comes
    # first; the inf of step 299 must then be attributed to the loss (tests/test_realistic.py).
    Run("log_softmax_loss", run_log_softmax_loss, False, "loss_spike", ("nonfinite", "loss_nonfinite"),
        ("exploding_gradients", "dead_units"), note="-log(softmax) underflows"),
    Run("char_lstm_noclip", run_char_lstm_noclip, False, "exploding_gradients", ("exploding_gradients",),
        ("loss_spike", "nonfinite", "loss_nonfinite", "exploding_through_time"), note="SGD lr 20, no clipping"),
    Run("relu_bias_neg3", run_relu_bias_neg3, False, "dead_units", ("dead_units",),
        ("vanishing_gradients", "shrinking_activations"), quick=True, note="biases -3 kill the units"),
    Run("postln_deep", run_postln_deep, False, "vanishing_gradients", ("vanishing_gradients",),
        ("shrinking_activations",), note="12 post-LN blocks, no warm-up"),
    Run("deep_sigmoid", run_deep_sigmoid, False, "vanishing_gradients", ("vanishing_gradients",),
        ("saturated_units", "shrinking_activations"), quick=True, note="16 sigmoid layers"),
    Run("long_tanh_rnn", run_long_tanh_rnn, False, "vanishing_through_time", ("vanishing_through_time",),
        (), note="tanh RNN, 64 steps, W_hh x0.5"),
    Run("gpt2_lr_ramp", run_gpt2_lr_ramp, False, "loss_spike", ("loss_spike",), ("exploding_gradients",
        "nonfinite", "loss_nonfinite", "growing_activations"), slow=True, note="AdamW lr 1e-4 x1.08 per step"),
    # Meant as a slow divergence, measured as an abrupt one: the minibatch loss is noise
    # (0.005-0.49) up to step 109, then 0.92, 1.34 ... 8.0 at 114; no per-step figure and
    # no update ratio separates steps <= 108 from the healthy runs (stop-16 note), so it
    # is held to lead >= 0. The slow lr-ramp divergence is gpt2_lr_ramp (lead >= 3).
    Run("lr_ramp", run_lr_ramp, False, "loss_spike", (), ("loss_spike", "exploding_gradients", "nonfinite",
        "loss_nonfinite", "saturated_units"), note="SGD lr x1.08 per step; abrupt"),
    # The logits climb for ~150 steps while the loss stays flat near 2.9; the float16 headroom
    # rule names them at step 100 (40640, within 2x of 65504 and rising), the inf comes at 160
    # and the nan loss at 166 (activations every 10, the default).
    Run("attn_fp16_logits", run_attn_logits, False, "near_overflow", ("near_overflow", "nonfinite"),
        ("loss_nonfinite",), slow=True, note="byte LM, unscaled q.k in float16, Adam 0.1"),
)}
