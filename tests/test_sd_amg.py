"""AMG on Stable Diffusion latents (``amg_jax.sd_amg``): VAE -> SSCD / CLIP detector, caption conditions.

All on a tiny random-weight SD, a tiny SSCD and a tiny CLIP written by the tests themselves
(``tiny_sd``; `amg sample` on them: tests/apps/test_sample.py).
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.apps.models import model_spec
from amg_jax.index import build_bank
from amg_jax import sd_amg as sg
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, sample
from tiny_sd import PROMPTS, SSCD_CFG, STEPS


@pytest.fixture(scope="module")
def env(tiny_sd_env):
    return tiny_sd_env


def sd_method(env, method, scale, **kw):
    """The guidance of ``method`` on the tiny SD (``StableDiffusionSpec.guidance``: SD_AMG under ``amg``)."""
    return model_spec(f"sd:{env['sd_dir']}").guidance(method, scale, **kw)


def test_latent_detector_finds_the_decoded_copy(env):
    det = sg.latent_detector(env["sd"], "sscd", str(env["root"] / "sscd.npz"), env["bank"])
    d = det(env["cfg"].x0)
    # float32 cosine of a decoded copy with its bank embedding (another batch): ~1e-7 (margin 0.1%)
    np.testing.assert_allclose(np.asarray(d.sigma), 1.0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(d.index), [0, 1])
    np.testing.assert_array_equal(np.asarray(d.label), [0, 1])
    g = jax.grad(lambda z: det(z).sigma.sum())(env["cfg"].x0 + 0.1)
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g).max()) > 0


def test_checkpoint_policies_give_the_same_gradient_and_blocks_hold_less(env):
    """Every ``remat`` policy of the VAE-through-SSCD detector is the same function and gradient (the
    same float32 ops, recomputed or stored: ~1e-7; 1e-5 relative allows another fusion order); the
    "blocks" policy's compiled gradient needs no more scratch memory than no checkpoint (XLA's
    ``memory_analysis`` of the program, measured 0.73x here on the tiny VAE)."""
    z = env["cfg"].x0 + 0.1
    grads, temp = {}, {}
    for policy in sg.CHECKPOINT_POLICIES:
        det = sg.latent_detector(env["sd"], "sscd", (env["params"], SSCD_CFG), env["bank"], remat=policy)
        f = jax.jit(jax.grad(lambda z, det=det: det(z).sigma.sum()))
        grads[policy] = np.asarray(f(z))
        temp[policy] = f.lower(z).compile().memory_analysis().temp_size_in_bytes
    for policy, g in grads.items():
        np.testing.assert_allclose(g, grads["none"], rtol=1e-5, atol=1e-6 * np.abs(grads["none"]).max(),
                                   err_msg=policy)
    assert temp["blocks"] <= temp["none"], temp
    with pytest.raises(ValueError, match="remat must be one of"):
        sg.latent_detector(env["sd"], "sscd", (env["params"], SSCD_CFG), env["bank"], remat="some")


def test_bank_conditions(env):
    conds = sg.bank_conditions(env["sd"], PROMPTS)
    chex.assert_shape(conds, (2,) + env["cond"].shape[1:])
    np.testing.assert_allclose(np.asarray(conds), np.asarray(env["cond"]), atol=1e-6)   # the same encoder call: exact


def test_amg_with_clip_runs_end_to_end(env, tmp_path):
    from amg_jax.similarity import clip

    bundle = clip.load_clip(clip.write_tiny_clip(tmp_path / "clip", seed=0))
    imgs = np.asarray(env["den"].decode(env["cfg"].x0))
    det = sg.latent_detector(env["sd"], "clip", bundle, build_bank(np.asarray(clip.clip_image_embed(bundle, imgs)),
                                                                  kind="embedding", normalize=True),
                             thresholds=(-0.5, -0.5))
    np.testing.assert_allclose(np.asarray(det(env["cfg"].x0).sigma), 1.0, atol=1e-3)   # as above: ~1e-7
    g = sd_method(env, "amg", 7.5, detector=det, amg={"c3": 10.0, "gradient": "cheap"})
    res = sample(env["den"], g, sdm.sd_sampler_config(env["sd"], STEPS), env["keys"], env["cond"])
    chex.assert_tree_all_finite(res.x0)
    assert np.asarray(res.trace["gate"]).any()


def test_latent_detector_errors(env):
    with pytest.raises(ValueError, match="kind must be one of"):
        sg.latent_detector(env["sd"], "dino", None, env["bank"])
    pix = build_bank(np.zeros((2, 4, 4, 3), np.float32) + np.arange(2)[:, None, None, None])
    with pytest.raises(ValueError, match="must be an embedding bank"):
        sg.latent_detector(env["sd"], "sscd", (env["params"], SSCD_CFG), pix)
    wide = build_bank(np.random.default_rng(0).normal(size=(3, 16)), kind="embedding", normalize=True)
    with pytest.raises(ValueError, match="8-d embeddings, the bank holds 16-d"):
        sg.latent_detector(env["sd"], "sscd", (env["params"], SSCD_CFG), wide)
    with pytest.raises(ValueError, match="needs a detector"):
        sd_method(env, "amg", 7.5)


def test_pmap_with_diffusers_layout_gives_the_same_images(env):
    """Users of FlaxStableDiffusionPipeline hold replicate()d params and shard()ed inputs: the pmap
    entry point over the same sampler gives the images of `sample` on one device."""
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard

    from amg_jax.sharding import sample_pmap

    n = jax.local_device_count()
    reps = max(1, n // len(PROMPTS))
    cond = jnp.concatenate([env["cond"]] * reps)                      # [n or 2, L, D]
    keys = keys_from_seeds([0] * len(cond))
    den = env["den"]
    rep = den.replace(params=replicate(jax.tree.map(np.asarray, den.params)))
    res = sample_pmap(rep, sd_method(env, "cfg", 7.5), sdm.sd_sampler_config(env["sd"], STEPS),
                      shard(jax.random.key_data(keys)), shard(cond), sharded=True)
    want = np.concatenate([np.asarray(env["cfg"].x0)] * reps)
    # per-device batch 1 vs batch 2 on one device: XLA blocks the tiny UNet's convs / attention
    # differently (~1e-7 relative per eps) and CFG 7.5 scales eps differences by ~15 over 3 DDIM steps:
    # measured 3.5e-5 (3.0e-5 with AVX), margin 0.29 at the old atol 1e-4. atol 5e-4 leaves >10x; a
    # row, key or condition out of place is off by O(1).
    np.testing.assert_allclose(np.asarray(res.x0), want, rtol=1e-4, atol=5e-4)
