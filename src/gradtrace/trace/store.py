"""Where a Trace's data lives: growable arrays in memory, or memory-mapped trace files.

Both stores expose the same things to :class:`~gradtrace.trace.Trace`: ``tables`` (each a
:class:`Table` with a schema and its rows), ``events``, ``extras`` (the JSON parts of
records: execution order, unknown keys), ``vectors`` and ``vector_stats``. The file store
parses JSON only when asked, so opening a long run reads just ``tables.jsonl``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import TraceWarning
from .encode import TABLE_KEYS, Encoder
from .format import EVENTS_FILE, TABLES_FILE, VECTORS_FILE, Schema


class Table:
    """The rows of one table: growable in memory (``data=None``) or a fixed memory map.

    Example:
        >>> t = Table(Schema(0, ["loss"], []), "<f8")
        >>> row = np.zeros(1, t.dtype); row["step"] = 7; t.append(row.tobytes())
        >>> t.steps().tolist()
        [7]
    """

    def __init__(self, schema: Schema, value_dtype: str, data: np.ndarray | None = None):
        self.schema = schema
        self.dtype = schema.dtype(value_dtype)
        self._data = np.zeros(16, dtype=self.dtype) if data is None else data
        self._n = 0 if data is None else len(data)
        self._fixed = data is not None
        self._steps: np.ndarray | None = None

    def append(self, row: bytes) -> None:
        """Add one row given as its bytes (``self.dtype``)."""
        if self._n == len(self._data):       # doubling keeps appends amortised O(1)
            grown = np.zeros(max(16, 2 * len(self._data)), dtype=self.dtype)
            grown[: self._n] = self._data[: self._n]
            self._data = grown
        self._data[self._n] = np.frombuffer(row, dtype=self.dtype)[0]
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def rows(self) -> np.ndarray:
        return self._data[: self._n]

    def steps(self) -> np.ndarray:
        if not self._fixed:
            return self._data["step"][: self._n]
        if self._steps is None:             # one strided pass over the map, then cached
            self._steps = np.array(self._data["step"])
        return self._steps


def _vector_index(vectors: list[dict], stat: str) -> dict[str, tuple[np.ndarray, list]]:
    """name -> (steps, stored values) of one vector statistic, in one pass."""
    acc: dict[str, tuple[list, list]] = {}
    for r in vectors:
        for name, v in r["vectors"].get(stat, {}).items():
            s, raw = acc.setdefault(name, ([], []))
            s.append(r["step"])
            raw.append(v)
    return {n: (np.asarray(s, dtype=np.int64), raw) for n, (s, raw) in acc.items()}


class _VectorIndex:
    """Per-statistic index of the vectors, rebuilt only when more were appended."""

    vectors: list[dict]

    def vector_index(self, stat: str) -> dict[str, tuple[np.ndarray, list]]:
        cache = self.__dict__.setdefault("_vindex", {})
        hit = cache.get(stat)
        if hit is None or hit[0] != len(self.vectors):
            hit = cache[stat] = (len(self.vectors), _vector_index(self.vectors, stat))
        return hit[1]


class MemoryStore(_VectorIndex):
    """Records kept in memory (``watch(out=None)``, v1 traces, ``Trace(meta, records)``).

    Values stay float64 here: nothing is written, so nothing needs shrinking.
    """

    def __init__(self, meta: dict[str, Any]):
        self.encoder = Encoder(len(meta.get("params", [])), len(meta.get("modules", [])), "<f8")
        self.tables: list[Table] = []
        self.events: list[dict] = []
        self.extras: list[dict] = []
        self.vectors: list[dict] = []
        self.vector_stats: dict[str, None] = {}

    def append(self, rec: dict[str, Any]) -> None:
        if "event" in rec:
            self.events.append(rec)
            return
        schema, new, row = self.encoder.encode(rec)
        if new:
            self.tables.append(Table(schema, "<f8"))
        self.tables[schema.k].append(row)
        side = {k: v for k, v in rec.items() if k not in TABLE_KEYS}
        if side:
            self.extras.append({"step": rec["step"], **side})
        vec = rec.get("vectors")
        if vec:
            self.vectors.append({"step": rec["step"], "vectors": vec})
            for stat in vec:
                self.vector_stats.setdefault(stat, None)


def read_jsonl(path: Path, on_torn: Callable[[str], None]) -> list[dict]:
    """Every complete JSON line of ``path``; a torn last line (a writer killed mid-line)
    goes to ``on_torn``; a corrupt line elsewhere raises ``ValueError``."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")
    out = []
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (ValueError, UnicodeDecodeError):
            if lineno >= len(lines) - 1:
                on_torn(f"{path}: line {lineno} is torn (incomplete write); skipped it")
                continue
            raise ValueError(f"{path}: line {lineno} is corrupt; the trace cannot be read") from None
        out.append(rec)
    return out


class FileStore(_VectorIndex):
    """A v2 trace directory: tables memory-mapped at open, JSON side files parsed on first use.

    Rows are counted from the file sizes at open time; a partial last row (a writer
    killed mid-write, or one still writing) is left out with a :class:`TraceWarning`.
    """

    def __init__(self, path: Path, warn: Callable[[str], None]):
        self.path = path
        self._warn = warn
        self.tables: list[Table] = []
        self.vector_stats: dict[str, None] = {}
        for d in read_jsonl(path / TABLES_FILE, warn):
            if "vector" in d:
                self.vector_stats.setdefault(d["vector"], None)
                continue
            schema = Schema.from_json(d)
            if schema.k != len(self.tables):
                raise ValueError(f"{path / TABLES_FILE}: table {schema.k} out of order; the trace is corrupt")
            self.tables.append(self._map(schema))
        self._events: list[dict] | None = None
        self._extras: list[dict] | None = None
        self._vectors: list[dict] | None = None

    def _map(self, schema: Schema) -> Table:
        f = self.path / schema.file
        dtype = schema.dtype()
        size = f.stat().st_size if f.exists() else 0
        n, torn = divmod(size, dtype.itemsize)
        if torn:
            self._warn(f"{f}: the last {torn} bytes are a torn row (incomplete write); skipped them")
        data = (np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n
                else np.zeros(0, dtype=dtype))
        return Table(schema, dtype["values"].base.str, data)

    def _side(self) -> None:
        self._events, self._extras = [], []
        for rec in read_jsonl(self.path / EVENTS_FILE, self._warn):
            (self._events if "event" in rec else self._extras).append(rec)

    @property
    def events(self) -> list[dict]:
        if self._events is None:
            self._side()
        return self._events

    @property
    def extras(self) -> list[dict]:
        if self._extras is None:
            self._side()
        return self._extras

    @property
    def vectors(self) -> list[dict]:
        if self._vectors is None:
            self._vectors = read_jsonl(self.path / VECTORS_FILE, self._warn)
        return self._vectors


def tail_sizes(path: Path, schemas: list[Schema]) -> dict[str, int]:
    """Size of each table file cut to whole rows (what a resumed writer keeps)."""
    out = {}
    for s in schemas:
        f = path / s.file
        size = f.stat().st_size if f.exists() else 0
        out[s.file] = size - size % s.dtype().itemsize
    return out


def warn_once(messages: list[str]) -> Callable[[str], None]:
    def warn(msg: str) -> None:
        messages.append(msg)
        warnings.warn(msg, TraceWarning, stacklevel=4)
    return warn

