"""Benchmark: does preflight's verdict at initialisation match what 200 steps of training did?

A grid of ≥ 24 configurations (MLPs on sklearn's bundled digits: depth × activation ×
init gain, with and without LayerNorm/residuals; small transformers on next-character
prediction over standard-library source text: pre-LN/post-LN × depth × init scale).
For each: ``gt.preflight`` at initialisation gives a verdict (healthy / vanishing /
exploding); then the model trains for 200 steps under ``gt.watch`` and ``gt.diagnose``
plus the loss say what actually happened. Prints one row per configuration, the
agreement rate and the confusion table (not a test).

Verdicts, fixed before running:
  preflight  exploding: exploding_gradients, growing_activations, nonfinite,
                        exploding_through_time;
             vanishing: vanishing_gradients, shrinking_activations, vanishing_through_time,
                        saturated_units;
             both present: the kind with an error severity wins, exploding on a tie.
  training   exploding: diagnose found exploding_gradients, nonfinite or loss_nonfinite,
                        or the final loss is not finite or rose by more than STALL_DROP;
             vanishing: diagnose found vanishing_gradients, or the loss (mean of the last
                        20 steps) fell by less than STALL_DROP of its first-20-step mean;
             else healthy.

For the transformers it also prints what training did to the attention: entropy and the
fraction of saturated softmax rows before/after, the query/key share of the attention
gradient at the first and last step, and the final loss beside the ×1 twin's.

``--ablation`` trains each transformer with only its query/key weights ×4 and with all
other weights ×4 (is the ×4 loss gap the saturated attention's?); ``--xiong`` prints the
post-LN check's statistics over 5 seeds (the noise band behind its threshold);
``--chaotic`` sweeps tanh MLPs past the edge of chaos (depth 8–20 × gain 2–4 × 2 seeds).

Run: python bench/preflight_grid.py [--steps 200] [--only mlp|transformer] [--ablation]
     [--xiong] [--chaotic]
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
import tempfile
import textwrap
import time
import warnings

import torch
from torch import nn

import gradtrace as gt
from gradtrace.preflight import PreflightThresholds

STALL_DROP = 0.10          # the loss must fall by at least 10 % to count as training
EXPLODING = {"exploding_gradients", "growing_activations", "nonfinite", "exploding_through_time"}
VANISHING = {"vanishing_gradients", "shrinking_activations", "vanishing_through_time", "saturated_units"}
TRAIN_EXPLODING = {"exploding_gradients", "nonfinite", "loss_nonfinite"}
TRAIN_VANISHING = {"vanishing_gradients"}
LABELS = ("healthy", "vanishing", "exploding")


# ----------------------------------------------------------------------------- models


class Residual(nn.Module):
    def __init__(self, width: int, act: type, norm: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width) if norm else nn.Identity()
        self.lin = nn.Linear(width, width)
        self.act = act()

    def forward(self, x):
        return x + self.act(self.lin(self.norm(x)))


def mlp(depth: int, act: type, gain: float, width: int = 64, norm: bool = False,
        residual: bool = False, seed: int = 0) -> nn.Module:
    """``gain`` multiplies the critical init (Kaiming for ReLU, Xavier-tanh for tanh,
    Xavier-sigmoid for sigmoid): 1 keeps the signal, below 1 shrinks it, above grows it."""
    torch.manual_seed(seed)
    base = {nn.ReLU: math.sqrt(2.0), nn.Tanh: 5 / 3, nn.Sigmoid: 1.0}[act]
    layers: list[nn.Module] = [nn.Linear(64, width), act()]
    for _ in range(depth - 2):
        if residual:
            layers.append(Residual(width, act, norm))
        else:
            layers += [nn.Linear(width, width)] + ([nn.LayerNorm(width)] if norm else []) + [act()]
    layers.append(nn.Linear(width, 10))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, gain * base / math.sqrt(m.in_features))
            nn.init.zeros_(m.bias)
    return net


class CharLM(nn.Module):
    def __init__(self, vocab: int, depth: int, norm_first: bool, scale: float, d: int = 32,
                 seq: int = 16, seed: int = 0, qk_scale: float | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, batch_first=True,
                                           norm_first=norm_first)
        self.body = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(seq), persistent=False)
        with torch.no_grad():
            for m in self.body.modules():
                if isinstance(m, nn.Linear):
                    m.weight.mul_(scale)
                if isinstance(m, nn.MultiheadAttention):
                    m.in_proj_weight[: 2 * d].mul_(scale if qk_scale is None else qk_scale)
                    m.in_proj_weight[2 * d:].mul_(scale)

    def forward(self, x):
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.head(self.body(h, mask=self.mask[: x.shape[1], : x.shape[1]], is_causal=True))


# ----------------------------------------------------------------------------- data


def digits(seed: int = 0):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-3)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)

    def batch(n: int = 64):
        i = torch.randint(0, len(x), (n,), generator=g)
        return x[i], y[i]
    return batch


def chars(seq: int = 16, seed: int = 0):
    text = "".join(inspect.getsource(m) for m in (textwrap, argparse, inspect))
    vocab = sorted(set(text))
    ids = torch.tensor([vocab.index(c) for c in text])
    g = torch.Generator().manual_seed(seed)

    def batch(n: int = 16):
        i = torch.randint(0, len(ids) - seq - 1, (n,), generator=g)
        w = torch.stack([ids[j: j + seq + 1] for j in i.tolist()])
        return w[:, :-1], w[:, 1:]
    return batch, len(vocab)


# ----------------------------------------------------------------------------- verdicts


def preflight_verdict(found) -> str:
    kinds = {f.kind: f.severity for f in found}
    exp = [s for k, s in kinds.items() if k in EXPLODING]
    van = [s for k, s in kinds.items() if k in VANISHING]
    if exp and van:
        return "vanishing" if "error" in van and "error" not in exp else "exploding"
    return "exploding" if exp else "vanishing" if van else "healthy"


def training_verdict(found, losses: list[float]) -> str:
    kinds = {f.kind for f in found}
    first = sum(losses[:20]) / 20
    last = sum(losses[-20:]) / 20
    if kinds & TRAIN_EXPLODING or not math.isfinite(last) or last > (1 + STALL_DROP) * first:
        return "exploding"
    if kinds & TRAIN_VANISHING or last > (1 - STALL_DROP) * first:
        return "vanishing"
    return "healthy"


def attention_stats(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Mean entropy and saturated-row fraction of a CharLM's attention on ``x``."""
    from gradtrace.preflight.transformer import AttentionEntropy

    with torch.no_grad(), AttentionEntropy({str(i): m for i, m in enumerate(model.body.layers)}) as p:
        model(x)
    s = list(p.summary().values())
    return (sum(v["attention_entropy"] for v in s) / len(s),
            sum(v["attention_saturated_rows"] for v in s) / len(s))


