"""The public calls that compose the one-way layers: watch (+ live diagnosis), diagnose (+ advice).

``record`` never imports ``diagnose`` and ``diagnose`` never imports ``advise``; the user
still gets one call for each job, because the composition happens here, at the top.
"""
from __future__ import annotations

from typing import Any, Callable


def diagnose(trace: Any, thresholds: Any = None) -> list:
    """Find what went wrong in a recorded run, root cause first, each finding with fixes.

    :func:`gradtrace.diagnose.diagnose` (the findings) followed by
    :func:`gradtrace.advise.advise` (the checklist fixes rendered for this run).
    ``gt.diagnose(trace.upto(step))`` is what a live run said at ``step``.

    Args:
        trace: a :class:`~gradtrace.trace.Trace` (``gt.load(path)`` or ``mon.trace``).
        thresholds: a :class:`~gradtrace.Thresholds`, a dict of overrides or ``None``.

    Example:
        >>> import gradtrace as gt
        >>> gt.diagnose(gt.load("runs/exp1"))
        []
    """
    from .advise import advise
    from .diagnose import diagnose as find

    return advise(find(trace, thresholds), trace)


def watch(model: Any, optimizer: Any = None, *, on_finding: Callable | bool | None = None,
          diagnose_every: int | None = None, **kwargs: Any):
    """:func:`gradtrace.record.watch`, plus diagnosis while the run trains.

    Args:
        model, optimizer, kwargs: as for the recorder's ``watch`` (``out``, ``every``,
            ``activations_every``, ``sinks`` ...).
        on_finding: ``None`` (default) diagnoses nothing live; ``True`` logs one concise
            line per new finding (``logging`` logger ``gradtrace``, plus a
            ``RuntimeWarning``); a callable receives each new :class:`~gradtrace.Finding`
            once, in the training process.
        diagnose_every: run the detectors every N recorded steps (default: every
            ``activations_every`` steps, at least every 10, and at once on a non-finite
            value); see :class:`gradtrace.diagnose.online.OnlineDiagnosis`.

    Example:
        >>> import torch, gradtrace as gt
        >>> model = torch.nn.Linear(4, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> seen = []
        >>> with gt.watch(model, opt, on_finding=seen.append) as mon:
        ...     for _ in range(3):
        ...         loss = model(torch.randn(8, 4)).pow(2).mean(); mon.record_loss(loss)
        ...         opt.zero_grad(); loss.backward(); opt.step()
        >>> seen
        []
    """
    from .record import watch as record_watch

    kwargs["clip"] = _clipper(kwargs.get("clip"))
    if on_finding is None or on_finding is False:
        return record_watch(model, optimizer, **kwargs)
    from .diagnose.online import OnlineDiagnosis, log_finding

    callback = log_finding if on_finding is True else on_finding
    if not callable(callback):
        raise TypeError(f"on_finding must be a callable, True (log each finding) or None, "
                        f"got {type(on_finding).__name__}")
    every = diagnose_every if diagnose_every is not None else max(1, min(10, kwargs.get("activations_every", 10) or 10))
    sink = OnlineDiagnosis(callback, every=every)
    sinks = list(kwargs.pop("sinks", None) or [])
    return record_watch(model, optimizer, sinks=sinks + [sink], **kwargs)


def _clipper(clip: Any) -> Any:
    """``watch(clip=1.0)``: a max norm becomes gradtrace's ``clip_grad_norm_`` at that norm."""
    if isinstance(clip, (int, float)) and not isinstance(clip, bool):
        if not clip > 0:
            raise ValueError(f"clip={clip!r}: a max norm must be > 0 (or pass None for no clipping)")
        from .remedies.clip import clip_grad_norm_

        return lambda params: clip_grad_norm_(params, max_norm=float(clip))
    return clip
