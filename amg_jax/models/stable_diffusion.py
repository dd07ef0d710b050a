"""Stable Diffusion 1.x / 2.x and SDXL as one ``Denoiser``, on amg_jax's own Flax modules.

- ``load_stable_diffusion(path_or_hub_id, dtype=..., attention=...)``: a diffusers pipeline folder
  (``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``, Flax or PyTorch class names) or a hub
  id (downloaded with ``huggingface_hub``) -> a frozen ``StableDiffusion`` bundle. The networks are
  ``sd_unet.UNet2DCondition``, ``sd_vae.AutoencoderKL`` and ``clip_text.ClipTextEncoder`` (SDXL: two);
  their weights are read as published: PyTorch ``.safetensors`` (read directly, no torch; sharded
  and ``.fp16`` variants too), ``.bin`` (torch) or Flax ``.msgpack`` (``sd_weights``). No diffusers or
  transformers Flax model class is imported: those libraries give the tokenizer and, in the tests,
  the parity oracles. The layout, every config and every weight's shape are checked before any model
  runs; errors name the file and the field.
- ``encode_prompts(sd, prompts)``: the UNet's condition exactly as diffusers' pipelines compute it.
  SD 1.x / 2.x: the text encoder's last hidden state [B, 77, D]. SDXL: both encoders' penultimate
  hidden states concatenated [B, 77, D1 + D2], plus one row holding the second encoder's pooled
  projection (zero-padded): [B, 78, D1 + D2], so every method that mixes or perturbs conditions
  treats SDXL's pooled embedding as part of the text condition. ``sd.null_embedding`` is the empty
  prompt's (SDXL with ``force_zeros_for_empty_prompt``: zeros, as its pipeline does).
- ``sd_denoiser(sd, height, width) -> Denoiser`` on latents [B, h/8, w/8, 4] (NHWC throughout).
  v-prediction models are converted to eps with the schedule; SDXL's micro-conditioning (original
  size, crop (0, 0), target size) is the run's image size. ``decode``: latents -> pixels in [-1, 1].
  Two loads of one model give equal denoisers (``UNetEps`` and ``VAEDecode`` are values).
- ``sd_sampler_config(sd, num_steps, name)``: the ``SamplerConfig`` that diffusers' class for ``name``
  (DDIM / DDPM / DPMSolverMultistepScheduler) builds ``from_config`` the model's scheduler_config.json.
- ``sd_tiny.write_tiny_sd(directory, seed, framework, variant)``: a tiny random-weight SD 1.x / 2.x
  (v-prediction) / SDXL in diffusers' layout, with PyTorch (``.safetensors``) or Flax (``.msgpack``) weights.

dtype: params and the networks' computation in float32 / bfloat16 / float16; the sampler state, eps
and the decoded pixels are float32. attention: ``attention.ATTENTION_IMPLEMENTATIONS`` ("auto": cuDNN's
fused kernel on NVIDIA GPUs for 16-bit models, XLA elsewhere).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import re
import sys
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.models.attention import check_attention
from amg_jax.models.base import Denoiser
from amg_jax.models.clip_text import ClipTextConfig, ClipTextEncoder
from amg_jax.models.sd_unet import UNet2DCondition, UNetConfig
from amg_jax.models.sd_vae import AutoencoderKL, VAEConfig
from amg_jax.models.sd_weights import expected_tree, read_state, to_params, weight_files
from amg_jax.samplers import DDPM_VARIANCE_TYPES, FINAL_SIGMAS_TYPES, SamplerConfig
from amg_jax.schedules import SPACINGS, Schedule

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# model_index.json _class_name -> the kind of pipeline
PIPELINES = {"StableDiffusionPipeline": "sd", "FlaxStableDiffusionPipeline": "sd",
             "StableDiffusionXLPipeline": "sdxl", "FlaxStableDiffusionXLPipeline": "sdxl"}
PIPELINE_CLASSES = tuple(PIPELINES)
PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
KIND_COMPONENTS = {"sd": COMPONENTS, "sdxl": COMPONENTS + ("text_encoder_2", "tokenizer_2")}
CONFIG_FILES = {"unet": ("config.json",), "vae": ("config.json",), "text_encoder": ("config.json",),
                "text_encoder_2": ("config.json",), "tokenizer": ("vocab.json", "merges.txt"),
                "tokenizer_2": ("vocab.json", "merges.txt"), "scheduler": ("scheduler_config.json",)}
FLAX_WEIGHTS = {"unet": ("diffusion_flax_model.msgpack",), "vae": ("diffusion_flax_model.msgpack",),
                "text_encoder": ("flax_model.msgpack",), "text_encoder_2": ("flax_model.msgpack",)}
PT_WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
              "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
              "text_encoder": ("model.safetensors", "pytorch_model.bin"),
              "text_encoder_2": ("model.safetensors", "pytorch_model.bin")}
# today's PyTorch VAE files name the mid block's attention as diffusers' Attention does; the Flax tree
# keeps the names of the older files (and of diffusers' Flax VAE)
VAE_ALIASES = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out_0": "proj_attn"}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- quiet libraries


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers' / transformers' "Flax classes are deprecated" messages: their loggers are
    set to errors only (and left so: diffusers' Flax attention modules, which the bench's reference
    pipeline uses, log it each time they are traced), and Future / Deprecation warnings are ignored
    inside the block. diffusers is not imported here (``import diffusers`` alone loads transformers'
    Flax modules): its logger is set through ``logging`` unless a caller has imported it."""
    import transformers    # heavy: the tokenizers (and the test oracles)

    transformers.utils.logging.set_verbosity_error()
    if "diffusers" in sys.modules:
        sys.modules["diffusers"].utils.logging.set_verbosity_error()
    else:
        logging.getLogger("diffusers").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Ff]lax.*deprecated.*")
        yield



