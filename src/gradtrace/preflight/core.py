"""Preflight: predict vanishing and exploding gradients before the first training step.

:func:`preflight` runs the signal pass (:mod:`.signal`: one seeded forward, one VJP with
a Gaussian cotangent), measures the per-block Jacobian spectra (:mod:`.jacobian`), adds
the mean-field χ₁ for plain MLPs (:mod:`.theory`), the recurrent checks
(:mod:`.recurrent`) and, for attention models, the branch gains, attention entropy and
LayerNorm layout (:mod:`.transformer`), then judges the summary (:mod:`.checks`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..diagnose.finding import Finding, _jsonable
from ..diagnose.thresholds import Thresholds as _DiagnosisThresholds
from .blocks import as_args, first_tensor, select_blocks
from .checks import findings as _findings, model_facts
from .jacobian import _one_thread, spectrum
from .recurrent import recurrent_rows
from .signal import signal_pass
from .spectra import Spectrum
from .table import format_table
from .theory import mean_field, mean_field_profile, plain_mlp
from .transformer import layout_from_gains

__all__ = ["preflight", "PreflightResult", "PreflightThresholds", "PREFLIGHT_FULL_MAX",
           "PREFLIGHT_SPECTRUM"]

#: Widest block whose full spectrum preflight computes; wider blocks use the matrix-free
#: Lanczos top-k/bottom-k and a Hutchinson gain (see bench/spectrum.py for the crossover).
PREFLIGHT_FULL_MAX = 256

_DIAGNOSIS = _DiagnosisThresholds()

#: Spectrum settings of preflight (each overridable through ``**spectrum_kwargs``). A
#: transformer block's Jacobian spans every token, so it is matrix-free, and its cost is
#: Lanczos steps × (one JVP + one VJP). On a d=64 pre-LN encoder block (1024 coordinates
#: per example) 12 steps find σ_max within 2e-5 of a full SVD and 4 Hutchinson probes the
#: gain within 0.2 % (tests/test_preflight_models.py checks it). Measured with
#: bench/spectrum.py: a 12-layer d=256 encoder took ~75 s with the ``spectrum`` defaults
#: (k=8, 40 steps, 16 probes) and fits the 30 s budget with these.
PREFLIGHT_SPECTRUM = {"full_max": PREFLIGHT_FULL_MAX, "k": 4, "iters": 12, "n_probes": 4}


@dataclass
class PreflightThresholds:
    """Named, overridable thresholds of :func:`preflight`.

    Attributes:
        vanishing_ratio: predicted gradient norm at the first block over the last block
            below this → ``vanishing_gradients`` (error below its square). The default
            is diagnosis's ``Thresholds.vanish_total``: the same ratio, judged the same
            way at step 0 and on a recorded run.
        exploding_ratio: the same ratio above this → ``exploding_gradients``; default
            diagnosis's ``Thresholds.explode_total``.
        shrinking_ratio: RMS of the last block's output over the first block's below
            this → ``shrinking_activations``.
        growing_ratio: the same above this → ``growing_activations``.
        time_vanishing_ratio: norm of ∂h_T/∂h_0 (or Pascanu's bound (γσ_max)^T) below
            this over the unroll horizon → ``vanishing_through_time``.
        time_exploding_ratio: measured ‖∂h_T/∂h_0‖ above this → ``exploding_through_time``.
        time_horizon: steps over which recurrent decay is judged; ``None`` uses the
            sequence length of the example batch.
        saturated_frac: fraction of a sigmoid/tanh module's outputs in the flat range
            (the recorder's ``SATURATION_BOUNDS``), or of a block's attention rows whose
            softmax Jacobian norm is below the same bound's (see
            :mod:`gradtrace.preflight.transformer`), above which they are saturated;
            default diagnosis's ``saturated_frac``. Saturated attention is a
            ``saturated_units`` warning. Saturated sigmoid/tanh units are a finding when
            the gradients also explode and every activation is bounded: the saturation is
            then the predicted outcome (see :mod:`gradtrace.preflight.checks`).
        post_ln_block_gain: in a post-LN transformer (each block ends in a norm), the
            per-block growth of the parameter-gradient norm from the median block to the
            last, (last / median)^(2/(L − 1)) for L blocks, above this → the pattern of Xiong
            et al. 2020 (gradients largest near the output at init): a
            ``vanishing_gradients`` warning whose fixes are pre-LN (``norm_first=True``)
            and a warm-up. The default is 1 / diagnosis's ``vanish_gain``: toward the
            input each block shrinks the gradient by more than diagnosis calls vanishing
            layer by layer. Measured with ``bench/preflight_grid.py --xiong`` (5 seeds,
            3–12 blocks, d = 32/64): pre-LN's per-block growth stays ≤ 1.01 (level, as
            Xiong et al. predict; last/median 0.69–1.02), post-LN's is 1.00–1.29
            (last/median up to 4.0, mostly a bump at the last block), so it fires on the
            steepest post-LN stacks (2 of 30 there) and on no pre-LN one.

    Example:
        >>> PreflightThresholds(vanishing_ratio=1e-4).exploding_ratio
        100.0
    """

    vanishing_ratio: float = _DIAGNOSIS.vanish_total
    exploding_ratio: float = _DIAGNOSIS.explode_total
    shrinking_ratio: float = 1e-2
    growing_ratio: float = 1e2
    time_vanishing_ratio: float = 1e-3
    time_exploding_ratio: float = 1e3
    time_horizon: int | None = None
    post_ln_block_gain: float = 1.0 / _DIAGNOSIS.vanish_gain
    saturated_frac: float = _DIAGNOSIS.saturated_frac

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "time_horizon":
                if v is not None and (not isinstance(v, int) or v < 1):
                    raise ValueError(f"time_horizon must be None or a positive int, got {v!r}")
            elif not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{f.name} must be a positive number, got {v!r}")
        if self.saturated_frac > 1:
            raise ValueError(f"saturated_frac must be a fraction in (0, 1], got {self.saturated_frac!r}")


class PreflightResult(list):
    """The findings of :func:`preflight` (a plain ``list[Finding]``) plus ``.summary``
    (per-block table and depth-wide predictions, a dict) and ``.spectrum``.

    Example:
        >>> r = PreflightResult([], {"blocks": []}, None)
        >>> bool(r), r.summary["blocks"]
        (False, [])
    """

    def __init__(self, findings: list[Finding], summary: dict[str, Any],
                 spectrum: Spectrum | None) -> None:
        super().__init__(findings)
        self.summary = summary
        self.spectrum = spectrum

    @property
    def healthy(self) -> bool:
        return len(self) == 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"findings": [...], "summary": {...}, "spectrum": {...}}``.

        Example:
            >>> PreflightResult([], {"blocks": []}, None).to_dict()
            {'findings': [], 'summary': {'blocks': []}, 'spectrum': None}
        """
        return _jsonable({"findings": [f.to_dict() for f in self], "summary": self.summary,
                          "spectrum": self.spectrum.to_dict() if self.spectrum else None})

    def table(self) -> str:
        """The per-block summary as fixed-width text.

        Example:
            >>> r = preflight(nn.Sequential(nn.Linear(8, 8), nn.Tanh()), torch.randn(4, 8))
            >>> r.table().splitlines()[0].split()[:2]
            ['block', 'fwd']
        """
        return format_table(self.summary)


