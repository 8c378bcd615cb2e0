"""Turning a record dict into one fixed-width table row (shared by the file and memory writers).

The recorder hands over a dict shaped as in ``docs/trace-format.md``: ``step``, ``time``,
``scalars`` ``{stat: number}``, ``param``/``module`` ``{stat: per-name values}`` (a list
with ``None`` for "not recorded", or a 1-D float array with :data:`MISSING`), and JSON
parts (``exec_order``, ``vectors``, anything else). Tables are inferred from the records:

* records carrying the same statistics (same scalar names, same ``param`` and ``module``
  statistic names, in the same order) share a table; a new set starts a new table, so
  statistics that appear mid-run just work;
* a table holds, per statistic, the names recorded when it was created; a later record
  of that set that carries a name the table lacks starts a new table holding the union
  of both (the old one is closed), so a name recorded only sometimes costs at most one
  extra table, not one per pattern; a name the table holds but the record lacks is
  :data:`MISSING`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .format import MISSING, Schema, is_missing

#: Record keys the tables hold; any other key goes to the JSON side file untouched.
TABLE_KEYS = frozenset(("step", "time", "scalars", "param", "module", "vectors"))


def _values(v: Any, n: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-name values as ``(array of length n, present mask or None when all present)``;
    absent cells hold MISSING."""
    if isinstance(v, np.ndarray):
        if v.ndim != 1:
            raise ValueError(f"per-name values must be 1-D, got shape {v.shape}")
        a = v.astype(dtype)          # float64 -> float32 keeps MISSING's payload
        missing = is_missing(a)
        present = ~missing if missing.any() else None
    else:
        a = np.array(v, dtype=dtype)           # None -> nan, "nan"/"inf" strings parsed
        nan = np.flatnonzero(np.isnan(a))
        present = None
        if nan.size:                            # tell a recorded nan from a None
            gone = [i for i in nan.tolist() if v[i] is None]
            if gone:
                present = np.ones(a.size, dtype=bool)
                present[gone] = False
                a[gone] = MISSING
    if a.size != n:                             # shorter lists: the rest not recorded
        full = np.full(n, MISSING, dtype=dtype)
        m = min(n, a.size)
        full[:m] = a[:m]
        p = np.zeros(n, dtype=bool)
        p[:m] = True if present is None else present[:m]
        a, present = full, p
    return a, present


class Encoder:
    """Keeps the tables' schemas and encodes records into rows of them.

    Example:
        >>> enc = Encoder(n_params=2, n_modules=0, value_dtype="<f8")
        >>> schema, new, row = enc.encode({"step": 0, "scalars": {"loss": 1.5},
        ...                                "param": {"grad_norm": [0.5, None]}})
        >>> new, schema.columns, row["values"].tolist()
        (True, [('param', 'grad_norm', (0,))], [[0.5]])
    """

    def __init__(self, n_params: int, n_modules: int, value_dtype: str = "<f4",
                 schemas: list[Schema] = ()):
        self.n = {"param": n_params, "module": n_modules}
        self.value_dtype = np.dtype(value_dtype)
        self.schemas: list[Schema] = list(schemas)
        self.current: dict[tuple, Schema] = {}
        self._rows: dict[int, np.ndarray] = {}
        for s in self.schemas:          # resuming: the last table of each set continues
            self.current[s.key] = s

    def encode(self, rec: dict[str, Any]) -> tuple[Schema, bool, np.ndarray]:
        """``(schema, is_new_schema, row)``: ``row`` is a 1-element structured array owned
        by the encoder (reused; write or copy it before the next call)."""
        scal = rec.get("scalars") or {}
        secs = {"param": rec.get("param") or {}, "module": rec.get("module") or {}}
        key = (tuple(scal), tuple(secs["param"]), tuple(secs["module"]))
        cols: list[tuple[str, str, np.ndarray, np.ndarray | None]] = []
        for sec in ("param", "module"):
            for stat, v in secs[sec].items():
                a, present = _values(v, self.n[sec], self.value_dtype)
                cols.append((sec, stat, a, present))
        schema = self.current.get(key)
        new = schema is None or not self._fits(schema, cols)
        if new:
            schema = self._new_schema(list(scal), cols, schema)
        row = self._rows.get(schema.k)
        if row is None:
            row = self._rows[schema.k] = np.zeros(1, dtype=schema.dtype(self.value_dtype.str))
        row["step"] = int(rec["step"])
        t = rec.get("time")
        row["time"] = math.nan if t is None else float(t)
        if schema.scalars:
            row["scalars"][0] = [MISSING if scal.get(s) is None else float(scal[s]) for s in schema.scalars]
        vals = row["values"][0]
        for sec, stat, a, _ in cols:
            idx = schema.columns[schema.col_pos[(sec, stat)]][2]
            off = schema.offsets[(sec, stat)]
            vals[off:off + len(idx)] = a if len(idx) == a.size else a[list(idx)]
        return schema, new, row

    @staticmethod
    def _fits(schema: Schema, cols) -> bool:
        for sec, stat, a, present in cols:
            idx = schema.columns[schema.col_pos[(sec, stat)]][2]
            if len(idx) == a.size:
                continue
            outside = np.ones(a.size, dtype=bool)
            outside[list(idx)] = False
            if present is None or present[outside].any():
                return False
        return True

    def _new_schema(self, scalars: list[str], cols, old: Schema | None) -> Schema:
        columns = []
        for sec, stat, a, present in cols:
            keep = set(range(a.size)) if present is None else set(np.flatnonzero(present).tolist())
            if old is not None:
                keep |= set(old.columns[old.col_pos[(sec, stat)]][2])
            columns.append((sec, stat, tuple(sorted(keep))))
        schema = Schema(len(self.schemas), scalars, columns)
        self.schemas.append(schema)
        self.current[schema.key] = schema
        return schema
