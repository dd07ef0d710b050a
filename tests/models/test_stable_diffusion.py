"""Stable Diffusion through the denoiser contract, on a tiny random-weight SD written in diffusers' layout.

Parity: our ``sample`` (CFG 7.5, DDIM as configured by SD's scheduler_config.json) + ``decode``
against diffusers' FlaxStableDiffusionPipeline (its pmap path, same initial latents) and, from the
PyTorch weights, against diffusers' PyTorch StableDiffusionPipeline. Loading errors, prompt
truncation, image sizes, v-prediction and bfloat16.
"""
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.guidance import make_guidance
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm
from amg_jax.models.base import Denoiser
from amg_jax.samplers import keys_from_seeds, sample, sampler_timesteps
from amg_jax.schedules import Schedule

STEPS = 10
SCALE = 7.5
PROMPTS = ["a red cube", "a blue sphere on a wooden table", "the cat", "an astronaut riding a horse"]


def _batch() -> int:
    """Prompts per run: a multiple of the device count (the pipeline's pmap path shards them)."""
    n = jax.local_device_count()
    return n * math.ceil(len(PROMPTS) / n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return sd_tiny.write_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0)


@pytest.fixture(scope="module")
def sd(tiny_dir):
    return sdm.load_stable_diffusion(tiny_dir)


@pytest.fixture(scope="module")
def prompts():
    b = _batch()
    return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" {i}") for i in range(b)]


@pytest.fixture(scope="module")
def latents(sd, prompts):
    den = sdm.sd_denoiser(sd)
    return jax.random.normal(jax.random.PRNGKey(7), (len(prompts),) + den.sample_shape, jnp.float32)


@pytest.fixture(scope="module")
def ours(sd, prompts, latents):
    """Our CFG + DDIM sample and its decoded images [B, H, W, 3] in [0, 1]."""
    den = sdm.sd_denoiser(sd)
    res = sample(den, make_guidance("cfg", scale=SCALE), sdm.sd_sampler_config(sd, STEPS),
                 keys_from_seeds(range(len(prompts))), sdm.encode_prompts(sd, prompts), x_T=latents)
    return res.x0, np.asarray(den.decode(res.x0)) / 2 + 0.5


def test_bundle_and_denoiser(sd):
    assert (sd.vae_factor, sd.image_size, sd.latent_channels, sd.prediction_type) == (8, 64, 4, "epsilon")
    assert sd.schedule == Schedule("scaled_linear", 1000, 0.00085, 0.012)
    den = sdm.sd_denoiser(sd)
    assert isinstance(den, Denoiser)
    assert den.sample_shape == (8, 8, 4) and den.num_conditions is None
    chex.assert_shape(den.null_cond, (77, 32))
    assert sdm.sd_denoiser(sd, height=128, width=64).sample_shape == (16, 8, 4)
    params = (sd.unet_params, sd.vae_params, sd.text_params)
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}


def test_sampler_config_follows_scheduler_config(sd):
    cfg = sdm.sd_sampler_config(sd, STEPS)
    assert (cfg.name, cfg.spacing, cfg.steps_offset, cfg.set_alpha_to_one, cfg.clip_sample) == (
        "ddim", "leading", 1, False, False)
    np.testing.assert_array_equal(sampler_timesteps(cfg, sd.schedule), np.arange(901, 0, -100))
    # DPMSolverMultistepScheduler.from_config(SD v1.x's config) keeps steps_offset=1 but lays its steps by
    # its own default timestep_spacing, "linspace" (which ignores the offset): 999, 949, ... (not "leading")
    dpm = sdm.sd_sampler_config(sd, 20, "dpm++2m")
    assert (dpm.spacing, dpm.steps_offset) == ("linspace", 1)
    assert sampler_timesteps(dpm, sd.schedule)[0] == 999
    assert sdm.sd_sampler_config(sd, 20, eta=1.0).eta == 1.0


def test_encode_prompts(sd, prompts):
    emb = sdm.encode_prompts(sd, prompts)
    chex.assert_shape(emb, (len(prompts), 77, 32))
    chex.assert_type(emb, jnp.float32)
    # null_embedding is this very encoding of [""] (the same call at load time): exact
    np.testing.assert_array_equal(np.asarray(sdm.encode_prompts(sd, [""])[0]), np.asarray(sd.null_embedding))
    assert float(jnp.abs(emb[0] - emb[1]).max()) > 1e-2   # prompts differ
    with pytest.raises(ValueError, match="prompts"):
        sdm.encode_prompts(sd, [])


