"""A Weights & Biases sink: run-level scalars and per-layer figures, grouped by statistic.

Keys follow the same layout as the TensorBoard sink (``gradtrace/loss``,
``grad_norm/<param>``); W&B draws one panel section per prefix. Events are logged as
``gradtrace/event`` text and counted in the run summary.

Example:
    >>> from gradtrace.integrations.wandb import WandbSink
    >>> WandbSink.key("loss", "")          # gt.watch(..., sinks=[WandbSink(project="my-run")])
    'gradtrace/loss'
"""
from __future__ import annotations

import json
from typing import Any

from ._extras import DEFAULT_LAYER_STATS, RecordSink, require


class WandbSink(RecordSink):
    """Logs gradtrace records to W&B.

    Args:
        run: an existing ``wandb`` run to log into (not finished at the end);
            otherwise one is started with ``wandb.init(**init_kwargs)`` and finished by
            :meth:`close`. Offline runs work (``WANDB_MODE=offline`` or ``mode="offline"``).
        stats: per-layer statistics to log (default: the usual dashboard ones; ``None``: all).
        **init_kwargs: passed to ``wandb.init`` (``project``, ``dir``, ``mode``, ...).

    Example:
        >>> sink = WandbSink(project="demo", mode="offline", dir="wb")   # the run starts with gt.watch
        >>> sink.run is None and sink.events == 0
        True
    """

    def __init__(self, run: Any = None, *, stats: tuple[str, ...] | None = DEFAULT_LAYER_STATS,
                 **init_kwargs: Any):
        self._wandb = require("wandb", "wandb")
        super().__init__(stats)
        self.run = run
        self._own = run is None
        self._init_kwargs = init_kwargs
        self.events = 0

    def _open(self, meta: dict) -> None:
        if self.run is None:
            self.run = self._wandb.init(**self._init_kwargs)
        self.run.config.update({"gradtrace": meta.get("config", {})}, allow_val_change=True)

    @staticmethod
    def key(stat: str, name: str) -> str:
        """The key a value is logged under.

        Example:
            >>> WandbSink.key("grad_norm", "fc.weight")
            'grad_norm/fc.weight'
        """
        return f"gradtrace/{stat}" if not name else f"{stat}/{name}"

    def _event(self, record: dict) -> None:
        self.events += 1
        self.run.summary["gradtrace/events"] = self.events
        self.run.log({"gradtrace/event": json.dumps(record, default=str)[:4000]})

    def _values(self, step: int, values) -> None:
        data = {self.key(s, n): v for s, n, v in values}
        data["gradtrace/step"] = step
        self.run.log(data)

    def _close(self) -> None:
        if self._own:
            self.run.finish()
            self.run = None
