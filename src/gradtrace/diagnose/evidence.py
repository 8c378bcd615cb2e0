"""Typed evidence: one frozen dataclass per finding kind, what each number is and its unit.

A :class:`~gradtrace.diagnose.finding.Finding` holds one of these (its ``evidence``). The
detectors still build plain dicts; :func:`coerce` turns a dict into the kind's class in one
place (``Finding.__post_init__``) and :func:`check` says what does not fit: a key no class
declares, a required field left out. :func:`gradtrace.diagnose.diagnose` checks every
finding a detector makes, so a detector that adds or renames a key fails at test time until
the field is declared here (evidence cannot drift from its readers silently). A finding
built by hand (a test, a user) may carry any subset and extra notes: it is converted all
the same and reads the same way, but only gradtrace's own findings must be complete.

Readers use attributes (``f.evidence.baseline_grad_norm``; a typo is an AttributeError).
For compatibility every evidence object is also a read-only ``Mapping`` over the keys that
were given (``f.evidence["cause"]``, ``.get``, ``dict(...)``), equal to the dict it came
from, so ``Finding.to_dict()`` and the JSON of ``gradtrace doctor --json`` keep their shape.

Most kinds have one class; a kind that two producers report has one class per producer
(:data:`EVIDENCE` lists them, the trace detector's first): ``exploding_gradients`` from the
depth profile and from the norm over the steps, and the preflight checks (measured on the
model before training) for the kinds they share with the trace detectors.

This file is longer than ~400 lines because it is the catalogue: one class per finding kind
and producer, each field documented; splitting it would scatter the schema.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Iterator

__all__ = ["Evidence", "Detail", "EVIDENCE", "coerce", "check", "problems", "describe",
           "NonFiniteCause", "FeedingBias", "TimeLayer", "SteadyClimb",
           "VanishingGradients", "ExplodingGradients", "GradientNormSurge", "LossSpike",
           "LossNonFinite", "NonFinite", "DeadUnits", "SaturatedUnits", "ShrinkingActivations",
           "GrowingActivations", "VanishingThroughTime", "ExplodingThroughTime", "NearOverflow",
           "PreflightNonFinite", "PreflightGradientRatio", "PreflightPostLN",
           "PreflightActivationScale", "PreflightRecurrence", "PreflightAttention", "PreflightSaturation"]


def _req(doc: str, **meta: Any) -> Any:
    """A field every producer of this class always fills (checked by :func:`check`)."""
    return field(metadata={"doc": doc, "required": True, **meta})


def _opt(doc: str, **meta: Any) -> Any:
    """A field present only in some cases (``None`` as an attribute when absent)."""
    return field(default=None, metadata={"doc": doc, **meta})


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class Detail(Mapping):
    """Base of every typed record: frozen fields, read-only Mapping over the given keys.

    ``Detail`` subclasses are records nested inside a finding's evidence (the cause of a
    nan, one recurrent layer's figures); :class:`Evidence` subclasses are a finding's
    evidence itself.

    Example:
        >>> c = NonFiniteCause.from_mapping({"dtype": "float16", "dtype_max": 65504.0})
        >>> c.dtype, c["dtype_max"], "loss_growth" in c, c.loss_growth
        ('float16', 65504.0, False, None)
    """

    def __post_init__(self) -> None:
        # Built through the constructor: every required field was given, optional ones
        # count as given when not None.
        keys = tuple(f.name for f in fields(self)
                     if f.metadata.get("required") or getattr(self, f.name) is not None)
        self._settle(keys, {})

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], kind: str | None = None) -> "Detail":
        """Build from a dict leniently: missing fields read ``None``, unknown keys are kept
        (in order) for :func:`check` to report. Nested records are converted too.

        Example:
            >>> t = TimeLayer.from_mapping({"ratio": 1e-3, "time_steps": 12})
            >>> t.ratio, t.per_step_gain, dict(t)
            (0.001, None, {'ratio': 0.001, 'time_steps': 12})
        """
        if not isinstance(data, Mapping):
            raise TypeError(f"evidence must be a mapping (dict), got {type(data).__name__}")
        obj = cls.__new__(cls)
        names = cls.field_names()
        for name in names:
            object.__setattr__(obj, name, data.get(name))
        obj._settle(tuple(data), {k: v for k, v in data.items() if k not in names}, kind)
        return obj

    def _settle(self, keys: tuple[str, ...], extra: dict[str, Any], kind: str | None = None) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            if "nested" in f.metadata and isinstance(v, Mapping) and not isinstance(v, Detail):
                object.__setattr__(self, f.name, f.metadata["nested"].from_mapping(v))
            elif "values" in f.metadata and isinstance(v, Mapping):
                sub = f.metadata["values"]
                object.__setattr__(self, f.name, {k: x if isinstance(x, Detail) or not isinstance(x, Mapping)
                                                  else sub.from_mapping(x) for k, x in v.items()})
            elif f.metadata.get("merged") and isinstance(v, (list, tuple)):
                kind = kind or getattr(self, "kinds", (None,))[0]
                object.__setattr__(self, f.name, tuple(coerce(kind, x) if kind and isinstance(x, Mapping)
                                                       else x for x in v))
        object.__setattr__(self, "_keys", keys)
        object.__setattr__(self, "_extra", extra)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The declared fields, in declaration order.

        Example:
            >>> TimeLayer.field_names()[:2]
            ('ratio', 'per_step_gain')
        """
        return tuple(f.name for f in fields(cls))

    @classmethod
    def required(cls) -> tuple[str, ...]:
        """The fields every producer of this class fills.

        Example:
            >>> "cause" in NonFinite.required(), "suspects" in NonFinite.required()
            (True, False)
        """
        return tuple(f.name for f in fields(cls) if f.metadata.get("required"))

    def __getitem__(self, key: str) -> Any:
        if key in self._extra:
            return self._extra[key]
        if key in self._keys:
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={self[k]!r}' for k in self)})"


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class Evidence(Detail):
    """Base of a finding's evidence: the fields every kind shares.

    Example:
        >>> ev = coerce("loss_spike", {"recovered": True, "summary": "loss 9 is 4x the median"})
        >>> type(ev).__name__, ev.recovered, ev.diverged_at
        ('LossSpike', True, None)
    """

    #: the kinds this class is the evidence of
    kinds: ClassVar[tuple[str, ...]] = ()
    also: tuple[Evidence, ...] | None = _opt(
        "the evidence of further findings of the same kind merged into this one, in step order "
        "(each of its kind's own class)", merged=True)


