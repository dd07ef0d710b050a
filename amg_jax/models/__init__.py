"""Denoisers: the contract (``base.Denoiser``) and the models exposed through it.

- ``empirical``: the closed-form optimal denoiser of a finite image set (a perfect memorizer);
- ``mixture``:   the closed-form partial memorizer of a testbed (Gaussians + point masses).
"""
from amg_jax.models.base import Denoiser
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.models.mixture import fit_mixture, mixture_denoiser

__all__ = ["Denoiser", "empirical_denoiser", "fit_mixture", "mixture_denoiser"]
