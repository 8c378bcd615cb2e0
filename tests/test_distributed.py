"""DDP and FSDP2 (2 processes, gloo, CPU) against a single-process run on the global batch.

One spawned job (tests/dist_worker.py) runs every distributed setting; the tests read
what it wrote. Every subprocess has a timeout and is killed with its process group,
so a failing rank can never hang the suite.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradtrace as gt
from gradtrace.record import distributed

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")

REL_TOL = 1e-5          # the bar: distributed figures equal single-process ones
JOB_TIMEOUT_S = 120     # the whole two-process job; a hang fails the test instead


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_worker(out: Path, mode: str = "all") -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(Path(__file__).parent / "dist_worker.py"), str(out),
           "--mode", mode, "--port", str(_free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=env, start_new_session=True)
    try:
        stdout, _ = p.communicate(timeout=JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)       # the spawner and both ranks
        stdout, _ = p.communicate()
        pytest.fail(f"distributed job hung past {JOB_TIMEOUT_S}s:\n{stdout[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, "")


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    res = _run_worker(out)
    assert res.returncode == 0, res.stdout[-5000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(W.WORLD)]
    return out, ranks


@pytest.fixture(scope="module")
def reference():
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=W.LR, momentum=0.9)
    with gt.watch(model, opt, out=None, activations_every=2) as mon:
        W.train(model, opt, mon, rank=-1)
    return mon.trace


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    same = (a == b) | (np.isnan(a) & np.isnan(b))          # equal infs (0-norm params), both NaN
    with np.errstate(invalid="ignore", divide="ignore"):
        err = np.where(same, 0.0, np.abs(a - b) / np.maximum(np.abs(b), 1e-12))
    return float(np.max(err, initial=0.0))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_figures_equal_single_process(job, reference, mode):
    out, ranks = job
    tr = gt.load(out / mode)
    assert tr.params == reference.params                       # DDP's "module." prefix is gone
    assert tr.meta["distributed"]["mode"] == mode and tr.meta["distributed"]["world_size"] == 2
    assert list(tr.steps_recorded) == list(reference.steps_recorded)
    for stat in ("grad_norm", "grad_maxabs", "param_norm", "update_ratio"):
        _, names, got = tr.matrix(stat)
        _, _, want = reference.matrix(stat)
        assert got.shape == want.shape, stat
        assert _rel(got, want) < REL_TOL, (stat, got, want)
    for stat in ("total_grad_norm", "loss"):
        assert _rel(tr.series(stat), reference.series(stat)) < REL_TOL, stat
    # every rank computed the same reduced figures
    assert _rel(ranks[1][mode]["total"], ranks[0][mode]["total"]) < 1e-7
    # activation figures are rank 0's own micro-batch: present, finite
    assert np.isfinite(tr.matrix("out_std")[2][:, 0]).all()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_one_trace_by_rank0_and_collectives_only_on_recorded_steps(job, mode):
    out, ranks = job
    assert (out / mode / "meta.json").exists() and (out / mode / "tables.jsonl").exists()
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(
        ["ddp", "fsdp2", "ddp_nan", "fsdp2_nan"])         # nothing else written anywhere
    recorded = (W.STEPS + 1) // 2                           # every=2 -> steps 0 and 2
    for r in ranks:
        assert len(r[mode + "_every2"]["total"]) == recorded
        assert r[mode + "_every2"]["collectives"] == 2 * recorded


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_nonfinite_event_names_first_rank(job, mode):
    out, _ = job
    ev = gt.load(out / (mode + "_nan")).events("nonfinite")
    assert ev and ev[0]["step"] == 2
    assert ev[0]["first_rank"] == 1 and ev[0]["ranks"] == [1]
    assert "forward" in ev[0]["by_rank"]["1"]
    assert ev[0]["params"]                                  # the reduced gradient is NaN too


@pytest.mark.timeout(180)
@pytest.mark.parametrize("what", ["clip", "guard"])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_clip_and_guard_agree_across_ranks(job, mode, what):
    _, ranks = job
    res = [r[f"{mode}_{what}"] for r in ranks]
    for r in res:
        assert "error" not in r, r.get("where")
    if what == "guard":                                     # the nan input poisons every rank's grads
        assert res[0]["skips"] == [[1, "nonfinite_grad"]]
    assert res[0]["skips"] == res[1]["skips"]               # the same skip decision everywhere
    assert _rel(res[0]["clip_totals"], res[1]["clip_totals"]) < 1e-7
    assert _rel(res[0]["params"], res[1]["params"]) < 1e-7
    assert _rel(res[0]["total"], res[1]["total"]) < 1e-7
    if what == "clip":
        # The recorded total is that of the reduced gradient before the clip: exactly what
        # the clipper measured (figures taken at the end of backward, after DDP's reduction).
        got, ref = np.asarray(res[0]["total"], float), np.asarray(res[0]["clip_totals"], float)
        ok = np.isfinite(ref)
        assert ok.sum() >= 1 and np.allclose(got[ok], ref[ok], rtol=1e-6), (got, ref)   # nan from step 1
        post = np.asarray(res[0]["post"], float)          # the clip scaled every step's grads
        assert len(post) == len(ref) and np.allclose(post[ok], np.minimum(ref[ok], 0.5), rtol=1e-4), post


def _guard_reference(case: str) -> tuple[list, list]:
    """One process, the global batch: what the synchronised guard must reproduce."""
    kw, add, steps = {"nanloss": ({}, (1, -1, float("nan")), 3),
                      "spike": ({"spike_zscore": 50.0, "window": 8, "min_samples": 3,
                                 "spike_on": ("loss",)}, (4, -1, 1e4 / W.WORLD), 6)}[case]
    model = W.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=W.LR, momentum=0.9)
    guard = gt.Guard(opt, **kw)
    W.train(model, opt, None, rank=-1, steps=steps, guard=guard, loss_add=add)
    return [list(s) for s in guard.skips], torch.cat(
        [p.detach().reshape(-1) for p in model.parameters()]).tolist()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case,expected", [("nanloss", [[1, "nonfinite_loss"]]),
                                           ("spike", [[4, "loss_spike"]])])
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_guard_skips_the_same_steps_on_every_rank(job, mode, case, expected):
    """Rank 1 alone sees a nan loss / a loss spike: every rank skips that step."""
    _, ranks = job
    res = [r[f"{mode}_guard_{case}"] for r in ranks]
    for r in res:
        assert "error" not in r, r.get("where")
    assert res[0]["skips"] == res[1]["skips"] == expected
    assert res[0]["state"] == res[1]["state"]               # counters and spike windows too
    assert res[0]["params"] == res[1]["params"]             # bitwise identical replicas
    ref_skips, ref_params = _guard_reference(case)
    assert ref_skips == expected
    assert _rel(res[0]["params"], ref_params) < REL_TOL


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_guard_without_sync_lets_ranks_disagree(job, mode):
    """sync=False is the per-rank decision the default replaces (and shows the test bites)."""
    _, ranks = job
    res = [r[f"{mode}_guard_nosync"] for r in ranks]
    assert res[0]["skips"] == [] and res[1]["skips"] == [[1, "nonfinite_loss"]]
    if mode == "ddp":
        assert res[0]["params"] != res[1]["params"]         # the replicas drifted apart


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_clip_grad_norm_returns_what_torch_returns(job, mode):
    _, ranks = job
    for r in ranks:
        got = r[f"{mode}_clip_return"]
        assert got["gt"]["type"] == got["torch"]["type"] == (
            "DTensor" if mode == "fsdp2" else "Tensor")
        assert got["gt"]["placements"] == got["torch"]["placements"]
        assert _rel(got["gt"]["value"], got["torch"]["value"]) < 1e-6
        for q in ("inf", "1.0"):
            assert _rel(*got[f"norm{q}"]) < 1e-6, q


SUM_TOL = 1e-12         # float64 sums of two shards' sums against one sum of the whole


def _hand_reduce(per_rank: list[dict], owner: list[list[bool]]) -> dict:
    """DistReducer.reduce's contract, written out with numpy: "sum" parts add the owning
    ranks' values, "max" parts take the largest (NaN wins), the loss is the mean of every
    value, other parts stay each rank's own, and each rank reports what it saw go
    non-finite (the every-step gradient figure, forward and backward flags, loss)."""
    def arr(r, k):
        return np.asarray(per_rank[r][k], np.float64)
    ranks = range(len(per_rank))
    want = {"gsq": sum(np.where(owner[r], arr(r, "gsq"), 0.0) for r in ranks),
            "zsum": sum(np.where(owner[r], arr(r, "zsum"), 0.0) for r in ranks),
            "zmax": np.max([arr(r, "zmax") for r in ranks], axis=0),      # np.max keeps NaN
            "loss": [np.mean(np.concatenate([arr(r, "loss") for r in ranks]))]}
    codes = []
    for r in ranks:
        bad = lambda k: not np.isfinite(arr(r, k)).all()               # noqa: E731
        codes.append(distributed.NF_FORWARD * bad("flag") + distributed.NF_BACKWARD * bad("bwd")
                     + distributed.NF_LOSS * bad("loss") + distributed.NF_GRAD * bad("gsq"))
    want["dist_ranks"] = codes
    return want


@pytest.mark.timeout(180)
def test_reducer_follows_the_declared_reductions(job):
    """A "sum" and a "max" figure added to PARAM_FIGURES (in the worker, as one entry in
    collectors.py would) reduce correctly on 2 ranks; distributed.py never names them."""
    _, ranks = job
    per_rank = [W.reducer_parts(r) for r in range(W.WORLD)]
    # parameter 0 is a plain (replicated) tensor: rank 0's copy stands for all; parameter
    # 2 is a DTensor sharded over both ranks: both add in.
    owner = [[r == 0, True] for r in range(W.WORLD)]
    want = _hand_reduce(per_rank, owner)
    for r, res in enumerate(ranks):
        got = {k: np.asarray([np.nan if v is None else v for v in vals], np.float64)
               for k, vals in res["reducer"]["parts"].items()}
        assert res["reducer"]["collectives"] == 2
        for k in ("gsq", "zsum", "zmax", "loss", "dist_ranks"):
            assert _rel(got[k], want[k]) < SUM_TOL, (k, got[k], want[k])
        for k in ("flag", "bwd", "a_min"):                    # per rank: this rank's own
            assert _rel(got[k], per_rank[r][k]) == 0.0, k
        assert res["reducer"]["dtypes"]["zmax"] == "torch.float32"   # a max keeps its dtype
    # what the hand-made parts exercise: NaN kept by the max, an unowned NaN dropped from
    # the sum, a finite 1e40 squared norm that is no "grad" non-finite (float32 would say inf)
    assert np.isnan(want["zmax"][0]) and np.isfinite(want["zsum"]).all()
    assert want["dist_ranks"] == [distributed.NF_BACKWARD, distributed.NF_FORWARD + distributed.NF_GRAD]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_a_new_figure_is_reduced_without_an_edit_here(job, mode):
    """grad_l1 ("sum", every step) and param_maxabs ("max", activation steps) declared
    only in PARAM_FIGURES equal the full gradients and weights measured by hand (FSDP2:
    full_tensor() of the shards) on every rank, with two collectives per recorded step."""
    _, ranks = job
    for res in (r[mode + "_extra"] for r in ranks):
        hand = res["by_hand"]
        assert res["collectives"] == 2 * len(res["steps"]) == 2 * W.STEPS
        assert res["param_maxabs"]["steps"] == list(range(0, W.STEPS, 2))   # activation steps
        for stat, tol in (("grad_l1", SUM_TOL), ("param_maxabs", 0.0)):    # a max is exact
            steps = res[stat]["steps"]
            assert steps, stat
            got = np.asarray(res[stat]["values"], np.float64)
            want = np.asarray([hand[stat][s] for s in steps], np.float64)
            assert got.shape == want.shape and _rel(got, want) <= tol, (stat, got, want)
    assert ranks[0][mode + "_extra"]["grad_l1"] == ranks[1][mode + "_extra"]["grad_l1"]


def test_part_rules_come_from_the_declarations():
    from gradtrace.record import collectors
    rules = distributed.part_rules()
    for fig in collectors.PARAM_FIGURES:
        assert rules[fig.part].how == fig.reduce and rules[fig.part].per_param
    assert {k: rules[k] for k in distributed.STEP_PARTS} == distributed.STEP_PARTS
    twice = collectors.PARAM_FIGURES + (collectors.PARAM_FIGURES[0],)
    with pytest.raises(ValueError, match="declared twice"):
        distributed.part_rules(twice)
    mean = collectors.PARAM_FIGURES + (dataclasses.replace(collectors.PARAM_FIGURES[0], part="m",
                                                           reduce="mean"),)
    with pytest.raises(ValueError, match="reduce must be 'sum' or 'max'"):
        distributed.part_rules(mean)
    with pytest.raises(ValueError, match="per_param"):
        distributed.PartRule("max")
    with pytest.raises(ValueError, match="how must be one of"):
        distributed.PartRule("median", per_param=True)


@pytest.mark.timeout(90)
def test_a_failing_rank_does_not_hang(tmp_path):
    res = _run_worker(tmp_path, mode="fail")
    assert res.returncode != 0
    assert "rank 1 fails on purpose" in res.stdout


def test_single_process_has_no_reducer():
    assert distributed.attach(torch.nn.Linear(2, 2), []) is None
    assert distributed.local(torch.ones(2)).shape == (2,)
    info = distributed.DistReducer.nonfinite_info({"dist_ranks": [8.0, 9.0]})
    assert info["first_rank"] == 1 and info["ranks"] == [1]   # rank 1's forward, not just grads
