"""The models the bench times: random-weight Stable Diffusion (tiny or SD-1.5-sized), diffusers' Flax
pipeline on the same weights, and the models shared by the parts of one run."""
from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.jax_utils import replicate

from amg_jax.apps.bench.config import PROMPT_WORDS, Settings
from amg_jax.apps.models import get_model
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds
from amg_jax.schedules import Schedule

def sd15_configs(vocab_size: int) -> dict:
    """Configs of an SD-1.5-sized model: diffusers' default UNet2DConditionModel (block_out_channels
    (320, 640, 1280, 1280), 2 layers per block, 8 heads) with cross_attention_dim 768 and 64x64
    latents (859.5M parameters, as SD 1.5's), SD's VAE (128, 256, 512, 512; 83.7M), a CLIP-L-sized
    text encoder (768 wide, 12 layers; its vocabulary is the tiny tokenizer's, not CLIP's 49408)."""
    unet = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512),
               layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512)
    text = dict(vocab_size=vocab_size, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
    return {"unet": unet, "vae": vae, "text_encoder": text}


def random_sd(workdir: str, configs: dict | None = None, *, seed: int = 0, dtype: str = "float32",
              source: str = "random SD-1.5-sized"):
    """A random-weight ``StableDiffusion`` built in memory from ``configs`` ({"unet", "vae",
    "text_encoder"}: keyword arguments of diffusers' Flax UNet / VAE and transformers'
    CLIPTextConfig; default ``sd15_configs``), with ``write_tiny_tokenizer``'s tokenizer (written
    into ``workdir``) and SD v1's scheduler. Nothing goes through disk but the tokenizer, so an
    SD-1.5-sized model (1B parameters) is built in seconds."""
    if dtype not in sdm.DTYPES:
        raise ValueError(f"random_sd: dtype must be one of {list(sdm.DTYPES)}, got {dtype!r}")
    jdt = sdm.DTYPES[dtype]
    tok = sdm.write_tiny_tokenizer(os.path.join(workdir, "tokenizer"))
    vocab = tok.get_vocab()
    configs = sd15_configs(len(vocab)) if configs is None else configs
    text_cfg = dict(configs["text_encoder"], vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                    eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    rng = np.random.default_rng(seed)
    with sdm.quiet_libraries():
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # heavy / optional
        from transformers import CLIPTextConfig, FlaxCLIPTextModel  # heavy / optional

        unet = FlaxUNet2DConditionModel(**configs["unet"], dtype=jdt)
        vae = FlaxAutoencoderKL(**configs["vae"], dtype=jdt)
        text = FlaxCLIPTextModel(CLIPTextConfig(**text_cfg), dtype=jdt, _do_init=False)
        unet_params = sdm.random_params(unet.init_weights, rng)
        vae_params = sdm.random_params(vae.init_weights, rng)
        text_params = sdm.random_params(lambda k: text.init_weights(k, (1, 77)), rng)
    cast = functools.partial(jax.tree.map, lambda p: p.astype(jdt) if jnp.issubdtype(p.dtype, jnp.floating) else p)
    unet_params, vae_params, text_params = cast(unet_params), cast(vae_params), cast(text_params)
    sched = dict(sdm.SD_V1_SCHEDULER)
    schedule = Schedule(beta_schedule=sched["beta_schedule"], num_train_timesteps=sched["num_train_timesteps"],
                        beta_start=sched["beta_start"], beta_end=sched["beta_end"])
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    sd = sdm.StableDiffusion(
        unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text,
        text_params=text_params, tokenizer=tok, schedule=schedule, scheduler_config=sched,
        prediction_type="epsilon", vae_scaling_factor=float(vae.config.scaling_factor),
        latent_channels=int(vae.config.latent_channels), vae_factor=vae_factor,
        image_size=int(unet.config.sample_size) * vae_factor,
        null_embedding=jnp.zeros((77, text_cfg["hidden_size"]), jnp.float32),
        eps_fn=sdm.UNetEps(unet, "epsilon", schedule, dtype), dtype=dtype, source=source)
    return dataclasses.replace(sd, null_embedding=sdm.encode_prompts(sd, [""])[0])


def build_sd(s: Settings, workdir: str):
    """The bench's Stable Diffusion: ``s.sd_path``, else the tiny one (``write_tiny_sd`` into
    ``workdir``) or the random SD-1.5-sized one."""
    if s.sd_path is not None:
        return sdm.load_stable_diffusion(s.sd_path)
    if s.sd_size == "tiny":
        return sdm.load_stable_diffusion(sdm.write_tiny_sd(os.path.join(workdir, "tiny-sd"), seed=s.seed))
    return random_sd(workdir, seed=s.seed)


def diffusers_pipeline(sd, device=None):
    """diffusers' ``FlaxStableDiffusionPipeline`` over ``sd``'s modules (no safety checker) with a
    ``FlaxDDIMScheduler`` from ``sd.scheduler_config``, and its params replicated onto ``device``
    (default the first) with ``flax.jax_utils.replicate``, as its documented ``pmap`` path wants.
    Returns ``(pipeline, replicated params)``."""

    with sdm.quiet_libraries():
        from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline  # heavy / optional

        keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample",
                "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type"}
        sched = FlaxDDIMScheduler(**{k: v for k, v in sd.scheduler_config.items() if k in keep})
        pipe = FlaxStableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer,
                                           unet=sd.unet, scheduler=sched, safety_checker=None,
                                           feature_extractor=None, dtype=sd.compute_dtype)
        params = {"unet": sd.unet_params, "vae": sd.vae_params, "text_encoder": sd.text_params,
                  "scheduler": sched.create_state()}
    device = jax.devices()[0] if device is None else device
    return pipe, replicate(params, devices=[device])


