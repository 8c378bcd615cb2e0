"""The trace: gradtrace's memory of a run, written append-only and read back through questions.

``format`` (layout, MISSING, codecs) → ``encode`` (record → row) → ``writer`` (files,
memory, sinks) and ``store``/``reader`` (maps and queries) → ``export`` (pandas, Parquet).

Example:
    >>> from gradtrace.trace import load
    >>> load("runs/exp1").exec_order()[:2]
    ['0', '1']
"""
from __future__ import annotations

from ..errors import TraceWarning
from .format import (FORMAT, FORMAT_VERSION, META_FILE, MISSING, decode_number, decode_vector,
                     is_missing, pack_mask)
from .reader import Layer, Matrix, Trace, load
from .writer import MemoryWriter, Sink, TraceWriter, has_trace, next_run_dir

# The 0.1 private names the detectors import, until they read through the query API.
_decode_vector = decode_vector
_decode_number = decode_number

__all__ = ["FORMAT", "FORMAT_VERSION", "META_FILE", "MISSING", "Layer", "Matrix", "MemoryWriter",
           "Sink", "Trace", "TraceWarning", "TraceWriter", "decode_number", "decode_vector",
           "has_trace", "is_missing", "load", "next_run_dir", "pack_mask"]
