"""amg_jax's own SD modules against diffusers' / transformers' PyTorch ones, on tiny random models written
in the hub's PyTorch layout (``write_tiny_sd(framework="pt")``, .safetensors) and loaded by
``load_stable_diffusion`` (so the weight mapping is under test too): SD 1.x (epsilon, conv projections),
SD 2.x (v-prediction, linear projections, GELU text encoder) and SDXL (text_time, two text encoders).

Targets (issue 22): each module within 1e-5 of the PyTorch module in float32; a 10-step CFG sample within
1e-4 in [0, 1] pixels of diffusers' PyTorch pipeline from the same initial latents. Measured on this
machine: modules 0.5e-6 .. 3.7e-6 (outputs of magnitude ~2), pipelines 0.5e-6 .. 1.5e-6: both sides are
float32 with different summation orders (oneDNN's convolutions against XLA's), so the round-off is a
few ulps of the activations per layer.
"""
import os
import subprocess
import sys

import numpy as np
import pytest

import jax.numpy as jnp
import torch       # the torch extra: `make test` installs it (a missing torch fails here, not a skip)

from amg_jax.guidance import make_guidance
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, sample

pytestmark = pytest.mark.torch
VARIANTS = ("sd1", "sd2", "sdxl")
MODULE_ATOL = 1e-5       # the target; measured <= 3.7e-6 (see the module docstring)
PIPELINE_ATOL = 1e-4     # the target in [0, 1] pixels; measured <= 1.5e-6
STEPS, SCALE = 10, 7.5
PROMPTS = ["a red cube", "a blue sphere on a wooden table"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)       # tiny ops: thread hand-offs would cost more than the work
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=VARIANTS)
def tiny(request, tmp_path_factory):
    """(variant, folder, our bundle) of a tiny PyTorch-layout SD of that variant."""
    path = sd_tiny.write_tiny_sd(tmp_path_factory.mktemp(request.param) / "pt", seed=3, framework="pt",
                             variant=request.param)
    return request.param, path, sdm.load_stable_diffusion(path)


def _rng(i):
    return np.random.default_rng(i)


def test_unet_matches_torch(tiny):
    from diffusers import UNet2DConditionModel

    variant, path, sd = tiny
    ref = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet")).eval()
    x = _rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    t = np.array([10, 700])
    ctx = _rng(1).standard_normal((2, 77, sd.unet.config.cross_attention_dim)).astype(np.float32)
    added, kw = None, {}
    if variant == "sdxl":
        te = _rng(2).standard_normal((2, sd.eps_fn.pooled_dim)).astype(np.float32)
        ids = np.array([[64, 64, 0, 0, 64, 64], [96, 64, 8, 4, 64, 64]], np.float32)
        added = (jnp.asarray(te), jnp.asarray(ids))
        kw = {"added_cond_kwargs": {"text_embeds": torch.tensor(te), "time_ids": torch.tensor(ids)}}
    got = np.asarray(sd.unet.apply({"params": sd.unet_params}, x, t, ctx, added))
    with torch.no_grad():
        want = ref(torch.tensor(x).permute(0, 3, 1, 2), torch.tensor(t), torch.tensor(ctx), **kw).sample
    want = want.permute(0, 2, 3, 1).numpy()
    assert np.abs(want).max() > 0.5                       # a real output, not a vanishing one
    np.testing.assert_allclose(got, want, atol=MODULE_ATOL, rtol=0)


def test_vae_matches_torch(tiny):
    from diffusers import AutoencoderKL

    _, path, sd = tiny
    ref = AutoencoderKL.from_pretrained(os.path.join(path, "vae")).eval()
    z = _rng(3).standard_normal((2, 8, 8, 4)).astype(np.float32)
    px = _rng(4).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    dec = np.asarray(sd.vae.apply({"params": sd.vae_params}, z, method="decode"))
    mean, logvar = sd.vae.apply({"params": sd.vae_params}, px, method="encode")
    with torch.no_grad():
        want_dec = ref.decode(torch.tensor(z).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
        dist = ref.encode(torch.tensor(px).permute(0, 3, 1, 2)).latent_dist
    np.testing.assert_allclose(dec, want_dec, atol=MODULE_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(mean), dist.mean.permute(0, 2, 3, 1).numpy(), atol=MODULE_ATOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), dist.logvar.permute(0, 2, 3, 1).numpy(), atol=MODULE_ATOL, rtol=0)


