"""Compatibility name: diagnosis now lives in :mod:`gradtrace.diagnose`.

``gradtrace.detect.<module>`` resolves to ``gradtrace.diagnose.<module>``.
"""
import importlib
import sys

from ..diagnose import *  # noqa: F401,F403
from ..diagnose import DETECTORS, Thresholds  # noqa: F401
from ..api import diagnose  # noqa: F401  (findings with fixes, as before)

for _name in ("_util", "activations", "gradients", "loss", "nonfinite", "thresholds", "through_time", "units"):
    sys.modules[f"{__name__}.{_name}"] = importlib.import_module(f"gradtrace.diagnose.{_name}")
