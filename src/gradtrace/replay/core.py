"""``gt.replay(run)``: re-run the flight recorder's step and name the op that made the first nan.

The model is rebuilt (from a ``PKG.MODULE:FACTORY``, or from the bundle's pickled model
object, whose classes are re-imported from the script: only its imports, definitions and
plain constant assignments are executed, never its training code), the step's state and
RNG are restored, and the step runs again under :class:`~gradtrace.replay.checker.OpChecker`:

1. If a parameter is already non-finite, an earlier update made it: the result says so
   (``phase="before"``) with the tensors and any optimizer-state cause; a non-finite input
   is the data's (``phase="input"``).
2. The forward, then the backward of the loss: the output's own loss (a scalar output,
   Transformers' ``output.loss``), a ``loss`` factory (``loss(output) -> scalar``), else
   the sum of the float outputs (a surrogate: its gradient reaches every op, and
   ``loss_source`` says so).
3. When both are finite, ``optimizer.step()`` on the step's gradients, under the check.

Example:
    >>> import tempfile; from types import SimpleNamespace
    >>> from gradtrace.record.flight import save_bundle
    >>> m = nn.Sequential(nn.Linear(2, 2), nn.Softplus()); d = tempfile.mkdtemp()
    >>> cap = SimpleNamespace(args=(torch.ones(1, 2),), kwargs={}, rng_state=None)
    >>> _ = save_bundle(d, model=m, optimizer=None, capture=cap, step=0, reason="test")
    >>> replay(d).phase            # nothing non-finite in this step
    'none'
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from gradtrace.errors import UsageError
from gradtrace.numerics import fmt
from gradtrace.record.flight import find_bundle, load_bundle, unpickle_model
from gradtrace.replay.checker import OpChecker, OpOrigin

__all__ = ["replay", "ReplayResult"]


@dataclass(frozen=True)
class ReplayResult:
    """What the replay of a bundle found.

    ``phase``: ``"forward"``, ``"backward"``, ``"optimizer"`` (that part of the step made
    the first non-finite value, ``origin`` names the op), ``"before"`` (parameters were
    already non-finite when the step began: an earlier update made them; ``nonfinite``
    lists them and any non-finite optimizer state), ``"input"`` (the model's input was
    non-finite: the data) or ``"none"`` (the step replayed finite). ``cause`` is a dtype-level explanation when one
    applies (float16 overflow, an optimizer ``eps`` that rounds to 0).

    Example:
        >>> str(ReplayResult(step=3, reason="x", phase="none"))
        'step 3: the replayed step stayed finite (the loss from: -)'
    """
    step: int
    reason: str
    phase: str
    origin: OpOrigin | None = None
    cause: str | None = None
    nonfinite: list = field(default_factory=list)
    loss_source: str = "-"
    bundle: str | None = None

    @property
    def headline(self) -> str:
        """One line: ``torch.log at model.py:42 in Attention.forward: input min 0.0 → -inf``."""
        o = self.origin
        names = ", ".join(self.nonfinite[:4]) + (" …" if len(self.nonfinite) > 4 else "")
        if self.phase == "before":
            return (f"parameters already non-finite when step {self.step} began ({names}): the "
                    f"previous optimizer update produced them")
        if self.phase == "input":
            return (f"the model's input at step {self.step} is already non-finite ({names}): "
                    f"the data, or code run before the model, produced it")
        if o is None:
            return f"step {self.step}: the replayed step stayed finite (the loss from: {self.loss_source})"
        where = f" in module {o.module}" if o.module else ""      # torch's own code: the module says where
        if o.location:
            path, line, func = o.location
            where = f" at {os.path.basename(path)}:{line} in {func}"
        head = {"forward": o.op, "optimizer": f"optimizer step: {o.op}",
                "backward": f"backward of {o.op}"}[o.phase]
        node = f" ({o.node}: {o.aten})" if o.phase == "backward" else ""
        return f"{head}{where}{node}: {_ranges(o.inputs)} → {_worst(o.outputs)}"

    def __str__(self) -> str:
        lines = [self.headline]
        o = self.origin
        if o is not None:
            if o.module:
                lines.append(f"  module: {o.module}")
            if o.location:
                lines.append(f"  source: {o.location[0]}:{o.location[1]}")
            lines.append(f"  aten op: {o.aten}  ({o.phase})")
            for i, r in enumerate(o.inputs):
                lines.append(f"  input {i}: {r['dtype']}{r['shape']} min {fmt(r['min'])} max {fmt(r['max'])}")
        if self.cause:
            lines.append(f"  cause: {self.cause}")
        if self.phase not in ("none", "before", "input"):
            lines.append(f"  loss replayed from: {self.loss_source}")
        return "\n".join(lines) if self.phase != "none" or self.cause else lines[0]


def _ranges(rs: list) -> str:
    if not rs:
        return "no tensor inputs"
    if len(rs) == 1:
        return f"input min {fmt(rs[0]['min'])} max {fmt(rs[0]['max'])}"
    return "inputs " + ", ".join(f"[{fmt(r['min'])}, {fmt(r['max'])}]" for r in rs[:3])


def _worst(rs: list) -> str:
    for r in rs:
        if r["nan"]:
            return "nan"
    lo = min(r["min"] for r in rs)
    return "-inf" if lo == float("-inf") else "inf"


# ---- rebuilding the model ---------------------------------------------------------------
def _definitions(path: str) -> dict:
    """The script's namespace with only its imports, classes, functions and constants run."""
    src = open(path, encoding="utf-8").read()
    tree = ast.parse(src, path)

    def plain(node: ast.AST) -> bool:        # no calls: a constant, not a model or data set
        return not any(isinstance(n, (ast.Call, ast.Await, ast.Yield)) for n in ast.walk(node))

    keep = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom, ast.ClassDef,
                                                   ast.FunctionDef, ast.AsyncFunctionDef))
            or (isinstance(n, (ast.Assign, ast.AnnAssign)) and plain(n))]
    ns: dict = {"__name__": "__gradtrace_replay__", "__file__": path}
    try:
        exec(compile(ast.Module(body=keep, type_ignores=[]), path, "exec"), ns)
    except Exception as e:
        raise UsageError(f"cannot re-import the model's classes from {path}: {type(e).__name__}: "
                         f"{e}; pass --factory PKG.MODULE:FACTORY") from None
    return ns


