"""The chapter's Stable Training Checklist as data, rendered into fixes for one model.

:data:`CHECKLIST` holds the seven rows (problem -> common fix). :data:`KIND_ROWS` maps
every finding kind to the rows that address it. :func:`fixes_for` turns those rows into
:class:`~gradtrace.findings.Fix` objects in the model's own terms: which layers, which
replacement, and the line of code to write, pointing at gradtrace's remedies
(``gt.clip_grad_norm_``, ``gt.Guard``, ``gt.init_for_activation`` ...).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..diagnose.finding import KINDS, Fix

__all__ = ["CHECKLIST", "KIND_ROWS", "ChecklistRow", "fixes_for", "module_ref"]


@dataclass(frozen=True)
class ChecklistRow:
    """One row of the stable-training checklist.

    Example:
        >>> CHECKLIST["relu_die"].problem
        'ReLU units die'
    """

    key: str
    problem: str
    fix: str


#: The Stable Training Checklist, in the chapter's order.
CHECKLIST: dict[str, ChecklistRow] = {r.key: r for r in (
    ChecklistRow("activations_shrink", "Activations shrink across layers",
                 "Use better initialization, normalization, residual connections"),
    ChecklistRow("activations_grow", "Activations grow across layers",
                 "Reduce learning rate, improve initialization, use normalization"),
    ChecklistRow("gradients_vanish", "Gradients vanish in early layers",
                 "Use ReLU-like activations, residual connections, normalization"),
    ChecklistRow("gradients_explode", "Gradients explode",
                 "Use gradient clipping, reduce learning rate"),
    ChecklistRow("loss_nan", "Loss becomes nan",
                 "Check learning rate, dtype, invalid operations, gradient norms"),
    ChecklistRow("relu_die", "ReLU units die",
                 "Lower learning rate, use Leaky ReLU or GELU"),
    ChecklistRow("rnn_unstable", "RNN training unstable",
                 "Use LSTM or GRU, clip gradients, shorten unroll length"),
)}

#: Finding kind -> checklist rows that address it (most relevant first).
KIND_ROWS: dict[str, tuple[str, ...]] = {
    "vanishing_gradients": ("gradients_vanish",),
    "exploding_gradients": ("gradients_explode",),
    "nonfinite": ("loss_nan",),
    "loss_spike": ("gradients_explode",),
    "loss_nonfinite": ("loss_nan",),
    "dead_units": ("relu_die",),
    "saturated_units": ("gradients_vanish",),
    "shrinking_activations": ("activations_shrink",),
    "growing_activations": ("activations_grow",),
    "vanishing_through_time": ("rnn_unstable",),
    "exploding_through_time": ("rnn_unstable", "gradients_explode"),
}

#: Suggested learning rate = current / this factor.
LR_CUT = 10.0
#: Default ``max_norm`` suggested for clipping when the trace gives no baseline.
DEFAULT_MAX_NORM = 1.0
#: How many layer names a code snippet spells out before summarising the rest.
MAX_LINES = 3

_ACT_CLASS = {"relu": "nn.ReLU()", "leaky": "nn.LeakyReLU(0.01)", "smooth": "nn.GELU()",
              "sigmoid": "nn.Sigmoid()", "tanh": "nn.Tanh()"}
_INIT_NAME = {"relu": "Kaiming (ReLU)", "leaky": "Kaiming (leaky ReLU)", "smooth": "Kaiming (ReLU)",
              "sigmoid": "Xavier (sigmoid gain)", "tanh": "Xavier (tanh gain 5/3)", None: "Xavier (linear)"}


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


class _Context:
    """What the renderer needs to know about the model, from a Trace or a dict."""

    def __init__(self, src: Any):
        from ..trace import Trace

        self.modules: list[dict] = []
        self.params: list[dict] = []
        self.order: list[str] = []
        self.lr: float | None = None
        self.time_steps: int | None = None
        if src is None:
            return
        if isinstance(src, Trace):
            self.modules = list(src.meta.get("modules", []))
            self.params = list(src.meta.get("params", []))
            for r in src.records:
                if "exec_order" in r:
                    self.order = list(r["exec_order"])
                lr = r.get("scalars", {}).get("lr")
                if isinstance(lr, (int, float)):
                    self.lr = float(lr)
                tg = r.get("vectors", {}).get("time_grad_norm")
                if tg:
                    self.time_steps = len(next(iter(tg.values())))
        elif isinstance(src, dict):
            unknown = set(src) - {"modules", "params", "exec_order", "lr", "time_steps"}
            if unknown:
                raise ValueError(f"trace_or_context has unknown keys {sorted(unknown)}; valid: "
                                 "modules, params, exec_order, lr, time_steps")
            self.modules = list(src.get("modules", []))
            self.params = list(src.get("params", []))
            self.order = list(src.get("exec_order", []))
            self.lr = src.get("lr")
            self.time_steps = src.get("time_steps")
        else:
            raise TypeError("trace_or_context must be a Trace, a dict (modules, params, exec_order, "
                            f"lr, time_steps) or None, got {type(src).__name__}")
        seen = set(self.order)
        self.order += [m["name"] for m in self.modules if m["name"] not in seen]

    def info(self, name: str) -> dict:
        return next((m for m in self.modules if m["name"] == name), {})

    def kind(self, name: str) -> str | None:
        return self.info(name).get("activation")

    def weight_layers(self) -> list[str]:
        return [n for n in self.order if self.info(n).get("params") and self.kind(n) not in ("norm", "recurrent")]

    def acts(self, kinds: tuple[str, ...]) -> list[str]:
        return [n for n in self.order if self.kind(n) in kinds]

    def following_activation(self) -> dict[str, str | None]:
        """Weight layer -> activation kind of the first activation after it."""
        out: dict[str, str | None] = {}
        weights = set(self.weight_layers())
        pending: list[str] = []
        for n in self.order:
            k = self.kind(n)
            if n in weights:
                for p in pending:
                    out[p] = None
                pending = [n]
            elif k in _ACT_CLASS and pending:
                for p in pending:
                    out[p] = k
                pending = []
        for p in pending:
            out[p] = None
        return out


def _names(names: list[str]) -> str:
    """```0, 2, 4``` (backticked, the first eight, then a count)."""
    if not names:
        return ""
    shown = "`" + ", ".join(names[:8]) + "`"
    return shown + (f" (and {len(names) - 8} more)" if len(names) > 8 else "")


def _assign_lines(names: list[str], expr: str) -> str:
    lines = [f"{module_ref(n)} = {expr}" for n in names[:MAX_LINES]]
    if len(names) > MAX_LINES:
        lines.append(f"# ... and the same for {_names(names[MAX_LINES:])}")
    return "\n".join(lines)


def _fmt(x: float) -> str:
    """Short number that still reads as a float in code: ``0.05``, ``1.0``, ``3e-05``."""
    out = f"{x:.3g}"
    return out if any(c in out for c in ".en") else out + ".0"


def _lr_fix(row: ChecklistRow, ctx: _Context, why: str) -> Fix:
    if ctx.lr:
        new = ctx.lr / LR_CUT
        return Fix(row.problem, f"Lower the learning rate: it is {_fmt(ctx.lr)} in this run; try "
                   f"{_fmt(new)} (lr/{LR_CUT:g}) {why}",
                   f"for group in optimizer.param_groups: group['lr'] = {_fmt(new)}")
    return Fix(row.problem, f"Lower the learning rate (e.g. by {LR_CUT:g}x) {why}",
               f"for group in optimizer.param_groups: group['lr'] /= {LR_CUT:g}")


def _clip_fix(row: ChecklistRow, evidence: dict) -> Fix:
    max_norm = DEFAULT_MAX_NORM
    base = evidence.get("baseline_grad_norm") if isinstance(evidence, dict) else None
    note = ""
    if isinstance(base, (int, float)) and math.isfinite(base) and base > 0:
        max_norm = float(f"{2 * base:.1g}")
        note = f" (about twice the norm's usual {_fmt(base)} in this run)"
    return Fix(row.problem, f"Clip the total gradient norm before optimizer.step() at max_norm={_fmt(max_norm)}"
               f"{note}; gt.AutoClip or gt.ZClip pick the limit from the run's own norm history instead",
               f"gt.clip_grad_norm_(model.parameters(), max_norm={_fmt(max_norm)})")


def _init_fix(row: ChecklistRow, ctx: _Context, layers: list[str], switch_to: str | None = None) -> Fix:
    follow = ctx.following_activation()
    targets = [l for l in ctx.weight_layers() if not layers or l in follow]
    if switch_to:
        desc = f"to {_INIT_NAME[switch_to]}"
    else:
        kinds = sorted({_INIT_NAME[follow.get(l)] for l in targets}) or [_INIT_NAME["relu"]]
        desc = "to " + " / ".join(kinds)
    return Fix(row.problem, f"`gt.init_for_activation(model)` would switch layers {_names(targets) or 'all weight layers'} "
               f"{desc}, matching each layer's scale to the activation after it (gt.lsuv_ then "
               "rescales them on a real batch)", "gt.init_for_activation(model)")


def _residual_norm_fix(row: ChecklistRow, ctx: _Context, layers: list[str]) -> Fix:
    where = _names(layers[:4]) if layers else "the deep stack"
    return Fix(row.problem, f"Give the signal a short path around {where}: wrap each block as a residual "
               "branch with LayerNorm in front (pre-LN), so gradients reach early layers through the identity",
               "x = x + block(norm(x))  # in forward(); norm = nn.LayerNorm(width)")


def _norm_fix(row: ChecklistRow, ctx: _Context, layers: list[str]) -> Fix:
    targets = [l for l in (layers or ctx.weight_layers()) if l in ctx.weight_layers()][:4]
    return Fix(row.problem, f"Normalise the activations: put nn.LayerNorm (nn.BatchNorm for conv nets) after "
               f"{_names(targets) or 'the weight layers'} so every layer sees inputs of unit scale",
               "nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU())")


def _render(key: str, kind: str, ctx: _Context, layers: list[str], evidence: dict) -> list[Fix]:
    row = CHECKLIST[key]
    fixes: list[Fix] = []
    if key == "gradients_vanish":
        squash = [l for l in layers if ctx.kind(l) in ("sigmoid", "tanh")] or ctx.acts(("sigmoid", "tanh"))
        if squash:
            fixes.append(Fix(row.problem, f"Replace the saturating activations {_names(squash)} with "
                             "nn.ReLU() or nn.GELU() (derivative 1 on the active side instead of <= 0.25 "
                             "for sigmoid)", _assign_lines(squash, "nn.GELU()")))
            fixes.append(_init_fix(row, ctx, layers, switch_to="relu"))
        else:
            fixes.append(_init_fix(row, ctx, layers))
        fixes.append(_residual_norm_fix(row, ctx, layers))
    elif key == "activations_shrink":
        fixes.append(_init_fix(row, ctx, layers))
        fixes.append(_norm_fix(row, ctx, layers))
        fixes.append(_residual_norm_fix(row, ctx, layers))
    elif key == "activations_grow":
        fixes.append(_lr_fix(row, ctx, "if the growth appeared during training"))
        fixes.append(_init_fix(row, ctx, layers))
        fixes.append(_norm_fix(row, ctx, layers))
    elif key == "gradients_explode":
        fixes.append(_clip_fix(row, evidence))
        fixes.append(_lr_fix(row, ctx, "so one large gradient cannot throw the weights far"))
        if kind == "exploding_gradients" and "per_layer_gain" in evidence:
            fixes.append(_init_fix(row, ctx, layers))
    elif key == "loss_nan":
        cause = evidence.get("cause") if isinstance(evidence, dict) else None
        origin = layers[0] if layers else None
        step = evidence.get("step", evidence.get("first_step")) if isinstance(evidence, dict) else None
        lr = _lr_fix(row, ctx, "and restart from a checkpoint before the nan")
        dtype = evidence.get("cause_evidence", {}).get("dtype", "float32") if isinstance(evidence, dict) else "float32"
        dt = Fix(row.problem, f"Check the dtype: parameters are {dtype}; values near its largest finite "
                 "number overflow. Compute in float32 or bfloat16 (wider range than float16), and scale "
                 "the loss with a GradScaler under float16",
                 "with torch.autocast(device_type='cuda', dtype=torch.bfloat16): loss = loss_fn(model(x), y)")
        suspects = evidence.get("suspects") if isinstance(evidence, dict) else None
        where = (f" in the backward of {_names(suspects)} (run right after `{origin}`)" if suspects
                 else f" in `{origin}`" if origin else "")
        inv = Fix(row.problem, "Look for an invalid operation" + where +
                  (f" at step {step}" if step is not None else "") +
                  ": log/sqrt of 0 or negatives, division by 0, inf - inf; add an eps or clamp, and rerun "
                  "that step under anomaly detection to get the exact op",
                  "torch.autograd.set_detect_anomaly(True)  # then reproduce the failing step")
        guard = Fix(row.problem, "Skip steps whose gradients are non-finite instead of writing nan into "
                    "every weight, while you fix the cause", "optimizer = gt.Guard(optimizer, skip_nonfinite=True)")
        clip = _clip_fix(row, {})
        order = {"overflow": [dt, lr, clip, inv], "divergence": [lr, clip, dt, inv],
                 "invalid_operation": [inv, guard, lr, dt]}.get(cause, [lr, dt, inv, clip])
        fixes.extend(order)
        if guard not in fixes:
            fixes.append(guard)
    elif key == "relu_die":
        dead = [l for l in layers if ctx.kind(l) == "relu"] or layers
        fixes.append(Fix(row.problem, f"Replace {_names(dead) or 'the ReLU layers'} with nn.LeakyReLU(0.01) "
                         "(a small slope for negative inputs keeps a gradient flowing so units can recover) "
                         "or nn.GELU()", _assign_lines(dead, "nn.LeakyReLU(0.01)") if dead
                         else "nn.LeakyReLU(0.01)  # in place of each nn.ReLU()"))
        if evidence.get("from_initialisation"):
            # silent from the start: the depth, not an update, did it
            fixes.append(_residual_norm_fix(CHECKLIST["activations_shrink"], ctx, dead))
        else:
            fixes.append(_lr_fix(row, ctx, "so one large update cannot push units below zero for good"))
        before = [w for w, k in ctx.following_activation().items() if k == "relu"]
        feeding = [w for w in ctx.weight_layers() if any(
            ctx.order.index(w) < ctx.order.index(d) for d in dead if d in ctx.order)]
        feeding = [w for w in feeding if w in before][-len(dead):] if dead else []
        if feeding:
            fixes.append(Fix(row.problem, f"Check the biases of {_names(feeding)}, which feed the dead units: "
                             "strongly negative biases keep the pre-activations below zero; reset them to 0",
                             "\n".join(f"nn.init.zeros_({module_ref(w)}.bias)" for w in feeding[:MAX_LINES])))
    elif key == "rnn_unstable":
        rnns = [l for l in layers if ctx.kind(l) == "recurrent"] or ctx.acts(("recurrent",))
        for r in rnns[:2]:
            info = ctx.info(r)
            if info.get("type") == "RNN":
                shape = next((p["shape"] for p in ctx.params if p["name"] == f"{r}.weight_ih_l0"), None)
                args = f"{shape[1]}, {shape[0]}" if shape and len(shape) == 2 else "input_size, hidden_size"
                fixes.append(Fix(row.problem, f"Use nn.LSTM or nn.GRU instead of the plain nn.RNN `{r}`: their "
                                 "gated, additive cell state lets gradients cross many steps",
                                 f"{module_ref(r)} = nn.LSTM({args})  # keep batch_first/num_layers as before"))
            else:
                fixes.append(Fix(row.problem, f"`{r}` is already a gated {info.get('type', 'RNN')}; initialise its "
                                 "forget-gate bias to 1 or more so the cell keeps its memory longer",
                                 f"# LSTM gate order i, f, g, o: {module_ref(r)}.bias_hh_l0.data[H:2*H].fill_(1.0)"))
        fixes.append(_clip_fix(row, evidence))
        t = ctx.time_steps or evidence.get("time_steps")
        chunk = max(1, int(t) // 4) if t else None
        fixes.append(Fix(row.problem, "Shorten the unroll length (truncated BPTT)" +
                         (f": the sequences here are {t} steps; backpropagate through chunks of about {chunk} "
                          if t else ": backpropagate through shorter chunks ") +
                         "and detach the hidden state between chunks",
                         f"h = h.detach()  # between chunks of {chunk or 'k'} time steps"))
    return fixes


def fixes_for(kind: str, trace_or_context: Any = None, layers: list[str] | None = None, *,
              evidence: dict | None = None) -> list[Fix]:
    """Checklist rows for a finding kind, rendered for this model.

    Args:
        kind: a finding kind (see :data:`gradtrace.findings.KINDS`).
        trace_or_context: the run's :class:`~gradtrace.trace.Trace`, or a dict with any of
            ``modules``/``params`` (as in the trace's meta), ``exec_order``, ``lr``,
            ``time_steps``; or ``None`` for generic rows.
        layers: the finding's layers (qualified names, most affected first).
        evidence: the finding's evidence, used to tune the rows (e.g. the cause of a nan).

    Example:
        >>> ctx = {"modules": [{"name": "net.2", "type": "Linear", "activation": None, "params": ["net.2.weight"]},
        ...                    {"name": "net.3", "type": "ReLU", "activation": "relu", "params": []}], "lr": 0.5}
        >>> fixes_for("dead_units", ctx, ["net.3"])[0].code
        'model.net[3] = nn.LeakyReLU(0.01)'
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not a finding kind; valid: {', '.join(KINDS)}")
    if layers is None:
        layers = []
    if isinstance(layers, str) or not all(isinstance(l, str) for l in layers):
        raise TypeError("layers must be a list of qualified module names (str)")
    if evidence is not None and not isinstance(evidence, dict):
        raise TypeError(f"evidence must be a dict or None, got {type(evidence).__name__}")
    ctx = _Context(trace_or_context)
    out: list[Fix] = []
    for key in KIND_ROWS[kind]:
        out.extend(_render(key, kind, ctx, list(layers), evidence or {}))
    return out


def advise(findings, trace=None):
    """New findings with the checklist fixes rendered for this run (the originals are frozen)."""
    import dataclasses

    return [f if f.fixes else dataclasses.replace(
        f, fixes=fixes_for(f.kind, trace, list(f.layers), evidence=f.evidence)) for f in findings]
