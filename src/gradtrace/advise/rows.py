"""One renderer per checklist row: the row's fix written for this run's layers, dtype, device and lr.

:data:`RENDERERS` maps a row key of :data:`~gradtrace.advise.checklist.CHECKLIST` to a
function ``(row, kind, ctx, layers, evidence, step) -> list[Fix]``. Evidence is the
finding's typed object (:mod:`gradtrace.diagnose.evidence`), read by attribute after an
``isinstance`` on its class, so a misspelt field fails at test time; a figure the run did
not record is ``None`` and is never replaced by a default that would read as a measurement.
"""
from __future__ import annotations

import math
from typing import Callable

from ..diagnose.evidence import (DeadUnits, Evidence, ExplodingGradients, ExplodingThroughTime,
                                 GradientNormSurge, LossNonFinite, LossSpike, NearOverflow, NonFinite,
                                 NonFiniteCause, VanishingThroughTime)
from ..diagnose.finding import Fix
from ..numerics import fmt_code
from .checklist import CHECKLIST, DEFAULT_MAX_NORM, LR_CUT, ChecklistRow
from .context import RunContext, assign_lines, module_ref, names

__all__ = ["RENDERERS", "ACT_CLASS"]

ACT_CLASS = {"relu": "nn.ReLU()", "leaky": "nn.LeakyReLU(0.01)", "smooth": "nn.GELU()",
             "sigmoid": "nn.Sigmoid()", "tanh": "nn.Tanh()"}
_INIT_NAME = {"relu": "Kaiming (ReLU)", "leaky": "Kaiming (leaky ReLU)", "smooth": "Kaiming (ReLU)",
              "sigmoid": "Xavier (sigmoid gain)", "tanh": "Xavier (tanh gain 5/3)", None: "Xavier (linear)"}


def _lr_fix(row: ChecklistRow, ctx: RunContext, why: str, step: int | None) -> Fix:
    # The rate of the update that produced step ``step``'s state: the one before it.
    lr = ctx.lr_at(step - 1 if step else step)
    if lr:
        new = lr / LR_CUT
        at = f" for the update before step {step}" if step is not None and ctx.lr_at(None) != lr else ""
        return Fix(row.problem, f"Lower the learning rate: it is {fmt_code(lr)} in this run{at}; try "
                   f"{fmt_code(new)} (lr/{LR_CUT:g}) {why}",
                   f"for group in optimizer.param_groups: group['lr'] = {fmt_code(new)}")
    return Fix(row.problem, f"Lower the learning rate (e.g. by {LR_CUT:g}x) {why}",
               f"for group in optimizer.param_groups: group['lr'] /= {LR_CUT:g}")


def _part(evidence: Evidence | None, cls: type) -> Evidence | None:
    """The evidence of class ``cls`` in a finding: its own or one merged into it (``also``:
    an explosion seen across depth and over the steps is one finding with both)."""
    if evidence is None:
        return None
    return next((e for e in (evidence, *(evidence.also or ())) if isinstance(e, cls)), None)


def _clip_fix(row: ChecklistRow, evidence: Evidence | None) -> Fix:
    max_norm = DEFAULT_MAX_NORM
    # Only a surge of the total norm measured its usual level; other evidence has none.
    surge = _part(evidence, GradientNormSurge)
    base = surge.baseline_grad_norm if surge is not None else None
    note = ""
    if isinstance(base, (int, float)) and math.isfinite(base) and base > 0:
        max_norm = float(f"{2 * base:.1g}")
        note = f" (about twice the norm's usual {fmt_code(base)} in this run)"
    return Fix(row.problem, f"Clip the total gradient norm before optimizer.step() at max_norm={fmt_code(max_norm)}"
               f"{note}; gt.AutoClip or gt.ZClip pick the limit from the run's own norm history instead",
               f"gt.clip_grad_norm_(model.parameters(), max_norm={fmt_code(max_norm)})")


def _init_fix(row: ChecklistRow, ctx: RunContext, layers: list[str], switch_to: str | None = None) -> Fix:
    follow = ctx.following_activation()
    targets = [l for l in ctx.weight_layers() if not layers or l in follow]
    if switch_to:
        desc = f"to {_INIT_NAME[switch_to]}"
    else:
        kinds = sorted({_INIT_NAME[follow.get(l)] for l in targets}) or [_INIT_NAME["relu"]]
        desc = "to " + " / ".join(kinds)
    return Fix(row.problem, f"`gt.init_for_activation(model)` would switch layers {names(targets) or 'all weight layers'} "
               f"{desc}, matching each layer's scale to the activation after it (gt.lsuv_ then "
               "rescales them on a real batch)", "gt.init_for_activation(model)")


