"""Clipping as torch does it (remedies.clip): equivalence, registry, no host syncs, DTensor."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from clip_models import (MODELS, REF_RTOL, RTOL, SEED, SyncCounter, _assert_grads_close,
                         _grads, _input, _make)
from gradtrace import norms as N
from gradtrace.remedies import clip as C
from gradtrace.remedies.adaptive import AutoClip, ZClip
from gradtrace.remedies.agc import adaptive_clip_grad_, agc_param_groups


# Start with no norm-registry listener (see conftest.py).
pytestmark = pytest.mark.usefixtures("no_norm_listeners")


# -------------------------------------------------------------- torch equivalence

def torch_grid(test):
    """Every model, norm type, dtype mix and foreach setting torch is compared on."""
    for argname, values in (("name", sorted(MODELS)), ("norm_type", [1.0, 2.0, math.inf]),
                            ("mixed", [False, True]), ("foreach", [None, False])):
        test = pytest.mark.parametrize(argname, values)(test)
    return test

@torch_grid
def test_clip_grad_norm_matches_torch(name, norm_type, mixed, foreach):
    ours, theirs = _make(name, mixed), _make(name, mixed)
    max_norm = 0.5
    t_ours = C.clip_grad_norm_(ours.parameters(), max_norm, norm_type, foreach=foreach)
    t_theirs = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm, norm_type,
                                              foreach=foreach)
    assert t_ours.dtype == t_theirs.dtype
    torch.testing.assert_close(t_ours, t_theirs, rtol=RTOL, atol=0.0)
    # bfloat16 grads are multiplied by a coefficient that may differ in its last bit
    rtol = 1e-2 if mixed else RTOL
    _assert_grads_close(_grads(ours), _grads(theirs), rtol=rtol)

def test_clip_grad_norm_no_clip_when_small_and_single_tensor():
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.full((5,), 0.01)
    before = p.grad.clone()
    total = C.clip_grad_norm_(p, max_norm=10.0)
    torch.testing.assert_close(total, torch.linalg.vector_norm(before), rtol=RTOL, atol=0)
    torch.testing.assert_close(p.grad, before, rtol=RTOL, atol=0)

def test_clip_grad_norm_empty_and_errors():
    assert float(C.clip_grad_norm_([], 1.0)) == 0.0
    with pytest.warns(UserWarning, match="empty generator"):
        C.clip_grad_norm_((p for p in []), 1.0)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, math.nan])
    with pytest.raises(RuntimeError, match="non-finite"):
        C.clip_grad_norm_([p], 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm"):
        C.clip_grad_norm_([p], -1.0)
    with pytest.raises(TypeError, match="norm_type"):
        C.clip_grad_norm_([p], 1.0, norm_type="two")
    with pytest.raises(TypeError, match="parameters"):
        C.clip_grad_norm_([1.0], 1.0)

@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("foreach", [None, False])
def test_clip_grad_value_matches_torch(name, mixed, foreach):
    ours, theirs = _make(name, mixed), _make(name, mixed)
    assert C.clip_grad_value_(ours.parameters(), 0.05, foreach=foreach) is None
    torch.nn.utils.clip_grad_value_(theirs.parameters(), 0.05, foreach=foreach)
    _assert_grads_close(_grads(ours), _grads(theirs), rtol=0.0)
    with pytest.raises(ValueError, match="clip_value"):
        C.clip_grad_value_(ours.parameters(), -1.0)

def _sparse_embedding():
    torch.manual_seed(SEED)
    emb = nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 1, 3, 7])).pow(2).sum().mul(5).backward()
    return emb

def test_sparse_gradients_norm_and_value():
    emb = _sparse_embedding()
    assert emb.weight.grad.is_sparse
    dense = emb.weight.grad.to_dense()
    total = C.clip_grad_norm_(emb.parameters(), 0.1)
    torch.testing.assert_close(total, torch.linalg.vector_norm(dense), rtol=RTOL, atol=0)
    expected = dense * min(1.0, 0.1 / (float(total) + C.CLIP_EPS))
    torch.testing.assert_close(emb.weight.grad.to_dense(), expected, rtol=RTOL, atol=0)

    emb = _sparse_embedding()
    dense = emb.weight.grad.to_dense()
    C.clip_grad_value_(emb.parameters(), 0.5)
    torch.testing.assert_close(emb.weight.grad.to_dense(), dense.clamp(-0.5, 0.5))

    emb = _sparse_embedding()
    norms, total = C.grad_norms([emb.weight.grad], norm_type=math.inf)
    assert float(total) == pytest.approx(float(emb.weight.grad.to_dense().abs().max()))

# ------------------------------------------------------------- the norm registry

def test_grad_norms_and_clip_with_norms():
    torch.manual_seed(SEED)
    grads = [torch.randn(3, 4), torch.randn(5).double(), torch.randn(2, 2)]
    norms, total = C.grad_norms(grads)
    assert len(norms) == 3 and all(n.ndim == 0 for n in norms)
    for g, n in zip(grads, norms):
        assert float(n) == pytest.approx(float(torch.linalg.vector_norm(g)), rel=REF_RTOL)
    expected_total = math.sqrt(sum(float(n) ** 2 for n in norms))
    assert float(total) == pytest.approx(expected_total, rel=REF_RTOL)
    before = [g.clone() for g in grads]
    coef = C.clip_with_norms_(grads, total, 1.0)
    assert float(coef) == pytest.approx(1.0 / (expected_total + 1e-6), rel=REF_RTOL)
    for g, b in zip(grads, before):
        torch.testing.assert_close(g, b * coef.to(g.dtype), rtol=RTOL, atol=0)
    assert C.grad_norms([])[0] == []

def test_registry_contract():
    model = _make("cnn")
    calls = []

    def obs(grads, norms, total, coef, norm_type):
        calls.append((grads, norms, total, coef, norm_type))

    grads_before = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    with N.register(obs):
        total = C.clip_grad_norm_(model.parameters(), 0.5)
    assert len(calls) == 1
    grads, norms, t, coef, norm_type = calls[0]
    live = [p.grad for p in model.parameters() if p.grad is not None]
    assert len(grads) == len(norms) == len(live)
    assert all(a is b for a, b in zip(grads, live))
    for n, g in zip(norms, grads_before):
        assert float(n) == pytest.approx(float(torch.linalg.vector_norm(g)), rel=REF_RTOL)
    assert t is total and norm_type == 2.0
    assert float(coef) == pytest.approx(0.5 / (float(total) + 1e-6), rel=REF_RTOL)
    C.clip_grad_norm_(model.parameters(), 0.5)
    assert len(calls) == 1  # removed

class NormCounter:
    """Counts norms taken of the watched gradients (foreach or one at a time)."""

    def __init__(self, monkeypatch, watched):
        self.calls = 0
        self.watched = {id(g) for g in watched}
        for mod, name in ((torch, "_foreach_norm"), (torch.linalg, "vector_norm"),
                          (torch, "stack")):
            monkeypatch.setattr(mod, name, self._wrap(getattr(mod, name)))

    def _wrap(self, real):
        def counted(x, *a, **k):
            xs = x if isinstance(x, (list, tuple)) else [x]
            self.calls += any(id(t) in self.watched for t in xs)
            return real(x, *a, **k)
        return counted

def test_clipper_reuses_a_listeners_norms_and_publishes_post_clip(monkeypatch):
    model = _make("mlp")
    params = list(model.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    with N.register(lambda *a: None):
        pre = N.grad_norms(grads)                   # what a monitor does at end of backward
        count = NormCounter(monkeypatch, grads)
        total = C.clip_grad_norm_(params, 0.5)      # reuses them: no gradient read
        post = N.grad_norms(grads)                  # the monitor at step time: no read either
        assert count.calls == 0
    want = math.sqrt(sum(float(n) ** 2 for n in pre))
    assert float(total) == pytest.approx(want, rel=REF_RTOL)
    for g, n in zip(grads, post):
        assert float(n) == pytest.approx(float(torch.linalg.vector_norm(g.double())), rel=REF_RTOL)

# ----------------------------------------------------------------------- host syncs

@pytest.mark.parametrize("listening", [False, True])
def test_no_host_syncs_on_hot_path(monkeypatch, listening):
    # On an accelerator nothing may read a value back. The CPU's own finite-safety check
    # reads two numbers (free there: CPU kernels are synchronous), so run the
    # accelerator path, float64 accumulation, on the CPU.
    monkeypatch.setattr(N, "HOST_READ_FREE", frozenset())
    model = _make("cnn")
    params = list(model.parameters())
    agc = agc_param_groups(model, exclude=("fc",))
    auto = AutoClip(10, history=16)
    zclip = ZClip(warmup=2)
    zclip(params)
    zclip(params)   # warm-up done; statistics initialised
    obs_calls = []
    handle = N.register(lambda *a: obs_calls.append(a)) if listening else None
    try:
        counter = SyncCounter(monkeypatch)
        C.clip_grad_norm_(params, 1.0)
        C.clip_grad_norm_(params, 1.0, norm_type=math.inf)
        C.clip_grad_value_(params, 0.1)
        C.clip_grads_with_norm_(params, 1.0, C.get_total_norm([p.grad for p in params
                                                               if p.grad is not None]))
        adaptive_clip_grad_(agc)
        adaptive_clip_grad_(model.parameters())
        for _ in range(3):
            auto(params)
            zclip(params)
        N.total_norm(N.grad_norms([p.grad for p in params if p.grad is not None]))
        syncs = counter.count
        C.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
        syncs_with_check = counter.count - syncs
    finally:
        if handle is not None:
            handle.remove()
    assert syncs == 0, counter.where
    float(torch.ones(()))  # the counter does see a sync
    assert counter.count == syncs + syncs_with_check + 1
    assert syncs_with_check >= 1  # the documented exception
    assert len(obs_calls) == (2 + 3 + 3 + 1 if listening else 0)

def test_cpu_finite_safety_reads_only_on_the_cpu(monkeypatch):
    grads = [torch.randn(32, 32), torch.randn(N.SMALL_NUMEL + 1)]   # the foreach route
    counter = SyncCounter(monkeypatch)
    N.grad_norms(grads)
    assert counter.count == 2            # lo and hi of one aminmax: the in-range case
    N.grad_norms([torch.randn(4, 4) for _ in range(N.STACK_MIN)])   # stacked: float64, no check
    assert counter.count == 2
    monkeypatch.setattr(N, "HOST_READ_FREE", frozenset())
    N.grad_norms(grads)
    assert counter.count == 2

# ------------------------------------------------------------ DTensor (FSDP2) gradients

@pytest.fixture
def one_rank_mesh(tmp_path):
    """A 1-rank gloo process group and device mesh, torn down afterwards."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group already up")
    from torch.distributed.device_mesh import init_device_mesh
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()

