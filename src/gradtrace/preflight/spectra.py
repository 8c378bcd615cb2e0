"""The result types of a Jacobian-spectrum measurement: one block's figures and the whole set.

Each figure says how it was obtained: ``method`` (``"full"``: every singular value,
``"lanczos"``: top-k/bottom-k Ritz values with a Hutchinson gain) and ``estimate`` (how
the Jacobian products were formed: ``reverse-mode``, ``forward-mode``, ``double-backward``
or ``finite-difference``; see :mod:`gradtrace.preflight.ad`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["BlockSpectrum", "Spectrum", "END_TO_END"]

#: Name under which the whole model's Jacobian is stored.
END_TO_END = "<end-to-end>"


@dataclass
class BlockSpectrum:
    """Jacobian figures of one block (or of the whole model), one row per example.

    ``singular_values`` is ``examples × values``, descending. With ``method == "full"``
    it holds all ``min(in_width, out_width)`` values; with ``"lanczos"`` the top k then
    the bottom k (estimates; the top ones converge fastest).

    Example:
        >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
        >>> b.gain, b.sigma_max
        (1.0, 1.0)
    """

    name: str
    members: list[str]
    in_width: int
    out_width: int
    method: str
    singular_values: np.ndarray
    gain_per_example: np.ndarray
    spread_per_example: np.ndarray
    #: how the Jacobian products were formed (the least exact one used)
    estimate: str = "reverse-mode"

    @property
    def gain(self) -> float:
        """Mean squared singular value per input direction, averaged over examples."""
        return float(np.mean(self.gain_per_example))

    @property
    def spread(self) -> float:
        """Relative variance of the eigenvalues of JᵀJ, averaged over examples."""
        return float(np.mean(self.spread_per_example))

    @property
    def sigma_max(self) -> float:
        return float(np.mean(self.singular_values[:, 0]))

    @property
    def sigma_min(self) -> float:
        return float(np.mean(self.singular_values[:, -1]))

    def row(self) -> dict[str, Any]:
        """One flat row of the table form.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> b.row()["condition"]
            1.0
        """
        smin = self.sigma_min
        return {"block": self.name, "members": list(self.members), "in_width": self.in_width,
                "out_width": self.out_width, "method": self.method, "gain": self.gain,
                "sigma_max": self.sigma_max, "sigma_min": smin,
                "condition": self.sigma_max / smin if smin > 0 else float("inf"),
                "spread": self.spread, "estimate": self.estimate}


class Spectrum:
    """Result of :func:`spectrum`: per-block and end-to-end Jacobian spectra.

    Example:
        >>> import gradtrace as gt, torch
        >>> net = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        >>> spec = gt.spectrum(net, torch.randn(16, 8))
        >>> spec.blocks
        ['0', '2']
        >>> spec.singular_values("0").shape
        (8, 8)
        >>> round(spec.gain("0"), 3) > 0
        True
    """

    def __init__(self, blocks: dict[str, BlockSpectrum], end_to_end: BlockSpectrum | None,
                 skipped: dict[str, str] | None = None) -> None:
        self._blocks = dict(blocks)
        self._end = end_to_end
        #: blocks that could not be measured, name -> reason
        self.skipped = dict(skipped or {})

    @property
    def blocks(self) -> list[str]:
        """Block names (qualified names of their first module) in execution order."""
        return list(self._blocks)

    def block(self, name: str) -> BlockSpectrum:
        """All figures of one block; ``END_TO_END`` names the whole model.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).block("0").in_width
            4
        """
        if name == END_TO_END and self._end is not None:
            return self._end
        if name not in self._blocks:
            raise KeyError(f"no block named {name!r}; blocks: {', '.join(self._blocks) or '(none)'}")
        return self._blocks[name]

    def singular_values(self, name: str) -> np.ndarray:
        """Singular values of block ``name``'s Jacobian, ``examples × values``, descending.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).singular_values("0").shape
            (2, 4)
        """
        return self.block(name).singular_values

    def gain(self, name: str) -> float:
        """trace(JᵀJ) / input width of block ``name``, averaged over examples.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).gain("0")
            1.0
        """
        return self.block(name).gain

    def spread(self, name: str) -> float:
        """Relative variance of the squared singular values (0 = isometry).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).spread("0")
            0.0
        """
        return self.block(name).spread

    def method(self, name: str) -> str:
        """``"full"`` (all values exact) or ``"lanczos"`` (top-k and bottom-k estimates).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).method("0")
            'full'
        """
        return self.block(name).method

    def members(self, name: str) -> list[str]:
        """Qualified names of the modules a block covers, in order.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).members("0")
            ['0']
        """
        return list(self.block(name).members)

    def end_to_end(self) -> BlockSpectrum:
        """The whole model's input-output Jacobian (``.singular_values``, ``.gain``, ``.spread``).

        Raises ValueError when the model input is not floating point (no Jacobian exists).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({}, b).end_to_end().gain
            1.0
        """
        if self._end is None:
            raise ValueError("no end-to-end spectrum: the model input is not floating point "
                             "or end_to_end=False was passed")
        return self._end

    def table(self) -> list[dict[str, Any]]:
        """One row per block (then the end-to-end row), for terminal and report tables.

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> [r["block"] for r in Spectrum({"0": b}, b).table()]
            ['0', '0']
        """
        rows = [b.row() for b in self._blocks.values()]
        if self._end is not None:
            rows.append(self._end.row())
        return rows

    def to_dict(self, values: bool = False, bins: int = 30) -> dict[str, Any]:
        """JSON-ready form: table rows, log10 histograms of singular values per block.

        ``values=True`` also includes the raw singular values (large for wide models).

        Example:
            >>> b = BlockSpectrum("0", ["0"], 4, 4, "full", np.ones((2, 4)), np.ones(2), np.zeros(2))
            >>> Spectrum({"0": b}, None).to_dict(bins=5)["histogram"]["counts"]["0"]
            [0, 0, 8, 0, 0]
        """
        allb = list(self._blocks.values()) + ([self._end] if self._end is not None else [])
        logs = [np.log10(np.clip(b.singular_values.ravel(), 1e-30, None)) for b in allb]
        finite = np.concatenate([x[np.isfinite(x)] for x in logs]) if logs else np.zeros(0)
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (-1.0, 1.0)
        if hi - lo < 1e-6:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        hist = {b.name: np.histogram(x, edges)[0].tolist() for b, x in zip(allb, logs)}
        out: dict[str, Any] = {
            "blocks": self.blocks,
            "rows": [b.row() for b in self._blocks.values()],
            "end_to_end": self._end.row() if self._end is not None else None,
            "histogram": {"log10_edges": edges.tolist(), "counts": hist},
            "skipped": dict(self.skipped),
        }
        if values:
            out["singular_values"] = {b.name: b.singular_values.tolist() for b in allb}
        return out

    def __repr__(self) -> str:
        return f"Spectrum(blocks={len(self._blocks)}, end_to_end={self._end is not None})"
