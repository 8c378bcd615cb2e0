"""Lightning: a ``Callback`` that records gradtrace statistics of the LightningModule.

Lightning runs the training step *inside* ``optimizer.step(closure)``, so an
optimizer's own pre-step hook fires before the gradients exist. The monitor takes the
gradient figures at the end of backward (pre-clip); this callback looks at them in
``on_before_optimizer_step`` (before the update: a non-finite step is replayed there)
and closes the step after the optimizer step, when the monitor also notices that
Lightning clipped (``total_grad_norm_post_clip`` and ``grad_changed_ratio``; torch's
optimizers never write ``.grad`` in place, so the change seen then is the clip). Scalars go to every logger of the trainer under ``gradtrace/``; the
trace goes to ``out`` (rank 0 only under DDP).

Example (a tiny module, three steps on the CPU, clipped by Lightning):
    >>> import lightning.pytorch as L
    >>> from gradtrace.integrations.lightning import GradTraceCallback
    >>> class Tiny(L.LightningModule):
    ...     def __init__(self):
    ...         super().__init__(); self.net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    ...     def training_step(self, batch, batch_idx):
    ...         return self.net(batch[0]).pow(2).mean()
    ...     def configure_optimizers(self):
    ...         return torch.optim.SGD(self.parameters(), lr=0.01)
    >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(24, 4)), batch_size=8)
    >>> trainer = L.Trainer(max_steps=3, callbacks=[GradTraceCallback(out="runs/lit")], logger=False,
    ...                     gradient_clip_val=0.5, enable_progress_bar=False, enable_model_summary=False,
    ...                     enable_checkpointing=False, accelerator="cpu")
    >>> trainer.fit(Tiny(), loader)
    >>> len(gt.load("runs/lit"))
    3
"""
from __future__ import annotations

from typing import Any


from ._extras import require

try:                                    # the unified package first, then the old name
    _pl = require("lightning.pytorch", "lightning")
except ImportError:
    try:
        import pytorch_lightning as _pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError("gradtrace: the Lightning integration needs 'lightning'; run:  "
                          "pip install gradtrace[lightning]") from None

#: scalars forwarded to the trainer's loggers
LOGGED_SCALARS = ("total_grad_norm", "total_grad_norm_post_clip", "grad_changed_ratio", "loss", "lr")


class GradTraceCallback(_pl.Callback):
    """Record gradtrace statistics while ``trainer.fit`` runs.

    Args:
        out: trace directory (``None``: keep it in memory as ``callback.trace``).
        log_scalars: send ``total_grad_norm`` (pre-clip), ``total_grad_norm_post_clip``,
            ``grad_changed_ratio``, ``loss`` and ``lr`` to the trainer's loggers.
        log_layers: also send per-parameter gradient norms (``gradtrace/grad_norm/<name>``).
        **watch_kwargs: anything :func:`gradtrace.watch` takes (``every``,
            ``activations_every``, ``layers``, ``preset``, ``sinks``...).

    Watches the first optimizer of the trainer.

    Example (the module docstring trains with one):
        >>> cb = GradTraceCallback(out="runs/lit", every=1, activations_every=5)
        >>> cb.watch_kwargs, cb.log_scalars
        ({'every': 1, 'activations_every': 5}, True)
    """

    def __init__(self, out: str | None = None, *, log_scalars: bool = True,
                 log_layers: bool = False, **watch_kwargs: Any):
        super().__init__()
        if "optimizer" in watch_kwargs:
            raise TypeError("GradTraceCallback watches the trainer's optimizer; do not pass optimizer=")
        self.out = out
        self.log_scalars = log_scalars
        self.log_layers = log_layers
        self.watch_kwargs = watch_kwargs
        self.monitor: Any = None
        self._trainer: Any = None
        self._hook: Any = None
        self._collected = False

    # ---- lifecycle ----------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        from ..record import Monitor
        if self.monitor is not None:
            return
        if not trainer.optimizers:
            raise RuntimeError("GradTraceCallback: the trainer has no optimizer (configure_optimizers)")
        opt = trainer.optimizers[0]
        self._trainer = trainer
        sinks = list(self.watch_kwargs.pop("sinks", ()))
        if self.log_scalars and trainer.loggers:
            sinks.append(_LoggerSink(trainer, self.log_layers))
        # No optimizer hooks (they would fire before Lightning's closure): the callback
        # drives the step; the optimizer is set afterwards for lr and update ratios.
        self.monitor = Monitor(pl_module, None, out=self.out, sinks=sinks, **self.watch_kwargs)
        self.monitor.optimizer = opt
        self._hook = opt.register_step_post_hook(self._after_step)

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if self.monitor is not None:
            self.monitor.record_loss(loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        mon = self.monitor
        if mon is None or optimizer is not mon.optimizer:
            return
        mon.collect()                                  # pre-clip figures, before the update
        self._collected = True

    def _after_step(self, optimizer, args, kwargs) -> None:
        mon = self.monitor
        if mon is None or not self._collected:
            return
        self._collected = False
        mon.finish()                                   # notices a clip; one record                                   # one record; the step closes

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        mon = self.monitor
        if mon is not None and self._collected:
            # on_before_optimizer_step ran but the optimizer did not step: a 16-bit
            # GradScaler skipped it after an overflow. Not an explosion: say so.
            self._collected = False
            mon.skip_step("amp_skip")

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.monitor is not None:
            self.monitor.close(exception)
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.monitor is not None:
            self.monitor.close()

    @property
    def trace(self):
        """The trace recorded so far (read back from ``out``, or in memory)."""
        if self.monitor is None:
            raise RuntimeError("nothing recorded yet: GradTraceCallback starts on trainer.fit()")
        return self.monitor.trace


class _LoggerSink:
    """Forwards a record's scalars to every logger of a trainer (rank 0 only, as all sinks)."""

    def __init__(self, trainer: Any, layers: bool):
        self.trainer, self.layers, self._meta = trainer, layers, {}

    def start(self, meta: dict) -> None:
        self._meta = meta

    def write(self, record: dict) -> None:
        if "event" in record:
            return
        from ._extras import _num, names_of
        metrics = {f"gradtrace/{k}": _num(v) for k, v in record.get("scalars", {}).items()
                   if k in LOGGED_SCALARS and _num(v) is not None}
        if self.layers:
            for name, v in zip(names_of(self._meta, "param"), record.get("param", {}).get("grad_norm", [])):
                if _num(v) is not None:
                    metrics[f"gradtrace/grad_norm/{name}"] = _num(v)
        if metrics:
            for lg in self.trainer.loggers:
                lg.log_metrics(metrics, step=self.trainer.global_step)

    def close(self) -> None:
        for lg in self.trainer.loggers:
            lg.save()
