"""Every number a detector compares against, in one documented, overridable place."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any


@dataclass(frozen=True)
class Thresholds:
    """Calibrated limits used by :func:`gradtrace.diagnose`.

    Rules are relative wherever possible: a gain per layer across depth, a robust
    z-score against the run's own recent past. The defaults were calibrated on the
    labelled scenario suite in ``bench/detection.py`` (every expected finding found,
    no finding on the healthy controls). Override any field by name.

    Fields:
        warmup_steps: records at the start of a run that never serve as the "current"
            point of a z-score (the baseline is still forming; early training moves fast).
        baseline_window: how many preceding records form the trailing robust baseline
            (median and MAD) for loss spikes and gradient-norm spikes.
        min_baseline: fewest finite records a baseline needs before it is trusted.
        spike_z: robust z-score (``(x - median) / (1.4826 * MAD)``) of the loss above its
            trailing baseline that counts as a loss spike.
        spike_min_fold: the spiking loss must also be at least this multiple of the
            baseline median (guards against tiny MADs late in training).
        spike_min_rise: and the jump (loss minus baseline median) must be at least this
            fraction of the run's early loss level (median of its first baseline window):
            late in training a loss of 1e-3 doubling is a wobble, not an event.
        spike_persist: a loss spike is corroborated when the median of the this many records
            after it is still ``spike_min_fold`` times the baseline (the jump persists) ...
            ... or the total gradient norm at the spike is ``explode_fold`` times its median
            over the same trailing window (an abnormal gradient: a hard example's larger
            gradient is not) ... or another spike came within ``baseline_window`` records
            (it repeats). A lone
            high loss on one batch (a hard example, BatchNorm batch statistics) is none of
            these and is not reported. A trace without gradient norms cannot corroborate, so
            there every spike is reported.
        climb_steps: a loss that rises this many records in a row and ends ``spike_z``
            robust z-scores above the ``baseline_window`` records before the climb began
            is a slow divergence (reported even though no single jump stood out against a
            trailing window that already held the climb).
        diverge_fold: within the records the spike rule cannot judge yet (``warmup_steps`` +
            ``min_baseline``), a loss at least this multiple of the run's first recorded loss
            is a gross divergence, reported at once and as an error: a run that doubles its
            loss in its first steps is failing, not warming up.
        explode_z: robust z-score of ``log(grad norm)`` above its trailing baseline that
            counts as a gradient explosion over the steps.
        explode_fold: the gradient norm must also be at least this multiple of its
            baseline median.
        depth_min_layers: fewest weight-bearing layers with data before a depth profile
            (gradient or activation scale across layers) is fitted at all.
        vanish_gain: median per-layer backward gain below which gradients are said to
            shrink layer by layer (1.0 = preserved).
        vanish_total: ratio first-layer / last-layer output-gradient norm below which the
            shrinkage across the whole depth counts as vanishing.
        explode_gain: per-layer backward gain above which gradients grow layer by layer.
        explode_total: ratio first / last output-gradient norm above which the growth
            across depth counts as exploding.
        act_shrink_gain: per-layer forward gain of the activation scale (``out_std``)
            below which activations shrink across depth.
        act_shrink_total: ratio last / first activation scale below which they have
            shrunk too far.
        act_grow_gain: per-layer forward gain above which activations grow across depth.
        act_grow_total: ratio last / first activation scale above which they have grown
            too far.
        persist_frac: fraction of the last ``persist_window`` judged steps on which a depth,
            activation or through-time rule must hold (one odd step is not a finding).
        persist_window: how many of the latest judged steps ``persist_frac`` counts over
            (a window ending at each step: a finding never depends on later steps).
        dead_window: how many of the last activation steps a ReLU unit must stay silent in
            to count as dead (its active masks are combined over these steps).
        dead_frac: fraction of a layer's units that must be dead before it is reported
            (a few units dead at initialisation is normal).
        dead_min_units: and at least this many units.
        dead_min_samples: a unit counts as dead only after the masks it was silent in covered
            at least this many inputs (batch rows, or positions for conv/sequence outputs);
            a unit silent on a handful of examples is not evidence.
        saturated_window: how many of the last activation steps the saturated fraction is
            averaged over.
        saturated_frac: fraction of a sigmoid/tanh layer's outputs in the flat range (see
            ``meta["saturation_bounds"]``) above which the layer is saturated.
        time_vanish_ratio: ratio of the gradient reaching the earliest time step to the
            one reaching the latest, below which gradients vanish through time.
        time_explode_ratio: that ratio above which gradients explode through time.
        time_min_movement: vanishing through time is judged only over a stretch in which the
            recurrent layer's weights travelled at least this fraction of their norm (summed
            relative updates ``||dW|| / ||W||``): a profile the optimizer has not had the chance
            to change says nothing yet about whether training can change it.
        overflow_frac: a value whose magnitude exceeds this fraction of the dtype's
            largest finite number (``torch.finfo(dtype).max``) counts as near overflow.
        overflow_headroom: an output of an 8- or 16-bit dtype (float16, bfloat16) whose largest
            magnitude comes within this factor of the dtype's largest finite value while still
            growing is ``near_overflow`` (2: one more doubling makes it inf).
        overflow_trend_window: how many of a module's latest activation records (the current
            one included) its growth per step is fitted over (a least-squares line through
            the log of its largest output magnitude).
        divergence_fold: growth of the gradient or parameter norm over the steps before a
            non-finite value (last finite / early median) that marks divergence.
        divergence_update_ratio: an optimizer step in that window that changed a parameter by
            at least this multiple of its own norm (``update_ratio``) also marks divergence:
            one oversized step is enough when the run breaks within a step or two.
        divergence_window: how many records before the first non-finite step are examined
            for growth and near-overflow values.
        floor: smallest norm used inside a logarithm (exact zeros become this).

    Example:
        >>> Thresholds(spike_z=6.0).spike_z
        6.0
    """

    warmup_steps: int = 5
    baseline_window: int = 20
    min_baseline: int = 5
    spike_z: float = 10.0
    spike_min_fold: float = 2.0
    spike_min_rise: float = 0.05
    spike_persist: int = 3
    climb_steps: int = 4
    diverge_fold: float = 2.0
    explode_z: float = 8.0
    explode_fold: float = 10.0
    depth_min_layers: int = 4
    vanish_gain: float = 0.85
    vanish_total: float = 1e-2
    explode_gain: float = 1.2
    explode_total: float = 1e2
    act_shrink_gain: float = 0.85
    act_shrink_total: float = 1e-2
    act_grow_gain: float = 1.2
    act_grow_total: float = 1e2
    persist_frac: float = 0.5
    persist_window: int = 5
    dead_window: int = 5
    dead_frac: float = 0.25
    dead_min_units: int = 2
    dead_min_samples: int = 64
    saturated_window: int = 5
    saturated_frac: float = 0.5
    time_vanish_ratio: float = 1e-3
    time_explode_ratio: float = 1e3
    time_min_movement: float = 0.1
    overflow_frac: float = 1e-2
    overflow_headroom: float = 2.0
    overflow_trend_window: int = 5
    divergence_fold: float = 1e2
    divergence_update_ratio: float = 1.0
    divergence_window: int = 10
    floor: float = 1e-30

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise TypeError(f"threshold {f.name} must be a number, got {type(v).__name__}")
            if f.type == "int" and int(v) != v:
                raise TypeError(f"threshold {f.name} must be an int, got {v!r}")
            if not v > 0:
                raise ValueError(f"threshold {f.name} must be > 0, got {v!r}")
        for name in ("vanish_gain", "vanish_total", "act_shrink_gain", "act_shrink_total", "spike_min_rise",
                     "time_vanish_ratio", "persist_frac", "dead_frac", "saturated_frac",
                     "overflow_frac"):
            if getattr(self, name) > 1:
                raise ValueError(f"threshold {name} must be <= 1, got {getattr(self, name)!r}")
        for name in ("explode_gain", "explode_total", "act_grow_gain", "act_grow_total",
                     "time_explode_ratio", "explode_fold", "spike_min_fold", "divergence_fold",
                     "diverge_fold", "overflow_headroom"):
            if getattr(self, name) < 1:
                raise ValueError(f"threshold {name} must be >= 1, got {getattr(self, name)!r}")
        if self.overflow_trend_window < 2:      # one point has no trend: the rule would never fire
            raise ValueError(f"threshold overflow_trend_window must be >= 2, got {self.overflow_trend_window!r}")

    def replace(self, **overrides: Any) -> "Thresholds":
        """A copy with some fields changed; unknown names raise ``ValueError``.

        Example:
            >>> Thresholds().replace(dead_frac=0.5).dead_frac
            0.5
        """
        _check_names(overrides)
        return dataclasses.replace(self, **overrides)

    @classmethod
    def coerce(cls, value: "Thresholds | dict[str, Any] | None") -> "Thresholds":
        """Accept ``None`` (defaults), a ``Thresholds`` or a dict of overrides.

        Example:
            >>> Thresholds.coerce({"spike_z": 5}).spike_z
            5
        """
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls().replace(**value)
        raise TypeError(f"thresholds must be a Thresholds, a dict of overrides or None, "
                        f"got {type(value).__name__}")


def _check_names(overrides: dict[str, Any]) -> None:
    import difflib

    known = [f.name for f in fields(Thresholds)]
    for k in overrides:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=3)
            hint = f"; did you mean {close}?" if close else f"; known: {', '.join(known)}"
            raise ValueError(f"unknown threshold {k!r}{hint}")
