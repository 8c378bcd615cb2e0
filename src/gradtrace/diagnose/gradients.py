"""Vanishing and exploding gradients: across depth (the output-gradient profile) and
over the steps (gradient norms far above their own robust baseline)."""
from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .finding import Finding
from ..trace import Trace
from . import _util as U
from . import corroborate as C
from .thresholds import Thresholds


def depth_profile(trace: Trace, stat: str, th: Thresholds, exclude_kinds: tuple = ()):
    """Per-step log-profile of a per-module ``stat`` over the weight-bearing layers in
    execution order: ``(steps, layers, logs)`` with ``logs`` shaped (steps, layers), or
    ``None`` when fewer than ``th.depth_min_layers`` layers have data.

    Rows with any non-finite value are dropped (those steps belong to ``nonfinite``).
    Zeros are floored at ``th.floor``.

    Example:
        >>> depth_profile(gt.load("runs/exp1"), "outgrad_norm", Thresholds()) is None   # 3 layers < 4
        True
        >>> steps, layers, logs = depth_profile(gt.load("runs/exp1"), "outgrad_norm", Thresholds(depth_min_layers=2))
        >>> logs.shape == (len(steps), len(layers))
        True
    """
    got = U.module_matrix(trace, stat)
    if got is None:
        return None
    steps, names, values = got
    weights = U.weight_modules(trace)
    col = {n: i for i, n in enumerate(names)}
    seen_any = ~np.all(np.isnan(values), axis=0)
    layers = [n for n in U.exec_order(trace) if n in weights and n in col and seen_any[col[n]]
              and U.activation_of(trace, n) not in exclude_kinds]
    if len(layers) < th.depth_min_layers:
        return None
    sub = values[:, [col[n] for n in layers]]
    keep = np.all(np.isfinite(sub), axis=1)
    if not keep.any():
        return None
    logs = np.log(np.maximum(sub[keep], th.floor))
    return steps[keep], layers, logs


def blocks(layers: list[str]) -> list[tuple[str, list[int]]]:
    """Group modules (in execution order) into the units of depth: ``(unit, indices)``.

    Repeated children (``encoder.layers.3``, ``transformer.h.3``, ``encoder.layer.3``,
    ``layer2.1``) are one unit each, however many weight-bearing modules they hold: a
    transformer block has five or so, and a gain per module would spread one block's
    shrinkage over all of them (a 12-block stack losing 1e-4 reads as 0.89 per module). A
    module's unit is its name up to the numbered component whose container has the most
    numbered children (the stack that repeats most); a module with no numbered component
    is its own unit, and so is each layer of a plain ``nn.Sequential``.

    Example:
        >>> blocks(["emb", "enc.layers.0.attn", "enc.layers.0.fc", "enc.layers.1.attn", "head"])
        [('emb', [0]), ('enc.layers.0', [1, 2]), ('enc.layers.1', [3]), ('head', [4])]
        >>> [u for u, _ in blocks(["0", "2", "4"])]
        ['0', '2', '4']
    """
    children: dict[str, set[str]] = {}
    for name in layers:
        parts = name.split(".")
        for k, p in enumerate(parts):
            if p.isdigit():
                children.setdefault(".".join(parts[:k]), set()).add(p)
    order: dict[str, list[int]] = {}
    for i, name in enumerate(layers):
        parts = name.split(".")
        cands = [k for k, p in enumerate(parts) if p.isdigit()]
        unit = name
        if cands:
            k = max(cands, key=lambda k: (len(children[".".join(parts[:k])]), -k))
            unit = ".".join(parts[: k + 1])
        order.setdefault(unit, []).append(i)
    return list(order.items())


