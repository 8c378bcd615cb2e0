"""Device-to-host copies that never wait: a flat buffer lands in pinned memory behind an event.

:meth:`HostCopies.start` copies a 1-D float64 device tensor into a reused host buffer
(pinned on an accelerator) with ``non_blocking=True`` and records an event after it. The
caller keeps the returned :class:`Copy` and reads ``copy.values`` (a numpy view made once
per buffer, so reading it converts no tensor) only once :meth:`Copy.ready` is true, which
asks ``event.query()`` and never blocks. On CPU nothing is copied: the flat tensor is
already in host memory, and the caller made it fresh for the copy (a ``cat``), so its
own numpy view is the record's values. :meth:`Copy.wait` blocks; the monitor calls it only from ``close()`` and when
``raise_on_nonfinite=True`` asked for it.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


class Copy:
    """One copy in flight: its host values and the event that says they have landed.

    Example:
        >>> pool = HostCopies()
        >>> c = pool.start(torch.arange(3, dtype=torch.float64))
        >>> c.ready(), c.values.tolist()
        (True, [0.0, 1.0, 2.0])
        >>> pool.release(c)
    """

    __slots__ = ("host", "values", "event", "key")

    def __init__(self, host: torch.Tensor, values: np.ndarray, event: Any, key: tuple):
        self.host, self.values, self.event, self.key = host, values, event, key

    def ready(self) -> bool:
        """True once the values have landed (never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> None:
        """Block until the values have landed (``close()`` and ``raise_on_nonfinite`` only)."""
        if self.event is not None:
            self.event.synchronize()


class HostCopies:
    """A pool of pinned host buffers, reused by size, so a recorded step allocates nothing
    on the host (a CPU run's flat buffers are used as they are).

    Example:
        >>> pool = HostCopies()
        >>> a = pool.start(torch.ones(2, dtype=torch.float64))   # on the CPU: its own values
        >>> a.values.tolist(), a.ready()
        ([1.0, 1.0], True)
        >>> pool.release(a)
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, str], list[tuple[torch.Tensor, np.ndarray]]] = {}

    def start(self, flat: torch.Tensor) -> Copy:
        """Start copying ``flat`` (1-D float64) to the host; returns at once."""
        dev = flat.device
        if dev.type == "cpu":
            flat = flat.detach()
            return Copy(flat, flat.numpy(), None, None)
        n = flat.numel()
        key = (n, dev.type)
        free = self._free.setdefault(key, [])
        if free:
            host, values = free.pop()
        else:
            host = torch.empty(n, dtype=torch.float64, pin_memory=torch.cuda.is_available())
            values = host.numpy()        # one view per buffer, made once
        host.copy_(flat, non_blocking=True)
        event = _event(dev)
        if event is None:                # a device without events: the copy must block
            host.copy_(flat)
        return Copy(host, values, event, key)

    def release(self, copy: Copy) -> None:
        """Give a buffer whose values have been read back for reuse."""
        if copy.key is not None:
            self._free.setdefault(copy.key, []).append((copy.host, copy.values))


def _event(device: torch.device) -> Any:
    mod = getattr(torch, device.type, None)
    make = getattr(mod, "Event", None) if mod is not None else None
    if make is None:
        return None
    ev = make()
    ev.record()
    return ev
