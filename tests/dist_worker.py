"""Two-process (gloo, CPU) worker for tests/test_distributed.py.

Run: ``python tests/dist_worker.py OUTDIR [--mode all|fail] [--port N] [--start fork|spawn]``.
It starts two ranks that train the same tiny model under DDP and under FSDP2 and write
traces (rank 0) and per-rank summaries (``rank{r}.json``) into OUTDIR. The reference
(one process, the global batch) is computed by the test itself from
:func:`make_model`/:func:`batch`.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys

import torch
from torch import nn

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 4
SEED = 1234
LR = 0.05
TIMEOUT_S = 30          # collectives and rendezvous give up after this (a dead peer never hangs us)


def make_model() -> nn.Module:
    """Odd sizes on purpose: uneven FSDP2 shards, and a 1-element bias (an empty shard)."""
    torch.manual_seed(SEED)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 13), nn.LayerNorm(13),
                         nn.ReLU(), nn.Linear(13, 1))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(SEED + step)
    x = torch.randn(GLOBAL_BATCH, 6, generator=g) * 3
    y = torch.randn(GLOBAL_BATCH, 1, generator=g)
    return x, y


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    n = t.shape[0] // WORLD
    return t[rank * n:(rank + 1) * n]


def train(model, opt, mon, rank: int, steps: int = STEPS, nan_at: tuple[int, int] | None = None,
          clip: float | None = None, guard=None,
          loss_add: tuple[int, int, float] | None = None, after_backward=None) -> list:
    """The same loop for every setting. ``nan_at=(step, rank)`` poisons that rank's input;
    ``loss_add=(step, rank, c)`` adds the constant ``c`` (nan, a spike) to that rank's loss
    only -- its gradients stay finite and unchanged. ``mon`` may be None;
    ``after_backward(step)`` runs between backward and the optimizer step."""
    import gradtrace as gt
    clip_totals = []
    for s in range(steps):
        x, y = batch(s)
        if rank >= 0:
            x, y = shard(x, rank), shard(y, rank)
        if nan_at is not None and nan_at == (s, rank):
            x = x.clone()
            x[0, 0] = float("nan")
        loss = nn.functional.mse_loss(model(x), y)
        if loss_add is not None and loss_add[:2] == (s, rank):
            loss = loss + torch.tensor(loss_add[2])      # a constant: gradients unchanged
        if mon is not None:
            mon.record_loss(loss)
        loss.backward()
        if after_backward is not None:
            after_backward(s)
        if clip is not None:
            total = gt.clip_grad_norm_(list(model.parameters()), clip)
            clip_totals.append(float(total.full_tensor() if hasattr(total, "full_tensor") else total))
        if guard is not None:
            guard.step(loss)
        else:
            opt.step()
        opt.zero_grad()
    return clip_totals


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _l1(grads, params, dev, uniform=False) -> torch.Tensor:
    """Sum of |g| per tensor (float64): adds across shards like a "sum" figure."""
    return torch.stack([g.abs().sum(dtype=torch.float64) for g in grads]).to(dev)


def _pmax(grads, params, dev, uniform=False) -> torch.Tensor:
    """Largest |w| per tensor; an empty shard (rank 1's part of a 1-element bias) gives 0."""
    return torch.stack([p.abs().max() if p.numel() else p.new_zeros(()) for p in params]).to(dev)


def extra_figures():
    """Two statistics declared the way collectors.py declares one, as if added there: every
    gradtrace module that imported PARAM_FIGURES sees them. Returns the undo."""
    from gradtrace.record import collectors as C
    figs = C.PARAM_FIGURES + (
        C.ParamFigure("grad_l1", "gl1", True, "sum", _l1, lambda v: v.astype("float64")),
        C.ParamFigure("param_maxabs", "pmax", False, "max", _pmax, lambda v: v.astype("float64")))
    mods = [m for name, m in list(sys.modules.items())
            if name.startswith("gradtrace") and hasattr(m, "PARAM_FIGURES")]
    old = [m.PARAM_FIGURES for m in mods]
    for m in mods:
        m.PARAM_FIGURES = figs

    def undo():
        for m, f in zip(mods, old):
            m.PARAM_FIGURES = f
    return undo


def reducer_parts(rank: int) -> dict:
    """What each rank hands DistReducer.reduce in the direct check: 3 parameters (0: a
    plain replicated tensor, 1: no gradient this step, 2: a DTensor sharded over both
    ranks), idx=[0, 2]. Plain lists; the test reduces them by hand."""
    nan, inf = float("nan"), float("inf")
    return {"gsq": [1e40 if rank == 0 else inf, 2.5 + rank],   # 1e40: finite, no grad bit
            "zsum": [nan if rank == 1 else 0.75, 1e-30 * (rank + 1)],   # rank 1's NaN is not owned
            "zmax": [3.0 if rank == 0 else nan, 7.0 - rank],
            "loss": [1.0, 2.0] if rank == 0 else [4.0],
            "flag": [0.5, inf] if rank == 1 else [0.5, 0.25],
            "bwd": [nan] if rank == 0 else [1.0],
            "a_min": [float(rank), -1.0]}


def check_reducer(rank: int) -> dict:
    """DistReducer.reduce on hand-made parts, with a "sum" and a "max" figure added to
    PARAM_FIGURES that distributed.py has never heard of."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from gradtrace.record import collectors as C
    from gradtrace.record.distributed import DistReducer
    mesh = init_device_mesh("cpu", (WORLD,))
    params = [torch.zeros(3), torch.zeros(2), distribute_tensor(torch.zeros(4), mesh, [Shard(0)])]
    old = C.PARAM_FIGURES
    C.PARAM_FIGURES = old + (C.ParamFigure("test_sum", "zsum", False, "sum", _l1, None),
                             C.ParamFigure("test_max", "zmax", False, "max", _pmax, None))
    try:
        red = DistReducer(params)
        dt = {"gsq": torch.float64, "zsum": torch.float64, "loss": torch.float32}
        parts = [(k, torch.tensor(v, dtype=dt.get(k, torch.float32)))
                 for k, v in reducer_parts(rank).items()]
        out = red.reduce(parts, idx=[0, 2])
    finally:
        C.PARAM_FIGURES = old
    return {"parts": {k: [None if math.isnan(x) else x for x in t.tolist()] for k, t in out},
            "dtypes": {k: str(t.dtype) for k, t in out}, "collectives": red.collectives}


def _summary(mon) -> dict:
    tr = mon.trace
    return {"total": tr.series("total_grad_norm").tolist(),
            "events": tr.events(), "collectives": mon._dist.collectives if mon._dist else 0}


def worker(rank: int, out: str, mode: str, port: int) -> None:
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=TIMEOUT_S))
    torch.set_num_threads(1)
    import gradtrace as gt
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    if mode == "fail":
        if rank == 1:
            raise RuntimeError("rank 1 fails on purpose")
        t = torch.ones(1)
        dist.all_reduce(t)          # rank 0 waits for a peer that is gone: must not hang
        return

    def fsdp(m):
        for layer in m:
            if any(True for _ in layer.parameters()):
                fully_shard(layer)
        return fully_shard(m)

    res: dict = {"reducer": check_reducer(rank)}
    for name, wrap in (("ddp", DDP), ("fsdp2", fsdp)):
        model = wrap(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
        with gt.watch(model, opt, out=os.path.join(out, name), activations_every=2) as mon:
            train(model, opt, mon, rank)
        res[name] = _summary(mon)

        # two figures declared only in PARAM_FIGURES (a "sum" and a "max"), against the
        # full gradients and weights measured by hand on every rank before the step
        undo = extra_figures()
        try:
            model = wrap(make_model())
            opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
            by_hand: dict = {"grad_l1": [], "param_maxabs": []}

            def measure(step, model=model, by_hand=by_hand):
                ps = list(model.parameters())
                by_hand["grad_l1"].append([float(_full(p.grad).abs().sum(dtype=torch.float64))
                                           for p in ps])
                by_hand["param_maxabs"].append([float(_full(p.detach()).abs().max()) for p in ps])
            with gt.watch(model, opt, out=None, activations_every=2) as mon:
                train(model, opt, mon, rank, after_backward=measure)
            tr = mon.trace
            res[name + "_extra"] = {
                **_summary(mon), "by_hand": by_hand, "steps": list(tr.steps_recorded),
                **{stat: {"steps": [int(v) for v in tr.matrix(stat).steps],
                          "values": tr.matrix(stat).values.tolist()}
                   for stat in by_hand}}
        finally:
            undo()

        # every other step: collectives only on recorded steps
        model = wrap(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with gt.watch(model, opt, out=None, every=2, activations_every=0) as mon:
            train(model, opt, mon, rank)
        res[name + "_every2"] = _summary(mon)

        # a NaN in rank 1's input at step 2
        model = wrap(make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        with gt.watch(model, opt, out=os.path.join(out, name + "_nan"), activations_every=0) as mon:
            train(model, opt, mon, rank, steps=3, nan_at=(2, 1))
        res[name + "_nan"] = _summary(mon)

        # gradtrace's clipping, then the guard, on the sharded / replicated gradients
        for what in ("clip", "guard"):
            try:
                model = wrap(make_model())
                opt = torch.optim.SGD(model.parameters(), lr=LR)
                guard = gt.Guard(opt) if what == "guard" else None
                with gt.watch(model, opt, out=None, activations_every=0) as mon:
                    totals = train(model, opt, mon, rank, steps=3, nan_at=(1, 1), clip=0.5,
                                   guard=guard)
                res[f"{name}_{what}"] = {
                    **_summary(mon), "clip_totals": totals,
                    "post": mon.trace.series("total_grad_norm_post_clip").tolist(),
                    "skips": getattr(guard, "skips", None),
                    "params": [float(p.detach().full_tensor().norm()) if hasattr(p, "full_tensor")
                               else float(p.detach().norm()) for p in model.parameters()]}
            except Exception as e:  # remedies belong to someone else: report, don't stop the rest
                import traceback
                res[f"{name}_{what}"] = {"error": f"{type(e).__name__}: {e}",
                                         "where": traceback.format_exc()[-1500:]}

        # Guard decisions from per-rank losses: rank 1 alone sees a nan loss / a loss spike
        # (its gradients, hence the averaged/sharded ones, stay finite). With sync the
        # ranks must agree; without it (the old behaviour) they must not.
        for case, kw, add, steps in (
                ("nanloss", {}, (1, 1, float("nan")), 3),
                ("nosync", {"sync": False}, (1, 1, float("nan")), 3),
                ("spike", {"spike_zscore": 50.0, "window": 8, "min_samples": 3,
                           "spike_on": ("loss",)}, (4, 1, 1e4), 6)):
            try:
                model = wrap(make_model())
                opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
                guard = gt.Guard(opt, **kw)
                train(model, opt, None, rank, steps=steps, guard=guard, loss_add=add)
                res[f"{name}_guard_{case}"] = {
                    "skips": guard.skips, "state": guard.state_dict(),
                    "last_loss": guard.last_loss,
                    "params": torch.cat([(p.detach().full_tensor() if hasattr(p, "full_tensor")
                                          else p.detach()).reshape(-1)
                                         for p in model.parameters()]).tolist()}
            except Exception as e:
                import traceback
                res[f"{name}_guard_{case}"] = {"error": f"{type(e).__name__}: {e}",
                                               "where": traceback.format_exc()[-1500:]}

        # gradtrace's clip_grad_norm_ returns what torch's does (type, placements, value)
        model = wrap(make_model())
        x, y = batch(0)
        nn.functional.mse_loss(model(shard(x, rank)), shard(y, rank)).backward()
        got = {}
        for who, fn in (("torch", torch.nn.utils.clip_grad_norm_), ("gt", gt.clip_grad_norm_)):
            t = fn(list(model.parameters()), 1e9)       # nothing is clipped
            got[who] = {"type": type(t).__name__, "placements": str(getattr(t, "placements", None)),
                        "value": float(t.full_tensor() if hasattr(t, "full_tensor") else t)}
        from gradtrace.remedies.clip import grad_norms
        # other norm types over the full gradient (the 1-element bias leaves rank 1 an
        # empty shard, on which torch's own inf-norm fails)
        full = [(g.full_tensor() if hasattr(g, "full_tensor") else g).reshape(-1)
                for g in (p.grad for p in model.parameters())]
        for q in (float("inf"), 1.0):
            got[f"norm{q}"] = [float(grad_norms([p.grad for p in model.parameters()], q)[1]),
                               float(torch.linalg.vector_norm(torch.cat(full), q))]
        res[f"{name}_clip_return"] = got

    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(res, f, default=lambda v: None if isinstance(v, float) and math.isnan(v) else str(v))
    dist.barrier()
    dist.destroy_process_group()


def main(argv: list[str]) -> int:
    import argparse
    import torch.multiprocessing as mp
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", default="all", choices=["all", "fail"])
    ap.add_argument("--port", type=int, default=29611)
    ap.add_argument("--start", default="fork", choices=["fork", "spawn"])
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    # Forked ranks inherit the imports (torch alone takes seconds to import on a loaded
    # machine; spawned ranks imported it twice more). The parent has run no torch op, so
    # no thread pool or process group is forked along.
    if a.mode != "fail":
        import gradtrace  # noqa: F401
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    # join() raises as soon as a rank dies and terminates the others: no hang on failure.
    mp.start_processes(worker, args=(a.out, a.mode, a.port), nprocs=WORLD, join=True,
                       start_method=a.start)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
