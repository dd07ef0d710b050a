"""SDXL end to end on a tiny random-weight SDXL (``write_tiny_sd(variant="sdxl")``): `amg sample` recognises the
folder and runs every method (CFG, STP, DTP, OG, OG+DTP, AMG with SSCD through the SDXL VAE, a Somepalli
baseline) sharded over the test's devices, and an SD sweep accepts it."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from amg_jax.apps import cli, sweep
from amg_jax.guidance import make_guidance
from amg_jax.images import to_uint8
from amg_jax.index import build_bank, save_bank
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, sample
from amg_jax.similarity import sscd

STEPS = 3
PROMPTS = ["a red cube", "a blue sphere"]
SSCD_CFG = sscd.SSCDConfig(stage_sizes=(1, 1), width=4, embed_dim=8, image_size=32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl")
    sd_dir = sd_tiny.write_tiny_sd(root / "tiny-sdxl", seed=0, variant="sdxl")
    sd = sdm.load_stable_diffusion(sd_dir)
    params = sscd.init_params(SSCD_CFG, seed=0)
    sscd.save_params(str(root / "sscd.npz"), params, SSCD_CFG)
    rng = np.random.default_rng(0)
    save_bank(str(root / "bank.npz"), build_bank(rng.normal(size=(4, 8)), kind="embedding", normalize=True))
    json.dump({"captions": PROMPTS + ["a green apple", "a ship"]}, open(str(root / "bank.npz") + ".captions.json", "w"))
    return dict(root=root, sd_dir=sd_dir, sd=sd)


def _pngs(out) -> np.ndarray:
    names = sorted(os.listdir(out / "images"))
    return np.stack([np.asarray(Image.open(out / "images" / n), np.float32) for n in names])


def test_the_folder_is_an_sdxl(env):
    sd = env["sd"]
    assert sd.is_sdxl and sd.tokenizer_2 is not None and sd.vae_scaling_factor == pytest.approx(0.13025)
    cond = sdm.encode_prompts(sd, PROMPTS)
    assert cond.shape == (2, 78, 64)          # 77 tokens of [CLIP-L | bigG] penultimate states + the pooled row
    np.testing.assert_array_equal(np.asarray(sd.null_embedding), 0.0)   # force_zeros_for_empty_prompt
    assert float(np.abs(np.asarray(cond[:, 77, 32:])).max()) == 0.0      # the pooled row's padding


def test_every_method_runs_through_amg_sample(env, tmp_path):
    """Each method's images through `amg sample` (batches sharded over the devices); CFG equals the library
    call; the methods that change CFG's steps change its images."""
    root = env["root"]
    common = ["sample", "--model", f"sd:{env['sd_dir']}", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
              "--steps", str(STEPS), "--batch", "2"]
    images = {}
    for method in ("cfg", "stp", "dtp", "og", "og_dtp"):
        out = tmp_path / method
        assert cli.main(common + ["--out", str(out), "--guidance", method]) == 0
        images[method] = _pngs(out)
        assert images[method].shape == (2, 64, 64, 3)
    den = sdm.sd_denoiser(env["sd"])
    ref = sample(den, make_guidance("cfg", scale=7.5), sdm.sd_sampler_config(env["sd"], STEPS), keys_from_seeds([0, 0]),
                 sdm.encode_prompts(env["sd"], PROMPTS))
    assert np.abs(images["cfg"] - to_uint8(np.asarray(den.decode(ref.x0))).astype(np.float32)).max() <= 1.0
    for method in ("stp", "og", "og_dtp"):
        assert np.abs(images[method] - images["cfg"]).max() > 2.0, method
    # AMG with SSCD through the SDXL VAE, the gate held open, G_dup from the bank's captions, and GNI on the prompt
    out = tmp_path / "amg"
    assert cli.main(common + ["--out", str(out), "--guidance", "amg", "--detector", f"sscd:{root / 'sscd.npz'}",
                              "--bank", str(root / "bank.npz"), "--c3", "1000", "--lambda-min", "-0.5",
                              "--lambda-max", "-0.5", "--baseline", "gni"]) == 0
    rep = json.loads((out / "samples.json").read_text())
    assert rep["complete"] and all(s["gate_open_rate"] == 1.0 for s in rep["samples"])
    trace = np.load(out / "trace.npz")
    assert trace["s2"].max() > 0                   # caption deduplication acted
    assert np.abs(_pngs(out) - images["cfg"]).max() > 2.0


def test_an_sd_sweep_accepts_the_sdxl_folder(env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    text = ("[sweep]\n" + f'name = "tiny_sdxl"\nmodel = {json.dumps("sd:" + str(env["sd_dir"]))}\n'
            f"prompts_file = {json.dumps(str(prompts))}\nsamples_per_prompt = 1\nsteps = 2\nbatch = 2\n"
            f"sscd = {json.dumps(str(env['root'] / 'sscd.npz'))}\nbank = {json.dumps(str(env['root'] / 'bank.npz'))}\n"
            f'out = "out"\n\n[[method]]\nname = "DTP"\nguidance = "dtp"\n')
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    table = sweep.main(str(path), progress=False, echo=lambda *_: None)
    assert list(table["cells"]) == ["DTP"] and table["missing"] == []
    rec = json.load(open(tmp_path / "out" / "cells" / "DTP.json"))
    assert rec["metrics"]["all"]["count"] == 2