@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 0.0])
def test_dtensor_grads_full_norms_plain_total_and_torch_return(one_rank_mesh, norm_type):
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    torch.manual_seed(0)
    full = [torch.randn(5, 3), torch.randn(4), torch.zeros(2)]
    plain = [nn.Parameter(torch.zeros_like(g)) for g in full]
    for p, g in zip(plain, full):
        p.grad = g.clone()
    sharded = [nn.Parameter(distribute_tensor(torch.zeros_like(g), one_rank_mesh, [Shard(0)]))
               for g in full]
    for p, g in zip(sharded, full):
        p.grad = distribute_tensor(g.clone(), one_rank_mesh, [Shard(0)])
    want_norms, want_total = C.grad_norms([p.grad for p in plain], norm_type)
    norms, total = C.grad_norms([p.grad for p in sharded], norm_type)
    assert type(total) is torch.Tensor and all(type(n) is torch.Tensor for n in norms)
    torch.testing.assert_close(total, want_total)
    torch.testing.assert_close(torch.stack(norms), torch.stack(want_norms))

    ref = copy.deepcopy(sharded)
    got = C.clip_grad_norm_(sharded, 0.5, norm_type)
    exp = torch.nn.utils.clip_grad_norm_(ref, 0.5, norm_type)
    assert isinstance(got, DTensor) and isinstance(exp, DTensor)
    assert got.placements == (Replicate(),)
    if norm_type != math.inf:        # torch leaves an inf-norm total Partial(max): same value
        assert exp.placements == (Replicate(),)
    torch.testing.assert_close(got.full_tensor(), exp.full_tensor())
    for a, b in zip(sharded, ref):
        assert isinstance(a.grad, DTensor)
        torch.testing.assert_close(a.grad.full_tensor(), b.grad.full_tensor())
    # a DTensor total can be handed back to clip_with_norms_
    C.clip_with_norms_([p.grad for p in sharded], got, 0.25)