def test_long_prompt_warns_and_truncates(sd):
    long = " ".join(["zebra"] * 60)
    with pytest.warns(UserWarning, match=r"has \d+ tokens.*truncated to 77"):
        ids = sdm.tokenize(sd.tokenizer, [long])
    chex.assert_shape(ids, (1, 77))
    assert ids[0, -1] == sd.tokenizer.eos_token_id
    with pytest.warns(UserWarning, match="zebra zebra"):
        a = sdm.encode_prompts(sd, long)
    with pytest.warns(UserWarning):
        b = sdm.encode_prompts(sd, long + " and more words")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))   # the same 77 tokens


def test_matches_flax_pipeline(sd, tiny_dir, prompts, latents, ours):
    """Same initial latents through diffusers' FlaxStableDiffusionPipeline (pmap path, DDIM from the
    same scheduler config): the images agree to float32 round-off."""
    from flax.jax_utils import replicate
    from flax.training.common_utils import shard

    with sdm.quiet_libraries():
        from diffusers import FlaxDDIMScheduler, FlaxStableDiffusionPipeline

        scheduler, scheduler_state = FlaxDDIMScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
        pipe, params = FlaxStableDiffusionPipeline.from_pretrained(
            tiny_dir, scheduler=scheduler, safety_checker=None, feature_extractor=None)
    params["scheduler"] = scheduler_state
    n, b = jax.local_device_count(), len(prompts)
    ids = pipe.prepare_inputs(prompts)
    lat = jnp.asarray(np.asarray(latents).transpose(0, 3, 1, 2).reshape(n, b // n, 4, 8, 8))   # NCHW per device
    params = replicate(jax.tree.map(np.asarray, params))   # numpy leaves: replicate stacks without compiling
    images = pipe(shard(ids), params, jax.random.split(jax.random.PRNGKey(0), n),
                  num_inference_steps=STEPS, guidance_scale=SCALE, latents=lat, jit=True).images
    want = np.asarray(images).reshape(b, 64, 64, 3)
    x0, got = ours
    assert np.all(np.isfinite(np.asarray(x0)))
    assert 0.05 < got.std() and np.mean((got > 0) & (got < 1)) > 0.9   # not saturated: a real comparison
    diff = float(np.abs(got - want).max())
    print(f"\nmax |ours - FlaxStableDiffusionPipeline| on [0, 1] images: {diff:.3g}")
    # amg_jax's modules follow diffusers' PyTorch UNet (tests/models/test_sd_parity.py: within 1.5e-6 of
    # its pipeline); diffusers' Flax UNet differs from it by design: tanh-approximated GELU in the
    # feed-forward and eps 1e-5 (PyTorch 1e-6) in the transformers' GroupNorm, O(1e-4) in the images
    # after 10 steps (measured 1.0e-4). 1e-3 holds that with 10x margin; a wrong weight is O(0.1).
    assert diff < 1e-3


def test_bfloat16_loads_and_samples(tiny_dir, prompts, latents):
    sd16 = sdm.load_stable_diffusion(tiny_dir, dtype="bfloat16")
    assert sd16.dtype == "bfloat16"
    assert {p.dtype for p in jax.tree.leaves(sd16.unet_params)} == {jnp.dtype(jnp.bfloat16)}
    den = sdm.sd_denoiser(sd16)
    res = sample(den, make_guidance("cfg", scale=SCALE), sdm.sd_sampler_config(sd16, 3),
                 keys_from_seeds([0]), sdm.encode_prompts(sd16, prompts[:1]), x_T=latents[:1])
    chex.assert_type(res.x0, jnp.float32)
    chex.assert_tree_all_finite(res.x0)
    assert float(jnp.abs(res.x0).max()) > 0.1


def test_v_prediction_is_converted_to_eps():
    """eps = sqrt(ab) v + sqrt(1 - ab) x_t, so DDIM's x0 from eps equals x0 = sqrt(ab) x_t - sqrt(1 - ab) v."""
    v = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 4))

    class FakeUNet:   # returns v whatever its input
        config, dtype, attention = "fake", jnp.float32, "xla"

        def apply(self, params, sample, t, context, added):
            return v

    schedule = Schedule("scaled_linear", 1000, 0.00085, 0.012)
    t = jnp.array([999, 10], jnp.int32)
    eps = jax.jit(sdm.UNetEps(FakeUNet(), "v_prediction", schedule))(None, x, t, jnp.zeros((2, 3, 8)))
    ab = schedule.alphas_cumprod()[np.asarray(t)].reshape(2, 1, 1, 1)
    x0_from_eps = (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab)
    # float32 eps (|eps| ~ 3, an ulp 2.4e-7, with or without FMA) times sqrt(1 - ab) / sqrt(ab) = 14.6
    # at t = 999: ~4e-6 (measured 3.9e-6, margin 0.19 at the old 2e-5). atol 1e-4 leaves >10x over
    # 2 ulps; swapped v / x_t coefficients are off by O(1).
    np.testing.assert_allclose(np.asarray(x0_from_eps), np.sqrt(ab) * x - np.sqrt(1 - ab) * v, atol=1e-4)
    same = sdm.UNetEps(FakeUNet(), "epsilon", schedule)(None, x, t, jnp.zeros((2, 3, 8)))
    np.testing.assert_array_equal(np.asarray(same), np.asarray(v))      # passed through: exact


