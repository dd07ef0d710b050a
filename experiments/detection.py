"""The detection study: training-data-free signals against the copy criterion, and the screen in
front of AMG's bank search, on the trained testbed UNets.

    python experiments/detection.py experiments/configs/detection.toml [--store]

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
those that do (warm: each is compiled on the chunk shape first). ``--store`` writes the calibrated
screen to the model's folder (``screen.json``: what ``--screen auto`` reads).

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
from amg_jax.evaluation.detection import auc, calibrate_threshold, detection_report, recall, screen_signals
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import CFG
from amg_jax.guidance.screen import Anisotropy, ScreenedGuidance, get_screen
from amg_jax.jsonio import read_json, write_json
from amg_jax.apps.screens import model_screen_path, write_screen
from amg_jax.samplers import SamplerConfig

DEFAULTS = dict(out="experiments/results/detection", steps=50, sampler="ddim", seed=0, recall=0.95, window=5,
                gamma=1.0, t_probe=40, screen="auto", n_boot=1000, models={},
                screens=["noise_magnitude_first", "noise_magnitude", "noise_magnitude_step"])
# screens decided in the first steps (a copy has to be caught early to be freed); the per-step one
# latches on whichever step first passes its threshold, often late
PROMPT_LEVEL = ("noise_magnitude_first", "noise_magnitude", "anisotropy")
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
    for name in cfg["screens"] + ([] if cfg["screen"] == "auto" else [cfg["screen"]]):
        get_screen(name)
    if cfg["screen"] not in ("auto", *cfg["screens"]):
        raise SystemExit(f"{path}: screen {cfg['screen']!r} is not one of screens {cfg['screens']}")
    return cfg


def timed(den, g, sampler, keys, cond, chunk: int):
    """run_method after a warm-up call on the chunk shape (compilation excluded from the time)."""
    run_method(den, g, sampler, keys[:chunk], cond[:chunk], batch=chunk, echo=lambda *a, **k: None)
    t0 = time.perf_counter()
    res = run_method(den, g, sampler, keys, cond, batch=chunk, echo=lambda *a, **k: None)
    return res, time.perf_counter() - t0


def study_model(name: str, mcfg: dict, cfg: dict, store: bool) -> dict:
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
    scores, peaks = screen_signals(res.trace, cfg["window"], cfg["gamma"])
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
        if store:
            name = out["screen"]["chosen"]
            s = out["screen"]["screens"][name]
            path = write_screen(model_screen_path(spec.path), name, s["threshold"], s["settings"],
                                target_recall=cfg["recall"], recall_calibration=s["recall_calibration"],
                                recall_evaluation=s["recall_of_copies"], sampler=f"{cfg['sampler']} {cfg['steps']}",
                                scale=scale, command="python experiments/detection.py " + " ".join(sys.argv[1:]))
            print(f"  stored the calibrated screen in {path}", flush=True)
    return out


def _screen_of(name: str, cfg: dict):
    fields = {"window": cfg["window"]} if name == "noise_magnitude" else (
        {"gamma": cfg["gamma"], "t_probe": cfg["t_probe"]} if name == "anisotropy" else {})
    return get_screen(name, **fields)


def screen_study(spec, bed, den, bench, scale, sampler, copies, peaks, mcfg, cfg) -> dict:
    """Calibrate each screen of ``cfg["screens"]`` on the calibration prompts; on the evaluation
    prompts its recall and flag rates, and CFG / every-step AMG / AMG behind each screen: copies
    left and time, on the prompts that copy under CFG and on those that do not."""
    ids = bench.caption_ids
    prompts = np.concatenate([bench.prompts[k] for k in bench.kinds_order])
    cal_prompts = np.concatenate([bench.prompts[k][0::2] for k in bench.kinds_order])
    cal, ev = np.isin(ids, cal_prompts), ~np.isin(ids, cal_prompts)
    generic = bench.kinds == "generic"
    per_screen = {}
    for name in cfg["screens"]:
        peak = peaks[name]
        thr = calibrate_threshold(peak[cal], copies[cal], cfg["recall"])
        per_screen[name] = {
            "settings": dataclasses.asdict(_screen_of(name, cfg)), "threshold": thr,
            "recall_calibration": recall(peak[cal], copies[cal], thr),
            "noncopy_flag_rate_calibration": float(np.mean(peak[cal & ~copies] > thr)),
            "recall_of_copies": recall(peak[ev], copies[ev], thr),
            "flag_rate_generic": float(np.mean(peak[ev & generic] > thr)) if (ev & generic).any() else None,
            "flag_rate_all": float(np.mean(peak[ev] > thr))}
        r = per_screen[name]
        print(f"  screen {name} > {thr:.4g}: recall {r['recall_calibration']:.1%} (calibration) "
              f"{r['recall_of_copies']:.1%} (evaluation), flags {r['flag_rate_generic']:.1%} of generic samples",
              flush=True)
    # auto: the prompt-level screen (decided in the first steps) that flags the fewest non-copies of
    # the calibration prompts at its calibrated threshold; the evaluation prompts are not looked at
    early = [n for n in cfg["screens"] if n in PROMPT_LEVEL]
    chosen = min(early, key=lambda n: per_screen[n]["noncopy_flag_rate_calibration"]) if cfg["screen"] == "auto" \
        else cfg["screen"]
    bank = spec.bank(bed)
    runs = {"cfg": CFG(scale=scale), "amg_every_step": spec.guidance("amg", scale, bank)}
    for name in cfg["screens"]:
        runs[f"amg_screened:{name}"] = spec.guidance("amg", scale, bank, screen=_screen_of(name, cfg),
                                                     screen_threshold=per_screen[name]["threshold"])
    copying_prompt = np.isin(ids, np.unique(ids[copies]))
    groups = {"noncopying": ev & ~copying_prompt, "copying": ev & copying_prompt}
    times, left, flagged = {}, {}, {}
    for gname, sel in groups.items():
        idx = np.flatnonzero(sel)
        if idx.size == 0:
            continue
        keys, cond = bench.keys[idx], bench.cond[idx]
        for label, guidance in runs.items():
            res, sec = timed(den, guidance, sampler, keys, cond, min(mcfg["chunk"], idx.size))
            c = tb.is_copy(for_metrics(res.x), bed, bench.threshold)
            times[(gname, label)], left[(gname, label)] = sec, int(c.sum())
            fl = float(np.asarray(res.trace["flagged"])[:, -1].mean()) if "flagged" in res.trace else None
            flagged[(gname, label)] = fl
            print(f"    {gname:>10} {label:>36}: {sec:7.1f} s, {c.mean():6.1%} copy"
                  + ("" if fl is None else f", {fl:.1%} flagged"), flush=True)
    n_ev = int(ev.sum())
    out = {"chosen": chosen, "chosen_by": cfg["screen"], "calibration_prompts": int(np.isin(prompts, cal_prompts).sum()),
           "evaluation_prompts": int((~np.isin(prompts, cal_prompts)).sum()), "evaluation_samples": n_ev,
           "groups": {g: int(sel.sum()) for g, sel in groups.items()},
           "copied_cfg": sum(v for (g, lab), v in left.items() if lab == "cfg") / n_ev,
           "copied_amg_every_step": sum(v for (g, lab), v in left.items() if lab == "amg_every_step") / n_ev,
           "seconds": {f"{g}/{lab}": v for (g, lab), v in times.items()},
           "copies_left": {f"{g}/{lab}": v for (g, lab), v in left.items()},
           "flagged": {f"{g}/{lab}": v for (g, lab), v in flagged.items() if v is not None}}
    for g in groups:
        if (g, "cfg") in times:
            out[f"cost_every_step_vs_cfg_{g}"] = times[(g, "amg_every_step")] / times[(g, "cfg")]
    for name, r in per_screen.items():
        lab = f"amg_screened:{name}"
        r["copied_screened_amg"] = sum(v for (g, l2), v in left.items() if l2 == lab) / n_ev
        for g in groups:
            if (g, "cfg") in times:
                r[f"cost_vs_cfg_{g}"] = times[(g, lab)] / times[(g, "cfg")]
    out["screens"] = per_screen
    return out


BENCH_SCREEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench", "cpu_screen", "bench.json")


def bench_screen_costs(path: str = BENCH_SCREEN) -> dict:
    """AMG behind the screen against CFG with SSCD through the VAE, as ``amg bench --parts amg`` measured
    it (``path``: its bench.json; the part's own screen ratios, from its last SSCD group, ResNet-50
    where it ran): {} without the file or without screen rows."""
    if not os.path.isfile(path):
        return {}
    part = read_json(path, "bench file")["parts"]["amg"]
    if part.get("screen_ratio_noncopying") is None:
        return {}
    g = part["groups"][-1]          # the group the part's screen ratios come from
    return {"cost_vs_cfg_noncopying_sscd_vae": part["screen_ratio_noncopying"],
            "cost_vs_cfg_copying_sscd_vae": part["screen_ratio_copying"],
            "sscd_vae_cost_from": f"{os.path.relpath(path)} ({g['model']} + {g['detector']} through the VAE)"}


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
        st = main["screen"]
        s = st["screens"][st["chosen"]]
        out["screen"] = {"name": st["chosen"], "threshold": s["threshold"], "recall_of_copies": s["recall_of_copies"],
                         "flag_rate_generic": s["flag_rate_generic"],
                         "cost_vs_cfg_noncopying": s.get("cost_vs_cfg_noncopying"),
                         "cost_vs_cfg_copying": s.get("cost_vs_cfg_copying"),
                         "copied_every_step_amg": st["copied_amg_every_step"], "copied_screened_amg": s["copied_screened_amg"],
                         "copied_cfg": st["copied_cfg"], "recall_calibration": s["recall_calibration"],
                         "cost_every_step_vs_cfg_noncopying": st.get("cost_every_step_vs_cfg_noncopying"),
                         "cost_every_step_vs_cfg_copying": st.get("cost_every_step_vs_cfg_copying"),
                         "detector": "the model's pixel bank detector (nl2-bank); the SSCD-through-VAE cost is amg bench's",
                         **bench_screen_costs()}
        out["screens"] = {n: {k: v for k, v in r.items() if k != "settings"} for n, r in st["screens"].items()}
    out["models"] = {n: {k: {f: v[f] for f in ("auc_sample", "auc_prompt", "tpr_at_1pct_fpr")}
                         for k, v in r["detectors"].items()} for n, r in results.items()}
    out["settings"] = {k: cfg[k] for k in ("steps", "sampler", "seed", "recall", "window", "gamma", "t_probe", "screen",
                                           "screens")}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--store", action="store_true",
                   help="store the calibrated screen in the model's folder (screen.json: what --screen auto reads)")
    p.add_argument("--out", default=None, help="override the config's out folder")
    a = p.parse_args(argv)
    cfg = load(a.config)
    out_dir = a.out or cfg["out"]
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name, mcfg in cfg["models"].items():
        results[name] = study_model(name, mcfg, cfg, a.store)
        write_json(os.path.join(out_dir, f"{name}.json"), results[name], indent=1)
    write_json(os.path.join(out_dir, "summary.json"), summary(results, cfg), indent=1)
    print(f"wrote {out_dir}/summary.json")


if __name__ == "__main__":
    main()
