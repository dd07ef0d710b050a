"""Stable Diffusion (diffusers' Flax UNet + VAE + transformers' Flax CLIP text encoder) as one ``Denoiser``.

- ``load_stable_diffusion(path_or_hub_id, dtype=...)``: a diffusers SD 1.x / 2.x directory (or a
  hub id, downloaded with ``huggingface_hub``) -> a frozen ``StableDiffusion`` bundle. Flax
  weights are used when present, else the PyTorch weights (``.safetensors`` or ``.bin``) are
  converted (``from_pt``). The layout is checked first: missing folders / files, another
  pipeline class or an unsupported UNet raise FileNotFoundError / ValueError naming them.
- ``encode_prompts(sd, prompts) -> [B, 77, D]``: CLIP text embeddings exactly as diffusers'
  pipelines compute them (padded to 77 tokens, over-long prompts truncated with a warning);
  ``sd.null_embedding`` [77, D] is the empty prompt's, CFG's unconditional.
- ``sd_denoiser(sd, height, width) -> Denoiser`` on latents [B, h/8, w/8, 4] (NHWC; the Flax UNet
  is NCHW, transposed inside ``eps_fn``). v-prediction models are converted to eps with the
  schedule. ``decode``: latents -> pixels [B, H, W, 3] in [-1, 1] via the VAE. Two loads of one
  model give equal denoisers (``UNetEps`` and ``VAEDecode`` are values), so they share compiled loops.
- ``sd_sampler_config(sd, num_steps, name)``: the ``SamplerConfig`` that diffusers' class for ``name``
  (DDIM / DDPM / DPMSolverMultistepScheduler) builds ``from_config`` the model's scheduler_config.json,
  missing keys at that class's defaults; keys whose steps amg_jax does not implement are refused.
- ``write_tiny_sd(directory, seed, framework)``: a tiny random-weight SD in diffusers format
  (Flax or PyTorch weights) that ``FlaxStableDiffusionPipeline.from_pretrained`` also loads.

dtype: params (and the networks' computation) in float32 / bfloat16 / float16; the sampler
state, eps and the decoded pixels are float32.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import os
import re
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from amg_jax.models.base import Denoiser
from amg_jax.samplers import DDPM_VARIANCE_TYPES, FINAL_SIGMAS_TYPES, SamplerConfig
from amg_jax.schedules import SPACINGS, Schedule

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
PIPELINE_CLASSES = ("StableDiffusionPipeline", "FlaxStableDiffusionPipeline")
PREDICTION_TYPES = ("epsilon", "v_prediction")
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
CONFIG_FILES = {"unet": ("config.json",), "vae": ("config.json",), "text_encoder": ("config.json",),
                "tokenizer": ("vocab.json", "merges.txt"), "scheduler": ("scheduler_config.json",)}
FLAX_WEIGHTS = {"unet": ("diffusion_flax_model.msgpack",), "vae": ("diffusion_flax_model.msgpack",),
                "text_encoder": ("flax_model.msgpack",)}
PT_WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
              "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
              "text_encoder": ("model.safetensors", "pytorch_model.bin")}
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


# ----------------------------------------------------------------------------- quiet libraries


@contextlib.contextmanager
def quiet_libraries():
    """Silence diffusers' / transformers' "Flax classes are deprecated" messages: their loggers are
    set to errors only (and left so: diffusers' Flax attention modules log it each time they are
    traced), and Future / Deprecation warnings are ignored inside the block."""
    import diffusers    # heavy; used only when a model is built from it (and for its configs)
    import transformers    # heavy; used only when a model is built from it (and for its configs)

    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*[Ff]lax.*deprecated.*")
        yield


# ----------------------------------------------------------------------------- the bundle


@dataclasses.dataclass(frozen=True)
class UNetEps:
    """The denoiser contract on SD latents (a callable, hashable by value: two loads of one model
    share compiled functions): ``(params, x_t [B, h, w, C] NHWC, t [B] int32, cond [B, L, D]) -> eps``
    in x_t's dtype. The UNet runs in ``dtype`` on NCHW; v-prediction is converted to eps."""

    unet: Any = dataclasses.field(compare=False)
    prediction_type: str
    schedule: Schedule
    dtype: str = "float32"
    config_key: str = ""

    def __post_init__(self):
        object.__setattr__(self, "config_key", _config_key(self.unet))

    def __call__(self, params, x_t: Array, t: Array, cond: Array) -> Array:
        dt = DTYPES[self.dtype]
        x = jnp.transpose(x_t, (0, 3, 1, 2)).astype(dt)
        out = self.unet.apply({"params": params}, x, jnp.asarray(t, jnp.int32),
                              encoder_hidden_states=jnp.asarray(cond).astype(dt)).sample
        out = jnp.transpose(out, (0, 2, 3, 1)).astype(x_t.dtype)
        if self.prediction_type == "epsilon":
            return out
        ab = jnp.take(jnp.asarray(self.schedule.alphas_cumprod(), x_t.dtype), jnp.asarray(t, jnp.int32))
        ab = ab.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(ab) * out + jnp.sqrt(1.0 - ab) * x_t


