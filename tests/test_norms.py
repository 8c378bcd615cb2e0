"""The norm engine (gradtrace.norms): values against float64 references, range, sharing."""
from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
import torch.nn as nn

from gradtrace import norms as N

RTOL = 1e-6          # float32 norm against a float64 reference
RTOL_F16 = 1e-3      # half-precision inputs, float32 accumulation


def ref_norm(t: torch.Tensor, p: float) -> float:
    """Independent reference: float64 vector norm of the dense values."""
    d = t.to_dense() if t.layout != torch.strided else t
    return float(torch.linalg.vector_norm(d.double(), p))


def _mixed(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g), torch.randn(11, generator=g).double(),
            torch.randn(3, 4, generator=g).half(), torch.randn(6, generator=g).bfloat16(),
            torch.randn(2, 3, generator=g)]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf, 0.0])
@pytest.mark.parametrize("foreach", [None, False])
def test_values_match_float64_reference(p, foreach):
    ts = _mixed()
    got = N.grad_norms(ts, p, foreach=foreach)
    assert len(got) == len(ts)
    for t, n in zip(ts, got):
        assert n.dim() == 0 and n.device == t.device
        assert n.dtype == (torch.float64 if t.dtype == torch.float64 else torch.float32)
        tol = RTOL_F16 if t.dtype in (torch.float16, torch.bfloat16) else RTOL
        # reference of the values as stored (half inputs are already rounded)
        assert float(n) == pytest.approx(ref_norm(t, p), rel=tol)
    want = float(torch.linalg.vector_norm(torch.tensor([ref_norm(t, p) for t in ts],
                                                       dtype=torch.float64), p))
    total = N.total_norm(got, p)
    assert total.dtype == torch.float64          # one float64 input
    assert float(total) == pytest.approx(want, rel=RTOL_F16)


def test_sparse_gradients_use_stored_values():
    i = torch.tensor([[0, 2, 0], [1, 0, 1]])       # (0, 1) twice: uncoalesced, adds up
    coo = torch.sparse_coo_tensor(i, torch.tensor([3.0, -4.0, 1.0]), (3, 3))
    csr = torch.randn(4, 5, generator=torch.Generator().manual_seed(1)).relu().to_sparse_csr()
    for p in (1.0, 2.0, math.inf):
        got = N.grad_norms([coo, csr], p)
        assert float(got[0]) == pytest.approx(ref_norm(coo.coalesce(), p), rel=RTOL)
        assert float(got[1]) == pytest.approx(ref_norm(csr, p), rel=RTOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("path", ["cpu range check", "float64 (accelerators)"])
def test_finite_gradients_give_finite_norms(dtype, foreach, path, monkeypatch):
    if path != "cpu range check":
        monkeypatch.setattr(N, "HOST_READ_FREE", frozenset())
    big = torch.full((1000,), 1e20, dtype=dtype)        # squares overflow float32
    tiny = torch.full((1000,), 1e-25, dtype=dtype)       # squares underflow float32
    mixed = torch.tensor([1e20, 1e-25, 1.0], dtype=dtype)
    zero = torch.zeros(5, dtype=dtype)
    normal = torch.full((4,), 0.5, dtype=dtype)
    got = N.grad_norms([big, tiny, mixed, zero, normal], foreach=foreach)
    for t, n in zip([big, tiny, mixed, zero, normal], got):
        assert math.isfinite(float(n))
        assert float(n) == pytest.approx(ref_norm(t, 2.0), rel=RTOL, abs=0.0)
    total = N.total_norm(got)
    assert float(total) == pytest.approx(math.sqrt(ref_norm(big, 2) ** 2 + ref_norm(mixed, 2) ** 2),
                                         rel=RTOL)
    assert N.total_norm([torch.tensor(2e20), torch.tensor(2e20)]).isfinite()


def test_nonfinite_stays_nonfinite():
    got = N.grad_norms([torch.tensor([1.0, math.inf]), torch.tensor([math.nan, 1.0])])
    assert math.isinf(float(got[0])) and math.isnan(float(got[1]))
    assert math.isnan(float(N.total_norm(got)))


def test_meta_device_falls_back_and_foreach_true_raises():
    ts = [torch.empty(3, device="meta"), torch.empty(4, device="meta")]
    assert len(N.grad_norms(ts)) == 2                # no foreach kernels on meta: per tensor
    with pytest.raises(RuntimeError, match="foreach=True"):
        N.grad_norms(ts, foreach=True)


def test_bad_input_names_the_fix():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"model\.parameters\(\)"):
        N.grad_norms(model)
    with pytest.raises(TypeError, match="tensors must contain Tensors"):
        N.grad_norms([1.0])
    with pytest.raises(TypeError, match="norm_type"):
        N.grad_norms([torch.ones(2)], "two")
    with pytest.raises(ValueError, match="nan"):
        N.grad_norms([torch.ones(2)], math.nan)
    assert N.grad_norms([]) == [] and float(N.total_norm([])) == 0.0