def _script_of(source: dict) -> str | None:
    if source.get("script"):
        return os.path.join(source.get("cwd", ""), source["script"])
    if source.get("module"):
        spec = importlib.util.find_spec(source["module"])
        return spec.origin if spec else None
    return None


def _rebuild_model(bundle: dict, factory: Any) -> tuple[nn.Module, str]:
    if factory is not None:
        if isinstance(factory, str):
            from gradtrace.cli._common import load_factory
            model = load_factory(factory)
        else:
            model = factory()
        if not isinstance(model, nn.Module):
            raise UsageError(f"factory returned {type(model).__name__}, not a torch.nn.Module")
        return model, "factory"
    blob = bundle.get("model_pickle")
    if blob is None:
        raise UsageError(f"the model of this bundle ({bundle.get('model_class')}) did not pickle; "
                         "rebuild it with --factory PKG.MODULE:FACTORY")
    source = bundle.get("source") or {}
    script = _script_of(source)
    # The script's own imports (model.py beside it; -m: the directory it ran from).
    roots = [p for p in (os.path.dirname(script) if script and source.get("script") else None,
                         source.get("cwd")) if p and p not in sys.path]
    sys.path[:0] = roots
    try:
        main = None
        if b"__main__" in blob:
            if script is None or not os.path.isfile(script):
                raise UsageError("the model's classes were defined in a script that cannot be found "
                                 f"({script or 'unknown'}); pass --factory PKG.MODULE:FACTORY")
            main = _definitions(script)
        try:
            return unpickle_model(blob, main), "pickle"
        except Exception as e:
            raise UsageError(f"cannot rebuild {bundle.get('model_class')}: {type(e).__name__}: {e}; "
                             "pass --factory PKG.MODULE:FACTORY") from None
    finally:
        for p in roots:
            sys.path.remove(p)


