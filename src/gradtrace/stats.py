"""Old import path of :mod:`gradtrace.record.reduce` (kept for ``remedies.clip``)."""
from .record.reduce import max_abs, nonfinite_counts, squared_norms, stored_values  # noqa: F401
