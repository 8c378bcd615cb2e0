"""Preflight: predict vanishing and exploding gradients before the first training step.

One seeded batch goes forward and one random cotangent goes backward (a VJP with a
Gaussian vector, not ``y.sum()``, which would bias the ratios). From that pass we read,
per block, the forward scale (RMS of the block output) and the backward gain (how the
squared gradient norm changes across the block). Their products over depth predict what
training will see at step 0. The Jacobian spectra of :func:`gradtrace.spectrum` add the
shape of the per-block spectrum (dynamical isometry, Pennington et al. 2017).

For plain MLPs the mean-field theory of Poole et al. 2016 / Schoenholz et al. 2017
predicts the per-layer gain χ₁ = σ_w² E_z[φ′(√q z)²] from the weight variance and the
activation; it is reported beside the measured gain. Recurrent layers are checked
against Pascanu, Mikolov & Bengio 2013: with γ bounding |φ′| (1 for tanh and ReLU,
¼ for sigmoid), a largest singular value of W_hh below 1/γ is sufficient for gradients
to vanish through time; the Jacobian of the hidden state over the time steps of the
example batch is measured as well.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .findings import Finding, Fix, _jsonable
from .spectrum import (Spectrum, _as_args, _Capture, _first_tensor,
                       _select_blocks, spectrum)

__all__ = ["preflight", "PreflightResult", "PreflightThresholds", "mean_field"]

#: Widest block whose full spectrum preflight computes; wider blocks use the matrix-free
#: Lanczos top-k/bottom-k and a Hutchinson gain (see bench/spectrum.py for the crossover).
PREFLIGHT_FULL_MAX = 256


@dataclass
class PreflightThresholds:
    """Named, overridable thresholds of :func:`preflight`.

    Attributes:
        vanishing_ratio: predicted gradient norm at the first block over the last block
            below this → ``vanishing_gradients`` (error below its square).
        exploding_ratio: the same ratio above this → ``exploding_gradients``.
        shrinking_ratio: RMS of the last block's output over the first block's below
            this → ``shrinking_activations``.
        growing_ratio: the same above this → ``growing_activations``.
        time_vanishing_ratio: norm of ∂h_T/∂h_0 (or Pascanu's bound (γσ_max)^T) below
            this over the unroll horizon → ``vanishing_through_time``.
        time_exploding_ratio: measured ‖∂h_T/∂h_0‖ above this → ``exploding_through_time``.
        time_horizon: steps over which recurrent decay is judged; ``None`` uses the
            sequence length of the example batch.

    Example:
        >>> PreflightThresholds(vanishing_ratio=1e-4).exploding_ratio
        1000.0
    """

    vanishing_ratio: float = 1e-3
    exploding_ratio: float = 1e3
    shrinking_ratio: float = 1e-2
    growing_ratio: float = 1e2
    time_vanishing_ratio: float = 1e-3
    time_exploding_ratio: float = 1e3
    time_horizon: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "time_horizon":
                if v is not None and (not isinstance(v, int) or v < 1):
                    raise ValueError(f"time_horizon must be None or a positive int, got {v!r}")
            elif not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{f.name} must be a positive number, got {v!r}")


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
        return _format_table(self.summary)


# ----------------------------------------------------------------------------- mean field

_GH_X, _GH_W = np.polynomial.hermite_e.hermegauss(100)  # even count: no node at 0
_GH_W = _GH_W / math.sqrt(2 * math.pi)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1 + np.tanh(0.5 * x))


# activation -> (φ, φ′) on numpy arrays; piecewise-linear ones get exact moments below
_ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
    "tanh": (np.tanh, lambda x: 1 - np.tanh(x) ** 2),
    "sigmoid": (_sigmoid, lambda x: _sigmoid(x) * (1 - _sigmoid(x))),
    "relu": (lambda x: np.maximum(x, 0), lambda x: (x > 0).astype(float)),
    "linear": (lambda x: x, lambda x: np.ones_like(x)),
    "gelu": (lambda x: 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2))),
             lambda x: 0.5 * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
             + x * np.exp(-x * x / 2) / math.sqrt(2 * math.pi)),
    "silu": (lambda x: x * _sigmoid(x), lambda x: _sigmoid(x) * (1 + x * (1 - _sigmoid(x)))),
}
_MODULE_ACT = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.Identity: "linear",
               nn.GELU: "gelu", nn.SiLU: "silu"}


def _moments_q(act: str, q: float) -> tuple[float, float]:
    """(E[φ(√q z)²], E[φ′(√q z)²]) for z ~ N(0, 1)."""
    if act == "relu":
        return q / 2, 0.5
    if act == "linear":
        return q, 1.0
    phi, dphi = _ACTIVATIONS[act]
    h = math.sqrt(max(q, 0.0)) * _GH_X
    return float(_GH_W @ phi(h) ** 2), float(_GH_W @ dphi(h) ** 2)


def mean_field(activation: str, sigma_w2: float, sigma_b2: float = 0.0, q0: float = 1.0,
               depth: int = 500) -> dict[str, float]:
    """Mean-field fixed point q* and χ₁ = σ_w² E[φ′(√q* z)²] (Gauss–Hermite quadrature).

    Iterates q ← σ_w² E[φ(√q z)²] + σ_b² from ``q0`` for ``depth`` layers. Also returns the
    depth scale ξ = 1/|ln χ₁| (``inf`` at χ₁ = 1).

    Example:
        >>> round(mean_field("relu", 2.0)["chi1"], 6)
        1.0
        >>> mean_field("tanh", 1.0)["chi1"] <= 1.0
        True
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation={activation!r}; valid: {', '.join(_ACTIVATIONS)}")
    if not sigma_w2 > 0 or sigma_b2 < 0:
        raise ValueError(f"need sigma_w2 > 0 and sigma_b2 >= 0, got {sigma_w2!r}, {sigma_b2!r}")
    q = float(q0)
    for _ in range(depth):
        q = sigma_w2 * _moments_q(activation, q)[0] + sigma_b2
    chi1 = sigma_w2 * _moments_q(activation, q)[1]
    xi = math.inf if abs(math.log(chi1)) < 1e-12 else 1.0 / abs(math.log(chi1))
    return {"q_star": q, "chi1": chi1, "depth_scale": xi}


def _plain_mlp(model: nn.Module, groups: list[list[str]]) -> list[tuple[nn.Linear, str]] | None:
    """[(linear, activation)] per block when every block is Linear [+ one activation]."""
    mods = dict(model.named_modules())
    out = []
    for g in groups:
        ms = [mods[n] for n in g if not isinstance(mods[n], (nn.Dropout, nn.Flatten))]
        if not ms or not isinstance(ms[0], nn.Linear) or len(ms) > 2:
            return None
        act = "linear"
        if len(ms) == 2:
            act = _MODULE_ACT.get(type(ms[1]))
            if act is None:
                return None
        out.append((ms[0], act))
    return out if len(out) >= 2 else None


def _mean_field_profile(layers: list[tuple[nn.Linear, str]], q_in: float) -> list[dict[str, float]]:
    """Per-block σ_w², σ_b², pre-activation variance q and predicted gain χ₁."""
    rows = []
    m2 = q_in  # mean square of the block input
    for lin, act in layers:
        w = lin.weight.detach()
        sw2 = float(torch.linalg.vector_norm(w, dtype=torch.float64) ** 2) / w.numel() * lin.in_features
        sb2 = (float(torch.linalg.vector_norm(lin.bias.detach(), dtype=torch.float64) ** 2) / lin.bias.numel()
               if lin.bias is not None else 0.0)
        q = sw2 * m2 + sb2
        phi2, dphi2 = _moments_q(act, q)
        rows.append({"sigma_w2": sw2, "sigma_b2": sb2, "q": q, "chi1": sw2 * dphi2,
                     "activation": act})
        m2 = phi2
    return rows


# ----------------------------------------------------------------------------- the pass


def _rms(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64)) / math.sqrt(max(t.numel(), 1))


