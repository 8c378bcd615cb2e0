"""Old import path of :mod:`gradtrace.record.distributed` (kept for ``remedies.clip``)."""
from .record.distributed import *  # noqa: F401,F403
from .record.distributed import DistReducer, attach, is_active, is_dtensor, local, rank, unwrap  # noqa: F401
