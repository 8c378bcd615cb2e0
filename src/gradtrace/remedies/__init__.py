"""Remedies for vanishing and exploding gradients.

* :mod:`gradtrace.remedies.clip` -- norm/value clipping, adaptive gradient clipping
  (AGC), AutoClip and ZClip, plus the norm-observer hook a monitor can use to reuse the
  norms a clipper already computed.
* :mod:`gradtrace.remedies.guard` -- :class:`~gradtrace.remedies.guard.Guard`, which
  skips optimizer steps with non-finite gradients or loss/grad-norm spikes.
* :mod:`gradtrace.remedies.init` -- activation-aware initialisation, LSUV and residual
  branch scaling.

Nothing is imported here so that ``import gradtrace.remedies`` stays cheap; import the
submodules (or use the lazy names on :mod:`gradtrace`).
"""