def _signal_pass(model: nn.Module, args: tuple, groups: list[list[str]], loss_fn, seed: int):
    """Forward once, backward once with a Gaussian cotangent (or the loss). Training
    mode is kept (dropout, batch statistics) but buffers are restored afterwards."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    cap = _Capture(model, groups)
    rnn_inputs: dict[str, tuple] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            def pre(mod, a, kw, name=name):
                rnn_inputs.setdefault(name, (a, kw))
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
    idx = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor)), None)
    args = list(args)
    if idx is not None and args[idx].is_floating_point():
        args[idx] = args[idx].detach().clone().requires_grad_(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.enable_grad():
                try:
                    out = model(*args)
                except Exception as e:  # a wrong shape is an input error, said in one line
                    shape = tuple(_first_tensor(args).shape) if _first_tensor(args) is not None else ()
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    raise ValueError(f"model failed on example_input of shape {shape}: {msg}") from None
                y = _first_tensor(out)
                if y is None or not y.is_floating_point():
                    raise ValueError("the model output has no floating-point tensor to differentiate")
                if loss_fn is not None:
                    root, cot = loss_fn(out), None
                else:
                    root, cot = y, torch.randn(y.shape, dtype=y.dtype)
                keys = [k for k in cap.order if k in cap.outputs]
                targets, kinds = [], []
                for k in keys:
                    xin = _first_tensor(cap.inputs[k][0])
                    yout = _first_tensor(cap.outputs[k])
                    for kind, t in (("in", xin), ("out", yout)):
                        if t is not None and t.requires_grad:
                            targets.append(t)
                            kinds.append((k, kind))
                grads = torch.autograd.grad(root, targets, cot, allow_unused=True,
                                            retain_graph=False) if targets else []
        fwd = {k: (_rms(_first_tensor(cap.inputs[k][0])) if _first_tensor(cap.inputs[k][0]) is not None
                   and _first_tensor(cap.inputs[k][0]).is_floating_point() else float("nan"),
                   _rms(_first_tensor(cap.outputs[k]))) for k in keys}
        gnorm: dict[tuple[str, str], float] = {}
        for (k, kind), g in zip(kinds, grads):
            gnorm[(k, kind)] = float(torch.linalg.vector_norm(g.detach(), dtype=torch.float64)) if g is not None else 0.0
        finite = bool(torch.isfinite(y.detach()).all())
        return keys, fwd, gnorm, rnn_inputs, finite
    finally:
        cap.close()
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


# ----------------------------------------------------------------------------- recurrence


def _rnn_gamma(m: nn.Module) -> float | None:
    """Bound on |φ′| of a plain RNN's nonlinearity; None for gated cells (LSTM/GRU)."""
    if isinstance(m, (nn.RNN, nn.RNNCell)):
        return 1.0  # tanh and ReLU derivatives are at most 1
    return None


