"""The models the bench times: random-weight Stable Diffusion (tiny or SD-1.5-sized), diffusers' Flax
pipeline on the same weights, and the models shared by the parts of one run."""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax.jax_utils import replicate

from amg_jax.apps.bench.config import PROMPT_WORDS, Settings
from amg_jax.apps.models import get_model
from amg_jax.models import sd_tiny
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


def sdxl_configs(vocab_size: int) -> dict:
    """Configs of an SDXL-base-sized model (stabilityai/stable-diffusion-xl-base-1.0's config.json
    values): UNet (320, 640, 1280), transformer layers (1, 2, 10), 2048-wide cross-attention, the
    ``text_time`` conditioning, 128x128 latents (2.57B parameters); SD's VAE (scaling 0.13025); CLIP-L
    (768, 12 layers) and OpenCLIP-bigG (1280, 32 layers, projection 1280) text encoders, on the tiny
    tokenizer's vocabulary."""
    unet = dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), layers_per_block=2,
                attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816)
    base = sd15_configs(vocab_size)
    vae = dict(base["vae"], sample_size=1024, scaling_factor=0.13025)
    text2 = dict(vocab_size=vocab_size, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
    return {"unet": unet, "vae": vae, "text_encoder": base["text_encoder"], "text_encoder_2": text2}


def random_sd(workdir: str, configs: dict | None = None, *, seed: int = 0, dtype: str = "float32",
              source: str = "random SD-1.5-sized", attention: str = "auto"):
    """A random-weight ``StableDiffusion`` built in memory from ``configs`` ({"unet", "vae",
    "text_encoder"[, "text_encoder_2"]}: diffusers / transformers config.json keys; default
    ``sd15_configs``; with "text_encoder_2" an SDXL), with ``write_tiny_tokenizer``'s tokenizer
    (written into ``workdir``) and SD v1's (SDXL's) scheduler. Nothing goes through disk but the
    tokenizer, so an SD-1.5-sized model (1B parameters) is built in seconds."""
    if dtype not in sdm.DTYPES:
        raise ValueError(f"random_sd: dtype must be one of {list(sdm.DTYPES)}, got {dtype!r}")
    tok = sd_tiny.write_tiny_tokenizer(os.path.join(workdir, "tokenizer"))
    vocab = tok.get_vocab()
    configs = sd15_configs(len(vocab)) if configs is None else configs
    xl = "text_encoder_2" in configs
    configs = dict(configs)
    for c in ("text_encoder", "text_encoder_2"):
        if c in configs:
            configs[c] = dict(configs[c], vocab_size=len(vocab), bos_token_id=vocab["<|startoftext|>"],
                              eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
    params = sd_tiny.random_sd_params(configs, np.random.default_rng(seed))
    mods = sd_tiny.module_inits(configs)
    sched = dict(sd_tiny.SDXL_SCHEDULER if xl else sd_tiny.SD_V1_SCHEDULER)
    schedule = Schedule(beta_schedule=sched["beta_schedule"], num_train_timesteps=sched["num_train_timesteps"],
                        beta_start=sched["beta_start"], beta_end=sched["beta_end"])
    unet, vae = mods["unet"][0], mods["vae"][0]
    f = vae.config.factor
    pooled = mods["text_encoder_2"][0].config.projection_dim if xl else 0
    size = unet.config.sample_size * f
    sd = sdm.StableDiffusion(
        unet=unet, unet_params=params["unet"], vae=vae, vae_params=params["vae"], text_encoder=mods["text_encoder"][0],
        text_params=params["text_encoder"], tokenizer=tok, schedule=schedule, scheduler_config=sched,
        prediction_type="epsilon", vae_scaling_factor=vae.config.scaling_factor,
        latent_channels=vae.config.latent_channels, vae_factor=f, image_size=size,
        null_embedding=jnp.zeros((77 + bool(xl), unet.config.cross_attention_dim), jnp.float32),
        eps_fn=sdm.UNetEps(unet, "epsilon", schedule, "float32", pooled_dim=pooled,
                           time_ids=(size, size, 0, 0, size, size) if xl else ()),
        source=source, text_encoder_2=mods["text_encoder_2"][0] if xl else None,
        text_params_2=params.get("text_encoder_2"), tokenizer_2=tok if xl else None,
        configs={c: configs[c] for c in configs})
    if not xl:
        sd = dataclasses.replace(sd, null_embedding=sdm.encode_prompts(sd, [""])[0])
    return sd if dtype == "float32" and attention == "auto" else sdm.with_settings(sd, dtype=dtype, attention=attention)


def build_sd(s: Settings, workdir: str):
    """The bench's Stable Diffusion: ``s.sd_path``, else the tiny one (``write_tiny_sd`` into ``workdir``,
    PyTorch weights where torch is installed, so diffusers' PyTorch pipeline can load the same model) or a
    random SD-1.5- / SDXL-sized one, in ``s.dtype`` with ``s.attention``."""
    if s.sd_path is not None:
        return sdm.load_stable_diffusion(s.sd_path, dtype=s.dtype, attention=s.attention)
    if s.sd_size == "tiny":
        fw = "pt" if importlib.util.find_spec("torch") is not None else "flax"
        path = sd_tiny.write_tiny_sd(os.path.join(workdir, "tiny-sd"), seed=s.seed, framework=fw)
        return sdm.load_stable_diffusion(path, dtype=s.dtype, attention=s.attention)
    if s.sd_size == "xl":
        vocab = len(sd_tiny.write_tiny_tokenizer(os.path.join(workdir, "tokenizer")).get_vocab())
        return random_sd(workdir, sdxl_configs(vocab), seed=s.seed, dtype=s.dtype, attention=s.attention,
                         source="random SDXL-sized")
    return random_sd(workdir, seed=s.seed, dtype=s.dtype, attention=s.attention)


def diffusers_pipeline(sd, device=None):
    """diffusers' ``FlaxStableDiffusionPipeline`` (the reference users run instead: its own Flax UNet,
    VAE and transformers' Flax CLIP, built ``from_config`` the configs of ``sd``) on ``sd``'s params (the
    trees are the same), no safety checker, a ``FlaxDDIMScheduler`` from ``sd.scheduler_config``; its
    params replicated onto ``device`` (default the first) with ``flax.jax_utils.replicate``, as its
    documented ``pmap`` path wants. Returns ``(pipeline, replicated params)``. SD 1.x / 2.x only."""
    if sd.is_sdxl:
        raise ValueError("diffusers_pipeline: the Flax reference is FlaxStableDiffusionPipeline, SD 1.x / 2.x only")
    import diffusers    # the reference pipeline (imported here only: it loads transformers' Flax modules)

    with sdm.quiet_libraries():
        from diffusers import FlaxAutoencoderKL, FlaxDDIMScheduler, FlaxStableDiffusionPipeline, FlaxUNet2DConditionModel
        from transformers import CLIPTextConfig, FlaxCLIPTextModel

        del diffusers
        keep = {"num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "clip_sample",
                "clip_sample_range", "set_alpha_to_one", "steps_offset", "prediction_type"}
        sched = FlaxDDIMScheduler(**{k: v for k, v in sd.scheduler_config.items() if k in keep})
        dt = sd.compute_dtype
        unet = FlaxUNet2DConditionModel.from_config(sd.configs["unet"], dtype=dt)
        vae = FlaxAutoencoderKL.from_config(sd.configs["vae"], dtype=dt)
        text_cfg = {k: v for k, v in sd.configs["text_encoder"].items() if not k.startswith("_")}
        text = FlaxCLIPTextModel(CLIPTextConfig(**text_cfg), dtype=dt, _do_init=False)
        pipe = FlaxStableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=sd.tokenizer, unet=unet,
                                           scheduler=sched, safety_checker=None, feature_extractor=None, dtype=dt)
        params = {"unet": sd.unet_params, "vae": sd.vae_params, "text_encoder": sd.text_params,
                  "scheduler": sched.create_state()}
    device = jax.devices()[0] if device is None else device
    return pipe, replicate(params, devices=[device])


def torch_pipeline(sd):
    """diffusers' PyTorch ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (what the basin paper's
    official code runs) from ``sd.source`` with ``DDIMScheduler.from_config``, in float32 on the CPU; None
    when torch is not installed or ``sd.source`` is not a folder with PyTorch weights."""
    if importlib.util.find_spec("torch") is None or not os.path.isdir(sd.source or ""):
        return None
    try:
        if sdm.check_layout(sd.source, True) is not True:
            return None
    except (FileNotFoundError, ValueError):
        return None
    with sdm.quiet_libraries():
        from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

        if sd.is_sdxl:
            pipe = StableDiffusionXLPipeline.from_pretrained(sd.source)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(sd.source, safety_checker=None,
                                                           requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


class _Shared:
    """Models shared by the parts of one run, built on first use (``sd``: a caller's model)."""

    def __init__(self, s: Settings, workdir: str, echo, sd=None):
        self.s, self.workdir, self.echo, self.given_sd = s, workdir, echo, sd
        self.rows_done: list = []      # the running part's rows so far (``record``)
        self.on_row = None             # the runner's callback: rewrite the files with them

    def record(self, row: dict) -> dict:
        """Keep ``row`` of the running part and have the runner write it out at once, so a part
        stopped midway (a ``timeout``, an error) keeps the rows it finished."""
        self.rows_done.append(row)
        if self.on_row is not None:
            self.on_row()
        return row

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
