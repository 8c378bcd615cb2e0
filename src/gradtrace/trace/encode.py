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
import operator
import struct
from typing import Any

import numpy as np

from .format import MISSING, Schema, is_missing

_HEAD = struct.Struct("<qd")          # step int64, time float64
#: Record keys the tables hold; any other key goes to the JSON side file untouched.
TABLE_KEYS = frozenset(("step", "time", "scalars", "param", "module", "vectors"))


def _flatten(secs: dict[str, dict], n: dict[str, int], dtype: np.dtype) -> tuple[np.ndarray, list | None]:
    """Every per-name value of a record in one array (statistic after statistic, each
    padded to its section's name count), and the flat Python list when every input was a
    list (needed to tell a ``None`` from a recorded nan). Array inputs skip Python
    floats entirely; a ``None`` in a list beside them becomes MISSING here."""
    pieces: list = []
    arrays = False
    for sec in ("param", "module"):
        n_sec = n[sec]
        for v in secs[sec].values():
            if type(v) is list and len(v) == n_sec:      # the recorder's usual shape
                pieces.append(v)
                continue
            if isinstance(v, np.ndarray):
                if v.ndim != 1:
                    raise ValueError(f"per-name values must be 1-D, got shape {v.shape}")
                arrays = True
                a = v.astype(dtype)                       # float64 -> float32 keeps MISSING
                if a.size != n_sec:
                    a = np.concatenate([a, np.full(max(n_sec - a.size, 0), MISSING, dtype)])[:n_sec]
                pieces.append(a)
            else:
                pieces.append((list(v) + [None] * n_sec)[:n_sec])
    if not arrays:
        big: list = []
        for p in pieces:
            big += p                                      # list concatenation runs in C
        return np.array(big, dtype=dtype), big            # None -> nan; "nan"/"inf" parsed
    parts = []
    for p in pieces:
        if isinstance(p, list):
            a = np.array(p, dtype=dtype)
            for i in np.flatnonzero(np.isnan(a)).tolist():
                if p[i] is None:
                    a[i] = MISSING
            p = a
        parts.append(p)
    return np.concatenate(parts), None


class _Fast:
    """How a record of one set of statistics becomes a row of its current table, worked
    out once: a recorder sends the same layout step after step, so its row is one
    ``struct`` pack and one numpy concatenation into a buffer kept for it (plus a column
    selection when the table leaves names out) instead of the general path's checks.
    Right after backward every numpy call costs several times its isolated time
    (measured in the training loop), so the count of calls is what this saves."""

    __slots__ = ("schema", "head", "n", "dtype", "sel", "left_out", "buf", "values")

    def __init__(self, schema: Schema, n: dict[str, int], dtype: np.dtype, sel: np.ndarray,
                 left_out: np.ndarray):
        self.schema = schema
        self.head = struct.Struct(f"<qd{len(schema.scalars)}d")
        self.n = (n["param"], n["module"])
        self.dtype = dtype
        full = left_out.size == 0          # the table holds every name: the values as they are
        self.sel, self.left_out = (None, None) if full else (sel, left_out)
        self.buf = bytearray(self.head.size + schema.n_values * dtype.itemsize)
        self.values = np.frombuffer(self.buf, dtype, schema.n_values, self.head.size)


def _fast_row(fast: _Fast, rec: dict, scal: dict, param: dict, module: dict) -> bool:
    """Fill ``fast.buf`` with the record's row; False when the record needs the general
    path: a value that is not a full-length 1-D numeric array, a scalar that is not a
    plain number (``None``, a string), or a recorded value under a name the table lacks
    (a new table)."""
    vals = []
    for sec, n in ((param, fast.n[0]), (module, fast.n[1])):
        for v in sec.values():
            if type(v) is not np.ndarray or v.shape != (n,):
                return False
            vals.append(v)
    try:
        fast.head.pack_into(fast.buf, 0, rec["step"], rec["time"], *scal.values())
        if fast.sel is None:
            if vals:       # same_kind: float64 -> float32 keeps MISSING; object arrays refuse
                np.concatenate(vals, out=fast.values, casting="same_kind")
        else:
            a = np.concatenate(vals, dtype=fast.dtype, casting="same_kind")
            if not is_missing(a[fast.left_out]).all():
                return False
            np.take(a, fast.sel, out=fast.values)
    except (KeyError, TypeError, ValueError, OverflowError, struct.error):
        return False
    return True


