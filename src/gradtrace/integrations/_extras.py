"""Helpers shared by the integrations: importing an extra, and flattening records."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, Iterator

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
    return float(v)


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
    were not recorded (``null``) are left out; nan/inf come out as floats.

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

