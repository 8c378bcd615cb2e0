"""gt.preflight on the architectures people train: transformers (torch and Hugging Face),
a ResNet with BatchNorm, an LSTM; block replay, AD fallbacks, attention saturation, LN layout.
(A little over 400 lines: every test here shares the model builders and the CASES table.)"""
from __future__ import annotations

import json
import math
import sys
import textwrap

import pytest
import torch
from torch import nn

import gradtrace as gt
from gradtrace.cli import main as cli
from gradtrace.preflight import PreflightThresholds, ad
from gradtrace.preflight.blocks import Capture, block_fn, default_blocks, model_kwargs
from gradtrace.preflight.transformer import SOFTMAX_SATURATED, AttentionEntropy, _row_entropy, find_branches
from gradtrace.record.selection import SATURATION_BOUNDS

ENTROPY_ATOL = 1e-5        # our attention entropy vs one computed from MHA's own weights
FD_RTOL = 1e-4             # finite-difference gain vs the exact gain (float64, central step)
HUTCH_RTOL = 0.2           # one Gaussian probe over ≥ 512 coordinates: ~6 % std, 3σ margin
REPLAY_ATOL = 1e-6         # a replayed block reproduces the output the model computed
PREFLIGHT_SIGMA_RTOL = 1e-3  # preflight's short Lanczos (12 steps) vs a full SVD: σ_max
PREFLIGHT_GAIN_RTOL = 0.05   # 4 Hutchinson probes over 1024 coordinates vs the exact gain
GRAD_RTOL = 1e-4             # float32 parameter gradients, same graph, summed in another order
JAC_ATOL = 1e-9              # the softmax Jacobian norm in float64 vs an explicit Jacobian


def encoder(norm_first: bool, layers: int = 3, d: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def gpt2():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                            n_positions=32, bos_token_id=0, eos_token_id=0))


def bert():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tf.BertModel(tf.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=64, max_position_embeddings=32))


def llama():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, vocab_size=64,
                                              max_position_embeddings=32, bos_token_id=0, eos_token_id=0))


class _Res(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.b2(self.c2(torch.relu(self.b1(self.c1(x))))))


class ResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.layers = nn.Sequential(*[_Res(4) for _ in range(3)])
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean((2, 3)))


class LSTMNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(40, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
        self.head = nn.Linear(16, 40)

    def forward(self, x):
        return self.head(self.lstm(self.emb(x))[0])


def tokens(n=2, t=8, vocab=64):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


CASES = {
    "encoder-pre-LN": (lambda: encoder(True), lambda: torch.randn(2, 8, 32), ["layers.0", "layers.1", "layers.2"]),
    "encoder-post-LN": (lambda: encoder(False), lambda: torch.randn(2, 8, 32), ["layers.0", "layers.1", "layers.2"]),
    "gpt2": (gpt2, tokens, ["transformer.h.0", "transformer.h.1"]),
    "bert": (bert, tokens, ["encoder.layer.0", "encoder.layer.1"]),
    "llama": (llama, tokens, ["model.layers.0", "model.layers.1"]),
    "resnet-bn": (ResNet, lambda: torch.randn(2, 3, 6, 6), ["layers.0", "layers.1", "layers.2"]),
    "lstm": (LSTMNet, lambda: tokens(vocab=40), ["emb", "lstm", "head"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_runs_on_real_architectures(name):
    make, inp, blocks = CASES[name]
    model = make()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sdpa = torch.nn.functional.scaled_dot_product_attention
    r = gt.preflight(model, inp(), n_samples=2)
    assert [row["block"] for row in r.summary["blocks"]] == blocks
    for row in r.summary["blocks"]:
        # every block is measured, or says why it was not
        assert ("jacobian_gain" in row and row["estimate"]) or row["not_measured"], row
        if "jacobian_gain" in row:
            assert math.isfinite(row["jacobian_gain"]) and row["jacobian_gain"] > 0
    json.dumps(r.to_dict())
    assert "block" in r.table()
    # left as found: mode, weights, hooks, global switches
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("make", [gpt2, llama, bert])
def test_token_models_start_end_to_end_at_first_block(make):
    model = make()
    r = gt.preflight(model, tokens(), n_samples=2)
    e = r.summary["end_to_end"]
    assert e["from"] == r.summary["blocks"][0]["block"]
    assert e["gain"] > 0
    # attention models get per-branch gains and the attention entropy
    row = r.summary["blocks"][0]
    assert {"attention_gain", "mlp_gain", "attention_entropy"} <= set(row)
    assert 0.5 < row["attention_entropy"] <= 1.0 + 1e-6


@pytest.mark.parametrize("make", [gpt2, llama])
def test_replayed_block_reproduces_the_real_call(make):
    """Captured args+kwargs (no cache) make the replay equal to what the model computed;
    replaying twice gives the same answer (no cache grows between calls)."""
    model = make().eval()
    groups = default_blocks(model)
    cap = Capture(model, groups)
    with torch.no_grad():
        model(tokens(), **model_kwargs(model))
    cap.close()
    for key in cap.order:
        f, x = block_fn(model, [key], *cap.inputs[key])
        want = cap.outputs[key][0] if isinstance(cap.outputs[key], tuple) else cap.outputs[key]
        with torch.no_grad():
            assert torch.allclose(f(x), want, atol=REPLAY_ATOL)
            assert torch.allclose(f(x), want, atol=REPLAY_ATOL)


class _NoForwardAD(torch.autograd.Function):
    """y = tanh(x) with a backward that is not itself differentiable and no jvp rule:
    forward mode and the double-backward trick both fail, finite differences remain."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.no_grad():
            d = (1 - torch.tanh(x) ** 2).detach()
        return (g * d).detach()


class _Opaque(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n, dtype=torch.float64)

    def forward(self, x):
        return _NoForwardAD.apply(self.lin(x))


def test_lstm_on_token_ids_end_to_end_starts_after_the_embedding():
    r = gt.preflight(LSTMNet(), tokens(vocab=40), n_samples=2)
    assert r.summary["end_to_end"]["from"] == "lstm"
    emb = r.summary["blocks"][0]
    assert emb["block"] == "emb" and "not floating point" in emb["not_measured"]
    assert r.summary["recurrent"][0]["layer"] == "lstm"


def test_finite_difference_fallback_is_named_and_accurate():
    torch.manual_seed(0)
    model = nn.Sequential(_Opaque(12), _Opaque(12))
    x = torch.randn(3, 12, dtype=torch.float64)
    spec = gt.spectrum(model, x, method="lanczos", n_probes=64, end_to_end=False, k=2)
    exact = gt.spectrum(model, x, method="full", end_to_end=False)
    for b in spec.blocks:
        assert spec.block(b).estimate == "finite-difference"
        assert exact.block(b).estimate == "reverse-mode"
        assert spec.block(b).sigma_max == pytest.approx(exact.block(b).sigma_max, rel=FD_RTOL)


def test_jvp_chain_names_each_estimate():
    x, v = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    want = (1 - torch.tanh(x) ** 2) * v
    used: set[str] = set()
    assert torch.allclose(ad.jvp(torch.tanh, x, v, used), want)
    assert used == {"forward-mode"}
    used.clear()
    got = ad.jvp(_NoForwardAD.apply, x, v, used)
    assert used == {"finite-difference"}
    assert torch.allclose(got, want, rtol=FD_RTOL, atol=FD_RTOL)
    assert ad.describe(used) == "finite-difference"


class _Flaky(nn.Module):
    """Works in the model's own forward, refuses to be called a second time."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if self.calls > 2:
            raise RuntimeError("this block cannot be replayed")
        return torch.tanh(self.lin(x))


def test_unmeasurable_block_is_a_row_with_the_reason():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _Flaky(), nn.Linear(8, 8))
    r = gt.preflight(model, torch.randn(4, 8))
    row = next(row for row in r.summary["blocks"] if row["block"] == "1")
    assert "cannot be replayed" in row["not_measured"]
    assert "not measured because" in r.table()


def test_attention_entropy_matches_reference():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True).eval()
    x = torch.randn(3, 7, 16)
    with AttentionEntropy({"l": layer}) as probe:
        layer(x)
    got = probe.summary()["l"]["attention_entropy"]
    _, w = layer.self_attn(x, x, x, need_weights=True, average_attn_weights=False)
    w = w.detach().double()
    h = -(w * w.log()).sum(-1) / math.log(7)
    assert got == pytest.approx(float(h.mean()), abs=ENTROPY_ATOL)
    # the softmax Jacobian of each row, built explicitly and differentiated by autograd
    rows = w.reshape(-1, 7)
    norms = torch.stack([torch.linalg.matrix_norm(torch.diag(p) - torch.outer(p, p)) for p in rows])
    z = rows.log()[0].clone()
    auto = torch.autograd.functional.jacobian(lambda v: torch.softmax(v, 0), z)
    assert torch.allclose(auto, torch.diag(rows[0]) - torch.outer(rows[0], rows[0]), atol=JAC_ATOL)
    s = probe.summary()["l"]
    assert s["attention_jacobian_norm"] == pytest.approx(float(norms.mean()), abs=ENTROPY_ATOL)
    assert s["attention_saturated_rows"] == pytest.approx(float((norms < SOFTMAX_SATURATED).double().mean()))


def test_two_key_softmax_saturates_at_the_recorder_sigmoid_bound():
    """With two keys the softmax is a sigmoid of the score difference: a row is saturated
    exactly where the recorder calls a sigmoid output saturated (beyond 0.015 / 0.985)."""
    lo, hi = SATURATION_BOUNDS["sigmoid"]
    for p_top, saturated in ((hi - 0.003, False), (hi + 0.003, True), (0.6, False)):
        s = math.log(p_top / (1 - p_top))          # score gap giving p_top on the second key
        q = torch.ones(1, 1, 1, 1)
        k = torch.tensor([0.0, s], dtype=torch.float64).reshape(1, 1, 2, 1)
        _, jac = _row_entropy(q, k, None, False, 1.0, False)
        assert float(jac) == pytest.approx(2 * p_top * (1 - p_top), rel=1e-9)
        assert bool(jac < SOFTMAX_SATURATED) == saturated


def test_saturated_attention_is_found():
    model = encoder(True, layers=2, d=32)
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.in_proj_weight[:64].mul_(30.0)  # queries and keys only
    r = gt.preflight(model, torch.randn(2, 16, 32), compute_spectrum=False)
    f = next(f for f in r if f.kind == "saturated_units")
    assert f.layers and all(v < 0.5 for v in f.evidence["attention_entropy"].values())
    assert all(v > PreflightThresholds().saturated_frac for v in f.evidence["attention_saturated_rows"].values())
    healthy = gt.preflight(encoder(True, layers=2, d=32), torch.randn(2, 16, 32), compute_spectrum=False)
    assert "saturated_units" not in [f.kind for f in healthy]
    # peaked but not one-hot (q/k ×4): low entropy, the softmax still passes gradient
    peaked = encoder(True, layers=2, d=32)
    with torch.no_grad():
        for layer in peaked.layers:
            layer.self_attn.in_proj_weight[:64].mul_(4.0)
    r = gt.preflight(peaked, torch.randn(2, 16, 32), compute_spectrum=False)
    assert min(row["attention_entropy"] for row in r.summary["blocks"]) < 0.5
    assert "saturated_units" not in [f.kind for f in r]


def test_branch_gain_matches_exact_jacobian():
    """The signal pass's MLP-branch gain (one Gaussian probe) vs trace(JᵀJ)/n from the
    full Jacobian of the branch (`_ff_block`) at the same input."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.Sequential(layer, nn.Linear(16, 16))
    x = torch.randn(4, 8, 16)
    r = gt.preflight(model, x, blocks=["0", "1"], compute_spectrum=False)
    got = r.summary["blocks"][0]["mlp_gain"]
    z = layer.norm2(x + layer._sa_block(layer.norm1(x), None, None)).detach()
    J = torch.autograd.functional.jacobian(layer._ff_block, z)  # (4,8,16,4,8,16)
    exact = float((J.double() ** 2).sum()) / z.numel()
    assert got == pytest.approx(exact, rel=HUTCH_RTOL)


def test_preflight_matrix_free_settings_match_full_svd():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(64, 4, 256, dropout=0.0, batch_first=True, norm_first=True)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    r = gt.preflight(model, x, n_samples=2, compute_spectrum=True)
    assert r.spectrum.method("layers.0") == "lanczos"  # 1024 coordinates > PREFLIGHT_FULL_MAX
    full = gt.spectrum(model, x, blocks=["layers.0"], method="full", end_to_end=False, n_samples=2)
    assert r.spectrum.block("layers.0").sigma_max == pytest.approx(full.block("layers.0").sigma_max,
                                                                   rel=PREFLIGHT_SIGMA_RTOL)
    assert r.spectrum.gain("layers.0") == pytest.approx(full.gain("layers.0"), rel=PREFLIGHT_GAIN_RTOL)


def test_find_branches_of_hf_blocks():
    g = gpt2()
    assert find_branches(g.transformer.h[0]) == {"attention": ("attn", "attn"), "mlp": ("mlp", "mlp")}
    b = bert()
    assert find_branches(b.encoder.layer[0]) == {"attention": ("attention.self", "attention.self"),
                                                 "mlp": ("intermediate", "output.dense")}


def _stack(norm_first: bool, layers: int, seed: int = 1, d: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=norm_first)
    return nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False), nn.Linear(d, 10))


def test_post_ln_block_gain_matches_autograd_and_is_judged_both_ways():
    """The per-block growth of the parameter gradients vs one computed with loss.backward(),
    and the Xiong check firing exactly when it exceeds the threshold."""
    L = 12
    model, blocks = _stack(False, L), [f"0.layers.{i}" for i in range(L)]
    x = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(1))

    def loss_fn(out):
        return out.pow(2).mean()
    r = gt.preflight(model, x, loss_fn, blocks=blocks, compute_spectrum=False)
    tr = r.summary["transformer"]
    assert tr["layout"] == "post-LN"
    model.zero_grad()
    loss_fn(model(x)).backward()
    g = [math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in layer.parameters()))
         for layer in model[0].layers]
    med = sorted(g)[L // 2 - 1: L // 2 + 1]
    ref = (g[-1] / (sum(med) / 2)) ** (2 / (L - 1))
    assert tr["block_gain"] == pytest.approx(ref, rel=GRAD_RTOL)
    model.zero_grad()
    for th, fires in ((ref * 1.01, False), (ref * 0.99, True)):
        got = gt.preflight(model, x, loss_fn, blocks=blocks, compute_spectrum=False,
                           thresholds=PreflightThresholds(post_ln_block_gain=th))
        f = [f for f in got if f.kind == "vanishing_gradients"]
        assert bool(f) == fires, (th, ref)
        if fires:
            assert f[0].evidence["layout"] == "post-LN" and f[0].severity == "warning"
            assert any("norm_first=True" in fx.code for fx in f[0].fixes)
            assert any("LinearLR" in fx.code for fx in f[0].fixes)


def test_post_ln_check_default_threshold():
    """Default (1 / diagnosis's vanish_gain per block): a deep post-LN stack whose last
    blocks get 1.29× more gradient per block fires; its pre-LN twin (level gradients, as
    Xiong et al. predict) and a 6-layer post-LN stack with a mild last-block bump do not."""
    x = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(1))
    post = gt.preflight(_stack(False, 12), x, blocks=[f"0.layers.{i}" for i in range(12)],
                        compute_spectrum=False)
    assert post.summary["transformer"]["block_gain"] > PreflightThresholds().post_ln_block_gain
    assert "vanishing_gradients" in [f.kind for f in post]
    pre = gt.preflight(_stack(True, 12), x, blocks=[f"0.layers.{i}" for i in range(12)],
                       compute_spectrum=False)
    assert pre.summary["transformer"]["layout"] == "pre-LN"
    assert not [f for f in pre if f.kind == "vanishing_gradients"]
    mild = gt.preflight(_stack(False, 6, seed=0), x, blocks=[f"0.layers.{i}" for i in range(6)],
                        compute_spectrum=False)
    tr = mild.summary["transformer"]
    assert tr["output_over_median"] > 1.0 and tr["block_gain"] < PreflightThresholds().post_ln_block_gain
    assert not [f for f in mild if f.kind == "vanishing_gradients"]


@pytest.fixture
def hf_factory(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    (tmp_path / "pf_hf_models.py").write_text(textwrap.dedent("""
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        def tiny_gpt2():
            torch.manual_seed(0)
            return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                              n_positions=32, bos_token_id=0, eos_token_id=0))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "pf_hf_models"
    sys.modules.pop("pf_hf_models", None)


def test_cli_gpt2_token_ids(hf_factory, capsys):
    code = cli(["preflight", f"{hf_factory}:tiny_gpt2", "--input-shape", "2,16", "--dtype", "long", "--json"])
    assert code in (0, 3)
    out = json.loads(capsys.readouterr().out)
    assert [b["block"] for b in out["summary"]["blocks"]] == ["transformer.h.0", "transformer.h.1"]
    # longer than the position table: the user's input, one line, exit 2
    assert cli(["preflight", f"{hf_factory}:tiny_gpt2", "--input-shape", "2,64", "--dtype", "long"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
