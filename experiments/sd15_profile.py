"""Where a gate-closed AMG step goes on an SD-1.5-sized model, on any machine (a CPU included):
one CFG UNet call [2B] against one SSCD-through-the-VAE detector call [B] (VAE decode of 64x64x4
latents to 512x512, SSCD ResNet-50 at 288, cosine top-k over a 1000-row bank), both as XLA FLOP
counts (hardware-independent) and as timings (alternated, median of 3), on random weights.

    python experiments/sd15_profile.py [--batch 1] [--out experiments/results/bench/sd15_profile.json]

The gate-closed overhead of AMG with SSCD is about the detector's share: 1 + detector / CFG call.
"""
import argparse
import json
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.apps import bench
from amg_jax.sd_amg import latent_detector
from amg_jax.index import build_bank
from amg_jax.models import stable_diffusion as sdm
from amg_jax.similarity import sscd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="experiments/results/bench/sd15_profile.json")
    a = ap.parse_args()
    b = a.batch
    with tempfile.TemporaryDirectory() as work:
        sd = bench.random_sd(work)
        den = sdm.sd_denoiser(sd)
        cfg = sscd.SSCDConfig(image_size=288)
        emb = np.random.default_rng(0).standard_normal((1000, cfg.embed_dim)).astype(np.float32)
        bank = build_bank(emb, np.arange(1000) % 4, kind="embedding", normalize=True, scale_rows=256)
        det = latent_detector(sd, "sscd", (sscd.init_params(cfg, seed=0), cfg), bank)
        cond = sdm.encode_prompts(sd, ["a photo of a cat"] * b)
        cond2 = jnp.concatenate([jnp.broadcast_to(den.null_cond, cond.shape), cond])
        x = jax.random.normal(jax.random.key(1), (b,) + tuple(den.sample_shape))
        x2, t = jnp.concatenate([x, x]), jnp.full((2 * b,), 500, jnp.int32)
        eps = jax.jit(lambda d, xx, tt, cc: d.eps_fn(d.params, xx, tt, cc))
        dcall = jax.jit(lambda d, xx: d(xx).sigma)
        vae = jax.jit(lambda xx: sd.decode(xx))
        calls = {"unet_cfg_call_2B": (eps, (den, x2, t, cond2)), "detector_B": (dcall, (det, x)),
                 "vae_decode_B": (vae, (x,))}
        out = {"batch": b, "gflops": {k: bench.xla_gflops(f, *args) for k, (f, args) in calls.items()},
               "seconds": {k: [] for k in calls}, "machine": bench.machine()}
        for f, args in calls.values():
            jax.block_until_ready(f(*args))                    # compile + warm up
        for _ in range(a.repeats):
            for k, (f, args) in calls.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(*args))
                out["seconds"][k].append(time.perf_counter() - t0)
    g, s = out["gflops"], {k: statistics.median(v) for k, v in out["seconds"].items()}
    out["median_s"] = s
    out["closed_gate_bound_flops"] = 1 + g["detector_B"] / g["unet_cfg_call_2B"]
    out["closed_gate_bound_time"] = 1 + s["detector_B"] / s["unet_cfg_call_2B"]
    print(json.dumps({k: v for k, v in out.items() if k != "machine"}, indent=1))
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