def test_dtensor_observers_get_plain_full_values(one_rank_mesh):
    from torch.distributed.tensor import Shard, distribute_tensor
    p = nn.Parameter(distribute_tensor(torch.zeros(4), one_rank_mesh, [Shard(0)]))
    p.grad = distribute_tensor(torch.full((4,), 2.0), one_rank_mesh, [Shard(0)])
    seen = []
    with N.register(lambda g, n, t, c, q: seen.append((n, t, c))):
        C.clip_grad_norm_([p], 1.0)
    (norms, total, coef), = seen
    assert type(total) is torch.Tensor and type(coef) is torch.Tensor
    assert float(total) == pytest.approx(4.0) and float(norms[0]) == pytest.approx(4.0)
    assert float(p.grad.full_tensor().norm()) == pytest.approx(1.0, rel=1e-5)

# ------------------------------------------------ torch's split API, messages, misuse

@torch_grid
def test_split_api_matches_torch(name, norm_type, mixed, foreach):
    ours, theirs = _make(name, mixed), _make(name, mixed)
    g_ours = [p.grad for p in ours.parameters() if p.grad is not None]
    g_theirs = [p.grad for p in theirs.parameters() if p.grad is not None]
    t_ours = C.get_total_norm(g_ours, norm_type, False, foreach)
    t_theirs = torch.nn.utils.get_total_norm(g_theirs, norm_type, False, foreach)
    assert t_ours.dtype == t_theirs.dtype
    torch.testing.assert_close(t_ours, t_theirs, rtol=RTOL, atol=0.0)
    # torch's clip_grads_with_norm_ takes parameters (or one tensor) and returns None
    assert C.clip_grads_with_norm_(ours.parameters(), 0.5, t_ours, foreach) is None
    torch.nn.utils.clip_grads_with_norm_(theirs.parameters(), 0.5, t_theirs, foreach)
    _assert_grads_close(_grads(ours), _grads(theirs), rtol=1e-2 if mixed else RTOL)

