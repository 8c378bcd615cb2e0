"""Watch an unmodified training script: ``gradtrace run script.py`` (and ``-m module``).

The script runs as ``python script.py`` would run it (its own ``sys.argv``,
``__name__ == "__main__"``, stdout, stderr, exceptions and exit code). gradtrace finds
what to watch through torch's global hooks, without touching the script:

1. A global optimizer step pre-hook sees every optimizer when it first steps.
2. Until the training loop has come round once (an optimizer steps for the second
   time), global module forward hooks remember the modules called at top level (not
   from inside another module). They are removed then, because a global module hook
   takes every module call off torch's fast path.
3. At an optimizer's first step, its root module is the top-level module holding most
   of the parameters it updates, narrowed to the smallest sub-module that holds them all
   when the rest of the module is trained by someone else (a GAN wrapper around G and D).
   That pair gets the same monitor as ``gt.watch(root, optimizer)``, with its own trace
   in ``OUT/<ModelClass>``.

**The first recorded step is optimizer step 0, gradient figures only**: the monitor is
attached inside step 0's ``optimizer.step()``, after its forward and backward, so step 0
has parameter and gradient figures but no activation figures, and its gradients are read
as the optimizer sees them (after any clipping the script did). From step 1 on, every
figure is the one an explicit ``gt.watch`` placed before the loop would record.
Transformers' ``Trainer`` steps as a plain loop does. Lightning runs forward and backward
inside ``optimizer.step(closure)``: there gradtrace's Lightning callback joins the
trainer before step 0's closure, so step 0 is recorded whole, as with the explicit callback.

Example:
    >>> import pathlib, tempfile
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "train.py").write_text(
    ...     "import torch\\n"
    ...     "m = torch.nn.Linear(4, 1); o = torch.optim.SGD(m.parameters(), lr=0.1)\\n"
    ...     "for _ in range(3):\\n"
    ...     "    o.zero_grad(); m(torch.ones(2, 4)).sum().backward(); o.step()\\n")
    >>> code = run_script(str(d / "train.py"), out=str(d / "run"), summary=False)
    >>> code, sorted(p.name for p in (d / "run").iterdir())
    (0, ['Linear', 'run.json'])
"""
from __future__ import annotations

import contextlib
import gc
import json
import os
import runpy
import sys
import time
import traceback
import weakref
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.modules import module as _module_hooks
from torch.optim import optimizer as _optimizer_hooks

from gradtrace.record import flight
from gradtrace.record.capture import StepCapture

__all__ = ["AutoWatch", "run_script"]


def _is_writer() -> bool:
    """Rank 0 writes (torchrun sets RANK); ``watch`` itself also writes from rank 0 only."""
    return os.environ.get("RANK", "0") == "0"


def _unwrap(m: nn.Module) -> nn.Module:
    """The user's module inside DDP / DataParallel / torch.compile wrappers (for naming)."""
    while True:
        inner = getattr(m, "_orig_mod", None) or (
            getattr(m, "module", None) if type(m).__name__ in ("DistributedDataParallel", "DataParallel") else None)
        if not isinstance(inner, nn.Module):
            return m
        m = inner


def _trainable_ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters() if p.requires_grad}


def find_root(candidates: list[nn.Module], optimizer: torch.optim.Optimizer) -> nn.Module | None:
    """The module whose parameters ``optimizer`` updates, chosen among ``candidates``.

    The candidate holding most of the optimizer's parameters wins; it is then narrowed to
    its smallest sub-module holding all of them, but only when the candidate has trainable
    parameters this optimizer does not update (frozen ones do not count).

    Example:
        >>> g, d = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> gan = nn.ModuleDict({"g": g, "d": d})
        >>> find_root([gan], torch.optim.SGD(d.parameters(), lr=0.1)) is d
        True
    """
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    best, best_n = None, 0
    for c in candidates:
        n = sum(1 for p in c.parameters() if id(p) in wanted)
        if n > best_n:
            best, best_n = c, n
    if best is None:
        return None
    if _trainable_ids(best) <= wanted:
        return best
    held = {id(p) for p in best.parameters()} & wanted
    smallest, size = best, sum(1 for _ in best.parameters())
    for m in best.modules():
        ids = {id(p) for p in m.parameters()}
        if held <= ids and len(ids) < size:
            smallest, size = m, len(ids)
    return smallest


