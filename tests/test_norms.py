"""The norm engine (gradtrace.norms): values against float64 references, range, sharing."""
from __future__ import annotations

import gc
import math
import weakref

import numpy as np
import pytest
import torch
import torch.nn as nn

from gradtrace import norms as N

RTOL = 1e-6          # float32 norm against a float64 reference
RTOL_F16 = 1e-3      # half-precision inputs, float32 accumulation

# Start with no norm-registry listener (see conftest.py).
pytestmark = pytest.mark.usefixtures("no_norm_listeners")


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
    """Counts the engine's reads of tensors it was given: its foreach norm calls and its
    stacked route's copies (repeated small CPU shapes, ``torch.stack``), not the stacking
    of norms it computed."""

    def __init__(self, monkeypatch):
        self.calls = 0
        made: set[int] = set()           # ids of norms the engine computed (not inputs)
        for mod, name in ((torch, "_foreach_norm"), (torch, "stack")):
            real = getattr(mod, name)

            def counted(x, *a, _real=real, _name=name, **k):
                out = _real(x, *a, **k)
                if _name == "_foreach_norm":
                    made.update(map(id, out))
                if not all(id(t) in made for t in x):
                    self.calls += 1
                return out
            monkeypatch.setattr(mod, name, counted)


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


# ------------------------------------------------------------------ the vector entry point


def _count_wide(monkeypatch) -> list[int]:
    """Record how many tensors each float64-accumulated ``_foreach_norm`` call measures."""
    calls: list[int] = []
    real = torch._foreach_norm

    def spy(tensors, *args, **kwargs):
        if kwargs.get("dtype") == torch.float64:
            calls.append(len(tensors))
        return real(tensors, *args, **kwargs)
    monkeypatch.setattr(torch, "_foreach_norm", spy)
    return calls


@pytest.mark.parametrize("uniform", [False, True])
def test_norm_vector_matches_reference_and_grad_norms(uniform):
    from gradtrace.record.reduce import squared_norms
    g = torch.Generator().manual_seed(3)
    same = [torch.randn(9, 4, generator=g), torch.randn(4, generator=g) * 1e20,
            torch.randn(50, generator=g) * 1e-25, torch.zeros(3)]
    for p in (2.0, 1.0, 3.0, math.inf):
        v = N.norm_vector(same, p, uniform=uniform)
        assert v.shape == (len(same),) and v.dtype == torch.float32
        for t, n, m in zip(same, v.tolist(), N.grad_norms(same, p)):
            assert n == pytest.approx(ref_norm(t, p), rel=RTOL, abs=0.0)
            assert n == float(m)            # one engine: the same numbers both ways
    # The recorder's squares: a small shape repeated STACK_MIN times takes the float64
    # stack, so its 1e20 and 1e-25 tensors are near-exact as they come, zeros exactly 0;
    # the others (foreach) are range-checked and redone in float64 when float32 lost
    # them: finite either way.
    rows = [torch.randn(4, generator=g) * 1e20, torch.randn(4, generator=g) * 1e-25,
            torch.zeros(4)] + [torch.randn(4, generator=g) for _ in range(N.STACK_MIN - 3)]
    sq = squared_norms(rows, torch.device("cpu"), uniform)
    assert sq.dtype == torch.float64
    for t, s in zip(rows, sq.tolist()):
        assert s == pytest.approx(ref_norm(t, 2.0) ** 2, rel=2 * RTOL_WIDE, abs=0.0)
    assert sq[2].item() == 0.0
    big = [torch.randn(N.SMALL_NUMEL + 1, generator=g) * 1e20,
           torch.randn(N.SMALL_NUMEL + 1, generator=g) * 1e-25]
    sq = squared_norms(same + big, torch.device("cpu"), uniform)   # nothing repeats: foreach
    for t, s in zip(same + big, sq.tolist()):
        assert s == pytest.approx(ref_norm(t, 2.0) ** 2, rel=2 * RTOL, abs=0.0)
    assert sq[3].item() == 0.0
    # mixed dtypes and layouts (uniform=True wrongly claimed: caught, grouped)
    mixed = _mixed() + [torch.randn(4, 5, generator=g).relu().to_sparse()]
    v = N.norm_vector(mixed, uniform=uniform)
    assert v.dtype == torch.float64 and v.shape == (len(mixed),)
    for t, n in zip(mixed, v.tolist()):
        tol = RTOL_F16 if t.dtype in (torch.float16, torch.bfloat16) else RTOL
        assert n == pytest.approx(ref_norm(t, 2.0), rel=tol, abs=0.0)
    assert N.norm_vector([]).shape == (0,)


