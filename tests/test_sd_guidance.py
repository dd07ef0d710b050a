"""AMG on Stable Diffusion latents: VAE -> SSCD / CLIP detector, caption conditions, `amg sample`.

All on a tiny random-weight SD, a tiny SSCD and a tiny CLIP written by the tests themselves.
"""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import cli
from amg_jax import sd_guidance as sg
from amg_jax.images import to_uint8
from amg_jax.index import build_bank, save_bank
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, sample
from amg_jax.similarity import sscd

STEPS = 3
PROMPTS = ["a red cube", "a blue sphere"]
SSCD_CFG = sscd.SSCDConfig(stage_sizes=(1, 1), width=4, embed_dim=8, image_size=32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdg")
    sd_dir = sdm.write_tiny_sd(root / "tiny-sd", seed=0)
    sd = sdm.load_stable_diffusion(sd_dir)
    den = sdm.sd_denoiser(sd)
    params = sscd.init_params(SSCD_CFG, seed=0)
    sscd.save_params(str(root / "sscd.npz"), params, SSCD_CFG)
    cond = sdm.encode_prompts(sd, PROMPTS)
    keys = keys_from_seeds([0] * len(PROMPTS))          # `amg sample` gives each prompt seeds 0, 1, ...
    cfg = sample(den, sg.method_guidance("cfg", 7.5), sdm.sd_sampler_config(sd, STEPS), keys, cond)
    # the bank holds the CFG samples themselves ("training images" the CFG run copies) + others
    imgs = np.asarray(den.decode(cfg.x0))
    others = np.asarray(den.decode(jax.random.normal(jax.random.key(5), (3,) + den.sample_shape)))
    emb = sscd.embed_images(params, np.concatenate([imgs, others]), SSCD_CFG)
    bank = build_bank(emb, np.array([0, 1, -1, -1, -1], np.int32), kind="embedding", normalize=True)
    save_bank(str(root / "bank.npz"), bank)
    json.dump({"captions": PROMPTS}, open(str(root / "bank.npz") + ".captions.json", "w"))
    return dict(root=root, sd_dir=sd_dir, sd=sd, den=den, params=params, bank=bank, cond=cond, keys=keys, cfg=cfg)


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
    g = sg.method_guidance("amg", 7.5, detector=det, amg={"c3": 10.0, "gradient": "cheap"})
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
        sg.method_guidance("amg", 7.5)


def test_cli_sample_cfg_and_amg(env, tmp_path, capsys):
    """CFG through `amg sample` equals the library call; AMG with SSCD (gate always open, G_dup from
    the bank's captions, a random-number prompt baseline) moves both samples off their bank copy."""
    from PIL import Image

    root = env["root"]
    common = ["sample", "--model", f"sd:{env['sd_dir']}", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
              "--steps", str(STEPS), "--batch", "3"]
    out = tmp_path / "cfg"
    assert cli.main(common + ["--out", str(out)]) == 0
    rep = json.loads((out / "samples.json").read_text())
    assert rep["complete"] and [s["prompt"] for s in rep["samples"]] == PROMPTS
    assert [s["seed"] for s in rep["samples"]] == [0, 0]
    assert sorted(os.listdir(out / "images")) == ["0000.png", "0001.png"]
    ref = to_uint8(np.asarray(env["den"].decode(env["cfg"].x0))).astype(np.float32)
    cfg_png = np.stack([np.asarray(Image.open(out / "images" / f"000{i}.png"), np.float32) for i in range(2)])
    assert np.abs(cfg_png - ref).max() <= 1.0                         # batches sharded over the test's devices

    out2 = tmp_path / "amg"
    assert cli.main(common + ["--out", str(out2), "--guidance", "amg", "--detector", f"sscd:{root / 'sscd.npz'}",
                              "--bank", str(root / "bank.npz"), "--c3", "1000", "--lambda-min", "-0.5",
                              "--lambda-max", "-0.5", "--baseline", "rna"]) == 0
    rep = json.loads((out2 / "samples.json").read_text())
    assert len(rep["samples"]) == 2 and all(s["gate_open_rate"] == 1.0 for s in rep["samples"])
    assert rep["samples"][0]["prompt"] != PROMPTS[0]                  # random numbers were added
    trace = np.load(out2 / "trace.npz")
    chex.assert_shape(trace["sigma"], (2, STEPS))
    assert trace["s2"].max() > 0                                      # caption deduplication acted
    amg_png = np.stack([np.asarray(Image.open(out2 / "images" / f"000{i}.png"), np.float32) for i in range(2)])

    def bank_cosine(png):
        e = sscd.embed_images(env["params"], png / 127.5 - 1.0, SSCD_CFG)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return np.max(e @ np.asarray(env["bank"].rows).T, axis=1)
    assert np.all(bank_cosine(amg_png) < bank_cosine(cfg_png) - 1e-4)     # (a random tiny SSCD: cosines all ~1)


@pytest.mark.parametrize("args, message", [
    (["--model", "unet-text"], "must be sd:PATH_OR_HUB_ID"),
    (["--guidance", "amg"], "AMG needs --detector"),
    (["--guidance", "amg", "--detector", "sscd:{sscd}"], "AMG needs --bank"),
    (["--guidance", "amg", "--detector", "sscd:/no/sscd.npz"], "does not exist (make it with amg convert sscd)"),
    (["--guidance", "amg", "--detector", "sscd:{sscd}", "--bank", "/no/bank.npz"], "does not exist"),
    (["--c3", "5"], "AMG settings need --method amg"),
    (["--guidance", "amg", "--detector", "sscd:{sscd}", "--bank", "{bank}", "--lambda-min", "-3"], "lambda_min=-3.0 lies outside"),
    (["--height", "60"], "not divisible by 8"),
])
def test_cli_sample_bad_arguments(env, tmp_path, capsys, args, message):
    base = ["sample", "--model", f"sd:{env['sd_dir']}", "--prompt", "x", "--out", str(tmp_path / "o"), "--steps", "1"]
    if "--model" in args:
        base = base[:1] + base[3:]
    args = [a.format(bank=env["root"] / "bank.npz", sscd=env["root"] / "sscd.npz") for a in args]
    with pytest.raises(SystemExit) as e:
        cli.main(base + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


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
    res = sample_pmap(rep, sg.method_guidance("cfg", 7.5), sdm.sd_sampler_config(env["sd"], STEPS),
                      shard(jax.random.key_data(keys)), shard(cond), sharded=True)
    want = np.concatenate([np.asarray(env["cfg"].x0)] * reps)
    # per-device batch 1 vs batch 2 on one device: XLA blocks the tiny UNet's convs / attention
    # differently (~1e-7 relative per eps) and CFG 7.5 scales eps differences by ~15 over 3 DDIM steps:
    # measured 3.5e-5 (3.0e-5 with AVX), margin 0.29 at the old atol 1e-4. atol 5e-4 leaves >10x; a
    # row, key or condition out of place is off by O(1).
    np.testing.assert_allclose(np.asarray(res.x0), want, rtol=1e-4, atol=5e-4)
