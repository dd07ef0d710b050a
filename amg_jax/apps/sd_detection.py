"""The detection table on Stable Diffusion: memorized prompts against a contrast set of ordinary ones.

    python experiments/sd_detection.py experiments/configs/sd_v14_detection.toml [--store]

One CFG run over every prompt of both files x ``samples_per_prompt`` seeds (seed ``seed + j`` for
a prompt's j-th sample, as ``amg sample``), behind the anisotropy probe (a ``ScreenedGuidance``
whose both branches are plain CFG: the same images, the probe's score in the trace). Every
training-data-free detector (``evaluation.detection.screen_signals``) is scored at telling the
memorized prompts' samples from the ordinary ones (Wen et al.'s task): AUC and TPR at 1% FPR per
sample and per prompt (mean over seeds), with bootstrap intervals over prompts. With ``sscd`` and
``bank`` the decoded images are also measured (SSCD to the nearest bank image), and each detector
is scored against the copy criterion SSCD > 0.5, per sample.

The screen (``screen``, default ``noise_magnitude``) is calibrated for ``recall`` of the positives
(the copies where measured, else the memorized prompts' samples); ``--store`` writes it beside the
bank (``BANK.screen.json``, what ``--screen auto`` reads). Writes ``OUT/detection.json`` (with the
per-sample scores), ``OUT/detection.md`` and ``OUT/per_sample.csv``.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
import tomllib

import numpy as np

from amg_jax import images as img
from amg_jax.apps.models import StableDiffusionSpec, is_sd, sd_source
from amg_jax.apps.runs import run_method
from amg_jax.apps.screens import bank_screen_path, write_screen
from amg_jax.apps.sweep.config import SSCD_THRESHOLD, read_prompts
from amg_jax.evaluation.detection import calibrate_threshold, detection_report, recall, screen_signals
from amg_jax.guidance import CFG
from amg_jax.guidance.screen import Anisotropy, ScreenedGuidance, get_screen
from amg_jax.index_build import sscd_nearest
from amg_jax.jsonio import write_atomic, write_json
from amg_jax.models import stable_diffusion as sdm
from amg_jax.samplers import keys_from_seeds

PROMPT_LEVEL = ("noise_magnitude_first", "noise_magnitude", "anisotropy")


@dataclasses.dataclass(frozen=True)
class SDDetectionConfig:
    """The ``[detection]`` table (paths relative to the config file's folder)."""

    model: str
    memorized: str
    ordinary: str
    out: str
    samples_per_prompt: int = 4
    seed: int = 0
    sampler: str = "ddim"
    steps: int = 50
    scale: float = 7.5
    dtype: str = "float32"
    batch: int = 8
    height: int | None = None
    width: int | None = None
    window: int = 5
    gamma: float = 1.0
    t_probe: int = 40
    recall: float = 0.95
    screen: str = "noise_magnitude"
    n_boot: int = 1000
    sscd: str | None = None
    bank: str | None = None

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"[detection] {field}: {msg}")

        if not is_sd(self.model):
            fail("model", f"must be sd:PATH_OR_HUB_ID, got {self.model!r}")
        for field in ("memorized", "ordinary"):
            if not os.path.isfile(getattr(self, field)):
                fail(field, f"{getattr(self, field)!r} does not exist")
        for field in ("samples_per_prompt", "steps", "batch", "n_boot"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(field, f"must be an integer >= 1, got {v!r}")
        if not 0.0 < self.recall <= 1.0:
            fail("recall", f"must lie in (0, 1], got {self.recall!r}")
        if self.dtype not in sdm.DTYPES:
            fail("dtype", f"must be one of {list(sdm.DTYPES)}, got {self.dtype!r}")
        if self.screen not in PROMPT_LEVEL + ("noise_magnitude_step",):
            fail("screen", f"must be one of {list(PROMPT_LEVEL) + ['noise_magnitude_step']}, got {self.screen!r}")
        get_screen("noise_magnitude", window=self.window)          # ValueError naming a bad window
        Anisotropy(gamma=self.gamma, t_probe=self.t_probe)
        if (self.sscd is None) != (self.bank is None):
            fail("sscd" if self.sscd is None else "bank", "sscd and bank go together (the copy criterion needs both)")
        for field in ("sscd", "bank"):
            v = getattr(self, field)
            if v is not None and not os.path.isfile(v):
                fail(field, f"{v!r} does not exist")


def load_config(path: str) -> SDDetectionConfig:
    """The config at ``path``; ValueError naming the key for anything wrong (before any model loads)."""
    with open(path, "rb") as f:
        try:
            data = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path} is not valid TOML: {e}") from None
    table = data.get("detection")
    if not isinstance(table, dict) or set(data) != {"detection"}:
        raise ValueError(f"{path}: expected one [detection] table, got {sorted(data)}")
    fields = {f.name for f in dataclasses.fields(SDDetectionConfig)}
    unknown = sorted(set(table) - fields)
    if unknown:
        raise ValueError(f"{path}: [detection] has no setting {unknown[0]!r}; settings are {sorted(fields)}")
    base = os.path.dirname(os.path.abspath(path))
    table = dict(table)
    for key in ("memorized", "ordinary", "out", "sscd", "bank"):
        if isinstance(table.get(key), str):
            table[key] = os.path.normpath(os.path.join(base, table[key]))
    if isinstance(table.get("model"), str) and is_sd(table["model"]):
        src = sd_source(table["model"])
        if src.startswith((".", "/")) or os.path.exists(os.path.join(base, src)):
            table["model"] = "sd:" + os.path.normpath(os.path.join(base, src))
    try:
        return SDDetectionConfig(**table)
    except TypeError as e:
        raise ValueError(f"{path}: [detection] {e}") from None