# ----------------------------------------------------------------------------- the bundle


def _config_key(model) -> str:
    """A module's architecture as a string (type, config, dtype, attention): equal for two loads of one
    model, so they share compiled functions."""
    remat = ", remat_blocks" if getattr(model, "remat_blocks", False) else ""
    return f"{type(model).__name__}({model.config!r}, {jnp.dtype(model.dtype).name}, {model.attention}{remat})"


@dataclasses.dataclass(frozen=True)
class UNetEps:
    """The denoiser contract on SD latents (a callable, hashable by value: two loads of one model
    share compiled functions): ``(params, x_t [B, h, w, C], t [B] int32, cond) -> eps`` in x_t's dtype.

    cond: [B, L, D] text embeddings; SDXL (``pooled_dim`` > 0): [B, L + 1, D], the last row's first
    ``pooled_dim`` entries the pooled text embedding, and ``time_ids`` the micro-conditioning
    (original h, w, crop top, left, target h, w). The UNet runs in ``dtype``; v-prediction is
    converted to eps."""

    unet: Any = dataclasses.field(compare=False)
    prediction_type: str
    schedule: Schedule
    dtype: str = "float32"
    time_ids: tuple = ()
    pooled_dim: int = 0
    config_key: str = ""

    def __post_init__(self):
        object.__setattr__(self, "config_key", _config_key(self.unet))

    def __call__(self, params, x_t: Array, t: Array, cond: Array) -> Array:
        dt = DTYPES[self.dtype]
        cond, added = jnp.asarray(cond), None
        if self.pooled_dim:
            cond, pooled = cond[:, :-1], cond[:, -1, :self.pooled_dim]
            ids = jnp.broadcast_to(jnp.asarray(self.time_ids, jnp.float32), (x_t.shape[0], len(self.time_ids)))
            added = (pooled.astype(dt), ids)
        out = self.unet.apply({"params": params}, x_t.astype(dt), jnp.asarray(t, jnp.int32), cond.astype(dt),
                              added).astype(x_t.dtype)
        if self.prediction_type == "epsilon":
            return out
        ab = jnp.take(jnp.asarray(self.schedule.alphas_cumprod(), x_t.dtype), jnp.asarray(t, jnp.int32))
        ab = ab.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(ab) * out + jnp.sqrt(1.0 - ab) * x_t


@dataclasses.dataclass(frozen=True)
class _Static:
    """A model as a jit static argument, equal by its key (the params are not part of it)."""

    key: tuple
    model: Any = dataclasses.field(compare=False)


@dataclasses.dataclass(frozen=True)
class VAEDecode:
    """``StableDiffusion.decode`` as a value, for a ``Denoiser``'s static ``decode`` field: latents
    [B, h, w, C] -> pixels [B, h*f, w*f, 3] float32 in [-1, 1]. Equal (and equally hashed) by (VAE config,
    scaling factor, dtype, weights id), so two loads of one model share every compiled loop that takes the
    denoiser; the params are not compared: the weights id stands for them (a bound ``sd.decode`` is new
    per load and would make jit recompile)."""

    static: _Static
    weights: tuple
    params: Any = dataclasses.field(compare=False, repr=False)

    def __call__(self, latents: Array) -> Array:
        return _vae_decode(self.static, self.params, _onto_params_device(latents, self.params))


