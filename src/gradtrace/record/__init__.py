"""Recording: ``watch()`` attaches a :class:`Monitor` that turns training steps into trace records.

Modules: ``monitor`` (lifecycle), ``selection`` (which modules and parameters),
``collectors`` (per-parameter statistics), ``hooks`` (activation-step module hooks),
``reduce`` (on-device reductions), ``transfer`` (non-blocking copies to the host),
``assemble`` (record building), ``distributed`` (cross-rank reduction), ``capture``
(step capture and non-finite replay), ``flight`` (replay bundles).
"""
from .capture import StepCapture
from .monitor import PRESETS, Monitor, watch

__all__ = ["watch", "Monitor", "PRESETS", "StepCapture"]