def preflight(model: nn.Module, example_input: Any, loss_fn: Callable[[Any], torch.Tensor] | None = None,
              *, thresholds: PreflightThresholds | None = None, blocks: Any = None,
              n_samples: int = 4, compute_spectrum: bool = True, seed: int = 0,
              **spectrum_kwargs: Any) -> PreflightResult:
    """Predict vanishing/exploding gradients at initialisation, before training.

    Returns a :class:`PreflightResult`: a ``list[Finding]`` (empty when healthy) with
    ``.summary`` (per-block forward RMS, backward gain from a random cotangent, gradient
    ratio first/last, depth scale, mean-field χ₁ for plain MLPs, recurrent checks) and
    ``.spectrum`` (:class:`gradtrace.Spectrum`, or None with ``compute_spectrum=False``).

    Args:
        model: the model; left unchanged (mode, buffers, grads, hooks).
        example_input: a batch (tensor or tuple of positional args).
        loss_fn: optional ``loss_fn(output) -> scalar``; its gradient replaces the
            Gaussian cotangent at the output.
        thresholds: :class:`PreflightThresholds` (defaults documented there).
        blocks: as in :func:`gradtrace.spectrum`.
        n_samples: examples used for the Jacobian spectra.
        compute_spectrum: measure the per-block Jacobian spectra (slower).
        seed: seeds the cotangent, dropout and probes (global RNG state restored).
        **spectrum_kwargs: passed on to :func:`gradtrace.spectrum` (``k``, ``method``,
            ``full_max``, ``iters``, ``n_probes``; defaults here: ``PREFLIGHT_SPECTRUM``).

    Example:
        >>> import gradtrace as gt
        >>> net = nn.Sequential(*[m for _ in range(40) for m in (nn.Linear(32, 32), nn.Sigmoid())])
        >>> [f.kind for f in gt.preflight(net, torch.randn(16, 32))]
        ['vanishing_gradients']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if thresholds is None:
        thresholds = PreflightThresholds()
    elif not isinstance(thresholds, PreflightThresholds):
        raise TypeError(f"thresholds must be a PreflightThresholds, got {type(thresholds).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable: loss_fn(output) -> scalar tensor")
    args = as_args(example_input)
    groups = select_blocks(model, blocks)
    grads_before = [p.grad for p in model.parameters()]
    # one intra-op thread, as the spectrum: on shared cores thread teams stall per small op
    with _one_thread(spectrum_kwargs.get("num_threads", 1)):
        sp = signal_pass(model, args, groups, loss_fn, seed)
    keys, gnorm = sp.keys, sp.gnorm
    if not keys:
        raise ValueError("no block ran in the forward pass; pass blocks= explicitly")
    last = gnorm.get((keys[-1], "out"), float("nan"))
    rows = []
    for k in keys:
        gi, go = gnorm.get((k, "in")), gnorm.get((k, "out"), float("nan"))
        row = {"block": k, "forward_rms_in": sp.fwd[k][0], "forward_rms": sp.fwd[k][1],
               "grad_norm_out": go, "grad_norm_in": gi,
               "backward_gain": (gi / go) ** 2 if gi is not None and go > 0 else None,
               "grad_ratio_to_last": go / last if last > 0 else float("nan"),
               "param_grad_norm": sp.param_grad.get(k)}
        for branch, fig in sp.branches.get(k, {}).items():
            row[f"{branch}_forward_ratio"] = fig["forward_ratio"]
            row[f"{branch}_gain"] = fig["gain"]
        row.update(sp.attention.get(k, {}))
        if k in sp.saturated:
            row["saturated_fraction"] = sp.saturated[k]
        rows.append(row)
    gains = [r["backward_gain"] for r in rows if r["backward_gain"] is not None and r["backward_gain"] > 0]
    mean_gain = float(np.exp(np.mean(np.log(gains)))) if gains else float("nan")
    ratio = rows[0]["grad_ratio_to_last"]
    lg = abs(math.log(mean_gain)) if gains else float("nan")
    summary: dict[str, Any] = {
        "blocks": rows,
        "depth": len(rows),
        "grad_ratio_first_last": ratio,
        "forward_ratio_last_first": rows[-1]["forward_rms"] / rows[0]["forward_rms"]
        if rows[0]["forward_rms"] > 0 else float("nan"),
        "mean_backward_gain": mean_gain,
        "depth_scale": (math.inf if lg < 1e-12 else 1.0 / lg) if gains else float("nan"),
        "thresholds": asdict(thresholds),
    }
    ds = summary["depth_scale"]
    summary["trainable_depth"] = 6 * ds if np.isfinite(ds) else math.inf
    if sum(1 for k in keys if "attention" in sp.branches.get(k, {})) >= 2:
        summary["transformer"] = layout_from_gains(rows, [sp.ends_in_norm.get(k, False) for k in keys])
    mlp = plain_mlp(model, [g for g in groups if g[0] in keys])
    if mlp is not None:
        x0 = first_tensor(args)
        prof = mean_field_profile(mlp, float(x0.detach().double().pow(2).mean()))
        for r, p in zip(rows, prof):
            r["chi1_mean_field"] = p["chi1"]
            r["sigma_w2"] = p["sigma_w2"]
            if p["saturated_fraction"] is not None:
                r["saturated_mean_field"] = p["saturated_fraction"]
        hidden = mlp[1:-1] or mlp
        sw2 = float(np.mean([p["sigma_w2"] for p in prof[1:-1] or prof]))
        sb2 = float(np.mean([p["sigma_b2"] for p in prof[1:-1] or prof]))
        act = hidden[len(hidden) // 2][1]
        summary["mean_field"] = {"activation": act, "sigma_w2": sw2, "sigma_b2": sb2,
                                 **mean_field(act, sw2, sb2)}
    spec = None
    if compute_spectrum:
        for name, value in PREFLIGHT_SPECTRUM.items():
            spectrum_kwargs.setdefault(name, value)
        spec = spectrum(model, args, blocks=blocks, n_samples=n_samples, seed=seed, **spectrum_kwargs)
        for r in rows:
            if r["block"] in spec.blocks:
                b = spec.block(r["block"])
                r.update(jacobian_gain=b.gain, sigma_max=b.sigma_max, sigma_min=b.sigma_min,
                         spread=b.spread, estimate=f"{b.method}/{b.estimate}")
            elif r["block"] in spec.skipped:
                r["not_measured"] = spec.skipped[r["block"]]
        try:
            e = spec.end_to_end()
            summary["end_to_end"] = {"gain": e.gain, "sigma_max": e.sigma_max,
                                     "sigma_min": e.sigma_min, "spread": e.spread,
                                     "from": e.members[0] or "input",
                                     "estimate": f"{e.method}/{e.estimate}"}
        except ValueError:
            pass
    rec_rows = recurrent_rows(model, sp.rnn_inputs, thresholds.time_horizon, n_samples, seed)
    if rec_rows:
        summary["recurrent"] = rec_rows
    for p, g in zip(model.parameters(), grads_before):
        p.grad = g
    found = _findings(summary, rec_rows, thresholds, model_facts(model), sp.finite)
    return PreflightResult(found, summary, spec)