# ---- nested records ---------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class NonFiniteCause(Detail):
    """Why the first nan/inf appeared: the figures the cause was judged by.

    Example:
        >>> NonFiniteCause.from_mapping({"dtype": "float32"}).fraction_of_dtype_max is None
        True
    """

    dtype: str | None = _req("the parameters' most common floating dtype (None: not recorded)")
    dtype_max: float = _req("largest finite number of that dtype (float32's when unknown)")
    largest_finite_value: float = _req("largest finite |value| of an output or gradient in the "
                                       "steps just before (same unit as the tensor)")
    largest_value_at: dict[str, Any] | None = _opt("where that value was: {name, stat, step}")
    fraction_of_dtype_max: float = _req("largest_finite_value / dtype_max (0..1); / value_dtype_max when "
                                        "that value was in a narrower output dtype")
    value_dtype: str | None = _opt("dtype of the module output holding that value, when recorded and "
                                   "narrower than the parameters' (float16 logits of a float32 model)")
    value_dtype_max: float | None = _opt("largest finite number of value_dtype")
    grad_norm_growth: float = _req("max total gradient norm of the last steps / its earlier "
                                   "median (fold; 1.0 when too few steps)")
    param_norm_growth: float = _req("the same fold for the total parameter norm")
    loss_growth: float = _req("the same fold for the loss")
    max_update_ratio: float | None = _req("largest finite |update| / |weight| of the last steps "
                                          "(None: no update ratio recorded)")
    nonfinite_update_ratios: int | None = _opt("update ratios that were nan (the step wrote nan)")
    updated_at_step: int | None = _opt("optimizer_step cause: the step whose update wrote the nan")
    params_nonfinite_after_step: int | None = _opt("optimizer_step cause: weight tensors non-finite "
                                                   "after that update")
    nonfinite_weights: list[str] | None = _opt("optimizer_step cause: those weights (first 20)")
    optimizer: str | None = _opt("optimizer_step cause: the optimizer's class name, if recorded")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class FeedingBias(Detail):
    """The weight layer that feeds a dead ReLU layer and whether its bias killed the units.

    Example:
        >>> FeedingBias(module="net.0", bias="net.0.bias", bias_pushes_below_zero=False).bias_rms is None
        True
    """

    module: str = _req("the weight layer run just before the dead layer")
    bias: str | None = _req("its bias parameter (None: it has none)")
    bias_rms: float | None = _opt("RMS of that bias at the first step the units were dead")
    pre_activation_mean: float | None = _opt("mean output of the weight layer then")
    pre_activation_std: float | None = _opt("std of the output of the weight layer then")
    bias_pushes_below_zero: bool = _req("mean < -std and the bias RMS at least half of |mean|: "
                                        "the bias holds the pre-activations below zero")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class TimeLayer(Detail):
    """One recurrent layer's gradient-through-time figures.

    Example:
        >>> TimeLayer(ratio=1e-4, per_step_gain=0.5, time_steps=14, resolved=False,
        ...           steps_flagged=9, steps_examined=10).per_step_gain
        0.5
    """

    ratio: float = _req("median over the flagged steps of |grad at time step 0| / |grad at "
                        "the last time step| (fold)")
    per_step_gain: float = _req("ratio ** (1 / (time_steps - 1)): the factor per step back")
    time_steps: int = _req("sequence length T")
    resolved: bool = _req("the last recorded step no longer meets the rule")
    steps_flagged: int = _req("recorded steps that met the rule")
    steps_examined: int = _req("recorded steps with a finite time profile")
    weights_moved: float | None = _opt("vanishing: how far the layer's weights travelled over the "
                                       "stretch that qualified (summed ||dW|| / ||W||), when recorded")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class SteadyClimb(Detail):
    """A total gradient norm that climbed steadily, not in one jump.

    Example:
        >>> SteadyClimb(early_median=0.5, first_step=40, growth=30.0).growth
        30.0
    """

    early_median: float = _req("median total gradient norm before the climb")
    first_step: int = _req("step the climb was first seen")
    latest: float | None = _opt("total gradient norm at the latest climbing step")
    growth: float = _req("that norm / early_median (fold)")
    in_warmup: bool | None = _opt("True when the climb happened inside the warm-up steps")