def _residual_norm_fix(row: ChecklistRow, ctx: RunContext, layers: list[str]) -> Fix | None:
    """Add a residual path, unless the blocks already have one: post-LN blocks get
    ``norm_first=True`` and warm-up; pre-LN blocks get nothing from this row."""
    post = ctx.post_ln()
    if post is True:
        blocks = ctx.norm_blocks()
        return Fix(row.problem, f"The blocks {names(blocks[:4])} are already residual, but normalise after the "
                   "residual add (post-LN), so every block's LayerNorm rescales the gradient of all the "
                   "blocks below it. Move the norm in front of each branch (pre-LN: "
                   "`nn.TransformerEncoderLayer(..., norm_first=True)`) and warm the learning rate up "
                   "over the first steps",
                   "layer = nn.TransformerEncoderLayer(d_model, nhead, norm_first=True)\n"
                   "sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 1000))")
    if post is False:
        return None
    where = names(layers[:4]) if layers else "the deep stack"
    return Fix(row.problem, f"Give the signal a short path around {where}: wrap each block as a residual "
               "branch with LayerNorm in front (pre-LN), so gradients reach early layers through the identity",
               "x = x + block(norm(x))  # in forward(); norm = nn.LayerNorm(width)")


def _norm_fix(row: ChecklistRow, ctx: RunContext, layers: list[str]) -> Fix:
    targets = [l for l in (layers or ctx.weight_layers()) if l in ctx.weight_layers()][:4]
    return Fix(row.problem, f"Normalise the activations: put nn.LayerNorm (nn.BatchNorm for conv nets) after "
               f"{names(targets) or 'the weight layers'} so every layer sees inputs of unit scale",
               "nn.Sequential(nn.Linear(d, d), nn.LayerNorm(d), nn.ReLU())")


def _keep(*fixes: Fix | None) -> list[Fix]:
    return [f for f in fixes if f is not None]


def gradients_vanish(row, kind, ctx, layers, evidence, step):
    squash = [l for l in layers if ctx.kind(l) in ("sigmoid", "tanh")] or ctx.acts(("sigmoid", "tanh"))
    if squash:
        return _keep(Fix(row.problem, f"Replace the saturating activations {names(squash)} with nn.ReLU() or "
                         "nn.GELU() (derivative 1 on the active side instead of <= 0.25 for sigmoid)",
                         assign_lines(squash, "nn.GELU()")),
                     _init_fix(row, ctx, layers, switch_to="relu"), _residual_norm_fix(row, ctx, layers))
    res = _residual_norm_fix(row, ctx, layers)
    if ctx.post_ln():
        return _keep(res, _init_fix(row, ctx, layers))
    return _keep(_init_fix(row, ctx, layers), res)


def activations_shrink(row, kind, ctx, layers, evidence, step):
    return _keep(_init_fix(row, ctx, layers), _norm_fix(row, ctx, layers), _residual_norm_fix(row, ctx, layers))


def _overflow_fixes(row: ChecklistRow, ctx: RunContext, layers: list[str], evidence: Evidence | None,
                    step: int | None) -> list[Fix]:
    """``near_overflow``: bound the growing product, widen its range, slow the growth."""
    ev = evidence if isinstance(evidence, NearOverflow) else None
    module = (ev.module if ev is not None else None) or (layers[0] if layers else None)
    dtype = (ev.dtype if ev is not None else None) or "float16"
    where = f"`{module}`" if module else "the growing output"
    room = (f" (it has {fmt_code(ev.headroom)}x headroom left, growing x{fmt_code(ev.growth_per_step)} per step)"
            if ev is not None and ev.headroom is not None and ev.growth_per_step is not None else "")
    bound = Fix(row.problem, f"Bound what {where} computes{room}: for attention logits, divide q.k by "
                "sqrt(head_dim) and normalise q and k per head (qk-LayerNorm), so the logits cannot grow "
                "with the projection weights; for other outputs, normalise the input of that layer",
                "q, k = self.q_norm(q), self.k_norm(k)  # nn.LayerNorm(head_dim) each\n"
                "logits = q @ k.transpose(-2, -1) / math.sqrt(head_dim)")
    limit = ev.dtype_max if ev is not None and ev.dtype_max is not None else None
    wide = None if dtype == "bfloat16" else Fix(
        row.problem, f"Compute {where} in bfloat16 instead of {dtype}: 16 bits with float32's range (largest "
        "value 3.4e38" + (f" instead of {fmt_code(limit)})" if limit else ")"), _autocast_code(ctx))
    warm = Fix(row.problem, "Warm the learning rate up over the first few hundred steps, so the projections "
               "do not grow fast before the rest of the model has settled",
               "sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 500))")
    return _keep(bound, wide, _lr_fix(row, ctx, "so the weights feeding it grow more slowly", step), warm)


