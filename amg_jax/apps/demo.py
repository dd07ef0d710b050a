"""`amg demo`: the methods side by side on the testbed's models.

By default the shipped text-conditional UNet (``checkpoints/text``, a trained network that
copies its duplicated and specific captions); ``models`` adds the class-conditional and
unconditional UNets (an unconditional model gets the unguided sampler and AMG's G_sim) and
two closed-form models of the same testbed (``amg_jax.data.testbed``):

- ``empirical``: the optimal denoiser of the training set, a *perfect* memorizer: every
  method ends on a training image (README pitfall 8) - it shows the mechanics;
- ``mixture``:   the *partial* memorizer (``amg_jax.models.mixture``): it generalizes on
  generic captions and copies duplicated / highly specific ones - it compares methods.

For each model and method (CFG, STP, DTP and AMG by default; any of ``guidance.METHODS``) it
samples ``samples_per_prompt`` seeds for ``prompts_per_kind`` prompts of each kind (the same
seeds for every method; ``runs.run_method``), and measures per prompt kind: the share copied
(calibrated criterion), nL2 < 1.4 beside it, the median nL2, the Fréchet distance against
fresh true renders of the same prompts (the evaluation network's features when it was trained
on the testbed, else pooled pixels), the alignment (the attribute classifier agrees with the
caption), the share of pixels outside [-1, 1] and, for AMG, the gate-open rate. A ``true renders`` row measures fresh
renders the same way: the floor of FD and the ceiling of alignment at this sample size.

Writes ``grid_<model>.png`` (rows: a training image of the prompt, then each method;
columns: the prompts, first seeds), ``similarity_<model>.png`` (AMG's similarity vs its gate
threshold), ``metrics.json`` and prints the table.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from amg_jax import images as img
from amg_jax.apps.models import MODELS, bench_evaluator, build_testbed, get_model, resolve_testbed
from amg_jax.apps.report import METHOD_LABELS, method_label, plot_similarity
from amg_jax.apps.runs import check_run_fields, for_metrics, run_method
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.guidance import METHODS
from amg_jax.jsonio import write_json
from amg_jax.samplers import SamplerConfig

DEFAULT_MODELS = ("unet-text",)
CHUNK = 16      # seeds per sampler call: AMG's batch-level gate then skips its gradient per chunk
DEFAULT_METHODS = ("cfg", "stp", "dtp", "amg")


def _fd_format(v: float) -> str:
    return f"{v:.1f}" if abs(v) < 1e4 else f"{v:.1e}"   # diverged samples give huge FDs


TABLE_COLUMNS = (("copied", "frac_copied", "{:.0%}".format), ("nL2<1.4", "frac_nl2_below_1.4", "{:.0%}".format),
                 ("med nL2", "nl2_median", "{:.2f}".format), ("FD", "fd", _fd_format),
                 ("align", "alignment", "{:.0%}".format), ("out", "frac_out_of_range", "{:.1%}".format))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Everything `amg demo` does. Validated on construction (ValueError naming the field)."""

    out: str = "demo_out"
    models: tuple = DEFAULT_MODELS
    methods: tuple = DEFAULT_METHODS
    testbed: str = "auto"
    prompts_per_kind: int = 4
    samples_per_prompt: int = 8
    sampler: str = "ddim"
    steps: int = 50
    scale: float | None = None
    seed: int = 0

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"demo: {field} {msg}")

        for field, allowed in (("models", MODELS), ("methods", METHODS)):
            vals = getattr(self, field)
            if isinstance(vals, str) or not vals:
                fail(field, f"must be a non-empty list, got {vals!r}")
            bad = [v for v in vals if v not in allowed]
            if bad:
                fail(field, f"has unknown name(s) {bad}; choose from {list(allowed)}")
        check_run_fields(self, fail)