def _recurrent(model: nn.Module, rnn_inputs: dict[str, tuple], th: PreflightThresholds,
               n_samples: int, seed: int) -> list[dict[str, Any]]:
    mods = dict(model.named_modules())
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for name, m in mods.items():
        if not isinstance(m, (nn.RNNBase, nn.RNNCellBase)):
            continue
        whh = [p for n, p in m.named_parameters() if n.startswith("weight_hh")]
        smax = max(float(torch.linalg.matrix_norm(w.detach().float(), 2)) for w in whh) if whh else float("nan")
        gamma = _rnn_gamma(m)
        row: dict[str, Any] = {"layer": name, "type": type(m).__name__, "sigma_max_whh": smax,
                               "gamma": gamma, "steps": None, "jacobian_norm": None,
                               "rate_per_step": None, "norm_over_time": None}
        if name in rnn_inputs and isinstance(m, nn.RNNBase):
            row.update(_measure_time(m, rnn_inputs[name], n_samples, gen))
        T = row["steps"] or th.time_horizon
        horizon = th.time_horizon or T
        row["horizon"] = horizon
        row["pascanu_bound"] = (gamma * smax) ** horizon if (gamma is not None and horizon) else None
        rows.append(row)
    return rows


def _measure_time(m: nn.RNNBase, captured: tuple, n_samples: int, gen: torch.Generator) -> dict[str, Any]:
    """‖∂h_t/∂h_0 v‖ for t = 1..T (random unit v) and the spectral norm of ∂h_T/∂h_0."""
    args, kwargs = captured
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        return {}
    bf = m.batch_first
    x = (x[:n_samples] if bf else x[:, :n_samples]).detach()
    B, T = (x.shape[0], x.shape[1]) if bf else (x.shape[1], x.shape[0])
    D = 2 if m.bidirectional else 1
    H = m.hidden_size if not getattr(m, "proj_size", 0) else m.proj_size
    h0 = torch.zeros(B, m.num_layers * D, H, dtype=x.dtype)
    lstm = isinstance(m, nn.LSTM)
    c0 = torch.zeros(m.num_layers * D, B, m.hidden_size, dtype=x.dtype)

    def seq(h: torch.Tensor) -> torch.Tensor:  # h0 (batch first) -> outputs (B, T, D·H)
        hx = h.transpose(0, 1).contiguous()
        out = m(x, (hx, c0) if lstm else hx)[0]
        return out if bf else out.transpose(0, 1)

    with torch.enable_grad():
        v = torch.randn(h0.shape, generator=gen, dtype=x.dtype)
        v = v / v.flatten(1).norm(dim=1).reshape(B, 1, 1)
        Jv = torch.autograd.functional.jvp(seq, h0, v)[1]  # (B, T, D·H)
        curve = Jv.double().norm(dim=2).mean(0)
        last = lambda h: seq(h)[:, -1]  # noqa: E731
        y, vjp_fn = torch.func.vjp(last, h0)
        eye = torch.eye(y.shape[1], dtype=y.dtype).unsqueeze(1).expand(-1, B, -1)
        try:
            J = torch.vmap(vjp_fn)(eye)[0]
        except (RuntimeError, NotImplementedError):
            J = torch.stack([vjp_fn(e)[0] for e in eye])  # no batching rule for this kernel
        J = J.reshape(y.shape[1], B, -1).transpose(0, 1)
    s = torch.linalg.matrix_norm(J.detach().float(), 2).double()
    jn = float(s.mean())
    return {"steps": T, "jacobian_norm": jn, "rate_per_step": jn ** (1.0 / T) if jn > 0 else 0.0,
            "norm_over_time": curve.tolist()}


