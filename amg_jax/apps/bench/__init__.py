"""`amg bench`: how fast amg_jax samples, guides and searches; every figure is a ratio against a
reference measured in the same run (or an absolute time with its reference beside it).

    from amg_jax.apps import bench
    report = bench.main("bench_out", quick=True)        # writes bench_out/bench.json + bench.md

Parts (``PARTS``; ``main(..., parts=[...])`` runs a subset):

- ``pipeline``: plain CFG sampling (DDIM) with ``samplers.sample`` on ``sd_denoiser`` against
  diffusers' ``FlaxStableDiffusionPipeline`` on the same random-weight SD and batch, through its
  documented ``pmap`` path (``jit=True``, replicated params, sharded prompt ids; one device), and
  against diffusers' PyTorch ``StableDiffusionPipeline`` (CPU, float32, when torch is installed and
  the folder has PyTorch weights). Every side encodes the prompts, samples from the same initial
  latents and VAE-decodes to host images, so the images must agree (``max_abs_diff``, on [0, 1]
  pixels). Target: ours >= 1.0x the Flax pipeline's images/s (1.3x on a GPU in 16-bit) and faster
  than the PyTorch one.
- ``kernels``: the CFG sampling loop per dtype and attention kernel (float32 / bfloat16 with XLA's
  attention; bfloat16 with cuDNN's fused attention on an NVIDIA GPU): images/s, compile time,
  peak memory, pixel difference to the float32 row.
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

from amg_jax.apps.bench.amg import SPE_ONLY, _components, flop_bound, out_of_reach, part_amg, sd_open_rows
from amg_jax.apps.bench.devices import part_devices
from amg_jax.apps.bench.kernels import kernel_rows, part_kernels
from amg_jax.apps.bench.models import (_Shared, build_sd, diffusers_pipeline, random_sd, sd15_configs, sdxl_configs,
                                       torch_pipeline)
from amg_jax.apps.bench.pipeline import part_pipeline, pipeline_target
from amg_jax.apps.bench.report import _COLUMNS, markdown
from amg_jax.apps.bench.runner import PART_FUNCTIONS, BenchInterrupted, main
from amg_jax.apps.bench.search import part_search, random_bank
from amg_jax.apps.bench.config import (DEVICE_COUNTS, FORMAT, FORMAT_VERSION, PARTS, SD_SIZES, TARGETS, Settings,
                                         machine, parse_parts, peak_memory_bytes, settings, timed, xla_gflops)

__all__ = ["BenchInterrupted", "DEVICE_COUNTS", "FORMAT", "FORMAT_VERSION", "PARTS", "PART_FUNCTIONS", "SD_SIZES", "SPE_ONLY", "TARGETS",
           "Settings", "_COLUMNS", "_Shared", "_components", "build_sd", "diffusers_pipeline", "flop_bound", "machine",
           "main", "markdown", "out_of_reach", "parse_parts", "part_amg", "part_devices", "part_pipeline",
           "part_search", "peak_memory_bytes", "random_bank", "random_sd", "sd15_configs", "sd_open_rows", "settings",
           "timed", "xla_gflops", "kernel_rows", "part_kernels", "pipeline_target", "sdxl_configs", "torch_pipeline"]
