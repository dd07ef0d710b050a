"""`amg eval`: one method on one model and prompt set -> ``metrics.json``, a grid and AMG's traces.

Models are the testbed's closed-form memorizers for now (``empirical``, ``mixture``); the
trained networks and Stable Diffusion plug into the same path later. The keys every run
writes, per prompt kind and for "all":

- ``memorized_frac``: share of samples copied (calibrated criterion: nearest training image
  closer than the 1st percentile of distances between true renders of one caption);
  ``frac_nl2_below_1.4`` beside it (Carlini's criterion; it misfires on this small set);
- ``sim_top5pct`` / ``sim_top1``: the memorization tail in the detector's similarity,
  pixel nL2 here (lower = more memorized): its 5th percentile (the paper's "top-5%") and
  minimum (the worst case);
- ``quality_fd``: Fréchet distance of pooled pixels against fresh true renders of the same
  prompts (the FID analogue); ``alignment``: the attribute classifier agrees with the caption
  (the CLIP-score analogue); ``frac_out_of_range``: pixels outside [-1, 1];
- AMG only: ``gate_open_rate`` (share of steps with the gate open), ``fallback_rate``.

A value that is not defined for a group is written as ``null`` (``jsonio.write_json``; NaN is
not JSON): e.g. ``quality_fd`` of fewer than 2 samples, ``alignment`` of an unconditional model.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from amg_jax import images as img
from amg_jax.data import testbed as tb
from amg_jax.guidance import GUIDANCES
from amg_jax.guidance.amg import AMGConfig
from amg_jax.jsonio import write_json
from amg_jax.samplers import SamplerConfig
from amg_jax.workbench import (DEFAULT_SCALE, MODELS, bench_evaluator, build_model, build_testbed, check_run_fields,
                               method_guidance, model_amg, model_bank, model_base, model_detector, model_kind, model_scale,
                               prepare_bench, resolve_testbed,
                               sample_in_chunks)

METHODS = tuple(GUIDANCES) + ("amg",)
AMG_FIELDS = tuple(f.name for f in dataclasses.fields(AMGConfig))
DETECTORS = ("auto", "nl2", "nl2-bank", "cosine")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One evaluation. ``amg``: AMGConfig overrides as ((field, value), ...); ``base``: the
    guidance AMG wraps. Validated on construction (ValueError naming the field)."""

    out: str = "eval_out"
    model: str = "unet-text"
    testbed: str = "auto"
    method: str = "amg"
    base: str = "auto"
    scale: float | None = None
    kinds: tuple = tb.KINDS
    prompts_per_kind: int = 4
    samples_per_prompt: int = 8
    sampler: str = "ddim"
    steps: int = 50
    seed: int = 0
    detector: str = "auto"
    amg: tuple = ()

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"eval: {field} {msg}")

        for field, allowed in (("model", MODELS), ("method", METHODS), ("base", ("auto",) + tuple(GUIDANCES)),
                               ("detector", DETECTORS)):
            if getattr(self, field) not in allowed:
                fail(field, f"must be one of {list(allowed)}, got {getattr(self, field)!r}")
        if isinstance(self.kinds, str) or not self.kinds or any(k not in tb.KINDS for k in self.kinds):
            fail("kinds", f"must be a non-empty list from {list(tb.KINDS)}, got {self.kinds!r}")
        check_run_fields(self, fail)
        for item in self.amg:
            if not (isinstance(item, tuple) and len(item) == 2 and item[0] in AMG_FIELDS):
                fail("amg", f"entries must be (field, value) with a field of {list(AMG_FIELDS)}, got {item!r}")
        AMGConfig(**dict(self.amg))      # raises naming the bad AMG field


def build_guidance(config: EvalConfig, bed: tb.Testbed, bank=None):
    """The method's guidance; AMG gets a pixel detector over ``bank`` (default: ``bed``'s
    calibrated bank of its training images). An unconditional model has no CFG: only ``none``
    and ``amg`` (around the unguided sampler) apply to it."""
    base = model_base(config.model) if config.base == "auto" else config.base
    if model_kind(config.model) == "uncond":
        if config.method not in ("none", "amg"):
            raise ValueError(f"eval: method {config.method!r} needs a condition; model {config.model!r} is "
                             "unconditional (use --method none or amg)")
        if base != "none":
            raise ValueError(f"eval: base {base!r} needs a condition; model {config.model!r} is unconditional "
                             "(AMG wraps the unguided sampler: --base none or auto)")
    detector = model_detector(config.model) if config.detector == "auto" else config.detector
    # before the model is loaded (bank None: validation) the scale is only checked, so 7.5 will do
    scale = model_scale(config.model, config.scale) if bank is not None else (config.scale if config.scale is not None else DEFAULT_SCALE)
    return method_guidance(config.method, scale, bed=bed, base=base, detector=detector,
                           amg=model_amg(config.model, dict(config.amg)), bank=bank)