# ----------------------------------------------------------------------------- findings


def _model_facts(model: nn.Module) -> dict[str, Any]:
    acts = sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU,
                                     nn.ELU, nn.Softplus))})
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    return {"activations": acts, "weight_layers": linears,
            "has_norm": any(isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._NormBase)) for m in model.modules())}


def _init_fix(facts: dict[str, Any]) -> Fix:
    acts = facts["activations"]
    if any(a in ("ReLU", "LeakyReLU", "GELU", "SiLU", "ELU") for a in acts):
        init = 'torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")'
    else:
        gain = "tanh" if "Tanh" in acts else ("sigmoid" if "Sigmoid" in acts else "linear")
        init = f'torch.nn.init.xavier_normal_(m.weight, gain=torch.nn.init.calculate_gain("{gain}"))'
    code = ("gt.init_for_activation(model)\n"
            "# or by hand:\n"
            "for m in model.modules():\n"
            "    if isinstance(m, torch.nn.Linear):\n"
            f"        {init}\n"
            "        torch.nn.init.zeros_(m.bias)")
    return Fix("Initial weight scale does not preserve the signal",
               f"Initialise for the activation ({', '.join(facts['activations']) or 'linear'}): "
               "Kaiming for ReLU-like, Xavier/orthogonal for tanh", code)


def _arch_fix(facts: dict[str, Any], layers: list[str]) -> Fix:
    where = f" around {layers[0]}…{layers[-1]}" if layers else ""
    return Fix("Signal scale drifts across depth",
               f"Add LayerNorm and residual connections{where}",
               "class Block(torch.nn.Module):\n"
               "    def __init__(self, dim):\n"
               "        super().__init__()\n"
               "        self.f = torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim), torch.nn.GELU())\n"
               "    def forward(self, x):\n"
               "        return x + self.f(x)")


_CLIP = Fix("Gradients explode", "Clip the total gradient norm before each optimizer step",
            "gt.clip_grad_norm_(model.parameters(), max_norm=1.0)")


