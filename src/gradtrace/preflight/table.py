"""The preflight summary as fixed-width terminal text."""
from __future__ import annotations

from typing import Any

from ..numerics import fmt


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return fmt(v)
    return str(v)


def format_table(summary: dict[str, Any]) -> str:
    """Per-block columns (only those some row has), then the depth-wide lines.

    Example:
        >>> print(format_table({"blocks": [{"block": "0", "forward_rms": 1.0}], "depth": 1,
        ...     "grad_ratio_first_last": 1.0, "forward_ratio_last_first": 1.0,
        ...     "mean_backward_gain": 1.0, "depth_scale": float("inf"), "trainable_depth": float("inf")}).splitlines()[0])
        block  fwd rms
    """
    cols = [("block", "block"), ("forward_rms", "fwd rms"), ("grad_norm_out", "grad norm"),
            ("backward_gain", "bwd gain"), ("chi1_mean_field", "χ₁ (MF)"),
            ("attention_gain", "attn gain"), ("mlp_gain", "mlp gain"),
            ("attention_entropy", "attn H"), ("attention_saturated_rows", "attn sat"),
            ("saturated_fraction", "sat frac"),
            ("jacobian_gain", "J gain"), ("sigma_max", "σ_max"), ("spread", "spread"),
            ("estimate", "estimate"), ("not_measured", "not measured because")]
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
        lines.append(f"end-to-end Jacobian (from {e.get('from', 'input')}): gain {_fmt(e['gain'])}, "
                     f"σ_max {_fmt(e['sigma_max'])}, spread {_fmt(e['spread'])} [{e.get('estimate', '')}]")
    tr = summary.get("transformer")
    if tr:
        lines.append(f"layout: {tr['layout']}; parameter gradient last block / median block: "
                     f"{_fmt(tr['output_over_median'])}, {_fmt(tr['block_gain'])} per block "
                     f"(first {_fmt(tr['param_grad_first'])}, last {_fmt(tr['param_grad_last'])})")
    for r in summary.get("recurrent", []):
        lines.append(f"recurrent {r['layer'] or '<model>'} ({r['type']}): σ_max(W_hh)={_fmt(r['sigma_max_whh'])}"
                     f", γ={_fmt(r['gamma'])}, ‖∂h_T/∂h_0‖={_fmt(r['jacobian_norm'])} over "
                     f"{_fmt(r['steps'])} steps")
    return "\n".join(lines)
