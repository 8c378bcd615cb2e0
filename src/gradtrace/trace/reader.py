"""Reading a trace: ``load`` and the ``Trace`` query API (the only way the rest of gradtrace reads a run).

Longer than 400 lines on purpose: it is one class, the whole read-side vocabulary
(names, series, matrices, layout, events, views), each method with its example; the
storage behind it lives in ``store.py``.
"""
from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import numpy as np

from .format import (FORMAT, FORMAT_VERSION, META_FILE, MISSING, TABLES_FILE, V1_RECORDS_FILE,
                     decode_vectors, is_missing)
from .store import FileStore, MemoryStore, Table, read_jsonl, warn_once


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


def _unknown(what: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), [str(v) for v in valid], n=5, cutoff=0.5)
    hint = f"; close matches: {close}" if close else f"; known: {list(valid)[:12]}"
    return f"unknown {what} {name!r}{hint}"


def _merge(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-table ``(steps, values)`` and order by step (each part is already
    ascending, so the stable sort is a linear merge of runs)."""
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    steps = np.concatenate([p[0] for p in parts])
    values = np.concatenate([p[1] for p in parts])
    if len(parts) > 1:
        order = np.argsort(steps, kind="stable")
        steps, values = steps[order], values[order]
    return steps.astype(np.int64, copy=False), values


META_EXAMPLE = {"modules": [{"name": "0", "type": "Linear", "activation": None, "params": ["0.weight"]},
                            {"name": "1", "type": "ReLU", "activation": "relu", "params": []}],
                "params": [{"name": "0.weight", "module": "0"}]}


class Trace:
    """Recorded statistics of one run, read through questions; the storage stays private.

    Build one with :func:`load` (a trace directory), take ``monitor.trace``, or pass
    ``meta`` and records (dicts as in ``docs/trace-format.md``) for a trace in memory.

    Example:
        >>> trace = gt.load("runs/exp1")
        >>> trace.series("grad_norm", "0.weight").shape
        (30,)
        >>> t = Trace(META_EXAMPLE, [{"step": 0, "scalars": {"loss": 2.5}}])
        >>> t.series("loss").tolist()
        [2.5]
    """

    def __init__(self, meta: dict[str, Any], records: Iterable[dict] = (), path: str | None = None):
        self.meta = meta
        self.path = path
        self.warnings: list[str] = []
        self._store: MemoryStore | FileStore = MemoryStore(meta)
        self._upto: int | None = None           # a view made by upto(): last visible step
        for r in records:
            self._store.append(r)

    @classmethod
    def _open(cls, meta: dict, store, path: str | None, messages: list[str]) -> "Trace":
        t = cls.__new__(cls)
        t.meta, t.path, t.warnings, t._store, t._upto = meta, path, messages, store, None
        return t

    def _append(self, rec: dict) -> None:
        self._store.append(rec)

    # ---- names ------------------------------------------------------------------------
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

    def _names_for(self, section: str) -> list[str]:
        return self.params if section == "param" else self.modules

    # ---- rows -------------------------------------------------------------------------
    def _visible(self, t: Table) -> int:
        if self._upto is None:
            return len(t)
        return int(np.searchsorted(t.steps(), self._upto, side="right"))

    def _tables(self) -> list[tuple[Table, int]]:
        return [(t, n) for t in self._store.tables if (n := self._visible(t))]

    @property
    def steps(self) -> np.ndarray:
        """Optimizer step of every record, ascending.

        Example:
            >>> Trace({}, [{"step": 2}, {"step": 5}]).steps.tolist()
            [2, 5]
        """
        return _merge([(t.steps()[:n], t.steps()[:n]) for t, n in self._tables()])[0]

    @property
    def steps_recorded(self) -> np.ndarray:
        """Same as :attr:`steps` (the gradtrace 0.1 name).

        Example:
            >>> Trace({}, [{"step": 3}]).steps_recorded.tolist()
            [3]
        """
        return self.steps

    def __len__(self) -> int:
        return sum(n for _, n in self._tables())

    def __repr__(self) -> str:
        where = f" at {self.path!r}" if self.path else " (in memory)"
        return (f"<Trace{where}: {len(self)} records, {len(self.params)} params, "
                f"{len(self.modules)} modules, {len(self.events())} events>")

    # ---- statistics -------------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for t, _ in self._tables():
            for s in t.schema.scalars:
                out.setdefault(s, "scalars")
            for sec, stat, _ in t.schema.columns:
                out.setdefault(stat, sec)
        for s in self._store.vector_stats:
            out.setdefault(s, "vectors")
        return out

    def stats(self) -> list[str]:
        """Names of every recorded statistic, sorted.

        Example:
            >>> "grad_norm" in gt.load("runs/exp1").stats()
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

    def _column(self, section: str, stat: str, i: int | None) -> tuple[np.ndarray, np.ndarray]:
        """Every visible cell of one column, ``(steps, float64 values)``; MISSING kept."""
        parts = []
        for t, n in self._tables():
            sch = t.schema
            if section == "scalars":
                if stat not in sch.scalars:
                    continue
                v = t.rows()["scalars"][:n, sch.scalars.index(stat)]
            else:
                pos = sch.col_pos.get((section, stat))
                if pos is None or i not in sch.columns[pos][2]:
                    continue
                k = sch.offsets[(section, stat)] + sch.columns[pos][2].index(i)
                v = t.rows()["values"][:n, k]
            parts.append((t.steps()[:n], np.asarray(v)))
        steps, values = _merge(parts)
        keep = ~is_missing(values) if values.dtype.kind == "f" else np.ones(0, bool)
        return steps[keep], values[keep].astype(np.float64)

    def series(self, stat: str, name: str | None = None, *, with_steps: bool = False):
        """Values of ``stat`` (for ``name``) over the records where it was recorded.

        Per-step statistics (``total_grad_norm``, ``loss``, ...) take no name. Vector
        statistics (e.g. ``time_grad_norm``) come back as a 2-D array (records x length).
        With ``with_steps=True`` returns ``(steps, values)``.

        Example:
            >>> trace = gt.load("runs/exp1")
            >>> trace.series("grad_norm", "0.weight").shape
            (30,)
            >>> steps, loss = trace.series("loss", with_steps=True)
            >>> steps[:3].tolist()
            [0, 1, 2]
        """
        section = self.kind_of(stat)
        if section == "scalars":
            if name is not None:
                raise KeyError(f"statistic {stat!r} is per step and takes no name")
            steps, arr = self._column("scalars", stat, None)
        elif section == "vectors":
            steps, arr = self._vector_series(stat, name)
        else:
            names = self._names_for(section)
            if name is None:
                raise KeyError(f"statistic {stat!r} is per {section}; pass one of its names, "
                               f"e.g. {names[:3]}")
            try:
                i = names.index(name)
            except ValueError:
                raise KeyError(_unknown(section if section == "module" else "parameter", name, names)) from None
            steps, arr = self._column(section, stat, i)
        return (steps, arr) if with_steps else arr

    def _vector_series(self, stat: str, name: str | None) -> tuple[np.ndarray, np.ndarray]:
        index = self._store.vector_index(stat)
        if name is None:
            raise KeyError(f"statistic {stat!r} needs a name; recorded for: {sorted(index)}")
        if name not in index:
            raise KeyError(_unknown(f"name for {stat!r}", name, sorted(index)))
        steps, raw = index[name]
        n = len(steps) if self._upto is None else int(np.searchsorted(steps, self._upto, side="right"))
        if n == 0:
            raise KeyError(_unknown(f"name for {stat!r}", name, []))
        return steps[:n], decode_vectors(raw[:n])

    def scalar(self, stat: str, *, with_steps: bool = False):
        """A per-step statistic (``loss``, ``total_grad_norm``, ``lr``...) over the steps
        where it was recorded; ``with_steps=True`` returns ``(steps, values)``.

        Example:
            >>> Trace({}, [{"step": 4, "scalars": {"loss": 2.0}}]).scalar("loss", with_steps=True)
            (array([4]), array([2.]))
        """
        if self.kind_of(stat) != "scalars":
            raise KeyError(f"statistic {stat!r} is per {self.kind_of(stat)}, not per step; "
                           f"use series(stat, name) or matrix(stat)")
        return self.series(stat, with_steps=with_steps)

    def matrix(self, stat: str, names: Sequence[str] | None = None,
               steps: Iterable[int] | None = None) -> Matrix:
        """A per-parameter or per-module statistic as a :class:`Matrix`.

        Rows are the records that carry ``stat`` (only those whose step is in ``steps``,
        when given); columns are ``names`` (default: all watched parameters or modules, in
        meta order). ``values`` holds the recorded numbers as float64, a recorded nan/inf
        as itself and NaN where nothing was recorded; ``recorded`` tells the two NaNs
        apart. Unpacks as ``steps, names, values``.

        Example:
            >>> t = Trace({"params": [{"name": "w"}, {"name": "b"}]},
            ...           [{"step": 0, "param": {"grad_norm": [0.5, None]}},
            ...            {"step": 1, "param": {"grad_norm": [float("nan"), 0.25]}}])
            >>> m = t.matrix("grad_norm")
            >>> m.values.tolist(), m.recorded.tolist()
            ([[0.5, nan], [nan, 0.25]], [[True, False], [True, True]])
            >>> steps, names, values = m                  # the 0.1 triple
            >>> t.matrix("grad_norm", names=["b"], steps=[1]).values.tolist()
            [[0.25]]
        """
        section = self.kind_of(stat)
        if section not in ("param", "module"):
            raise KeyError(f"statistic {stat!r} is not per parameter or per module; use series()")
        all_names = self._names_for(section)
        if names is None:
            cols, names = list(range(len(all_names))), list(all_names)
        else:
            if isinstance(names, str):
                raise TypeError("names must be a list of names, not one string")
            index = {n: i for i, n in enumerate(all_names)}
            for n in names:
                if n not in index:
                    raise KeyError(_unknown(section if section == "module" else "parameter", n, all_names))
            names = list(names)
            cols = [index[n] for n in names]
        wanted = None if steps is None else np.fromiter((int(s) for s in steps), dtype=np.int64)
        parts = []                     # (table, visible rows, selected rows, step of each)
        for t, n in self._tables():
            if (section, stat) not in t.schema.col_pos:
                continue
            s = t.steps()[:n]
            rows = slice(None) if wanted is None else np.isin(s, wanted)
            parts.append((t, n, rows, s[rows]))
        all_steps = np.concatenate([p[3] for p in parts]) if parts else np.zeros(0, dtype=np.int64)
        # Rows are written once, straight to their place in step order (no concatenated copy).
        order = np.argsort(all_steps, kind="stable")
        target = np.empty_like(order)
        target[order] = np.arange(order.size)
        values = np.full((order.size, len(cols)), MISSING)
        start = 0
        for t, n, rows, s in parts:
            sch = t.schema
            idx = sch.columns[sch.col_pos[(section, stat)]][2]
            where = {i: k for k, i in enumerate(idx)}
            off = sch.offsets[(section, stat)]
            out_c = [c for c, i in enumerate(cols) if i in where]
            dest = target[start:start + s.size]
            start += s.size
            if not out_c:
                continue
            block = np.asarray(t.rows()["values"][:n, off:off + len(idx)])[rows]
            src_c = [where[cols[c]] for c in out_c]
            if out_c == list(range(len(cols))) and src_c == list(range(len(idx))):
                values[dest] = block
            else:
                values[np.ix_(dest, out_c)] = block[:, src_c]
        step_arr = all_steps[order].astype(np.int64, copy=False)
        recorded = ~is_missing(values)
        values[~recorded] = np.nan
        return Matrix(step_arr, names, values, recorded)

    def names(self, stat: str) -> list[str]:
        """The names ``stat`` was recorded for at least once (meta order; vectors: sorted).

        Example:
            >>> t = Trace({"modules": [{"name": "a"}, {"name": "b"}]},
            ...           [{"step": 0, "module": {"zero_frac": [None, 0.5]}}])
            >>> t.names("zero_frac")
            ['b']
        """
        section = self.kind_of(stat)
        if section == "scalars":
            raise KeyError(f"statistic {stat!r} is per step and has no names")
        if section == "vectors":
            index = self._store.vector_index(stat)
            return sorted(n for n, (s, _) in index.items() if self._upto is None or s[0] <= self._upto)
        m = self.matrix(stat)
        return [n for n, any_ in zip(m.names, m.recorded.any(axis=0)) if any_]

    # ---- layout, events, views ----------------------------------------------------------
    def events(self, kind: str | None = None) -> list[dict]:
        """Events (guard skips, first non-finite values, exceptions...), optionally of one
        kind, in the order written.

        Example:
            >>> t = Trace({}, [{"event": "guard_skip", "step": 3}])
            >>> [e["step"] for e in t.events("guard_skip")]
            [3]
        """
        return [e for e in self._store.events
                if (kind is None or e["event"] == kind)
                and (self._upto is None or e.get("step", 0) <= self._upto)]

    def exec_order(self, step: int | None = None) -> list[str]:
        """Watched module names in forward (first-call) order as of ``step``.

        The order is the last one recorded at or before ``step`` (``None``: the latest);
        if none was recorded by then, the first one recorded. Watched modules never seen
        running follow in ``named_modules()`` order, so every module appears once.

        Example:
            >>> t = Trace({"modules": [{"name": "a"}, {"name": "b"}, {"name": "c"}]},
            ...           [{"step": 0, "exec_order": ["b", "a"]}, {"step": 5, "exec_order": ["a", "b"]}])
            >>> t.exec_order(), t.exec_order(step=2)
            (['a', 'b', 'c'], ['b', 'a', 'c'])
        """
        order = first = None
        for r in self._store.extras:
            if "exec_order" not in r or (self._upto is not None and r["step"] > self._upto):
                continue
            if first is None:
                first = r["exec_order"]
            if step is None or r["step"] <= step:
                order = r["exec_order"]
        order = list(order if order is not None else (first or []))
        seen = set(order)
        return order + [m for m in self.modules if m not in seen]

    def out_dtypes(self, step: int | None = None) -> dict[str, str]:
        """Module name -> dtype name (``"float16"``) of its first floating output, as
        recorded at or before ``step`` (``None``: the latest). Modules never recorded (an
        older trace, a run without activation steps) are absent.

        Example:
            >>> t = Trace(META_EXAMPLE, [{"step": 0, "out_dtypes": {"0": "float32"}},
            ...                          {"step": 4, "out_dtypes": {"0": "float16", "1": "float16"}}])
            >>> t.out_dtypes(), t.out_dtypes(step=2)
            ({'0': 'float16', '1': 'float16'}, {'0': 'float32'})
            >>> gt.load("runs/exp1").out_dtypes()["0"]
            'float32'
        """
        out: dict[str, str] = {}
        for r in self._store.extras:
            if "out_dtypes" not in r or (self._upto is not None and r["step"] > self._upto):
                continue
            if step is None or r["step"] <= step:
                out.update(r["out_dtypes"])
        return out

    def owner(self, param: str) -> str:
        """The watched module that owns ``param``: the deepest watched module holding it.

        Example:
            >>> Trace({"params": [{"name": "enc.0.weight", "module": "enc.0"}]}).owner("enc.0.weight")
            'enc.0'
        """
        info = self.param_info(param)
        # Traces written before the owner was stored: the name's parent path.
        return info.get("module") or param.rpartition(".")[0]

    def layers(self, *, with_params: bool = False) -> list[Layer]:
        """Watched modules in forward order as :class:`Layer` (name, type, activation kind,
        parameters owned); ``with_params=True`` keeps only modules owning a watched parameter.

        Example:
            >>> t = Trace(META_EXAMPLE, [{"step": 0, "exec_order": ["0", "1"]}])
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
            if not with_params or ps:
                out.append(Layer(name, info.get("type"), info.get("activation"), ps))
        return out

    def upto(self, step: int) -> "Trace":
        """The run as of ``step``: records and events after it are invisible.

        A view sharing this trace's data (nothing is copied), for online diagnosis.

        Example:
            >>> t = Trace({}, [{"step": s, "scalars": {"loss": float(s)}} for s in range(4)])
            >>> t.upto(1).series("loss").tolist()
            [0.0, 1.0]
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int, got {type(step).__name__}")
        view = Trace._open(self.meta, self._store, self.path, self.warnings)
        view._upto = int(step) if self._upto is None else min(int(step), self._upto)
        return view

    def to_pandas(self, stats: Sequence[str] | None = None):
        """The recorded numbers as a long pandas table: ``step, name, stat, value``
        (``name`` is ``""`` for per-step statistics; vectors and events are left out).

        Example:
            >>> import importlib.util
            >>> if importlib.util.find_spec("pandas"):     # the optional ``pandas`` extra
            ...     df = gt.load("runs/exp1").to_pandas(["loss"])
            ...     print(list(df.columns), len(df))
            ... else:
            ...     print(['step', 'name', 'stat', 'value'], 30)
            ['step', 'name', 'stat', 'value'] 30
        """
        from .export import to_pandas

        return to_pandas(self, stats)

    @property
    def records(self) -> list[dict]:
        """The records rebuilt as dicts (the gradtrace 0.1 shape; slow on long runs).

        Kept for compatibility: read through the query methods instead.

        Example:
            >>> Trace({}, [{"step": 1, "scalars": {"loss": 2.0}}]).records[0]["scalars"]
            {'loss': 2.0}
        """
        from .export import rebuild_records

        return rebuild_records(self)


def load(path: str | os.PathLike) -> Trace:
    """Read a trace directory, also while it is being written or after a crash.

    Raises ``ValueError`` if ``path`` is not a gradtrace trace directory. A torn tail (a
    writer killed mid-write) is left out with a :class:`~gradtrace.errors.TraceWarning`.
    Version-1 traces (``records.jsonl``) load too.

    Example:
        >>> trace = gt.load("runs/exp1")
        >>> len(trace)
        30
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"trace directory {str(p)!r} does not exist")
    if not p.is_dir():
        raise ValueError(f"{str(p)!r} is a file; a trace is a directory holding {META_FILE}")
    meta_path = p / META_FILE
    if not meta_path.exists():
        raise ValueError(f"{str(p)!r} is not a gradtrace trace: no {META_FILE} in it")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(meta_path)!r} is corrupt (not JSON: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(p)!r} is not a gradtrace trace ({META_FILE} has no format={FORMAT!r})")
    version = meta.get("format_version", 0)
    if version > FORMAT_VERSION:
        raise ValueError(f"trace format version {version} is newer than this gradtrace reads "
                         f"({FORMAT_VERSION}); upgrade gradtrace")
    messages: list[str] = []
    warn = warn_once(messages)
    if version >= 2 or (p / TABLES_FILE).exists():
        return Trace._open(meta, FileStore(p, warn), str(p), messages)
    store = MemoryStore(meta)                     # version 1: one JSON line per record
    for rec in read_jsonl(p / V1_RECORDS_FILE, warn):
        if "step" not in rec and "event" not in rec:
            raise ValueError(f"{p / V1_RECORDS_FILE}: a line is not a record; the trace cannot be read")
        store.append(rec)
    return Trace._open(meta, store, str(p), messages)
