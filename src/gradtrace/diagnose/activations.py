"""Activation scale (``out_std``) shrinking or growing across depth, between normalisation layers."""
from __future__ import annotations

import math

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from .gradients import depth_profile
from .thresholds import Thresholds


def _segment(row: np.ndarray, shrink: bool, th: Thresholds) -> tuple[bool, int, float, float]:
    """Judge one step's log-profile: from the first layer to the deepest trough (or
    peak), fit the per-layer gain. Returns (qualifies, end index, gain, total ratio)."""
    end = int(np.argmin(row) if shrink else np.argmax(row))
    if end + 1 < th.depth_min_layers:
        return False, end, 1.0, 1.0
    gain = math.exp(U.fit_gain(row[: end + 1])[0])
    total = math.exp(row[end] - row[0])
    if shrink:
        ok = gain < th.act_shrink_gain and total < th.act_shrink_total
    else:
        ok = gain > th.act_grow_gain and total > th.act_grow_total
    return ok, end, gain, total


def chains(trace: Trace, layers: list[str]) -> list[list[int]]:
    """Split the profile's ``layers`` (execution order) into the stretches between
    normalisation layers: indices into ``layers``, one list per stretch.

    A normalisation layer sets its output's scale whatever its input's, so a layer after
    it starts from that scale again: growth or shrinkage compounds only along a stretch
    with no normaliser in it. Across one, the profile compares branches of different
    blocks (in a pre-LN transformer every branch reads LayerNorm's output, and the
    attention output and MLP output are as large as their own weights make them), which is
    not a signal carried from layer to layer.

    Example:
        >>> t = gt.load("runs/exp1")
        >>> chains(t, ["0", "2", "4"])
        [[0, 1, 2]]
    """
    pos = {n: i for i, n in enumerate(U.exec_order(trace))}
    kind = {m["name"]: m.get("activation") for m in trace.meta.get("modules", [])}
    norms = sorted(i for n, i in pos.items() if kind.get(n) == "norm")
    out: list[list[int]] = []
    last = None
    for i, name in enumerate(layers):
        seg = int(np.searchsorted(norms, pos.get(name, -1)))   # normalisers run before it
        if seg != last:
            out.append([])
            last = seg
        out[-1].append(i)
    return out


def detect(trace: Trace, th: Thresholds) -> list[Finding]:
    """``shrinking_activations`` / ``growing_activations``.

    Per activation step, ``log(out_std)`` of the weight-bearing layers in execution order
    is cut into stretches at normalisation layers (:func:`chains`: a normaliser resets the
    scale, so the signal compounds only between two of them). Along each stretch of at least
    ``th.depth_min_layers`` layers, from its first layer down to its deepest trough
    (shrinking) or highest peak (growing) - training can let biases take over the deepest
    layers, so the collapse need not run to the output - the least-squares slope gives the
    forward gain per layer. Shrinking: gain below ``th.act_shrink_gain`` and trough/first
    scale below ``th.act_shrink_total``; growing mirrors it with ``act_grow_*``; the rule
    must persist (:func:`~gradtrace.diagnose._util.persistent`) before any nan. Of the
    stretches that meet it, the one flagged first is reported. Layers: most affected (the
    trough or peak) first, then the ones before it, deepest first.

    Example:
        >>> detect(gt.load("runs/exp1"), Thresholds())
        []
    """
    prof = depth_profile(trace, "out_std", th, exclude_kinds=("norm",))
    if prof is None:
        return []
    steps, layers, logs = prof
    keep = U.before_nonfinite(steps, trace)
    steps, logs = steps[keep], logs[keep]
    if steps.size == 0:
        return []
    out = []
    for kind in ("shrinking_activations", "growing_activations"):
        found = [f for idx in chains(trace, layers) if len(idx) >= th.depth_min_layers
                 for f in [_judge(kind, steps, [layers[i] for i in idx], logs[:, idx], th)] if f is not None]
        if found:
            out.append(min(found, key=lambda f: f.first_step))
    return out


def _judge(kind: str, steps: np.ndarray, layers: list[str], logs: np.ndarray, th: Thresholds) -> Finding | None:
    """The rule on one stretch of layers (``logs``: steps x layers), or ``None``."""
    shrink = kind == "shrinking_activations"
    judged = [_segment(row, shrink, th) for row in logs]
    hit = np.array([j[0] for j in judged])
    flagged = U.persistent(hit, th)
    if not flagged.any():
        return None
    hits = [j for j in judged if j[0]]
    end = int(np.median([j[1] for j in hits]))
    gain = float(np.median([j[2] for j in hits]))
    total = float(np.median([j[3] for j in hits]))
    med_log = np.median(logs[hit], axis=0)
    rel = med_log - med_log[0]
    limit = math.log(th.act_shrink_total if shrink else th.act_grow_total) / 2
    affected = [layers[i] for i in range(end, 0, -1) if (rel[i] < limit if shrink else rel[i] > limit)]
    affected = affected or [layers[end]]
    evidence = {
        "per_layer_gain": gain,
        "layers_in_profile": end + 1,
        "ratio_to_first_layer": total,
        "out_std_median": {layers[i]: float(np.exp(med_log[i])) for i in range(len(layers))},
        "steps_flagged": int(hit.sum()),
        "steps_examined": int(hit.size),
        "resolved": not bool(hit[-1]),
        "summary": (f"each layer multiplies the activation scale by about {U.sci(gain)}; from "
                    f"{layers[0]} to {layers[end]} the output std goes from "
                    f"{U.sci(float(np.exp(med_log[0])))} to {U.sci(float(np.exp(med_log[end])))} "
                    f"(x{U.sci(total)})"),
    }
    if shrink:
        expl = ("Each layer hands the next a signal smaller than the one it received, so by "
                f"`{layers[end]}` the activations are {U.sci(total)} times the size of the first "
                "layer's. The forward signal carries what the loss depends on, and the same small "
                "Jacobians that shrink it on the way forward shrink the gradient on the way back. "
                "Weights initialised at too small a scale for the activation (Xavier under ReLU, "
                "tiny weights under tanh) are the usual cause.")
    else:
        expl = ("Each layer hands the next a larger signal than it received, so by "
                f"`{layers[end]}` the activations are {U.sci(total)} times the size of the first "
                "layer's. Large activations push saturating units into their flat range, inflate "
                "the logits and, through the same large Jacobians, the gradients; in low precision "
                "they overflow. Initialisation at too large a scale, or a learning rate that let "
                "the weights grow, are the usual causes.")
    return Finding(kind, "warning", affected, int(steps[flagged][0]), int(steps[hit][-1]), evidence, expl)