def activations_grow(row, kind, ctx, layers, evidence, step):
    if kind == "near_overflow":
        return _overflow_fixes(row, ctx, layers, evidence, step)
    return [_lr_fix(row, ctx, "if the growth appeared during training", step), _init_fix(row, ctx, layers),
            _norm_fix(row, ctx, layers)]


def gradients_explode(row, kind, ctx, layers, evidence, step):
    clip = _clip_fix(row, evidence)
    lr = _lr_fix(row, ctx, "so one large gradient cannot throw the weights far", step)
    if isinstance(evidence, LossSpike) and evidence.diverged_at is not None:
        warm = Fix(row.problem, "Warm the learning rate up from a small value over the first few hundred steps "
                   "(the loss rose above twice its starting value at once: the first updates overshoot)",
                   "sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 500))")
        return [lr, warm, clip]
    fixes = [clip, lr]
    depth = _part(evidence, ExplodingGradients)
    if depth is not None and depth.per_layer_gain is not None:
        fixes.append(_init_fix(row, ctx, layers))
    return fixes


def _autocast_code(ctx: RunContext) -> str:
    device = repr(ctx.device) if ctx.device else "next(model.parameters()).device.type"
    return f"with torch.autocast(device_type={device}, dtype=torch.bfloat16): loss = loss_fn(model(x), y)"


def _eps_fix(row: ChecklistRow, ctx: RunContext, cev: NonFiniteCause | None) -> Fix:
    import torch

    dtype = (cev.dtype if cev is not None else None) or ctx.dtype
    tiny = float(torch.finfo(getattr(torch, dtype)).tiny) if dtype and hasattr(torch, dtype) else None
    opt = (cev.optimizer if cev is not None else None) or "the optimizer"
    lr = ctx.lr_at(cev.updated_at_step if cev is not None else None)
    lr_arg = f"lr={fmt_code(lr)}, " if lr else ""
    if tiny is not None and dtype in ("float16", "bfloat16"):
        return Fix(row.problem, f"{opt}'s update produced the nan with finite gradients: its eps must be "
                   f"representable in {dtype} (1e-8 rounds to 0 in float16; the smallest normal {dtype} is "
                   f"{fmt_code(tiny)}). Better still, keep the weights and optimizer state in float32 and "
                   f"compute in {dtype} under autocast",
                   f"optimizer = torch.optim.{opt if opt != 'the optimizer' else 'AdamW'}(model.parameters(), "
                   f"{lr_arg}eps={fmt_code(tiny)})")
    return Fix(row.problem, f"{opt}'s update produced the nan with finite gradients: check its eps and "
               "state (a zero denominator, a non-finite state tensor) and keep the optimizer state in float32",
               "model.float()  # optimizer state follows the parameters' dtype")


def loss_nan(row, kind, ctx, layers, evidence, step):
    nf = evidence if isinstance(evidence, NonFinite) else None    # the trace's nan origin
    cause = nf.cause if nf is not None else None
    origin = layers[0] if layers else None
    at = nf.step if nf is not None else evidence.first_step if isinstance(evidence, LossNonFinite) else None
    at = step if at is None else at
    cev = nf.cause_evidence if nf is not None else None
    lr = _lr_fix(row, ctx, "and restart from a checkpoint before the nan", at)
    dtype = (cev.dtype if cev is not None else None) or ctx.dtype
    vdt = cev.value_dtype if cev is not None else None
    at_mod = (cev.largest_value_at or {}).get("name") if cev is not None else None
    dt = Fix(row.problem, "Check the dtype: " + (f"parameters are {dtype}; " if dtype else "") +
             (f"`{at_mod}` computes in {vdt}, " if vdt and at_mod else "") +
             "values near its largest finite number overflow. Compute in float32 or bfloat16 (wider range "
             "than float16), and scale the loss with a GradScaler under float16", _autocast_code(ctx))
    suspects = nf.suspects if nf is not None else None
    where = (f" in the backward of {names(suspects)} (run right after `{origin}`)" if suspects
             else f" in `{origin}`" if origin else "")
    inv = Fix(row.problem, "Look for an invalid operation" + where + (f" at step {at}" if at is not None else "") +
              ": log/sqrt of 0 or negatives, division by 0, inf - inf; add an eps or clamp, and rerun "
              "that step under anomaly detection to get the exact op",
              "torch.autograd.set_detect_anomaly(True)  # then reproduce the failing step")
    guard = Fix(row.problem, "Skip steps whose gradients are non-finite instead of writing nan into "
                "every weight, while you fix the cause", "optimizer = gt.Guard(optimizer, skip_nonfinite=True)")
    clip = _clip_fix(row, None)
    if nf is not None and nf.phase == "loss":
        fix_loss = Fix(row.problem, "The loss itself made the nan/inf with every model output finite: compute it "
                       "in log space (log_softmax / F.cross_entropy take logits) instead of log(softmax(x)), "
                       "or clamp probabilities away from 0 before a log" + (f" (step {at})" if at is not None else ""),
                       "loss = F.cross_entropy(logits, y)  # not -torch.log(torch.softmax(logits, 1))[..., y]")
        return [fix_loss, guard, lr]
    if cause == "optimizer_step":
        return [_eps_fix(row, ctx, cev), dt, guard]
    order = {"overflow": [dt, lr, clip, inv], "divergence": [lr, clip, dt, inv],
             "invalid_operation": [inv, guard, lr, dt]}.get(cause, [lr, dt, inv, clip])
    return order + ([guard] if guard not in order else [])


