"""The trace's on-disk layout: file names, the row schema of a table, the MISSING marker, JSON codecs.

A trace directory (format version 2; ``docs/trace-format.md`` is the full description)::

    meta.json       layers, versions, watch config  (written once, atomically)
    tables.jsonl    one line per table: its row layout; also one line per vector statistic
    t<k>.bin        table k: fixed-width little-endian rows, appended and flushed per record
    events.jsonl    events, and the JSON parts of records (execution order, unknown keys)
    vectors.jsonl   per-record vectors (unit masks, per-time-step gradient norms)

A *table* holds the records that carry one set of statistics (every-step records and
activation-step records are different tables), so "not recorded at this step" is an
absent row. A row is ``step`` (int64), ``time`` (float64, epoch seconds: float32 would
round it to minutes), the per-step ``scalars`` (float64: a learning rate or loss stays
exactly what the user set or printed; few per row, so the cost is small) and the
per-name ``values`` (float32; with hundreds of names per statistic they are nearly all
of the bytes, and seven significant digits are more than a diagnosis reads). A name a
table holds but that a record did not carry is :data:`MISSING` in that cell.
"""
from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np

FORMAT = "gradtrace-trace"
FORMAT_VERSION = 2
META_FILE = "meta.json"
TABLES_FILE = "tables.jsonl"
EVENTS_FILE = "events.jsonl"
VECTORS_FILE = "vectors.jsonl"
V1_RECORDS_FILE = "records.jsonl"
#: Every file a trace owns (``t<k>.bin`` aside); ``overwrite=True`` removes only these.
TRACE_FILES = (META_FILE, TABLES_FILE, EVENTS_FILE, VECTORS_FILE, V1_RECORDS_FILE)

#: Bit pattern of the float32 "not recorded" marker: a quiet NaN whose payload (0xDEAD)
#: no arithmetic produces (a computed NaN carries payload 0), so it never collides with
#: a recorded ``nan``.
MISSING_BITS32 = 0x7FC0DEAD
#: The same NaN as float64: the float32 payload sits in the top mantissa bits, so
#: float64 <-> float32 conversions keep it.
MISSING_BITS64 = 0x7FF0000000000000 | ((MISSING_BITS32 & 0x7FFFFF) << 29)
#: "Not recorded" inside a numpy array of per-name values (a NaN with a distinct payload).
#: Test with :func:`is_missing`, never ``==`` (it is a NaN).
MISSING: float = struct.unpack("<d", struct.pack("<Q", MISSING_BITS64))[0]


def is_missing(a: Any) -> np.ndarray:
    """Boolean mask of the :data:`MISSING` cells of a float32 or float64 array.

    Example:
        >>> is_missing(np.array([1.0, MISSING, float("nan")])).tolist()
        [False, True, False]
    """
    a = np.asarray(a)
    if a.dtype == np.float32:
        return a.view(np.uint32) == MISSING_BITS32
    if a.dtype == np.float64:
        return a.view(np.uint64) == MISSING_BITS64
    raise TypeError(f"is_missing needs a float32 or float64 array, got {a.dtype}")


def row_dtype(n_scalars: int, n_values: int, value_dtype: str = "<f4") -> np.dtype:
    """The numpy dtype of one row of a table (packed, little-endian).

    Example:
        >>> row_dtype(2, 3).itemsize       # 8 + 8 + 2*8 + 3*4
        44
    """
    return np.dtype([("step", "<i8"), ("time", "<f8"), ("scalars", "<f8", (n_scalars,)),
                     ("values", value_dtype, (n_values,))])


