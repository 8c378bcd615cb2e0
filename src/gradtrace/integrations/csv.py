"""A CSV sink in long format: one row per number, columns ``step, stat, name, value``.

Long format loads straight into pandas (``pd.read_csv(path).pivot_table(...)``) and
any spreadsheet. Events become rows with ``stat="event"`` and the event kind as ``name``.
Needs no extra.

Example:
    >>> from gradtrace.integrations.csv import CSVSink
    >>> sink = CSVSink("runs/stats.csv")       # then gt.watch(model, optimizer, sinks=[sink])
"""
from __future__ import annotations

import csv as _csv
import json
import os
from pathlib import Path
from typing import Any

from ._extras import RecordSink

HEADER = ("step", "stat", "name", "value")


class CSVSink(RecordSink):
    """Writes every recorded number of a run to ``path`` as ``step,stat,name,value`` rows.

    Args:
        path: the CSV file (its directory is created; an existing file is replaced).
        stats: per-layer statistics to keep (default: all); scalars are always kept.

    Example:
        >>> with gt.watch(model, optimizer, sinks=[CSVSink("stats.csv")]) as mon:
        ...     loss = loss_fn(model(x), y); mon.record_loss(loss); loss.backward(); optimizer.step()
        >>> open("stats.csv").readline().strip()
        'step,stat,name,value'
    """

    def __init__(self, path: str | os.PathLike, stats: tuple[str, ...] | None = None):
        super().__init__(stats)
        self.path = Path(path)
        self._file = None
        self._writer: Any = None

    def _open(self, meta: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = _csv.writer(self._file)
        self._writer.writerow(HEADER)

    def _event(self, record: dict) -> None:
        extra = {k: v for k, v in record.items() if k not in ("event", "step")}
        self._writer.writerow((record.get("step"), "event", record["event"],
                               json.dumps(extra, default=str)[:2000]))
        self._file.flush()

    def _values(self, step: int, values) -> None:
        self._writer.writerows((step, stat, name, repr(value)) for stat, name, value in values)
        self._file.flush()

    def _close(self) -> None:
        self._file.close()