_BUNDLE_IDS = itertools.count()


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """A loaded Stable Diffusion (hashable by identity).

    unet / vae / text_encoder (/ text_encoder_2, SDXL): amg_jax's ``UNet2DCondition``,
    ``AutoencoderKL`` and ``ClipTextEncoder`` modules (built with ``dtype`` and ``attention``);
    *_params: their params, in ``dtype``; tokenizer (/ tokenizer_2): CLIPTokenizer; schedule: the
    training noise schedule; scheduler_config: scheduler_config.json (a dict; read only);
    prediction_type: "epsilon" | "v_prediction"; vae_scaling_factor: latents = VAE latents * this;
    latent_channels: C of the latents; vae_factor: pixels per latent (8); image_size: default pixel
    size (unet sample_size * vae_factor); null_embedding: the empty prompt's condition [L(+1), D]
    float32; eps_fn: the ``UNetEps`` denoiser function; dtype: "float32" | "bfloat16" | "float16";
    source: where it was loaded from; vae_weights_id: what ``vae_params`` were loaded from (the weights
    file's real path, size and mtime, set by ``load_stable_diffusion``): two bundles with the same one
    have equal ``vae_decoder``s. Empty (a bundle built in memory): the decoder is this bundle's own.
    ``dataclasses.replace`` with other ``vae_params`` must reset it. configs: the components'
    config.json dicts as read (for tools that rebuild the model elsewhere, e.g. the bench's reference
    pipelines); attention: the attention implementation.
    """

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: Schedule
    scheduler_config: dict
    prediction_type: str
    vae_scaling_factor: float
    latent_channels: int
    vae_factor: int
    image_size: int
    null_embedding: Array
    eps_fn: UNetEps
    dtype: str = "float32"
    source: str = ""
    vae_weights_id: tuple = ()
    text_encoder_2: Any = None
    text_params_2: Any = None
    tokenizer_2: Any = None
    configs: dict = dataclasses.field(default_factory=dict)
    attention: str = "auto"

    @property
    def is_sdxl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def vae_dtype(self) -> str:
        """The VAE's dtype name: ``dtype``'s, except float32 for a float16 model whose VAE config sets
        ``force_upcast`` (``vae_dtype_name``)."""
        return jnp.dtype(self.vae.dtype).name

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: the VAE factor times the UNet's downsampling (its
        nearest-neighbour upsampling doubles, so odd latent sizes cannot come back up)."""
        return self.vae_factor * self.unet.config.downsampling

    def decode(self, latents: Array) -> Array:
        """latents [B, h, w, C] -> pixels [B, h*f, w*f, 3] float32, clipped to [-1, 1] (as the pipeline
        clips its [0, 1] images): the VAE decoder applied to latents / scaling_factor. Latents
        sharded over several devices (``sample_sharded``'s output) are gathered onto the device
        that holds the VAE params first."""
        return self.vae_decoder(latents)

    @functools.cached_property
    def vae_decoder(self) -> VAEDecode:
        """``decode`` as a hashable value (``sd_denoiser``'s ``decode``): equal for two loads of one model."""
        weights = self.vae_weights_id or ("bundle", next(_BUNDLE_IDS))
        return VAEDecode(self._vae_static, weights, self.vae_params)

    @functools.cached_property
    def _vae_static(self) -> "_Static":
        return vae_static(self.vae, self.vae_scaling_factor, self.vae_dtype)

    @functools.cached_property
    def _text_static(self) -> "_Static":
        return _text_model(self.text_encoder, self.text_encoder_2)

    @property
    def _text_params(self):
        return (self.text_params, self.text_params_2)

    @property
    def _tokenizers(self):
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)


def vae_dtype_name(dtype: str, vae_config) -> str:
    """The dtype the VAE runs in for a model in ``dtype``: float32 when ``dtype`` is float16 and the VAE's
    config sets ``force_upcast`` (its default, as diffusers' pipelines do it: SD's VAE overflows float16's
    range in its decoder and gives NaN / black images; VAEs fixed for float16 set it false), else ``dtype``.
    bfloat16 has float32's range and is kept."""
    return "float32" if dtype == "float16" and vae_config.force_upcast else dtype


def vae_static(vae, scaling: float, dtype: str) -> _Static:
    """The VAE as a jit static argument, keyed by (config, scaling factor, dtype)."""
    return _Static((_config_key(vae), scaling, dtype), vae)


def _onto_params_device(x, params):
    """``x`` moved onto the single device holding ``params`` when it is a concrete array on other
    devices (jit refuses arguments committed to different devices); unchanged otherwise."""
    leaves = jax.tree.leaves(params)
    if not leaves or not isinstance(x, jax.Array) or isinstance(x, jax.core.Tracer):
        return x
    p = leaves[0]
    if not isinstance(p, jax.Array) or isinstance(p, jax.core.Tracer):
        return x
    devs = p.sharding.device_set
    if len(devs) == 1 and x.sharding.device_set != devs:
        return jax.device_put(x, next(iter(devs)))
    return x


def vae_decode_raw(static: _Static, params, latents: Array) -> Array:
    """latents [B, h, w, C] -> pixels [B, h*f, w*f, 3] float32, not clipped (differentiable)."""
    vae, (_, scaling, dtype) = static.model, static.key
    z = (latents.astype(jnp.float32) / scaling).astype(DTYPES[dtype])
    return vae.apply({"params": params}, z, method="decode").astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(static: _Static, params, latents: Array) -> Array:
    return jnp.clip(vae_decode_raw(static, params, latents), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _text_forward(text: _Static, params, ids) -> Array:
    enc, enc2 = text.model
    out = enc.apply({"params": params[0]}, ids[0])
    if enc2 is None:
        return out.last.astype(jnp.float32)
    out2 = enc2.apply({"params": params[1]}, ids[1])
    emb = jnp.concatenate([out.penultimate, out2.penultimate], axis=-1).astype(jnp.float32)
    pooled = out2.projected.astype(jnp.float32)
    row = jnp.pad(pooled, ((0, 0), (0, emb.shape[-1] - pooled.shape[-1])))[:, None]
    return jnp.concatenate([emb, row], axis=1)


def _text_model(text_encoder, text_encoder_2=None) -> _Static:
    key = (_config_key(text_encoder), None if text_encoder_2 is None else _config_key(text_encoder_2))
    return _Static(key, (text_encoder, text_encoder_2))


# ----------------------------------------------------------------------------- prompts


def tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
    """[B, 77] int32 token ids, padded / truncated as diffusers' pipelines do. Over-long prompts
    are truncated with a warning naming the prompt and its token count."""
    max_len = int(tokenizer.model_max_length)
    for p in prompts:
        n = len(tokenizer(p, truncation=False).input_ids)
        if n > max_len:
            warnings.warn(f"prompt {p!r} has {n} tokens (with the start / end tokens), more than the text "
                          f"encoder's {max_len}; it is truncated to {max_len}", UserWarning, stacklevel=4)
    ids = tokenizer(list(prompts), padding="max_length", max_length=max_len, truncation=True,
                    return_tensors="np").input_ids
    return np.asarray(ids, np.int32)


def _encode(text: _Static, text_params, tokenizers, prompts) -> Array:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    ids = [jnp.asarray(tokenize(tokenizers[0], prompts))]
    if len(tokenizers) > 1:
        with warnings.catch_warnings():      # the first tokenizer has warned about over-long prompts
            warnings.simplefilter("ignore", UserWarning)
            ids.append(jnp.asarray(tokenize(tokenizers[1], prompts)))
    return _text_forward(text, text_params, tuple(ids) + (None,) * (2 - len(ids)))


def encode_prompts(sd: StableDiffusion, prompts: str | Sequence[str], *, batch: int = 64) -> Array:
    """The UNet's condition for ``prompts`` (module docstring): [B, 77, D] float32 (SDXL: [B, 78, D]),
    encoded ``batch`` prompts at a time (bounds the text encoders' memory for long prompt lists)."""
    if isinstance(prompts, str) or len(prompts) <= batch:
        return _encode(sd._text_static, sd._text_params, sd._tokenizers, prompts)
    prompts = list(prompts)
    return jnp.concatenate([_encode(sd._text_static, sd._text_params, sd._tokenizers, prompts[i:i + batch])
                            for i in range(0, len(prompts), batch)])


# ----------------------------------------------------------------------------- the denoiser


def check_image_size(sd: StableDiffusion, height: int, width: int) -> None:
    """Raise ValueError unless height and width are positive multiples of ``sd.size_multiple``."""
    m = sd.size_multiple
    for field, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise ValueError(f"Stable Diffusion {field} must be a positive integer, got {v!r}")
        if v % sd.vae_factor:
            raise ValueError(f"Stable Diffusion {field}={v} is not divisible by {sd.vae_factor} (the VAE's "
                             f"downsampling factor)")
        if v % m:
            raise ValueError(f"Stable Diffusion {field}={v} is not a multiple of {m}: the VAE downsamples by "
                             f"{sd.vae_factor} and the UNet by {m // sd.vae_factor} more")


def sd_denoiser(sd: StableDiffusion, height: int | None = None, width: int | None = None,
                name: str = "stable-diffusion") -> Denoiser:
    """``sd`` as a ``Denoiser`` on latents [B, height/f, width/f, C] (f = ``sd.vae_factor``, 8).

    params: the UNet's; cond: the text condition (``encode_prompts``); null_cond: the empty prompt's;
    decode: latents -> pixels [B, height, width, 3] in [-1, 1]. height / width default to
    ``sd.image_size``; SDXL's micro-conditioning is (height, width, 0, 0, height, width), as its
    pipeline's default.
    """
    height = sd.image_size if height is None else height
    width = sd.image_size if width is None else width
    check_image_size(sd, height, width)
    f = sd.vae_factor
    eps_fn = sd.eps_fn
    if eps_fn.pooled_dim:
        eps_fn = dataclasses.replace(eps_fn, time_ids=(height, width, 0, 0, height, width))
    return Denoiser(params=sd.unet_params, null_cond=sd.null_embedding, eps_fn=eps_fn,
                    sample_shape=(height // f, width // f, sd.latent_channels), schedule=sd.schedule,
                    num_conditions=None, decode=sd.vae_decoder, name=name)


# diffusers' scheduler class each sampler stands for, and that class's __init__ defaults (diffusers 0.39,
# checked against the classes by tests/models/test_sd_sampler_config.py) for the keys a SamplerConfig
# follows. As ``Cls.from_config(scheduler_config)`` does, a key the config lacks takes the default of the
# sampler's own class (DPMSolverMultistepScheduler lays its steps by "linspace", DDIM / DDPM by
# "leading"), and a key the class does not have (DPM-Solver's clip_sample, PNDM's skip_prk_steps) is ignored.
SCHEDULER_CLASSES = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "dpm++2m": "DPMSolverMultistepScheduler"}
SCHEDULER_DEFAULTS = {
    "ddim": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
             "set_alpha_to_one": True},
    "ddpm": {"timestep_spacing": "leading", "steps_offset": 0, "clip_sample": True, "clip_sample_range": 1.0,
             "variance_type": "fixed_small"},
    "dpm++2m": {"timestep_spacing": "linspace", "steps_offset": 0, "lower_order_final": True,
                "final_sigmas_type": "zero"},
}
# scheduler_config.json key -> SamplerConfig field
SCHEDULER_FIELDS = {"timestep_spacing": "spacing", "steps_offset": "steps_offset", "clip_sample": "clip_sample",
                    "clip_sample_range": "clip_range", "set_alpha_to_one": "set_alpha_to_one",
                    "variance_type": "variance_type", "lower_order_final": "lower_order_final",
                    "final_sigmas_type": "final_sigmas_type"}
# Keys the samplers implement at the class default only (the same defaults, also checked by the tests): any
# other value changes diffusers' steps, so it is refused (``_check_fixed_keys`` lists the few other values that
# leave the result unchanged). prediction_type, trained_betas and the beta keys are the training schedule's
# (``_scheduler_settings``): v_prediction is converted to eps by the denoiser (``UNetEps``), which gives
# every sampler diffusers' v_prediction step. Keys read only under a refused setting (dynamic_thresholding_ratio
# and sample_max_value with thresholding; flow_shift, use_dynamic_shifting, time_shift_type with flow sigmas)
# do not matter and are ignored.
_COMMON_FIXED = {"thresholding": False, "rescale_betas_zero_snr": False}
SCHEDULER_FIXED = {
    "ddim": dict(_COMMON_FIXED),
    "ddpm": dict(_COMMON_FIXED),
    "dpm++2m": dict(_COMMON_FIXED, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
                    euler_at_final=False, use_karras_sigmas=False, use_exponential_sigmas=False,
                    use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
                    lambda_min_clipped=-float("inf"), variance_type=None),
}


def _check_followed_key(key: str, value, name: str, where: str) -> None:
    """ValueError naming ``key`` when its value is not one SamplerConfig can take (before it is built)."""
    bad = None
    if key == "timestep_spacing" and value not in SPACINGS:
        bad = f"unknown timestep spacing; choose one of {list(SPACINGS)}"
    elif key == "steps_offset" and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                                    or value < 0):
        bad = "must be an integer >= 0"
    elif key in ("clip_sample", "set_alpha_to_one", "lower_order_final") and not isinstance(value, bool):
        bad = "must be true or false"
    elif key == "clip_sample_range" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                         or not value > 0):
        bad = "must be a number > 0"
    elif key == "variance_type" and value not in DDPM_VARIANCE_TYPES:
        bad = f"is not supported by amg_jax's ddpm sampler; choose one of {list(DDPM_VARIANCE_TYPES)}"
    elif key == "final_sigmas_type" and value not in FINAL_SIGMAS_TYPES:
        bad = f"is not supported; choose one of {list(FINAL_SIGMAS_TYPES)}"
    if bad:
        raise ValueError(f"{where}: {key}={value!r} {bad} (sampler {name!r}, diffusers' {SCHEDULER_CLASSES[name]})")


