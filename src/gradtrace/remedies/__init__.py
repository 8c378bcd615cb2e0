"""Remedies for vanishing and exploding gradients; they sit beside the recorder, never import it.

* :mod:`gradtrace.remedies.clip` -- norm and value clipping exactly as torch does it
  (``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm``, ``clip_grads_with_norm_``).
* :mod:`gradtrace.remedies.agc` -- unit-wise adaptive gradient clipping (AGC, NFNets).
* :mod:`gradtrace.remedies.adaptive` -- :class:`AutoClip` and :class:`ZClip`, whose
  threshold follows the run.
* :mod:`gradtrace.remedies.guard` -- :class:`Guard`, which skips optimizer steps with
  non-finite gradients or loss/grad-norm spikes.
* :mod:`gradtrace.remedies.init` -- initialisation for the activation that follows each
  layer; :mod:`gradtrace.remedies.lsuv` -- LSUV; :mod:`gradtrace.remedies.residual` --
  residual-branch scaling (GPT-2, Fixup). Their report rows: ``_report``.

All norms come from :mod:`gradtrace.norms` (the one norm engine), which also lets a
monitor reuse the norms a clipper computed. Nothing is imported here so that
``import gradtrace.remedies`` stays cheap; import the submodules (or use the lazy names
on :mod:`gradtrace`).
"""
