"""The ``amg`` part: AMG against plain CFG (gate closed / open / a realistic mix; pixel and SSCD-through-VAE
detectors; per-step components)."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.apps.bench.models import _gate_stats, _Shared
from amg_jax.apps.bench.report import _fmt
from amg_jax.apps.bench.config import GUIDANCE_SCALE, Settings, timed, xla_gflops
from amg_jax.apps.models import get_model
from amg_jax.data import testbed as tb
from amg_jax.guidance import build_method
from amg_jax.guidance.base import x0_from_eps
from amg_jax.guidance.screen import get_screen
from amg_jax.index import build_bank
from amg_jax.models import stable_diffusion as sdm
from amg_jax.sd_amg import SD_AMG, latent_detector
from amg_jax.samplers import SamplerConfig, sample
from amg_jax.similarity import sscd

CLOSED = "AMG gate closed all the way"
OPEN_FULL = "AMG gate open every step, full gradient"
OPEN_CHEAP = "AMG gate open every step, cheap gradient"
REALISTIC = "AMG default gate, prompts that copy (realistic mix)"
COMPACT = "AMG default gate, realistic mix, open_batch=B/4"
DETECT_EVERY = 3
CLOSED_K = f"AMG gate closed all the way, detect_every={DETECT_EVERY}"
SPE_ONLY = "AMG despecification only, gate closed (tiny setting: no lax.cond to compile)"
SCREEN_CLEAN = "AMG + screen, prompts that do not copy (none flagged)"
SCREEN_COPY = "AMG + screen, prompts that copy (all flagged), gate closed"
# the screen of the bench rows: ||eps_c - eps_u|| on x_T; its threshold puts every sample above or
# below it (random weights copy nothing: what the rows time is the screen's branch, not a calibration)
BENCH_SCREEN = "noise_magnitude_first"


def _amg_rows(env: _Shared, group: str, den, cfg_guidance, variants: list, keys, cond, steps_cfg,
              repeats: int) -> list:
    """Time plain CFG, then each (name, guidance) of ``variants``; rows carry ratio = time / CFG's."""
    rows = []
    t_cfg, _ = timed(lambda: sample(den, cfg_guidance, steps_cfg, keys, cond).x0, repeats)
    rows.append(env.record(dict(group=group, name="plain CFG", ratio=1.0, reference=True, **t_cfg)))
    env.echo(f"[amg] {group}: plain CFG {t_cfg['seconds']:.3f} s")
    for name, g in variants:
        t, res = timed(lambda g=g: sample(den, g, steps_cfg, keys, cond), repeats)
        row = dict(group=group, name=name, ratio=t["seconds"] / t_cfg["seconds"], **t, **_gate_stats(res.trace))
        rows.append(env.record(row))
        env.echo(f"[amg] {group}: {name} {t['seconds']:.3f} s = {row['ratio']:.2f}x CFG"
                 + (f" (gate open {row['gate_open']:.0%} of sample-steps)" if "gate_open" in row else ""))
    return rows