class Schema:
    """The layout of one table: which scalars, and which (section, statistic, names) columns.

    ``columns`` is a list of ``(section, stat, idx)`` with ``section`` ``"param"`` or
    ``"module"`` and ``idx`` the positions of the names (in meta order) the table holds.

    Example:
        >>> s = Schema(0, ["loss"], [("param", "grad_norm", (0, 1))])
        >>> s.n_values, s.offsets[("param", "grad_norm")]
        (2, 0)
    """

    def __init__(self, k: int, scalars: list[str], columns: list[tuple[str, str, tuple[int, ...]]]):
        self.k = k
        self.scalars = list(scalars)
        self.columns = [(sec, stat, tuple(int(i) for i in idx)) for sec, stat, idx in columns]
        self.file = f"t{k}.bin"
        self.key = (tuple(self.scalars), tuple(c[1] for c in self.columns if c[0] == "param"),
                    tuple(c[1] for c in self.columns if c[0] == "module"))
        self.col_pos = {(sec, stat): i for i, (sec, stat, _) in enumerate(self.columns)}
        self.offsets: dict[tuple[str, str], int] = {}
        off = 0
        for sec, stat, idx in self.columns:
            self.offsets[(sec, stat)] = off
            off += len(idx)
        self.n_values = off

    def dtype(self, value_dtype: str = "<f4") -> np.dtype:
        return row_dtype(len(self.scalars), self.n_values, value_dtype)

    def to_json(self) -> dict[str, Any]:
        return {"table": self.k, "file": self.file, "scalars": self.scalars,
                "columns": [[sec, stat, list(idx)] for sec, stat, idx in self.columns],
                "row": [list(d) if len(d) == 2 else [d[0], d[1], list(d[2])]
                        for d in self.dtype().descr]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Schema":
        return cls(int(d["table"]), d["scalars"], [(c[0], c[1], c[2]) for c in d["columns"]])


# ---- JSON parts --------------------------------------------------------------------------
def encode_json(x: Any) -> Any:
    """Non-finite floats as the strings ``"nan"``, ``"inf"``, ``"-inf"`` (portable JSON).

    Example:
        >>> encode_json({"a": [1.0, float("inf")]})
        {'a': [1.0, 'inf']}
    """
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: encode_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode_json(v) for v in x]
    return x


def plain(x: Any) -> Any:
    """JSON fallback for user values: numpy/torch scalars and arrays become numbers or lists,
    anything else its ``str``.

    Example:
        >>> plain(np.float32(0.5)), plain(object)
        (0.5, "<class 'object'>")
    """
    if hasattr(x, "tolist"):
        return encode_json(x.tolist())
    if hasattr(x, "item"):
        return encode_json(x.item())
    return str(x)


def dumps(obj: Any) -> str:
    """One compact JSON line; the fast path when every float is finite.

    Example:
        >>> dumps({"step": 1, "x": float("nan")})
        '{"step":1,"x":"nan"}'
    """
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=plain)
    except ValueError:
        return json.dumps(encode_json(obj), separators=(",", ":"), default=plain)


def decode_number(v: Any) -> float:
    """The one number decoder: a stored value (float, int, ``"nan"``/``"inf"`` string,
    ``None`` = not recorded) as a float; ``None`` becomes NaN.

    Example:
        >>> decode_number("inf"), decode_number(3)
        (inf, 3.0)
    """
    if v is None:
        return math.nan
    return float(v)


def decode_vector(v: Any) -> np.ndarray:
    """A stored vector: a packed bit mask ``"<n>:<hex>"`` (see :func:`pack_mask`) as a
    bool array, or a list of numbers as float64.

    Example:
        >>> decode_vector("3:05").tolist(), decode_vector([1, "nan"]).tolist()
        ([True, False, True], [1.0, nan])
    """
    if isinstance(v, str):  # a packed bit mask, hex, LSB first
        n_bits, hexstr = v.split(":", 1)
        raw = np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8)
        return np.unpackbits(raw, bitorder="little")[: int(n_bits)].astype(bool)
    return np.asarray([decode_number(x) for x in v], dtype=np.float64)


def decode_vectors(raw: list) -> np.ndarray:
    """Many stored vectors at once: a 2-D array when they share a length (bit masks are
    unpacked in one call), else an object array of :func:`decode_vector` results.

    Example:
        >>> decode_vectors(["3:05", "3:02"]).tolist()
        [[True, False, True], [False, True, False]]
    """
    if raw and all(isinstance(v, str) for v in raw):
        heads = {v.partition(":")[0] for v in raw}
        if len(heads) == 1:
            n_bits = int(heads.pop())
            data = bytes.fromhex("".join(v.partition(":")[2] for v in raw))
            rows = np.frombuffer(data, dtype=np.uint8).reshape(len(raw), -1)
            return np.unpackbits(rows, axis=1, bitorder="little")[:, :n_bits].astype(bool)
    values = [decode_vector(v) for v in raw]
    if len({v.shape for v in values}) == 1:
        return np.stack(values) if values else np.zeros((0, 0))
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def pack_mask(mask: np.ndarray) -> str:
    """Pack a boolean vector into the trace's compact ``"<n>:<hex>"`` form.

    Example:
        >>> pack_mask(np.array([True, False, True]))
        '3:05'
    """
    mask = np.asarray(mask, dtype=bool).ravel()
    return f"{mask.size}:" + np.packbits(mask, bitorder="little").tobytes().hex()
