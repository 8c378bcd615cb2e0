"""Writing a trace: ``TraceWriter`` (a directory, never overwritten by accident, resumable),
``MemoryWriter``, the ``Sink`` protocol of live outputs, and ``next_run_dir``.

Each record is encoded into one fixed-width row of its table (see ``format.py``) and
written with one ``write`` system call (table files are unbuffered; JSON lines are
written and flushed), no fsync unless asked, so a process killed with SIGKILL leaves
every complete row readable.
"""
from __future__ import annotations

import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import UsageError
from .encode import TABLE_KEYS, Encoder
from .format import (EVENTS_FILE, FORMAT, FORMAT_VERSION, META_FILE, TABLES_FILE, TRACE_FILES,
                     VECTORS_FILE, Schema, dumps, encode_json)
from .reader import Trace
from .store import read_jsonl, tail_sizes


@runtime_checkable
class Sink(Protocol):
    """A live output that receives what the trace receives (CSV, TensorBoard, W&B...).

    ``start(meta)`` once with the run's metadata, ``write(record)`` per record or event
    (dicts as in ``docs/trace-format.md``), ``close()`` at the end.

    Example:
        >>> class Count:
        ...     def start(self, meta): self.n = 0
        ...     def write(self, record): self.n += 1
        ...     def close(self): pass
        >>> isinstance(Count(), Sink), isinstance(object(), Sink)
        (True, False)
    """

    def start(self, meta: dict[str, Any]) -> None: ...

    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def has_trace(path: str | os.PathLike) -> bool:
    """True if ``path`` holds a gradtrace trace (its ``meta.json``).

    Example:
        >>> has_trace("runs/exp1"), has_trace("runs/nothing-here")
        (True, False)
    """
    return (Path(path) / META_FILE).exists()


def next_run_dir(path: str | os.PathLike) -> str:
    """The first of ``path``, ``path-2``, ``path-3``, ... that holds no trace yet.

    Example:
        >>> next_run_dir("runs/exp1"), next_run_dir("runs/fresh")
        ('runs/exp1-2', 'runs/fresh')
    """
    base = str(path).rstrip("/\\") or str(path)
    candidate, k = base, 2
    while has_trace(candidate):
        candidate, k = f"{base}-{k}", k + 1
    return candidate


def _write_rest(f, data: bytes | bytearray, done: int) -> None:
    """Finish a partial write to an unbuffered file: a regular file takes a row in one
    call, but a partial write is allowed, and then continued here."""
    view = memoryview(data)
    while done < len(data):
        done += f.write(view[done:])


def _layout(meta: dict[str, Any]) -> tuple[list, list]:
    return ([(m.get("name"), m.get("type")) for m in meta.get("modules", [])],
            [(p.get("name"), list(p.get("shape") or [])) for p in meta.get("params", [])])


def _layout_change(old: dict, new: dict) -> str | None:
    for what, a, b in zip(("modules", "parameters"), _layout(old), _layout(new)):
        if a != b:
            gone = [x[0] for x in a if x not in b][:3]
            added = [x[0] for x in b if x not in a][:3]
            return f"the watched {what} differ (only in the trace: {gone}; only in this run: {added})"
    return None


