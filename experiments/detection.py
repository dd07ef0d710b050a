"""The detection study: training-data-free signals against the copy criterion, and the screen in
front of AMG's bank search, on the trained testbed UNets.

    python experiments/detection.py experiments/configs/detection.toml [--card]

Per model of the config: one CFG run over ``prompts_per_kind`` prompts x ``samples`` seeds records
``d = ||eps_c - eps_u||`` at every step (CFG's trace) and the anisotropy probe on x_T (a
``ScreenedGuidance`` whose both branches are plain CFG: the same samples, the screen's score in the
trace). The ground truth is the calibrated copy criterion (``testbed.is_copy``). Every detector is
scored per sample and per prompt (AUC, TPR at 1% FPR, bootstrap CIs over prompts); per step, the
AUC of ``d`` at each step.

With ``screen_study = true`` (the text model): the prompts are split (every other prompt of each
kind) into calibration and evaluation prompts. The config's ``screen`` is calibrated on the
calibration prompts for ``recall`` of their CFG copies; on the evaluation prompts the script
reports its recall of copies, the share of generic-prompt samples it flags, the copies left by
every-step vs screened AMG, and each one's time against CFG on the prompts that do not copy and on
those that do (warm: each is compiled on the chunk shape first). ``--card`` records the calibrated
screen in the model's card (what ``--screen auto`` reads).

Writes ``OUT/<model>.json`` (everything, with the per-sample scores) and ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import tomllib

import numpy as np

from amg_jax.apps.models import build_testbed, get_model, resolve_testbed
from amg_jax.apps.runs import for_metrics, run_method
from amg_jax.data import testbed as tb
from amg_jax.evaluation.detection import auc, calibrate_threshold, detection_report, recall
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import CFG
from amg_jax.guidance.screen import Anisotropy, ScreenedGuidance, get_screen
from amg_jax.jsonio import write_json
from amg_jax.models.zoo import update_card
from amg_jax.samplers import SamplerConfig

DEFAULTS = dict(out="experiments/results/detection", steps=50, sampler="ddim", seed=0, recall=0.95, window=5,
                gamma=1.0, t_probe=40, screen="noise_magnitude", n_boot=1000, models={})
CANDIDATES = ("noise_magnitude_first", "noise_magnitude", "noise_magnitude_step", "anisotropy")
MODEL_DEFAULTS = dict(prompts_per_kind=8, samples=16, chunk=16, screen_study=False)


def load(path: str) -> dict:
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    unknown = sorted(set(cfg) - set(DEFAULTS))
    if unknown:
        raise SystemExit(f"{path}: unknown setting {unknown[0]!r}; settings are {sorted(DEFAULTS)}")
    cfg = {**DEFAULTS, **cfg}
    for name, m in cfg["models"].items():
        bad = sorted(set(m) - set(MODEL_DEFAULTS))
        if bad:
            raise SystemExit(f"{path}: [models.{name}] has no setting {bad[0]!r}; settings are {sorted(MODEL_DEFAULTS)}")
        cfg["models"][name] = {**MODEL_DEFAULTS, **m}
        get_model(name)                          # an unknown model fails here, before any sampling
    if cfg["screen"] != "auto":
        get_screen(cfg["screen"])
    return cfg


def cummax_of_running_mean(d: np.ndarray, k: int) -> np.ndarray:
    """The latched windowed screen's peak: max over j < k of mean(d[:, :j+1]); d [B, N] -> [B]."""
    k = min(k, d.shape[1])
    means = np.cumsum(d[:, :k], axis=1) / np.arange(1, k + 1)
    return means.max(axis=1)


def signals(trace: dict, cfg: dict) -> tuple[dict, dict]:
    """({detector: score [B]}, {detector: the latched screen's peak score [B]}) from a CFG trace."""
    d = np.asarray(trace["d"], np.float64)
    align = np.asarray(trace["screen"], np.float64)[:, 0] - d[:, 0]      # the probe's score is m_0 + cos
    k = cfg["window"]
    scores = {"noise_magnitude_first": d[:, 0],
              "noise_magnitude": d[:, :k].mean(axis=1),
              "noise_magnitude_step": d.max(axis=1),
              "alignment": align,
              "anisotropy": d[:, 0] + cfg["gamma"] * align}
    peaks = dict(scores, noise_magnitude=cummax_of_running_mean(d, k))
    return scores, peaks


def timed(den, g, sampler, keys, cond, chunk: int):
    """run_method after a warm-up call on the chunk shape (compilation excluded from the time)."""
    run_method(den, g, sampler, keys[:chunk], cond[:chunk], batch=chunk, echo=lambda *a, **k: None)
    t0 = time.perf_counter()
    res = run_method(den, g, sampler, keys, cond, batch=chunk, echo=lambda *a, **k: None)
    return res, time.perf_counter() - t0


