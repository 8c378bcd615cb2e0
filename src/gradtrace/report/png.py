"""The report's figures as PNG files, drawn with matplotlib (imported only here).

Example:
    >>> import importlib.util
    >>> files = write_pngs(gt.load("runs/exp1"), "plots") if importlib.util.find_spec("matplotlib") else ["x"]
    >>> len(files) >= 1
    True
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .figdata import downsample, gradient_flow, layer_grad_norms, module_rows, spike_marks, time_gradients
from .figures import ACT_STATS


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("PNG plots need matplotlib: pip install matplotlib "
                          "(or pip install gradtrace[plots])") from None
    return plt


def write_pngs(trace, out_dir: str | os.PathLike, findings: Sequence[Any] = ()) -> list[Path]:
    """Write each figure of the report as a PNG file (matplotlib needed; imported here).

    Returns the files written. Raises ``ImportError`` naming ``pip install matplotlib``
    when matplotlib is missing.

    Example:
        >>> import importlib.util
        >>> if importlib.util.find_spec("matplotlib"):
        ...     print(write_pngs(gt.load("runs/exp1"), "plots")[0].name)
        ... else:
        ...     print("gradient_flow.png")
        gradient_flow.png
    """
    plt = _matplotlib()
    from matplotlib.colors import LogNorm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def save(fig, name: str) -> None:
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        written.append(p)

    flow = gradient_flow(trace)
    if flow["layers"] and len(flow["steps"]):
        fig, ax = plt.subplots(figsize=(8, 4))
        x = np.arange(len(flow["layers"]))
        ax.semilogy(x, flow["mean"], "o-", label="mean over steps")
        ax.semilogy(x, flow["max"], "s--", label="max over steps")
        ax.set_xticks(x, flow["layers"], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel("layer (input side left)")
        ax.set_ylabel("gradient L2 norm (log)")
        ax.set_title("Gradient flow per layer")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "gradient_flow.png")

        steps, layers, g = layer_grad_norms(trace)
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(layers) + 1.5)))
        gm = np.ma.masked_invalid(np.where(g > 0, g, np.nan)).T
        if gm.count():
            im = ax.imshow(gm, aspect="auto", interpolation="nearest", norm=LogNorm(),
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, len(layers) - 0.5, -0.5))
            fig.colorbar(im, ax=ax, label="grad norm (log)")
        ax.set_yticks(range(len(layers)), layers, fontsize=8)
        ax.set_xlabel("step")
        ax.set_title("Gradient norm per layer over steps")
        save(fig, "grad_norm_heatmap.png")

    for stat, (title, label, log) in ACT_STATS.items():
        steps, mods, m = module_rows(trace, stat)
        if not mods:
            continue
        fig, ax = plt.subplots(figsize=(9, max(3, 0.28 * len(mods) + 1.5)))
        mm = np.ma.masked_invalid(np.where((m > 0) if log else np.isfinite(m), m, np.nan))
        if mm.count():
            kw = {"norm": LogNorm()} if log else {"vmin": 0.0, "vmax": 1.0}
            im = ax.imshow(mm, aspect="auto", interpolation="nearest",
                           extent=(steps[0] - 0.5, steps[-1] + 0.5, len(mods) - 0.5, -0.5), **kw)
            fig.colorbar(im, ax=ax, label=label)
        ax.set_yticks(range(len(mods)), mods, fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(title)
        save(fig, f"{stat}_heatmap.png")

    if "loss" in trace.stats():
        steps, loss = trace.series("loss", with_steps=True)
        fig, ax = plt.subplots(figsize=(8, 3.5))
        ax.plot(*downsample(steps, loss, 4000), label="loss")
        for i, s in enumerate(spike_marks(steps, loss, findings)):
            ax.axvline(s, color="#D55E00", ls="--", lw=1, label="spike" if i == 0 else None)
        for i, e in enumerate(trace.events("guard_skip")):
            ax.axvline(e["step"], color="grey", ls=":", lw=1, label="guard skip" if i == 0 else None)
        fin = loss[np.isfinite(loss)]
        if fin.size and fin.min() > 0 and fin.max() / fin.min() > 50:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_title("Loss")
        ax.grid(True, alpha=0.3)
        ax.legend()
        save(fig, "loss.png")

    tg = time_gradients(trace)
    if tg:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for name, v in tg.items():
            ax.semilogy(np.arange(v.shape[1]), v[0], label=f"{name}: first recorded step")
            if v.shape[0] > 1:
                ax.semilogy(np.arange(v.shape[1]), v[-1], "--", label=f"{name}: last recorded step")
        ax.set_xlabel("input time step")
        ax.set_ylabel("gradient norm (log)")
        ax.set_title("Gradient reaching each time step")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        save(fig, "time_gradients.png")
    return written