def _check_fixed_keys(config: dict, cfg: SamplerConfig, schedule: Schedule, where: str) -> None:
    """ValueError naming the first key of ``config`` set to a value whose diffusers steps the sampler of
    ``cfg`` does not implement."""
    for key, default in SCHEDULER_FIXED[cfg.name].items():
        value = config.get(key, default)
        if value == default or (value is None and default is None) or (default is False and not value):
            continue          # (diffusers tests these flags for truth: null is false)
        if key == "solver_type" and value in ("logrho", "bh1", "bh2"):
            continue          # DEIS / UniPC solver types: diffusers' DPM-Solver replaces them by "midpoint"
        if key == "variance_type" and value not in ("learned", "learned_range"):
            continue          # DPM-Solver reads variance_type only to drop learned-variance channels
        if key == "euler_at_final" and (cfg.final_sigmas_type == "zero"
                                        or (cfg.lower_order_final and cfg.num_steps < 15)):
            continue          # the last step is first order (Euler) anyway
        if key == "lambda_min_clipped" and isinstance(value, (int, float)) and not isinstance(value, bool):
            ac = schedule.alphas_cumprod()
            lam = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
            if not np.any(lam < np.float32(value)):
                continue      # clips no timestep: diffusers' grid is the unclipped one
        raise ValueError(f"{where}: {key}={value!r} is not supported by amg_jax's {cfg.name} sampler (it "
                         f"implements diffusers' {SCHEDULER_CLASSES[cfg.name]} with {key}={default!r} only)")


