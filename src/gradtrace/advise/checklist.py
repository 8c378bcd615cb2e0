"""The chapter's Stable Training Checklist as data: its rows, and which rows answer which finding kind."""
from __future__ import annotations

from dataclasses import dataclass

from ..diagnose.finding import KINDS

__all__ = ["ChecklistRow", "CHECKLIST", "KIND_ROWS", "LR_CUT", "DEFAULT_MAX_NORM", "MAX_LINES"]


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
    # values growing toward the dtype's limit: the same row (bound them, lower the lr)
    "near_overflow": ("activations_grow",),
}
assert set(KIND_ROWS) == set(KINDS)

#: Suggested learning rate = the rate at the failing step / this factor.
LR_CUT = 10.0
#: Default ``max_norm`` suggested for clipping when the trace gives no baseline.
DEFAULT_MAX_NORM = 1.0
#: How many layer names a code snippet spells out before summarising the rest.
MAX_LINES = 3
