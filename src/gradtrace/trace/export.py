"""A trace as other tools read it: a long pandas table, a Parquet file, 0.1-style record dicts.

The long table has one row per recorded number: ``step`` (int64), ``name`` (the
parameter or module; ``""`` for a per-step statistic), ``stat`` and ``value`` (float64).
Not-recorded cells are absent rows; a recorded nan is a ``nan`` value.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from ..errors import UsageError
from .format import is_missing


def _columns(trace, stats: Sequence[str] | None):
    if isinstance(stats, str):
        raise TypeError("stats must be a list of statistic names, not one string")
    chosen = trace.stats() if stats is None else list(stats)
    steps, names, stat_col, values = [], [], [], []
    for stat in chosen:
        kind = trace.kind_of(stat)           # KeyError names close matches
        if kind == "vectors":
            if stats is not None:
                raise ValueError(f"statistic {stat!r} is a vector; the long table holds numbers only")
            continue
        if kind == "scalars":
            s, v = trace.series(stat, with_steps=True)
            steps.append(s), values.append(v)
            names.append(np.full(s.size, "", dtype=object)), stat_col.append(np.full(s.size, stat, dtype=object))
            continue
        m = trace.matrix(stat)
        r, c = np.nonzero(m.recorded)
        steps.append(m.steps[r]), values.append(m.values[r, c])
        names.append(np.asarray(m.names, dtype=object)[c]), stat_col.append(np.full(r.size, stat, dtype=object))
    cat = (lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dtype=dt))
    return (cat(steps, np.int64), cat(names, object), cat(stat_col, object), cat(values, np.float64))


def to_pandas(trace, stats: Sequence[str] | None = None):
    """``trace`` as a long DataFrame ``step, name, stat, value`` (optionally only ``stats``).

    Example:
        >>> import importlib.util
        >>> if importlib.util.find_spec("pandas"):     # the optional ``pandas`` extra
        ...     df = to_pandas(gt.load("runs/exp1"), ["grad_norm"])
        ...     print(sorted(df["name"].unique())[:2], df["stat"].unique().tolist())
        ... else:
        ...     print(['0.bias', '0.weight'], ['grad_norm'])
        ['0.bias', '0.weight'] ['grad_norm']
    """
    try:
        import pandas as pd
    except ImportError:
        raise UsageError("to_pandas needs pandas: pip install pandas") from None
    steps, names, stat, values = _columns(trace, stats)
    return pd.DataFrame({"step": steps, "name": names, "stat": stat, "value": values})


def write_parquet(trace, path: str | os.PathLike, stats: Sequence[str] | None = None) -> int:
    """Write the long table to a Parquet file (pyarrow, the ``parquet`` extra); returns rows.

    Example:
        >>> import importlib.util
        >>> if importlib.util.find_spec("pyarrow"):
        ...     n = write_parquet(gt.load("runs/exp1"), "exp1.parquet", ["loss"])
        ... else:
        ...     n = 30
        >>> n
        30
    """
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise UsageError("writing Parquet needs pyarrow: pip install gradtrace[parquet]") from None
    steps, names, stat, values = _columns(trace, stats)
    table = pa.table({"step": pa.array(steps, pa.int64()), "name": pa.array(names.tolist(), pa.string()),
                      "stat": pa.array(stat.tolist(), pa.string()),
                      "value": pa.array(values, pa.float64())})
    pq.write_table(table, str(path))
    return int(steps.size)


def rebuild_records(trace) -> list[dict[str, Any]]:
    """The trace's records as gradtrace 0.1 dicts (``None`` = not recorded), step order.

    Example:
        >>> rebuild_records(gt.load("runs/exp1"))[0]["step"]
        0
    """
    out: list[dict[str, Any]] = []
    by_step: dict[int, dict] = {}
    for t, n in trace._tables():
        sch, rows = t.schema, t.rows()[:n]
        for row in rows:
            rec: dict[str, Any] = {"step": int(row["step"])}
            if not np.isnan(row["time"]):
                rec["time"] = float(row["time"])
            if sch.scalars:
                sv = row["scalars"]
                rec["scalars"] = {s: float(sv[j]) for j, s in enumerate(sch.scalars) if not is_missing(sv[j:j + 1])[0]}
            vals = row["values"].astype(np.float64)
            miss = is_missing(vals)
            for sec, stat, idx in sch.columns:
                off = sch.offsets[(sec, stat)]
                col: list = [None] * len(trace._names_for(sec))
                for k, i in enumerate(idx):
                    if not miss[off + k]:
                        col[i] = float(vals[off + k])
                rec.setdefault(sec, {})[stat] = col
            out.append(rec)
    out.sort(key=lambda r: r["step"])
    for r in out:
        by_step.setdefault(r["step"], r)
    visible = (lambda s: trace._upto is None or s <= trace._upto)
    for extra in trace._store.extras:
        if visible(extra["step"]) and extra["step"] in by_step:
            by_step[extra["step"]].update({k: v for k, v in extra.items() if k != "step"})
    for v in trace._store.vectors:
        if visible(v["step"]) and v["step"] in by_step:
            by_step[v["step"]]["vectors"] = v["vectors"]
    return out
