"""What AMG behind a screen that flags nothing costs against plain CFG, and where it goes, on the
tiny random SD with a tiny SSCD through the VAE (same run, same seeds, warm, median of repeats):

    python experiments/screen_overhead.py --steps 50 --batch 8 --batch 32 --out experiments/results/bench/screen_overhead.json

Rows: plain CFG; CFG behind the screen (its score only); AMG without a bank (the screen gates
G_spe); AMG + screen with the SSCD detector, G_sim armed (``lax.cond``) and G_dup off; the same
with G_sim off too; and with G_dup armed (the bench's row: the papers' settings). On the tiny SD a CFG step is a few milliseconds, so AMG's fixed per-step
bookkeeping (some tens of small XLA kernels) is a visible share at batch 8 and vanishes at batch 32.
"""
import argparse
import json
import os
import tempfile
import time

import jax
import numpy as np

from amg_jax.guidance import CFG, build_method
from amg_jax.guidance.screen import ScreenedGuidance, get_screen
from amg_jax.index import build_bank
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm
from amg_jax.sd_amg import SD_AMG, latent_detector
from amg_jax.samplers import keys_from_seeds, sample
from amg_jax.similarity import sscd


def variants(sd):
    cfgc = sscd.SSCDConfig(stage_sizes=(1, 1), width=8, embed_dim=16, image_size=32)
    emb = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    bank = build_bank(emb, np.arange(1000, dtype=np.int32) % 4, kind="embedding", normalize=True, scale_rows=256)
    det = latent_detector(sd, "sscd", (sscd.init_params(cfgc, seed=0), cfgc), bank)
    scr = get_screen("noise_magnitude_first")
    shut = dict(threshold="constant", lambda_min=0.999999, lambda_max=0.999999)
    conds = sdm.encode_prompts(sd, [f"caption {i}" for i in range(4)])      # y_N of G_dup (armed, never run)
    return {"plain CFG": build_method("cfg", 7.5),
            "CFG behind the screen": ScreenedGuidance(CFG(scale=7.5), CFG(scale=7.5), scr, 1e30),
            "AMG, no bank, screen gates G_spe": build_method(
                "amg", 7.5, screen=scr, screen_threshold=1e30, amg=dict(SD_AMG, dedup=False, dissimilar=False)),
            "AMG + screen + SSCD, G_dup and G_sim armed": build_method(
                "amg", 7.5, detector=det, neighbour_conds=conds, screen=scr, screen_threshold=1e30,
                amg=dict(SD_AMG, **shut)),
            "AMG + screen + SSCD, G_sim armed": build_method(
                "amg", 7.5, detector=det, screen=scr, screen_threshold=1e30, amg=dict(SD_AMG, **shut, dedup=False)),
            "AMG + screen + SSCD, G_spe only": build_method(
                "amg", 7.5, detector=det, screen=scr, screen_threshold=1e30,
                amg=dict(SD_AMG, **shut, dedup=False, dissimilar=False))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, action="append")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--out")
    a = p.parse_args()
    sd = sdm.load_stable_diffusion(sd_tiny.write_tiny_sd(os.path.join(tempfile.mkdtemp(), "sd"), seed=0))
    den = sdm.sd_denoiser(sd)
    sampler = sdm.sd_sampler_config(sd, a.steps, "ddim")
    gs = variants(sd)
    report = {"steps": a.steps, "repeats": a.repeats, "device": str(jax.devices()[0]), "batches": {}}
    for b in a.batch or [8]:
        cond = sdm.encode_prompts(sd, [f"prompt {i}" for i in range(b)])
        keys = keys_from_seeds(range(b))
        fns = {k: jax.jit(lambda ks, c, g=g: sample(den, g, sampler, ks, c).x0) for k, g in gs.items()}
        for f in fns.values():
            f(keys, cond).block_until_ready()
        times = {k: [] for k in fns}
        for _ in range(a.repeats):                   # interleaved: drift hits every row alike
            for k, f in fns.items():
                t = time.perf_counter()
                f(keys, cond).block_until_ready()
                times[k].append(time.perf_counter() - t)
        base = float(np.median(times["plain CFG"]))
        rows = {k: {"seconds": float(np.median(v)), "x_cfg": float(np.median(v)) / base} for k, v in times.items()}
        report["batches"][str(b)] = rows
        for k, r in rows.items():
            print(f"batch {b:>3}, {a.steps} steps | {k:>44}: {r['seconds']:.3f} s = {r['x_cfg']:.3f}x CFG", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
