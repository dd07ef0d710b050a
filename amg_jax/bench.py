"""`amg bench`: how fast amg_jax samples, guides and searches; every figure is a ratio against a
reference measured in the same run (or an absolute time with its reference beside it).

    from amg_jax import bench
    report = bench.main("bench_out", quick=True)        # writes bench_out/bench.json + bench.md

Parts (``PARTS``; ``main(..., parts=[...])`` runs a subset):

- ``pipeline``: plain CFG sampling (DDIM) with ``samplers.sample`` on ``sd_denoiser`` against
  diffusers' ``FlaxStableDiffusionPipeline`` on the same random-weight SD and batch, through its
  documented ``pmap`` path (``jit=True``, replicated params, sharded prompt ids; one device). Both
  sides encode the prompts, sample from the same initial latents and VAE-decode to host images,
  so the images must agree (``max_abs_diff``, on [0, 1] pixels). Target: ours >= 1.2x its images/s.
- ``amg``: AMG against plain CFG on the same model, batch and seeds: gate closed all the way
  (thresholds no sample reaches), open every step (``threshold="always"``, full and cheap
  gradient), and the realistic mix (the trained ``unet-text`` with its bank and default distance
  gate, on prompts that copy); pixel detector on ``unet-text``, SSCD through the VAE on SD
  (a tiny SSCD; the ResNet-50 one too unless quick). Targets: gate closed <= 1.15x CFG (pixel),
  <= 1.6x (SSCD through the VAE).
- ``search``: top-1 cosine search (``index.search``) of a batch of 8 L2-normalised 512-d
  queries in banks of 1k .. 1M rows, exact and approximate (``approx=True``), against one CFG
  denoiser call of the SD UNet. Target: 1M-row top-1 a small fraction (<= 10%) of a denoiser
  step on a GPU.
- ``devices``: ``sharding.sample_sharded`` (CFG on SD) over meshes of the first 1, 2, 4 devices,
  same global batch: images/s per device count (simulated CPU devices share the cores).

Timing: each function is called once (compile + run: ``first_call_s``), then ``repeats`` times;
the figure is the median of those steady-state times, each ended by ``jax.block_until_ready``.
``compile_s`` = first call - median (an estimate: the first call also runs once). Peak device
memory is read from ``jax.devices()[0].memory_stats()`` after each part where the backend
reports it (GPU / TPU; "n/a" on CPU); it is the process' peak so far, not the part's own.

Models: ``sd_size="tiny"`` is ``write_tiny_sd``'s model (64x64 images); ``"1.5"`` builds an
SD-1.5-sized random-weight model in memory (diffusers' default UNet2DConditionModel:
block_out_channels (320, 640, 1280, 1280), cross_attention_dim 768; SD's VAE and a CLIP-L-sized
text encoder; 512x512 images; only meaningful on an accelerator); ``sd_path`` benchmarks a
diffusers SD directory instead (``sd``: an SD already loaded). ``quick=True`` uses the tiny model,
3 steps, batch 4 and banks up to 10k, and leaves out the gate-open AMG loops (the per-step
components still time the open gate's work): under 2 minutes on 2 quiet CPU cores, most of it XLA
compiling the two AMG sampling loops (30-60 s each on a CPU).
``tiny=True`` is smaller still and replaces AMG by its despecification-only form (no ``lax.cond``
branch to compile): the tests' setting, for the plumbing, not for AMG's cost.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PARTS = ("pipeline", "amg", "search", "devices")
SD_SIZES = ("tiny", "1.5")
FORMAT = "amg_jax.bench"
FORMAT_VERSION = 1
GUIDANCE_SCALE = 7.5            # CFG scale on SD (both sides of the pipeline comparison)
QUERY_BATCH = 8                 # queries per search call
EMBED_DIM = 512                 # search rows: SSCD-sized embeddings
SEARCH_FRACTION = 0.1           # "a small fraction of a denoiser step"
DEVICE_COUNTS = (1, 2, 4)
PROMPT_WORDS = ("a red cube", "a blue sphere on grass", "a photo of a cat", "a white house at night",
                "an oil painting of a ship", "a green apple", "a city street in the rain", "a yellow flower")

TARGETS = {
    "pipeline": "plain CFG sampling >= 1.2x the images/s of diffusers' FlaxStableDiffusionPipeline",
    "amg": "AMG with the gate closed <= 1.15x plain CFG's time (pixel detector), <= 1.6x (SSCD through the VAE)",
    "search": f"top-1 search in a 1M-row bank <= {SEARCH_FRACTION:.0%} of one SD denoiser step, on a GPU",
    "devices": "none (images/s as the device count grows, the global batch fixed)",
}
RATIO_MEANING = {
    "pipeline": "images/s relative to diffusers' pipeline",
    "amg": "time relative to plain CFG on the same model, batch and seeds (components: relative to one CFG step)",
    "search": "time of one search call (8 queries) relative to one CFG denoiser call of the SD UNet",
    "devices": "images/s relative to one device",
}


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one bench run measures (built by ``settings``; validated there).

    steps / batch:      DDIM steps and batch of the SD runs (pipeline, amg, search reference).
    unet_batch / unet_steps: batch and steps of the ``unet-text`` runs (amg part).
    device_batch:       the fixed global batch of the devices part (a multiple of 4).
    repeats:            timed calls after the warm-up call (the median is reported).
    bank_sizes:         search bank rows; 1M is dropped when memory does not allow it.
    sscd_resnet50:      also time AMG with the full ResNet-50 SSCD on SD.
    """

    quick: bool
    tiny: bool
    sd_size: str
    sd_path: str | None
    steps: int
    batch: int
    unet_steps: int
    unet_batch: int
    device_batch: int
    repeats: int
    bank_sizes: tuple
    sscd_resnet50: bool
    seed: int = 0


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ValueError(f"bench: {name} must be an integer >= 1, got {v!r}")
    return int(v)


