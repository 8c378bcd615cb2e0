"""Flight recorder: one replay bundle for the first non-finite step (``flight-<step>.pt``).

A bundle is one ``torch.save`` file holding what ``gradtrace replay`` needs to run the
step again: the model's parameters as that step's forward saw them (it is written before
the optimizer applies the step), its buffers as they were *before* the forward when the
capture kept a copy (BatchNorm running statistics are updated by the forward), the
optimizer's class, hyper-parameters and state, the root module's inputs (on the CPU),
the RNG states, and how to rebuild the model: the pickled model object when it pickles
(its classes are re-imported from the script or module, see :func:`set_source`), its
class as ``module:qualname``, and the script or module that ran it.

Without a pre-forward copy of the buffers (the monitor's capture keeps none: it would cost
a copy every step) they are saved as the forward left them: one BatchNorm update later,
which a training-mode forward does not read (it normalises with the batch's statistics).
Under FSDP2 the state saved is this rank's shards: replay such a bundle with care.

The bundle is a pickle, like any full-model checkpoint: replay only bundles you trust.

Example:
    >>> import tempfile
    >>> from types import SimpleNamespace
    >>> m = torch.nn.Linear(3, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
    >>> cap = SimpleNamespace(args=(torch.ones(2, 3),), kwargs={}, rng_state=None)
    >>> path = save_bundle(tempfile.mkdtemp(), model=m, optimizer=opt, capture=cap,
    ...                    step=4, reason="nonfinite_grad")
    >>> path.name, load_bundle(path)["step"]
    ('flight-4.pt', 4)
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_bundle", "load_bundle", "set_source", "rng_state", "FORMAT", "BUNDLE_GLOB"]

#: format tag of a bundle; replay refuses any other
FORMAT = "gradtrace-flight/1"
#: file names of bundles in a trace directory
BUNDLE_GLOB = "flight-*.pt"

# What ran the model (``gradtrace run`` sets it): {"script": path} or {"module": name}, argv.
_SOURCE: dict = {}

# Module hook tables that may hold gradtrace's own hooks (bound to a live monitor, which
# neither pickles nor belongs in the user's model).
_HOOK_TABLES = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
                "_forward_hooks_always_called")


def set_source(source: dict | None) -> dict:
    """Record what runs the model (script path or module name, argv); returns the previous one.

    Example:
        >>> old = set_source({"script": "train.py"}); _ = set_source(old)
    """
    global _SOURCE
    previous, _SOURCE = _SOURCE, dict(source or {})
    return previous


def rng_state() -> dict:
    """The CPU and (when initialised) CUDA generators' states, as tensors.

    Example:
        >>> sorted(rng_state())
        ['cpu', 'cuda']
    """
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        try:
            return type(obj)({k: _to_cpu(v) for k, v in obj.items()})
        except TypeError:
            return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):            # namedtuple
        return type(obj)(*(_to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _is_ours(fn: Any) -> bool:
    fn = getattr(fn, "func", fn)                          # functools.partial
    owner = getattr(fn, "__self__", None)                 # a bound method's object
    mod = type(owner).__module__ if owner is not None else getattr(fn, "__module__", None)
    return isinstance(mod, str) and mod.startswith("gradtrace")


class _ModelPickler(pickle.Pickler):
    """Pickles the module tree without tensor data: parameters and tensors become
    placeholders (shape, dtype) filled from the state dict on load, so the weights are
    stored once and tensor hooks (a monitor's) are left behind."""

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, torch.Tensor):
            data = None
            if not isinstance(obj, nn.Parameter):     # e.g. a non-persistent buffer: keep it
                buf = io.BytesIO()
                torch.save(obj.detach().cpu().clone(), buf)
                data = buf.getvalue()
            return ("tensor", isinstance(obj, nn.Parameter), tuple(obj.shape), str(obj.dtype),
                    obj.requires_grad, data)
        return None


def _pickle_model(model: nn.Module, only_ours: bool = True) -> bytes | None:
    # Take hooks out of every module for the duration of the pickling (the training is
    # paused: we run inside its optimizer step) and put them back in order. gradtrace's own
    # hooks are bound to a live monitor; a user's lambda hook does not pickle, so on a
    # second try every hook is left out (the bundle notes it).
    saved = []
    for m in model.modules():
        for attr in _HOOK_TABLES:
            table = getattr(m, attr, None)
            if isinstance(table, dict) and table:
                drop = [k for k, v in table.items() if not only_ours or _is_ours(v)]
                if drop:
                    saved.append((table, list(table.items())))
                    for k in drop:
                        del table[k]
    try:
        buf = io.BytesIO()
        _ModelPickler(buf, protocol=4).dump(model)
        return buf.getvalue()
    except Exception:
        return _pickle_model(model, only_ours=False) if only_ours else None
    finally:
        for table, items in saved:
            table.clear()
            table.update(items)


