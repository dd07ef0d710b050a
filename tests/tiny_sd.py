"""A tiny random-weight Stable Diffusion, a tiny SSCD and a bank, written by the tests themselves
(``tests/`` is on ``sys.path``: pyproject's pytest ``pythonpath``); conftest's ``tiny_sd_env``
builds it once per session for tests/test_sd_amg.py and tests/apps/test_sample.py."""
import json

import jax
import numpy as np

from amg_jax.apps.models import model_spec
from amg_jax.index import build_bank, save_bank
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds, sample
from amg_jax.similarity import sscd

STEPS = 3
PROMPTS = ["a red cube", "a blue sphere"]
SSCD_CFG = sscd.SSCDConfig(stage_sizes=(1, 1), width=4, embed_dim=8, image_size=32)


def build_env(root) -> dict:
    """The tiny SD in ``root``, its CFG samples of ``PROMPTS`` (seed 0 each), a tiny SSCD params file
    and a bank of SSCD embeddings holding those samples (labels 0, 1: the "training images" the CFG
    run copies) and 3 others, with ``PROMPTS`` as its captions."""
    sd_dir = sd_tiny.write_tiny_sd(root / "tiny-sd", seed=0)
    sd = sdm.load_stable_diffusion(sd_dir)
    den = sdm.sd_denoiser(sd)
    params = sscd.init_params(SSCD_CFG, seed=0)
    sscd.save_params(str(root / "sscd.npz"), params, SSCD_CFG)
    cond = sdm.encode_prompts(sd, PROMPTS)
    keys = keys_from_seeds([0] * len(PROMPTS))          # `amg sample` gives each prompt seeds 0, 1, ...
    cfg = sample(den, model_spec(f"sd:{sd_dir}").guidance("cfg", 7.5), sdm.sd_sampler_config(sd, STEPS), keys, cond)
    # the bank holds the CFG samples themselves ("training images" the CFG run copies) + others
    imgs = np.asarray(den.decode(cfg.x0))
    others = np.asarray(den.decode(jax.random.normal(jax.random.key(5), (3,) + den.sample_shape)))
    emb = sscd.embed_images(params, np.concatenate([imgs, others]), SSCD_CFG)
    bank = build_bank(emb, np.array([0, 1, -1, -1, -1], np.int32), kind="embedding", normalize=True)
    save_bank(str(root / "bank.npz"), bank)
    json.dump({"captions": PROMPTS}, open(str(root / "bank.npz") + ".captions.json", "w"))
    return dict(root=root, sd_dir=sd_dir, sd=sd, den=den, params=params, bank=bank, cond=cond, keys=keys, cfg=cfg)
