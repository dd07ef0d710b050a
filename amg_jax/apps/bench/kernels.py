"""The ``kernels`` part: amg_jax's CFG sampling loop on SD per attention kernel and dtype.

Rows: float32 with plain XLA attention (the reference), bfloat16 with XLA attention, and, where the
device has it (an NVIDIA GPU), bfloat16 with cuDNN's fused attention through ``jax.nn.dot_product_attention``.
Each row is the same model (``with_settings`` of the run's), batch, seeds and latents; it reports
images/s, compile time, the device's peak memory after the row's first call (cumulative over the rows
in order: the backend cannot reset it) and the largest pixel difference to the reference row.
"""
from __future__ import annotations

import jax
import numpy as np

from amg_jax.apps.bench.config import GUIDANCE_SCALE, timed_together
from amg_jax.apps.bench.models import _rate_row, _Shared
from amg_jax.guidance import CFG
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import initial_noise, sample


def kernel_rows(platform: str) -> list[tuple[str, str]]:
    """The (dtype, attention) rows the ``kernels`` part measures on ``platform``."""
    rows = [("float32", "xla"), ("bfloat16", "xla")]
    if platform == "gpu":
        rows.append(("bfloat16", "cudnn"))
    return rows


def part_kernels(env: _Shared) -> dict:
    s, base = env.s, env.sd
    b, n = s.batch, s.steps
    keys = env.keys(b)
    prompts = env.prompts(b)
    platform = jax.default_backend()
    loops, decoders = {}, {}
    for dtype, attention in kernel_rows(platform):
        sd = sdm.with_settings(base, dtype=dtype, attention=attention)
        den = sdm.sd_denoiser(sd)
        sampler = sdm.sd_sampler_config(sd, n, "ddim")
        cond = sdm.encode_prompts(sd, prompts)
        x_T = initial_noise(keys, tuple(den.sample_shape))

        def loop(den=den, sampler=sampler, cond=cond, x_T=x_T):
            return sample(den, CFG(scale=GUIDANCE_SCALE), sampler, keys, cond, x_T=x_T).x0

        loops[(dtype, attention)], decoders[(dtype, attention)] = loop, sd.decode
    timings = timed_together(loops, s.repeats)        # rows interleaved: a slow spell falls on all alike
    rows, ref_px, ref_rate = [], None, None
    for (dtype, attention), (t, x0) in timings.items():
        px = np.asarray(decoders[(dtype, attention)](x0), np.float32)
        rate = b / t["seconds"]
        if ref_rate is None:
            ref_rate, ref_px = rate, px
        name = f"CFG sampling loop, {dtype}, attention={attention}"
        rows.append(_rate_row(name, t, b, ratio=rate / ref_rate, reference=len(rows) == 0, dtype=dtype,
                              attention=attention, peak_memory_bytes=t.pop("peak_memory_bytes"),
                              max_abs_diff_vs_reference=float(np.abs(px - ref_px).max()) / 2.0))
        env.echo(f"[kernels] {name}: {t['seconds']:.3f} s per batch of {b} (compile {t['compile_s']:.1f} s)")
    fused = [r for r in rows if r["attention"] == "cudnn"]
    plain16 = [r for r in rows if r["dtype"] == "bfloat16" and r["attention"] == "xla"]
    headline = (f"bfloat16 fused / plain attention = {fused[0]['images_per_s'] / plain16[0]['images_per_s']:.2f}x"
                if fused else f"bfloat16 / float32 = {plain16[0]['ratio']:.2f}x (no fused kernel on {platform})")
    return {"title": "attention kernels and dtypes (amg_jax's CFG sampling loop)", "model": env.sd_label(),
            "image_size": base.image_size, "batch": b, "steps": n, "platform": platform, "rows": rows, "met": None,
            "headline": headline,
            "notes": ["max_abs_diff_vs_reference: the largest difference of the decoded [0, 1] pixels to the float32 "
                      "XLA row (same seeds and latents)",
                      "peak_memory_bytes: the device's peak after the row's first call, the rows before it included "
                      "(None on the CPU)"]
            + ([] if fused else [f"cuDNN's fused attention needs an NVIDIA GPU; this run is on {platform}"])}


__all__ = ["kernel_rows", "part_kernels"]
