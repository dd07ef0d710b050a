"""Issue-5 mechanics table on the perfect memorizer (the empirical denoiser of the default testbed).

    python experiments/amg_mechanics.py --samples 256 --out experiments/results/amg_mechanics.json

Text-conditional (specific, duplicated, generic prompts): CFG 7.5, AMG at growing data-scaled
c3, G_spe + G_dup alone; unconditional: unguided vs G_sim alone; class-conditional (class =
the shape attribute): CFG vs G_sim alone. Per row: memorized (nL2 < 1.4), copied (calibrated),
median nL2, out-of-range pixels, gate-open rate. DDIM 50 steps.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp
import numpy as np

from amg_jax.evaluation import metrics
from amg_jax.data import testbed as tb
from amg_jax.guidance import make_guidance
from amg_jax.guidance.amg import make_amg
from amg_jax.data.bank import bank_from_testbed
from amg_jax.index import build_bank
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample
from amg_jax.similarity.pixel import pixel_detector


def row(bed, threshold, x, trace):
    x = np.nan_to_num(np.asarray(x), nan=0.0)
    nl2 = metrics.nl2_values(x, bed.images)["nl2"]
    d, _ = tb.nearest_training(x, bed)
    gate = np.asarray(trace["gate"]).mean() if "gate" in trace else 0.0
    return {"memorized_nl2": float(np.mean(nl2 < 1.4)), "copied": float(np.mean(d < threshold)),
            "median_nl2": float(np.median(nl2)), "out_of_range": float(np.mean(np.abs(x) > 1.0)),
            "gate_open": float(gate), "n": int(len(x))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=256, help="samples per prompt kind / setting")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--c3", default="300,1000,3000,10000,30000")
    p.add_argument("--gradient", default="full", choices=("full", "cheap"), help="AMG's G_sim gradient")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    bed = tb.make_testbed()
    bank = bank_from_testbed(bed, calibrate=True)
    threshold = bank.copy_threshold
    det = pixel_detector(bank)
    ddim = SamplerConfig("ddim", num_steps=a.steps)
    n = a.samples
    keys = keys_from_seeds(np.arange(n))
    rng = np.random.default_rng(0)
    c3s = [float(v) for v in a.c3.split(",")]
    out = {}

    def run(setting, name, den, g, cond):
        t0 = time.time()
        res = sample(den, g, ddim, keys, cond)
        r = row(bed, threshold, res.x0, res.trace)
        r["seconds"] = round(time.time() - t0, 1)
        out.setdefault(setting, {})[name] = r
        print(f"{setting:>24} {name:>22}: memorized {r['memorized_nl2']:6.1%} copied {r['copied']:6.1%} "
              f"median nL2 {r['median_nl2']:.2f} OOR {r['out_of_range']:6.2%} gate {r['gate_open']:5.1%} "
              f"({r['seconds']:.0f}s)", flush=True)
        if a.out:
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out + ".tmp", "w") as f:
                json.dump({"gradient": a.gradient, "samples": n, "steps": a.steps, "copy_threshold": threshold,
                           "knn_scale": bank.knn_scale, "results": out}, f, indent=1)
            os.replace(a.out + ".tmp", a.out)

    text = empirical_denoiser(bed.images, bed.labels)
    cfg = make_guidance("cfg", scale=7.5)
    for kind, ids in tb.prompts_by_kind(bed).items():
        cond = jnp.asarray(rng.choice(ids, n), jnp.int32)
        run(f"text {kind}", "CFG 7.5", text, cfg, cond)
        for c3 in c3s:
            run(f"text {kind}", f"AMG c3={c3:g}", text, make_amg(cfg, det, c3=c3, gradient=a.gradient), cond)
        run(f"text {kind}", "G_spe+G_dup only", text, make_amg(cfg, det, dissimilar=False), cond)

    uncond = empirical_denoiser(bed.images)
    none = jnp.full((n,), -1, jnp.int32)
    run("unconditional", "unguided", uncond, make_guidance("none"), none)
    for c3 in c3s:
        run("unconditional", f"G_sim c3={c3:g}", uncond,
            make_amg(make_guidance("none"), det, despecify=False, dedup=False, c3=c3, gradient=a.gradient), none)

    shape = tb.ATTRIBUTES.index("shape")
    classes = bed.attributes[:, shape].astype(np.int32)
    cls = empirical_denoiser(bed.images, classes)
    cbank = build_bank(bed.images, classes, kind="pixel", dedup=True, copy_threshold=threshold)
    cdet = pixel_detector(cbank)
    ccond = jnp.asarray(rng.choice(np.unique(classes), n), jnp.int32)
    run("class-conditional", "CFG 7.5", cls, cfg, ccond)
    for c3 in c3s:
        run("class-conditional", f"G_sim c3={c3:g}", cls,
            make_amg(cfg, cdet, despecify=False, dedup=False, c3=c3, gradient=a.gradient), ccond)


if __name__ == "__main__":
    main()
