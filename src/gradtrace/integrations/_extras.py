"""What the sinks share: importing an extra, flattening records, and the ``RecordSink`` skeleton."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterable, Iterator

import numpy as np

from ..trace import is_missing

#: statistics written per layer by default (the ones a dashboard is read for)
DEFAULT_LAYER_STATS = ("grad_norm", "update_ratio", "param_norm", "out_std", "zero_frac",
                       "saturated_frac", "dead_units", "outgrad_norm")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or raise an ImportError that names the ``pip install`` to run.

    Example:
        >>> require("math", "none").__name__
        'math'
        >>> require("no_such_module_xyz", "wandb")     # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ImportError: ... pip install gradtrace[wandb] ...
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"gradtrace: this integration needs {module!r}, which is not installed "
                          f"({e}); run:  pip install gradtrace[{extra}]") from e


def _num(v: Any) -> float | None:
    if v is None:
        return None
    if isinstance(v, str):             # the trace writes non-finite numbers as strings
        try:
            return float(v)
        except ValueError:
            return None
    v = float(v)
    return None if v != v and is_missing(np.array([v]))[0] else v


def names_of(meta: dict, section: str) -> list[str]:
    """Parameter (``"param"``) or module (``"module"``) names, in trace order.

    Example:
        >>> names_of({"params": [{"name": "fc.weight"}]}, "param")
        ['fc.weight']
    """
    key = "params" if section == "param" else "modules"
    return [d["name"] for d in meta.get(key, [])]


def flatten(record: dict, meta: dict, stats: tuple[str, ...] | None = None
            ) -> Iterator[tuple[str, str, float]]:
    """``(stat, name, value)`` for each number in a step record; ``name`` is ``""`` for scalars.

    ``stats`` limits the per-layer statistics (scalars always come out). Values that
    were not recorded (``None``, or :data:`~gradtrace.trace.MISSING` in an array) are
    left out; nan/inf come out as floats.

    Example:
        >>> meta = {"params": [{"name": "w"}], "modules": []}
        >>> list(flatten({"step": 0, "scalars": {"loss": 1.0}, "param": {"grad_norm": [2.0]}}, meta))
        [('loss', '', 1.0), ('grad_norm', 'w', 2.0)]
    """
    for k, v in record.get("scalars", {}).items():
        x = _num(v)
        if x is not None:
            yield k, "", x
    for section in ("param", "module"):
        names = names_of(meta, section)
        for stat, col in record.get(section, {}).items():
            if stats is not None and stat not in stats:
                continue
            for name, v in zip(names, col):
                x = _num(v)
                if x is not None:
                    yield stat, name, x



class RecordSink:
    """The skeleton of a sink (implements :class:`gradtrace.trace.Sink`): ``start`` keeps
    the run's metadata and opens the output, ``write`` checks it was started and hands
    an event or a step's ``(stat, name, value)`` numbers to the subclass, ``close`` runs
    once. Subclasses define ``_open``, ``_event``, ``_values`` and ``_close``.

    Example:
        >>> class Printer(RecordSink):
        ...     def _values(self, step, values): print(step, list(values))
        >>> p = Printer(stats=None); p.start({"params": [{"name": "w"}]})
        >>> p.write({"step": 3, "scalars": {"loss": 1.5}, "param": {"grad_norm": [None]}})
        3 [('loss', '', 1.5)]
        >>> p.close(); p.close()
    """

    def __init__(self, stats: tuple[str, ...] | None = None):
        self.stats = None if stats is None else tuple(stats)
        self._meta: dict = {}
        self._started = False
        self._closed = False

    def start(self, meta: dict) -> None:
        """Keep the run's metadata and open the output (called by the recorder)."""
        self._meta = meta
        self._open(meta)
        self._started = True

    def write(self, record: dict) -> None:
        """Hand one record (or event) to the output."""
        if not self._started:
            raise RuntimeError(f"{type(self).__name__}.write() before start(): pass the sink to "
                               f"gt.watch(sinks=[...])")
        if "event" in record:
            self._event(record)
        else:
            self._values(int(record["step"]), flatten(record, self._meta, self.stats))

    def close(self) -> None:
        """Release the output. Safe to call twice."""
        if self._started and not self._closed:
            self._closed = True
            self._close()

    # subclasses override these
    def _open(self, meta: dict) -> None:
        pass

    def _event(self, record: dict) -> None:
        pass

    def _values(self, step: int, values: Iterable[tuple[str, str, float]]) -> None:
        pass

    def _close(self) -> None:
        pass