def relu_die(row, kind, ctx, layers, evidence, step):
    dead = [l for l in layers if ctx.kind(l) == "relu"] or layers
    fixes = []
    dead_ev = evidence if isinstance(evidence, DeadUnits) else None
    biases = (dead_ev.biases if dead_ev is not None else None) or []
    if biases:
        fixes.append(Fix(row.problem, f"The biases {names(biases)} hold the pre-activations feeding the dead "
                         "units below zero: reset them to 0 (or a small positive value)",
                         "\n".join(f"nn.init.zeros_({module_ref(b.rsplit('.', 1)[0])}.bias)" for b in biases[:3])))
    fixes.append(Fix(row.problem, f"Replace {names(dead) or 'the ReLU layers'} with nn.LeakyReLU(0.01) "
                     "(a small slope for negative inputs keeps a gradient flowing so units can recover) "
                     "or nn.GELU()", assign_lines(dead, "nn.LeakyReLU(0.01)") if dead
                     else "nn.LeakyReLU(0.01)  # in place of each nn.ReLU()"))
    if dead_ev is not None and dead_ev.from_initialisation:
        if not biases:   # silent from the start with no bias to blame: the depth did it
            res = _residual_norm_fix(CHECKLIST["activations_shrink"], ctx, dead)
            if res is not None:
                fixes.append(res)
    else:
        fixes.append(_lr_fix(row, ctx, "so one large update cannot push units below zero for good", step))
    if not biases:
        before = [w for w, k in ctx.following_activation().items() if k == "relu"]
        feeding = [w for w in ctx.weight_layers() if any(
            ctx.order.index(w) < ctx.order.index(d) for d in dead if d in ctx.order)]
        feeding = [w for w in feeding if w in before][-len(dead):] if dead else []
        if feeding:
            fixes.append(Fix(row.problem, f"Check the biases of {names(feeding)}, which feed the dead units: "
                             "strongly negative biases keep the pre-activations below zero; reset them to 0",
                             "\n".join(f"nn.init.zeros_({module_ref(w)}.bias)" for w in feeding[:3])))
    return fixes


def rnn_unstable(row, kind, ctx, layers, evidence, step):
    fixes = []
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
    t = ctx.time_steps or (evidence.time_steps if isinstance(evidence, (VanishingThroughTime, ExplodingThroughTime))
                           else None)
    chunk = max(1, int(t) // 4) if t else None
    fixes.append(Fix(row.problem, "Shorten the unroll length (truncated BPTT)" +
                     (f": the sequences here are {t} steps; backpropagate through chunks of about {chunk} "
                      if t else ": backpropagate through shorter chunks ") +
                     "and detach the hidden state between chunks",
                     f"h = h.detach()  # between chunks of {chunk or 'k'} time steps"))
    return fixes


#: Checklist row key -> its renderer.
RENDERERS: dict[str, Callable[..., list[Fix]]] = {
    "activations_shrink": activations_shrink,
    "activations_grow": activations_grow,
    "gradients_vanish": gradients_vanish,
    "gradients_explode": gradients_explode,
    "loss_nan": loss_nan,
    "relu_die": relu_die,
    "rnn_unstable": rnn_unstable,
}
assert set(RENDERERS) == set(CHECKLIST)