def sampler_config_from_scheduler(config: dict, num_steps: int = 50, name: str = "ddim", *,
                                  schedule: Schedule | None = None, where: str = "scheduler_config",
                                  **overrides) -> SamplerConfig:
    """The ``SamplerConfig`` of diffusers' class for ``name`` built ``from_config(config)`` with
    ``set_timesteps(num_steps)``: same timesteps and step coefficients (missing keys take that class's
    defaults, ``SCHEDULER_DEFAULTS``). ``schedule`` (default: the one ``config`` describes) must be the
    one ``config`` describes. A key whose value would change diffusers' steps in a way amg_jax does not
    implement raises ValueError naming it (``where`` prefixes the message). ``overrides`` replace any
    field (e.g. ``eta=1.0``); the result is checked against the schedule before it is returned."""
    name = SamplerConfig(name=name).name
    own, prediction = _scheduler_settings(config, where)
    del prediction    # epsilon or v_prediction: the denoiser's concern (UNetEps), not the sampler's
    if schedule is not None and schedule != own:
        raise ValueError(f"{where}: the schedule {schedule} is not the one the scheduler config describes "
                         f"({own}): beta_schedule / beta_start / beta_end / num_train_timesteps differ")
    fields = {}
    for key, default in SCHEDULER_DEFAULTS[name].items():
        value = config.get(key, default)
        _check_followed_key(key, value, name, where)
        fields[SCHEDULER_FIELDS[key]] = value
    cfg = SamplerConfig(name=name, num_steps=num_steps, **dict(fields, **overrides))
    _check_fixed_keys(config, cfg, own, where)
    cfg.check(own)
    return cfg


