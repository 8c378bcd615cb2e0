"""What the fix renderers know about a run: modules, parameters, order, dtype, device, lr.

Built from a :class:`~gradtrace.trace.Trace` through its query API, or from a plain dict
(tests, preflight). A figure the run did not record stays ``None``: a renderer then writes
code that computes it (``next(model.parameters()).device.type``) instead of a default
that would read as a measurement.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

__all__ = ["RunContext", "module_ref", "names", "assign_lines"]

#: Keys a dict context may have.
CONTEXT_KEYS = ("modules", "params", "exec_order", "lr", "time_steps", "dtype", "device")


def module_ref(name: str, root: str = "model") -> str:
    """Python expression for a module given its qualified name.

    Example:
        >>> module_ref("net.3")
        'model.net[3]'
        >>> module_ref("encoder.layers.0.linear1")
        'model.encoder.layers[0].linear1'
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    out = root
    for part in name.split(".") if name else []:
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def names(items: list[str], limit: int = 8) -> str:
    """```0, 2, 4``` (backticked, the first ``limit``, then a count).

    Example:
        >>> names(["a", "b"])
        '`a, b`'
    """
    if not items:
        return ""
    shown = "`" + ", ".join(items[:limit]) + "`"
    return shown + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


def assign_lines(items: list[str], expr: str, max_lines: int = 3) -> str:
    """``model.x = expr`` for the first ``max_lines`` modules, then a comment for the rest.

    Example:
        >>> assign_lines(["net.1"], "nn.GELU()")
        'model.net[1] = nn.GELU()'
    """
    lines = [f"{module_ref(n)} = {expr}" for n in items[:max_lines]]
    if len(items) > max_lines:
        lines.append(f"# ... and the same for {names(items[max_lines:])}")
    return "\n".join(lines)


class RunContext:
    """The run as the renderers see it.

    Example:
        >>> ctx = RunContext({"modules": [{"name": "fc", "type": "Linear", "params": ["fc.weight"]}], "lr": 0.1})
        >>> ctx.weight_layers(), ctx.lr_at(5)
        (['fc'], 0.1)
    """

    def __init__(self, src: Any):
        from ..trace import Trace

        self.modules: list[dict] = []
        self.params: list[dict] = []
        self.order: list[str] = []
        self.lr: float | None = None
        self.time_steps: int | None = None
        self.dtype: str | None = None
        self.device: str | None = None
        self._lr_steps = np.array([], dtype=np.int64)
        self._lr_values = np.array([])
        if src is None:
            return
        if isinstance(src, Trace):
            self.modules = list(src.meta.get("modules", []))
            self.params = list(src.meta.get("params", []))
            self.order = src.exec_order()
            if "lr" in src.stats():
                self._lr_steps, self._lr_values = src.scalar("lr", with_steps=True)
                fin = self._lr_values[np.isfinite(self._lr_values)]
                self.lr = float(fin[-1]) if fin.size else None
            if "time_grad_norm" in src.stats():
                for r in src.records:     # the sequence length: the first recorded vector's size
                    tg = r.get("vectors", {}).get("time_grad_norm")
                    if tg:
                        self.time_steps = len(next(iter(tg.values())))
                        break
            self.device = src.meta.get("device") or _common(p.get("device") for p in self.params)
        elif isinstance(src, dict):
            unknown = set(src) - set(CONTEXT_KEYS)
            if unknown:
                raise ValueError(f"trace_or_context has unknown keys {sorted(unknown)}; valid: "
                                 + ", ".join(CONTEXT_KEYS))
            self.modules = list(src.get("modules", []))
            self.params = list(src.get("params", []))
            self.order = list(src.get("exec_order", []))
            self.lr = src.get("lr")
            self.time_steps = src.get("time_steps")
            self.device = src.get("device")
            self.dtype = src.get("dtype")
        else:
            raise TypeError("trace_or_context must be a Trace, a dict (" + ", ".join(CONTEXT_KEYS) +
                            f") or None, got {type(src).__name__}")
        self.dtype = self.dtype or _common(p.get("dtype") for p in self.params)
        seen = set(self.order)
        self.order = list(self.order) + [m["name"] for m in self.modules if m["name"] not in seen]

    def lr_at(self, step: int | None) -> float | None:
        """The learning rate in force at ``step`` (the last one recorded at or before it);
        the last recorded one when ``step`` is ``None``."""
        if step is None or self._lr_steps.size == 0:
            return self.lr
        ok = (self._lr_steps <= step) & np.isfinite(self._lr_values)
        return float(self._lr_values[ok][-1]) if ok.any() else self.lr

    def info(self, name: str) -> dict:
        return next((m for m in self.modules if m["name"] == name), {})

    def kind(self, name: str) -> str | None:
        return self.info(name).get("activation")

    def weight_layers(self) -> list[str]:
        return [n for n in self.order if self.info(n).get("params") and self.kind(n) not in ("norm", "recurrent")]

    def acts(self, kinds: tuple[str, ...]) -> list[str]:
        return [n for n in self.order if self.kind(n) in kinds]

    def norm_blocks(self) -> list[str]:
        """Blocks that hold a normalisation layer next to weight layers (a transformer
        layer, a BERT output sublayer): the parent of each norm, innermost only. Such a
        block already has its residual path; what matters is where its norm sits."""
        mods = [m["name"] for m in self.modules]
        blocks = []
        for n in mods:
            if self.kind(n) != "norm" or "." not in n:
                continue
            parent = n.rsplit(".", 1)[0]
            if any(w.startswith(parent + ".") and self.kind(w) != "norm" for w in self.weight_layers()):
                blocks.append(parent)
        return [b for b in dict.fromkeys(blocks) if not any(o != b and o.startswith(b + ".") for o in blocks)]

    def post_ln(self) -> bool | None:
        """True when the blocks normalise after their weight layers (post-LN: the norm
        follows the residual add), False for pre-LN, None when the run has no such block.
        The execution order tells: in a post-LN block the first norm runs after the first
        weight layer."""
        votes = []
        for b in self.norm_blocks():
            inner = [n for n in self.order if n.startswith(b + ".")]
            norms = [i for i, n in enumerate(inner) if self.kind(n) == "norm"]
            weights = [i for i, n in enumerate(inner) if self.info(n).get("params") and self.kind(n) != "norm"]
            if norms and weights:
                votes.append(min(norms) > min(weights))
        return None if not votes else sum(votes) > len(votes) / 2

    def following_activation(self) -> dict[str, str | None]:
        """Weight layer -> activation kind of the first activation after it."""
        from .rows import ACT_CLASS

        out: dict[str, str | None] = {}
        weights = set(self.weight_layers())
        pending: list[str] = []
        for n in self.order:
            k = self.kind(n)
            if n in weights:
                for p in pending:
                    out[p] = None
                pending = [n]
            elif k in ACT_CLASS and pending:
                for p in pending:
                    out[p] = k
                pending = []
        for p in pending:
            out[p] = None
        return out


def _common(values) -> str | None:
    c = Counter(v for v in values if v)
    return c.most_common(1)[0][0] if c else None