class _Counter:
    """Counts the engine's norm kernels (the foreach call and the per-tensor fallback)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = torch._foreach_norm

        def counted(*a, **k):
            self.calls += 1
            return real(*a, **k)
        monkeypatch.setattr(torch, "_foreach_norm", counted)


def test_norms_are_reused_while_someone_listens(monkeypatch):
    count = _Counter(monkeypatch)
    ts = [torch.randn(5, 5), torch.randn(3)]
    N.grad_norms(ts)
    N.grad_norms(ts)
    assert count.calls == 2                              # nobody listens: nothing kept
    with N.register(lambda *a: None):
        first = N.grad_norms(ts)
        again = N.grad_norms(list(reversed(ts)))
        assert count.calls == 3 and again[0] is first[1] and again[1] is first[0]
        assert N.grad_norms(ts, 1.0)[0] is not first[0]  # another norm type is another figure
        ts[0].mul_(3.0)                                   # in place: a new _version
        changed = N.grad_norms(ts)
        assert float(changed[0]) == pytest.approx(ref_norm(ts[0], 2), rel=RTOL)
        assert changed[1] is first[1]                     # only the changed one recomputed
        ts[1].data.mul_(2.0)                              # bypasses the version counter ...
        N.forget([ts[1]])                                 # ... so the writer says so
        assert float(N.grad_norms(ts)[1]) == pytest.approx(ref_norm(ts[1], 2), rel=RTOL)
    N.grad_norms(ts)
    assert not N._observers and not N._cache             # the last listener gone: cache dropped


def test_a_recycled_id_is_not_a_hit():
    t = torch.ones(4)
    with N.register(lambda *a: None):
        other = torch.ones(1)
        # an entry for t's id whose referent is another tensor with the same _version
        N._cache.setdefault(2.0, {})[id(t)] = (weakref.ref(other), t._version,
                                               [torch.tensor(123.0)], 0)
        assert float(N.grad_norms([t])[0]) == 2.0


def test_register_handles_and_weak_bound_methods():
    calls = []

    class Listener:
        def on(self, grads, norms, total, coef, p):
            calls.append((len(grads), float(total), None if coef is None else float(coef), p))

    lis = Listener()
    handle = N.register(lis.on)
    g = [torch.ones(4)]
    N.notify_clipped(g, N.grad_norms(g), torch.tensor(2.0), torch.tensor(0.5), 2.0)
    assert calls == [(1, 2.0, 0.5, 2.0)]
    ref = weakref.ref(lis)
    del lis
    gc.collect()
    assert ref() is None                                 # the registry did not keep it alive
    N.notify_clipped(g, N.grad_norms(g), torch.tensor(2.0), None, 2.0)
    assert len(calls) == 1 and not N._observers
    handle.remove()                                      # removing after it died is harmless
    plain = N.register(lambda *a: calls.append("x"))
    plain.remove()
    plain.remove()
    N.notify_clipped(g, N.grad_norms(g), torch.tensor(2.0), None, 2.0)
    assert calls[-1] != "x"
    with pytest.raises(TypeError, match="callable"):
        N.register(3)


def test_post_clip_norms_are_published(monkeypatch):
    torch.manual_seed(0)
    grads = [torch.randn(6, 6) * 10, torch.randn(6) * 10]
    count = _Counter(monkeypatch)
    with N.register(lambda *a: None):
        pre = N.grad_norms(grads)
        coef = torch.tensor(0.25)
        torch._foreach_mul_(grads, coef)
        N.notify_clipped(grads, pre, N.total_norm(pre), coef, 2.0)
        post = N.grad_norms(grads)
    assert count.calls == 1
    for g, n in zip(grads, post):
        assert float(n) == pytest.approx(ref_norm(g, 2), rel=RTOL)


def test_helpers():
    assert N.local(torch.ones(2)).shape == (2,) and not N.is_dtensor(torch.ones(2))
    ts = [torch.ones(1), torch.ones(1).double(), torch.ones(1).to_sparse(), torch.ones(2)]
    assert list(N.groups(ts).values()) == [[0, 3], [1]]
    with pytest.warns(UserWarning, match="empty generator"):
        assert N.tensor_list((t for t in []), "parameters") == []


def test_largest_float32_entries_still_give_a_finite_norm():
    big = torch.full((4,), 1e38)               # every square overflows float32; norm 2e38
    assert float(N.grad_norms([big])[0]) == pytest.approx(ref_norm(big, 2.0), rel=RTOL)
    # a norm above float32's largest value (here 9.5e39) has no float32 figure
    assert math.isinf(float(N.grad_norms([torch.full((1000,), 3e38)])[0]))