def _measurer(c: SDDetectionConfig):
    """``per_batch(u8, idx) -> {"sim": SSCD cosine to the nearest bank image}`` (``run_method``)."""
    measure = sscd_nearest(c.bank, c.sscd, "[detection]")
    return lambda u8, idx: {"sim": measure(u8)[0]}


def run_sd_detection(c: SDDetectionConfig, *, store: bool = False, echo=print) -> dict:
    """Run the study of ``c`` (module docstring); returns the report written to ``c.out``."""
    if store and c.bank is None:
        raise ValueError("[detection] --store writes the screen beside the bank: set sscd and bank")
    mem = [p for p, _ in read_prompts(c.memorized)]
    ordi = [p for p, _ in read_prompts(c.ordinary)]
    if not mem or not ordi:
        raise ValueError(f"[detection] {'memorized' if not mem else 'ordinary'}: the prompts file has no prompts")
    per_batch = _measurer(c) if c.sscd else None                  # a damaged bank / SSCD fails before the model
    prompts = mem + ordi
    memorized = np.repeat(np.r_[np.ones(len(mem), bool), np.zeros(len(ordi), bool)], c.samples_per_prompt)
    ids = np.repeat(np.arange(len(prompts)), c.samples_per_prompt)
    spec = StableDiffusionSpec(sd_source(c.model))
    sd = spec.load(c.dtype)
    den = sdm.sd_denoiser(sd, c.height, c.width)
    sampler = sdm.sd_sampler_config(sd, c.steps, c.sampler)
    cond = sdm.encode_prompts(sd, prompts)
    keys = keys_from_seeds([c.seed + j for _ in prompts for j in range(c.samples_per_prompt)])
    g = ScreenedGuidance(CFG(scale=c.scale), CFG(scale=c.scale), Anisotropy(gamma=1.0, t_probe=c.t_probe),
                         float("inf"))
    echo(f"sd detection: {len(mem)} memorized + {len(ordi)} ordinary prompts x {c.samples_per_prompt} seeds, "
         f"{c.sampler} {c.steps} steps, scale {c.scale}")
    kw = {}
    if per_batch is not None:
        kw = dict(decode=lambda z: np.asarray(den.decode(z)),
                  store=lambda pix: img.to_uint8(np.nan_to_num(pix, nan=0.0)), per_batch=per_batch)
    run = run_method(den, g, sampler, keys, lambda idx: cond[ids[idx]], batch=c.batch, sharded=True,
                     label="sd detection", echo=echo, **kw)
    scores, peaks = screen_signals(run.trace, c.window, c.gamma)
    report = {"config": {k: v for k, v in dataclasses.asdict(c).items()}, "prompts": {"memorized": len(mem),
              "ordinary": len(ordi)}, "samples": int(ids.size), "seconds": round(run.seconds, 2),
              "memorized_vs_ordinary": {}, "vs_copies": None}
    for name, s in scores.items():
        report["memorized_vs_ordinary"][name] = detection_report(s, memorized, ids, n_boot=c.n_boot, rng=c.seed)
    copies = None
    if per_batch is not None:
        sim = np.asarray(run.extra["sim"], np.float64)
        copies = sim > SSCD_THRESHOLD
        report["copy_rate"] = {"memorized": float(copies[memorized].mean()), "ordinary": float(copies[~memorized].mean())}
        if copies.any() and not copies.all():
            report["vs_copies"] = {n: detection_report(s, copies, ids, n_boot=c.n_boot, rng=c.seed)
                                   for n, s in scores.items()}
    positives, what = (copies, f"samples with SSCD > {SSCD_THRESHOLD:g}") if copies is not None and copies.any() \
        else (memorized, "memorized prompts' samples")
    peak = peaks[c.screen]
    thr = calibrate_threshold(peak, positives, c.recall)
    report["screen"] = {"name": c.screen, "threshold": thr, "calibrated_on": what, "target_recall": c.recall,
                        "recall": recall(peak, positives, thr),
                        "flag_rate_ordinary": float(np.mean(peak[~memorized] > thr)),
                        "flag_rate_memorized": float(np.mean(peak[memorized] > thr))}
    if store:
        settings = {"window": c.window} if c.screen == "noise_magnitude" else (
            {"gamma": c.gamma, "t_probe": c.t_probe} if c.screen == "anisotropy" else {})
        report["screen"]["stored"] = write_screen(
            bank_screen_path(c.bank), c.screen, thr, settings, target_recall=c.recall,
            recall_calibration=report["screen"]["recall"], calibrated_on=what, sampler=f"{c.sampler} {c.steps}",
            scale=c.scale, model=c.model)
    os.makedirs(c.out, exist_ok=True)
    report["per_sample"] = {"prompt_id": ids.tolist(), "memorized": memorized.tolist(),
                            **({"sscd": np.round(run.extra["sim"], 6).tolist()} if copies is not None else {}),
                            **{k: np.round(v, 6).tolist() for k, v in scores.items()}}
    write_json(os.path.join(c.out, "detection.json"), report, indent=1)
    write_atomic(os.path.join(c.out, "detection.md"), lambda f: f.write(detection_markdown(report)))
    write_atomic(os.path.join(c.out, "per_sample.csv"), lambda f: f.write(_per_sample_csv(report, prompts)))
    return report