def qk_share(model: nn.Module) -> float:
    """‖∂L/∂(W_q, W_k)‖ / ‖∂L/∂W_v‖ over all attention layers (after a backward)."""
    qk = v = 0.0
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention) and m.in_proj_weight.grad is not None:
            d, g = m.embed_dim, m.in_proj_weight.grad
            qk += float(g[: 2 * d].pow(2).sum())
            v += float(g[2 * d:].pow(2).sum())
    return math.sqrt(qk / v) if v > 0 else float("nan")


def train(model: nn.Module, batch, loss_fn, steps: int, lr: float, adam: bool, out: str | None,
          shares: list[float] | None = None):
    opt = torch.optim.Adam(model.parameters(), lr) if adam else torch.optim.SGD(model.parameters(), lr, momentum=0.9)
    losses = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with (gt.watch(model, opt, out=out) if out else contextlib.nullcontext()) as mon:
            for step in range(steps):
                x, y = batch()
                opt.zero_grad()
                loss = loss_fn(model(x), y)
                loss.backward()
                if shares is not None and step in (0, steps - 1):
                    shares.append(qk_share(model))
                if mon is not None:
                    mon.record_loss(loss)
                opt.step()
                losses.append(float(loss.detach()))
        found = gt.diagnose(gt.load(out)) if out else []
    return found, losses


def configs(only: str | None):
    out = []
    if only in (None, "mlp"):
        for depth in (6, 20):
            for act in (nn.ReLU, nn.Tanh, nn.Sigmoid):
                for gain in (0.5, 1.0, 2.5):
                    out.append((f"mlp d={depth} {act.__name__.lower()} gain={gain}",
                                "mlp", dict(depth=depth, act=act, gain=gain)))
        for act, gain, norm, res in ((nn.ReLU, 0.5, False, True), (nn.Tanh, 2.5, True, False),
                                     (nn.Sigmoid, 1.0, True, False), (nn.ReLU, 2.5, True, True)):
            tag = "+".join(t for t, on in (("LN", norm), ("res", res)) if on)
            out.append((f"mlp d=20 {act.__name__.lower()} gain={gain} {tag}", "mlp",
                        dict(depth=20, act=act, gain=gain, norm=norm, residual=res)))
        # added with the chaotic-phase check (saturation predicted over the explosion), to
        # try it on configurations it was not derived from
        for depth, gain in ((12, 2.5), (20, 4.0)):
            out.append((f"mlp d={depth} tanh gain={gain}", "mlp", dict(depth=depth, act=nn.Tanh, gain=gain)))
    if only in (None, "transformer"):
        for norm_first in (True, False):
            for depth in (2, 6):
                for scale in (1.0, 4.0):
                    out.append((f"tf {'pre' if norm_first else 'post'}-LN L={depth} scale={scale}",
                                "tf", dict(depth=depth, norm_first=norm_first, scale=scale)))
    return out