class _ModelUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, main: dict | None):
        super().__init__(file)
        self._main = main

    def find_class(self, module: str, name: str) -> Any:
        if module == "__main__" and self._main is not None and name in self._main:
            return self._main[name]
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        _, is_param, shape, dtype, requires_grad, data = pid
        if data is not None:
            return torch.load(io.BytesIO(data), weights_only=True)
        t = torch.empty(shape, dtype=getattr(torch, dtype.replace("torch.", "")))
        return nn.Parameter(t, requires_grad=requires_grad) if is_param else t


def unpickle_model(blob: bytes, main: dict | None = None) -> nn.Module:
    """Rebuild the model object of a bundle; classes defined in the script come from
    ``main`` (the script's namespace). Parameters hold garbage until the state is loaded.

    Example:
        >>> unpickle_model(_pickle_model(nn.Linear(2, 3))).weight.shape
        torch.Size([3, 2])
    """
    return _ModelUnpickler(io.BytesIO(blob), main).load()


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str | None]]:
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    return [[names.get(id(p)) for p in g["params"]] for g in optimizer.param_groups]


def save_bundle(directory: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                capture: Any, step: int, reason: str, limit: int | None = 1) -> Path | None:
    """Write one replay bundle for ``step`` into ``directory``; returns its path.

    Call it after the step's backward and before the optimizer applies the step.
    ``capture`` has ``args``, ``kwargs`` (the root module's inputs), ``rng_state`` (as
    the forward began: a tensor or :func:`rng_state`'s dict; ``None``: now) and optionally
    ``buffers`` (``{name: tensor}`` before the forward). ``limit``: at most this many
    bundles in ``directory`` (``None``: no bound); past it nothing is written and
    ``None`` is returned. The size is in the bundle's file; ``reason`` names the trigger.

    Example:
        >>> import tempfile; from types import SimpleNamespace
        >>> d = tempfile.mkdtemp(); m = torch.nn.Linear(2, 1)
        >>> cap = SimpleNamespace(args=(torch.ones(1, 2),), kwargs={}, rng_state=None)
        >>> save_bundle(d, model=m, optimizer=None, capture=cap, step=0, reason="x").exists()
        True
        >>> save_bundle(d, model=m, optimizer=None, capture=cap, step=1, reason="x") is None
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    directory = Path(directory)
    if limit is not None and len(list(directory.glob(BUNDLE_GLOB))) >= limit:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict(keep_vars=True).items()}
    before = getattr(capture, "buffers", None) or {}
    for k, v in before.items():              # buffers as they were before this step's forward
        if k in state:
            state[k] = v.detach().cpu().clone()
    rng = getattr(capture, "rng_state", None)
    if rng is None:
        rng = rng_state()
    elif isinstance(rng, torch.Tensor):
        rng = {"cpu": rng, "cuda": []}
    cls = type(model)
    bundle = {
        "format": FORMAT, "step": int(step), "reason": str(reason),
        "torch_version": torch.__version__,
        "model_class": f"{cls.__module__}:{cls.__qualname__}",
        "model_pickle": _pickle_model(model),
        "model_state": state,
        "device": str(next(model.parameters()).device) if any(True for _ in model.parameters()) else "cpu",
        "optimizer_class": None if optimizer is None else f"{type(optimizer).__module__}:{type(optimizer).__qualname__}",
        "optimizer_state": None if optimizer is None else _to_cpu(optimizer.state_dict()),
        "optimizer_params": None if optimizer is None else _param_names(model, optimizer),
        "grads": {n: p.grad.detach().cpu().clone() for n, p in model.named_parameters() if p.grad is not None},
        "args": _to_cpu(tuple(getattr(capture, "args", ()) or ())),
        "kwargs": _to_cpu(dict(getattr(capture, "kwargs", {}) or {})),
        "rng_state": rng,
        "source": dict(_SOURCE),
        "training": model.training,
    }
    path = directory / f"flight-{int(step)}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(bundle, tmp)
    tmp.replace(path)                       # never a half-written bundle under the real name
    return path


def load_bundle(path: str | Path) -> dict:
    """Read a bundle written by :func:`save_bundle` (a pickle: load only bundles you trust).

    Example:
        >>> load_bundle("no/such/flight-0.pt")     # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: no/such/flight-0.pt
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(str(path))
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path} is not a gradtrace flight-recorder bundle ({FORMAT}): "
                         f"{type(e).__name__}") from None
    if not isinstance(bundle, dict) or bundle.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gradtrace flight-recorder bundle ({FORMAT})")
    return bundle


def find_bundle(run: str | Path) -> Path:
    """The bundle of ``run``: a bundle file, a trace directory, or a ``gradtrace run``
    directory holding exactly one trace with a bundle.

    Example:
        >>> find_bundle("no/such/run")     # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        FileNotFoundError: no flight-recorder bundle in no/such/run
    """
    run = Path(run)
    if run.is_file():
        return run
    found = sorted(run.rglob(BUNDLE_GLOB))
    if not found:
        raise FileNotFoundError(f"no flight-recorder bundle in {run}")
    if len({p.parent for p in found}) > 1:
        raise ValueError(f"{run} holds bundles of several traces; name one of: "
                         + ", ".join(sorted(str(p.parent) for p in found)))
    return min(found, key=lambda p: int(p.stem.split("-")[1]))