# ---- trace detectors --------------------------------------------------------------------

@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class _DepthGradients(Evidence):
    per_layer_gain: float = _req("exp(-slope) of log outgrad_norm fitted against depth: the factor "
                                 "the backward pass applies per layer, a repeated block counting as "
                                 "one (median over flagged steps)")
    layers_in_profile: int = _req("weight-bearing layers in the profile, a repeated block "
                                  "(encoder.layers.3) counting as one")
    first_to_last_outgrad_ratio: float = _req("first / last layer output-gradient norm (median over "
                                              "flagged steps; 0.0 when no gradient reached the first)")
    summary: str = _req("one human sentence")
    outgrad_norm_median: dict[str, float] = _req("median output-gradient norm per layer (a block: "
                                                 "geometric mean over its modules)")
    steps_flagged: int = _req("activation steps that met the rule")
    steps_examined: int = _req("activation steps examined")
    first_layer_grad_norm: dict[str, float] | None = _opt("first layer's weight: median grad norm")
    last_layer_grad_norm: dict[str, float] | None = _opt("last layer's weight: median grad norm")
    resolved: bool = _req("the last activation step no longer meets the rule")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class VanishingGradients(_DepthGradients):
    """``vanishing_gradients`` from the output-gradient profile across depth.

    Example:
        >>> ev = coerce("vanishing_gradients", {"per_layer_gain": 0.5, "layers_in_profile": 20})
        >>> type(ev).__name__, ev.per_layer_gain ** (ev.layers_in_profile - 1) < 1e-5
        ('VanishingGradients', True)
    """

    kinds: ClassVar[tuple[str, ...]] = ("vanishing_gradients",)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class ExplodingGradients(_DepthGradients):
    """``exploding_gradients`` from the output-gradient profile across depth.

    Example:
        >>> coerce("exploding_gradients", {"per_layer_gain": 2.0, "resolved": False}).per_layer_gain
        2.0
    """

    kinds: ClassVar[tuple[str, ...]] = ("exploding_gradients",)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class GradientNormSurge(Evidence):
    """``exploding_gradients`` from the total gradient norm over the steps (a jump or climb
    above its own robust baseline).

    Example:
        >>> ev = coerce("exploding_gradients", {"baseline_grad_norm": 0.2, "fold_over_baseline": 90.0})
        >>> type(ev).__name__, ev.baseline_grad_norm * ev.fold_over_baseline
        ('GradientNormSurge', 18.0)
    """

    kinds: ClassVar[tuple[str, ...]] = ("exploding_gradients",)
    first_flagged_step: int = _req("first step flagged")
    total_grad_norm: float = _req("total gradient norm at that step")
    baseline_grad_norm: float = _req("robust baseline (median) of the norm before it")
    fold_over_baseline: float = _req("total_grad_norm / baseline_grad_norm")
    robust_z_log_norm: float | None = _req("robust z of log(norm) against the baseline (None: the "
                                           "run's first norm, no baseline yet)")
    steps_flagged: list[int] = _req("flagged steps (first 20)")
    max_total_grad_norm: float = _req("largest finite total gradient norm of the run")
    layer_growth: dict[str, float] = _req("per module, its grad norm at the first flagged step / its "
                                          "baseline (top 10)")
    steady_climb: SteadyClimb | None = _req("the climb when the norm rose steadily (None: a jump)",
                                            nested=SteadyClimb)
    summary: str = _req("one human sentence")
    post_clip_max: float | None = _opt("largest total norm actually applied when gradtrace's "
                                       "clipping held every flagged step")
    resolved: bool = _req("the norm is back near its baseline at the last step")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class LossSpike(Evidence):
    """``loss_spike``: corroborated spikes above the trailing median and/or divergence.

    Example:
        >>> coerce("loss_spike", {"diverged_at": 2, "recovered": False, "summary": "..."}).diverged_at
        2
    """

    kinds: ClassVar[tuple[str, ...]] = ("loss_spike",)
    diverged_at: int | None = _opt("divergence: first step whose loss is diverge_fold x the first")
    first_loss: float | None = _opt("divergence: the run's first finite loss")
    diverged_loss: float | None = _opt("divergence: the loss at diverged_at")
    spike_steps: list[int] | None = _opt("spikes: steps of the corroborated spikes (first 20)")
    corroborated_by: dict[int, str] | None = _opt("spikes: per spike step, what confirmed it "
                                                  "(gradient, persists, ...)")
    loss: float | None = _opt("spikes: the loss at the first spike")
    baseline_median: float | None = _opt("spikes: median loss of the window before it")
    robust_z: float | None = _opt("spikes: robust z of the first spike")
    fold: float | None = _opt("spikes: loss / baseline_median at the first spike")
    worst_step: int | None = _opt("spikes: step of the largest fold")
    worst_fold: float | None = _opt("spikes: that largest fold")
    climb_at: int | None = _opt("climb: step ending climb_steps rises in a row, spike_z above the "
                                "baseline before the climb")
    climb_started_at: int | None = _opt("climb: the step the climb rose from")
    climb_loss: float | None = _opt("climb: the loss at climb_at")
    climb_baseline_median: float | None = _opt("climb: median loss of the window before the climb")
    climb_robust_z: float | None = _opt("climb: robust z of climb_loss against that window")
    recovered: bool = _req("the run ended finite and back near its baseline")
    summary: str = _req("one human sentence")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class LossNonFinite(Evidence):
    """``loss_nonfinite``: the recorded loss became nan/inf.

    Example:
        >>> coerce("loss_nonfinite", {"first_step": 7, "lr": 0.1}).lr
        0.1
    """

    kinds: ClassVar[tuple[str, ...]] = ("loss_nonfinite",)
    first_step: int = _req("first step with a non-finite loss")
    steps_with_nonfinite_loss: int = _req("recorded steps with a non-finite loss")
    first_value: float = _req("the first non-finite value (nan, inf or -inf)")
    summary: str = _req("one human sentence")
    last_finite_loss: dict[str, float] | None = _opt("{step, value} of the last finite loss before")
    lr: float | None = _opt("learning rate of the update that led to first_step")
    lr_step: int | None = _opt("step that learning rate was recorded at")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class NonFinite(Evidence):
    """``nonfinite``: where and why the first nan/inf appeared.

    Example:
        >>> ev = coerce("nonfinite", {"cause": "overflow", "cause_evidence": {"dtype": "float16"}})
        >>> ev.cause, ev.cause_evidence.dtype, ev.phase
        ('overflow', 'float16', None)
    """

    kinds: ClassVar[tuple[str, ...]] = ("nonfinite",)
    step: int = _req("step of the first non-finite value")
    forward: str | None = _req("first module whose output held nan/inf (None: none did)")
    backward: str | None = _req("first module in backward order whose output gradient did")
    nonfinite_params: list[str] = _req("parameters with a non-finite gradient then (first 20)")
    n_nonfinite_params: int = _req("how many there were")
    loss_nonfinite: bool = _req("the loss of that step was non-finite")
    localised_by: str = _req("how the origin was found, in words")
    suspect_backward_of: str | None = _opt("backward origin: the module whose backward made it")
    suspects: list[str] | None = _opt("modules whose backward may have made it")
    phase: str = _req("forward, backward, loss or optimizer_step")
    cause: str = _req("overflow, divergence, invalid_operation or optimizer_step")
    cause_evidence: NonFiniteCause = _req("the figures the cause was judged by", nested=NonFiniteCause)
    summary: str = _req("one human sentence")
    steps_with_nonfinite: int = _req("recorded steps with a non-finite value")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class DeadUnits(Evidence):
    """``dead_units``: ReLU units that never fired over a window of activation steps.

    Example:
        >>> ev = coerce("dead_units", {"dead": {"net.1": 30}, "units": {"net.1": 40}})
        >>> ev.dead["net.1"] / ev.units["net.1"], ev.from_initialisation
        (0.75, None)
    """

    kinds: ClassVar[tuple[str, ...]] = ("dead_units",)
    dead: dict[str, int] = _req("per layer, units that never fired in the reported window")
    units: dict[str, int] = _req("per layer, its units")
    dead_fraction: dict[str, float] = _req("dead / units (0..1)")
    window: int = _req("activation steps per window (Thresholds.dead_window)")
    resolved: bool = _req("every reported layer's units fire again")
    summary: str = _req("one human sentence")
    feeding: dict[str, FeedingBias] | None = _opt("per dead layer, the weight layer feeding it",
                                                  values=FeedingBias)
    biases: list[str] | None = _opt("biases that hold the pre-activations below zero")
    from_initialisation: bool | None = _opt("True: dead from the first recorded step")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class SaturatedUnits(Evidence):
    """``saturated_units``: sigmoid/tanh outputs pinned in the flat range.

    Example:
        >>> coerce("saturated_units", {"saturated_fraction": {"3": 0.8}}).saturated_fraction["3"]
        0.8
    """

    kinds: ClassVar[tuple[str, ...]] = ("saturated_units",)
    saturated_fraction: dict[str, float] = _req("per layer, mean fraction of saturated outputs over "
                                                "the window (0..1)")
    activation: dict[str, str | None] = _req("per layer, its activation kind (sigmoid, tanh)")
    saturation_bounds: dict[str, Any] = _req("the |x| bounds the recorder counted as saturated")
    resolved: bool = _req("no layer is saturated at the last step")
    summary: str = _req("one human sentence")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class _ActivationScale(Evidence):
    per_layer_gain: float = _req("factor per layer on the output std (median over flagged steps)")
    layers_in_profile: int = _req("layers from the first to the trough (peak), inclusive")
    ratio_to_first_layer: float = _req("output std at the trough (peak) / at the first layer")
    out_std_median: dict[str, float] = _req("median output std per layer over flagged steps")
    steps_flagged: int = _req("activation steps that met the rule")
    steps_examined: int = _req("activation steps examined (before any nan)")
    resolved: bool = _req("the last step no longer meets the rule")
    summary: str = _req("one human sentence")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class ShrinkingActivations(_ActivationScale):
    """``shrinking_activations``: the forward signal shrinks layer after layer.

    Example:
        >>> coerce("shrinking_activations", {"ratio_to_first_layer": 1e-3}).ratio_to_first_layer
        0.001
    """

    kinds: ClassVar[tuple[str, ...]] = ("shrinking_activations",)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class GrowingActivations(_ActivationScale):
    """``growing_activations``: the forward signal grows layer after layer.

    Example:
        >>> coerce("growing_activations", {"per_layer_gain": 1.9}).per_layer_gain
        1.9
    """

    kinds: ClassVar[tuple[str, ...]] = ("growing_activations",)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class _ThroughTime(Evidence):
    per_layer: dict[str, TimeLayer] = _req("per recurrent layer, its figures", values=TimeLayer)
    ratio_earliest_to_latest: float = _req("the most affected layer's ratio (see TimeLayer)")
    per_step_gain: float = _req("the most affected layer's factor per step back")
    time_steps: int = _req("the most affected layer's sequence length")
    resolved: bool = _req("every reported layer is back within the thresholds")
    summary: str = _req("one human sentence")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class VanishingThroughTime(_ThroughTime):
    """``vanishing_through_time``: the gradient reaching early time steps shrinks.

    Example:
        >>> coerce("vanishing_through_time", {"time_steps": 100}).time_steps
        100
    """

    kinds: ClassVar[tuple[str, ...]] = ("vanishing_through_time",)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class ExplodingThroughTime(_ThroughTime):
    """``exploding_through_time``: the gradient reaching early time steps grows.

    Example:
        >>> coerce("exploding_through_time", {"per_step_gain": 1.3}).per_step_gain
        1.3
    """

    kinds: ClassVar[tuple[str, ...]] = ("exploding_through_time",)


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class NearOverflow(Evidence):
    """``near_overflow``: a float16 (8/16-bit) output close to its dtype's largest value, rising.

    Example:
        >>> ev = coerce("near_overflow", {"module": "blocks.0.logits", "headroom": 1.6})
        >>> ev.module, ev.headroom, ev.growth_per_step
        ('blocks.0.logits', 1.6, None)
    """

    kinds: ClassVar[tuple[str, ...]] = ("near_overflow",)
    module: str = _req("the module flagged first (least headroom at that step if several)")
    dtype: str = _req("its output dtype, as recorded (float16, bfloat16 ...)")
    dtype_max: float = _req("largest finite value of that dtype (65504 for float16)")
    max_abs: float = _req("its largest output magnitude at the first flagged step")
    headroom: float = _req("dtype_max / max_abs at that step (>= 1; 2 = one doubling from inf)")
    growth_per_step: float = _req("factor per step of its largest magnitude, least-squares fit of the log "
                                  "over the records in window")
    steps_to_overflow: float = _req("log(headroom) / log(growth_per_step): steps left at that growth "
                                    "(a projection, not a measurement)")
    window: dict[str, float] = _req("step -> largest output magnitude of the records the growth was fitted on")
    headroom_per_module: dict[str, float] = _req("every flagged module -> its headroom when first flagged, "
                                                 "least first")
    steps_flagged: int = _req("the first module's activation records that met the rule")
    steps_examined: int = _req("its activation records examined (before any nan)")
    resolved: bool = _req("its last examined record no longer meets the rule")
    summary: str = _req("one human sentence")