def test_image_size_errors(sd):
    with pytest.raises(ValueError, match="height=60 is not divisible by 8"):
        sdm.sd_denoiser(sd, height=60)
    with pytest.raises(ValueError, match="width=72 is not a multiple of 16"):
        sdm.sd_denoiser(sd, width=72)
    with pytest.raises(ValueError, match="height must be a positive integer"):
        sdm.sd_denoiser(sd, height=0)


def _layout_copy(src, dst, skip=(), index=None):
    """dst: a diffusers layout linking src's component folders (except ``skip``), with its own model_index."""
    os.makedirs(dst)
    for comp in sdm.COMPONENTS:
        if comp not in skip:
            os.symlink(os.path.join(src, comp), os.path.join(dst, comp))
    with open(os.path.join(src, "model_index.json")) as f:
        idx = json.load(f)
    with open(os.path.join(dst, "model_index.json"), "w") as f:
        json.dump(dict(idx, **(index or {})), f)
    return str(dst)


def test_loading_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of"):
        sdm.load_stable_diffusion(tiny_dir, dtype="int8")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sdm.load_stable_diffusion(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no model_index.json"):
        sdm.load_stable_diffusion(tmp_path)
    with pytest.raises(FileNotFoundError, match="no unet/ subfolder"):
        sdm.load_stable_diffusion(_layout_copy(tiny_dir, tmp_path / "a", skip=("unet",)))
    with pytest.raises(ValueError, match="StableDiffusionImg2ImgPipeline.*not a Stable Diffusion"):
        sdm.load_stable_diffusion(_layout_copy(tiny_dir, tmp_path / "b",
                                               index={"_class_name": "StableDiffusionImg2ImgPipeline"}))
    with pytest.raises(FileNotFoundError, match="no text_encoder_2/ subfolder"):      # an SDXL index, SD 1 parts
        sdm.load_stable_diffusion(_layout_copy(tiny_dir, tmp_path / "b2",
                                               index={"_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(FileNotFoundError, match="missing PyTorch weights unet/diffusion_pytorch_model"):
        sdm.load_stable_diffusion(tiny_dir, from_pt=True)
    with pytest.raises(ValueError, match="revision"):
        sdm.load_stable_diffusion(tiny_dir, revision="bf16")

    c = _layout_copy(tiny_dir, tmp_path / "c", skip=("unet", "scheduler"))
    os.makedirs(os.path.join(c, "unet"))
    os.symlink(os.path.join(tiny_dir, "unet", "config.json"), os.path.join(c, "unet", "config.json"))
    with pytest.raises(FileNotFoundError, match="no scheduler/ subfolder"):
        sdm.load_stable_diffusion(c)
    os.makedirs(os.path.join(c, "scheduler"))
    with pytest.raises(FileNotFoundError, match="missing scheduler/scheduler_config.json"):
        sdm.load_stable_diffusion(c)
    with open(os.path.join(c, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(dict(sd_tiny.SD_V1_SCHEDULER, prediction_type="sample"), f)
    with pytest.raises(FileNotFoundError, match="unet/diffusion_flax_model.msgpack"):
        sdm.load_stable_diffusion(c)
    os.symlink(os.path.join(tiny_dir, "unet", "diffusion_flax_model.msgpack"),
               os.path.join(c, "unet", "diffusion_flax_model.msgpack"))
    with pytest.raises(ValueError, match="prediction_type 'sample' is not supported"):
        sdm.load_stable_diffusion(c)


def test_hub_id_downloads_one_set_of_weights(tiny_dir, monkeypatch):
    """A hub id: the repo's file list decides Flax vs PyTorch weights, and only those are fetched."""
    import huggingface_hub

    files = [os.path.relpath(os.path.join(r, f), tiny_dir) for r, _, fs in os.walk(tiny_dir) for f in fs]
    files += ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.safetensors", "safety_checker/model.safetensors"]
    calls = {}
    monkeypatch.setattr(huggingface_hub, "list_repo_files", lambda repo, revision=None: files)

    def fake_snapshot(repo, revision=None, allow_patterns=()):
        calls.update(repo=repo, revision=revision, patterns=list(allow_patterns))
        return tiny_dir

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    path, from_pt = sdm._download("owner/tiny-sd", "flax", None)
    assert (path, from_pt, calls["revision"]) == (tiny_dir, False, "flax")
    assert "unet/diffusion_flax_model.msgpack" in calls["patterns"]
    assert not any("safetensors" in p or "safety" in p for p in calls["patterns"])
    _, from_pt = sdm._download("owner/tiny-sd", None, True)
    assert from_pt and "text_encoder/model.safetensors" in calls["patterns"]


def test_latents_sharded_over_devices_are_gathered_onto_the_params_device():
    """decode's helper: sample_sharded's output (latents over all devices) moves onto the VAE params'
    device (jit refuses the mix); arrays already there and tracers are left alone."""
    from jax.sharding import NamedSharding, PartitionSpec

    from amg_jax.sharding import make_mesh

    params = {"w": jax.device_put(jnp.ones((3,)), jax.devices()[0])}
    mesh = make_mesh()
    x = jax.device_put(jnp.arange(4.0 * len(jax.devices())).reshape(-1, 1),
                       NamedSharding(mesh, PartitionSpec(mesh.axis_names[0])))
    moved = sdm._onto_params_device(x, params)
    assert moved.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(moved), np.asarray(x))       # moved, not computed: exact
    local = jnp.ones((2, 1))
    assert sdm._onto_params_device(local, params) is local
    jax.jit(lambda v: sdm._onto_params_device(v, params))(local)          # a tracer passes through


def _pt_copy(src, dst, replace=None, config=None):
    """dst: a copy of the diffusers-layout folder ``src`` (PyTorch or Flax weights); ``replace``: {relative path: file to put there};
    ``config``: {component: keys to change in its config.json}."""
    import shutil

    shutil.copytree(src, dst)
    for rel, f in (replace or {}).items():
        shutil.copyfile(f, os.path.join(dst, rel))
    for comp, keys in (config or {}).items():
        p = os.path.join(dst, comp, "config.json")
        with open(p) as fh:
            cfg = json.load(fh)
        with open(p, "w") as fh:
            json.dump(dict(cfg, **keys), fh)
    return str(dst)


def test_flax_weights_that_do_not_fit_the_config_name_the_file_and_the_weight(tmp_path, tiny_dir):
    """A Flax (.msgpack) folder whose config.json no longer fits its weights fails at loading, naming the
    file, the weight and both shapes (not later, inside a compiled call)."""
    text = _pt_copy(tiny_dir, tmp_path / "text", config={"text_encoder": {"intermediate_size": 48}})
    with pytest.raises(ValueError, match=r"text_encoder/flax_model.msgpack: weight 'text_model/encoder/layers/0/"
                                         r"mlp/fc1/(kernel|bias)' has shape \((32, )?64,?\).*needs shape"):
        sdm.load_stable_diffusion(text)


@pytest.mark.torch
def test_broken_pytorch_folders_name_the_file_and_the_field(tmp_path):
    """Hub-layout (.safetensors) folders that are broken fail in load_stable_diffusion, before any
    sampling, naming the file and the weight / config field."""
    good = sd_tiny.write_tiny_sd(tmp_path / "good", seed=0, framework="pt")
    xl = sd_tiny.write_tiny_sd(tmp_path / "xl", seed=0, framework="pt", variant="sdxl")
    unet_w = os.path.join("unet", "diffusion_pytorch_model.safetensors")
    # weights of another architecture (SDXL's UNet in an SD 1 folder): the first weight that differs is named
    other = _pt_copy(good, tmp_path / "other", replace={unet_w: os.path.join(xl, unet_w)})
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors: weight 'mid_block.attentions.0."
                                         r"proj_in.weight' has shape \(64, 64\); the model its config.json describes "
                                         r"needs mid_block.attentions_0.proj_in.kernel of shape \(1, 1, 64, 64\)"):
        sdm.load_stable_diffusion(other)
    # ... and a file that lacks weights the config needs (a VAE's in place of the UNet's)
    vae_in_unet = _pt_copy(good, tmp_path / "vae_in_unet", replace={
        unet_w: os.path.join(good, "vae", "diffusion_pytorch_model.safetensors")})
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors: \d+ weights the model its "
                                         r"config.json describes needs are not in the file"):
        sdm.load_stable_diffusion(vae_in_unet)
    # a config that does not match the weights' shapes: the weight and both shapes named
    wide = _pt_copy(good, tmp_path / "wide", config={"unet": {"block_out_channels": [32, 96]}})
    with pytest.raises(ValueError, match=r"unet/diffusion_pytorch_model.safetensors: weight 'down_blocks.1.*' "
                                         r"has shape .* needs .* of shape"):
        sdm.load_stable_diffusion(wide)
    text = _pt_copy(good, tmp_path / "text", config={"text_encoder": {"intermediate_size": 48}})
    with pytest.raises(ValueError, match=r"text_encoder/model.safetensors: weight 'text_model.encoder.layers.0."
                                         r"mlp.fc1.(weight|bias)' has shape \(64.*needs .* of shape \((32, )?48,?\)"):
        sdm.load_stable_diffusion(text)
    # configs that do not fit together, or that amg_jax does not implement: file and field
    chans = _pt_copy(good, tmp_path / "chans", config={"vae": {"latent_channels": 8}})
    with pytest.raises(ValueError, match=r"unet/config.json: in_channels=4 does not match the VAE's latent_channels=8"):
        sdm.load_stable_diffusion(chans)
    xlunet = _pt_copy(good, tmp_path / "xlunet", replace={"unet/config.json": os.path.join(xl, "unet", "config.json")})
    with pytest.raises(ValueError, match=r"unet/config.json: addition_embed_type='text_time' is an SDXL UNet"):
        sdm.load_stable_diffusion(xlunet)
    shift = _pt_copy(good, tmp_path / "shift", config={"unet": {"resnet_time_scale_shift": "scale_shift"}})
    with pytest.raises(ValueError, match=r"unet/config.json: resnet_time_scale_shift='scale_shift' is not supported"):
        sdm.load_stable_diffusion(shift)
    # a damaged weights file
    cut = _pt_copy(good, tmp_path / "cut")
    vae_w = os.path.join(cut, "vae", "diffusion_pytorch_model.safetensors")
    with open(vae_w, "r+b") as f:
        f.truncate(os.path.getsize(vae_w) // 2)
    with pytest.raises(ValueError, match=r"vae/diffusion_pytorch_model.safetensors: tensor .* is truncated"):
        sdm.load_stable_diffusion(cut)
    # an SDXL folder without its second text encoder's weights
    no2 = _pt_copy(xl, tmp_path / "no2")
    os.remove(os.path.join(no2, "text_encoder_2", "model.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"text_encoder_2/model.safetensors or pytorch_model.bin"):
        sdm.load_stable_diffusion(no2)


def test_float16_keeps_the_vae_in_float32_where_its_config_says_force_upcast(tmp_path, tiny_dir):
    """As diffusers' pipelines: a float16 model decodes with a float32 VAE when vae/config.json sets
    force_upcast (the default; SD's VAE overflows float16 in its decoder), a float16 one when it is false;
    bfloat16 (float32's range) is kept. The upcast VAE is the float32 model's, so it decodes the same
    latents to the same pixels (the same float32 computation on the same weights: exact)."""
    f32 = sdm.load_stable_diffusion(tiny_dir)
    f16 = sdm.load_stable_diffusion(tiny_dir, dtype="float16")
    assert (f16.dtype, f16.vae_dtype, f32.vae_dtype) == ("float16", "float32", "float32")
    assert {str(p.dtype) for p in jax.tree.leaves(f16.vae_params)} == {"float32"}
    assert {str(p.dtype) for p in jax.tree.leaves(f16.unet_params)} == {"float16"}
    lat = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    np.testing.assert_array_equal(np.asarray(f16.decode(lat)), np.asarray(f32.decode(lat)))
    assert sdm.with_settings(f32, dtype="float16").vae_dtype == "float32"
    assert sdm.with_settings(f32, dtype="bfloat16").vae_dtype == "bfloat16"
    fixed = _pt_copy(tiny_dir, tmp_path / "fp16_fixed_vae", config={"vae": {"force_upcast": False}})
    half = sdm.load_stable_diffusion(fixed, dtype="float16")
    assert half.vae_dtype == "float16" and {str(p.dtype) for p in jax.tree.leaves(half.vae_params)} == {"float16"}
    assert np.isfinite(np.asarray(half.decode(lat))).all()
    # float16 samples end to end on a CPU (XLA:CPU's attention computes it in float32)
    res = sample(sdm.sd_denoiser(f16), make_guidance("cfg", scale=7.5), sdm.sd_sampler_config(f16, 2),
                 keys_from_seeds([0]), sdm.encode_prompts(f16, ["a cat"]))
    assert np.isfinite(np.asarray(f16.decode(res.x0))).all()