def test_legitimately_small_gradients_take_no_slow_path(monkeypatch):
    # 100 x Linear(8, 8)-sized gradients whose norms are ~1e-13 (a vanishing network):
    # float32 lost nothing (squares ~1e-28 are normal numbers), so nothing is redone.
    g = torch.Generator().manual_seed(4)
    grads = [torch.randn(8, 8, generator=g) * 1e-14 for _ in range(100)]
    grads += [torch.randn(8, generator=g) * 1e-14 for _ in range(100)]
    calls = _count_wide(monkeypatch)
    v = N.norm_vector(grads, uniform=True)
    N.grad_norms(grads)
    assert calls == []
    for t, n in zip(grads, v.tolist()):
        assert n == pytest.approx(ref_norm(t, 2.0), rel=RTOL, abs=0.0)


def test_only_the_lost_norms_are_redone_in_one_call(monkeypatch):
    # 1e-21 entries: squares (1e-42) are below float32's smallest normal and lose digits
    # or vanish; 1e20 entries overflow. Each is redone, together, in ONE float64 call.
    g = torch.Generator().manual_seed(5)
    # Large enough for the foreach route (small ones are summed in float64 instead).
    healthy = [torch.randn(24, 24, generator=g) for _ in range(6)]
    lost = [torch.randn(1000, generator=g) * 1e-21, torch.full((N.SMALL_NUMEL + 1,), 1e20),
            torch.randn(700, generator=g) * 1e-23]
    grads = healthy[:3] + lost + healthy[3:]
    calls = _count_wide(monkeypatch)
    unchecked = N.norm_vector(grads, check=False)       # the caller checks: no redo here
    assert calls == [] and math.isinf(unchecked[4].item())
    v = N.norm_vector(grads)
    assert calls == [len(lost)]
    for t, n in zip(grads, v.tolist()):
        assert math.isfinite(n)
        assert n == pytest.approx(ref_norm(t, 2.0), rel=RTOL, abs=0.0)


def test_the_bound_grows_with_the_number_of_entries(monkeypatch):
    # A norm of 1e-15 from 4 entries is trusted (under 4 entries' worth of lost squares it
    # cannot hide anything); one of 1e-16 from a million entries of 1e-19 is redone: their
    # squares (1e-38) are subnormal, and float32 reads 1.0004e-16 (4e-4 off).
    few = torch.full((4,), 5e-16)
    many = torch.full((1_000_000,), 1e-19)
    assert N.norm_vector([few])[0].item() == pytest.approx(1e-15, rel=RTOL)
    calls = _count_wide(monkeypatch)
    v = N.norm_vector([few, many])
    assert calls == [1]
    assert v[0].item() == pytest.approx(ref_norm(few, 2.0), rel=RTOL, abs=0.0)
    assert v[1].item() == pytest.approx(ref_norm(many, 2.0), rel=RTOL, abs=0.0)


RTOL_UPDATE = 1e-4   # the monitor's UPDATE_RTOL: an update's norm read to a few digits


def test_a_looser_rtol_redoes_only_what_that_error_could_show(monkeypatch):
    # 65536 entries of 1e-16: squares 1e-32 are normal floats, so float32 is right, but the
    # exact bound (n * 2**-102) cannot prove it and redoes; with rtol=1e-4 it is trusted.
    # Entries of 1e-21 (squares flushed) are redone at either tolerance.
    ok, lost = torch.full((65536,), 1e-16), torch.full((65536,), 1e-21)
    calls = _count_wide(monkeypatch)
    N.norm_vector([ok])
    assert calls == [1]
    calls.clear()
    v = N.norm_vector([ok, lost], rtol=RTOL_UPDATE)
    assert calls == [1]                         # only the flushed one
    assert v[0].item() == pytest.approx(ref_norm(ok, 2.0), rel=RTOL_UPDATE, abs=0.0)
    assert v[1].item() == pytest.approx(ref_norm(lost, 2.0), rel=RTOL, abs=0.0)