# ---- preflight (measured on the model before training) ----------------------------------

@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightNonFinite(Evidence):
    """Preflight ``nonfinite``: the model's output on a random batch.

    Example:
        >>> coerce("nonfinite", {"output_finite": False}).output_finite
        False
    """

    kinds: ClassVar[tuple[str, ...]] = ("nonfinite",)
    output_finite: bool = _req("the model's output at initialisation was finite")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightGradientRatio(Evidence):
    """Preflight ``vanishing_gradients`` / ``exploding_gradients`` across the blocks.

    Example:
        >>> coerce("vanishing_gradients", {"grad_ratio_first_last": 1e-6, "depth": 30}).depth
        30
    """

    kinds: ClassVar[tuple[str, ...]] = ("vanishing_gradients", "exploding_gradients")
    grad_ratio_first_last: float = _req("gradient norm reaching the first block / leaving the last")
    threshold: float = _req("the preflight threshold it was compared with")
    mean_backward_gain: float = _req("mean factor per block on the squared gradient norm")
    depth: int = _req("blocks measured")
    depth_scale: float | None = _opt("blocks over which the gradient changes by e (inf: flat)")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightPostLN(Evidence):
    """Preflight ``vanishing_gradients`` of a post-LN transformer.

    Example:
        >>> coerce("vanishing_gradients", {"layout": "post-LN", "output_over_median": 4.0}).layout
        'post-LN'
    """

    kinds: ClassVar[tuple[str, ...]] = ("vanishing_gradients",)
    layout: str = _req("the block layout found (post-LN)")
    param_grad_norm: dict[str, float | None] = _req("per block, its parameters' gradient norm")
    output_over_median: float = _req("last block's gradient norm / the median block's")
    block_gain: float = _req("(output_over_median) ** (2 / (blocks - 1)): the growth per block")
    threshold: float = _req("the preflight threshold block_gain was compared with")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightActivationScale(Evidence):
    """Preflight ``shrinking_activations`` / ``growing_activations``.

    Example:
        >>> coerce("growing_activations", {"forward_ratio_last_first": 40.0}).forward_ratio_last_first
        40.0
    """

    kinds: ClassVar[tuple[str, ...]] = ("shrinking_activations", "growing_activations")
    forward_ratio_last_first: float = _req("activation RMS after the last block / after the first")
    threshold: float = _req("the preflight threshold it was compared with")
    forward_rms: dict[str, float] = _req("per block, the RMS of its output")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightRecurrence(Evidence):
    """Preflight ``vanishing_through_time`` / ``exploding_through_time`` of one recurrent layer.

    Example:
        >>> coerce("vanishing_through_time", {"sigma_max_whh": 0.5, "gamma": 1.0}).gamma
        1.0
    """

    kinds: ClassVar[tuple[str, ...]] = ("vanishing_through_time", "exploding_through_time")
    sigma_max_whh: float = _req("largest singular value of the recurrent weights")
    gamma: float | None = _req("bound on |activation'| (1 for tanh; None: unknown)")
    pascanu_bound: float | None = _req("(gamma * sigma_max_whh) ** horizon (None: unknown)")
    jacobian_norm: float | None = _req("measured spectral norm of dh_T/dh_0 (None: not measured)")
    rate_per_step: float | None = _req("measured factor per time step (None: not measured)")
    steps: int | None = _req("time steps measured (None: not measured)")
    horizon: int | None = _req("time steps the bound is taken over")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightAttention(Evidence):
    """Preflight ``saturated_units``: attention softmax saturated at initialisation.

    Example:
        >>> coerce("saturated_units", {"attention_saturated_rows": {"0": 0.9}}).attention_saturated_rows
        {'0': 0.9}
    """

    kinds: ClassVar[tuple[str, ...]] = ("saturated_units",)
    attention_saturated_rows: dict[str, float] = _req("per block, fraction of softmax rows so near "
                                                      "one-hot that their Jacobian passes almost nothing (0..1)")
    attention_entropy: dict[str, float | None] = _req("per block, attention entropy / uniform's (0..1)")
    threshold: float = _req("the preflight threshold the fraction was compared with")