def _activation_words(trace: Trace) -> str:
    kinds = Counter(m.get("activation") for m in trace.meta.get("modules", []))
    parts = []
    if kinds.get("sigmoid"):
        parts.append("Sigmoid's derivative is at most 0.25, so every sigmoid layer cuts the "
                     "gradient by a factor of four or more, and by far more where it saturates.")
    if kinds.get("tanh"):
        parts.append("Tanh passes gradients at full strength only near zero; with weights that "
                     "are too small each layer's Jacobian has singular values well below one, and "
                     "where tanh saturates its derivative is close to zero.")
    if kinds.get("relu"):
        parts.append("ReLU passes half the units on average, so an initialisation that does not "
                     "compensate with a gain of sqrt(2) (Kaiming) loses about 1/sqrt(2) per layer.")
    return " ".join(parts)


def detect_depth(trace: Trace, th: Thresholds) -> list[Finding]:
    """``vanishing_gradients`` / ``exploding_gradients`` from the output-gradient profile.

    For every activation step the log of ``outgrad_norm`` over the weight-bearing layers
    (execution order) is fitted against depth by least squares; ``exp(-slope)`` is the
    gain the backward pass applies per layer. A step qualifies as vanishing when that gain
    is below ``th.vanish_gain`` and the first layer's output gradient is below
    ``th.vanish_total`` times the last layer's (``explode_*`` mirror this); a finding needs
    the rule to persist (:func:`~gradtrace.diagnose._util.persistent`). Layers are listed earliest first (under a
    steady per-layer gain the earliest is the most affected), those at least
    ``sqrt(vanish_total)`` (or ``sqrt(explode_total)``) away from the last layer. Vanishing
    is an error once the ratio is below ``vanish_total ** 2``, else a warning.

    Example:
        >>> detect_depth(gt.load("runs/exp1"), Thresholds())
        []
    """
    prof = depth_profile(trace, "outgrad_norm", th)
    if prof is None:
        return []
    steps, modules, mlogs = prof
    # the depth is counted in blocks: a unit's level is the mean log over its modules
    units = blocks(modules)
    if len(units) < th.depth_min_layers:
        return []
    layers = [u for u, _ in units]
    first_module = {u: modules[ix[0]] for u, ix in units}
    logs = np.stack([mlogs[:, ix].mean(axis=1) for _, ix in units], axis=1)
    n = len(layers)
    slopes = np.array([U.fit_gain(row)[0] for row in logs])       # d log / d depth
    gains = np.exp(-slopes)                                         # backward gain per layer
    totals = np.exp(logs[:, 0] - logs[:, -1])                       # first / last
    out: list[Finding] = []
    gn = _grad_norm_ends(trace, [modules[units[0][1][0]], modules[units[-1][1][-1]]])
    unit = "block" if any(len(ix) > 1 for _, ix in units) else "layer"
    for kind, hit in (("vanishing_gradients", (gains < th.vanish_gain) & (totals < th.vanish_total)),
                      ("exploding_gradients", (gains > th.explode_gain) & (totals > th.explode_total))):
        flagged = U.persistent(hit, th)
        if not flagged.any():
            continue
        med_log = np.median(logs[hit], axis=0)
        gain = float(np.median(gains[hit]))
        total = float(np.median(totals[hit]))
        limit = math.log(th.vanish_total if kind == "vanishing_gradients" else th.explode_total) / 2
        rel = med_log - med_log[-1]
        if kind == "vanishing_gradients":
            affected = [layers[i] for i in range(n - 1) if rel[i] < limit]
        else:
            affected = [layers[i] for i in range(n - 1) if rel[i] > limit]
        # name watched modules (the first of each affected block), earliest first
        affected = [first_module[u] for u in (affected or [layers[0]])]
        ratio_txt = "0 (no gradient at all)" if total <= th.floor * 1e3 else U.sci(total)
        evidence = {
            "per_layer_gain": gain,
            "layers_in_profile": n,
            # a zero output gradient was floored for the logarithm: report 0, never the floor
            "first_to_last_outgrad_ratio": 0.0 if total <= th.floor * 1e3 else total,
            "summary": (f"going backward each {unit} multiplies the gradient by about {U.sci(gain)}; "
                        f"across {n} {unit}s that is {U.sci(gain ** (n - 1))} (observed first/last "
                        f"output-gradient ratio {ratio_txt})"),
            "outgrad_norm_median": {layers[i]: float(np.exp(med_log[i])) for i in range(n)},
            "steps_flagged": int(hit.sum()),
            "steps_examined": int(hit.size),
        }
        evidence.update(gn)
        evidence["resolved"] = not bool(hit[-1])
        if kind == "vanishing_gradients":
            expl = ("The backward pass multiplies the gradient by one layer Jacobian after another. "
                    f"Here that product shrinks by about {U.sci(gain)} per {unit}, so by the time the "
                    f"signal reaches `{affected[0]}` it is {ratio_txt} of what the last layer sees: "
                    "early layers get updates too small to learn from while the late layers train. "
                    + _activation_words(trace))
            # Past vanish_total squared (1e-4 by default) the early layers do not learn at all.
            sev = "error" if total < th.vanish_total ** 2 else "warning"
        else:
            expl = ("The backward pass multiplies the gradient by one layer Jacobian after another; "
                    f"here each {unit} amplifies it by about {U.sci(gain)}, so `{affected[0]}` receives "
                    f"{U.sci(total)} times the gradient of the last layer. Updates that size overshoot, "
                    "the loss jumps and the numbers can overflow to inf/nan. Weights initialised "
                    "with too large a scale (Jacobian singular values above one) are the usual cause.")
            sev = "error"
        out.append(Finding(kind, sev, affected, int(steps[flagged][0]), int(steps[hit][-1]),
                           evidence, expl))
    return out


