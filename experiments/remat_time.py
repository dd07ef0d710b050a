"""Time of the VAE-through-detector gradient per checkpoint policy (SD-1.5-sized VAE decoder, 256 px
latents 32x32, batch 1, a mean-pool stand-in embedder), the policies called in interleaved rounds;
prints max |gradient - the first policy's| and the median of 3 calls each.

    python experiments/remat_time.py
"""
import tempfile, time, jax, jax.numpy as jnp, numpy as np
from amg_jax.apps import bench
from amg_jax import sd_amg
from amg_jax.similarity.embedding import through_decoder
sd = bench.random_sd(tempfile.mkdtemp(), bench.sd15_configs(1000))
z = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 4)), jnp.float32)
embed = lambda p, x: x.mean(axis=(1, 2))       # noqa: E731  a stand-in embedder
progs = {}
for policy in sd_amg.CHECKPOINT_POLICIES:
    blocks = policy == "blocks"
    fn = through_decoder(sd_amg.latent_decoder(sd, remat_blocks=blocks), embed, "full" if blocks else policy)
    progs[policy] = jax.jit(jax.grad(lambda p, z, fn=fn: fn(p, z).sum(), argnums=1))
ref = None
for k, f in progs.items():
    g = np.asarray(f((sd.vae_params, None), z))
    ref = g if ref is None else ref
    print(k, "maxdiff", float(np.abs(g - ref).max()), flush=True)
fwd = jax.jit(lambda p, z: sd_amg.latent_decoder(sd)(p, z))
progs["forward only"] = lambda p, z: fwd(p[0], z)
jax.block_until_ready(fwd(sd.vae_params, z))
ts = {k: [] for k in progs}
for _ in range(3):
    for k, f in progs.items():
        t0 = time.perf_counter(); jax.block_until_ready(f((sd.vae_params, None), z)); ts[k].append(time.perf_counter() - t0)
for k, v in ts.items():
    print(k, f"{np.median(v):.2f} s", flush=True)