def sd_sampler_config(sd: StableDiffusion, num_steps: int = 50, name: str = "ddim", **overrides) -> SamplerConfig:
    """The ``SamplerConfig`` diffusers builds from the model's scheduler_config.json for ``name``
    (``DDIMScheduler`` / ``DDPMScheduler`` / ``DPMSolverMultistepScheduler.from_config``, missing keys
    at that class's defaults): see ``sampler_config_from_scheduler``. Reads ``sd.scheduler_config`` and
    ``sd.schedule`` only. ``overrides`` replace any field (e.g. ``eta=1.0``)."""
    source = getattr(sd, "source", "")
    where = os.path.join(source, "scheduler", "scheduler_config.json") if source else "scheduler_config"
    return sampler_config_from_scheduler(sd.scheduler_config, num_steps, name, schedule=sd.schedule, where=where,
                                         **overrides)



# ----------------------------------------------------------------------------- loading


def _dtype_name(dtype) -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in DTYPES:
        raise ValueError(f"load_stable_diffusion: dtype must be one of {list(DTYPES)}, got {dtype!r}")
    return name


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e




def _first_existing(folder: str, names: Sequence[str]) -> str | None:
    return weight_files(folder, names)


def _weights_id(folder: str, names: Sequence[str]) -> tuple:
    """(real path, size, mtime in ns) of the weights file a component is loaded from (the first of
    ``names`` in ``folder``, as the loaders pick it): stands for its params in equality tests."""
    path = _first_existing(folder, names)
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def pipeline_kind(path: str) -> str:
    """"sd" or "sdxl": the kind of the pipeline folder ``path`` (its model_index.json _class_name)."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline directory: it has no model_index.json")
    cls = _read_json(index_file).get("_class_name")
    if cls not in PIPELINES:
        raise ValueError(f"{index_file}: _class_name is {cls!r}, not a Stable Diffusion text-to-image pipeline "
                         f"(expected one of {list(PIPELINE_CLASSES)})")
    return PIPELINES[cls]


def check_layout(path: str, from_pt: bool | None = None) -> bool:
    """Validate a local diffusers Stable Diffusion (1.x / 2.x / XL) directory; returns ``from_pt``
    (resolved when None: Flax weights when every network has them, else PyTorch weights).

    Raises FileNotFoundError naming the missing folder / file, ValueError for another pipeline class.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Stable Diffusion directory {path!r} does not exist")
    kind = pipeline_kind(path)
    comps = KIND_COMPONENTS[kind]
    for comp in comps:
        folder = os.path.join(path, comp)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Stable Diffusion directory {path!r} has no {comp}/ subfolder")
        for name in CONFIG_FILES[comp]:
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"Stable Diffusion directory {path!r}: missing {comp}/{name}")

    def missing(table):
        return [f"{c}/{' or '.join(names)}" for c, names in table.items()
                if c in comps and _first_existing(os.path.join(path, c), names) is None]

    flax_missing, pt_missing = missing(FLAX_WEIGHTS), missing(PT_WEIGHTS)
    if from_pt is None:
        if not flax_missing:
            return False
        if not pt_missing:
            return True
        raise FileNotFoundError(f"Stable Diffusion directory {path!r} has neither complete Flax weights "
                                f"(missing {', '.join(flax_missing)}) nor complete PyTorch weights "
                                f"(missing {', '.join(pt_missing)})")
    absent = pt_missing if from_pt else flax_missing
    if absent:
        kind = "PyTorch" if from_pt else "Flax"
        raise FileNotFoundError(f"Stable Diffusion directory {path!r}: missing {kind} weights "
                                f"{', '.join(absent)}")
    return bool(from_pt)


def _variants(name: str) -> list[str]:
    """The file names ``weight_files`` accepts for ``name`` (sharded / fp16 variants of .safetensors)."""
    if not name.endswith(".safetensors"):
        return [name]
    stem = name[: -len(".safetensors")]
    return [name, name + ".index.json", stem + ".fp16.safetensors", stem + ".fp16.safetensors.index.json"]


def _download(repo_id: str, revision: str | None, from_pt: bool | None) -> tuple[str, bool]:
    """Fetch the files of a hub repo that loading needs (configs, tokenizers, one set of weights)."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = set(list_repo_files(repo_id, revision=revision))
    except Exception as e:   # not found, gated, offline, ...: say what was tried
        raise FileNotFoundError(f"{repo_id!r} is not a local directory, and listing it as a hub repo "
                                f"(revision={revision!r}) failed: {type(e).__name__}: {e}") from e
    comps = [c for c in FLAX_WEIGHTS if c in {f.split("/")[0] for f in files}]

    def present(c, names):
        return [v for n in names for v in _variants(n) if f"{c}/{v}" in files]

    def complete(table):
        return all(present(c, table[c]) for c in comps)

    if from_pt is None:
        from_pt = not complete(FLAX_WEIGHTS)
    table = PT_WEIGHTS if from_pt else FLAX_WEIGHTS
    weights = []
    for c in comps:
        hit = present(c, table[c])
        if hit:
            weights.append(f"{c}/{hit[0]}")
            if hit[0].endswith(".index.json"):       # its shards
                weights.append(f"{c}/{hit[0][: -len('.safetensors.index.json')]}-*.safetensors")
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*"] + weights
    return snapshot_download(repo_id, revision=revision, allow_patterns=patterns), from_pt


def _cast(params, dtype):
    """Floating leaves cast to ``dtype`` (in numpy: an eager jnp cast would compile once per shape)."""
    def cast(p):
        if not jnp.issubdtype(p.dtype, jnp.floating) or p.dtype == dtype:
            return p
        return jnp.asarray(np.asarray(p).astype(dtype))
    return jax.tree.map(cast, params)


def _load_params(path: str, comp: str, module, init_args: tuple, dtype, from_pt: bool, aliases=None):
    """``module``'s params from ``path/comp``'s weights file (PyTorch or Flax), checked against the tree
    the module's config builds (ValueError naming the file and the weight) and cast to ``dtype``."""
    folder = os.path.join(path, comp)
    file = _first_existing(folder, (PT_WEIGHTS if from_pt else FLAX_WEIGHTS)[comp])
    state = read_state(file)
    return to_params(state, expected_tree(module, *init_args), file, aliases, dtype)