def _grad_norm_ends(trace: Trace, layers: list[str]) -> dict:
    """Median ``grad_norm`` of the first and last layer's weights (corroborating evidence)."""
    if not U.has_stat(trace, "grad_norm"):
        return {}
    steps, names, g = trace.matrix("grad_norm")
    owner = U.param_owner(trace)
    res = {}
    for label, layer in (("first", layers[0]), ("last", layers[-1])):
        cols = [i for i, p in enumerate(names) if owner.get(p) == layer]
        if not cols:
            continue
        # Prefer the weight (first parameter) of the layer.
        vals = g[:, cols[0]]
        vals = vals[np.isfinite(vals)]
        if vals.size:
            res[f"{label}_layer_grad_norm"] = {names[cols[0]]: float(np.median(vals))}
    return res


def detect_over_steps(trace: Trace, th: Thresholds) -> list[Finding]:
    """``exploding_gradients`` over time: ``total_grad_norm`` far above its own baseline.

    Two baselines, both robust (median and MAD of ``log(norm)``): the trailing
    ``th.baseline_window`` records (a sudden spike) and the first window after
    ``th.warmup_steps`` (a climb, which a trailing window would follow). A spike
    is a record whose z-score against the trailing window exceeds ``th.explode_z`` and
    which is at least ``th.explode_fold`` times that window's median; a climb is a record
    that, with the median of the ``th.min_baseline`` records up to it, sits
    ``th.explode_fold`` times above the early window while the loss over that window is
    not falling. Both use only the past. Layers are the modules whose parameter
    gradients grew the most at the first flagged step, largest growth first.

    Example:
        >>> detect_over_steps(gt.load("runs/exp1"), Thresholds())
        []
    """
    if not U.has_stat(trace, "total_grad_norm"):
        return []
    steps, total = trace.series("total_grad_norm", with_steps=True)
    if total.size <= th.warmup_steps + th.min_baseline:
        return []
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.log(np.maximum(total, th.floor))
    logs[~np.isfinite(total)] = np.nan
    logfold = math.log(th.explode_fold)
    flagged: dict[int, tuple[float, float]] = {}
    spikes = [(i, z, med) for i, z, med in U.trailing_spikes(
        logs, warmup=th.warmup_steps, window=th.baseline_window, min_baseline=th.min_baseline,
        z_limit=th.explode_z) if logs[i] - med >= logfold]
    why = C.spikes_corroborated(trace, steps, logs, spikes, th)
    for i, z, med in spikes:
        if i in why:
            flagged[i] = (z, med)
    # A climb: a trailing window follows it (its baseline holds the climb), so each record
    # is also compared with the first stretch after warm-up. A record counts when it and
    # the median of the min_baseline records up to it are both explode_fold above that
    # early level: causal (only the past is used) and sustained (one odd step is not).
    # (The median is over the baseline_window records up to it.)
    fin = np.nonzero(np.isfinite(logs))[0]
    fin = fin[fin >= th.warmup_steps]
    w = th.baseline_window
    climb = None
    loss_at = dict(zip(*(a.tolist() for a in trace.scalar("loss", with_steps=True)))) if U.has_stat(trace, "loss") else {}

    early_loss = [v for v in loss_at.values() if math.isfinite(v)][: th.baseline_window]
    level = float(np.median(early_loss)) if early_loss else 0.0

    vals = logs[fin]
    # the loss at each finite record (nan where none was recorded), looked up once
    loss_fin = np.array([loss_at.get(int(steps[j]), np.nan) for j in fin.tolist()], dtype=np.float64)

    def loss_improving(k: int) -> bool:
        """Did the loss not rise up to record fin[k] (:func:`~gradtrace.diagnose.corroborate.loss_rose`)? A gradient norm
        that grows while the loss falls or holds is training reaching sharper regions, not
        an explosion."""
        ls = loss_fin[max(0, k + 1 - 4 * w): k + 1]    # enough for loss_rose's 2 windows
        ls = ls[np.isfinite(ls)]
        return ls.size >= 4 and not C.loss_rose(ls, level, th)
    k0 = max(th.min_baseline, w - 1)    # a sustained climb needs a full window of records
    if fin.size > th.min_baseline and fin.size > k0:
        ks = np.arange(k0, fin.size)
        # the early baseline is the first min(k, w) finite records: only k0 can be below w
        early_of = {m: vals[:m] for m in {min(k0, w), min(k0 + 1, w)}}
        med_of = {m: float(np.median(e)) for m, e in early_of.items()}
        med_e = np.where(ks >= w, med_of[min(k0 + 1, w)], med_of[min(k0, w)])
        recent = U.window_medians(vals, w)[ks - w + 1]          # median of records k-w+1 .. k
        cand = (vals[ks] - med_e >= logfold) & (recent - med_e >= logfold)
        for k in ks[cand].tolist():
            m = min(k, w)
            i = int(fin[k])
            if loss_improving(k):
                continue
            if climb is None:
                climb = {"early_median": math.exp(med_of[m]), "first_step": int(steps[i])}
            climb["latest"] = float(math.exp(logs[i]))
            climb["growth"] = float(math.exp(logs[i] - med_of[m]))
            if i not in flagged:
                flagged[i] = (U.robust_z(float(logs[i]), early_of[m])[0], med_of[m])
    # Within the warm-up no baseline exists yet, but a norm explode_fold above the run's
    # first one is no warm-up: the first updates are blowing the model up.
    first = np.flatnonzero(np.isfinite(logs))
    if first.size:
        for i in first[(first > first[0]) & (first < th.warmup_steps + th.min_baseline)]:
            if logs[i] - logs[first[0]] >= logfold and i not in flagged:
                flagged[int(i)] = (math.inf, float(logs[first[0]]))
                climb = climb or {"early_median": math.exp(logs[first[0]]), "first_step": int(steps[i]),
                                  "growth": math.exp(logs[i] - logs[first[0]]), "in_warmup": True}
    # Whoever clips: a flagged step whose applied update the user's clipping bounded, while
    # the loss held up to it, is not reported. Clipping is the remedy for exploding gradients;
    # a pre-clip norm that grows while the clipped updates keep training on course is that
    # remedy doing its job (the chapter's clipped RNN), and nothing the user should change.
    # Once the loss rises or goes non-finite despite the clipping, the steps count again.
    # Each step is judged with the records up to it, so a live run says the same.
    held = C.contained(trace, [int(steps[i]) for i in flagged], loss_at, level, th)
    idx = [i for i in sorted(flagged) if int(steps[i]) not in held]
    if not idx:
        return []
    i0 = idx[0]
    z0, med0 = flagged[i0]
    layers, growth = _growing_layers(trace, int(steps[i0]), th)
    evidence = {
        "first_flagged_step": int(steps[i0]),
        "total_grad_norm": float(total[i0]),
        "baseline_grad_norm": float(math.exp(med0)),
        "fold_over_baseline": float(math.exp(logs[i0] - med0)),
        "robust_z_log_norm": float(z0) if math.isfinite(z0) else None,
        "steps_flagged": [int(steps[i]) for i in idx[:20]],
        "max_total_grad_norm": float(np.nanmax(np.where(np.isfinite(total), total, np.nan))),
        "layer_growth": growth,
        "steady_climb": climb,
        "summary": (f"total gradient norm {U.sci(float(total[i0]))} at step {int(steps[i0])} is "
                    f"{U.sci(math.exp(logs[i0] - med0))}x its robust baseline "
                    f"{U.sci(math.exp(med0))} " + (f"(z = {z0:.1f} on log scale)" if math.isfinite(z0)
                                                    else "(the run's first norm: it exploded in its first steps)")),
    }
    expl = ("The gradient norm rose far above its own earlier level. A step taken with a gradient "
            "that large moves the weights much further than the steps before it, which usually shows "
            "up as a loss spike and, if it repeats or compounds, as inf/nan. Typical causes are a "
            "learning rate at the edge of stability, an unusual batch, or layers whose weights "
            "have grown so the backward pass amplifies.")
    # An isolated spike that training survives is a warning; a climb, repeated spikes or
    # a run that ends non-finite is an error, unless gradtrace's clipping held every
    # flagged step's update to a bounded norm (the remedy is already in place).
    ends_bad = not np.isfinite(total[-1])
    clipped = C.clipped_norms(trace, [int(steps[i]) for i in idx])
    if clipped:
        evidence["post_clip_max"] = max(clipped)
        evidence["summary"] += f"; clipping held the applied norm to at most {U.sci(max(clipped))}"
        expl += (" Norm clipping was active on these steps, so the updates actually applied "
                 "were bounded; the spikes are contained, but their cause is still worth a look.")
    severity = "error" if (climb is not None or len(idx) >= 3 or ends_bad) and not clipped else "warning"
    evidence["resolved"] = bool(np.isfinite(total[-1]) and idx[-1] < total.size - 1
                                and logs[-1] - med0 < logfold)
    return [Finding("exploding_gradients", severity, layers, int(steps[i0]), int(steps[idx[-1]]),
                    evidence, expl)]


def _growing_layers(trace: Trace, step: int, th: Thresholds) -> tuple[list[str], dict]:
    if not U.has_stat(trace, "grad_norm"):
        return [], {}
    steps, names, g = trace.matrix("grad_norm")
    rows = np.nonzero(steps == step)[0]
    if rows.size == 0:
        return [], {}
    r = int(rows[0])
    base = g[max(0, r - th.baseline_window): r]
    with np.errstate(all="ignore"):
        med = np.nanmedian(np.where(np.isfinite(base), base, np.nan), axis=0) if base.size else np.full(g.shape[1], np.nan)
        ratio = g[r] / np.maximum(med, th.floor)
    owner = U.param_owner(trace)
    best: dict[str, float] = {}
    for p, v in zip(names, ratio):
        if np.isfinite(v):
            m = owner.get(p, p)
            best[m] = max(best.get(m, 0.0), float(v))
    ranked = sorted(best, key=lambda m: -best[m])
    big = [m for m in ranked if best[m] >= th.explode_fold] or ranked[:3]
    return big, {m: best[m] for m in ranked[:10]}
