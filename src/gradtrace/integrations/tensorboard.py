"""A TensorBoard sink: scalars and per-layer figures, grouped so the UI stays usable.

Tags: run-level scalars go under ``gradtrace/`` (``gradtrace/total_grad_norm``,
``gradtrace/loss``); per-layer figures under one section per statistic
(``grad_norm/encoder.0.weight``, ``update_ratio/...``), so TensorBoard shows one
collapsible group per statistic instead of thousands of loose charts. Optionally one
histogram per statistic and step across layers (``hist/grad_norm``, of log10 values).
Events (non-finite, guard skips, AMP skips) are written as text under ``gradtrace/events``.

Example:
    >>> from gradtrace.integrations.tensorboard import TensorBoardSink
    >>> sink = TensorBoardSink("runs/tb")   # gt.watch(..., sinks=[sink]); then: tensorboard --logdir runs/tb
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import numpy as np

from ._extras import DEFAULT_LAYER_STATS, RecordSink, require


class TensorBoardSink(RecordSink):
    """Writes gradtrace records to a TensorBoard log directory.

    Args:
        logdir: where the event files go (or pass ``writer``).
        stats: per-layer statistics to write (default: the usual dashboard ones;
            ``None`` for all of them).
        histograms: also write one histogram per statistic per step, across layers,
            of log10 of the (positive) values.
        writer: an existing ``torch.utils.tensorboard.SummaryWriter`` to write into
            (it is flushed, not closed, at the end).

    Example:
        >>> sink = TensorBoardSink("runs/tb", histograms=True)
        >>> with gt.watch(model, optimizer, sinks=[sink]) as mon:
        ...     loss_fn(model(x), y).backward(); optimizer.step()
        >>> import os; any(f.startswith("events.out") for f in os.listdir("runs/tb"))
        True
    """

    def __init__(self, logdir: str | os.PathLike | None = None, *,
                 stats: tuple[str, ...] | None = DEFAULT_LAYER_STATS,
                 histograms: bool = False, writer: Any = None):
        require("tensorboard", "tensorboard")
        if writer is None and logdir is None:
            raise ValueError("TensorBoardSink needs a logdir (or writer=SummaryWriter(...))")
        super().__init__(stats)
        self.logdir = None if logdir is None else str(logdir)
        self.histograms = bool(histograms)
        self._own = writer is None
        self._writer = writer

    def _open(self, meta: dict) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter
            self._writer = SummaryWriter(log_dir=self.logdir)

    @staticmethod
    def tag(stat: str, name: str) -> str:
        """The tag a value is written under.

        Example:
            >>> TensorBoardSink.tag("grad_norm", "encoder.0.weight")
            'grad_norm/encoder.0.weight'
            >>> TensorBoardSink.tag("loss", "")
            'gradtrace/loss'
        """
        return f"gradtrace/{stat}" if not name else f"{stat}/{name}"

    def _event(self, record: dict) -> None:
        self._writer.add_text("gradtrace/events", json.dumps(record, default=str)[:4000],
                              int(record.get("step", 0)))

    def _values(self, step: int, values) -> None:
        per_stat: dict[str, list[float]] = defaultdict(list)
        for stat, name, value in values:
            self._writer.add_scalar(self.tag(stat, name), value, step)
            if name:
                per_stat[stat].append(value)
        if self.histograms:
            for stat, vals in per_stat.items():
                v = np.asarray([x for x in vals if x > 0 and math.isfinite(x)], dtype=np.float64)
                if v.size:
                    self._writer.add_histogram(f"hist/{stat}", np.log10(v), step)

    def _close(self) -> None:
        self._writer.flush()
        if self._own:
            self._writer.close()