class TraceWriter:
    """Appends records to a trace directory, one flushed row each.

    A directory that already holds a trace is never written over by accident: pass
    ``resume=True`` to append to it (``next_step`` tells the recorder where its step
    numbers continue; a changed model layout raises, a gap becomes a ``resume`` event) or
    ``overwrite=True`` to replace it. ``resume=True`` on a directory without a trace
    starts one.

    Example:
        >>> meta = {"params": [{"name": "w", "shape": [3]}]}
        >>> w = TraceWriter("runs/new", meta)
        >>> w.write({"step": 0, "scalars": {"loss": 2.3}, "param": {"grad_norm": [0.5]}})
        >>> w.close()
        >>> gt.load("runs/new").series("grad_norm", "w").tolist()
        [0.5]
        >>> TraceWriter("runs/new", meta, resume=True).next_step
        1
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], *, resume: bool = False,
                 overwrite: bool = False, fsync: bool = False):
        if resume and overwrite:
            raise UsageError("pass resume=True or overwrite=True, not both")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise UsageError(f"out={str(self.path)!r} is a file; a trace is written into a directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self._failed = False
        self._closed = False
        self._bins: dict[int, Any] = {}
        self._resumed_from: int | None = None
        self._last_step: int | None = None
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        schemas: list[Schema] = []
        self.vector_stats: set[str] = set()
        self.next_step = 0
        if has_trace(self.path) and not (resume or overwrite):
            raise UsageError(
                f"{str(self.path)!r} already holds a gradtrace trace; pass resume=True to append "
                f"to it (step numbers continue from its last step), overwrite=True to replace it, "
                f"or use a new directory: gradtrace.next_run_dir({str(self.path)!r}) gives "
                f"{next_run_dir(self.path)!r}")
        if has_trace(self.path) and resume:
            meta, schemas = self._reopen(meta)
        else:
            if overwrite:
                for f in self.path.iterdir():
                    if f.name in TRACE_FILES or re.fullmatch(r"t\d+\.bin", f.name):
                        f.unlink()
            tmp = self.path / (META_FILE + ".tmp")
            tmp.write_text(json.dumps(encode_json(meta), indent=1))
            os.replace(tmp, self.path / META_FILE)  # atomic: a reader never sees half a meta.json
        self.meta = meta
        self._encoder = Encoder(len(meta.get("params", [])), len(meta.get("modules", [])), "<f4", schemas)
        self._tables = open(self.path / TABLES_FILE, "a", encoding="utf-8")
        self._events = open(self.path / EVENTS_FILE, "a", encoding="utf-8")
        self._vectors = open(self.path / VECTORS_FILE, "a", encoding="utf-8")

    def _reopen(self, meta: dict[str, Any]) -> tuple[dict, list[Schema]]:
        """Resume: check the layout, cut torn tails to whole rows/lines, find the last step."""
        old = json.loads((self.path / META_FILE).read_text(encoding="utf-8"))
        if old.get("format_version", 1) < 2:
            raise UsageError(f"{str(self.path)!r} holds a version-1 trace, which cannot be appended "
                             f"to; pass overwrite=True or use gradtrace.next_run_dir({str(self.path)!r})")
        change = _layout_change(old, meta)
        if change:
            raise UsageError(f"cannot resume the trace in {str(self.path)!r}: {change}; pass "
                             f"overwrite=True or use gradtrace.next_run_dir({str(self.path)!r})")
        for name in (TABLES_FILE, EVENTS_FILE, VECTORS_FILE):
            f = self.path / name
            if f.exists():                      # drop a torn last line before appending
                data = f.read_bytes()
                if data and not data.endswith(b"\n"):
                    with open(f, "r+b") as fh:
                        fh.truncate(data.rfind(b"\n") + 1)
        schemas = []
        for d in read_jsonl(self.path / TABLES_FILE, lambda m: None):
            if "vector" in d:
                self.vector_stats.add(d["vector"])
            else:
                schemas.append(Schema.from_json(d))
        last = -1
        for s in schemas:
            size = tail_sizes(self.path, [s])[s.file]
            f = self.path / s.file
            if f.exists() and f.stat().st_size != size:
                with open(f, "r+b") as fh:
                    fh.truncate(size)
            if size:
                with open(f, "rb") as fh:
                    fh.seek(size - s.dtype().itemsize)
                    last = max(last, int.from_bytes(fh.read(8), "little", signed=True))
        self.next_step = last + 1
        self._resumed_from = self.next_step
        return old, schemas

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (or event); on an I/O error, warn once and stop.

        Example:
            >>> w = TraceWriter("runs/w", {}); w.write({"step": 0, "scalars": {"loss": 2.3}})
            >>> w.close()
        """
        if self._closed or self._failed:
            return
        try:
            if "event" in record:
                self._line(self._events, record)
                return
            step = int(record["step"])
            if self._last_step is not None and step < self._last_step:
                raise ValueError(f"gradtrace: step {step} written after step {self._last_step}; "
                                 f"steps must not go back")
            if self._resumed_from is not None:
                self._line(self._events, {"event": "resume", "step": step, "expected_step": self._resumed_from,
                                          "gap": step - self._resumed_from, "time": time.time()})
                self._resumed_from = None
            self._last_step = step
            schema, new, row = self._encoder.encode(record, copy=False)     # written at once
            if new:
                self._line(self._tables, schema.to_json())
            f = self._bins.get(schema.k)
            if f is None:                      # a new table, or one continued after resume
                # Unbuffered: each row is one write() system call, in the file at once.
                f = self._bins[schema.k] = open(self.path / schema.file, "ab", buffering=0)
            done = f.write(row)
            if done != len(row):
                _write_rest(f, row, done)
            if not record.keys() <= TABLE_KEYS:
                self._line(self._events, {"step": step, **{k: v for k, v in record.items() if k not in TABLE_KEYS}})
            vec = record.get("vectors")
            if vec:
                for stat in vec:
                    if stat not in self.vector_stats:
                        self.vector_stats.add(stat)
                        self._line(self._tables, {"vector": stat})
                self._line(self._vectors, {"step": step, "vectors": vec})
            if self._fsync:
                os.fsync(f.fileno())
        except OSError as e:  # e.g. disk full: training goes on, and we say so once
            self._failed = True
            warnings.warn(f"gradtrace: could not write the trace ({e!r}); recording to "
                          f"{str(self.path)!r} stopped", RuntimeWarning, stacklevel=3)

    def _line(self, f, obj: dict) -> None:
        f.write(dumps(obj) + "\n")
        f.flush()
        if self._fsync:
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the trace files. Safe to call twice.

        Example:
            >>> w = TraceWriter("runs/c", {}); w.close(); w.close()
        """
        if self._closed:
            return
        self._closed = True
        for f in (self._tables, self._events, self._vectors, *self._bins.values()):
            f.close()


class MemoryWriter:
    """Keeps records in a :class:`Trace` in memory (``watch(..., out=None)``).

    Example:
        >>> w = MemoryWriter({}); w.write({"step": 0, "scalars": {"loss": 2.3}})
        >>> w.trace.series("loss")
        array([2.3])
    """

    next_step = 0

    def __init__(self, meta: dict[str, Any]):
        self.trace = Trace({"format": FORMAT, "format_version": FORMAT_VERSION, **meta})

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (or event) to ``self.trace``.

        Example:
            >>> w = MemoryWriter({}); w.write({"step": 3, "scalars": {"loss": 1.0}})
            >>> len(w.trace)
            1
        """
        self.trace._append(record)

    def close(self) -> None:
        """Nothing to release; the trace stays readable.

        Example:
            >>> MemoryWriter({}).close()
        """
