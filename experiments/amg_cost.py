"""Issue-5 cost of AMG against plain CFG (same model, batch, seeds, sampler; one process).

    python experiments/amg_cost.py --model mixture --batch 32 --steps 50

Rows: CFG; AMG with the gate closed every step (constant threshold no sample reaches);
AMG with the gate open every step (``threshold="always"``), cheap and full gradient; AMG
with its default gate (the realistic mix). Each is compiled by a first call, then timed as
the best of ``--repeats`` calls; the ratio is against CFG's time in the same run.
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

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
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    bed = build_testbed("default")
    bench = prepare_bench(bed, a.batch, 1, 0, kinds=("specific",))
    den = get_model(a.model).denoiser(bed)
    keys, cond = bench.keys[: a.batch], bench.cond[: a.batch]
    sampler = SamplerConfig("ddim", num_steps=a.steps)
    closed = dict(threshold="constant", lambda_max=-1e-12)
    runs = {
        "CFG 7.5": ("cfg", None),
        "AMG gate closed": ("amg", closed),
        "AMG gate open, cheap gradient": ("amg", dict(threshold="always", gradient="cheap")),
        "AMG gate open, full gradient": ("amg", dict(threshold="always", gradient="full")),
        "AMG default gate (full)": ("amg", {}),
    }
    rows = {}
    for name, (method, amg) in runs.items():
        g = method_guidance(method, 7.5, bed, amg=amg)
        t0 = time.perf_counter()
        res = sample(den, g, sampler, keys, cond)
        jax.block_until_ready(res.x0)
        first = time.perf_counter() - t0
        best = float("inf")
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(sample(den, g, sampler, keys, cond).x0)
            best = min(best, time.perf_counter() - t0)
        gate = any_gate = None
        if "gate" in res.trace:
            g_open = np.asarray(res.trace["gate"])                   # [B, steps]
            gate, any_gate = float(g_open.mean()), float(g_open.any(axis=0).mean())
        rows[name] = {"seconds": best, "compile_s": first - best, "gate_open": gate, "steps_any_open": any_gate}
    base = rows["CFG 7.5"]["seconds"]
    print(f"model {a.model}, batch {a.batch}, DDIM {a.steps}, {jax.devices()[0].platform} x{jax.device_count()}")
    print("| run | s / batch | x CFG | compile s | gate open (samples) | steps with any gate open |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        r["ratio"] = r["seconds"] / base
        g = "-" if r["gate_open"] is None else f"{r['gate_open']:.0%}"
        a_ = "-" if r["steps_any_open"] is None else f"{r['steps_any_open']:.0%}"
        print(f"| {name} | {r['seconds']:.2f} | {r['ratio']:.2f} | {r['compile_s']:.1f} | {g} | {a_} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"model": a.model, "batch": a.batch, "steps": a.steps, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
