"""The bench's settings, constants and measuring helpers (timing, FLOPs, memory, machine)."""
from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import time
from typing import Any, Callable

import flax
import jax
import numpy as np

from amg_jax.models.attention import check_attention

PARTS = ("pipeline", "kernels", "amg", "search", "devices")
SD_SIZES = ("tiny", "1.5", "xl")
BENCH_DTYPES = ("float32", "bfloat16", "float16")
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
    "pipeline": "plain CFG sampling at least as fast as diffusers' FlaxStableDiffusionPipeline (>= 1.3x its images/s "
                "on a GPU in bfloat16 / float16) and faster than diffusers' PyTorch StableDiffusionPipeline",
    "kernels": "none (the UNet's CFG sampling loop per attention kernel and dtype: fused vs plain attention, "
               "bfloat16 vs float32; compile time and peak memory)",
    "amg": "AMG with the gate closed <= 1.15x plain CFG's time (pixel detector), <= 1.6x (SSCD through the VAE)",
    "search": f"top-1 search in a 1M-row bank <= {SEARCH_FRACTION:.0%} of one SD denoiser step, on a GPU",
    "devices": "none (images/s as the device count grows, the global batch fixed)",
}
RATIO_MEANING = {
    "pipeline": "images/s relative to diffusers' Flax pipeline",
    "kernels": "images/s relative to the float32 plain-XLA-attention row",
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
    dtype / attention:  the SD networks' dtype and attention implementation (``attention.attend``).
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
    dtype: str = "float32"
    attention: str = "auto"


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
             seed: int = 0, dtype: str = "float32", attention: str = "auto") -> Settings:
    """The run's ``Settings``: full (50 steps, batch 8, banks to 1M), ``quick`` (tiny SD, 3 steps,
    batch 4, banks to 10k) or ``tiny`` (2 steps, batch 2, a 1k bank: the tests' setting);
    ``steps`` / ``batch`` / ``repeats`` override the SD runs' values. Quick and tiny runs use
    the tiny SD whatever ``sd_size`` says. ValueError naming a bad value."""
    if sd_size not in SD_SIZES:
        raise ValueError(f"bench: sd_size must be one of {list(SD_SIZES)}, got {sd_size!r}")
    if dtype not in BENCH_DTYPES:
        raise ValueError(f"bench: dtype must be one of {list(BENCH_DTYPES)}, got {dtype!r}")
    check_attention(attention)
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
                    sd_path=None if sd_path is None else os.fspath(sd_path), seed=int(seed), dtype=dtype,
                    attention=attention, **base)


# ----------------------------------------------------------------------------- timing


def _summary(first: float, times: list) -> dict:
    med = float(statistics.median(times))
    return {"seconds": med, "first_call_s": first, "compile_s": max(first - med, 0.0), "repeats": len(times),
            "spread": (max(times) - min(times)) / med if med > 0 else 0.0}


def timed(fn: Callable[[], Any], repeats: int) -> tuple[dict, Any]:
    """Call ``fn`` once (compile + run), then ``repeats`` times; each call is ended by
    ``jax.block_until_ready``. Returns ``({"seconds": median steady-state time, "first_call_s",
    "compile_s": first call - median, "repeats", "spread": (max - min) / median}, first output)``."""
    t, out = timed_together({"fn": fn}, repeats)["fn"]
    del t["peak_memory_bytes"]
    return t, out


def timed_together(fns: dict, repeats: int) -> dict:
    """``timed`` for several functions that are compared with each other: each is called once (compile
    + run), then ``repeats`` rounds call every one in turn, so a slow spell of a shared machine (other
    tenants, clock changes) falls on all sides alike rather than on whichever ran during it.
    Returns ``{name: (timing dict as timed's, first output)}``; its "peak_memory_bytes" is the device's
    peak after that function's first call (the functions before it included; None on the CPU)."""
    first, outs, peaks, times = {}, {}, {}, {name: [] for name in fns}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outs[name] = jax.block_until_ready(fn())
        first[name] = time.perf_counter() - t0
        peaks[name] = peak_memory_bytes()
    for _ in range(max(1, int(repeats))):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: (dict(_summary(first[name], times[name]), peak_memory_bytes=peaks[name]), outs[name])
            for name in fns}


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
