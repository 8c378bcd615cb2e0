"""Preflight findings: the measured summary judged against named thresholds, as `Finding`s with fixes.

Fixes are rendered here, beside the finding that needs them, in the model's own terms
(its activations, its recurrent layer names, its ``nn.TransformerEncoderLayer``); they
use the same :class:`~gradtrace.diagnose.Fix` rows as the diagnosis of a recorded run.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from ..diagnose.finding import Finding, Fix


def model_facts(model: nn.Module) -> dict[str, Any]:
    acts = sorted({type(m).__name__ for m in model.modules()
                   if isinstance(m, (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.SiLU,
                                     nn.ELU, nn.Softplus))})
    linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]
    post = next((type(m).__name__ for m in model.modules()
                 if isinstance(m, (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)) and not m.norm_first), None)
    return {"activations": acts, "weight_layers": linears, "post_ln_class": post,
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


def _saturating_outcome(rows: list[dict[str, Any]], th: Any, facts: dict[str, Any]) -> Finding | None:
    """``saturated_units`` (error) when every activation is sigmoid/tanh and most blocks
    are saturated already: the finding that replaces an explosion's error.

    This is the chaotic phase of mean-field theory (χ₁ > 1 with a large fixed point q*,
    so the pre-activations sit in the flat tails). A bounded activation caps the forward
    signal, so the exploding gradient cannot overflow the loss; what its large first
    updates do is push the units further into their flat ends, after which the gradient
    vanishes and training stalls. (bench/preflight_grid.py: a 20-layer tanh MLP at 2.5×
    the critical weight scale, 57 % saturated at init, ends with saturated units and
    vanishing gradients at chance loss; the 6-layer twin, as saturated but below the
    exploding threshold, trains. ``--chaotic`` sweeps 32 such nets: the loss stayed finite
    in all, the recorder found saturated units in all, and the final label is mixed:
    exploding and vanishing episodes both occur, so no single verdict fits every seed.)
    """
    acts = facts["activations"]
    sat = [r["saturated_fraction"] for r in rows if r.get("saturated_fraction") is not None]
    if not acts or any(a not in ("Tanh", "Sigmoid") for a in acts) or not sat:
        return None
    median = float(np.median(sat))
    if median <= th.saturated_frac:
        return None
    hot = [r for r in rows if (r.get("saturated_fraction") or 0.0) > th.saturated_frac]
    mf = [r["saturated_mean_field"] for r in rows if r.get("saturated_mean_field") is not None]
    theory = (f" (mean-field theory predicts {float(np.median(mf)):.0%} from each layer's "
              "weight variance)" if mf else "")
    return Finding(
        "saturated_units", "error", [r["block"] for r in hot], None, None,
        {"saturated_fraction": {r["block"]: r["saturated_fraction"] for r in hot},
         "median_saturated_fraction": median, "threshold": th.saturated_frac,
         **({"mean_field_saturated_fraction": float(np.median(mf))} if mf else {})},
        f"The weights are so large that {median:.0%} of the {'/'.join(acts)} outputs already "
        f"sit in their flat ends at initialisation{theory}, and the gradient explodes across "
        "depth. A bounded activation cannot overflow, so the large first updates will push "
        "the units deeper into saturation instead; their derivative then falls to zero, the "
        "gradients vanish and training stalls near chance.",
        [_init_fix(facts), Fix("Units saturated", "Add LayerNorm before each activation so the "
                               "pre-activations stay near unit scale", "")])


def findings(summary: dict[str, Any], rec_rows: list[dict[str, Any]], th: Any,
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
    saturating = _saturating_outcome(rows, th, facts)
    if ratio is not None and (not np.isfinite(ratio) or ratio > th.exploding_ratio):
        ranked = sorted((r for r in rows if not r["grad_ratio_to_last"] <= th.exploding_ratio),
                        key=lambda r: -r["grad_ratio_to_last"])
        out.append(Finding(
            "exploding_gradients",
            "error" if not ratio <= th.exploding_ratio ** 2 and saturating is None else "warning",
            [r["block"] for r in ranked] or names[:1], None, None,
            {"grad_ratio_first_last": ratio, "threshold": th.exploding_ratio,
             "mean_backward_gain": summary["mean_backward_gain"], "depth": len(rows)},
            f"Each block multiplies the squared gradient norm by about "
            f"{summary['mean_backward_gain']:.3g} on the way back, so the gradient at {names[0]} "
            f"is {ratio:.2g} times the one at {names[-1]}. Updates of early layers will be huge "
            "and the loss can spike or turn non-finite.",
            [_CLIP, _init_fix(facts), Fix("Gradients explode", "Reduce the learning rate", "")]))
        if saturating is not None:
            out.append(saturating)
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
    out.extend(_transformer_findings(summary, th, facts))
    return out


_WARMUP = Fix("Post-LN transformer unstable early in training",
              "Warm the learning rate up over the first steps",
              "scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=0.01, total_iters=1000)\n"
              "# call scheduler.step() after each optimizer.step()")


def _norm_first_fix(facts: dict[str, Any]) -> Fix:
    cls = facts.get("post_ln_class")
    if cls:
        return Fix("Post-LN transformer unstable early in training",
                   f"Put LayerNorm before each branch (pre-LN): {cls}(..., norm_first=True)",
                   f"layer = torch.nn.{cls}(d_model, nhead, dim_feedforward, norm_first=True)")
    return Fix("Post-LN transformer unstable early in training",
               "Move each LayerNorm to the input of its branch (pre-LN: x + f(LN(x))) and add "
               "a final LayerNorm after the last block", "")


def _transformer_findings(summary: dict[str, Any], th: Any, facts: dict[str, Any]) -> list[Finding]:
    out: list[Finding] = []
    rows = summary["blocks"]
    low = [r for r in rows if r.get("attention_saturated_rows") is not None
           and r["attention_saturated_rows"] > th.saturated_frac]
    if low:
        low.sort(key=lambda r: -r["attention_saturated_rows"])
        worst = low[0]
        out.append(Finding(
            "saturated_units", "warning", [r["block"] for r in low], None, None,
            {"attention_saturated_rows": {r["block"]: r["attention_saturated_rows"] for r in low},
             "attention_entropy": {r["block"]: r.get("attention_entropy") for r in low},
             "threshold": th.saturated_frac},
            f"The attention softmax is already saturated at initialisation: in {worst['block']} "
            f"{worst['attention_saturated_rows']:.0%} of the rows are so close to one-hot that "
            "the softmax Jacobian p_i(δ_ij − p_j) passes almost no gradient to their attention "
            "scores (below the recorder's sigmoid saturation bound), so the query and key "
            "weights will barely learn. They are too large for their width.",
            [Fix("Attention saturated", "Initialise the query/key projections smaller (std about "
                 "d_model^-0.5 or 0.02) and keep the 1/sqrt(head_dim) score scaling", ""),
             Fix("Attention saturated", "Normalise queries and keys (QK-norm: LayerNorm on q and "
                 "k per head) so the logits cannot grow with the weights", "")]))
    tr = summary.get("transformer")
    if tr and tr["layout"] == "post-LN" and tr["block_gain"] > th.post_ln_block_gain:
        early = sorted(rows, key=lambda r: r.get("param_grad_norm") or 0.0)
        out.append(Finding(
            "vanishing_gradients", "warning",
            [r["block"] for r in early[: max(1, len(early) // 2)]], None, None,
            {"layout": "post-LN", "param_grad_norm": {r["block"]: r.get("param_grad_norm") for r in rows},
             "output_over_median": tr["output_over_median"], "block_gain": tr["block_gain"],
             "threshold": th.post_ln_block_gain},
            f"Each block ends in a LayerNorm after the residual addition (post-LN), and the "
            f"parameter gradients are largest near the output at initialisation: the last block's "
            f"are {tr['output_over_median']:.3g}× the median block's, a growth of "
            f"{tr['block_gain']:.3g}× per block toward the output. Xiong et al. (2020) show this "
            "is why post-LN transformers diverge with a large learning rate early and need a "
            "warm-up; pre-LN keeps the gradients level across depth.",
            [_norm_first_fix(facts), _WARMUP]))
    return out
