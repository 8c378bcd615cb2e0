"""Preflight: Jacobian spectra, mean-field theory and signal checks before the first training step.

Public: :func:`preflight` (findings + per-block summary), :func:`spectrum` /
:class:`Spectrum` (Jacobian singular values per block), :func:`mean_field`,
:func:`default_blocks`. Module layout, one job each:

* ``blocks``      blocks from the model's structure; replaying a block with its real arguments
* ``ad``          Jacobian-vector products with fallbacks, and which estimate was used
* ``spectra``     result types (``BlockSpectrum``, ``Spectrum``)
* ``jacobian``    the spectrum measurement (full SVD or matrix-free Lanczos)
* ``theory``      mean-field χ₁ for plain MLPs
* ``signal``      the forward/backward signal pass
* ``recurrent``   gradients through time
* ``transformer`` branches, attention entropy, post-LN vs pre-LN
* ``checks``      summary → findings with fixes
* ``table``       terminal text
* ``core``        :func:`preflight` itself

(The spectrum code lives in ``jacobian`` rather than ``spectrum`` so that no submodule
shares its name with a function this package exports.)
"""
from .blocks import default_blocks
from .core import PREFLIGHT_FULL_MAX, PREFLIGHT_SPECTRUM, PreflightResult, PreflightThresholds, preflight
from .jacobian import spectrum
from .spectra import END_TO_END, BlockSpectrum, Spectrum
from .theory import mean_field

__all__ = ["preflight", "PreflightResult", "PreflightThresholds", "PREFLIGHT_FULL_MAX", "PREFLIGHT_SPECTRUM",
           "spectrum", "Spectrum", "BlockSpectrum", "END_TO_END", "default_blocks", "mean_field"]
