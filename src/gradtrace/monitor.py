"""Old import path of the recorder (``gradtrace.monitor``); it now lives in :mod:`gradtrace.record`."""
from .errors import NonFiniteError  # noqa: F401
from .record.monitor import PRESETS, Monitor, watch  # noqa: F401