def test_split_api_single_tensor_and_empty():
    p = nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([3.0, 0.0, 4.0])
    total = C.get_total_norm(p.grad)
    torch.testing.assert_close(total, torch.nn.utils.get_total_norm(p.grad), rtol=RTOL, atol=0)
    C.clip_grads_with_norm_(p, 1.0, total)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.0, 0.8]), rtol=RTOL, atol=0)
    assert float(C.get_total_norm([])) == 0.0
    assert C.clip_grads_with_norm_([nn.Parameter(torch.zeros(2))], 1.0, total) is None

@pytest.mark.parametrize("norm_type", [2.0, math.inf, 1])
def test_nonfinite_message_is_torchs(norm_type):
    def make():
        p = nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([1.0, math.nan])
        return p
    with pytest.raises(RuntimeError) as theirs:
        torch.nn.utils.clip_grad_norm_([make()], 1.0, norm_type, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as ours:
        C.clip_grad_norm_([make()], 1.0, norm_type, error_if_nonfinite=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError) as split:
        C.get_total_norm([make().grad], norm_type, error_if_nonfinite=True)
    assert str(split.value) == str(theirs.value)

def test_a_module_instead_of_its_parameters_names_the_fix():
    model = _make("mlp")
    for call in (lambda: C.clip_grad_norm_(model, 1.0), lambda: C.clip_grad_value_(model, 1.0),
                 lambda: C.clip_grads_with_norm_(model, 1.0, torch.tensor(1.0)),
                 lambda: C.get_total_norm(model), lambda: AutoClip()(model),
                 lambda: ZClip()(model), lambda: C.clip_grad_norm_([model[0]], 1.0)):
        with pytest.raises(TypeError, match=r"model\.parameters\(\)"):
            call()
    with pytest.raises(TypeError, match=r"named_parameters\(\)"):
        adaptive_clip_grad_(model)

def test_moved_names_still_import_from_clip():
    assert C.AutoClip is AutoClip and C.adaptive_clip_grad_ is adaptive_clip_grad_
    with pytest.raises(AttributeError):
        C.no_such_name

@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_float16_gradients_match_torch(norm_type):
    def make():
        gen = torch.Generator().manual_seed(SEED)
        ps = [nn.Parameter(torch.zeros(s, dtype=torch.float16)) for s in ((5, 4), (7,))]
        for p in ps:
            p.grad = (torch.randn(p.shape, generator=gen) * 30).half()
        return ps
    ours, theirs = make(), make()
    t_ours = C.clip_grad_norm_(ours, 1.0, norm_type)
    t_theirs = torch.nn.utils.clip_grad_norm_(theirs, 1.0, norm_type)
    assert t_ours.dtype == t_theirs.dtype == torch.float16
    torch.testing.assert_close(t_ours, t_theirs, rtol=RTOL, atol=0.0)   # same rounding
    F16_RTOL = 1e-3   # the coefficient is multiplied into float16 values
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=F16_RTOL, atol=0.0)