def test_a_large_norm_type_does_not_overflow_the_check():
    # |x| ** 20 of 1e30 is past float64 too: the check compares norms, the redo scales.
    got = N.norm_vector([torch.full((3,), 1e30), torch.full((3,), 1e-30)], 20.0)
    assert got.tolist() == pytest.approx([3 ** (1 / 20) * 1e30, 3 ** (1 / 20) * 1e-30],
                                         rel=RTOL)


def test_zero_norms_are_told_apart_without_float64(monkeypatch):
    # An all-zero gradient (a dead unit) keeps its exact 0 without the float64 redo; one
    # of 1e-30 entries (squares 0 in float32) also reads 0 in float32 and is redone.
    # (tensors large enough for the foreach route; small ones are summed in float64)
    zero, vanished = torch.zeros(1024), torch.full((1024,), 1e-30)
    calls = _count_wide(monkeypatch)
    v = N.norm_vector([torch.ones(3), zero, vanished, zero.clone()])
    assert calls == [1]
    assert v[1].item() == 0.0 and v[3].item() == 0.0
    assert v[2].item() == pytest.approx(ref_norm(vanished, 2.0), rel=RTOL, abs=0.0)
    assert torch.equal(N.norm_vector([zero], 1.0), torch.zeros(1))


# ------------------------------------------------------------------ the stacked CPU route

RTOL_WIDE = 1e-12    # float64 sums of squares of the same entries, summed in another order


def _route_mix(seed: int = 7) -> list[torch.Tensor]:
    """Small and large tensors (either side of SMALL_NUMEL; a small shape repeated
    STACK_MIN times for the stacked route), entries from 1e-25 to 1e20, an empty one, a
    non-contiguous one, zeros."""
    g = torch.Generator().manual_seed(seed)
    cut = N.SMALL_NUMEL
    return [torch.randn(8, 8, generator=g), torch.randn(cut, generator=g) * 1e-25,
            torch.randn(cut + 1, generator=g), torch.full((16,), 1e20), torch.empty(0),
            torch.randn(12, 5, generator=g).t(), torch.zeros(9), torch.randn(40, 40, generator=g),
            torch.randn(3, generator=g) * 1e-30, torch.randn(1, generator=g)] + \
        [torch.randn(7, generator=g) for _ in range(N.STACK_MIN)] + \
        [torch.randn(2, 3, generator=g).t() * 1e-25 for _ in range(N.STACK_MIN)]


@pytest.mark.parametrize("uniform", [False, True])
def test_stacked_route_matches_a_float64_reference(uniform):
    ts = _route_mix()
    wide = N.norm_vector(ts, wide=True, uniform=uniform)
    narrow = N.norm_vector(ts, uniform=uniform)
    assert wide.dtype == torch.float64 and narrow.dtype == torch.float32
    for t, w, n, m in zip(ts, wide.tolist(), narrow.tolist(), N.grad_norms(ts)):
        ref = ref_norm(t, 2.0)
        # repeated small shapes: float64 sums, near-exact; others: float32 foreach (checked)
        stacked = t.numel() <= N.SMALL_NUMEL and t.shape in ((7,), (3, 2))
        tol = RTOL_WIDE if stacked else RTOL
        assert w == pytest.approx(ref, rel=tol, abs=0.0)
        assert n == pytest.approx(ref, rel=RTOL, abs=0.0) and n == float(m)
    assert wide[4].item() == 0.0 and wide[6].item() == 0.0
    for t in _mixed():          # alone (nothing to stack): foreach, float32 accumulation
        tol = RTOL_WIDE if t.dtype == torch.float64 else RTOL
        assert N.norm_vector([t], wide=True).item() == pytest.approx(ref_norm(t, 2.0), rel=tol)


