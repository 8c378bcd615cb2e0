"""The trace: gradtrace's memory of a run, written append-only and read back as numpy.

Layout of a trace directory::

    meta.json        layers (name, type, shape, activation kind), versions, watch config
    records.jsonl    one JSON object per line, flushed per line:
                       {"step": 12, "scalars": {...}, "param": {stat: [...]},
                        "module": {stat: [...]}, "vectors": {stat: {name: [...]}}}
                     or an event: {"event": "guard_skip", "step": 12, ...}

Per-parameter and per-module statistics are lists aligned with the names in
``meta.json`` (``null`` where a statistic does not apply), so names are written once.
A reader copes with a file that is still being written and with a torn last line left
by a killed process: every complete line is read, the torn one becomes a warning.
"""
from __future__ import annotations

import bisect
import difflib
import itertools
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from .errors import TraceWarning

FORMAT = "gradtrace-trace"
FORMAT_VERSION = 1
META_FILE = "meta.json"
RECORDS_FILE = "records.jsonl"


def _encode(x: Any) -> Any:
    # json cannot carry NaN/inf portably; strings keep them readable by any tool.
    if isinstance(x, float):
        if math.isfinite(x):
            return x
        return "nan" if x != x else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {k: _encode(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_encode(v) for v in x]
    return x


def _plain(x: Any) -> Any:
    """JSON fallback for values a user passes to ``log_event``: numpy/torch scalars and
    arrays become numbers or lists, anything else its ``str``."""
    if hasattr(x, "tolist"):
        return _encode(x.tolist())
    if hasattr(x, "item"):
        return _encode(x.item())
    return str(x)


def _decode_number(v: Any) -> float:
    if v is None:
        return math.nan
    if isinstance(v, str):
        return float(v)
    return float(v)


class Trace:
    """Recorded statistics of one run, as numpy arrays.

    Build one with :func:`load` (a trace directory) or take ``monitor.trace``.

    Example:
        >>> trace = gt.load("runs/exp1")                      # doctest: +SKIP
        >>> trace.series("grad_norm", "encoder.0.weight")     # doctest: +SKIP
        array([0.41, 0.39, ...])
        >>> trace.series("total_grad_norm")                   # doctest: +SKIP
    """

    def __init__(self, meta: dict[str, Any], records: Iterable[dict] = (), path: str | None = None):
        self.meta = meta
        self.path = path
        self.warnings: list[str] = []
        self._records: list[dict] = []
        self._events: list[dict] = []
        self._stat_index: dict[str, str] | None = None
        self._upto: int | None = None      # a view made by upto(): last visible step
        self._n: int | None = None         # ... and how many records that leaves visible
        for r in records:
            self._append(r)

    # ---- construction -------------------------------------------------------------
    def _count(self) -> int:
        return len(self._records) if self._n is None else self._n

    def _visible(self) -> Iterable[dict]:
        if self._n is None:
            return self._records
        return itertools.islice(self._records, self._n)

    def _append(self, rec: dict) -> None:
        if "event" in rec:
            self._events.append(rec)
        else:
            self._records.append(rec)
            if self._stat_index is not None and self._n is None:
                for section in ("scalars", "param", "module", "vectors"):
                    for k in rec.get(section, {}):
                        self._stat_index.setdefault(k, section)

    # ---- names ----------------------------------------------------------------------
    @property
    def params(self) -> list[str]:
        """Qualified names of the watched parameters, in ``named_parameters()`` order."""
        return [p["name"] for p in self.meta.get("params", [])]

    @property
    def modules(self) -> list[str]:
        """Qualified names of the watched modules, in ``named_modules()`` order."""
        return [m["name"] for m in self.meta.get("modules", [])]

    def module_info(self, name: str) -> dict[str, Any]:
        """Metadata of one watched module: ``type``, ``activation`` kind, parameter names.

        Example:
            >>> Trace({"modules": [{"name": "0", "type": "Linear"}]}).module_info("0")["type"]
            'Linear'
        """
        for m in self.meta.get("modules", []):
            if m["name"] == name:
                return m
        raise KeyError(_unknown("module", name, self.modules))

    def param_info(self, name: str) -> dict[str, Any]:
        """Metadata of one watched parameter: ``shape``, ``dtype``, owning ``module``.

        Example:
            >>> Trace({"params": [{"name": "0.weight", "shape": [4, 3]}]}).param_info("0.weight")["shape"]
            [4, 3]
        """
        for p in self.meta.get("params", []):
            if p["name"] == name:
                return p
        raise KeyError(_unknown("parameter", name, self.params))

    @property
    def steps_recorded(self) -> np.ndarray:
        """Optimizer step of every record, ascending."""
        return np.array([r["step"] for r in self._visible()], dtype=np.int64)

    @property
    def records(self) -> list[dict]:
        """The raw step records (dicts as stored in ``records.jsonl``).

        Storage detail kept for compatibility: read through the query methods instead.
        """
        return self._records if self._n is None else self._records[: self._n]

    def __len__(self) -> int:
        return self._count()

    def __repr__(self) -> str:
        where = f" at {self.path!r}" if self.path else " (in memory)"
        return (f"<Trace{where}: {self._count()} records, {len(self.params)} params, "
                f"{len(self.modules)} modules, {len(self._events)} events>")

    # ---- statistics -------------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        """stat name -> section ("scalars" | "param" | "module" | "vectors"), built once and
        kept up to date by ``_append``."""
        if self._stat_index is None:
            out: dict[str, str] = {}
            for r in self._visible():
                for section in ("scalars", "param", "module", "vectors"):
                    for k in r.get(section, {}):
                        out.setdefault(k, section)
            self._stat_index = out
        return self._stat_index

    def stats(self) -> list[str]:
        """Names of every recorded statistic, sorted.

        Example:
            >>> "grad_norm" in trace.stats()                   # doctest: +SKIP
            True
        """
        return sorted(self._index())

    def kind_of(self, stat: str) -> str:
        """Where a statistic lives: ``"scalars"`` (per step), ``"param"``, ``"module"`` or ``"vectors"``.

        Example:
            >>> Trace({}, [{"step": 0, "scalars": {"loss": 2.3}}]).kind_of("loss")
            'scalars'
        """
        index = self._index()
        if stat not in index:
            raise KeyError(_unknown("statistic", stat, list(index)))
        return index[stat]

    def _names_for(self, section: str) -> list[str]:
        return self.params if section == "param" else self.modules

    def series(self, stat: str, name: str | None = None, *, with_steps: bool = False):
        """Values of ``stat`` (for ``name``) over the records where it was recorded.

        Per-step statistics (``total_grad_norm``, ``loss``, ...) take no name. Vector
        statistics (e.g. ``time_grad_norm``) come back as a 2-D array (records x length).
        With ``with_steps=True`` returns ``(steps, values)``.

        Example:
            >>> trace.series("grad_norm", "0.weight")            # doctest: +SKIP
            >>> steps, loss = trace.series("loss", with_steps=True)  # doctest: +SKIP
        """
        section = self.kind_of(stat)
        steps: list[int] = []
        values: list[Any] = []
        if section == "scalars":
            if name is not None:
                raise KeyError(f"statistic {stat!r} is per step and takes no name")
            for r in self._visible():
                if stat in r.get("scalars", {}):
                    steps.append(r["step"])
                    values.append(_decode_number(r["scalars"][stat]))
            arr = np.asarray(values, dtype=np.float64)
        elif section == "vectors":
            if name is None:
                raise KeyError(f"statistic {stat!r} needs a name; recorded for: "
                               f"{sorted({n for r in self._visible() for n in r.get('vectors', {}).get(stat, {})})}")
            known = set()
            for r in self._visible():
                vec = r.get("vectors", {}).get(stat, {})
                known.update(vec)
                if name in vec:
                    steps.append(r["step"])
                    values.append(_decode_vector(vec[name]))
            if not steps:
                raise KeyError(_unknown(f"name for {stat!r}", name, sorted(known)))
            lengths = {len(v) for v in values}
            arr = np.stack(values) if len(lengths) == 1 else np.array(values, dtype=object)
        else:
            names = self._names_for(section)
            if name is None:
                raise KeyError(f"statistic {stat!r} is per {section}; pass one of its names, "
                               f"e.g. {names[:3]}")
            try:
                i = names.index(name)
            except ValueError:
                raise KeyError(_unknown(section if section == "module" else "parameter", name, names)) from None
            for r in self._visible():
                col = r.get(section, {}).get(stat)
                if col is not None and i < len(col) and col[i] is not None:
                    steps.append(r["step"])
                    values.append(_decode_number(col[i]))
            arr = np.asarray(values, dtype=np.float64)
        if with_steps:
            return np.asarray(steps, dtype=np.int64), arr
        return arr

    def matrix(self, stat: str, names: Sequence[str] | None = None,
               steps: Iterable[int] | None = None) -> "Matrix":
        """A per-parameter or per-module statistic as a :class:`Matrix`.

        Rows are the records where ``stat`` was recorded for at least one name (only those
        whose step is in ``steps``, when given); columns are ``names`` (default: all watched
        parameters or modules, in meta order). ``values`` holds the recorded numbers as
        float64, a recorded nan/inf as itself and NaN where nothing was recorded;
        ``recorded`` tells the two NaNs apart. Unpacks as ``steps, names, values``.

        Example:
            >>> w = MemoryWriter({"params": [{"name": "w"}, {"name": "b"}]})
            >>> w.write({"step": 0, "param": {"grad_norm": [0.5, None]}})
            >>> w.write({"step": 1, "param": {"grad_norm": [float("nan"), 0.25]}})
            >>> m = w.trace.matrix("grad_norm")
            >>> m.values.tolist(), m.recorded.tolist()
            ([[0.5, nan], [nan, 0.25]], [[True, False], [True, True]])
            >>> steps, names, values = m                  # the 0.1 triple
            >>> w.trace.matrix("grad_norm", names=["b"], steps=[1]).values.tolist()
            [[0.25]]
        """
        section = self.kind_of(stat)
        if section not in ("param", "module"):
            raise KeyError(f"statistic {stat!r} is not per parameter or per module; use series()")
        all_names = self._names_for(section)
        if names is None:
            cols = list(range(len(all_names)))
            names = list(all_names)
        else:
            if isinstance(names, str):
                raise TypeError("names must be a list of names, not one string")
            index = {n: i for i, n in enumerate(all_names)}
            cols = []
            for n in names:
                if n not in index:
                    raise KeyError(_unknown(section if section == "module" else "parameter", n, all_names))
                cols.append(index[n])
            names = list(names)
        wanted = None if steps is None else {int(s) for s in steps}
        out_steps, rows, masks = [], [], []
        for r in self._visible():
            col = r.get(section, {}).get(stat)
            if col is None or (wanted is not None and r["step"] not in wanted):
                continue
            row = np.full(len(cols), np.nan)
            got = np.zeros(len(cols), dtype=bool)
            for k, j in enumerate(cols):
                if j < len(col) and col[j] is not None:
                    row[k] = _decode_number(col[j])
                    got[k] = True
            out_steps.append(r["step"])
            rows.append(row)
            masks.append(got)
        values = np.stack(rows) if rows else np.zeros((0, len(cols)))
        recorded = np.stack(masks) if masks else np.zeros((0, len(cols)), dtype=bool)
        return Matrix(np.asarray(out_steps, dtype=np.int64), names, values, recorded)

    def names(self, stat: str) -> list[str]:
        """The names ``stat`` was recorded for at least once (meta order; vectors: sorted).

        Example:
            >>> w = MemoryWriter({"modules": [{"name": "a"}, {"name": "b"}]})
            >>> w.write({"step": 0, "module": {"zero_frac": [None, 0.5]},
            ...          "vectors": {"active_mask": {"b": pack_mask(np.ones(3, bool))}}})
            >>> w.trace.names("zero_frac"), w.trace.names("active_mask")
            (['b'], ['b'])
        """
        section = self.kind_of(stat)
        if section == "scalars":
            raise KeyError(f"statistic {stat!r} is per step and has no names")
        if section == "vectors":
            return sorted({n for r in self._visible() for n in r.get("vectors", {}).get(stat, {})})
        m = self.matrix(stat)
        return [n for n, any_ in zip(m.names, m.recorded.any(axis=0)) if any_]

    def scalar(self, stat: str, *, with_steps: bool = False):
        """A per-step statistic (``loss``, ``total_grad_norm``, ``lr``...) over the steps
        where it was recorded; ``with_steps=True`` returns ``(steps, values)``.

        Example:
            >>> w = MemoryWriter({}); w.write({"step": 4, "scalars": {"loss": 2.0}})
            >>> w.trace.scalar("loss", with_steps=True)
            (array([4]), array([2.]))
        """
        if self.kind_of(stat) != "scalars":
            raise KeyError(f"statistic {stat!r} is per {self.kind_of(stat)}, not per step; "
                           f"use series(stat, name) or matrix(stat)")
        return self.series(stat, with_steps=with_steps)

    def events(self, kind: str | None = None) -> list[dict]:
        """Events (guard skips, first non-finite values, exceptions...), optionally of one
        kind, in the order written.

        Example:
            >>> w = MemoryWriter({}); w.write({"event": "guard_skip", "step": 3})
            >>> [e["step"] for e in w.trace.events("guard_skip")]
            [3]
        """
        evs = self._events if self._upto is None else [e for e in self._events
                                                       if e.get("step", 0) <= self._upto]
        if kind is None:
            return list(evs)
        return [e for e in evs if e["event"] == kind]

    # ---- layout -----------------------------------------------------------------------
    def exec_order(self, step: int | None = None) -> list[str]:
        """Watched module names in forward (first-call) order as of ``step``.

        The order is the last one recorded at or before ``step`` (``None``: the latest);
        if none was recorded by then, the first one recorded. Watched modules never seen
        running follow in ``named_modules()`` order, so every module appears once.

        Example:
            >>> w = MemoryWriter({"modules": [{"name": "a"}, {"name": "b"}, {"name": "c"}]})
            >>> w.write({"step": 0, "exec_order": ["b", "a"]})
            >>> w.write({"step": 5, "exec_order": ["a", "b"]})
            >>> w.trace.exec_order(), w.trace.exec_order(step=2)
            (['a', 'b', 'c'], ['b', 'a', 'c'])
        """
        order: list[str] | None = None
        first: list[str] | None = None
        for r in self._visible():
            if "exec_order" not in r:
                continue
            if first is None:
                first = r["exec_order"]
            if step is not None and r["step"] > step:
                break
            order = r["exec_order"]
        order = list(order if order is not None else (first or []))
        seen = set(order)
        return order + [m for m in self.modules if m not in seen]

    def owner(self, param: str) -> str:
        """The watched module that owns ``param``: the deepest watched module holding it.

        Example:
            >>> t = Trace({"params": [{"name": "enc.0.weight", "module": "enc.0"}]})
            >>> t.owner("enc.0.weight")
            'enc.0'
        """
        info = self.param_info(param)
        # Traces written before the owner was stored: the name's parent path.
        return info.get("module") or param.rpartition(".")[0]

    def layers(self, *, with_params: bool = False) -> list[Layer]:
        """Watched modules in forward order as :class:`Layer` (name, type, activation kind,
        parameters owned); ``with_params=True`` keeps only modules owning a watched parameter.

        Example:
            >>> t = Trace({"modules": [{"name": "0", "type": "Linear", "params": ["0.weight"]},
            ...                        {"name": "1", "type": "ReLU", "activation": "relu"}],
            ...            "params": [{"name": "0.weight", "module": "0"}]},
            ...           [{"step": 0, "exec_order": ["0", "1"]}])
            >>> [(l.name, l.activation) for l in t.layers()]
            [('0', None), ('1', 'relu')]
            >>> [l.name for l in t.layers(with_params=True)]
            ['0']
        """
        owned: dict[str, list[str]] = {}
        for p in self.params:
            owned.setdefault(self.owner(p), []).append(p)
        out = []
        for name in self.exec_order():
            info = self.module_info(name)
            ps = tuple(owned.get(name, ()))
            if with_params and not ps:
                continue
            out.append(Layer(name, info.get("type"), info.get("activation"), ps))
        return out

    # ---- views ------------------------------------------------------------------------
    @property
    def steps(self) -> np.ndarray:
        """Optimizer step of every visible record, ascending (same as ``steps_recorded``).

        Example:
            >>> w = MemoryWriter({}); w.write({"step": 2}); w.write({"step": 5})
            >>> w.trace.steps.tolist()
            [2, 5]
        """
        return self.steps_recorded

    def upto(self, step: int) -> "Trace":
        """The run as of ``step``: records and events after it are invisible.

        A view sharing this trace's data (nothing is copied), for online diagnosis.

        Example:
            >>> w = MemoryWriter({})
            >>> for s in range(4): w.write({"step": s, "scalars": {"loss": float(s)}})
            >>> w.trace.upto(1).series("loss").tolist()
            [0.0, 1.0]
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        view = Trace.__new__(Trace)
        view.meta, view.path, view.warnings = self.meta, self.path, self.warnings
        view._records, view._events = self._records, self._events
        view._stat_index = None
        limit = int(step) if self._upto is None else min(int(step), self._upto)
        view._upto = limit
        # Records are ascending in step: the visible ones are a prefix.
        view._n = bisect.bisect_right(self._records, limit, hi=self._count(),
                                      key=lambda r: r["step"])
        return view

class Layer(NamedTuple):
    """A watched module as :meth:`Trace.layers` lists it."""

    name: str
    type: str | None
    activation: str | None
    params: tuple[str, ...]


class Matrix(tuple):
    """Result of :meth:`Trace.matrix`: ``steps`` (int64, rows), ``names`` (columns),
    ``values`` (float64; NaN where not recorded) and ``recorded`` (bool, same shape).

    It is also the tuple ``(steps, names, values)`` that gradtrace 0.1 returned, so
    ``steps, names, values = trace.matrix(stat)`` keeps working.

    Example:
        >>> m = Matrix(np.array([0]), ["w"], np.array([[1.0]]), np.array([[True]]))
        >>> m.values.shape, m[2] is m.values
        ((1, 1), True)
    """

    def __new__(cls, steps: np.ndarray, names: list[str], values: np.ndarray, recorded: np.ndarray):
        self = super().__new__(cls, (steps, names, values))
        self.recorded = recorded
        return self

    @property
    def steps(self) -> np.ndarray:
        return self[0]

    @property
    def names(self) -> list[str]:
        return self[1]

    @property
    def values(self) -> np.ndarray:
        return self[2]


def _decode_vector(v: Any) -> np.ndarray:
    if isinstance(v, str):  # a packed bit mask, hex, LSB first
        n_bits, hexstr = v.split(":", 1)
        raw = np.frombuffer(bytes.fromhex(hexstr), dtype=np.uint8)
        bits = np.unpackbits(raw, bitorder="little")[: int(n_bits)]
        return bits.astype(bool)
    return np.asarray([_decode_number(x) for x in v], dtype=np.float64)


def pack_mask(mask: np.ndarray) -> str:
    """Pack a boolean vector into the trace's compact ``"<n>:<hex>"`` form.

    Example:
        >>> pack_mask(np.array([True, False, True]))
        '3:05'
    """
    mask = np.asarray(mask, dtype=bool).ravel()
    return f"{mask.size}:" + np.packbits(mask, bitorder="little").tobytes().hex()


def _unknown(what: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=5, cutoff=0.5)
    hint = f"; close matches: {close}" if close else f"; known: {list(valid)[:12]}"
    return f"unknown {what} {name!r}{hint}"


# ---- writing ---------------------------------------------------------------------------
class TraceWriter:
    """Appends records to a trace directory, one flushed JSON line each.

    Each record is one ``write`` + ``flush`` (no fsync unless asked), so a process killed
    with SIGKILL leaves every completed line readable. A background writer thread was
    measured and gained nothing: encoding JSON holds the GIL either way.

    Example:
        >>> w = TraceWriter("runs/x", meta)            # doctest: +SKIP
        >>> w.write({"step": 0, "scalars": {"loss": 2.3}})  # doctest: +SKIP
        >>> w.close()                                  # doctest: +SKIP
    """

    def __init__(self, path: str | os.PathLike, meta: dict[str, Any], fsync: bool = False):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
        tmp = self.path / (META_FILE + ".tmp")
        tmp.write_text(json.dumps(_encode(meta), indent=1))
        os.replace(tmp, self.path / META_FILE)  # atomic: a reader never sees half a meta.json
        # A new watch starts a new trace: appending to an old run's records would mix runs.
        self._file = open(self.path / RECORDS_FILE, "w", encoding="utf-8")
        self._fsync = fsync
        self._failed = False

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (or event) as a flushed JSON line; on an I/O error, warn once and stop.

        Example:
            >>> w.write({"step": 0, "scalars": {"loss": 2.3}})   # doctest: +SKIP
        """
        if self._file.closed or self._failed:
            return
        try:  # fast path: almost every record is all finite numbers
            line = json.dumps(record, separators=(",", ":"), allow_nan=False, default=_plain)
        except ValueError:
            line = json.dumps(_encode(record), separators=(",", ":"), default=_plain)
        try:
            self._file.write(line + "\n")
            self._file.flush()
            if self._fsync:
                os.fsync(self._file.fileno())
        except OSError as e:  # e.g. disk full: training goes on, and we say so once
            self._failed = True
            warnings.warn(f"gradtrace: could not write the trace ({e!r}); recording to "
                          f"{str(self.path)!r} stopped", RuntimeWarning, stacklevel=3)

    def close(self) -> None:
        """Close the records file. Safe to call twice.

        Example:
            >>> w.close()                                         # doctest: +SKIP
        """
        if not self._file.closed:
            self._file.close()


class MemoryWriter:
    """Keeps records in a :class:`Trace` in memory (``watch(..., out=None)``).

    Example:
        >>> w = MemoryWriter({}); w.write({"step": 0, "scalars": {"loss": 2.3}})
        >>> w.trace.series("loss")
        array([2.3])
    """

    def __init__(self, meta: dict[str, Any]):
        self.trace = Trace({"format": FORMAT, "format_version": FORMAT_VERSION, **meta})

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (or event) to ``self.trace``.

        Example:
            >>> w = MemoryWriter({}); w.write({"step": 3, "scalars": {"loss": 1.0}})
            >>> len(w.trace)
            1
        """
        # Records are never mutated after they are written, so no copy is needed; the
        # reader accepts float NaN/inf as well as their on-disk string forms.
        self.trace._append(record)

    def close(self) -> None:
        """Nothing to release; the trace stays readable.

        Example:
            >>> MemoryWriter({}).close()
        """
        pass


# ---- reading ---------------------------------------------------------------------------
def load(path: str | os.PathLike) -> Trace:
    """Read a trace directory, also while it is being written or after a crash.

    Raises ``ValueError`` if ``path`` is not a gradtrace trace directory. A torn last
    line (a writer killed mid-write) is skipped with a :class:`TraceWarning`.

    Example:
        >>> trace = gt.load("runs/exp1")              # doctest: +SKIP
        >>> trace.stats()                             # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"trace directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{str(p)!r} is a file; a trace is a directory holding {META_FILE} and {RECORDS_FILE}")
    meta_path = p / META_FILE
    if not meta_path.exists():
        raise ValueError(f"{str(p)!r} is not a gradtrace trace: no {META_FILE} in it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(meta_path)!r} is corrupt (not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(p)!r} is not a gradtrace trace ({META_FILE} has no format={FORMAT!r})")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"trace format version {meta['format_version']} is newer than this "
                         f"gradtrace reads ({FORMAT_VERSION}); upgrade gradtrace")
    trace = Trace(meta, path=str(p))
    rec_path = p / RECORDS_FILE
    if not rec_path.exists():
        return trace
    with open(rec_path, "rb") as f:
        data = f.read()
    lines = data.split(b"\n")
    # A final chunk without newline is a line still being (or never fully) written.
    for lineno, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            if not isinstance(rec, dict) or ("step" not in rec and "event" not in rec):
                raise ValueError("not a record")
        except (ValueError, UnicodeDecodeError):
            is_last = lineno >= len(lines) - 1
            if is_last:
                msg = f"{rec_path}: line {lineno} is torn (incomplete write); skipped it"
                trace.warnings.append(msg)
                warnings.warn(msg, TraceWarning, stacklevel=2)
                continue
            raise ValueError(f"{rec_path}: line {lineno} is corrupt; the trace cannot be read") from None
        trace._append(rec)
    return trace