class Encoder:
    """Keeps the tables' schemas and encodes records into rows of them.

    All per-name values of a record are converted in one numpy call; which of the NaNs
    are ``None`` (not recorded) is checked once per record layout and then only
    confirmed, since a recorder leaves the same names out step after step.

    Example:
        >>> enc = Encoder(n_params=2, n_modules=0, value_dtype="<f8")
        >>> schema, new, row = enc.encode({"step": 0, "scalars": {"loss": 1.5},
        ...                                "param": {"grad_norm": [0.5, None]}})
        >>> new, schema.columns, np.frombuffer(row, schema.dtype("<f8"))["values"].tolist()
        (True, [('param', 'grad_norm', (0,))], [[0.5]])
    """

    def __init__(self, n_params: int, n_modules: int, value_dtype: str = "<f4",
                 schemas: list[Schema] = ()):
        self.n = {"param": n_params, "module": n_modules}
        self.value_dtype = np.dtype(value_dtype)
        self.schemas: list[Schema] = list(schemas)
        self.current: dict[tuple, Schema] = {}
        self._sel: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._nones: dict[tuple, tuple[np.ndarray, Any]] = {}
        self._fast: dict[tuple, _Fast] = {}       # statistic names -> the table's row recipe
        for s in self.schemas:          # resuming: the last table of each set continues
            self.current[s.key] = s

    def encode(self, rec: dict[str, Any], copy: bool = True) -> tuple[Schema, bool, bytes | bytearray]:
        """``(schema, is_new_schema, row)``: ``row`` is the row's bytes (``schema.dtype()``).

        With ``copy=False`` a repeated layout's row may be the buffer kept for that layout,
        which the next record of it overwrites: for a caller that writes it at once.
        """
        scal = rec.get("scalars") or {}
        param, module = rec.get("param") or {}, rec.get("module") or {}
        key = (tuple(scal), tuple(param), tuple(module))
        fast = self._fast.get(key)
        if fast is not None and _fast_row(fast, rec, scal, param, module):
            return fast.schema, False, bytes(fast.buf) if copy else fast.buf
        secs = {"param": param, "module": module}
        schema, new, row = self._encode(rec, key, scal, secs)
        if fast is None or fast.schema is not schema:
            # One recipe per layout and table: records that always take the general path
            # (lists, a None scalar) do not rebuild it each time.
            self._fast[key] = _Fast(schema, self.n, self.value_dtype, *self._layout(schema))
        return schema, new, row

    def _encode(self, rec: dict[str, Any], key: tuple, scal: dict, secs: dict) -> tuple[Schema, bool, bytes]:
        """The general path: any value shape, ``None`` in lists, names a table lacks."""
        a, big = _flatten(secs, self.n, self.value_dtype)
        gone = is_missing(a)
        nan = np.isnan(a)
        nan &= ~gone
        if big is not None and nan.any():
            gone |= self._none_mask(key, big, np.flatnonzero(nan), a.size)
            a[gone] = MISSING
        schema = self.current.get(key)
        new = schema is None or bool((~gone[self._layout(schema)[1]]).any())
        if new:
            schema = self._new_schema(key, scal, secs, gone, schema)
        t = rec.get("time")
        head = _HEAD.pack(int(rec["step"]), math.nan if t is None else float(t))
        if schema.scalars:
            head += struct.pack(f"<{len(schema.scalars)}d",
                                *[MISSING if scal.get(s) is None else float(scal[s]) for s in schema.scalars])
        sel = self._layout(schema)[0]
        values = a if sel.size == a.size else a[sel]      # a full table takes every value
        return schema, new, head + values.tobytes()

    def _none_mask(self, key: tuple, big: list, nanpos: np.ndarray, size: int) -> np.ndarray:
        """Which NaN positions of ``big`` are ``None`` (not recorded), not a recorded nan."""
        mask = np.zeros(size, dtype=bool)
        cached = self._nones.get(key)
        if cached is not None and np.array_equal(cached[0], nanpos) and cached[1](big).count(None) == nanpos.size:
            mask[nanpos] = True          # the same names left out as last time
            return mask
        nones = [i for i in nanpos.tolist() if big[i] is None]
        mask[nones] = True
        if len(nones) == nanpos.size:
            get = operator.itemgetter(*nones)
            self._nones[key] = (nanpos, get if len(nones) > 1 else (lambda b, g=get: (g(b),)))
        return mask

    def _layout(self, schema: Schema) -> tuple[np.ndarray, np.ndarray]:
        """Positions, in a record's flattened values, of the table's columns and of the
        values the table has no column for."""
        got = self._sel.get(schema.k)
        if got is None:
            sel, start = [], 0
            for sec, _, idx in schema.columns:
                sel.extend(start + i for i in idx)
                start += self.n[sec]
            inside = np.zeros(start, dtype=bool)
            inside[sel] = True
            got = self._sel[schema.k] = (np.asarray(sel, dtype=np.intp), np.flatnonzero(~inside))
        return got

    def _new_schema(self, key: tuple, scal: dict, secs: dict, gone: np.ndarray, old: Schema | None) -> Schema:
        columns, start = [], 0
        for sec in ("param", "module"):
            for stat in secs[sec]:
                keep = set(np.flatnonzero(~gone[start:start + self.n[sec]]).tolist())
                if old is not None:
                    keep |= set(old.columns[old.col_pos[(sec, stat)]][2])
                columns.append((sec, stat, tuple(sorted(keep))))
                start += self.n[sec]
        schema = Schema(len(self.schemas), list(scal), columns)
        self.schemas.append(schema)
        self.current[key] = schema
        return schema
