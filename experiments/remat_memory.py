"""XLA's scratch memory of G_sim's gradient through SD's VAE decoder per ``jax.checkpoint`` policy
(``sd_amg.CHECKPOINT_POLICIES``), from the compiled program (``memory_analysis``; nothing is run, so an
SD-1.5-sized VAE at 512 px fits a CPU). The embedder is a stand-in (global mean of the pixels) so
the figure is the decoder's own. Two programs: the detector's gradient alone (d/dz of
embed(decode(z))), and the full ``G_sim`` gradient of AMG (d/dx_t of embed(decode(x0_hat(x_t))),
x0_hat through the CFG UNet call), where the checkpoint decides what the two backward passes hold
at once.

    python experiments/remat_memory.py [--size 512] [--batch 1] [--out experiments/results/bench/remat_memory.json]
"""
import argparse
import json
import tempfile
import time

import jax
import jax.numpy as jnp

from amg_jax.apps import bench
from amg_jax import sd_amg
from amg_jax.similarity.embedding import through_decoder


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default="experiments/results/bench/remat_memory.json")
    a = ap.parse_args()
    cfg = bench.sd15_configs(1000)
    sd = bench.random_sd(tempfile.mkdtemp(), cfg, dtype=a.dtype)
    h = a.size // 8
    z = jax.ShapeDtypeStruct((a.batch, h, h, 4), jnp.float32)
    embed = lambda p, x: x.mean(axis=(1, 2))                       # noqa: E731  a stand-in embedder
    unet = sd.eps_fn
    cond = jax.ShapeDtypeStruct((a.batch, 77, 768), jnp.float32)
    t = jnp.full((a.batch,), 500, jnp.int32)
    rows = {}
    for policy in sd_amg.CHECKPOINT_POLICIES:
        blocks = policy == "blocks"
        fn = through_decoder(sd_amg.latent_decoder(sd, remat_blocks=blocks), embed, "full" if blocks else policy)
        alone = jax.jit(jax.grad(lambda p, z, fn=fn: fn(p, z).sum(), argnums=1))

        def g_sim(p, x, c, fn=fn):          # x0_hat = (x - sqrt(1 - a) eps) / sqrt(a), a = 0.5
            x0 = (x - jnp.sqrt(0.5) * unet(p[0], x, t, c)) / jnp.sqrt(0.5)
            return fn(p[1], x0).sum()

        full = jax.jit(jax.grad(g_sim, argnums=1))
        row = {}
        for name, prog, args in (("detector_alone", alone, ((sd.vae_params, None), z)),
                                 ("g_sim_full", full, ((sd.unet_params, (sd.vae_params, None)), z, cond))):
            t0 = time.perf_counter()
            m = prog.lower(*args).compile().memory_analysis()
            row[name] = {"temp_bytes": int(m.temp_size_in_bytes), "compile_s": time.perf_counter() - t0}
            print(f"{policy} / {name}: {m.temp_size_in_bytes / 2**30:.2f} GiB scratch "
                  f"({row[name]['compile_s']:.0f} s to compile)", flush=True)
        rows[policy] = row
    for r in rows.values():
        for name in r:
            r[name]["vs_none"] = r[name]["temp_bytes"] / rows["none"][name]["temp_bytes"]
    out = {"what": "XLA temp (scratch) bytes of the compiled gradient, SD-1.5-sized UNet and VAE decoder, per "
                   "checkpoint policy: detector_alone = d/dz sum(embed(decode(z))); g_sim_full = d/dx_t through "
                   "the UNet's x0_hat too",
           "size": a.size, "batch": a.batch, "dtype": a.dtype, "platform": jax.default_backend(), "policies": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