def _rebuild_optimizer(bundle: dict, model: nn.Module) -> torch.optim.Optimizer | None:
    spec = bundle.get("optimizer_class")
    if not spec:
        return None
    mod, _, qual = spec.partition(":")
    cls: Any = importlib.import_module(mod)
    for part in qual.split("."):
        cls = getattr(cls, part)
    state = bundle["optimizer_state"]
    named = dict(model.named_parameters(remove_duplicate=False))
    groups = []
    for names, g in zip(bundle["optimizer_params"], state["param_groups"]):
        if any(n not in named for n in names):
            raise UsageError("the rebuilt model does not have the parameters the optimizer updated "
                             f"(e.g. {next(n for n in names if n not in named)!r})")
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": [named[n] for n in names]})
    opt = cls(groups)
    opt.load_state_dict(state)
    return opt


# ---- the replay --------------------------------------------------------------------------
def _loss_of(output: Any, loss: Callable | None) -> tuple[torch.Tensor | None, str]:
    if loss is not None:
        return loss(output), "the loss factory"
    if isinstance(output, torch.Tensor) and output.numel() == 1:
        return output.reshape(()), "the model's scalar output"
    got = getattr(output, "loss", None)
    if got is None and isinstance(output, dict):
        got = output.get("loss")
    if isinstance(got, torch.Tensor):
        return got, "the model output's loss"
    outs = [t for t in tree_leaves(output) if isinstance(t, torch.Tensor)
            and t.is_floating_point() and t.requires_grad]
    if not outs:
        return None, "none (no output requires grad)"
    return sum(t.float().sum() for t in outs), "surrogate: the sum of the outputs (no loss known)"


def _nonfinite(named: dict) -> list[str]:
    out = []
    for n, t in named.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                out.append(f"{n}: {bad} non-finite")
    return out


def _dtype_cause(origin: OpOrigin | None, opt: torch.optim.Optimizer | None, model: nn.Module) -> str | None:
    if opt is not None:
        for g in opt.param_groups:
            eps = g.get("eps")
            dts = {p.dtype for p in g["params"]} & {torch.float16, torch.bfloat16}
            for dt in dts:
                if isinstance(eps, float) and eps > 0 and float(torch.tensor(eps, dtype=dt)) == 0.0:
                    return (f"the optimizer's eps={eps:g} rounds to 0 in {str(dt)[6:]}: a parameter "
                            f"whose gradient (and second moment) is 0 gets 0/0 = nan; keep the "
                            f"parameters (or optimizer state) in float32, or raise eps")
    if origin is not None and origin.outputs:
        dt = origin.outputs[0]["dtype"]
        if dt in ("float16", "bfloat16") and all(r["nan"] == 0 for r in origin.outputs):
            big = max(max(abs(r["min"]), abs(r["max"])) for r in origin.inputs) if origin.inputs else 0.0
            fmax = torch.finfo(getattr(torch, dt)).max
            return (f"{dt} overflow: the result passed {dt}'s largest value {fmt(fmax)} "
                    f"(inputs up to {fmt(big)}); compute this op in float32 (autocast keeps "
                    f"reductions and exp/log in float32) or scale the inputs down")
    return None