def ablation(steps: int, vocab: int, batch) -> None:
    """Each transformer with only W_q, W_k ×4 and with every other weight ×4."""
    ce = nn.CrossEntropyLoss()
    x_eval = batch(32)[0]
    print(f"{'ablation (×4 on)':<34} {'H0':>5} {'H200':>5} {'sat0':>5} {'qk/v 0':>7} {'qk/v end':>8} "
          f"{'loss200':>7} {'vs ×1':>6}")
    for norm_first in (True, False):
        for depth in (2, 6):
            base = None
            for label, kw in (("none", dict(scale=1.0)), ("q,k only", dict(scale=1.0, qk_scale=4.0)),
                              ("all but q,k", dict(scale=4.0, qk_scale=1.0)), ("all", dict(scale=4.0))):
                model = CharLM(vocab, depth, norm_first, **kw)
                h0, s0 = attention_stats(model, x_eval)
                shares: list[float] = []
                _, losses = train(model, batch, lambda o, y: ce(o.reshape(-1, o.shape[-1]), y.reshape(-1)),
                                  steps, 3e-3, True, None, shares)
                h1, _ = attention_stats(model, x_eval)
                l1 = sum(losses[-20:]) / 20
                base = l1 if base is None else base
                name = f"tf {'pre' if norm_first else 'post'}-LN L={depth} {label}"
                print(f"{name:<34} {h0:>5.2f} {h1:>5.2f} {s0:>5.2f} {shares[0]:>7.3g} {shares[-1]:>8.3g} "
                      f"{l1:>7.3f} {l1 - base:>+6.2f}", flush=True)


def chaotic_sweep(steps: int) -> None:
    """Tanh MLPs past the edge of chaos: depth × gain × 2 seeds, preflight beside training."""
    ce = nn.CrossEntropyLoss()
    n = agree = finite = sat = 0
    print(f"{'tanh MLP':<24} {'grad ratio':>10} {'sat (MF)':>8} {'preflight':>9} {'training':>9} {'loss200':>7}  "
          "training findings")
    for depth in (8, 12, 16, 20):
        for gain in (2.0, 2.5, 3.0, 4.0):
            for seed in (0, 1):
                model, batch = mlp(depth, nn.Tanh, gain, seed=seed), digits(seed)
                pf = gt.preflight(model, batch()[0], compute_spectrum=False)
                with tempfile.TemporaryDirectory() as tmp:
                    found, losses = train(model, batch, ce, steps, 0.02, False, tmp)
                pv, tv = preflight_verdict(pf), training_verdict(found, losses)
                kinds = sorted({f.kind for f in found})
                n, agree = n + 1, agree + (pv == tv)
                finite += all(math.isfinite(v) for v in losses)
                sat += "saturated_units" in kinds
                name = f"d={depth} gain={gain} seed={seed}"
                print(f"{name:<24} {pf.summary['grad_ratio_first_last']:>10.3g} "
                      f"{pf.summary['mean_field']['saturated_fraction']:>8.2f} {pv:>9} {tv:>9} "
                      f"{sum(losses[-20:]) / 20:>7.3f}  {','.join(kinds)}", flush=True)
    print(f"agreement {agree}/{n}; loss finite throughout in {finite}/{n}; "
          f"the recorder found saturated_units in {sat}/{n}")