def _per_sample_csv(report: dict, prompts: list) -> str:
    ps = report["per_sample"]
    cols = [k for k in ps if k != "prompt_id"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["prompt_id", *cols, "prompt"])
    for i, pid in enumerate(ps["prompt_id"]):
        w.writerow([pid, *[ps[k][i] for k in cols], prompts[pid]])
    return buf.getvalue()


def _ci(r: dict, key: str) -> str:
    v, (lo, hi) = r[key], r[f"{key}_ci"]
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def detection_markdown(report: dict) -> str:
    """The tables: each detector at telling memorized from ordinary prompts (and copies)."""
    c = report["config"]
    out = [f"# detection on {c['model']}: {report['prompts']['memorized']} memorized vs "
           f"{report['prompts']['ordinary']} ordinary prompts x {c['samples_per_prompt']} seeds\n",
           "## memorized vs ordinary prompts (95% bootstrap intervals over prompts)\n",
           "| detector | AUC per sample | AUC per prompt | TPR at 1% FPR |", "|---|---|---|---|"]
    for name, r in report["memorized_vs_ordinary"].items():
        out.append(f"| {name} | {_ci(r, 'auc_sample')} | {_ci(r, 'auc_prompt')} | {_ci(r, 'tpr_at_1pct_fpr')} |")
    if report.get("vs_copies"):
        out += ["", f"## samples that copy (SSCD > {SSCD_THRESHOLD:g}) vs the rest\n",
                "| detector | AUC per sample | TPR at 1% FPR |", "|---|---|---|"]
        for name, r in report["vs_copies"].items():
            out.append(f"| {name} | {_ci(r, 'auc_sample')} | {_ci(r, 'tpr_at_1pct_fpr')} |")
    s = report["screen"]
    out += ["", f"Screen {s['name']} > {s['threshold']:.4g} (calibrated for {s['target_recall']:.0%} recall of "
                f"{s['calibrated_on']}): recall {s['recall']:.1%}, flags {s['flag_rate_memorized']:.1%} of the memorized "
                f"prompts' samples and {s['flag_rate_ordinary']:.1%} of the ordinary ones."]
    if "copy_rate" in report:
        out.append(f"CFG copy rate (SSCD > {SSCD_THRESHOLD:g}): memorized {report['copy_rate']['memorized']:.1%}, "
                   f"ordinary {report['copy_rate']['ordinary']:.1%}.")
    return "\n".join(out) + "\n"


__all__ = ["SDDetectionConfig", "detection_markdown", "load_config", "run_sd_detection"]