@dataclass(frozen=True, eq=False, repr=False, kw_only=True)
class PreflightSaturation(Evidence):
    """Preflight ``saturated_units``: tanh/sigmoid outputs in their flat ends at initialisation.

    Example:
        >>> coerce("saturated_units", {"median_saturated_fraction": 0.57}).median_saturated_fraction
        0.57
    """

    kinds: ClassVar[tuple[str, ...]] = ("saturated_units",)
    saturated_fraction: dict[str, float] = _req("per saturated block, the fraction of its outputs in "
                                                "the flat ends (0..1)")
    median_saturated_fraction: float = _req("median of that fraction over all blocks")
    threshold: float = _req("the preflight threshold the median was compared with")
    mean_field_saturated_fraction: float | None = _opt("the fraction mean-field theory predicts from "
                                                       "the weight variances (median over blocks)")


#: Finding kind -> its evidence classes, the trace detector's first.
EVIDENCE: dict[str, tuple[type[Evidence], ...]] = {}
for _cls in (VanishingGradients, ExplodingGradients, GradientNormSurge, NonFinite, LossSpike,
             LossNonFinite, DeadUnits, SaturatedUnits, ShrinkingActivations, GrowingActivations,
             VanishingThroughTime, ExplodingThroughTime, NearOverflow, PreflightNonFinite, PreflightGradientRatio,
             PreflightPostLN, PreflightActivationScale, PreflightRecurrence, PreflightAttention,
             PreflightSaturation):
    for _k in _cls.kinds:
        EVIDENCE.setdefault(_k, ())
        EVIDENCE[_k] += (_cls,)