def parse_parts(parts) -> tuple:
    """``parts`` (None = all, a comma-separated string or an iterable of names) -> a tuple of
    ``PARTS`` names in the order given, without repeats; ValueError naming an unknown one."""
    if parts is None:
        return PARTS
    if isinstance(parts, str):
        parts = [p.strip() for p in parts.split(",") if p.strip()]
    parts = list(parts)
    bad = [p for p in parts if p not in PARTS]
    if bad:
        raise ValueError(f"bench: unknown part {bad[0]!r}; choose from {list(PARTS)}")
    if not parts:
        raise ValueError(f"bench: no parts given; choose from {list(PARTS)}")
    return tuple(dict.fromkeys(parts))


def settings(*, quick: bool = False, tiny: bool = False, sd_size: str = "tiny", sd_path: str | None = None,
             steps: int | None = None, batch: int | None = None, repeats: int | None = None,
             seed: int = 0) -> Settings:
    """The run's ``Settings``: full (50 steps, batch 8, banks to 1M), ``quick`` (tiny SD, 3 steps,
    batch 4, banks to 10k) or ``tiny`` (2 steps, batch 2, a 1k bank: the tests' setting);
    ``steps`` / ``batch`` / ``repeats`` override the SD runs' values. Quick and tiny runs use
    the tiny SD whatever ``sd_size`` says. ValueError naming a bad value."""
    if sd_size not in SD_SIZES:
        raise ValueError(f"bench: sd_size must be one of {list(SD_SIZES)}, got {sd_size!r}")
    if sd_path is not None and not os.path.isdir(os.fspath(sd_path)):
        raise ValueError(f"bench: sd_path {sd_path!r} is not a directory (a diffusers Stable Diffusion layout)")
    if tiny:
        base = dict(steps=2, batch=2, unet_steps=2, unet_batch=2, device_batch=4, repeats=1,
                    bank_sizes=(1_000,), sscd_resnet50=False)
    elif quick:
        base = dict(steps=3, batch=4, unet_steps=4, unet_batch=4, device_batch=4, repeats=3,
                    bank_sizes=(1_000, 10_000), sscd_resnet50=False)
    else:
        base = dict(steps=50, batch=8, unet_steps=50, unet_batch=32, device_batch=8, repeats=5,
                    bank_sizes=(1_000, 10_000, 100_000, 1_000_000), sscd_resnet50=True)
    if steps is not None:
        base["steps"] = _positive_int("steps", steps)
    if batch is not None:
        base["batch"] = _positive_int("batch", batch)
        base["device_batch"] = max(4, -(-base["batch"] // 4) * 4)
    if repeats is not None:
        base["repeats"] = _positive_int("repeats", repeats)
    size = "tiny" if (quick or tiny) and sd_path is None else sd_size
    return Settings(quick=bool(quick), tiny=bool(tiny), sd_size=size,
                    sd_path=None if sd_path is None else os.fspath(sd_path), seed=int(seed), **base)


# ----------------------------------------------------------------------------- timing


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict, Any]:
    """Call ``fn`` once (compile + run), then ``repeats`` times; each call is ended by
    ``jax.block_until_ready``. Returns ``({"seconds": median steady-state time, "first_call_s",
    "compile_s": first call - median, "repeats", "spread": (max - min) / median}, first output)``."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    med = float(statistics.median(times))
    return {"seconds": med, "first_call_s": first, "compile_s": max(first - med, 0.0), "repeats": len(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0}, out


def xla_gflops(jitted, *args) -> float | None:
    """XLA's count of floating-point operations (GFLOP) of one call of ``jitted(*args)``, from its
    lowered program's cost analysis: a hardware-independent measure of the work; None where the
    backend gives none."""
    try:
        cost = jitted.lower(*args).cost_analysis()
    except Exception:   # noqa: BLE001  backends without a cost model raise various errors
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return None if flops is None or flops < 0 else float(flops) / 1e9


def peak_memory_bytes(device=None) -> int | None:
    """The device's peak bytes in use so far (``memory_stats()["peak_bytes_in_use"]``), or None
    where the backend does not report it (CPU)."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:   # noqa: BLE001  backends without the call raise various errors
        return None
    if not stats:
        return None
    v = stats.get("peak_bytes_in_use", stats.get("bytes_in_use"))
    return None if v is None else int(v)


def _free_memory_bytes() -> int | None:
    """Bytes the default device can still allocate: its memory_stats on an accelerator, the host's
    available RAM on CPU; None when unknown."""
    dev = jax.devices()[0]
    try:
        stats = dev.memory_stats()
    except Exception:   # noqa: BLE001
        stats = None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if dev.platform == "cpu":
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return None


def machine() -> dict:
    """Devices, CPU count and library versions of this process."""
    import flax

    versions = {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
                "numpy": np.__version__}
    for name in ("jaxlib", "diffusers", "transformers"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:   # noqa: BLE001  an optional library missing or broken
            versions[name] = None
    devs = jax.devices()
    plat = devs[0].platform
    return {"platform": plat, "device_kinds": [d.device_kind for d in devs], "device_count": len(devs),
            "simulated_devices": plat == "cpu" and len(devs) > 1, "cpu_count": os.cpu_count(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "host": platform.machine(), "versions": versions}


# ----------------------------------------------------------------------------- models


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
    from amg_jax.models import stable_diffusion as sdm
    from amg_jax.schedules import Schedule

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
        from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel
        from transformers import CLIPTextConfig, FlaxCLIPTextModel

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
    from amg_jax.models import stable_diffusion as sdm

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
    from flax.jax_utils import replicate

    from amg_jax.models import stable_diffusion as sdm

    with sdm.quiet_libraries():
        from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline

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
        from amg_jax.models.stable_diffusion import sd_denoiser

        return sd_denoiser(self.sd)

    def prompts(self, n: int) -> list:
        return [PROMPT_WORDS[i % len(PROMPT_WORDS)] for i in range(n)]

    def keys(self, n: int):
        from amg_jax.samplers import keys_from_seeds

        return keys_from_seeds(self.s.seed + np.arange(n))

    @functools.cached_property
    def unet_text(self):
        from amg_jax import workbench

        return workbench.load_trained("unet-text")


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


def part_pipeline(env: _Shared) -> dict:
    """amg_jax's CFG sampling against diffusers' Flax pipeline (same model, batch, latents)."""
    from amg_jax.guidance import CFG
    from amg_jax.models import stable_diffusion as sdm
    from amg_jax.samplers import initial_noise, sample

    s, sd, den = env.s, env.sd, env.den
    b, n = s.batch, s.steps
    prompts, keys = env.prompts(b), env.keys(b)
    sampler = sdm.sd_sampler_config(sd, n, "ddim")
    guidance = CFG(scale=GUIDANCE_SCALE)
    x_T = initial_noise(keys, tuple(den.sample_shape))

    def ours():           # what the pipeline does: prompts -> embeddings -> sampling -> pixels on the host
        cond = sdm.encode_prompts(sd, prompts)
        x0 = sample(den, guidance, sampler, keys, cond, x_T=x_T).x0
        return np.asarray(sd.decode(x0))

    cond = sdm.encode_prompts(sd, prompts)

    def loop():
        return sample(den, guidance, sampler, keys, cond, x_T=x_T).x0

    pipe, p_params = diffusers_pipeline(sd)
    latents = jnp.transpose(x_T, (0, 3, 1, 2))[None]                  # [1 device, B, C, h, w]
    rng = jax.random.split(jax.random.PRNGKey(s.seed), 1)
    h = w = sd.image_size

    def theirs():
        ids = pipe.prepare_inputs(prompts)[None]                       # shard: [1 device, B, 77]
        with sdm.quiet_libraries():
            return pipe(ids, p_params, rng, n, h, w, guidance_scale=GUIDANCE_SCALE, latents=latents,
                        jit=True).images

    t_ours, img_ours = timed(ours, s.repeats)
    env.echo(f"[pipeline] amg_jax (encode + sample + decode): {t_ours['seconds']:.3f} s per batch of {b}")
    t_loop, _ = timed(loop, s.repeats)
    env.echo(f"[pipeline] amg_jax sampling loop only: {t_loop['seconds']:.3f} s")
    t_theirs, img_theirs = timed(theirs, s.repeats)
    env.echo(f"[pipeline] diffusers FlaxStableDiffusionPipeline: {t_theirs['seconds']:.3f} s")
    ref = b / t_theirs["seconds"]
    rows = [
        _rate_row("amg_jax: encode + sample (CFG, DDIM) + VAE decode", t_ours, b, ratio=(b / t_ours["seconds"]) / ref),
        _rate_row("amg_jax: sampling loop only (jit + lax.scan)", dict(t_loop, compile_s=None), b,
                  ratio=(b / t_loop["seconds"]) / ref),
        _rate_row("diffusers FlaxStableDiffusionPipeline (pmap, jit=True, 1 device)", t_theirs, b, ratio=1.0,
                  reference=True),
    ]
    ours01 = (np.asarray(img_ours, np.float32) + 1.0) / 2.0
    theirs01 = np.asarray(img_theirs, np.float32).reshape(ours01.shape)
    diff = float(np.abs(ours01 - theirs01).max())
    ratio = rows[0]["ratio"]
    return {"title": "plain CFG sampling vs diffusers' FlaxStableDiffusionPipeline",
            "model": env.sd_label(), "image_size": sd.image_size, "batch": b, "steps": n, "sampler": "ddim",
            "guidance_scale": GUIDANCE_SCALE, "rows": rows, "max_abs_diff": diff, "met": bool(ratio >= 1.2),
            "headline": f"ours / pipeline images/s = {ratio:.2f}x",
            "notes": ["both sides tokenize + encode the prompts, sample from the same initial latents and decode to "
                      "host images; max_abs_diff compares their [0, 1] pixels",
                      "the pipeline is built from the same modules and params (FlaxDDIMScheduler from the model's "
                      "scheduler config, no safety checker)"]
            + (["on the tiny SD a call is a few ms of model work, so fixed host work (tokenizing, input checks, "
                "separate encode / sample / decode dispatches) weighs in; the loop-only row is the sampler itself"]
               if s.sd_size == "tiny" and s.sd_path is None and env.given_sd is None else [])}


# ----------------------------------------------------------------------------- part: amg


CLOSED = "AMG gate closed all the way"
OPEN_FULL = "AMG gate open every step, full gradient"
OPEN_CHEAP = "AMG gate open every step, cheap gradient"
REALISTIC = "AMG default gate, prompts that copy (realistic mix)"
COMPACT = "AMG default gate, realistic mix, open_batch=B/4"
DETECT_EVERY = 3
CLOSED_K = f"AMG gate closed all the way, detect_every={DETECT_EVERY}"
SPE_ONLY = "AMG despecification only, gate closed (tiny setting: no lax.cond to compile)"


def _amg_rows(env: _Shared, group: str, den, cfg_guidance, variants: list, keys, cond, steps_cfg,
              repeats: int) -> list:
    """Time plain CFG, then each (name, guidance) of ``variants``; rows carry ratio = time / CFG's."""
    from amg_jax.samplers import sample

    rows = []
    t_cfg, _ = timed(lambda: sample(den, cfg_guidance, steps_cfg, keys, cond).x0, repeats)
    rows.append(dict(group=group, name="plain CFG", ratio=1.0, reference=True, **t_cfg))
    env.echo(f"[amg] {group}: plain CFG {t_cfg['seconds']:.3f} s")
    for name, g in variants:
        t, res = timed(lambda g=g: sample(den, g, steps_cfg, keys, cond), repeats)
        row = dict(group=group, name=name, ratio=t["seconds"] / t_cfg["seconds"], **t, **_gate_stats(res.trace))
        rows.append(row)
        env.echo(f"[amg] {group}: {name} {t['seconds']:.3f} s = {row['ratio']:.2f}x CFG"
                 + (f" (gate open {row['gate_open']:.0%} of sample-steps)" if "gate_open" in row else ""))
    return rows


def _unet_text_group(env: _Shared) -> tuple[list, dict]:
    """AMG on the trained unet-text (pixel detector over its bank, the distance gate) vs CFG."""
    from amg_jax import workbench
    from amg_jax.data import testbed as tb
    from amg_jax.samplers import SamplerConfig

    s = env.s
    lm = env.unet_text
    name = "unet-text"
    scale = workbench.model_scale(name)
    detector = workbench.model_detector(name)
    by_kind = tb.prompts_by_kind(lm.bed)
    # prompts that copy: duplicated captions (CFG copies ~90%) alternating with specific ones (~48%)
    pool = np.stack([by_kind["duplicated"][:8], by_kind["specific"][:8]], axis=1).reshape(-1)
    cond = jnp.asarray(pool[np.arange(s.unet_batch) % len(pool)], jnp.int32)
    keys = env.keys(s.unet_batch)
    sampler = SamplerConfig("ddim", num_steps=s.unet_steps)
    base = workbench.model_amg(name)

    def amg(**over):
        return workbench.method_guidance("amg", scale, bed=lm.bed, detector=detector, bank=lm.bank,
                                         amg=dict(base, **over))

    group = f"{name} (pixel {detector} detector, {len(lm.bank.rows)}-row bank)"
    if s.tiny:
        shut = dict(threshold="constant", lambda_min=-1e-9, lambda_max=-1e-9)
        variants = [(SPE_ONLY, amg(**shut, dedup=False, dissimilar=False))]
    else:
        realistic = amg()
        variants = [(CLOSED, out_of_reach(realistic)), (REALISTIC, realistic)]
        if not s.quick:     # three more AMG programs to compile (30-60 s each on a CPU)
            variants[1:1] = [(OPEN_FULL, amg(threshold="always")),
                             (OPEN_CHEAP, amg(threshold="always", gradient="cheap"))]
            if s.unet_batch >= 8:
                variants.append((COMPACT, amg(open_batch=s.unet_batch // 4)))
    cfg = workbench.method_guidance("cfg", scale)
    rows = _amg_rows(env, group, lm.denoiser, cfg, variants, keys, cond, sampler, s.repeats)
    if not s.tiny:
        rows += _components(env, group, lm.denoiser, amg().detector, cond, rows[0]["seconds"] / s.unet_steps, scale)
    info = {"model": name, "batch": s.unet_batch, "steps": s.unet_steps, "guidance_scale": scale,
            "detector": detector, "amg": base}
    return rows, info


def out_of_reach(guidance, shift: float = 100.0):
    """``guidance`` (AMG with a pixel detector) with its bank moved ``shift`` away in every pixel: the
    distance gate never opens, and the program is the one ``guidance`` compiles to (the bank is a
    traced argument, its static metadata unchanged), so the gate-closed row costs no compilation
    and differs from the realistic run by the gate alone."""
    bank = guidance.detector.bank
    rows = bank.rows + jnp.asarray(shift, bank.rows.dtype)
    far = bank.replace(rows=rows, sq_norms=jnp.sum(jnp.square(rows), axis=1))
    return dataclasses.replace(guidance, detector=guidance.detector.replace(bank=far))


def _components(env: _Shared, group: str, den, detector, cond, cfg_step_s: float, scale: float,
                full_gradient: bool = True) -> list:
    """Where a step's time goes, each part jitted on its own and relative to one step of the CFG
    loop: one CFG denoiser call [2B], one detector call [B], and what an open gate adds: the
    cheap G_sim gradient (through the detector only) and the full one (``jax.grad`` of
    sigma(x0_hat(x_t)) through the CFG denoiser call: its forward again plus its backward)."""
    from amg_jax.guidance.base import x0_from_eps

    b = int(cond.shape[0])
    x = jax.random.normal(jax.random.key(1), (b,) + tuple(den.sample_shape))
    cond2 = jnp.concatenate([jnp.broadcast_to(den.null_cond, cond.shape), cond])
    t = jnp.full((2 * b,), 500, jnp.int32)
    ab = jnp.asarray(0.5, jnp.float32)

    def cfg_eps(d, xx, cc):
        e = d.eps_fn(d.params, jnp.concatenate([xx, xx]), t, cc)
        return e[:b] + scale * (e[b:] - e[:b])

    eps = jax.jit(lambda d, xx, tt, cc: d.eps_fn(d.params, xx, tt, cc))
    det = jax.jit(lambda d, xx: d(xx).sigma)
    cheap = jax.jit(jax.grad(lambda xx, d: jnp.sum(d(xx).sigma)))
    full = jax.jit(jax.grad(lambda xx, d, dd, cc: jnp.sum(dd(x0_from_eps(xx, cfg_eps(d, xx, cc), ab)).sigma)))
    x2 = jnp.concatenate([x, x])
    parts = [(f"component: one denoiser call [2B = {2 * b}]", eps, (den, x2, t, cond2)),
             (f"component: one detector call [B = {b}]", det, (detector, x)),
             (f"component: cheap G_sim gradient (detector backward) [B = {b}]", cheap, (x, detector))]
    if full_gradient:
        parts.append((f"component: full G_sim gradient (CFG call [2B] forward + backward, detector) [B = {b}]",
                      full, (x, den, detector, cond2)))
    rows = []
    for name, fn, args in parts:
        tm, _ = timed(lambda fn=fn, args=args: fn(*args), env.s.repeats)
        rows.append(dict(group=group, name=name, kind="component", ratio=tm["seconds"] / cfg_step_s,
                         gflops=xla_gflops(fn, *args), **tm))
    env.echo(f"[amg] {group}: one CFG loop step {cfg_step_s * 1e3:.2f} ms; "
             + ", ".join(f"{r['name'].split(': ', 1)[1]} {r['seconds'] * 1e3:.2f} ms" for r in rows))
    return rows


def _sscd_group(env: _Shared, sscd_config, label: str, open_rows: bool = True) -> tuple[list, dict]:
    """AMG with SSCD through the VAE (``latent_detector``) on the bench's SD vs CFG."""
    from amg_jax import sd_guidance as sg
    from amg_jax.index import build_bank
    from amg_jax.models import stable_diffusion as sdm
    from amg_jax.similarity import sscd

    s, sd, den = env.s, env.sd, env.den
    b = s.batch
    keys, cond = env.keys(b), sdm.encode_prompts(sd, env.prompts(b))
    params = sscd.init_params(sscd_config, seed=s.seed)
    m, captions = 1000, 4
    emb = np.random.default_rng(s.seed).standard_normal((m, sscd_config.embed_dim)).astype(np.float32)
    bank = build_bank(emb, np.arange(m, dtype=np.int32) % captions, kind="embedding", normalize=True,
                      scale_rows=256)
    det = sg.latent_detector(sd, "sscd", (params, sscd_config), bank)
    conds = sdm.encode_prompts(sd, env.prompts(captions))          # y_N of G_dup: one UNet pass more when open

    def amg(**over):
        return sg.method_guidance("amg", GUIDANCE_SCALE, detector=det, neighbour_conds=conds, amg=over)

    shut = dict(threshold="constant", lambda_min=0.999999, lambda_max=0.999999)
    if s.tiny:
        variants = [(SPE_ONLY, amg(**shut, dedup=False, dissimilar=False))]
    else:
        variants = [(CLOSED, amg(**shut))]
        if not s.quick:   # one more AMG program: the detection held for DETECT_EVERY steps
            variants.append((CLOSED_K, amg(**shut, detect_every=DETECT_EVERY)))
    open_rows = open_rows and sd_open_rows(s)
    if open_rows:
        variants += [(OPEN_FULL, amg(threshold="always")), (OPEN_CHEAP, amg(threshold="always", gradient="cheap"))]
    sampler = sdm.sd_sampler_config(sd, s.steps, "ddim")
    group = f"{env.sd_label()} + {label} through the VAE"
    rows = _amg_rows(env, group, den, sg.method_guidance("cfg", GUIDANCE_SCALE), variants, keys, cond, sampler,
                     s.repeats)
    if not s.tiny:
        rows += _components(env, group, den, det, cond, rows[0]["seconds"] / s.steps, GUIDANCE_SCALE,
                            full_gradient=open_rows)
    info = {"model": env.sd_label(), "detector": label, "sscd_config": sscd_config.to_dict(), "bank_rows": m,
            "batch": b, "steps": s.steps, "amg": dict(sg.SD_AMG)}
    return rows, info


def sd_open_rows(s: Settings) -> bool:
    """Whether the SD groups time the gate open every step: not in quick / tiny runs (each AMG
    variant is a 30-60 s XLA compile on a CPU) and not for an SD-1.5-sized model on a CPU
    (the backward pass through its UNet and VAE takes minutes per step there)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    return not (s.tiny or s.quick or (on_cpu and (s.sd_size != "tiny" or s.sd_path is not None)))


def flop_bound(rows: list, group: str) -> float | None:
    """1 + (the detector call's FLOPs / one CFG denoiser call's), from the group's component rows:
    what a gate-closed step costs relative to a CFG step when time follows FLOPs."""
    comp = {r["name"].split(" [")[0]: r.get("gflops") for r in rows if r["group"] == group and r.get("kind")}
    den, det = comp.get("component: one denoiser call"), comp.get("component: one detector call")
    return None if not den or det is None else 1.0 + det / den


def part_amg(env: _Shared) -> dict:
    """AMG's cost against plain CFG: pixel detector on unet-text, SSCD through the VAE on SD."""
    from amg_jax.similarity import sscd

    s, sd = env.s, env.sd
    rows, groups = [], []
    r, info = _unet_text_group(env)
    rows += r
    groups.append(info)
    size = sd.image_size
    tiny_sscd = sscd.SSCDConfig(stage_sizes=(1, 1), width=8, embed_dim=64, image_size=min(size, 64))
    r, info = _sscd_group(env, tiny_sscd, "tiny SSCD (2 stages, width 8)")
    rows += r
    groups.append(info)
    if s.sscd_resnet50:
        # SSCD's own input size (short side 288) for SD-sized images; the tiny SD's 64px images as they are
        r50 = sscd.SSCDConfig(image_size=288 if size >= 256 else None)
        # on a CPU the gate-open loops through ResNet-50 + the VAE are left out (the tiny SSCD's show
        # the open gate's cost; the components time one cheap gradient through both)
        r, info = _sscd_group(env, r50, "SSCD ResNet-50", open_rows=jax.devices()[0].platform != "cpu")
        rows += r
        groups.append(info)

    def closed(group_prefix: str):
        hit = [x for x in rows if x["name"] == CLOSED and x["group"].startswith(group_prefix)]
        return hit[-1]["ratio"] if hit else None

    pixel = closed("unet-text")
    sscd_groups = [x["group"] for x in rows if "through the VAE" in x["group"]]
    sscd_ratio = closed(sscd_groups[-1]) if sscd_groups else None
    met = None if pixel is None or sscd_ratio is None else bool(pixel <= 1.15 and sscd_ratio <= 1.6)
    head = (f"gate closed: pixel {_fmt(pixel, '.2f')}x CFG, SSCD through the VAE {_fmt(sscd_ratio, '.2f')}x CFG"
            + (f" ({sscd_groups[-1]})" if sscd_groups else ""))
    k_rows = [x for x in rows if x["name"] == CLOSED_K and sscd_groups and x["group"] == sscd_groups[-1]]
    if k_rows:
        head += f"; with detect_every={DETECT_EVERY}: {k_rows[0]['ratio']:.2f}x"
    bound = flop_bound(rows, sscd_groups[-1]) if sscd_groups else None
    if bound is not None:
        head += f"; XLA FLOP count: the SSCD detector call = {bound - 1:.2f} CFG denoiser calls"
    notes = ["'gate closed all the way': the detector runs every step and the lax.cond skips G_dup's pass and the "
             "gradient; on unet-text it is the realistic run's own program with the bank moved out of reach "
             "(+100 in every pixel), on SD thresholds no sample reaches; 'open every step': threshold='always'",
             "SD rows: G_dup's neighbour conditions are 4 encoded captions (one more UNet pass when the gate is open); "
             "the SSCD bank is 1000 random unit rows"]
    if s.tiny:
        notes.insert(0, "tiny setting: AMG runs with despecification only (no lax.cond branch, a 3x smaller program to "
                        "compile); it checks the bench's plumbing, not AMG's cost")
    elif not sd_open_rows(s):
        notes.append("the rows with the gate open every step are left out: "
                     + ("quick setting (each AMG variant is a 30-60 s XLA compilation on a CPU; the components give "
                        "the open gate's cost per step); a full run has them" if s.quick else "an SD-1.5-sized model on a CPU (minutes per backward pass); the "
                        "components give the open gate's cost per step"))
    if s.sd_size == "tiny" and s.sd_path is None:
        notes.append("on the tiny SD the UNet is far smaller than the VAE decoder + SSCD, so the SSCD ratios "
                     "overstate what they are on SD-1.5 (sd_size='1.5')")
    return {"title": "AMG's cost against plain CFG", "groups": groups, "rows": rows, "met": met,
            "closed_ratio_pixel": pixel, "closed_ratio_sscd": sscd_ratio,
            "closed_ratio_sscd_detect_every": k_rows[0]["ratio"] if k_rows else None,
            "sscd_flop_bound": bound, "headline": head, "notes": notes}


# ----------------------------------------------------------------------------- part: search


def random_bank(m: int, dim: int = EMBED_DIM, seed: int = 0):
    """An embedding ``ReferenceBank`` of ``m`` random L2-normalised rows, made on the device
    (``build_bank``'s host-side k-NN scale would take minutes at 1M rows; it is NaN here)."""
    from amg_jax.index import ReferenceBank

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def rows_of(key, m, dim):
        z = jax.random.normal(key, (m, dim), jnp.float32)
        return z / jnp.linalg.norm(z, axis=1, keepdims=True)

    rows = rows_of(jax.random.key(seed), int(m), int(dim))
    return ReferenceBank(rows=rows, sq_norms=jnp.ones((m,), jnp.float32), labels=jnp.full((m,), -1, jnp.int32),
                         source_index=jnp.arange(m, dtype=jnp.int32), sample_shape=(int(dim),), kind="embedding",
                         knn_scale=float("nan"), normalized=True, num_rows=int(m))


def _denoiser_step(env: _Shared) -> dict:
    """One CFG denoiser call of the SD UNet ([2B] latents), jitted, timed."""
    from amg_jax.models import stable_diffusion as sdm

    sd, den, b = env.sd, env.den, env.s.batch
    cond = sdm.encode_prompts(sd, env.prompts(b))
    cond2 = jnp.concatenate([jnp.broadcast_to(den.null_cond, cond.shape), cond])
    x2 = jax.random.normal(jax.random.key(2), (2 * b,) + tuple(den.sample_shape))
    t = jnp.full((2 * b,), 500, jnp.int32)
    eps = jax.jit(lambda d, xx, tt, cc: d.eps_fn(d.params, xx, tt, cc))
    return timed(lambda: eps(den, x2, t, cond2), env.s.repeats)[0]


def part_search(env: _Shared) -> dict:
    """Top-1 cosine search vs bank size, exact and approximate, against one SD denoiser call."""
    from amg_jax.index import search

    s = env.s
    t_step = _denoiser_step(env)
    step_s = t_step["seconds"]
    env.echo(f"[search] reference: one CFG denoiser call of the SD UNet [2B = {2 * s.batch}]: {step_s * 1e3:.2f} ms")
    rows = [dict(name=f"SD UNet: one CFG denoiser call [2B = {2 * s.batch}]", bank_rows=None, approx=None,
                 ms=step_s * 1e3, ratio=1.0, reference=True, **t_step)]
    notes = []
    q = jax.random.normal(jax.random.key(3), (QUERY_BATCH, EMBED_DIM), jnp.float32)
    q = q / jnp.linalg.norm(q, axis=1, keepdims=True)
    for m in s.bank_sizes:
        need = 3 * m * EMBED_DIM * 4
        free = _free_memory_bytes()
        if m >= 1_000_000 and free is not None and free < need:
            notes.append(f"{m:,}-row bank skipped: it needs ~{need / 2 ** 30:.1f} GiB, {free / 2 ** 30:.1f} GiB free")
            env.echo(f"[search] {notes[-1]}")
            continue
        bank = random_bank(m, seed=s.seed)
        exact_idx = None
        for approx in (False, True):
            t, (_, idx) = timed(lambda a=approx, bk=bank: search(bk, q, 1, metric="cosine", approx=a), s.repeats)
            idx = np.asarray(idx)[:, 0]
            row = dict(name=f"top-1 cosine, {m:,} x {EMBED_DIM}, {'approx' if approx else 'exact'}", bank_rows=m,
                       approx=approx, ms=t["seconds"] * 1e3, queries_per_s=QUERY_BATCH / t["seconds"],
                       ratio=t["seconds"] / step_s, **t)
            if approx:
                row["agrees_with_exact"] = float(np.mean(idx == exact_idx))
            else:
                exact_idx = idx
            rows.append(row)
            env.echo(f"[search] {row['name']}: {row['ms']:.3f} ms per batch of {QUERY_BATCH} "
                     f"= {row['ratio']:.3g} denoiser calls")
        del bank
    plat = jax.devices()[0].platform
    one_m = [r for r in rows if r["bank_rows"] == 1_000_000 and r["approx"] is False]
    if one_m and plat == "gpu":
        met = bool(one_m[0]["ratio"] <= SEARCH_FRACTION)
        head = f"1M exact top-1 = {one_m[0]['ratio']:.3f} of a denoiser step"
    else:
        met = None
        biggest = max((r for r in rows if r["bank_rows"]), key=lambda r: (r["bank_rows"], not r["approx"]),
                      default=None)
        head = "it needs the 1M-row bank on a GPU"
        if biggest is not None:
            head += f"; {biggest['bank_rows']:,} rows exact = {biggest['ratio']:.3g} of a denoiser step on {plat}"
    if plat != "tpu":
        notes.append("approx=True uses lax.approx_max_k, which is approximate on TPU only; elsewhere XLA runs an "
                     "exact top-k through it")
    return {"title": "top-1 nearest-neighbour search against one denoiser step", "query_batch": QUERY_BATCH,
            "dim": EMBED_DIM, "metric": "cosine", "rows": rows, "met": met, "headline": head, "notes": notes}


# ----------------------------------------------------------------------------- part: devices


def part_devices(env: _Shared) -> dict:
    """``sample_sharded`` (CFG on SD) over the first 1, 2, 4 devices, the same global batch."""
    from amg_jax.guidance import CFG
    from amg_jax.models import stable_diffusion as sdm
    from amg_jax.sharding import make_mesh, sample_sharded

    s, sd, den = env.s, env.sd, env.den
    b = s.device_batch
    keys, cond = env.keys(b), sdm.encode_prompts(sd, env.prompts(b))
    sampler = sdm.sd_sampler_config(sd, s.steps, "ddim")
    guidance = CFG(scale=GUIDANCE_SCALE)
    devs = jax.devices()
    rows, notes = [], []
    for n in DEVICE_COUNTS:
        if n > len(devs):
            notes.append(f"{n} devices: skipped, this process has {len(devs)}")
            continue
        mesh = make_mesh(devs[:n])
        t, _ = timed(lambda mesh=mesh: sample_sharded(den, guidance, sampler, keys, cond, mesh=mesh).x0, s.repeats)
        rows.append(_rate_row(f"sample_sharded over {n} device{'s' if n > 1 else ''}", t, b, devices=n,
                              images_per_s_per_device=b / t["seconds"] / n))
        env.echo(f"[devices] {n}: {rows[-1]['images_per_s']:.2f} images/s")
    for r in rows:
        r["ratio"] = r["images_per_s"] / rows[0]["images_per_s"]
    rows[0]["reference"] = True
    m = machine()
    if m["simulated_devices"]:
        notes.insert(0, f"simulated devices: XLA_FLAGS={m['xla_flags']!r} splits one CPU ({m['cpu_count']} cores) into "
                        f"{m['device_count']} devices that share its cores, so no speed-up is expected")
    head = ", ".join(f"{r['devices']}: {r['ratio']:.2f}x" for r in rows)
    return {"title": "sample_sharded scaling over devices", "model": env.sd_label(), "global_batch": b,
            "steps": s.steps, "rows": rows, "met": None, "headline": f"images/s vs 1 device: {head}", "notes": notes}


PART_FUNCTIONS = {"pipeline": part_pipeline, "amg": part_amg, "search": part_search, "devices": part_devices}


# ----------------------------------------------------------------------------- report


def _clean(v):
    """JSON-safe, as ``bench.json`` is written (``jsonio.json_safe``: numpy scalars to Python,
    non-finite floats to None = ``null``, "not measured", since NaN is not JSON; tuples to
    lists), keys as strings; the markdown and the returned report read the same values."""
    from amg_jax.jsonio import json_safe

    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return json_safe(v)


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


_COLUMNS = {
    "pipeline": [("run", "name", str), ("s / batch", "seconds", _fmt), ("s / image", "s_per_image", _fmt),
                 ("images/s", "images_per_s", _fmt), ("x pipeline", "ratio", lambda v: f"{v:.2f}x"),
                 ("compile s", "compile_s", lambda v: f"{v:.1f}")],
    "amg": [("model / detector", "group", str), ("run", "name", str), ("s", "seconds", _fmt),
            ("x CFG", "ratio", lambda v: f"{v:.2f}x"), ("compile s", "compile_s", lambda v: f"{v:.1f}"),
            ("gate open", "gate_open", _pct), ("steps any open", "steps_any_open", _pct),
            ("GFLOP", "gflops", _fmt)],
    "search": [("run", "name", str), ("ms / call", "ms", lambda v: f"{v:.3f}"),
               ("x denoiser call", "ratio", lambda v: f"{v:.3g}"), ("agrees with exact", "agrees_with_exact", _pct),
               ("compile s", "compile_s", lambda v: f"{v:.1f}")],
    "devices": [("run", "name", str), ("images/s", "images_per_s", _fmt),
                ("per device", "images_per_s_per_device", _fmt), ("x 1 device", "ratio", lambda v: f"{v:.2f}x"),
                ("compile s", "compile_s", lambda v: f"{v:.1f}")],
}


def _met_text(met) -> str:
    return {True: "met", False: "NOT met", None: "not evaluated in this run"}[met]


def markdown(report: dict) -> str:
    """bench.md: the machine, then per part its target (met or not), a table and notes."""
    m, st = report["machine"], report["settings"]
    kinds = sorted(set(m["device_kinds"]))
    v = m["versions"]
    out = ["# amg bench", "",
           f"{report['created']} · {m['device_count']} x {', '.join(kinds)} ({m['platform']})"
           + (" — simulated devices sharing the CPU" if m["simulated_devices"] else "")
           + f" · {m['cpu_count']} CPUs · jax {v['jax']}, flax {v['flax']}, diffusers {v['diffusers']}", "",
           f"Settings: {'tiny' if st['tiny'] else 'quick' if st['quick'] else 'full'} · SD {st['sd_size']}"
           f"{' (' + st['sd_path'] + ')' if st['sd_path'] else ''} · DDIM {st['steps']} steps, batch {st['batch']} · "
           f"median of {st['repeats']} after a warm-up call. Every ratio is against a reference measured in this "
           f"run.", ""]
    for name, part in report["parts"].items():
        out += [f"## {name}: {part.get('title', '')}", ""]
        if "error" in part:
            out += [f"**failed**: {part['error']}", ""]
            continue
        verdict = "" if name == "devices" else f" — **{_met_text(part.get('met'))}**"
        out += [f"Target: {TARGETS[name]}{verdict}. Measured: {part.get('headline', '')}.", "",
                f"Ratio: {RATIO_MEANING[name]}.", ""]
        cols = _COLUMNS[name]
        out.append("| " + " | ".join(c[0] for c in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for row in part["rows"]:
            cells = []
            for _, key, f in cols:
                val = row.get(key)
                cells.append("-" if val is None else f(val))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        extra = []
        if "max_abs_diff" in part:
            extra.append(f"same latents, max |pixel difference| ours vs pipeline: {part['max_abs_diff']:.2e}")
        mem = part.get("peak_memory_bytes")
        extra.append("peak device memory so far: " + ("n/a (not reported by this backend)" if mem is None
                                                      else f"{mem / 2 ** 30:.2f} GiB"))
        extra.append(f"part wall time: {part.get('wall_s', 0):.1f} s")
        out += [f"- {x}" for x in extra + list(part.get("notes", []))] + [""]
    return "\n".join(out)


def main(out_dir, *, quick: bool = False, parts=None, echo: Callable[[str], Any] = print, tiny: bool = False,
         sd_size: str = "tiny", sd_path: str | None = None, sd=None, steps: int | None = None,
         batch: int | None = None, repeats: int | None = None, seed: int = 0) -> dict:
    """Run the bench ``parts`` (default all of ``PARTS``) and write ``out_dir/bench.json`` and
    ``out_dir/bench.md``; returns the report (the JSON's content).

    quick:   the tiny SD, 3 steps, batch 4, banks up to 10k (< 2 minutes on 2 CPU cores).
    tiny:    smaller still (2 steps, batch 2, one 1k bank, one repeat): the tests' setting.
    sd_size: "tiny" | "1.5" (a random SD-1.5-sized model; only meaningful on an accelerator;
             quick / tiny runs use the tiny one). sd_path: a diffusers SD directory instead;
             sd: an already loaded ``StableDiffusion`` (``load_stable_diffusion``) instead.
    steps / batch / repeats: override the SD runs' DDIM steps, batch and timed repeats.
    echo:    progress lines (``print``; ``lambda *_: None`` for silence).
    Everything is validated (ValueError naming the bad part / value) before any work. A part
    that fails is recorded with its error and the others still run; the files are rewritten
    after each part, so an interrupted run keeps what it finished.
    """
    from amg_jax.jsonio import write_atomic, write_json

    names = parse_parts(parts)
    if sd is not None and not hasattr(sd, "unet_params"):
        raise ValueError(f"bench: sd must be a loaded StableDiffusion (load_stable_diffusion), got {type(sd).__name__}")
    s = settings(quick=quick, tiny=tiny, sd_size=sd_size, sd_path=sd_path, steps=steps, batch=batch,
                 repeats=repeats, seed=seed)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    report = {"format": FORMAT, "version": FORMAT_VERSION,
              "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(sys.argv) if sys.argv else "", "machine": machine(),
              "settings": dict(dataclasses.asdict(s), parts=list(names)),
              "targets": {n: TARGETS[n] for n in names}, "ratio_meaning": {n: RATIO_MEANING[n] for n in names},
              "parts": {}}
    if (quick or tiny) and sd_size != "tiny" and sd_path is None:
        echo(f"[bench] note: quick / tiny runs use the tiny SD (sd_size={sd_size!r} ignored)")
    json_path, md_path = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")
    with tempfile.TemporaryDirectory(prefix="amg-bench-") as work:
        env = _Shared(s, work, echo, sd)
        for name in names:
            echo(f"[bench] part {name} ...")
            t0 = time.perf_counter()
            try:
                part = PART_FUNCTIONS[name](env)
            except Exception as e:     # noqa: BLE001  record it, keep the other parts
                part = {"title": name, "error": f"{type(e).__name__}: {e}", "rows": [], "met": None}
                echo(f"[bench] part {name} failed: {part['error']}")
            part["wall_s"] = time.perf_counter() - t0
            part["peak_memory_bytes"] = peak_memory_bytes()
            report["parts"][name] = part
            clean = _clean(report)
            write_json(json_path, clean)
            write_atomic(md_path, lambda f: f.write(markdown(clean)))
            if "error" not in part:
                verdict = "" if name == "devices" else f"target {_met_text(part['met'])}: "
                echo(f"[bench] {name}: {verdict}{part['headline']} ({part['wall_s']:.1f} s)")
    return _clean(report)


__all__ = ["FORMAT", "PARTS", "SD_SIZES", "Settings", "TARGETS", "build_sd", "diffusers_pipeline", "machine",
           "main", "markdown", "parse_parts", "peak_memory_bytes", "random_bank", "random_sd", "sd15_configs",
           "settings", "timed"]