def _lightning_module(optimizer: torch.optim.Optimizer) -> nn.Module | None:
    """The LightningModule (attached to a trainer) holding the optimizer's parameters."""
    if not any(n in sys.modules for n in ("lightning.pytorch", "pytorch_lightning")):
        return None
    wanted = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for o in gc.get_objects():
        t = type(o)
        if (issubclass(t, nn.Module) and any(c.__name__ == "LightningModule" for c in t.__mro__)
                and getattr(o, "_trainer", None) is not None
                and wanted <= {id(p) for p in o.parameters()}):
            return o
    return None


class AutoWatch:
    """Attaches a monitor to each (root module, optimizer) pair as the optimizer first steps.

    ``start()`` installs the global hooks, ``close()`` removes them and closes every
    monitor; ``monitors`` lists ``(trace directory, monitor)`` pairs.

    Example:
        >>> import tempfile
        >>> aw = AutoWatch(tempfile.mkdtemp()).start()
        >>> m = nn.Linear(3, 1); opt = torch.optim.SGD(m.parameters(), lr=0.1)
        >>> m(torch.ones(2, 3)).sum().backward(); opt.step()
        >>> [type(mon.model).__name__ for _, mon in aw.monitors]
        ['Linear']
        >>> aw.close()
    """

    def __init__(self, out: str, *, source: dict | None = None, echo: bool = False,
                 **watch_kwargs: Any):
        self.out = Path(out)
        self.source = dict(source or {})
        self.echo = echo
        self.watch_kwargs = watch_kwargs
        self.monitors: list[tuple[Path, Any]] = []
        self.notes: list[str] = []
        self._seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._top: dict[int, weakref.ref] = {}       # top-level modules called, by id
        self._depth = 0
        # The last top-level call of each module: RNG state and buffers before it, its
        # inputs after it (a reference). Kept only while the module hooks are on, so
        # that a non-finite step 0 still gets its flight-recorder bundle.
        self._before: tuple | None = None
        self._captures: dict[int, Any] = {}
        self._opt_handle = None
        self._mod_handles: list[Any] = []

    # ---- hooks ------------------------------------------------------------------------
    def start(self) -> "AutoWatch":
        self._opt_handle = _optimizer_hooks.register_optimizer_step_pre_hook(self._on_step)
        self._mod_handles = [
            _module_hooks.register_module_forward_pre_hook(self._on_call),
            # always_call: the depth count stays right when a forward raises
            _module_hooks.register_module_forward_hook(self._on_return, with_kwargs=True,
                                                       always_call=True),
        ]
        return self

    def _on_call(self, module: nn.Module, args: Any) -> None:
        if self._depth == 0:
            self._top[id(module)] = weakref.ref(module)
            if torch.is_grad_enabled():
                self._before = (flight.rng_state(),
                                {n: b.detach().clone() for n, b in module.named_buffers()})
        self._depth += 1

    def _on_return(self, module: nn.Module, args: Any, kwargs: Any, output: Any = None) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._before is not None:
            rng, buffers = self._before
            self._before = None
            self._captures[id(module)] = StepCapture(0, args, dict(kwargs or {}), rng, buffers)

    def _drop_module_hooks(self) -> None:
        for h in self._mod_handles:
            h.remove()
        self._mod_handles = []
        self._captures.clear()

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if optimizer in self._seen:
            # The loop came round: every optimizer it uses has stepped once.
            if self._mod_handles:
                self._drop_module_hooks()
            return
        self._seen[optimizer] = True
        try:
            self._attach(optimizer)
        except Exception as e:   # watching must never stop the user's training
            self._note(f"could not watch {type(optimizer).__name__}: {type(e).__name__}: {e}")

    # ---- attaching --------------------------------------------------------------------
    def _attach(self, optimizer: torch.optim.Optimizer) -> None:
        import gradtrace as gt

        tops = [m for m in (r() for r in self._top.values()) if m is not None]
        root = find_root(tops, optimizer)
        lit = _lightning_module(optimizer)
        if lit is not None:
            root = lit
        if root is None:
            # Called outside a module call (functional_call, a compiled graph): look at
            # every live module once (type(), not isinstance: no lazy attribute is touched).
            root = find_root([o for o in gc.get_objects() if issubclass(type(o), nn.Module)], optimizer)
        if root is None:
            self._note(f"{type(optimizer).__name__}: no module holds the parameters it updates; not watched")
            return
        for _, mon in self.monitors:
            if mon.model is root:
                self._note(f"{type(optimizer).__name__} updates {type(root).__name__}, already "
                           f"watched with {type(mon.optimizer).__name__}; its steps are not recorded")
                return
        base = type(_unwrap(root)).__name__
        taken = {p.name for p, _ in self.monitors}
        name, n = base, 2
        while name in taken:
            name, n = f"{base}-{n}", n + 1
        path = self.out / name
        if lit is not None:
            mon = self._lightning(lit, optimizer, path)
            if mon is None:
                return
        else:
            mon = gt.watch(root, optimizer, out=str(path), **self.watch_kwargs)
        self.monitors.append((path, mon))
        self._write_run_json()
        self._flight_step0(root, optimizer, path, mon)
        if self.echo and _is_writer():
            print(f"gradtrace: watching {base} with {type(optimizer).__name__} "
                  f"from its first step -> {path}", file=sys.stderr)

    def _lightning(self, lit: nn.Module, optimizer: torch.optim.Optimizer, path: Path) -> Any:
        # Lightning runs forward and backward inside optimizer.step(closure): this hook
        # fires before them, so optimizer hooks would read the previous step's gradients.
        # gradtrace's Lightning callback takes the figures at the right moments; it joins
        # the trainer's callbacks here, before step 0's closure, so step 0 is complete.
        from gradtrace.integrations.lightning import GradTraceCallback

        trainer = lit._trainer
        if not trainer.optimizers or trainer.optimizers[0] is not optimizer:
            self._note(f"{type(optimizer).__name__} is not the first optimizer of the Lightning "
                       "trainer; only that one is watched")
            return None
        cb = GradTraceCallback(out=str(path), log_scalars=False, **self.watch_kwargs)
        trainer.callbacks.append(cb)
        cb.on_train_start(trainer, lit)
        return cb.monitor

    def _flight_step0(self, root: nn.Module, optimizer: torch.optim.Optimizer, path: Path, mon: Any) -> None:
        # The monitor was attached after step 0's backward, so it cannot see that step go
        # non-finite; look once (one host read, at attach only) and write its bundle.
        cap = self._captures.get(id(root))
        if cap is None or not getattr(mon, "flight_recorder", False) or not _is_writer():
            return
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack([g.float().norm() for g in grads])).all()):
            saved = flight.save_bundle(path / "flight", model=_unwrap(root), optimizer=optimizer,
                                       capture=cap, step=0, reason="nonfinite_grad")
            if saved is not None:
                mon.log_event("flight_bundle", step=0, path=str(saved), bytes=saved.stat().st_size)

    def _note(self, text: str) -> None:
        self.notes.append(text)
        if self.echo and _is_writer():
            print(f"gradtrace: {text}", file=sys.stderr)

    def _write_run_json(self) -> None:
        if not _is_writer():
            return
        self.out.mkdir(parents=True, exist_ok=True)
        info = {**self.source, "created": time.time(),
                "traces": [{"dir": p.name, "model": type(_unwrap(m.model)).__name__,
                            "optimizer": type(m.optimizer).__name__, "first_step": 0}
                           for p, m in self.monitors]}
        (self.out / "run.json").write_text(json.dumps(info, indent=2, default=str))

    def close(self, exc: BaseException | None = None) -> None:
        """Remove every global hook and close every monitor (``exc`` goes into the traces)."""
        if self._opt_handle is not None:
            self._opt_handle.remove()
            self._opt_handle = None
        self._drop_module_hooks()
        for _, mon in self.monitors:
            mon.close(exc)


