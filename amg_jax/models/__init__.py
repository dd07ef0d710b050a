"""Denoisers: the contract (``base.Denoiser``) and the models exposed through it.

- ``empirical``: the closed-form optimal denoiser of a finite image set (a perfect memorizer);
- ``mixture``:   the closed-form partial memorizer of a testbed (Gaussians + point masses);
- ``unet`` / ``text`` / ``zoo``: the trained testbed UNets (``checkpoints/``);
- ``stable_diffusion``: diffusers' Flax UNet + VAE + CLIP text encoder as a denoiser on latents
  (diffusers / transformers are imported only when a model is loaded).
"""
from amg_jax.models.base import Denoiser
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.models.mixture import fit_mixture, mixture_denoiser
from amg_jax.models.stable_diffusion import (StableDiffusion, encode_prompts, load_stable_diffusion, sd_denoiser,
                                             sd_sampler_config, write_tiny_sd)

__all__ = ["Denoiser", "StableDiffusion", "empirical_denoiser", "encode_prompts", "fit_mixture",
           "load_stable_diffusion", "mixture_denoiser", "sd_denoiser", "sd_sampler_config", "write_tiny_sd"]
