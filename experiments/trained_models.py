"""The method table on a trained testbed UNet (checkpoints/): copies, nL2, FD, alignment per prompt kind.

    python experiments/trained_models.py --model unet-text --prompts 8 --samples 32 \
        --out experiments/results/trained_text.json

Every run in ``--runs`` (JSON: name -> {"method", "base", "scale", "amg": {...}}; default: the
issue's table) samples the same seeds for the same prompts. Finished runs are kept in ``--out``
and skipped when the script is run again (an interrupted table resumes).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from amg_jax.data import testbed as tb
from amg_jax.jsonio import write_json
from amg_jax.samplers import SamplerConfig
from amg_jax.apps.models import bench_evaluator, build_testbed, get_model, make_detector, resolve_testbed
from amg_jax.apps.runs import run_method
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import build_method
from amg_jax.models.zoo import update_card

def tables(c3: float, strong: float) -> tuple[dict, dict]:
    """The runs of the conditional and of the unconditional table (AMG's c3 and the strong c3)."""
    amg = {"c3": c3}
    table = {
        "CFG": {"method": "cfg"},
        "AMG": {"method": "amg", "amg": amg},
        "AMG strong": {"method": "amg", "amg": {"c3": strong}},
        "STP": {"method": "stp"},
        "DTP": {"method": "dtp"},
        "OG": {"method": "og"},
        "OG+DTP": {"method": "og_dtp"},
        "AMG no G_sim": {"method": "amg", "amg": dict(amg, dissimilar=False)},
        "AMG constant threshold": {"method": "amg", "amg": dict(amg, threshold="constant")},
        "AMG ungated": {"method": "amg", "amg": dict(amg, threshold="always")},
    }
    uncond = {
        "unguided": {"method": "none"},
        "AMG (G_sim)": {"method": "amg", "amg": amg},
        "AMG strong": {"method": "amg", "amg": {"c3": strong}},
        "AMG ungated": {"method": "amg", "amg": dict(amg, threshold="always")},
        "AMG constant threshold": {"method": "amg", "amg": dict(amg, threshold="constant")},
    }
    return table, uncond


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="unet-text")
    p.add_argument("--testbed", default="auto")
    p.add_argument("--prompts", type=int, default=8, help="prompts per kind (text) / pseudo-prompts (uncond)")
    p.add_argument("--samples", type=int, default=32, help="samples per prompt")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--scale", type=float, default=None, help="default: the card's guidance_scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--c3", type=float, default=1.0, help="AMG's c3 (data units) in the table's AMG rows")
    p.add_argument("--strong", type=float, default=3.0, help="c3 of the 'AMG strong' row")
    p.add_argument("--chunk", type=int, default=16, help="seeds per sampler call (AMG's gate skips per chunk)")
    p.add_argument("--runs", default=None, help="JSON {name: spec}; default: the full table")
    p.add_argument("--only", default=None, help="comma-separated run names of the table to do")
    p.add_argument("--out", default=None)
    p.add_argument("--card", action="store_true",
                   help="record the baseline row (CFG / unguided) as the model card's measured memorization")
    a = p.parse_args(argv)
    model = get_model(a.model)
    conditioning = model.conditioning
    table, uncond = tables(a.c3, a.strong)
    runs = json.loads(a.runs) if a.runs else (uncond if conditioning == "uncond" else table)
    if a.only:
        runs = {k: runs[k] for k in a.only.split(",")}
    bed = build_testbed(resolve_testbed(a.testbed, [model]))
    den = model.denoiser(bed)
    bank = model.bank(bed)
    a.scale = model.scale(a.scale)
    bench = prepare_bench(bed, a.prompts, a.samples, a.seed, conditioning=conditioning,
                          evaluator=bench_evaluator(bed))
    results = json.load(open(a.out)) if a.out and os.path.exists(a.out) else {}
    meta = {"model": a.model, "scale": a.scale, "prompts": a.prompts, "samples": a.samples, "steps": a.steps, "sampler": a.sampler,
            "seed": a.seed, "threshold": bench.threshold,
            "fd_features": "evalnet" if bench.evaluator is not None else "pooled pixels"}
    if results.get("_meta", meta) != meta:
        raise SystemExit(f"{a.out} holds runs of other settings {results['_meta']}; use another --out")
    results["_meta"] = meta
    if "true renders" not in results:
        results["true renders"] = {"spec": {}, "metrics": bench.measure(bench.truth)}
    print(f"{a.model}: {len(bench.caption_ids)} samples/run, copy threshold {bench.threshold:.3f}, "
          f"FD on {meta['fd_features']}", flush=True)
    sampler = SamplerConfig(a.sampler, num_steps=a.steps)
    for name, spec in runs.items():
        if name in results:
            print(f"{name}: done before, skipped", flush=True)
            continue
        # the table's own AMG settings (``amg``), not the model's defaults; the nL2 detector unless a run names one
        method = spec.get("method", "amg")
        det = make_detector(spec.get("detector", "nl2"), bank) if method == "amg" else None
        g = build_method(method, spec.get("scale", a.scale), base=spec.get("base", model.base), detector=det,
                         amg=spec.get("amg"))
        t0 = time.time()
        res = run_method(den, g, sampler, bench.keys, bench.cond, batch=a.chunk)
        x = res.x
        sec = time.time() - t0
        m = bench.measure(np.clip(np.nan_to_num(x, nan=0.0), -1e3, 1e3))
        gate = np.asarray(res.trace["gate"]) if "gate" in res.trace else None
        _, nearest = tb.nearest_training(np.nan_to_num(x, nan=0.0), bed)
        for kind, r in m.items():
            sel = np.ones(len(x), bool) if kind == "all" else bench.kinds == kind
            r["count"] = int(sel.sum())
            r["gate_open_rate"] = float(gate[sel].mean()) if gate is not None else None
            r["seconds"] = sec
            print(f"{name:>24} {kind:>10}: copied {r['frac_copied']:6.1%} nL2<1.4 {r['frac_nl2_below_1.4']:6.1%} "
                  f"med nL2 {r['nl2_median']:.2f} FD {r['fd']:8.2f} align {r['alignment']:4.0%} "
                  f"OOR {r['frac_out_of_range']:6.1%} gate {0 if gate is None else r['gate_open_rate']:5.1%} "
                  f"({sec:.0f}s)", flush=True)
        results[name] = {"spec": spec, "metrics": m}
        if a.out:
            write_json(a.out, results, indent=1)
    if a.card:
        record_card(a, results, conditioning)


def record_card(a, results: dict, conditioning: str) -> None:
    """Write the baseline's copy rates per prompt kind into the checkpoint's card."""
    base = "unguided" if conditioning == "uncond" else "CFG"
    m = results[base]["metrics"]
    keep = ("frac_copied", "frac_nl2_below_1.4", "nl2_median", "fd", "alignment", "frac_out_of_range", "count")
    update_card(get_model(a.model).path, memorization={
        "method": base if conditioning == "uncond" else f"CFG {a.scale}", "sampler": f"{a.sampler} {a.steps}",
        "copy_threshold": results["_meta"]["threshold"], "fd_features": results["_meta"]["fd_features"],
        "per_kind": {k: {f: v[f] for f in keep if f in v} for k, v in m.items()},
        "command": "python experiments/trained_models.py " + " ".join(sys.argv[1:] if a is not None else [])})
    print(f"recorded {base} memorization in the card of {a.model}")


if __name__ == "__main__":
    main()
