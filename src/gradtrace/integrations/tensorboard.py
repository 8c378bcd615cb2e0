"""A TensorBoard sink: scalars and per-layer figures, grouped so the UI stays usable.

Tags: run-level scalars go under ``gradtrace/`` (``gradtrace/total_grad_norm``,
``gradtrace/loss``); per-layer figures under one section per statistic
(``grad_norm/encoder.0.weight``, ``update_ratio/...``), so TensorBoard shows one
collapsible group per statistic instead of thousands of loose charts. Optionally one
histogram per statistic and step across layers (``hist/grad_norm``, of log10 values).
Events (non-finite, guard skips, AMP skips) are written as text under ``gradtrace/events``.

Example:
    >>> from gradtrace.integrations.tensorboard import TensorBoardSink
    >>> with gt.watch(model, opt, sinks=[TensorBoardSink("runs/tb")]):   # doctest: +SKIP
    ...     ...
    # then: tensorboard --logdir runs/tb
"""
from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

from ._extras import DEFAULT_LAYER_STATS, flatten, require


class TensorBoardSink:
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
        >>> sink = TensorBoardSink("runs/tb", histograms=True)      # doctest: +SKIP
        >>> gt.watch(model, opt, sinks=[sink])                        # doctest: +SKIP
    """

    def __init__(self, logdir: str | os.PathLike | None = None, *,
                 stats: tuple[str, ...] | None = DEFAULT_LAYER_STATS,
                 histograms: bool = False, writer: Any = None):
        require("tensorboard", "tensorboard")
        if writer is None and logdir is None:
            raise ValueError("TensorBoardSink needs a logdir (or writer=SummaryWriter(...))")
        self.logdir = None if logdir is None else str(logdir)
        self.stats = None if stats is None else tuple(stats)
        self.histograms = bool(histograms)
        self._own = writer is None
        self._writer = writer
        self._meta: dict = {}

    def start(self, meta: dict) -> None:
        """Open the writer (called by the monitor).

        Example:
            >>> sink.start(meta)                                   # doctest: +SKIP
        """
        self._meta = meta
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

    def write(self, record: dict) -> None:
        """Write one record's scalars (and histograms), or an event as text.

        Example:
            >>> sink.write({"step": 0, "scalars": {"loss": 2.3}})  # doctest: +SKIP
        """
        if self._writer is None:
            raise RuntimeError("TensorBoardSink.write() before start(): pass it to gt.watch(sinks=[...])")
        step = int(record.get("step", 0))
        if "event" in record:
            self._writer.add_text("gradtrace/events", json.dumps(record, default=str)[:4000], step)
            return
        per_stat: dict[str, list[float]] = defaultdict(list)
        for stat, name, value in flatten(record, self._meta, self.stats):
            self._writer.add_scalar(self.tag(stat, name), value, step)
            if name:
                per_stat[stat].append(value)
        if self.histograms:
            import numpy as np
            for stat, values in per_stat.items():
                v = np.asarray([x for x in values if x > 0 and math.isfinite(x)], dtype=np.float64)
                if v.size:
                    self._writer.add_histogram(f"hist/{stat}", np.log10(v), step)

    def close(self) -> None:
        """Flush, and close the writer if this sink opened it.

        Example:
            >>> sink.close()                                       # doctest: +SKIP
        """
        if self._writer is not None:
            self._writer.flush()
            if self._own:
                self._writer.close()