def replay(run: str | os.PathLike, factory: Any = None, loss: Any = None, *,
           device: str | None = None) -> ReplayResult:
    """Replay the flight-recorder bundle of ``run`` and name the first op that made a nan/inf.

    Args:
        run: a bundle file, the trace directory holding it, or a ``gradtrace run`` directory.
        factory: ``"PKG.MODULE:FACTORY"`` (or a callable) returning the model, uninitialised
            weights are fine; default: the model object stored in the bundle.
        loss: ``"PKG.MODULE:FACTORY"`` returning ``loss_fn(output) -> scalar`` (or that
            callable); default: see the module docstring.
        device: where to run (default: the CPU). Replay a GPU run on the GPU
            (``"cuda"``) to get its dropout masks and kernels: the CUDA generator's state
            is restored only there.

    Example:
        >>> replay("no/such/run")       # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        UsageError: no flight-recorder bundle in no/such/run
    """
    try:
        path = find_bundle(run)
        bundle = load_bundle(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None
    if isinstance(loss, str):
        from gradtrace.cli._common import load_factory
        loss = load_factory(loss)
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable or 'PKG.MODULE:FACTORY', got {type(loss).__name__}")
    model, _ = _rebuild_model(bundle, factory)
    try:
        model.load_state_dict(bundle["model_state"])
    except RuntimeError as e:
        raise UsageError(f"the bundle's state does not fit the rebuilt model: {str(e).splitlines()[0]}") from None
    dev = torch.device(device or "cpu")
    model.to(dev)
    model.train(bundle.get("training", True))
    opt = _rebuild_optimizer(bundle, model)
    args = tuple(_to(a, dev) for a in bundle["args"])
    kwargs = {k: _to(v, dev) for k, v in bundle["kwargs"].items()}
    common = dict(step=bundle["step"], reason=bundle["reason"], bundle=str(path))

    # 1. already non-finite before the forward: the previous update, or the data
    bad = _nonfinite(dict(model.named_parameters()))
    if bad:
        names = {id(p): n for n, p in model.named_parameters()}
        state = {} if opt is None else {f"optimizer state {names.get(id(p), '?')}.{k}": v
                                        for p, st in opt.state.items() for k, v in st.items()}
        return ReplayResult(phase="before", nonfinite=bad + _nonfinite(state),
                            cause=_dtype_cause(None, opt, model), **common)
    bad = _nonfinite({f"input {i}": t for i, t in enumerate(tree_leaves((args, kwargs)))})
    if bad:
        return ReplayResult(phase="input", nonfinite=bad, **common)

    # 2. forward and backward under the check, with the step's RNG state
    rng = bundle.get("rng_state") or {}
    with torch.random.fork_rng(devices=[] if dev.type == "cpu" else [dev]):
        if rng.get("cpu") is not None:
            torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") and dev.type == "cuda":
            torch.cuda.set_rng_state_all(rng["cuda"])
        model.zero_grad(set_to_none=True)
        with OpChecker(model) as chk:
            output = model(*args, **kwargs)
            value, source = _loss_of(output, loss)
            if chk.first is None and value is not None and value.requires_grad:
                chk.phase = "backward"
                value.backward()
    common["loss_source"] = source
    if chk.first is not None:
        return ReplayResult(phase=chk.first.phase, origin=chk.first,
                            cause=_dtype_cause(chk.first, None, model), **common)

    # 3. the optimizer step, on the step's own gradients when the loss was not known
    recorded = _nonfinite(bundle.get("grads") or {})
    if recorded:
        return ReplayResult(phase="none", nonfinite=recorded, cause=(
            "the step's recorded gradients are non-finite but the replayed backward stayed "
            f"finite (loss from: {source}); pass the real loss (--loss PKG.MODULE:FACTORY)"), **common)
    if opt is None:
        return ReplayResult(phase="none", **common)
    if source.startswith(("surrogate", "none")) and bundle.get("grads"):
        named = dict(model.named_parameters())
        for n, g in bundle["grads"].items():
            if n in named:
                named[n].grad = g.to(dev)
    with OpChecker(model) as chk:
        chk.phase = "optimizer"
        opt.step()
    phase = "optimizer" if chk.first is not None else "none"
    return ReplayResult(phase=phase, origin=chk.first, cause=_dtype_cause(chk.first, opt, model)
                        if chk.first is not None else None, **common)


def _to(obj: Any, dev: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dev)
    if isinstance(obj, dict):
        return type(obj)({k: _to(v, dev) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_to(v, dev) for v in obj)
    return obj
