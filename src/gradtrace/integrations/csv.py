"""A CSV sink in long format: one row per number, columns ``step, stat, name, value``.

Long format loads straight into pandas (``pd.read_csv(path).pivot_table(...)``) and
any spreadsheet. Events become rows with ``stat="event"`` and the event kind as ``name``.
Needs no extra.

Example:
    >>> from gradtrace.integrations.csv import CSVSink
    >>> with gt.watch(model, opt, sinks=[CSVSink("runs/stats.csv")]):   # doctest: +SKIP
    ...     ...
"""
from __future__ import annotations

import csv as _csv
import json
import os
from pathlib import Path
from typing import Any

from ._extras import flatten

HEADER = ("step", "stat", "name", "value")


class CSVSink:
    """Writes every recorded number of a run to ``path`` as ``step,stat,name,value`` rows.

    Args:
        path: the CSV file (its directory is created; an existing file is replaced).
        stats: per-layer statistics to keep (default: all); scalars are always kept.

    Example:
        >>> sink = CSVSink("stats.csv")                              # doctest: +SKIP
        >>> gt.watch(model, opt, sinks=[sink])                        # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, stats: tuple[str, ...] | None = None):
        self.path = Path(path)
        self.stats = None if stats is None else tuple(stats)
        self._meta: dict = {}
        self._file = None
        self._writer: Any = None

    def start(self, meta: dict) -> None:
        """Open the file and write the header (called by the monitor).

        Example:
            >>> sink.start(meta)                                   # doctest: +SKIP
        """
        self._meta = meta
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = _csv.writer(self._file)
        self._writer.writerow(HEADER)

    def write(self, record: dict) -> None:
        """Append the rows of one record or event, flushed.

        Example:
            >>> sink.write({"step": 0, "scalars": {"loss": 2.3}})  # doctest: +SKIP
        """
        if self._writer is None:
            raise RuntimeError("CSVSink.write() before start(): pass the sink to gt.watch(sinks=[...])")
        if "event" in record:
            extra = {k: v for k, v in record.items() if k not in ("event", "step")}
            self._writer.writerow((record.get("step"), "event", record["event"],
                                   json.dumps(extra, default=str)[:2000]))
        else:
            step = record["step"]
            self._writer.writerows((step, stat, name, repr(value))
                                   for stat, name, value in flatten(record, self._meta, self.stats))
        self._file.flush()

    def close(self) -> None:
        """Close the file. Safe to call twice.

        Example:
            >>> sink.close()                                       # doctest: +SKIP
        """
        if self._file is not None and not self._file.closed:
            self._file.close()
