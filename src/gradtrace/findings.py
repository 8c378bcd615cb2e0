"""Compatibility name: the `Finding` type now lives in :mod:`gradtrace.diagnose.finding`."""
from .diagnose.finding import KINDS, SEVERITIES, Finding, Fix, _jsonable  # noqa: F401
