"""Denoisers: the contract (``base.Denoiser``) and the models exposed through it.

- ``empirical``: the closed-form optimal denoiser of a finite image set (a perfect memorizer);
- ``mixture``:   the closed-form partial memorizer of a testbed (Gaussians + point masses);
- ``unet`` / ``text`` / ``zoo``: the trained testbed UNets (``checkpoints/``);
- ``stable_diffusion``: SD / SDXL folders as a denoiser on latents, over amg_jax's own Flax UNet
  (``sd_unet``), VAE (``sd_vae``) and CLIP text encoders (``clip_text``); ``clip_model`` is the full CLIP
  the CLIP detector runs (transformers stays for configs and tokenizers, diffusers for scheduler configs).
"""
from amg_jax.models.base import Denoiser
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.models.mixture import fit_mixture, mixture_denoiser
from amg_jax.models.sd_tiny import write_tiny_sd
from amg_jax.models.stable_diffusion import (StableDiffusion, encode_prompts, load_stable_diffusion, sd_denoiser,
                                             sd_sampler_config)

__all__ = ["Denoiser", "StableDiffusion", "empirical_denoiser", "encode_prompts", "fit_mixture",
           "load_stable_diffusion", "mixture_denoiser", "sd_denoiser", "sd_sampler_config", "write_tiny_sd"]
