"""Hugging Face Transformers: a ``TrainerCallback`` that records gradtrace statistics.

The ``Trainer`` clips gradients *before* any optimizer callback runs; the monitor takes
the gradient figures at the end of each backward pass anyway, so ``total_grad_norm`` is
the pre-clip norm -- the same number the Trainer logs as ``grad_norm``. In
``on_pre_optimizer_step`` (after clipping) the monitor sees that the gradients changed
and records what the optimizer gets (``total_grad_norm_post_clip``,
``grad_changed_ratio``); the step closes in ``on_optimizer_step``. The loss is read from the model output's
``loss`` (rank 0 writes the trace under DDP).

Example (a two-layer GPT-2 built from a local config, three steps on the CPU):
    >>> import transformers as tf
    >>> from gradtrace.integrations.hf import GradTraceCallback
    >>> _ = torch.manual_seed(0)
    >>> lm = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50, n_positions=16))
    >>> ds = [{"input_ids": r, "labels": r} for r in torch.randint(0, 50, (8, 8))]
    >>> args = tf.TrainingArguments(output_dir="hf_out", max_steps=3, per_device_train_batch_size=4,
    ...                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    >>> cb = GradTraceCallback(out="runs/hf")
    >>> import contextlib, io
    >>> with contextlib.redirect_stdout(io.StringIO()):      # the Trainer prints its summary
    ...     _ = tf.Trainer(model=lm, args=args, train_dataset=ds, callbacks=[cb]).train()
    >>> len(gt.load("runs/hf"))
    3
"""
from __future__ import annotations

from typing import Any

import torch

from ._extras import require

_tf = require("transformers", "hf")


class GradTraceCallback(_tf.TrainerCallback):
    """Record gradtrace statistics during ``Trainer.train()``.

    Args:
        out: trace directory (``None``: in memory, ``callback.trace``).
        **watch_kwargs: anything :func:`gradtrace.watch` takes (``every``,
            ``activations_every``, ``layers``, ``preset``, ``sinks``...).

    With gradient accumulation the figures are those of the accumulated gradient of
    the last micro-batch's backward (the one the optimizer uses).

    Example (the module docstring trains with one):
        >>> cb = GradTraceCallback(out="runs/hf", activations_every=10)
        >>> cb.watch_kwargs, cb.monitor
        ({'activations_every': 10}, None)
    """

    def __init__(self, out: str | None = None, **watch_kwargs: Any):
        if "optimizer" in watch_kwargs:
            raise TypeError("GradTraceCallback watches the Trainer's optimizer; do not pass optimizer=")
        self.out = out
        self.watch_kwargs = watch_kwargs
        self.monitor: Any = None
        self._handles: list[Any] = []

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        from ..record import Monitor
        if self.monitor is not None or model is None:
            return
        # No optimizer hooks: the Trainer clips between backward and step, and the
        # figures must be pre-clip. The optimizer is set afterwards for lr and update ratios.
        self.monitor = Monitor(model, None, out=self.out, **self.watch_kwargs)
        self.monitor.optimizer = optimizer
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise RuntimeError("GradTraceCallback: the model has no trainable parameters")
        self._handles.append(model.register_forward_hook(self._on_output))

    def _on_output(self, module, inputs, output) -> None:
        loss = getattr(output, "loss", None)
        if loss is None and isinstance(output, dict):
            loss = output.get("loss")
        if isinstance(loss, torch.Tensor) and module.training and self.monitor is not None:
            self.monitor.record_loss(loss)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.note_clipped()        # the Trainer has clipped by now

    def on_optimizer_step(self, args, state, control, **kwargs):
        mon = self.monitor
        if mon is None:
            return
        mon.finish()

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        """Remove the hooks and close the trace (also done at the end of training)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.monitor is not None:
            self.monitor.close()

    @property
    def trace(self):
        """The trace recorded so far."""
        if self.monitor is None:
            raise RuntimeError("nothing recorded yet: GradTraceCallback starts with trainer.train()")
        return self.monitor.trace