@dataclasses.dataclass(frozen=True)
class _Static:
    """A model as a jit static argument, equal by (config, dtype): loaded configs hold lists, so the
    Flax modules themselves are unhashable."""

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

_META_KEYS = ("architectures", "transformers_version", "torch_dtype", "dtype", "name_or_path", "model_type")


def _config_key(model) -> str:
    """The architecture part of a model's config as a string (bookkeeping keys dropped, so the Flax and
    the PyTorch copies of one model share compiled functions)."""
    config = model.config
    config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    config = {k: v for k, v in config.items() if not k.startswith("_") and k not in _META_KEYS}
    return type(model).__name__ + json.dumps(config, sort_keys=True, default=str)


@dataclasses.dataclass(frozen=True, eq=False)
class StableDiffusion:
    """A loaded Stable Diffusion (hashable by identity).

    unet / vae / text_encoder: diffusers' FlaxUNet2DConditionModel, FlaxAutoencoderKL and
    transformers' FlaxCLIPTextModel (built with ``dtype``); *_params: their params, cast to
    ``dtype``; tokenizer: CLIPTokenizer; schedule: the training noise schedule;
    scheduler_config: scheduler_config.json (a dict; read only); prediction_type: "epsilon" |
    "v_prediction"; vae_scaling_factor: latents = VAE latents * this; latent_channels: C of the
    latents; vae_factor: pixels per latent (8); image_size: default pixel size (unet
    sample_size * vae_factor); null_embedding: [L, D] float32, the empty prompt's embedding;
    eps_fn: the ``UNetEps`` denoiser function; dtype: "float32" | "bfloat16" | "float16";
    source: where it was loaded from; vae_weights_id: what ``vae_params`` were loaded from (the weights
    file's real path, size and mtime, set by ``load_stable_diffusion``): two bundles with the same one
    have equal ``vae_decoder``s. Empty (a bundle built in memory): the decoder is this bundle's own.
    ``dataclasses.replace`` with other ``vae_params`` must reset it.
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

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def max_tokens(self) -> int:
        return int(self.tokenizer.model_max_length)

    @property
    def size_multiple(self) -> int:
        """Pixel sizes must be multiples of this: the VAE factor times the Flax UNet's downsampling
        (the Flax UNet, unlike the PyTorch one, cannot upsample back to odd latent sizes)."""
        return self.vae_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

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
        return _Static((_config_key(self.vae), self.vae_scaling_factor, self.dtype), self.vae)

    @functools.cached_property
    def _text_static(self) -> "_Static":
        return _text_model(self.text_encoder, self.dtype)


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


@functools.partial(jax.jit, static_argnums=0)
def _vae_decode(static: _Static, params, latents: Array) -> Array:
    vae, (_, scaling, dtype) = static.model, static.key
    z = (latents.astype(jnp.float32) / scaling).astype(DTYPES[dtype])
    img = vae.apply({"params": params}, z, method=vae.decode).sample      # [B, 3, H, W]
    return jnp.clip(jnp.transpose(img, (0, 2, 3, 1)).astype(jnp.float32), -1.0, 1.0)


@functools.partial(jax.jit, static_argnums=0)
def _text_forward(text: _Static, params, ids: Array) -> Array:
    return text.model(ids, params=params)[0].astype(jnp.float32)


def _text_model(text_encoder, dtype: str) -> _Static:
    return _Static((_config_key(text_encoder), dtype), text_encoder)


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


def _encode(text: _Static, text_params, tokenizer, prompts) -> Array:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    return _text_forward(text, text_params, jnp.asarray(tokenize(tokenizer, prompts)))


def encode_prompts(sd: StableDiffusion, prompts: str | Sequence[str], *, batch: int = 64) -> Array:
    """CLIP text embeddings [B, 77, D] float32 of ``prompts`` (the UNet's ``encoder_hidden_states``),
    encoded ``batch`` prompts at a time (bounds the text encoder's memory for long prompt lists)."""
    if isinstance(prompts, str) or len(prompts) <= batch:
        return _encode(sd._text_static, sd.text_params, sd.tokenizer, prompts)
    prompts = list(prompts)
    return jnp.concatenate([_encode(sd._text_static, sd.text_params, sd.tokenizer, prompts[i:i + batch])
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
                             f"{sd.vae_factor} and the Flax UNet by {m // sd.vae_factor} more")


def sd_denoiser(sd: StableDiffusion, height: int | None = None, width: int | None = None,
                name: str = "stable-diffusion") -> Denoiser:
    """``sd`` as a ``Denoiser`` on latents [B, height/f, width/f, C] (f = ``sd.vae_factor``, 8).

    params: the UNet's; cond: text embeddings [B, L, D] (``encode_prompts``); null_cond: the empty
    prompt's [L, D]; decode: latents -> pixels [B, height, width, 3] in [-1, 1].
    height / width default to ``sd.image_size``.
    """
    height = sd.image_size if height is None else height
    width = sd.image_size if width is None else width
    check_image_size(sd, height, width)
    f = sd.vae_factor
    return Denoiser(params=sd.unet_params, null_cond=sd.null_embedding, eps_fn=sd.eps_fn,
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
    for n in names:
        if os.path.isfile(os.path.join(folder, n)):
            return os.path.join(folder, n)
    return None


def _weights_id(folder: str, names: Sequence[str]) -> tuple:
    """(real path, size, mtime in ns) of the weights file a component is loaded from (the first of
    ``names`` in ``folder``, as the loaders pick it): stands for its params in equality tests."""
    path = _first_existing(folder, names)
    st = os.stat(path)
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def check_layout(path: str, from_pt: bool | None = None) -> bool:
    """Validate a local diffusers Stable Diffusion directory; returns ``from_pt`` (resolved when None:
    Flax weights when all three are present, else PyTorch weights).

    Raises FileNotFoundError naming the missing folder / file, ValueError for another pipeline class.
    """
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Stable Diffusion directory {path!r} does not exist")
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise FileNotFoundError(f"{path!r} is not a diffusers pipeline directory: it has no model_index.json")
    index = _read_json(index_file)
    cls = index.get("_class_name")
    if cls not in PIPELINE_CLASSES:
        raise ValueError(f"{index_file}: _class_name is {cls!r}, not a Stable Diffusion text-to-image pipeline "
                         f"(expected one of {list(PIPELINE_CLASSES)})")
    for comp in COMPONENTS:
        folder = os.path.join(path, comp)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"Stable Diffusion directory {path!r} has no {comp}/ subfolder")
        for name in CONFIG_FILES[comp]:
            if not os.path.isfile(os.path.join(folder, name)):
                raise FileNotFoundError(f"Stable Diffusion directory {path!r}: missing {comp}/{name}")

    def missing(table):
        return [f"{c}/{' or '.join(names)}" for c, names in table.items()
                if _first_existing(os.path.join(path, c), names) is None]

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


def _download(repo_id: str, revision: str | None, from_pt: bool | None) -> tuple[str, bool]:
    """Fetch the files of a hub repo that loading needs (configs, tokenizer, one set of weights)."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = set(list_repo_files(repo_id, revision=revision))
    except Exception as e:   # not found, gated, offline, ...: say what was tried
        raise FileNotFoundError(f"{repo_id!r} is not a local directory, and listing it as a hub repo "
                                f"(revision={revision!r}) failed: {type(e).__name__}: {e}") from e

    def complete(table):
        return all(any(f"{c}/{n}" in files for n in names) for c, names in table.items())

    if from_pt is None:
        from_pt = not complete(FLAX_WEIGHTS)
    table = PT_WEIGHTS if from_pt else FLAX_WEIGHTS
    weights = []
    for c, names in table.items():
        present = [n for n in names if f"{c}/{n}" in files]
        weights += [f"{c}/{present[0]}"] if present else []
    patterns = ["model_index.json", "*/config.json", "scheduler/*", "tokenizer/*"] + weights
    return snapshot_download(repo_id, revision=revision, allow_patterns=patterns), from_pt


def _cast(params, dtype):
    """Floating leaves cast to ``dtype`` (in numpy: an eager jnp cast would compile once per shape)."""
    def cast(p):
        if not jnp.issubdtype(p.dtype, jnp.floating) or p.dtype == dtype:
            return p
        return jnp.asarray(np.asarray(p).astype(dtype))
    return jax.tree.map(cast, params)


def _check_converted(state: dict, expected: dict, weights_file: str):
    """Keep the converted weights the Flax model expects; ValueError naming missing / mismatched ones."""

    for key, leaf in expected.items():
        if key in state and tuple(state[key].shape) != tuple(leaf.shape):
            raise ValueError(f"{weights_file}: weight {'.'.join(key)} has shape {tuple(state[key].shape)}, the "
                             f"Flax model expects {tuple(leaf.shape)}")
    absent = sorted(".".join(k) for k in set(expected) - set(state))
    if absent:
        raise ValueError(f"{weights_file}: missing {len(absent)} weights, e.g. {absent[:3]}")
    return unflatten_dict({k: jnp.asarray(v, jnp.float32) for k, v in state.items() if k in expected})


def _convert_pt(model, weights_file: str):
    """PyTorch weights (.safetensors / .bin) -> the Flax params of ``model`` (a diffusers Flax model),
    with diffusers' own renaming (its from_pt reads only .bin files)."""
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor  # heavy / optional

    if weights_file.endswith(".safetensors"):
        from safetensors.numpy import load_file    # only to read .safetensors weights
        state = load_file(weights_file)
    else:
        import torch    # optional (the torch extra): only to read PyTorch weights
        state = {k: v.float().numpy() for k, v in torch.load(weights_file, map_location="cpu",
                                                              weights_only=True).items()}
    expected = flatten_dict(jax.eval_shape(model.init_weights, jax.random.PRNGKey(0)))
    out = {}
    for pt_key, tensor in state.items():
        key, tensor = rename_key_and_reshape_tensor(tuple(rename_key(pt_key).split(".")), np.asarray(tensor),
                                                    expected)
        out[key] = tensor
    return _check_converted(out, expected, weights_file)


def _load_text_encoder(folder: str, dtype, from_pt: bool):
    """(FlaxCLIPTextModel, params) without running its random init (transformers' from_pt would)."""
    from transformers import CLIPTextConfig, FlaxCLIPTextModel  # heavy / optional

    if not from_pt:
        return FlaxCLIPTextModel.from_pretrained(folder, dtype=dtype, _do_init=False)
    import types
    from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict  # heavy / optional

    model = FlaxCLIPTextModel(CLIPTextConfig.from_pretrained(folder), dtype=dtype, _do_init=False)
    shapes = model.params_shape_tree
    weights_file = _first_existing(folder, PT_WEIGHTS["text_encoder"])
    proxy = types.SimpleNamespace(params=shapes, base_model_prefix=model.base_model_prefix)
    state = flatten_dict(load_pytorch_checkpoint_in_flax_state_dict(proxy, weights_file, is_sharded=False))
    return model, _check_converted(state, flatten_dict(shapes), weights_file)


def _load_diffusers_model(cls, folder: str, dtype, from_pt: bool):
    if not from_pt:
        return cls.from_pretrained(folder, dtype=dtype)
    config = cls.load_config(folder)
    model = cls.from_config(config, dtype=dtype)
    return model, _convert_pt(model, _first_existing(folder, PT_WEIGHTS[os.path.basename(folder)]))


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


def load_stable_diffusion(path_or_hub_id: str | os.PathLike, *, dtype="float32", from_pt: bool | None = None,
                          revision: str | None = None) -> StableDiffusion:
    """Load a diffusers Stable Diffusion (1.x / 2.x) from a local directory or a hub id.

    dtype: "float32" | "bfloat16" | "float16" (params cast to it; the networks compute in it).
    from_pt: None = Flax weights when present, else convert the PyTorch ones; True / False forces.
    revision: a hub branch / tag / commit (hub ids only).
    Raises ValueError (bad dtype, not an SD layout, unsupported model) or FileNotFoundError
    (missing folder / file, naming it) before any model is built.
    """
    dtype = _dtype_name(dtype)
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

    sched_file = os.path.join(path, "scheduler", "scheduler_config.json")
    sched_cfg = _read_json(sched_file)
    schedule, prediction = _scheduler_settings(sched_cfg, sched_file)
    unet_cfg = _read_json(os.path.join(path, "unet", "config.json"))
    text_cfg = _read_json(os.path.join(path, "text_encoder", "config.json"))
    vae_cfg = _read_json(os.path.join(path, "vae", "config.json"))
    where = os.path.join(path, "unet", "config.json")
    if unet_cfg.get("addition_embed_type") is not None:
        raise ValueError(f"{where}: addition_embed_type={unet_cfg['addition_embed_type']!r} (an SDXL-style UNet) "
                         "is not supported")
    if unet_cfg.get("in_channels", 4) != unet_cfg.get("out_channels", 4):
        raise ValueError(f"{where}: in_channels={unet_cfg.get('in_channels')} != out_channels="
                         f"{unet_cfg.get('out_channels')} (an inpainting / depth UNet) is not supported")
    if unet_cfg.get("in_channels", 4) != vae_cfg.get("latent_channels", 4):
        raise ValueError(f"{where}: in_channels={unet_cfg.get('in_channels')} does not match the VAE's "
                         f"latent_channels={vae_cfg.get('latent_channels')}")
    if unet_cfg.get("cross_attention_dim") != text_cfg.get("hidden_size"):
        raise ValueError(f"{where}: cross_attention_dim={unet_cfg.get('cross_attention_dim')} does not match the "
                         f"text encoder's hidden_size={text_cfg.get('hidden_size')}")

    jdt = DTYPES[dtype]
    with quiet_libraries():   # diffusers' Flax modules log a deprecation warning when imported
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # heavy / optional
        from transformers import CLIPTokenizer  # heavy / optional

        unet, unet_params = _load_diffusers_model(FlaxUNet2DConditionModel, os.path.join(path, "unet"), jdt, from_pt)
        vae, vae_params = _load_diffusers_model(FlaxAutoencoderKL, os.path.join(path, "vae"), jdt, from_pt)
        text_encoder, text_params = _load_text_encoder(os.path.join(path, "text_encoder"), jdt, from_pt)
        tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    unet_params, vae_params = _cast(unet_params, jdt), _cast(vae_params, jdt)
    text_params = _cast(text_params, jdt)
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    null = _encode(_text_model(text_encoder, dtype), text_params, tokenizer, [""])[0]
    return StableDiffusion(
        unet=unet, unet_params=unet_params, vae=vae, vae_params=vae_params, text_encoder=text_encoder,
        text_params=text_params, tokenizer=tokenizer, schedule=schedule, scheduler_config=dict(sched_cfg),
        prediction_type=prediction, vae_scaling_factor=float(vae.config.scaling_factor),
        latent_channels=int(vae.config.latent_channels), vae_factor=vae_factor,
        image_size=int(unet.config.sample_size) * vae_factor, null_embedding=null,
        eps_fn=UNetEps(unet, prediction, schedule, dtype), dtype=dtype, source=source,
        vae_weights_id=_weights_id(os.path.join(path, "vae"), (PT_WEIGHTS if from_pt else FLAX_WEIGHTS)["vae"]))


# ----------------------------------------------------------------------------- a tiny SD for tests


SD_V1_SCHEDULER = {
    "_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
    "clip_sample": False, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "trained_betas": None,
}


def tiny_configs(sample_size: int = 8, text_dim: int = 32, vocab_size: int = 1000) -> dict:
    """Configs of a tiny SD: UNet (32, 64) channels, 4-block VAE (factor 8), 2-layer CLIP text encoder."""
    unet = dict(sample_size=sample_size, in_channels=4, out_channels=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                layers_per_block=1, attention_head_dim=4, cross_attention_dim=text_dim)
    vae = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
               up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 16, 16, 16), layers_per_block=1,
               latent_channels=4, norm_num_groups=8, sample_size=sample_size * 8)
    text = dict(vocab_size=vocab_size, hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=77, projection_dim=text_dim, hidden_act="quick_gelu")
    return {"unet": unet, "vae": vae, "text_encoder": text}


def random_params(init_fn, rng: np.random.Generator):
    """Random params with the structure of ``init_fn(key)`` without running (or compiling) it:
    kernels N(0, 1 / fan_in), embeddings N(0, 0.5^2), norm scales 1 + N(0, 0.02^2), biases N(0, 0.02^2).
    Building a tiny model's params this way takes milliseconds instead of an XLA compilation."""

    shapes = flatten_dict(jax.eval_shape(init_fn, jax.random.PRNGKey(0)))
    out = {}
    for key, leaf in shapes.items():
        shape, name = tuple(leaf.shape), key[-1]
        z = rng.standard_normal(shape).astype(np.float32)
        if name == "kernel":
            z = z / np.sqrt(max(1, int(np.prod(shape[:-1]))))
        elif name == "embedding":
            z = 0.5 * z
        elif name == "scale":
            z = 1.0 + 0.02 * z
        else:
            z = 0.02 * z
        out[key] = jnp.asarray(z, leaf.dtype)
    return unflatten_dict(out)


def write_tiny_tokenizer(directory: str, extra_merges: int = 200):
    """A CLIPTokenizer (vocab.json + merges.txt) with CLIP's 512 byte-level symbols, ``extra_merges``
    merges of frequent English letter pairs, and the start / end tokens (end = the highest id, as in
    CLIP). Any text tokenizes without unknown tokens. Returns the tokenizer."""
    from transformers import CLIPTokenizer    # heavy; used only when a model is built from it (and for its configs)
    from transformers.models.clip.tokenization_clip import bytes_to_unicode  # heavy / optional

    os.makedirs(directory, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    merges = []
    for a in letters:
        for b in letters:
            if len(merges) < extra_merges:
                merges.append((a, b + "</w>") if (len(merges) % 2) else (a, b))
    vocab += [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(merges_file, "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with quiet_libraries():
        tok = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
        tok.save_pretrained(directory)
    return tok


def write_tiny_sd(directory: str | os.PathLike, seed: int = 0, *, framework: str = "flax",
                  sample_size: int = 8, scheduler_config: dict | None = None) -> str:
    """Write a tiny random-weight Stable Diffusion in diffusers' layout; returns the directory.

    framework: "flax" (diffusion_flax_model.msgpack / flax_model.msgpack) or "pt" (diffusers'
    UNet2DConditionModel / AutoencoderKL and transformers' CLIPTextModel, .safetensors; needs torch).
    sample_size: latent size (the image is 8x larger). scheduler_config: replaces SD v1.x's
    (PNDM, scaled_linear, steps_offset 1, set_alpha_to_one False, clip_sample False) keys.
    ``FlaxStableDiffusionPipeline.from_pretrained(directory, safety_checker=None,
    feature_extractor=None)`` loads the Flax one.
    """
    if framework not in ("flax", "pt"):
        raise ValueError(f"write_tiny_sd: framework must be 'flax' or 'pt', got {framework!r}")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    tok = write_tiny_tokenizer(os.path.join(directory, "tokenizer"))
    vocab = tok.get_vocab()
    cfg = tiny_configs(sample_size=sample_size, vocab_size=len(vocab))
    cfg["text_encoder"].update(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                               pad_token_id=vocab["<|endoftext|>"])
    sched = dict(SD_V1_SCHEDULER, **(scheduler_config or {}))
    with quiet_libraries():
        from transformers import CLIPTextConfig  # heavy / optional
        text_config = CLIPTextConfig(**cfg["text_encoder"])
        if framework == "flax":
            from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel  # heavy / optional
            from transformers import FlaxCLIPTextModel  # heavy / optional

            rng = np.random.default_rng(seed)
            unet = FlaxUNet2DConditionModel(**cfg["unet"])
            unet.save_pretrained(os.path.join(directory, "unet"), params=random_params(unet.init_weights, rng))
            vae = FlaxAutoencoderKL(**cfg["vae"])
            vae_params = random_params(vae.init_weights, rng)
            # a smaller output layer keeps the random decoder's pixels mostly inside [-1, 1]
            out = vae_params["decoder"]["conv_out"]
            out["kernel"] = 0.3 * out["kernel"]
            vae.save_pretrained(os.path.join(directory, "vae"), params=vae_params)
            text = FlaxCLIPTextModel(text_config, _do_init=False)
            text.save_pretrained(os.path.join(directory, "text_encoder"),
                                 params=random_params(lambda k: text.init_weights(k, (1, 77)), rng))
        else:
            import torch    # optional (the torch extra): only to read PyTorch weights
            from diffusers import AutoencoderKL, UNet2DConditionModel  # heavy / optional
            from transformers import CLIPTextModel  # heavy / optional

            torch.manual_seed(seed)
            UNet2DConditionModel(**cfg["unet"], norm_num_groups=32).save_pretrained(os.path.join(directory, "unet"))
            vae = AutoencoderKL(**cfg["vae"])
            with torch.no_grad():
                vae.decoder.conv_out.weight.mul_(0.3)   # as for Flax: pixels mostly inside [-1, 1]
            vae.save_pretrained(os.path.join(directory, "vae"))
            CLIPTextModel(text_config).save_pretrained(os.path.join(directory, "text_encoder"))
    os.makedirs(os.path.join(directory, "scheduler"), exist_ok=True)
    with open(os.path.join(directory, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    import diffusers    # heavy; used only when a model is built from it (and for its configs)

    # what each library's pipeline.save_pretrained writes: Flax class names for Flax weights
    flax = "Flax" if framework == "flax" else ""
    index = {"_class_name": f"{flax}StableDiffusionPipeline", "_diffusers_version": diffusers.__version__,
             "feature_extractor": [None, None], "safety_checker": [None, None],
             "scheduler": ["diffusers", flax + sched["_class_name"]],
             "text_encoder": ["transformers", f"{flax}CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", f"{flax}UNet2DConditionModel"], "vae": ["diffusers", f"{flax}AutoencoderKL"]}
    if framework == "pt":
        index["requires_safety_checker"] = False
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return directory


__all__ = [
    "DTYPES", "SD_V1_SCHEDULER", "StableDiffusion", "check_image_size", "check_layout", "encode_prompts",
    "load_stable_diffusion", "quiet_libraries", "sampler_config_from_scheduler", "sd_denoiser", "sd_sampler_config",
    "tiny_configs", "tokenize", "write_tiny_sd", "write_tiny_tokenizer", "random_params", "SCHEDULER_DEFAULTS",
    "UNetEps", "VAEDecode",
]