class _Shared:
    """Models shared by the parts of one run, built on first use (``sd``: a caller's model)."""

    def __init__(self, s: Settings, workdir: str, echo, sd=None):
        self.s, self.workdir, self.echo, self.given_sd = s, workdir, echo, sd

    @functools.cached_property
    def sd(self):
        t0 = time.perf_counter()
        sd = self.given_sd if self.given_sd is not None else build_sd(self.s, self.workdir)
        n = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(sd.unet_params))
        self.echo(f"[bench] Stable Diffusion: {self.sd_label(sd)}, UNet {n / 1e6:.1f}M params, "
                  f"{sd.image_size}px ({time.perf_counter() - t0:.1f} s to build)")
        return sd

    def sd_label(self, sd=None) -> str:
        if self.given_sd is not None:
            return f"SD given by the caller ({self.given_sd.source or 'in memory'})"
        if self.s.sd_path is not None:
            return f"SD from {self.s.sd_path}"
        return "tiny random SD (write_tiny_sd)" if self.s.sd_size == "tiny" else "random SD-1.5-sized"

    @functools.cached_property
    def den(self):
        return sdm.sd_denoiser(self.sd)

    def prompts(self, n: int) -> list:
        return [PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n)]

    def keys(self, n: int):
        return keys_from_seeds(self.s.seed + np.arange(n))

    @functools.cached_property
    def unet_text(self):
        return get_model("unet-text").load()


# ----------------------------------------------------------------------------- rows


def _rate_row(name: str, t: dict, images: int, **extra) -> dict:
    sec = t["seconds"]
    return dict(name=name, seconds=sec, s_per_image=sec / images, images_per_s=images / sec,
                compile_s=t["compile_s"], first_call_s=t["first_call_s"], spread=t["spread"], **extra)


def _gate_stats(trace: dict) -> dict:
    if "gate" not in trace:
        return {}
    g = np.asarray(trace["gate"])                    # [B, steps]
    return {"gate_open": float(g.mean()), "steps_any_open": float(g.any(axis=0).mean())}


# ----------------------------------------------------------------------------- part: pipeline
