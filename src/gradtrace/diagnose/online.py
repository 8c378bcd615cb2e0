"""Diagnosis while the run trains: a trace sink that runs the detectors as records arrive.

:class:`OnlineDiagnosis` follows the ``Sink`` protocol of :mod:`gradtrace.trace.writer`
(``start(meta)``, ``write(record)``, ``close()``), so the recorder feeds it like any other
output and never imports diagnosis. It keeps the run in memory and calls
:func:`gradtrace.diagnose.diagnose` on it; because every detector judges a step only
against the steps before it, what it reports at step ``s`` is exactly
``diagnose(trace.upto(s))``. Each finding kind is handed to the callback once, when it
first appears.

Cost: the detectors read the whole run so far, so a run of ``n`` recorded steps costs
O(n) per diagnosis. Two limits keep the total bounded: a diagnosis at most every
``every`` records (every record at first, the interval growing to ``every`` over the first
``10 * every`` records, while the trace is short and cheap), and never while the time spent
diagnosing exceeds ``budget`` (a fraction) of the wall time the run has taken since the
sink started. The first non-finite loss is diagnosed at once whatever the budget: that is
the moment a user needs the answer.

A loss record that could complete a ``loss_spike`` finding is diagnosed at once too (within
the budget), so a divergence is not reported up to ``every`` records late. The test is O(1)
per record against state kept as records arrive (:class:`_LossWatch`), and it is a
necessary condition of the loss-spike rule: the record ends ``climb_steps`` rises in a row
(a climb), or it is ``spike_min_fold`` times the median of the trailing
``baseline_window`` finite losses (a spike candidate; the ``spike_persist`` records after
one stay urgent, as the jump may be confirmed by persisting), or ``diverge_fold`` times
the run's first loss (a gross divergence). Healthy noise meets it now and then; each time
costs one diagnosis.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections import deque
from typing import Any, Callable

from ..trace import MemoryWriter
from . import diagnose
from .finding import Finding
from .thresholds import Thresholds

__all__ = ["OnlineDiagnosis", "log_finding"]

_log = logging.getLogger("gradtrace")


def log_finding(finding: Finding) -> None:
    """The default callback: one concise line per new finding, through ``logging``
    (logger ``gradtrace``, level WARNING for warnings, ERROR for errors) and as a
    ``RuntimeWarning`` so it shows without any logging set up.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     log_finding(Finding("loss_spike", "warning", [], 12, 12, {"summary": "loss 9.1 is 4x the median"}))
        >>> str(w[0].message)
        'gradtrace: loss_spike (warning) from step 12: loss 9.1 is 4x the median'
    """
    line = f"gradtrace: {finding.kind} ({finding.severity}) from step {finding.first_step}"
    where = ", ".join(finding.layers[:3])
    if where:
        line += f" in {where}"
    summary = finding.evidence.get("summary")      # typed evidence is a Mapping, not a dict
    if summary:
        line += f": {summary}"
    _log.log(logging.ERROR if finding.severity == "error" else logging.WARNING, line)
    warnings.warn(line, RuntimeWarning, stacklevel=2)


class OnlineDiagnosis:
    """A sink that diagnoses the run as it is recorded and reports each new finding once.

    Args:
        callback: called with each new :class:`Finding` (fixes are not rendered here:
            ``gt.advise([f], trace)`` adds them).
        every: diagnose at most every this many records (``>= 1``).
        budget: fraction of the run's wall time the diagnoses may take (``0 < budget <= 1``).
        thresholds: a :class:`Thresholds`, a dict of overrides or None, checked here and
            passed to :func:`gradtrace.diagnose.diagnose` (the urgent loss test uses them too).

    Attributes:
        findings: every finding reported so far, in the order reported.
        seconds: wall time spent diagnosing; ``runs``: how many diagnoses ran.

    Example:
        >>> import torch, gradtrace as gt
        >>> model = torch.nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> live = OnlineDiagnosis(print, every=1)
        >>> with gt.watch(model, opt, sinks=[live]) as mon:
        ...     loss = model(torch.randn(8, 4)).pow(2).mean(); mon.record_loss(loss)
        ...     opt.zero_grad(); loss.backward(); opt.step()
        >>> live.runs, live.findings
        (1, [])
    """

    def __init__(self, callback: Callable[[Finding], Any], *, every: int = 10, budget: float = 0.05,
                 thresholds: Any = None):
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an int >= 1, got {every!r}")
        if not isinstance(budget, (int, float)) or not 0 < budget <= 1:
            raise ValueError(f"budget must be a fraction in (0, 1], got {budget!r}")
        self.callback, self.every, self.budget = callback, every, budget
        self.thresholds = Thresholds.coerce(thresholds)
        self.findings: list[Finding] = []
        self.seconds = 0.0
        self.runs = 0
        self._writer: MemoryWriter | None = None
        self._since = 0
        self._records = 0
        self._t0 = 0.0
        self._reported: set[str] = set()
        self._loss = _LossWatch(self.thresholds)

    @property
    def trace(self):
        """The run so far, in memory."""
        return None if self._writer is None else self._writer.trace

    def start(self, meta: dict[str, Any]) -> None:
        self._writer = MemoryWriter(meta)
        self._t0 = time.perf_counter()

    def write(self, record: dict[str, Any]) -> None:
        if self._writer is None:
            self.start({})
        self._writer.write(record)
        if "event" in record:
            if record["event"] == "nonfinite":
                self._since = self.every     # diagnose with the next step record
            return
        self._since += 1
        self._records += 1
        # the first non-finite loss is news; the ones after it are not
        first_nonfinite = _nonfinite_loss(record) and "loss_nonfinite" not in self._reported
        suspicious = self._loss.update(record) and "loss_spike" not in self._reported
        urgent = first_nonfinite or suspicious
        # Early in a run the trace is short and cheap to diagnose, and gross early failures
        # happen there: the interval grows from 1 to ``every`` over the first 10 * every records.
        if self._since < min(self.every, 1 + self._records // 10) and not urgent:
            return
        elapsed = time.perf_counter() - self._t0
        if not first_nonfinite and self.seconds > self.budget * elapsed:
            return
        self.check()

    def check(self) -> list[Finding]:
        """Diagnose the run so far now; report and return the findings not seen before."""
        if self._writer is None:
            return []
        self._since = 0
        t = time.perf_counter()
        found = diagnose(self._writer.trace, self.thresholds)
        self.seconds += time.perf_counter() - t
        self.runs += 1
        new = [f for f in found if f.kind not in self._reported]
        for f in new:
            self._reported.add(f.kind)
            self.findings.append(f)
            self.callback(f)
        return new

    def close(self) -> None:
        """A last diagnosis over the complete run (nothing new is missed at the end)."""
        if self._writer is not None and self._since:
            self.check()


class _LossWatch:
    """O(1)-per-record state over the recorded loss: is this record one that could make the
    loss-spike rule (:mod:`gradtrace.diagnose.loss`) fire? A necessary test, not the rule:
    the full diagnosis decides.

    Example:
        >>> w = _LossWatch(Thresholds())
        >>> [w.update({"scalars": {"loss": v}}) for v in (3.0, 3.1, 2.9, 7.0)]
        [False, False, False, True]
    """

    def __init__(self, th: Thresholds):
        self.th = th
        self.first: float | None = None
        self.prev: float | None = None
        self.rises = 0                  # rises in a row ending at the last finite loss
        self.window: deque[float] = deque(maxlen=th.baseline_window)
        self.hot = 0                    # records left that may still confirm a candidate

    def update(self, record: dict[str, Any]) -> bool:
        v = (record.get("scalars") or {}).get("loss")
        if v is None:
            return False
        try:
            v = float(v)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(v):
            return False                # the non-finite trigger handles it
        th = self.th
        self.rises = self.rises + 1 if self.prev is not None and v > self.prev else 0
        self.prev = v
        if self.first is None:
            self.first = v
        # a sort of at most baseline_window numbers: constant work per record
        med = statistics.median(self.window) if len(self.window) >= th.min_baseline else None
        self.window.append(v)
        candidate = med is not None and med > 0 and v >= th.spike_min_fold * med
        self.hot = th.spike_persist + 1 if candidate else max(0, self.hot - 1)
        return (self.rises >= th.climb_steps or self.hot > 0
                or (self.first > 0 and v >= th.diverge_fold * self.first))


def _nonfinite_loss(record: dict[str, Any]) -> bool:
    v = (record.get("scalars") or {}).get("loss")
    if v is None:
        return False
    try:
        return not math.isfinite(float(v))
    except (TypeError, ValueError):
        return True