def study_model(name: str, mcfg: dict, cfg: dict, card: bool) -> dict:
    spec = get_model(name)
    bed = build_testbed(resolve_testbed("auto", [spec]))
    den = spec.denoiser(bed)
    scale = spec.scale(None)
    bench = prepare_bench(bed, mcfg["prompts_per_kind"], mcfg["samples"], cfg["seed"], conditioning=spec.conditioning)
    sampler = SamplerConfig(cfg["sampler"], num_steps=cfg["steps"])
    probe = Anisotropy(gamma=1.0, t_probe=cfg["t_probe"])
    g = ScreenedGuidance(CFG(scale=scale), CFG(scale=scale), probe, float("inf"))     # plain CFG + the probe
    t0 = time.time()
    res = run_method(den, g, sampler, bench.keys, bench.cond, batch=mcfg["chunk"], kinds=bench.kinds)
    copies = tb.is_copy(for_metrics(res.x), bed, bench.threshold)
    ids = bench.caption_ids
    scores, peaks = signals(res.trace, cfg)
    print(f"{name}: {len(ids)} CFG samples in {time.time() - t0:.0f} s, {copies.mean():.1%} copy "
          f"({len(np.unique(ids))} prompts)", flush=True)
    out = {"model": name, "scale": scale, "copy_threshold": bench.threshold, "samples": int(len(ids)),
           "copy_rate_cfg": float(copies.mean()),
           "copy_rate_by_kind": {k: float(copies[bench.kinds == k].mean()) for k in bench.kinds_order},
           "detectors": {}}
    for det, s in scores.items():
        out["detectors"][det] = detection_report(s, copies, ids, n_boot=cfg["n_boot"], rng=cfg["seed"])
        r = out["detectors"][det]
        print(f"  {det:>22}: AUC sample {r['auc_sample']:.3f} [{r['auc_sample_ci'][0]:.3f}, "
              f"{r['auc_sample_ci'][1]:.3f}]  prompt {r['auc_prompt']:.3f}  TPR@1%FPR {r['tpr_at_1pct_fpr']:.3f}",
              flush=True)
    d = np.asarray(res.trace["d"])
    out["detectors"]["noise_magnitude_step"]["auc_by_step"] = [auc(d[:, t], copies) for t in range(d.shape[1])]
    # memorized vs ordinary prompts (Wen et al.'s task): full captions against generic ones, per sample
    if "generic" in bench.kinds_order:
        full = bench.kinds != "generic"
        out["prompt_kind_auc"] = {det: auc(s, full) for det, s in scores.items()}
        gen = ~full
        out["copies_within_full_captions_auc"] = {det: auc(s[full], copies[full]) for det, s in scores.items()}
        out["generic_copy_rate"] = float(copies[gen].mean())
    out["per_sample"] = {"prompt": ids.tolist(), "kind": bench.kinds.tolist(), "copied": copies.tolist(),
                         **{k: np.round(v, 6).tolist() for k, v in scores.items()}}
    if mcfg["screen_study"]:
        out["screen"] = screen_study(spec, bed, den, bench, scale, sampler, copies, peaks, mcfg, cfg)
        if card:
            s = out["screen"]
            update_card(spec.path, screen={
                "name": s["name"], "settings": s["settings"], "threshold": s["threshold"],
                "target_recall": cfg["recall"], "recall_calibration": s["recall_calibration"],
                "recall_evaluation": s["recall_of_copies"], "sampler": f"{cfg['sampler']} {cfg['steps']}",
                "scale": scale, "command": "python experiments/detection.py " + " ".join(sys.argv[1:])})
            print(f"  recorded the screen in the card of {name}", flush=True)
    return out