def test_finite_gradients_clip_to_a_finite_total():
    # squares of 1e20 leave float32's range: torch's total reads inf and its coefficient
    # zeroes the gradients; the norm engine keeps the total finite and the clip correct
    p = nn.Parameter(torch.zeros(4))
    p.grad = torch.tensor([1e20, -1e20, 1e20, 3.0])
    want = float(torch.linalg.vector_norm(p.grad.double()))
    total = C.clip_grad_norm_([p], max_norm=2.0)
    assert total.dtype == torch.float32 and float(total) == pytest.approx(want, rel=RTOL)
    assert float(torch.linalg.vector_norm(p.grad.double())) == pytest.approx(2.0, rel=RTOL)
    tiny = [torch.full((9,), 1e-25)]
    assert float(C.get_total_norm(tiny)) == pytest.approx(3e-25, rel=RTOL)

def test_dtensor_norms_are_never_reused(one_rank_mesh):
    # reuse is per rank; a rank that skipped the all-reduce another rank runs would hang
    from torch.distributed.tensor import Shard, distribute_tensor
    g = distribute_tensor(torch.full((4,), 2.0), one_rank_mesh, [Shard(0)])
    with N.register(lambda *a: None):
        first = N.grad_norms([g])
        again = N.grad_norms([g])
        assert not any(N._cache.values())
    assert again[0] is not first[0] and float(again[0]) == pytest.approx(4.0)


def test_gradscaler_unscale_is_not_hidden_from_reuse():
    # unscale_ divides the gradients in place without bumping _version: a clip after it
    # must not reuse the scaled norms a monitor took at the end of backward
    original = torch._amp_foreach_non_finite_check_and_unscale_
    model = _make("mlp")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    model.zero_grad()
    with N.register(lambda *a: None):
        assert torch._amp_foreach_non_finite_check_and_unscale_ is not original
        scaler.scale(model(_input("mlp")).pow(2).sum()).backward()
        grads = [p.grad for p in model.parameters()]
        scaled = float(N.total_norm(N.grad_norms(grads)))        # remembered
        scaler.unscale_(opt)
        total = C.clip_grad_norm_(model.parameters(), 1e9)
    assert torch._amp_foreach_non_finite_check_and_unscale_ is original   # nothing stays patched
    want = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]))
    assert float(total) == pytest.approx(want, rel=RTOL)
    assert scaled == pytest.approx(1024.0 * want, rel=REF_RTOL)
