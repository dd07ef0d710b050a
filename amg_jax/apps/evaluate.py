"""`amg eval`: one method on one testbed model and prompt set -> ``metrics.json``, a grid and AMG's traces.

Models are the testbed's (``apps.models.MODELS``: the trained UNets and the closed-form
memorizers; Stable Diffusion runs through `amg sample` and the sweeps). The keys every run
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
- ``gate_open_rate`` (share of steps with AMG's gate open; ``null`` for other methods),
  ``fallback_rate`` (AMG), ``transition_mean`` (DTP), ``count``; with a screen (``--screen auto``:
  the calibrated one stored with the model, for AMG; or a screen by name) ``screen_flag_rate``,
  the share of samples it flagged for the bank search.

A value that is not defined for a group is written as ``null`` (``jsonio.write_json``; NaN is
not JSON): e.g. ``quality_fd`` of fewer than 2 samples, ``alignment`` of an unconditional model.
"""
from __future__ import annotations

import dataclasses
import os
import time

import numpy as np

from amg_jax import images as img
from amg_jax.apps.models import DETECTORS as PIXEL_DETECTORS
from amg_jax.apps.models import MODELS, bench_evaluator, build_testbed, calibrated_bank, get_model, resolve_testbed
from amg_jax.apps.report import plot_similarity
from amg_jax.apps.runs import check_run_fields, for_metrics, run_method
from amg_jax.apps.screens import check_screen_choice, model_screen, resolve_screen
from amg_jax.data import testbed as tb
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import GUIDANCES, METHODS
from amg_jax.guidance.amg import AMGConfig
from amg_jax.jsonio import write_json
from amg_jax.samplers import SamplerConfig

AMG_FIELDS = tuple(f.name for f in dataclasses.fields(AMGConfig))
DETECTORS = ("auto",) + tuple(PIXEL_DETECTORS)


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
    screen: str = "none"
    screen_threshold: float | None = None

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
        check_screen_choice(self.screen, self.screen_threshold, fail)


def build_guidance(config: EvalConfig, bed: tb.Testbed, bank=None):
    """The method's guidance; AMG gets the model's pixel detector (or ``config.detector``) over
    ``bank`` (default: ``bed``'s calibrated bank of its training images). An unconditional model
    has no CFG: only ``none`` and ``amg`` (around the unguided sampler) apply to it."""
    spec = get_model(config.model)
    base = spec.base if config.base == "auto" else config.base
    spec.check_method(config.method, base, "eval")
    detector = None if config.detector == "auto" else config.detector
    # before the model is loaded (bank None: validation) the bank is the testbed's
    bank = calibrated_bank(bed) if bank is None and config.method == "amg" else bank
    screen, thr = resolve_screen(config.screen, model_screen(spec), config.screen_threshold,
                                 config.method, "eval")
    return spec.guidance(config.method, spec.scale(config.scale), bank, base=base, detector=detector,
                         amg=dict(config.amg), screen=screen, screen_threshold=thr)


def summarize(per_kind: dict) -> dict:
    """Add the agreed keys (``memorized_frac``, ``sim_top5pct``, ``sim_top1``, ``quality_fd``); the
    trace summaries (gate / fallback rates per kind) come from ``runs.trace_summary``."""
    return {kind: dict(r, memorized_frac=r["frac_copied"], sim_top5pct=r["nl2_top5pct"], sim_top1=r["nl2_top1"],
                       quality_fd=r["fd"]) for kind, r in per_kind.items()}


def run_eval(config: EvalConfig, *, echo=print) -> dict:
    """Sample ``config.method`` on the bench and write ``metrics.json`` (see the module docstring;
    a metric not defined for a group, NaN in the returned report, is ``null`` in the file: NaN is
    not JSON)."""
    t0 = time.time()
    spec = get_model(config.model)
    bed = build_testbed(resolve_testbed(config.testbed, [spec]))
    guidance = build_guidance(config, bed)          # fails on bad AMG settings before the model is fit
    den = spec.denoiser(bed)
    guidance = build_guidance(config, bed, spec.bank(bed))
    os.makedirs(config.out, exist_ok=True)          # after the model loads: a bad checkpoint writes nothing
    bench = prepare_bench(bed, config.prompts_per_kind, config.samples_per_prompt, config.seed, config.kinds,
                          conditioning=spec.conditioning, evaluator=bench_evaluator(bed))
    echo(f"sampling {config.method} on {config.model}: {len(bench.caption_ids)} samples, "
         f"{config.sampler} {config.steps} steps ...")
    run = run_method(den, guidance, SamplerConfig(config.sampler, num_steps=config.steps), bench.keys, bench.cond,
                     batch=16, kinds=bench.kinds, measure=lambda r: summarize(bench.measure(for_metrics(r.x))),
                     label=f"{config.model}/{config.method}", echo=echo)
    x, per_kind, trace = run.x, run.metrics, run.trace
    s = bench.samples_per_prompt
    grid = img.image_grid(x.reshape((-1, s) + x.shape[1:])[:, : min(s, 8)].reshape((-1,) + x.shape[1:]),
                          ncol=min(s, 8), upscale=max(1, 64 // bed.config.image_size))
    img.save_png(os.path.join(config.out, "samples.png"), grid)
    if "sigma" in trace:
        plot_similarity(trace, os.path.join(config.out, "similarity.png"),
                        title=f"{config.method} on {config.model}: similarity (-nL2) vs threshold")
        np.savez(os.path.join(config.out, "trace.npz"), **trace)
    report = {"config": dataclasses.asdict(config), "copy_threshold": bench.threshold,
              "fd_features": "evalnet" if bench.evaluator is not None else "pooled pixels",
              "prompts": {k: [int(c) for c in v] for k, v in bench.prompts.items()},
              "metrics": per_kind, "seconds": round(time.time() - t0, 2)}
    write_json(os.path.join(config.out, "metrics.json"), report, indent=2)
    for kind, r in per_kind.items():
        extra = f"  gate open {r['gate_open_rate']:.0%}" if r.get("gate_open_rate") is not None else ""
        if r.get("screen_flag_rate") is not None:
            extra += f"  screen flagged {r['screen_flag_rate']:.0%}"
        echo(f"{kind:>10}: memorized {r['memorized_frac']:.1%}  nL2<1.4 {r['frac_nl2_below_1.4']:.1%}  "
             f"nL2 top-5% {r['sim_top5pct']:.2f}  top-1 {r['sim_top1']:.2f}  FD {r['quality_fd']:.2f}  "
             f"align {r['alignment']:.0%}  out-of-range {r['frac_out_of_range']:.1%}{extra}")
    echo(f"wrote {os.path.join(config.out, 'metrics.json')} ({report['seconds']:.0f} s)")
    return report


__all__ = ["DETECTORS", "EvalConfig", "METHODS", "build_guidance", "plot_similarity", "run_eval", "summarize"]