del _cls, _k


def _classes(kind: str) -> tuple[type[Evidence], ...]:
    if kind not in EVIDENCE:
        raise ValueError(f"kind={kind!r} is not a finding kind; valid: {', '.join(EVIDENCE)}")
    return EVIDENCE[kind]


def coerce(kind: str, data: Mapping[str, Any] | Evidence | None) -> Evidence:
    """The evidence of a ``kind`` finding as its typed class.

    An :class:`Evidence` of one of the kind's classes is returned as it is. A mapping goes
    to the class it fits (every key declared, every required field present); if none fits,
    to the class declaring most of its keys, leniently (see :func:`check`).

    Example:
        >>> ev = coerce("exploding_gradients", {"per_layer_gain": 2.1, "layers_in_profile": 8})
        >>> type(ev).__name__, ev["per_layer_gain"], ev == {"per_layer_gain": 2.1, "layers_in_profile": 8}
        ('ExplodingGradients', 2.1, True)
    """
    classes = _classes(kind)
    if isinstance(data, Evidence):
        if type(data) not in classes:
            raise ValueError(f"{type(data).__name__} is not evidence of a {kind} finding; valid: "
                             f"{', '.join(c.__name__ for c in classes)}")
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise TypeError(f"evidence must be a mapping (dict) or an Evidence, got {type(data).__name__}")
    keys = set(data)

    def fit(c: type[Evidence]) -> tuple[bool, int]:
        names = set(c.field_names())
        return keys <= names and set(c.required()) <= keys, len(keys & names)
    best = max(classes, key=fit)      # max keeps the first of equals: the detector's class
    return best.from_mapping(data, kind)