def test_stacked_route_reads_once_and_redoes_nothing(monkeypatch):
    # Tiny, huge and zero small tensors of one repeated shape: one stacked read, no range
    # check, no float64 redo.
    g = torch.Generator().manual_seed(8)
    small = [torch.randn(8, 8, generator=g) * 1e-25, torch.full((8, 8), 1e20), torch.zeros(8, 8),
             torch.randn(8, 8, generator=g) * 1e-13] * (N.STACK_MIN // 4)
    wide_calls = _count_wide(monkeypatch)
    count = _Counter(monkeypatch)
    v = N.norm_vector(small, wide=True)
    assert count.calls == 1 and wide_calls == []
    for t, n in zip(small, v.tolist()):
        assert n == pytest.approx(ref_norm(t, 2.0), rel=RTOL_WIDE, abs=0.0)
    # a mixed list: one stacked read per repeated shape, one foreach for the rest ...
    count.calls = 0
    other = [torch.randn(5, generator=g) for _ in range(N.STACK_MIN)]
    N.norm_vector(small + other + [torch.randn(N.SMALL_NUMEL + 1, generator=g)])
    assert count.calls == 3 and wide_calls == []
    # ... unless no small shape repeats enough to pay for a stack: all by foreach
    count.calls = 0
    few = [torch.randn(8, 8, generator=g) for _ in range(N.STACK_MIN - 1)]
    N.norm_vector(few + [torch.randn(N.SMALL_NUMEL + 1, generator=g)])
    assert count.calls == 1


def test_published_squares_are_rooted_on_first_use():
    g = [torch.full((4,), 3.0), torch.full((9,), 1.0)]
    with N.register(lambda *a: None):
        token = N.publish(g, torch.tensor([36.0, 9.0], dtype=torch.float64), squared=True)
        assert N.recall(g).tolist() == [6.0, 3.0]
        assert [float(n) for n in N.grad_norms(g)] == [6.0, 3.0]
        with pytest.raises(ValueError, match="norm_type must be 2"):
            N.publish(g, torch.tensor([36.0, 9.0]), 1.0, squared=True)
    del token


def test_published_norms_live_while_their_token_is_held():
    ts = [torch.randn(4, 4), torch.randn(3)]
    exact = torch.tensor([ref_norm(t, 2.0) for t in ts], dtype=torch.float64)
    assert N.publish(ts, exact) is None                  # nobody listens: nothing kept
    with N.register(lambda *a: None):
        token = N.publish(ts, exact)
        assert N.recall(ts) is exact
        assert N.recall(list(reversed(ts))) is None       # another order: not the batch ...
        again = N.grad_norms(list(reversed(ts)))          # ... but found per tensor
        assert [float(n) for n in again] == pytest.approx(exact.flip(0).tolist(), rel=RTOL)
        with pytest.raises(ValueError, match="1-D tensor of 2"):
            N.publish(ts, exact[:1])
        ts[1].mul_(2.0)                                   # changed: not recalled
        assert N.recall(ts) is None
        ts[1].div_(2.0)
        token = N.publish(ts, exact)
        del token
        gc.collect()
        assert N.recall(ts) is None                       # withdrawn with its token


def test_max_abs_stacked_route_equals_one_aminmax_per_tensor():
    # Repeated small shapes are read as the rows of one stack; a NaN stays NaN, -50 is 50.
    from gradtrace.record.reduce import _max_abs_each, max_abs
    g = torch.Generator().manual_seed(11)
    ts = [torch.randn(8, 8, generator=g) for _ in range(N.STACK_MIN)] + \
        [torch.randn(N.SMALL_NUMEL + 1, generator=g)] + \
        [torch.randn(8, generator=g) for _ in range(N.STACK_MIN)] + [torch.zeros(0)]
    ts[3][2, 2] = math.nan
    ts[N.STACK_MIN + 2][1] = -50.0
    cpu = torch.device("cpu")
    got, ref = max_abs(ts, cpu, uniform=True), _max_abs_each(ts, cpu)
    assert got.dtype == torch.float32 and torch.isnan(got[3]) and got[N.STACK_MIN + 2] == 50.0
    expect = [float(t.abs().max()) if t.numel() else 0.0 for t in ts]
    np.testing.assert_array_equal(got.numpy(), ref.numpy())
    np.testing.assert_array_equal(got.numpy(), np.array(expect, dtype=np.float32))


def test_max_abs_of_repeated_empty_or_sparse_tensors():
    from gradtrace.record.reduce import max_abs
    cpu = torch.device("cpu")
    assert max_abs([torch.zeros(0)] * N.STACK_MIN, cpu, uniform=True).tolist() == [0.0] * N.STACK_MIN
    assert N.norm_vector([torch.zeros(0)] * N.STACK_MIN).tolist() == [0.0] * N.STACK_MIN
    g = torch.Generator().manual_seed(12)
    sparse = [torch.randn(4, 8, generator=g).relu().to_sparse() for _ in range(N.STACK_MIN)]
    # uniform=True wrongly claimed (dense parameters, sparse gradients): caught, per tensor
    got = max_abs(sparse, cpu, uniform=True)
    assert got.tolist() == [float(t.to_dense().abs().max()) for t in sparse]
