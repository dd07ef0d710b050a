"""The ``devices`` part: sharded CFG sampling over meshes of 1, 2, 4 devices, the global batch fixed."""
from __future__ import annotations

import jax

from amg_jax.apps.bench.models import _rate_row, _Shared
from amg_jax.apps.bench.config import DEVICE_COUNTS, GUIDANCE_SCALE, machine, timed
from amg_jax.guidance import CFG
from amg_jax.models import stable_diffusion as sdm
from amg_jax.sharding import make_mesh, sample_sharded

def part_devices(env: _Shared) -> dict:
    """``sample_sharded`` (CFG on SD) over the first 1, 2, 4 devices, the same global batch."""
    s, sd, den = env.s, env.sd, env.den
    b = s.device_batch
    keys, cond = env.keys(b), sdm.encode_prompts(sd, env.prompts(b))
    sampler = sdm.sd_sampler_config(sd, s.steps, "ddim")
    guidance = CFG(scale=GUIDANCE_SCALE)
    devs = jax.devices()
    rows, notes = [], []
    for n in DEVICE_COUNTS:
        if n > len(devs):
            notes.append(f"{n} devices: skipped, this process has {len(devs)}")
            continue
        mesh = make_mesh(devs[:n])
        t, _ = timed(lambda mesh=mesh: sample_sharded(den, guidance, sampler, keys, cond, mesh=mesh).x0, s.repeats)
        rows.append(_rate_row(f"sample_sharded over {n} device{'s' if n > 1 else ''}", t, b, devices=n,
                              images_per_s_per_device=b / t["seconds"] / n))
        env.echo(f"[devices] {n}: {rows[-1]['images_per_s']:.2f} images/s")
    for r in rows:
        r["ratio"] = r["images_per_s"] / rows[0]["images_per_s"]
    rows[0]["reference"] = True
    m = machine()
    if m["simulated_devices"]:
        notes.insert(0, f"simulated devices: XLA_FLAGS={m['xla_flags']!r} splits one CPU ({m['cpu_count']} cores) into "
                        f"{m['device_count']} devices that share its cores, so no speed-up is expected")
    head = ", ".join(f"{r['devices']}: {r['ratio']:.2f}x" for r in rows)
    return {"title": "sample_sharded scaling over devices", "model": env.sd_label(), "global_batch": b,
            "steps": s.steps, "rows": rows, "met": None, "headline": f"images/s vs 1 device: {head}", "notes": notes}