def xiong_band(seeds: int = 5) -> None:
    """The post-LN check's statistics over seeds (pre-LN: level gradients, Xiong et al.)."""
    print(f"{'stack (input 8×16×d, head Linear(d,10))':<42} {'last/median':>14} {'per-block growth':>17}")
    for d in (32, 64):
        for depth in (3, 6, 12):
            for norm_first in (True, False):
                ratio, growth = [], []
                for seed in range(seeds):
                    torch.manual_seed(seed)
                    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True,
                                                       norm_first=norm_first)
                    model = nn.Sequential(nn.TransformerEncoder(layer, depth, enable_nested_tensor=False),
                                          nn.Linear(d, 10))
                    x = torch.randn(8, 16, d, generator=torch.Generator().manual_seed(seed))
                    tr = gt.preflight(model, x, blocks=[f"0.layers.{i}" for i in range(depth)],
                                      compute_spectrum=False).summary["transformer"]
                    ratio.append(tr["output_over_median"])
                    growth.append(tr["block_gain"])
                name = f"d={d} L={depth} {'pre' if norm_first else 'post'}-LN"
                print(f"{name:<42} {min(ratio):>6.2f}–{max(ratio):<6.2f} {min(growth):>8.2f}–{max(growth):<6.2f}",
                      flush=True)
    print(f"threshold on per-block growth: {PreflightThresholds().post_ln_block_gain:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--only", choices=("mlp", "transformer"))
    ap.add_argument("--ablation", action="store_true", help="only the attention ablation")
    ap.add_argument("--xiong", action="store_true", help="only the post-LN statistics over seeds")
    ap.add_argument("--chaotic", action="store_true", help="only the chaotic-tanh sweep")
    a = ap.parse_args()
    torch.set_num_threads(1)
    ce = nn.CrossEntropyLoss()
    lm_batch, vocab = chars()
    if a.ablation or a.xiong or a.chaotic:
        if a.chaotic:
            chaotic_sweep(a.steps)
        if a.xiong:
            xiong_band()
        if a.ablation:
            ablation(a.steps, vocab, lm_batch)
        return
    x_eval = chars(seed=1)[0](32)[0]   # a fixed held-out batch for the attention figures
    rows, attn = [], []
    t0 = time.perf_counter()
    print(f"{'configuration':<34} {'preflight':>9} {'training':>9} {'loss0':>6} {'loss200':>7}  "
          f"{'preflight findings':<44} training findings")
    for name, fam, kw in configs(a.only):
        shares: list[float] | None = None
        if fam == "mlp":
            model, batch = mlp(**kw), digits()
            xb = batch()[0]
            loss_fn, lr, adam = ce, 0.02, False
        else:
            model, batch = CharLM(vocab, **kw), lm_batch
            xb = batch()[0]
            loss_fn = lambda out, y: ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))  # noqa: E731
            lr, adam, shares = 3e-3, True, []
            before = attention_stats(model, x_eval)
        pf = gt.preflight(model, xb)
        with tempfile.TemporaryDirectory() as tmp:
            found, losses = train(model, batch, loss_fn, a.steps, lr, adam, tmp, shares)
        pv, tv = preflight_verdict(pf), training_verdict(found, losses)
        rows.append((name, pv, tv))
        pk = ",".join(sorted({f"{f.kind}:{f.severity[0]}" for f in pf})) or "-"
        tk = ",".join(sorted({f.kind for f in found})) or "-"
        l0, l1 = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        if shares is not None:
            attn.append((name, kw, before, attention_stats(model, x_eval), shares, l1))
        mark = "" if pv == tv else "  <-- disagree"
        print(f"{name:<34} {pv:>9} {tv:>9} {l0:>6.3g} {l1:>7.3g}  {pk:<44} {tk}{mark}", flush=True)
    agree = sum(pv == tv for _, pv, tv in rows)
    print()
    print(f"{len(rows)} configurations, agreement {agree}/{len(rows)} = {agree / len(rows):.0%} "
          f"(target ≥ 90 %), {time.perf_counter() - t0:.0f} s")
    print()
    print("confusion (rows: preflight, columns: training)")
    print(f"{'':>10} " + " ".join(f"{c:>9}" for c in LABELS))
    for r in LABELS:
        print(f"{r:>10} " + " ".join(f"{sum(1 for _, pv, tv in rows if pv == r and tv == c):>9}" for c in LABELS))
    if attn:
        twin = {(kw["depth"], kw["norm_first"]): l1 for _, kw, _, _, _, l1 in attn if kw["scale"] == 1.0}
        print()
        print("what training did to the attention (entropy H and saturated softmax rows on a held-out batch;")
        print("qk/v: query/key over value share of the attention gradient at the first and last step)")
        print(f"{'configuration':<34} {'H0':>5} {'H200':>5} {'sat0':>5} {'sat200':>6} {'qk/v 0':>7} {'qk/v end':>8} "
              f"{'loss200':>7} {'vs ×1':>6}")
        for name, kw, (h0, s0), (h1, s1), sh, l1 in attn:
            d = l1 - twin.get((kw["depth"], kw["norm_first"]), float("nan"))
            print(f"{name:<34} {h0:>5.2f} {h1:>5.2f} {s0:>5.2f} {s1:>6.2f} {sh[0]:>7.3g} {sh[-1]:>8.3g} "
                  f"{l1:>7.3f} {d:>+6.2f}")


if __name__ == "__main__":
    main()