def _print_summary(aw: AutoWatch) -> None:
    from argparse import Namespace

    from gradtrace.cli import doctor

    if not aw.monitors:
        print("gradtrace: no optimizer stepped, nothing was recorded", file=sys.stderr)
        return
    for path, _ in aw.monitors:
        print(file=sys.stderr)
        # the doctor's own rendering, on stderr: the script's stdout stays its own
        with contextlib.redirect_stdout(sys.stderr):
            try:
                doctor.main(Namespace(run=str(path), json=False))
            except Exception as e:
                print(f"gradtrace: cannot summarise {path}: {type(e).__name__}: {e}")
        bundles = sorted(path.rglob(flight.BUNDLE_GLOB))
        for b in bundles:
            size = b.stat().st_size
            human = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
            print(f"flight recorder: {b} ({human}); "
                  f"see which op made it: gradtrace replay {path}", file=sys.stderr)
        try:
            import gradtrace as gt
            html = gt.report(gt.load(path), path / "report.html")
            print(f"report: {html}", file=sys.stderr)
        except Exception as e:    # the run is done; a report problem must not change its exit
            print(f"gradtrace: no report for {path}: {type(e).__name__}: {e}", file=sys.stderr)


def _user_traceback(exc: BaseException) -> None:
    """Print ``exc`` as Python would for the script: without runpy/gradtrace frames on top."""
    tb = exc.__traceback__
    here = os.path.dirname(__file__)
    while tb is not None and (tb.tb_frame.f_code.co_filename.startswith(here)
                              or tb.tb_frame.f_code.co_filename == runpy.__file__
                              or "<frozen runpy>" in tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    traceback.print_exception(type(exc), exc, tb)


def run_script(target: str, args: list[str] | tuple = (), *, module: bool = False,
               out: str | None = None, summary: bool = True, **watch_kwargs: Any) -> int:
    """Run ``target`` (a script path, or a module name with ``module=True``) under
    :class:`AutoWatch`; returns the script's exit code.

    ``out`` defaults to ``runs/<name>-<YYYYmmdd-HHMMSS>``. ``watch_kwargs`` go to
    ``gt.watch`` (``preset``, ``every``...). With ``summary``, at exit the doctor's
    findings are printed to stderr and each trace gets its HTML report
    (``<trace>/report.html``), whose path is printed too.

    Example:
        >>> run_script("no_such_script.py", out="runs/x", summary=False)
        Traceback (most recent call last):
        gradtrace.errors.UsageError: cannot run 'no_such_script.py': no such file
    """
    from gradtrace.errors import UsageError

    if module:
        import importlib.util

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            spec = importlib.util.find_spec(target)
        except (ImportError, ValueError) as e:
            raise UsageError(f"cannot run module {target!r}: {e}") from None
        if spec is None:
            raise UsageError(f"cannot run module {target!r}: no module named {target!r}")
        argv0, name = spec.origin or target, target.rpartition(".")[2]
        source = {"module": target}
    else:
        if not os.path.isfile(target):
            raise UsageError(f"cannot run {target!r}: no such file")
        argv0, name = target, Path(target).stem
        source = {"script": os.path.abspath(target)}
    if out is None:
        out = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    source.update(argv=[argv0, *args], cwd=os.getcwd())
    aw = AutoWatch(out, source=source, echo=summary, **watch_kwargs)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    sys.argv = [argv0, *args]
    # python script.py puts the script's folder first on sys.path; python -m, the cwd
    sys.path.insert(0, os.getcwd() if module else os.path.dirname(os.path.abspath(target)))
    code, error = 0, None
    previous = flight.set_source(source)
    aw.start()
    try:
        if module:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:                       # sys.exit("message"): Python prints it, exit 1
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt as e:
        error, code = e, 130
        _user_traceback(e)
    except BaseException as e:      # the script's own exception: its traceback, exit 1
        error, code = e, 1
        _user_traceback(e)
    finally:
        aw.close(error)
        flight.set_source(previous)
        sys.argv = saved_argv
        sys.path[:] = saved_path
    if summary and _is_writer():
        sys.stdout.flush()
        _print_summary(aw)
    return code
