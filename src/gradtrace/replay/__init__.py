"""Replay the flight recorder's step and name the operation that made the first nan/inf.

Example:
    >>> from gradtrace.replay import replay, ReplayResult
    >>> ReplayResult.__name__
    'ReplayResult'
"""
from gradtrace.replay.checker import OpChecker, OpOrigin
from gradtrace.replay.core import ReplayResult, replay

__all__ = ["replay", "ReplayResult", "OpChecker", "OpOrigin"]