def _findings(summary: dict[str, Any], rec_rows: list[dict[str, Any]], th: PreflightThresholds,
              facts: dict[str, Any], finite: bool) -> list[Finding]:
    out: list[Finding] = []
    rows = summary["blocks"]
    names = [r["block"] for r in rows]
    if not finite:
        out.append(Finding("nonfinite", "error", names[-1:], None, None,
                           {"output_finite": False},
                           "The model already produces inf or NaN on a random batch at "
                           "initialisation, so every gradient will be non-finite.",
                           [_init_fix(facts), Fix("Loss becomes nan", "Check dtype and invalid "
                                                  "operations (log of 0, division by 0)", "")]))
    ratio = summary.get("grad_ratio_first_last")
    sat = [a for a in facts["activations"] if a in ("Sigmoid", "Tanh")]
    if ratio is not None and np.isfinite(ratio) and ratio < th.vanishing_ratio:
        ranked = sorted((r for r in rows if r["grad_ratio_to_last"] < th.vanishing_ratio),
                        key=lambda r: r["grad_ratio_to_last"])
        fixes = [_init_fix(facts), _arch_fix(facts, names)]
        if sat:
            fixes.insert(0, Fix("Gradients vanish in early layers",
                                f"Replace saturating {'/'.join(sat)} with a ReLU-like activation",
                                f"# e.g. torch.nn.{sat[0]}() -> torch.nn.ReLU() or torch.nn.GELU(), then\n"
                                "gt.init_for_activation(model)"))
        out.append(Finding(
            "vanishing_gradients", "error" if ratio < th.vanishing_ratio ** 2 else "warning",
            [r["block"] for r in ranked] or names[:1], None, None,
            {"grad_ratio_first_last": ratio, "threshold": th.vanishing_ratio,
             "mean_backward_gain": summary["mean_backward_gain"], "depth": len(rows),
             "depth_scale": summary["depth_scale"]},
            f"Each block multiplies the squared gradient norm by about "
            f"{summary['mean_backward_gain']:.3g} on the way back, so across {len(rows)} blocks the "
            f"gradient reaching {names[0]} is {ratio:.2g} times the one leaving {names[-1]}. "
            "Early layers will barely move while late ones train: the product of many "
            "Jacobians with singular values below one shrinks geometrically.", fixes))
    if ratio is not None and (not np.isfinite(ratio) or ratio > th.exploding_ratio):
        ranked = sorted((r for r in rows if not r["grad_ratio_to_last"] <= th.exploding_ratio),
                        key=lambda r: -r["grad_ratio_to_last"])
        out.append(Finding(
            "exploding_gradients", "error" if not ratio <= th.exploding_ratio ** 2 else "warning",
            [r["block"] for r in ranked] or names[:1], None, None,
            {"grad_ratio_first_last": ratio, "threshold": th.exploding_ratio,
             "mean_backward_gain": summary["mean_backward_gain"], "depth": len(rows)},
            f"Each block multiplies the squared gradient norm by about "
            f"{summary['mean_backward_gain']:.3g} on the way back, so the gradient at {names[0]} "
            f"is {ratio:.2g} times the one at {names[-1]}. Updates of early layers will be huge "
            "and the loss can spike or turn non-finite.",
            [_CLIP, _init_fix(facts), Fix("Gradients explode", "Reduce the learning rate", "")]))
    fr = summary.get("forward_ratio_last_first")
    if fr is not None and np.isfinite(fr) and fr < th.shrinking_ratio:
        ranked = sorted(rows, key=lambda r: r["forward_rms"])
        out.append(Finding(
            "shrinking_activations", "error" if fr < th.shrinking_ratio ** 2 else "warning",
            [r["block"] for r in ranked if r["forward_rms"] < rows[0]["forward_rms"] * th.shrinking_ratio]
            or [names[-1]], None, None,
            {"forward_ratio_last_first": fr, "threshold": th.shrinking_ratio,
             "forward_rms": {r["block"]: r["forward_rms"] for r in rows}},
            f"The RMS of the activations falls from {rows[0]['forward_rms']:.3g} after {names[0]} to "
            f"{rows[-1]['forward_rms']:.3g} after {names[-1]}: each layer scales the signal by "
            "less than one, so deep outputs carry almost nothing of the input and the "
            "gradients of the weights of late layers shrink with them.",
            [_init_fix(facts), _arch_fix(facts, names)]))
    if fr is not None and (not np.isfinite(fr) or fr > th.growing_ratio):
        ranked = sorted(rows, key=lambda r: -r["forward_rms"])
        out.append(Finding(
            "growing_activations", "error" if not fr <= th.growing_ratio ** 2 else "warning",
            [r["block"] for r in ranked[: max(1, len(ranked) // 4)]], None, None,
            {"forward_ratio_last_first": fr, "threshold": th.growing_ratio,
             "forward_rms": {r["block"]: r["forward_rms"] for r in rows}},
            f"The RMS of the activations grows from {rows[0]['forward_rms']:.3g} to "
            f"{rows[-1]['forward_rms']:.3g} across depth: each layer amplifies its input, which "
            "saturates activations and inflates both outputs and gradients.",
            [_init_fix(facts), Fix("Activations grow across layers",
                                   "Add normalization (LayerNorm) and reduce the learning rate", "")]))
    for r in rec_rows:
        bound, jn, T = r["pascanu_bound"], r["jacobian_norm"], r["horizon"]
        projected = None
        if r["rate_per_step"] is not None and T:
            projected = r["rate_per_step"] ** T
        gr = r["gamma"]
        vanish = (bound is not None and r["gamma"] * r["sigma_max_whh"] < 1 and bound < th.time_vanishing_ratio) \
            or (projected is not None and projected < th.time_vanishing_ratio)
        explode = projected is not None and projected > th.time_exploding_ratio
        ev = {k: r[k] for k in ("sigma_max_whh", "gamma", "pascanu_bound", "jacobian_norm",
                                "rate_per_step", "steps", "horizon")}
        target = f"model.{r['layer']}" if r["layer"] else "model"
        if r["type"] == "LSTM":
            lstm_fix = Fix("RNN training unstable", "Initialise the forget-gate bias to 1 so the "
                           "cell state is kept by default",
                           f"H = {target}.hidden_size\n"
                           f"for name, b in {target}.named_parameters():\n"
                           "    if name.startswith(\"bias_ih\"):\n"
                           "        torch.nn.init.ones_(b.data[H:2 * H])  # gate order i, f, g, o")
        elif r["type"] in ("GRU", "GRUCell", "LSTMCell"):
            lstm_fix = Fix("RNN training unstable", "Clip gradients and keep the unroll short",
                           "gt.clip_grad_norm_(model.parameters(), max_norm=1.0)")
        else:
            lstm_fix = Fix("RNN training unstable", "Use an LSTM or GRU instead of a plain RNN",
                           f"{target} = torch.nn.LSTM(input_size, hidden_size, batch_first=True)")
        if vanish:
            why = (f"The largest singular value of the recurrent weights is {r['sigma_max_whh']:.3g}"
                   + (f" and |φ′| ≤ {gr:g}, so by Pascanu et al.'s bound each step shrinks the "
                      f"gradient by at least {gr * r['sigma_max_whh']:.3g}" if gr is not None and gr * r['sigma_max_whh'] < 1 else "")
                   + (f"; the measured ∂h_T/∂h_0 over {r['steps']} steps has norm {jn:.2g}" if jn is not None else "")
                   + ". Information from early time steps cannot reach the loss, so long-range "
                   "dependencies are not learned.")
            out.append(Finding("vanishing_through_time", "warning", [r["layer"]], None, None, ev, why,
                               [lstm_fix, Fix("RNN training unstable", "Initialise the recurrent "
                                              "weights orthogonally (σ_max = 1)",
                                              f"torch.nn.init.orthogonal_({target}.weight_hh_l0)"),
                                Fix("RNN training unstable", "Shorten the unroll length (truncated BPTT)", "")]))
        if explode:
            out.append(Finding("exploding_through_time", "error", [r["layer"]], None, None, ev,
                               f"The hidden-state Jacobian grows by {r['rate_per_step']:.3g} per step "
                               f"(norm {jn:.2g} after {r['steps']} steps), so gradients through time "
                               "blow up over the unroll.",
                               [_CLIP, lstm_fix, Fix("RNN training unstable", "Shorten the unroll length", "")]))
    return out


# ----------------------------------------------------------------------------- entry point


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
            ``full_max``, which defaults to ``PREFLIGHT_FULL_MAX`` here).

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
    args = _as_args(example_input)
    groups = _select_blocks(model, blocks)
    grads_before = [p.grad for p in model.parameters()]
    keys, fwd, gnorm, rnn_inputs, finite = _signal_pass(model, args, groups, loss_fn, seed)
    if not keys:
        raise ValueError("no block ran in the forward pass; pass blocks= explicitly")
    last = gnorm.get((keys[-1], "out"), float("nan"))
    rows = []
    for k in keys:
        gi, go = gnorm.get((k, "in")), gnorm.get((k, "out"), float("nan"))
        rows.append({"block": k, "forward_rms_in": fwd[k][0], "forward_rms": fwd[k][1],
                     "grad_norm_out": go, "grad_norm_in": gi,
                     "backward_gain": (gi / go) ** 2 if gi is not None and go > 0 else None,
                     "grad_ratio_to_last": go / last if last > 0 else float("nan")})
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
    mlp = _plain_mlp(model, [g for g in groups if g[0] in keys])
    if mlp is not None:
        x0 = _first_tensor(args)
        prof = _mean_field_profile(mlp, float(x0.detach().double().pow(2).mean()))
        for r, p in zip(rows, prof):
            r["chi1_mean_field"] = p["chi1"]
            r["sigma_w2"] = p["sigma_w2"]
        hidden = mlp[1:-1] or mlp
        sw2 = float(np.mean([p["sigma_w2"] for p in prof[1:-1] or prof]))
        sb2 = float(np.mean([p["sigma_b2"] for p in prof[1:-1] or prof]))
        act = hidden[len(hidden) // 2][1]
        summary["mean_field"] = {"activation": act, "sigma_w2": sw2, "sigma_b2": sb2,
                                 **mean_field(act, sw2, sb2)}
    spec = None
    if compute_spectrum:
        spectrum_kwargs.setdefault("full_max", PREFLIGHT_FULL_MAX)
        spec = spectrum(model, args, blocks=blocks, n_samples=n_samples, seed=seed, **spectrum_kwargs)
        for r in rows:
            if r["block"] in spec.blocks:
                b = spec.block(r["block"])
                r.update(jacobian_gain=b.gain, sigma_max=b.sigma_max, sigma_min=b.sigma_min, spread=b.spread)
        try:
            e = spec.end_to_end()
            summary["end_to_end"] = {"gain": e.gain, "sigma_max": e.sigma_max,
                                     "sigma_min": e.sigma_min, "spread": e.spread}
        except ValueError:
            pass
    rec_rows = _recurrent(model, rnn_inputs, thresholds, n_samples, seed)
    if rec_rows:
        summary["recurrent"] = rec_rows
    for p, g in zip(model.parameters(), grads_before):
        p.grad = g
    findings = _findings(summary, rec_rows, thresholds, _model_facts(model), finite)
    return PreflightResult(findings, summary, spec)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _format_table(summary: dict[str, Any]) -> str:
    cols = [("block", "block"), ("forward_rms", "fwd rms"), ("grad_norm_out", "grad norm"),
            ("backward_gain", "bwd gain"), ("chi1_mean_field", "χ₁ (MF)"),
            ("jacobian_gain", "J gain"), ("sigma_max", "σ_max"), ("spread", "spread")]
    rows = summary["blocks"]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    cells = [[h for _, h in cols]] + [[_fmt(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c[i].rjust(widths[i]) if i else c[i].ljust(widths[i]) for i in range(len(cols)))
             for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("")
    lines.append(f"gradient norm first/last block: {_fmt(summary['grad_ratio_first_last'])}   "
                 f"activation RMS last/first: {_fmt(summary['forward_ratio_last_first'])}")
    lines.append(f"mean backward gain per block: {_fmt(summary['mean_backward_gain'])}   "
                 f"depth scale ξ: {_fmt(summary['depth_scale'])} (trains to ~6ξ = "
                 f"{_fmt(summary['trainable_depth'])}; depth {summary['depth']})")
    if "mean_field" in summary:
        mf = summary["mean_field"]
        lines.append(f"mean field ({mf['activation']}, σ_w²={mf['sigma_w2']:.3g}, σ_b²={mf['sigma_b2']:.3g}): "
                     f"q*={mf['q_star']:.3g}  χ₁={mf['chi1']:.4g}")
    if "end_to_end" in summary:
        e = summary["end_to_end"]
        lines.append(f"end-to-end Jacobian: gain {_fmt(e['gain'])}, σ_max {_fmt(e['sigma_max'])}, "
                     f"spread {_fmt(e['spread'])}")
    for r in summary.get("recurrent", []):
        lines.append(f"recurrent {r['layer'] or '<model>'} ({r['type']}): σ_max(W_hh)={_fmt(r['sigma_max_whh'])}"
                     f", γ={_fmt(r['gamma'])}, ‖∂h_T/∂h_0‖={_fmt(r['jacobian_norm'])} over "
                     f"{_fmt(r['steps'])} steps")
    return "\n".join(lines)
