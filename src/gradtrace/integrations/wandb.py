"""A Weights & Biases sink: run-level scalars and per-layer figures, grouped by statistic.

Keys follow the same layout as the TensorBoard sink (``gradtrace/loss``,
``grad_norm/<param>``); W&B draws one panel section per prefix. Events are logged as
``gradtrace/event`` text and counted in the run summary.

Example:
    >>> from gradtrace.integrations.wandb import WandbSink
    >>> with gt.watch(model, opt, sinks=[WandbSink(project="my-run")]):   # doctest: +SKIP
    ...     ...
"""
from __future__ import annotations

import json
from typing import Any

from ._extras import DEFAULT_LAYER_STATS, flatten, require


class WandbSink:
    """Logs gradtrace records to W&B.

    Args:
        run: an existing ``wandb`` run to log into (not finished at the end);
            otherwise one is started with ``wandb.init(**init_kwargs)`` and finished by
            :meth:`close`. Offline runs work (``WANDB_MODE=offline`` or ``mode="offline"``).
        stats: per-layer statistics to log (default: the usual dashboard ones; ``None``: all).
        **init_kwargs: passed to ``wandb.init`` (``project``, ``dir``, ``mode``, ...).

    Example:
        >>> sink = WandbSink(project="demo", mode="offline", dir="runs/wb")   # doctest: +SKIP
    """

    def __init__(self, run: Any = None, *, stats: tuple[str, ...] | None = DEFAULT_LAYER_STATS,
                 **init_kwargs: Any):
        self._wandb = require("wandb", "wandb")
        self.run = run
        self._own = run is None
        self.stats = None if stats is None else tuple(stats)
        self._init_kwargs = init_kwargs
        self._meta: dict = {}
        self.events = 0

    def start(self, meta: dict) -> None:
        """Start (or join) the run and store the watch configuration in its config.

        Example:
            >>> sink.start(meta)                                   # doctest: +SKIP
        """
        self._meta = meta
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

    def write(self, record: dict) -> None:
        """Log one record (or event) at its optimizer step.

        Example:
            >>> sink.write({"step": 0, "scalars": {"loss": 2.3}})  # doctest: +SKIP
        """
        if self.run is None:
            raise RuntimeError("WandbSink.write() before start(): pass it to gt.watch(sinks=[...])")
        if "event" in record:
            self.events += 1
            self.run.summary["gradtrace/events"] = self.events
            self.run.log({"gradtrace/event": json.dumps(record, default=str)[:4000]})
            return
        data = {self.key(s, n): v for s, n, v in flatten(record, self._meta, self.stats)}
        data["gradtrace/step"] = record["step"]
        self.run.log(data)

    def close(self) -> None:
        """Finish the run if this sink started it.

        Example:
            >>> sink.close()                                       # doctest: +SKIP
        """
        if self.run is not None and self._own:
            self.run.finish()
            self.run = None
