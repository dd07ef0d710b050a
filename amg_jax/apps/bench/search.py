"""The ``search`` part: top-1 cosine search in banks of 1k .. 1M rows against one SD denoiser call."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.apps.bench.models import _Shared
from amg_jax.apps.bench.config import EMBED_DIM, QUERY_BATCH, SEARCH_FRACTION, _free_memory_bytes, timed
from amg_jax.index import ReferenceBank, search
from amg_jax.models import stable_diffusion as sdm

def random_bank(m: int, dim: int = EMBED_DIM, seed: int = 0):
    """An embedding ``ReferenceBank`` of ``m`` random L2-normalised rows, made on the device
    (``build_bank``'s host-side k-NN scale would take minutes at 1M rows; it is NaN here)."""
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
    sd, den, b = env.sd, env.den, env.s.batch
    cond = sdm.encode_prompts(sd, env.prompts(b))
    cond2 = jnp.concatenate([jnp.broadcast_to(den.null_cond, cond.shape), cond])
    x2 = jax.random.normal(jax.random.key(2), (2 * b,) + tuple(den.sample_shape))
    t = jnp.full((2 * b,), 500, jnp.int32)
    eps = jax.jit(lambda d, xx, tt, cc: d.eps_fn(d.params, xx, tt, cc))
    return timed(lambda: eps(den, x2, t, cond2), env.s.repeats)[0]


def part_search(env: _Shared) -> dict:
    """Top-1 cosine search vs bank size, exact and approximate, against one SD denoiser call."""
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