def test_text_encoders_match_torch(tiny):
    import transformers

    variant, path, sd = tiny
    ids = sdm.tokenize(sd.tokenizer, PROMPTS)
    comps = [("text_encoder", sd.text_encoder, sd.text_params, "CLIPTextModel")]
    if variant == "sdxl":
        comps.append(("text_encoder_2", sd.text_encoder_2, sd.text_params_2, "CLIPTextModelWithProjection"))
    for comp, module, params, cls in comps:
        ref = getattr(transformers, cls).from_pretrained(os.path.join(path, comp)).eval()
        out = module.apply({"params": params}, ids)
        with torch.no_grad():
            want = ref(torch.tensor(ids, dtype=torch.long), output_hidden_states=True)
        np.testing.assert_allclose(np.asarray(out.last), want.last_hidden_state.numpy(), atol=MODULE_ATOL, rtol=0)
        np.testing.assert_allclose(np.asarray(out.penultimate), want.hidden_states[-2].numpy(), atol=MODULE_ATOL,
                                   rtol=0)
        if comp == "text_encoder_2":
            np.testing.assert_allclose(np.asarray(out.projected), want.text_embeds.numpy(), atol=MODULE_ATOL, rtol=0)


def test_cfg_sample_matches_the_torch_pipeline(tiny):
    """10 DDIM steps of CFG 7.5 from the same latents: ours vs diffusers' StableDiffusion(XL)Pipeline with
    DDIMScheduler.from_config (SD 2.x: v-prediction; SDXL: its zero negative embedding and micro-conditioning)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    variant, path, sd = tiny
    assert sd.prediction_type == ("v_prediction" if variant == "sd2" else "epsilon")
    den = sdm.sd_denoiser(sd)
    lat = _rng(5).standard_normal((len(PROMPTS),) + den.sample_shape).astype(np.float32)
    res = sample(den, make_guidance("cfg", scale=SCALE), sdm.sd_sampler_config(sd, STEPS),
                 keys_from_seeds(range(len(PROMPTS))), sdm.encode_prompts(sd, PROMPTS), x_T=jnp.asarray(lat))
    got = np.asarray(den.decode(res.x0)) / 2 + 0.5
    with sdm.quiet_libraries():
        if variant == "sdxl":
            pipe = StableDiffusionXLPipeline.from_pretrained(path)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        want = pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=SCALE, height=64, width=64,
                    latents=torch.from_numpy(lat.transpose(0, 3, 1, 2).copy()), output_type="np").images
    assert 0.05 < got.std() and np.mean((got > 0) & (got < 1)) > 0.9       # not saturated: a real comparison
    diff = float(np.abs(got - want).max())
    print(f"\n{variant}: max |ours - torch pipeline| on [0, 1] images: {diff:.3g}")
    assert diff < PIPELINE_ATOL


def test_loading_and_sampling_imports_no_flax_model_class(tmp_path):
    """In a fresh interpreter: load an SDXL folder with PyTorch weights and an SD 2.x folder with Flax
    weights, encode, sample and decode; then no diffusers Flax model module and no transformers
    modeling_flax module is in sys.modules."""
    path = sd_tiny.write_tiny_sd(tmp_path / "xl", seed=0, framework="pt", variant="sdxl")
    flax_dir = sd_tiny.write_tiny_sd(tmp_path / "flax", seed=0, framework="flax", variant="sd2")
    code = f"""
import sys
from amg_jax.guidance import make_guidance
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, sample
for path in ({path!r}, {flax_dir!r}):
    sd = sdm.load_stable_diffusion(path)
    den = sdm.sd_denoiser(sd)
    res = sample(den, make_guidance("cfg", scale=7.5), sdm.sd_sampler_config(sd, 2), keys_from_seeds([0]),
                 sdm.encode_prompts(sd, ["a cat"]))
    den.decode(res.x0).block_until_ready()
bad = sorted(m for m in sys.modules if (m.startswith("diffusers.models") and "flax" in m)
             or (m.startswith("transformers.models") and "modeling_flax" in m) or m.startswith("transformers.modeling_flax"))
print("FLAX_MODULES", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FLAX_MODULES []" in out.stdout, out.stdout[-2000:]
