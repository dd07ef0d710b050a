"""Issue-5 measurements: AMG variants against CFG on a testbed model (partial memorizer by default).

    python experiments/amg_partial.py --model mixture --prompts 8 --samples 32 \
        --runs '{"cfg": {"method": "cfg"}, "amg": {"method": "amg", "amg": {"gradient": "full"}}}'

Every run uses the same prompts, seeds and references (one ``prepare_bench``); prints one
table row per run and kind and writes the metrics to ``--out`` (JSON) as each run finishes.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from amg_jax.data import testbed as tb
from amg_jax.samplers import SamplerConfig, sample
from amg_jax.apps.models import build_testbed, calibrated_bank, get_model, make_detector
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import build_method



def method_guidance(method: str, scale: float, bed, *, base: str = "cfg", detector: str = "nl2", amg=None):
    """The method's guidance with this experiment's own AMG settings (``amg``, not a model's
    defaults) and a pixel ``detector`` over the testbed's calibrated bank."""
    det = make_detector(detector, calibrated_bank(bed)) if method == "amg" else None
    return build_method(method, scale, base=base, detector=det, amg=amg)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixture")
    p.add_argument("--testbed", default="default")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default="specific,duplicated,generic")
    p.add_argument("--runs", required=True, help="JSON {name: {method, base, detector, amg, cond, clip}}")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    runs = json.loads(a.runs)
    bed = build_testbed(a.testbed)
    bench = prepare_bench(bed, a.prompts, a.samples, a.seed, tuple(a.kinds.split(",")))
    den = get_model(a.model).denoiser(bed)
    results = json.load(open(a.out)) if a.out and os.path.exists(a.out) else {}
    print(f"{len(bench.caption_ids)} samples/run, copy threshold {bench.threshold:.3f}", flush=True)
    for name, spec in runs.items():
        g = method_guidance(spec.get("method", "amg"), spec.get("scale", a.scale), bed,
                            base=spec.get("base", "cfg"), detector=spec.get("detector", "nl2"),
                            amg=spec.get("amg"))
        cond = bench.cond if spec.get("cond", "caption") == "caption" else None
        t0 = time.time()
        res = sample(den, g, SamplerConfig(a.sampler, num_steps=a.steps, clip_sample=bool(spec.get("clip", False))),
                     bench.keys, cond)
        x = np.asarray(res.x0)
        sec = time.time() - t0
        m = bench.measure(np.nan_to_num(x, nan=0.0))
        gate = np.asarray(res.trace["gate"]) if "gate" in res.trace else None
        dist, _ = tb.nearest_training(np.nan_to_num(x, nan=0.0), bed)
        copied = dist < bench.threshold
        for kind, r in m.items():
            sel = np.ones(len(x), bool) if kind == "all" else bench.kinds == kind
            keep = sel & ~copied
            r["copied_count"] = int((sel & copied).sum())
            r["count"] = int(sel.sum())
            r["oor_not_copied"] = float(np.mean(np.abs(x[keep]) > 1.0)) if keep.any() else float("nan")
            r["gate_open_rate"] = float(gate[sel].mean()) if gate is not None else None
            r["seconds"] = sec
            print(f"{name:>24} {kind:>10}: copied {r['frac_copied']:6.1%} nL2<1.4 {r['frac_nl2_below_1.4']:6.1%} "
                  f"med nL2 {r['nl2_median']:.2f} FD {r['fd']:9.2f} align {r['alignment']:4.0%} "
                  f"OOR {r['frac_out_of_range']:6.1%} (not copied {r['oor_not_copied']:6.1%}) gate {0 if gate is None else r['gate_open_rate']:5.1%} "
                  f"({sec:.0f}s)", flush=True)
        results[name] = {"spec": spec, "metrics": m}
        if a.out:
            with open(a.out + ".tmp", "w") as f:
                json.dump(results, f, indent=1)
            os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