def problems(ev: Mapping[str, Any], where: str = "") -> list[str]:
    """What keeps ``ev`` from being complete: keys its class does not declare, required
    fields left out (nested records too). Empty for a detector's well-formed evidence.

    Example:
        >>> problems(coerce("loss_nonfinite", {"first_step": 3, "frist_value": 1.0}))
        ['unknown key frist_value', 'missing steps_with_nonfinite_loss', 'missing first_value', 'missing summary']
    """
    if not isinstance(ev, Detail):
        return [f"{where or 'evidence'} is a {type(ev).__name__}, not typed evidence"]
    out = [f"unknown key {where}{k}" for k in ev._extra]
    out += [f"missing {where}{n}" for n in ev.required() if n not in ev._keys]
    for f in fields(ev):
        v = getattr(ev, f.name)
        if isinstance(v, Detail):
            out += problems(v, f"{where}{f.name}.")
        elif "values" in f.metadata and isinstance(v, Mapping):
            for k, x in v.items():
                out += problems(x, f"{where}{f.name}[{k!r}].")
        elif f.metadata.get("merged") and v is not None:
            for i, x in enumerate(v):
                out += problems(x, f"{where}{f.name}[{i}].")
    return out


def check(finding: Any) -> Any:
    """Raise ``ValueError`` unless ``finding``'s evidence is complete (:func:`problems`);
    return the finding. :func:`gradtrace.diagnose.diagnose` runs it on every detector's
    finding.

    Example:
        >>> from gradtrace.diagnose import Finding
        >>> check(Finding("nonfinite", "error", [], None, None, {"output_finite": False})).kind
        'nonfinite'
        >>> check(Finding("dead_units", "warning", ["1"], 0, 9, {"dead": {"1": 3}}))
        Traceback (most recent call last):
        ...
        ValueError: dead_units evidence (DeadUnits) does not match its declaration in gradtrace/diagnose/evidence.py: missing units, missing dead_fraction, missing window, missing resolved, missing summary
    """
    bad = problems(finding.evidence)
    if bad:
        raise ValueError(f"{finding.kind} evidence ({type(finding.evidence).__name__}) does not match "
                         f"its declaration in gradtrace/diagnose/evidence.py: {', '.join(bad)}")
    return finding


def describe(kind: str | None = None) -> str:
    """Markdown of a kind's evidence (every kind's, under ``## `kind` `` headings, when
    ``kind`` is None): per class, each field, its type, whether it is always there and what
    it measures. ``docs/evidence.md`` is ``describe()`` under a short introduction.

    Example:
        >>> print(describe("loss_nonfinite").splitlines()[2])
        - `first_step` (int, always): first step with a non-finite loss
    """
    if kind is None:
        return "\n".join(f"## `{k}`\n\n" + describe(k) for k in EVIDENCE)
    lines = []
    for c in _classes(kind):
        lines += [f"{c.__name__}: {(c.__doc__ or '').strip().splitlines()[0]}", ""]
        for f in fields(c):
            if f.name == "also":
                continue
            when = "always" if f.metadata.get("required") else "optional"
            lines.append(f"- `{f.name}` ({f.type}, {when}): {f.metadata['doc']}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