def summarize(per_kind: dict, trace: dict, kinds: np.ndarray) -> dict:
    """Add the agreed keys (``memorized_frac``, ``sim_top5pct``, ``sim_top1``, ``quality_fd``) and,
    for AMG, the gate / fallback rates per kind."""
    out = {}
    for kind, r in per_kind.items():
        r = dict(r, memorized_frac=r["frac_copied"], sim_top5pct=r["nl2_top5pct"], sim_top1=r["nl2_top1"],
                 quality_fd=r["fd"])
        if "gate" in trace:
            sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
            r["gate_open_rate"] = float(np.mean(np.asarray(trace["gate"])[sel]))
            r["fallback_rate"] = float(np.mean(np.asarray(trace["fallback"])[sel]))
        out[kind] = r
    return out


def draw_similarity(ax, trace: dict, *, max_samples: int = 8, fontsize: int = 8) -> None:
    """Draw sigma_t of the first ``max_samples`` samples (dots where the gate is open) and the
    threshold lambda_t over the steps on a matplotlib axis; ``trace`` {"sigma", "lambda", "gate"} [B, N]."""
    sigma = np.asarray(trace["sigma"], np.float32)[:max_samples]
    lam = np.asarray(trace["lambda"], np.float32)[0]
    gate = np.asarray(trace["gate"], bool)[:max_samples]
    steps = np.arange(sigma.shape[1])
    for i, row in enumerate(sigma):
        line, = ax.plot(steps, row, lw=1, alpha=0.8)
        ax.scatter(steps[gate[i]], row[gate[i]], s=8, color=line.get_color())
    if np.all(np.isfinite(lam)):
        ax.plot(steps, lam, "k--", lw=2, label="threshold lambda_t")
        ax.legend(loc="lower right", fontsize=fontsize - 1)
    ax.set_xlabel("sampling step (dots: gate open)", fontsize=fontsize)
    ax.set_ylabel("similarity sigma_t", fontsize=fontsize)


def plot_similarity(trace: dict, path: str, *, max_samples: int = 8, title: str = "") -> str:
    """The paper's Figure 3: sigma_t of a few samples against the gate threshold lambda_t over steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    draw_similarity(ax, trace, max_samples=max_samples, fontsize=8)
    ax.set_title(title or "similarity vs threshold", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def run_eval(config: EvalConfig, *, echo=print) -> dict:
    """Sample ``config.method`` on the bench and write ``metrics.json`` (see the module docstring;
    a metric not defined for a group, NaN in the returned report, is ``null`` in the file: NaN is
    not JSON)."""
    t0 = time.time()
    bed = build_testbed(resolve_testbed(config.testbed, [config.model]))
    guidance = build_guidance(config, bed)          # fails on bad AMG settings before the model is fit
    den = build_model(config.model, bed)
    guidance = build_guidance(config, bed, model_bank(config.model, bed))
    os.makedirs(config.out, exist_ok=True)          # after the model loads: a bad checkpoint writes nothing
    bench = prepare_bench(bed, config.prompts_per_kind, config.samples_per_prompt, config.seed, config.kinds,
                          conditioning=model_kind(config.model), evaluator=bench_evaluator(bed))
    echo(f"sampling {config.method} on {config.model}: {len(bench.caption_ids)} samples, "
         f"{config.sampler} {config.steps} steps ...")
    res = sample_in_chunks(den, guidance, SamplerConfig(config.sampler, num_steps=config.steps), bench.keys,
                           bench.cond, 16)
    x = np.asarray(res.x0)
    per_kind = summarize(bench.measure(np.nan_to_num(x, nan=0.0)), res.trace, bench.kinds)
    s = bench.samples_per_prompt
    grid = img.image_grid(x.reshape((-1, s) + x.shape[1:])[:, : min(s, 8)].reshape((-1,) + x.shape[1:]),
                          ncol=min(s, 8), upscale=max(1, 64 // bed.config.image_size))
    img.save_png(os.path.join(config.out, "samples.png"), grid)
    if "sigma" in res.trace:
        plot_similarity(res.trace, os.path.join(config.out, "similarity.png"),
                        title=f"{config.method} on {config.model}: similarity (-nL2) vs threshold")
        np.savez(os.path.join(config.out, "trace.npz"), **{k: np.asarray(v) for k, v in res.trace.items()})
    report = {"config": dataclasses.asdict(config), "copy_threshold": bench.threshold,
              "fd_features": "evalnet" if bench.evaluator is not None else "pooled pixels",
              "prompts": {k: [int(c) for c in v] for k, v in bench.prompts.items()},
              "metrics": per_kind, "seconds": round(time.time() - t0, 2)}
    write_json(os.path.join(config.out, "metrics.json"), report, indent=2)
    for kind, r in per_kind.items():
        extra = f"  gate open {r['gate_open_rate']:.0%}" if "gate_open_rate" in r else ""
        echo(f"{kind:>10}: memorized {r['memorized_frac']:.1%}  nL2<1.4 {r['frac_nl2_below_1.4']:.1%}  "
             f"nL2 top-5% {r['sim_top5pct']:.2f}  top-1 {r['sim_top1']:.2f}  FD {r['quality_fd']:.2f}  "
             f"align {r['alignment']:.0%}  out-of-range {r['frac_out_of_range']:.1%}{extra}")
    echo(f"wrote {os.path.join(config.out, 'metrics.json')} ({report['seconds']:.0f} s)")
    return report


__all__ = ["DETECTORS", "EvalConfig", "METHODS", "build_guidance", "plot_similarity", "run_eval", "summarize"]