def _scheduler_settings(config: dict, where: str) -> tuple[Schedule, str]:
    if config.get("trained_betas") is not None:
        raise ValueError(f"{where}: trained_betas are not supported (use beta_schedule)")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"{where}: prediction_type {prediction!r} is not supported; expected one of "
                         f"{list(PREDICTION_TYPES)}")
    try:
        schedule = Schedule(beta_schedule=config.get("beta_schedule", "linear"),
                            num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                            beta_start=float(config.get("beta_start", 0.0001)),
                            beta_end=float(config.get("beta_end", 0.02)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return schedule, prediction


def _check_configs(path: str, kind: str, unet: UNetConfig, vae: VAEConfig, texts: list) -> None:
    """The components' configs must fit together (ValueError naming the file and the field)."""
    where = os.path.join(path, "unet", "config.json")
    if kind == "sd" and unet.is_sdxl:
        raise ValueError(f"{where}: addition_embed_type='text_time' is an SDXL UNet, but model_index.json names "
                         "a StableDiffusionPipeline (one text encoder, no pooled embedding)")
    if kind == "sdxl" and not unet.is_sdxl:
        raise ValueError(f"{where}: addition_embed_type must be 'text_time' in a StableDiffusionXLPipeline")
    if unet.in_channels != unet.out_channels:
        raise ValueError(f"{where}: in_channels={unet.in_channels} != out_channels={unet.out_channels} (an "
                         "inpainting / depth UNet) is not supported")
    if unet.in_channels != vae.latent_channels:
        raise ValueError(f"{where}: in_channels={unet.in_channels} does not match the VAE's "
                         f"latent_channels={vae.latent_channels}")
    width = sum(t.hidden_size for t in texts)
    if unet.cross_attention_dim != width:
        what = " + ".join(f"{t.hidden_size}" for t in texts)
        raise ValueError(f"{where}: cross_attention_dim={unet.cross_attention_dim} does not match the text "
                         f"encoder{'s' if len(texts) > 1 else ''}' hidden_size {what}")
    if kind == "sdxl":
        need = 6 * unet.addition_time_embed_dim + texts[1].projection_dim
        if unet.projection_class_embeddings_input_dim != need:
            raise ValueError(f"{where}: projection_class_embeddings_input_dim="
                             f"{unet.projection_class_embeddings_input_dim} != 6 x addition_time_embed_dim "
                             f"({unet.addition_time_embed_dim}) + text_encoder_2's projection_dim "
                             f"({texts[1].projection_dim}) = {need}")
        if texts[1].projection_dim > width:
            raise ValueError(f"{os.path.join(path, 'text_encoder_2', 'config.json')}: projection_dim="
                             f"{texts[1].projection_dim} is wider than the condition ({width})")


def load_stable_diffusion(path_or_hub_id: str | os.PathLike, *, dtype="float32", from_pt: bool | None = None,
                          revision: str | None = None, attention: str = "auto") -> StableDiffusion:
    """Load a diffusers Stable Diffusion (1.x / 2.x / XL) from a local directory or a hub id.

    dtype: "float32" | "bfloat16" | "float16" (params cast to it; the networks compute in it; with
    float16 the VAE stays float32 where its config sets ``force_upcast``, as in diffusers: ``vae_dtype_name``).
    from_pt: None = Flax weights when present, else the PyTorch ones; True / False forces.
    revision: a hub branch / tag / commit (hub ids only). attention: "auto" | "xla" | "cudnn".
    Raises ValueError (bad dtype, not an SD layout, unsupported model, a config that does not match
    the weights) or FileNotFoundError (missing folder / file, naming it) before any model runs.
    """
    dtype = _dtype_name(dtype)
    check_attention(attention)
    source = os.fspath(path_or_hub_id)
    if os.path.isdir(source):
        if revision is not None:
            raise ValueError(f"load_stable_diffusion: revision={revision!r} applies to hub ids, but {source!r} "
                             "is a local directory")
        from_pt = check_layout(source, from_pt)
        path = source
    elif not os.path.exists(source) and HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        path, from_pt = _download(source, revision, from_pt)
        from_pt = check_layout(path, from_pt)
    else:
        raise FileNotFoundError(f"Stable Diffusion directory {source!r} does not exist (and is not a hub id "
                                "such as 'owner/name')")
    kind = pipeline_kind(path)
    index = _read_json(os.path.join(path, "model_index.json"))
    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    sched_cfg = _read_json(sched_file)
    schedule, prediction = _scheduler_settings(sched_cfg, sched_file)
    text_comps = ("text_encoder",) + (("text_encoder_2",) if kind == "sdxl" else ())
    raw = {c: _read_json(os.path.join(path, c, "config.json")) for c in ("unet", "vae") + text_comps}
    unet_cfg = UNetConfig.from_dict(raw["unet"], os.path.join(path, "unet", "config.json"))
    vae_cfg = VAEConfig.from_dict(raw["vae"], os.path.join(path, "vae", "config.json"))
    text_cfgs = [ClipTextConfig.from_dict(raw[c], os.path.join(path, c, "config.json")) for c in text_comps]
    _check_configs(path, kind, unet_cfg, vae_cfg, text_cfgs)

    jdt, vdt = DTYPES[dtype], DTYPES[vae_dtype_name(dtype, vae_cfg)]
    unet = UNet2DCondition(unet_cfg, jdt, attention)
    vae = AutoencoderKL(vae_cfg, vdt, attention)
    texts = [ClipTextEncoder(t, jdt, attention, projection=(c == "text_encoder_2")) for c, t in zip(text_comps, text_cfgs)]
    s, f = unet_cfg.downsampling, vae_cfg.factor
    pooled_dim = text_cfgs[1].projection_dim if kind == "sdxl" else 0
    added = ((jnp.zeros((1, pooled_dim)), jnp.zeros((1, 6))) if kind == "sdxl" else None)
    unet_params = _load_params(path, "unet", unet, (jnp.zeros((1, s, s, unet_cfg.in_channels)), jnp.zeros((1,), jnp.int32),
                                                   jnp.zeros((1, 1, unet_cfg.cross_attention_dim)), added), jdt, from_pt)
    vae_params = _load_params(path, "vae", vae, (jnp.zeros((1, f, f, vae_cfg.in_channels)),), vdt, from_pt, VAE_ALIASES)
    text_params = [_load_params(path, c, m, (jnp.zeros((1, t.max_position_embeddings), jnp.int32),), jdt, from_pt)
                   for c, m, t in zip(text_comps, texts, text_cfgs)]
    with quiet_libraries():
        from transformers import CLIPTokenizer  # heavy / optional: the tokenizers only

        tokenizers = [CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer" + c[len("text_encoder"):]))
                      for c in text_comps]
    text2 = texts[1] if kind == "sdxl" else None
    static = _text_model(texts[0], text2)
    params2 = text_params[1] if kind == "sdxl" else None
    if kind == "sdxl" and index.get("force_zeros_for_empty_prompt", True):
        null = jnp.zeros((tokenizers[0].model_max_length + 1, unet_cfg.cross_attention_dim), jnp.float32)
    else:
        null = _encode(static, (text_params[0], params2), tokenizers, [""])[0]
    return StableDiffusion(
        unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=texts[0],
        text_params=text_params[0], tokenizer=tokenizers[0], schedule=schedule, scheduler_config=dict(sched_cfg),
        prediction_type=prediction, vae_scaling_factor=vae_cfg.scaling_factor,
        latent_channels=vae_cfg.latent_channels, vae_factor=f, image_size=unet_cfg.sample_size * f,
        null_embedding=null, eps_fn=UNetEps(unet, prediction, schedule, dtype, pooled_dim=pooled_dim, time_ids=(
            (size := unet_cfg.sample_size * f), size, 0, 0, size, size) if pooled_dim else ()), dtype=dtype,
        source=source, text_encoder_2=text2, text_params_2=params2,
        tokenizer_2=tokenizers[1] if kind == "sdxl" else None, configs=raw, attention=attention,
        vae_weights_id=_weights_id(os.path.join(path, "vae"), (PT_WEIGHTS if from_pt else FLAX_WEIGHTS)["vae"]))


def with_settings(sd: StableDiffusion, *, dtype: str | None = None, attention: str | None = None) -> StableDiffusion:
    """``sd`` with its networks rebuilt for another ``dtype`` and / or ``attention`` implementation (the
    params cast from the loaded ones; casting down and back up loses what the lower precision drops)."""
    dtype = sd.dtype if dtype is None else _dtype_name(dtype)
    attention = sd.attention if attention is None else check_attention(attention)
    jdt, vdt = DTYPES[dtype], DTYPES[vae_dtype_name(dtype, sd.vae.config)]
    rebuild = lambda m, dt=jdt: None if m is None else dataclasses.replace(m, dtype=dt, attention=attention)  # noqa: E731
    unet, vae = rebuild(sd.unet), rebuild(sd.vae, vdt)
    text, text2 = rebuild(sd.text_encoder), rebuild(sd.text_encoder_2)
    return dataclasses.replace(
        sd, unet=unet, unet_params=_cast(sd.unet_params, jdt), vae=vae, vae_params=_cast(sd.vae_params, vdt),
        text_encoder=text, text_params=_cast(sd.text_params, jdt), text_encoder_2=text2,
        text_params_2=None if text2 is None else _cast(sd.text_params_2, jdt), dtype=dtype, attention=attention,
        eps_fn=dataclasses.replace(sd.eps_fn, unet=unet, dtype=dtype),
        vae_weights_id=sd.vae_weights_id + (dtype,) if sd.vae_weights_id else ())


__all__ = [
    "DTYPES", "PIPELINES", "StableDiffusion",
    "check_image_size", "check_layout", "encode_prompts", "load_stable_diffusion", "pipeline_kind",
    "quiet_libraries", "sampler_config_from_scheduler", "sd_denoiser",
    "sd_sampler_config", "tokenize", "SCHEDULER_DEFAULTS",
    "UNetEps", "VAEDecode", "vae_decode_raw", "vae_dtype_name", "vae_static", "with_settings",
]