def format_table(results: dict, kinds: Sequence[str]) -> str:
    """The printed table: one row per model / method / prompt kind."""
    head = ["model", "method", "kind"] + [c[0] for c in TABLE_COLUMNS]
    rows = []
    for model, per_method in results.items():
        for method, per_kind in per_method.items():
            for kind in kinds:
                if kind in per_kind:
                    rows.append([model, method_label(method), kind]
                                + [fmt(per_kind[kind][key]) for _, key, fmt in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def prompt_caption(bed, bench, prompt_id: int) -> str:
    """The words of a prompt id: the caption (text), the class name, or "(unconditional)"."""
    if bench.conditioning == "text":
        return bed.captions[prompt_id]
    if bench.conditioning == "class":
        return bed.config.vocabulary("shape")[prompt_id]
    return "(unconditional)"


def _progress(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, unit="run", dynamic_ncols=True)


def run_demo(config: DemoConfig = DemoConfig(), *, progress: bool = True, echo=print) -> dict:
    """Run the demo (see the module docstring); returns what it writes to ``metrics.json``, where
    a metric not defined for a group (NaN here: e.g. the FD of fewer than 2 samples, the
    alignment of an unconditional model) is ``null``, since NaN is not JSON (``jsonio.write_json``)."""
    t_start = time.time()
    specs = [get_model(name) for name in config.models]
    testbed = resolve_testbed(config.testbed, specs)
    echo(f"building the {testbed} testbed, copy threshold and alignment classifier ...")
    bed = build_testbed(testbed)
    for spec in specs:                  # a missing / damaged checkpoint fails before anything is written
        if spec.trained:
            spec.load(bed)              # cached: spec.denoiser below reuses it
    os.makedirs(config.out, exist_ok=True)
    evaluator = bench_evaluator(bed)
    benches = {c: prepare_bench(bed, config.prompts_per_kind, config.samples_per_prompt, config.seed,
                                conditioning=c, evaluator=evaluator)
               for c in dict.fromkeys(s.conditioning for s in specs)}
    sampler = SamplerConfig(config.sampler, num_steps=config.steps)
    results = {("true renders" if i == 0 else f"true renders ({c})"): {"-": b.measure(b.truth)}
               for i, (c, b) in enumerate(benches.items())}
    timings, prompt_report = {}, {}
    bar = _progress(sum(len(s.methods(config.methods)) for s in specs), progress)
    for spec in specs:
        model_name = spec.name
        bar.set_description(f"loading {model_name}")
        bench = benches[spec.conditioning]
        threshold, prompts, kinds_order, s = bench.threshold, bench.prompts, bench.kinds_order, bench.samples_per_prompt
        prompt_ids = bench.prompt_ids
        methods = spec.methods(config.methods)
        prompt_report[bench.conditioning] = {k: [{"id": int(c), "caption": prompt_caption(bed, bench, c)} for c in v]
                                             for k, v in prompts.items()}
        t0 = time.time()
        den = spec.denoiser(bed)
        bank = spec.bank(bed)
        timings[f"{model_name}/build_s"] = round(time.time() - t0, 2)
        rows = [bench.examples]
        results[model_name] = {}
        for method in methods:
            bar.set_description(f"{model_name}: {method_label(method)}")
            t0 = time.time()
            guidance = spec.guidance(method, spec.scale(config.scale), bank)
            run = run_method(den, guidance, sampler, bench.keys, bench.cond, batch=CHUNK, kinds=bench.kinds,
                             measure=lambda r: bench.measure(for_metrics(r.x)), label=f"{model_name}/{method}",
                             echo=echo)
            x = run.x
            timings[f"{model_name}/{method}/sample_s"] = round(time.time() - t0, 2)
            results[model_name][method] = run.metrics
            if "sigma" in run.trace:
                plot_similarity(run.trace, os.path.join(config.out, f"similarity_{model_name}.png"),
                                title=f"AMG on {model_name}: similarity (-nL2) vs gate threshold")
            rows.append(x[::s])                       # the first seed of every prompt
            bar.update(1)
        up = max(1, 64 // bed.config.image_size)
        grid = img.image_grid(np.concatenate(rows), ncol=len(prompt_ids), upscale=up)
        header = "  |  ".join(f"{k}: {len(prompts[k])}" for k in kinds_order) + f"   ({model_name})"
        grid = img.label_rows(grid, ["training"] + [method_label(m) for m in methods],
                              cell=bed.config.image_size * up, header=header)
        img.save_png(os.path.join(config.out, f"grid_{model_name}.png"), grid)
    bar.close()

    report = {
        "config": dataclasses.asdict(config),
        "testbed": {"captions": bed.num_captions, "images": int(len(bed.images)),
                    "unique_images": int(len(bed.unique_index)), "image_size": bed.config.image_size},
        "prompts": prompt_report.get("text") or next(iter(prompt_report.values())),
        "prompts_by_conditioning": prompt_report,
        "copy_threshold": threshold,
        "classifier_accuracy": (evaluator or bench.classifier).accuracy,
        "fd_features": "evalnet" if evaluator is not None else "pooled pixels",
        "grid_rows": ["training image"] + [method_label(m) for m in config.methods],
        "results": results,
        "timings_s": dict(timings, total=round(time.time() - t_start, 2)),
    }
    path = write_json(os.path.join(config.out, "metrics.json"), report, indent=2)
    echo("")
    echo(format_table(results, list(dict.fromkeys(k for b in benches.values() for k in b.kinds_order))))
    echo(f"\ncopied = nearest training image closer than {threshold:.2f} (1st percentile of distances "
         f"between true renders of one caption); FD = Frechet distance of "
         + ("the evaluation network's features" if evaluator is not None else
            f"{max(1, bed.config.image_size // 8)}x-pooled pixels")
         + " vs fresh true renders; align = attribute classifier agrees with the caption "
         "(the true renders row is the ceiling at this sample size).")
    echo(f"wrote {path} and grid_<model>.png in {config.out} ({report['timings_s']['total']:.0f} s)")
    return report


__all__ = ["DEFAULT_METHODS", "DEFAULT_MODELS", "DemoConfig", "METHOD_LABELS", "format_table", "prompt_caption", "run_demo"]