def screen_study(spec, bed, den, bench, scale, sampler, copies, peaks, mcfg, cfg) -> dict:
    ids = bench.caption_ids
    prompts = np.concatenate([bench.prompts[k] for k in bench.kinds_order])
    cal_prompts = np.concatenate([bench.prompts[k][0::2] for k in bench.kinds_order])
    cal = np.isin(ids, cal_prompts)
    ev = ~cal
    # "auto": the candidate that flags the fewest non-copies of the calibration prompts at its
    # calibrated threshold (the evaluation prompts are not looked at)
    fpr_cal = {}
    for cand in CANDIDATES:
        t = calibrate_threshold(peaks[cand][cal], copies[cal], cfg["recall"])
        fpr_cal[cand] = float(np.mean(peaks[cand][cal & ~copies] > t))
    name = min(CANDIDATES, key=lambda c: fpr_cal[c]) if cfg["screen"] == "auto" else cfg["screen"]
    fields = {"window": cfg["window"]} if name == "noise_magnitude" else (
        {"gamma": cfg["gamma"], "t_probe": cfg["t_probe"]} if name == "anisotropy" else {})
    screen = get_screen(name, **fields)
    peak = peaks[name]
    thr = calibrate_threshold(peak[cal], copies[cal], cfg["recall"])
    generic = bench.kinds == "generic"
    r = {"name": name, "settings": dataclasses.asdict(screen), "threshold": thr, "chosen_by": cfg["screen"],
         "noncopy_flag_rate_calibration": fpr_cal,
         "calibration_prompts": int(np.isin(prompts, cal_prompts).sum()), "evaluation_prompts": int((~np.isin(prompts, cal_prompts)).sum()),
         "recall_calibration": recall(peak[cal], copies[cal], thr),
         "recall_of_copies": recall(peak[ev], copies[ev], thr),
         "flag_rate_generic": float(np.mean(peak[ev & generic] > thr)) if (ev & generic).any() else None,
         "flag_rate_all": float(np.mean(peak[ev] > thr))}
    print(f"  screen {name} > {thr:.4g}: recall {r['recall_calibration']:.1%} (calibration) "
          f"{r['recall_of_copies']:.1%} (evaluation), flags {r['flag_rate_generic']:.1%} of generic samples",
          flush=True)
    bank = spec.bank(bed)
    every = spec.guidance("amg", scale, bank)
    screened = spec.guidance("amg", scale, bank, amg={"screen": screen, "screen_threshold": thr})
    copying_prompt = np.isin(ids, np.unique(ids[copies]))
    groups = {"noncopying": ev & ~copying_prompt, "copying": ev & copying_prompt}
    chunk = mcfg["chunk"]
    times, left = {}, {}
    for gname, sel in groups.items():
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            continue
        keys, cond = bench.keys[idx], bench.cond[idx]
        for label, guidance in (("cfg", CFG(scale=scale)), ("amg_every_step", every), ("amg_screened", screened)):
            res, sec = timed(den, guidance, sampler, keys, cond, min(chunk, idx.size))
            times[(gname, label)] = sec
            c = tb.is_copy(for_metrics(res.x), bed, bench.threshold)
            left[(gname, label)] = (int(c.sum()), int(idx.size))
            fl = np.asarray(res.trace["flagged"])[:, -1].mean() if "flagged" in res.trace else None
            print(f"    {gname:>10} {label:>15}: {sec:7.1f} s, {c.mean():6.1%} copy"
                  + ("" if fl is None else f", {fl:.1%} flagged"), flush=True)
    for gname in groups:
        if (gname, "cfg") in times:
            r[f"cost_vs_cfg_{gname}"] = times[(gname, "amg_screened")] / times[(gname, "cfg")]
            r[f"cost_every_step_vs_cfg_{gname}"] = times[(gname, "amg_every_step")] / times[(gname, "cfg")]
    n_ev = int(ev.sum())
    for label in ("cfg", "amg_every_step", "amg_screened"):
        r[f"copied_{label}"] = sum(left[(g, label)][0] for g in groups if (g, label) in left) / n_ev
    r["seconds"] = {f"{g}/{lab}": s for (g, lab), s in times.items()}
    return r


def summary(results: dict, cfg: dict) -> dict:
    """The headline figures: the screen model's detectors and screen, the other models beside."""
    main = next((r for r in results.values() if "screen" in r), next(iter(results.values())))
    keep = ("auc_sample", "auc_sample_ci", "auc_prompt", "auc_prompt_ci", "tpr_at_1pct_fpr", "tpr_at_1pct_fpr_ci",
            "tpr_at_1pct_fpr_prompt", "n_samples", "n_positive", "n_prompts", "n_positive_prompts")
    out = {"model": main["model"], "detectors": {k: {f: v[f] for f in keep} for k, v in main["detectors"].items()}}
    if "prompt_kind_auc" in main:
        for k, v in main["prompt_kind_auc"].items():
            out["detectors"][k]["auc_full_vs_generic_caption"] = v
            out["detectors"][k]["auc_copy_within_full_captions"] = main["copies_within_full_captions_auc"][k]
    if "screen" in main:
        s = main["screen"]
        out["screen"] = {"name": s["name"], "threshold": s["threshold"], "recall_of_copies": s["recall_of_copies"],
                         "flag_rate_generic": s["flag_rate_generic"],
                         "cost_vs_cfg_noncopying": s.get("cost_vs_cfg_noncopying"),
                         "cost_vs_cfg_copying": s.get("cost_vs_cfg_copying"),
                         "copied_every_step_amg": s["copied_amg_every_step"], "copied_screened_amg": s["copied_amg_screened"],
                         "copied_cfg": s["copied_cfg"], "recall_calibration": s["recall_calibration"],
                         "detector": "the model's pixel bank detector (testbed; SSCD-through-VAE cost: amg bench)"}
    out["models"] = {n: {k: {f: v[f] for f in ("auc_sample", "auc_prompt", "tpr_at_1pct_fpr")}
                         for k, v in r["detectors"].items()} for n, r in results.items()}
    out["settings"] = {k: cfg[k] for k in ("steps", "sampler", "seed", "recall", "window", "gamma", "t_probe", "screen")}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--card", action="store_true", help="record the calibrated screen in the model's card")
    p.add_argument("--out", default=None, help="override the config's out folder")
    a = p.parse_args(argv)
    cfg = load(a.config)
    out_dir = a.out or cfg["out"]
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name, mcfg in cfg["models"].items():
        results[name] = study_model(name, mcfg, cfg, a.card)
        write_json(os.path.join(out_dir, f"{name}.json"), results[name], indent=1)
    write_json(os.path.join(out_dir, "summary.json"), summary(results, cfg), indent=1)
    print(f"wrote {out_dir}/summary.json")


if __name__ == "__main__":
    main()
