"""gradtrace: see, diagnose and fix vanishing and exploding gradients in PyTorch.

Example:
    >>> import gradtrace as gt
    >>> import gradtrace as gt
    >>> with gt.watch(model, optimizer, out="runs/quickstart") as mon:
    ...     for _ in range(20):
    ...         optimizer.zero_grad()
    ...         loss = loss_fn(model(x), y)
    ...         loss.backward()
    ...         mon.record_loss(loss)
    ...         optimizer.step()
    >>> findings = gt.diagnose(gt.load("runs/quickstart"))
    >>> [f.kind for f in findings]
    []

Public names are imported lazily so that ``import gradtrace`` stays cheap and never
pulls an optional dependency.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "watch": "api", "Monitor": "record", "PRESETS": "record",
    "UsageError": "errors", "NonFiniteError": "errors",
    "load": "trace", "Trace": "trace", "TraceWarning": "errors", "next_run_dir": "trace",
    "Finding": "diagnose", "Fix": "diagnose", "KINDS": "diagnose",
    "diagnose": "api", "advise": "advise", "Thresholds": "diagnose", "report": "report",
    "clip_grad_norm_": "remedies.clip", "clip_grad_value_": "remedies.clip",
    "get_total_norm": "remedies.clip", "clip_grads_with_norm_": "remedies.clip",
    "adaptive_clip_grad_": "remedies.agc", "AutoClip": "remedies.adaptive", "ZClip": "remedies.adaptive",
    "Guard": "remedies.guard",
    "replay": "replay", "ReplayResult": "replay",
    "init_for_activation": "remedies.init", "lsuv_": "remedies.lsuv",
    "scale_residual_branches_": "remedies.residual",
    "spectrum": "preflight", "Spectrum": "preflight", "preflight": "preflight",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

# These functions share their name with the submodule that defines them. Importing such a
# submodule rebinds the package attribute to the module, so bind the functions eagerly:
# once bound here, a later `import gradtrace.spectrum` no longer touches the attribute.
from .preflight import preflight, spectrum  # noqa: E402,F401
from .report import report  # noqa: E402,F401
from .replay import replay  # noqa: E402,F401
from .api import diagnose  # noqa: E402,F401
from .advise import advise  # noqa: E402,F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module = importlib.import_module(f"gradtrace.{_EXPORTS[name]}")
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gradtrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