def _unet_text_group(env: _Shared) -> tuple[list, dict]:
    """AMG on the trained unet-text (pixel detector over its bank, the distance gate) vs CFG."""
    s = env.s
    lm = env.unet_text
    name = "unet-text"
    spec = get_model(name)
    scale = spec.scale()
    detector = spec.detector
    by_kind = tb.prompts_by_kind(lm.bed)
    # prompts that copy: duplicated captions (CFG copies ~90%) alternating with specific ones (~48%)
    pool = np.stack([by_kind["duplicated"][:8], by_kind["specific"][:8]], axis=1).reshape(-1)
    cond = jnp.asarray(pool[np.arange(s.unet_batch) % len(pool)], jnp.int32)
    keys = env.keys(s.unet_batch)
    sampler = SamplerConfig("ddim", num_steps=s.unet_steps)
    base = spec.amg_settings()

    def amg(**over):
        return spec.guidance("amg", scale, lm.bank, amg=over)

    group = f"{name} (pixel {detector} detector, {len(lm.bank.rows)}-row bank)"
    if s.tiny:
        shut = dict(threshold="constant", lambda_min=-1e-9, lambda_max=-1e-9)
        variants = [(SPE_ONLY, amg(**shut, dedup=False, dissimilar=False))]
    else:
        realistic = amg()
        variants = [(CLOSED, out_of_reach(realistic)), (REALISTIC, realistic)]
        if not s.quick:     # three more AMG programs to compile (30-60 s each on a CPU)
            variants[1:1] = [(OPEN_FULL, amg(threshold="always")),
                             (OPEN_CHEAP, amg(threshold="always", gradient="cheap"))]
            if s.unet_batch >= 8:
                variants.append((COMPACT, amg(open_batch=s.unet_batch // 4)))
    cfg = build_method("cfg", scale)
    rows = _amg_rows(env, group, lm.denoiser, cfg, variants, keys, cond, sampler, s.repeats)
    if not s.tiny:
        rows += _components(env, group, lm.denoiser, amg().detector, cond, rows[0]["seconds"] / s.unet_steps, scale)
    info = {"model": name, "batch": s.unet_batch, "steps": s.unet_steps, "guidance_scale": scale,
            "detector": detector, "amg": base}
    return rows, info


def out_of_reach(guidance, shift: float = 100.0):
    """``guidance`` (AMG with a pixel detector) with its bank moved ``shift`` away in every pixel: the
    distance gate never opens, and the program is the one ``guidance`` compiles to (the bank is a
    traced argument, its static metadata unchanged), so the gate-closed row costs no compilation
    and differs from the realistic run by the gate alone."""
    bank = guidance.detector.bank
    rows = bank.rows + jnp.asarray(shift, bank.rows.dtype)
    far = bank.replace(rows=rows, sq_norms=jnp.sum(jnp.square(rows), axis=1))
    return dataclasses.replace(guidance, detector=guidance.detector.replace(bank=far))


def _components(env: _Shared, group: str, den, detector, cond, cfg_step_s: float, scale: float,
                full_gradient: bool = True) -> list:
    """Where a step's time goes, each part jitted on its own and relative to one step of the CFG
    loop: one CFG denoiser call [2B], one detector call [B], and what an open gate adds: the
    cheap G_sim gradient (through the detector only) and the full one (``jax.grad`` of
    sigma(x0_hat(x_t)) through the CFG denoiser call: its forward again plus its backward)."""
    b = int(cond.shape[0])
    x = jax.random.normal(jax.random.key(1), (b,) + tuple(den.sample_shape))
    cond2 = jnp.concatenate([jnp.broadcast_to(den.null_cond, cond.shape), cond])
    t = jnp.full((2 * b,), 500, jnp.int32)
    ab = jnp.asarray(0.5, jnp.float32)

    def cfg_eps(d, xx, cc):
        e = d.eps_fn(d.params, jnp.concatenate([xx, xx]), t, cc)
        return e[:b] + scale * (e[b:] - e[:b])

    eps = jax.jit(lambda d, xx, tt, cc: d.eps_fn(d.params, xx, tt, cc))
    det = jax.jit(lambda d, xx: d(xx).sigma)
    cheap = jax.jit(jax.grad(lambda xx, d: jnp.sum(d(xx).sigma)))
    full = jax.jit(jax.grad(lambda xx, d, dd, cc: jnp.sum(dd(x0_from_eps(xx, cfg_eps(d, xx, cc), ab)).sigma)))
    x2 = jnp.concatenate([x, x])
    parts = [(f"component: one denoiser call [2B = {2 * b}]", eps, (den, x2, t, cond2)),
             (f"component: one detector call [B = {b}]", det, (detector, x)),
             (f"component: cheap G_sim gradient (detector backward) [B = {b}]", cheap, (x, detector))]
    if full_gradient:
        parts.append((f"component: full G_sim gradient (CFG call [2B] forward + backward, detector) [B = {b}]",
                      full, (x, den, detector, cond2)))
    rows = []
    for name, fn, args in parts:
        tm, _ = timed(lambda fn=fn, args=args: fn(*args), env.s.repeats)
        rows.append(env.record(dict(group=group, name=name, kind="component", ratio=tm["seconds"] / cfg_step_s,
                                    gflops=xla_gflops(fn, *args), **tm)))
    env.echo(f"[amg] {group}: one CFG loop step {cfg_step_s * 1e3:.2f} ms; "
             + ", ".join(f"{r['name'].split(': ', 1)[1]} {r['seconds'] * 1e3:.2f} ms" for r in rows))
    return rows


def _sscd_group(env: _Shared, sscd_config, label: str, open_rows: bool = True) -> tuple[list, dict]:
    """AMG with SSCD through the VAE (``latent_detector``) on the bench's SD vs CFG."""
    s, sd, den = env.s, env.sd, env.den
    b = s.batch
    keys, cond = env.keys(b), sdm.encode_prompts(sd, env.prompts(b))
    params = sscd.init_params(sscd_config, seed=s.seed)
    m, captions = 1000, 4
    emb = np.random.default_rng(s.seed).standard_normal((m, sscd_config.embed_dim)).astype(np.float32)
    bank = build_bank(emb, np.arange(m, dtype=np.int32) % captions, kind="embedding", normalize=True,
                      scale_rows=256)
    det = latent_detector(sd, "sscd", (params, sscd_config), bank)
    conds = sdm.encode_prompts(sd, env.prompts(captions))          # y_N of G_dup: one UNet pass more when open

    def amg(**over):
        return build_method("amg", GUIDANCE_SCALE, detector=det, neighbour_conds=conds, amg=dict(SD_AMG, **over))

    shut = dict(threshold="constant", lambda_min=0.999999, lambda_max=0.999999)
    if s.tiny:
        variants = [(SPE_ONLY, amg(**shut, dedup=False, dissimilar=False))]
    else:
        screen = get_screen(BENCH_SCREEN)
        variants = [(CLOSED, amg(**shut)),
                    (SCREEN_CLEAN, amg(**shut, screen=screen, screen_threshold=1e30)),
                    (SCREEN_COPY, amg(**shut, screen=screen, screen_threshold=-1.0))]
        if not s.quick:   # one more AMG program: the detection held for DETECT_EVERY steps
            variants.append((CLOSED_K, amg(**shut, detect_every=DETECT_EVERY)))
    open_rows = open_rows and sd_open_rows(s)
    if open_rows:
        variants += [(OPEN_FULL, amg(threshold="always")), (OPEN_CHEAP, amg(threshold="always", gradient="cheap"))]
    sampler = sdm.sd_sampler_config(sd, s.steps, "ddim")
    group = f"{env.sd_label()} + {label} through the VAE"
    rows = _amg_rows(env, group, den, build_method("cfg", GUIDANCE_SCALE), variants, keys, cond, sampler,
                     s.repeats)
    if not s.tiny:
        rows += _components(env, group, den, det, cond, rows[0]["seconds"] / s.steps, GUIDANCE_SCALE,
                            full_gradient=open_rows)
    info = {"model": env.sd_label(), "detector": label, "sscd_config": sscd_config.to_dict(), "bank_rows": m,
            "batch": b, "steps": s.steps, "amg": dict(SD_AMG)}
    return rows, info


def sd_open_rows(s: Settings) -> bool:
    """Whether the SD groups time the gate open every step: not in quick / tiny runs (each AMG
    variant is a 30-60 s XLA compile on a CPU) and not for an SD-1.5-sized model on a CPU
    (the backward pass through its UNet and VAE takes minutes per step there)."""
    on_cpu = jax.devices()[0].platform == "cpu"
    return not (s.tiny or s.quick or (on_cpu and (s.sd_size != "tiny" or s.sd_path is not None)))


def flop_bound(rows: list, group: str) -> float | None:
    """1 + (the detector call's FLOPs / one CFG denoiser call's), from the group's component rows:
    what a gate-closed step costs relative to a CFG step when time follows FLOPs."""
    comp = {r["name"].split(" [")[0]: r.get("gflops") for r in rows if r["group"] == group and r.get("kind")}
    den, det = comp.get("component: one denoiser call"), comp.get("component: one detector call")
    return None if not den or det is None else 1.0 + det / den


def part_amg(env: _Shared) -> dict:
    """AMG's cost against plain CFG: pixel detector on unet-text, SSCD through the VAE on SD."""
    s, sd = env.s, env.sd
    rows, groups = [], []
    r, info = _unet_text_group(env)
    rows += r
    groups.append(info)
    size = sd.image_size
    tiny_sscd = sscd.SSCDConfig(stage_sizes=(1, 1), width=8, embed_dim=64, image_size=min(size, 64))
    r, info = _sscd_group(env, tiny_sscd, "tiny SSCD (2 stages, width 8)")
    rows += r
    groups.append(info)
    if s.sscd_resnet50:
        # SSCD's own input size (short side 288) for SD-sized images; the tiny SD's 64px images as they are
        r50 = sscd.SSCDConfig(image_size=288 if size >= 256 else None)
        # on a CPU the gate-open loops through ResNet-50 + the VAE are left out (the tiny SSCD's show
        # the open gate's cost; the components time one cheap gradient through both)
        r, info = _sscd_group(env, r50, "SSCD ResNet-50", open_rows=jax.devices()[0].platform != "cpu")
        rows += r
        groups.append(info)

    def closed(group_prefix: str):
        hit = [x for x in rows if x["name"] == CLOSED and x["group"].startswith(group_prefix)]
        return hit[-1]["ratio"] if hit else None

    pixel = closed("unet-text")
    sscd_groups = [x["group"] for x in rows if "through the VAE" in x["group"]]
    sscd_ratio = closed(sscd_groups[-1]) if sscd_groups else None
    met = None if pixel is None or sscd_ratio is None else bool(pixel <= 1.15 and sscd_ratio <= 1.6)
    head = (f"gate closed: pixel {_fmt(pixel, '.2f')}x CFG, SSCD through the VAE {_fmt(sscd_ratio, '.2f')}x CFG"
            + (f" ({sscd_groups[-1]})" if sscd_groups else ""))
    k_rows = [x for x in rows if x["name"] == CLOSED_K and sscd_groups and x["group"] == sscd_groups[-1]]
    if k_rows:
        head += f"; with detect_every={DETECT_EVERY}: {k_rows[0]['ratio']:.2f}x"
    screen = {n: next((x["ratio"] for x in rows if x["name"] == n and sscd_groups and x["group"] == sscd_groups[-1]),
                      None) for n in (SCREEN_CLEAN, SCREEN_COPY)}
    if screen[SCREEN_CLEAN] is not None:
        head += (f"; behind the screen: {screen[SCREEN_CLEAN]:.2f}x on prompts that do not copy, "
                 f"{screen[SCREEN_COPY]:.2f}x on prompts that do")
    bound = flop_bound(rows, sscd_groups[-1]) if sscd_groups else None
    if bound is not None:
        head += f"; XLA FLOP count: the SSCD detector call = {bound - 1:.2f} CFG denoiser calls"
    notes = ["'gate closed all the way': the detector runs every step and the lax.cond skips G_dup's pass and the "
             "gradient; on unet-text it is the realistic run's own program with the bank moved out of reach "
             "(+100 in every pixel), on SD thresholds no sample reaches; 'open every step': threshold='always'",
             "SD rows: G_dup's neighbour conditions are 4 encoded captions (one more UNet pass when the gate is open); "
             "the SSCD bank is 1000 random unit rows",
             f"'AMG + screen' ({BENCH_SCREEN}): a threshold above every sample's score (none flagged: the bank "
             "search never runs) and below every one (all flagged from step 0: every-step detection); random "
             "weights copy nothing, so the rows time the screen's two branches, not a calibrated screen"]
    if s.tiny:
        notes.insert(0, "tiny setting: AMG runs with despecification only (no lax.cond branch, a 3x smaller program to "
                        "compile); it checks the bench's plumbing, not AMG's cost")
    elif not sd_open_rows(s):
        notes.append("the rows with the gate open every step are left out: "
                     + ("quick setting (each AMG variant is a 30-60 s XLA compilation on a CPU; the components give "
                        "the open gate's cost per step); a full run has them" if s.quick else "an SD-1.5-sized model on a CPU (minutes per backward pass); the "
                        "components give the open gate's cost per step"))
    if s.sd_size == "tiny" and s.sd_path is None:
        notes.append("on the tiny SD the UNet is far smaller than the VAE decoder + SSCD, so the SSCD ratios "
                     "overstate what they are on SD-1.5 (sd_size='1.5')")
    return {"title": "AMG's cost against plain CFG", "groups": groups, "rows": rows, "met": met,
            "closed_ratio_pixel": pixel, "closed_ratio_sscd": sscd_ratio,
            "closed_ratio_sscd_detect_every": k_rows[0]["ratio"] if k_rows else None,
            "sscd_flop_bound": bound, "screen_ratio_noncopying": screen[SCREEN_CLEAN],
            "screen_ratio_copying": screen[SCREEN_COPY],
            "screen_met": None if screen[SCREEN_CLEAN] is None else bool(screen[SCREEN_CLEAN] <= 1.10),
            "headline": head, "notes": notes}


# ----------------------------------------------------------------------------- part: search
