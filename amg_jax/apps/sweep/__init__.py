"""`amg sweep CONFIG`: a grid of methods on one model -> resumable cells, a results table, grids, plots.

A sweep is a TOML file (``load_config`` validates all of it before any work)::

    [sweep]
    name = "text_table"
    model = "unet-text"          # a testbed model (apps.models.MODELS) or "sd:PATH_OR_HUB_ID" (below)
    testbed = "auto"             # auto | default | small | unet
    prompts_per_kind = 8         # text: prompts of each kind; class: ignored (one prompt per shape);
                                 # uncond: prompts_per_kind * len(kinds) pseudo-prompts
    samples_per_prompt = 32
    kinds = ["specific", "duplicated", "generic"]   # optional (default: all three)
    seed = 0                     # optional (default 0)
    sampler = "ddim"             # optional (default ddim)
    steps = 50                   # optional (default 50)
    scale = 1.5                  # optional: default the model's card scale (7.5 for the closed-form models)
    chunk = 16                   # optional: seeds per sampler call (AMG's batch-level gate skips per chunk)
    out = "results/text_table"   # optional: relative to the config file's folder (default results/<name>)

    [[method]]                   # one table per method; `name` and `guidance` are required
    name = "AMG"
    guidance = "amg"             # none | cfg | stp | dtp | og | og_dtp | amg
    base = "auto"                # AMG only: the guidance it wraps (auto: cfg, none for an uncond model)
    detector = "auto"            # AMG only: auto | nl2 | nl2-bank | cosine
    amg = { c3 = [1.0, 3.0], threshold = "parabolic" }   # AMG only: AMGConfig fields
    scale = [1.5, 3.0]           # method-level scale / steps / sampler override the [sweep] ones
    baseline = "rna"             # a Somepalli et al. prompt baseline: gni | rt | cwr | rna (or none), for
                                 # models with a text encoder (unet-text, sd:PATH): models.baseline_conditions
    baseline_params = { n = 4 }  # its parameters (prompt_baselines.baseline_params, vocab excepted)

A list anywhere in a method (a scalar field, an ``amg`` or ``baseline_params`` entry) is a grid
axis: a method gives one *cell* per element of the Cartesian product of its axes. A cell's id
is the method name and its grid values (``AMG__scale=1.5__c3=1``; filesystem-safe, stable).
For a cell whose guidance is not AMG the AMG-only axes are dropped (and duplicates merged).

Every cell writes ``out/cells/<id>.npz`` (samples as float16, ``kinds``, ``caption_ids``, and
AMG's per-step ``sigma`` / ``lambda`` / ``gate`` [B, N]) then ``out/cells/<id>.json`` (metrics
per prompt kind and "all", the cell's resolved settings, seconds), each atomically. A cell whose
JSON holds the same settings is skipped on a re-run, so an interrupted sweep resumes and a
changed config re-runs only the cells it changed (a stale cell is re-run with a warning); the
settings hold a content digest of the model's weights (``weights_digest``), so a retrained
checkpoint or an edited Stable Diffusion folder re-runs its cells too. A
failing cell does not stop the others; the sweep raises ``SweepError`` at the end. The bench
(prompts, threshold, the "true renders" row) is kept in ``out/bench.json``. At the end, from the
files alone: ``results.csv`` (a row per cell and kind), ``results.md`` (a table per kind group, as
``experiments/table_md.py`` prints), ``results.json`` (table_md's input format), ``grids/<id>.png``
(the first samples of each kind), ``plots/similarity.png`` (AMG cells: similarity vs gate
threshold per step) and ``plots/tradeoff.png`` (memorized fraction vs FD, a point per cell).
With several hosts only ``jax.process_index() == 0`` writes (and echoes).

A model backend is a small object with ``bench_record() -> dict`` and ``run_cell(cell,
settings) -> CellRun``: ``TestbedBackend`` for the testbed's models, ``StableDiffusionBackend``
for Stable Diffusion.

**Stable Diffusion** (``model = "sd:PATH_OR_HUB_ID"``, a diffusers directory or a hub id) has its
own [sweep] keys (``SD_SWEEP_KEYS``; paths relative to the config file, checked before any work)::

    prompts_file = "prompts.txt"   # one prompt per line, or .jsonl lines {"prompt": ..., "kind": ...}
    samples_per_prompt = 4         # seeds seed .. seed+n-1 for every prompt (as `amg sample`)
    prompts_per_kind = 100         # optional: the first n prompts of each kind (default: all)
    kinds = ["memorized"]          # optional: the prompt kinds to run (default: all in the file)
    sampler = "ddim"               # ddim | dpm++2m | ddpm; steps = 50; scale = 7.5 (default)
    height = 512                   # optional: height / width (default: the model's size)
    dtype = "float32"              # float32 | bfloat16 | float16
    batch = 8                      # seeds per sampler call, sharded over all devices
    sscd = "sscd.npz"              # required: amg convert sscd
    bank = "bank.npz"              # required: amg index build --embedder sscd:... (captions beside it: G_dup)
    clip = "openai/clip-vit-large-patch14"   # optional: adds the CLIP score
    inception = "inception.npz"    # optional, with reference_images = "folder/": adds FID

The memorization metric is the SSCD cosine of each final (uint8) image to its nearest bank row,
``metrics.similarity_report(sims, 0.5, 0.4, name="sscd")`` per kind and "all"; ``frac_copied``
(the memorized column of the tables and plots) is ``frac_sscd_above_0.5`` and ``fd`` (the quality
column) is the FID against ``reference_images`` (NaN without ``inception``). AMG's detector is
SSCD over ``bank`` through the VAE decoder (``sd_amg.latent_detector``) at
``sd_amg.SD_AMG`` (c1=4, c2=3, c3=100 raw) updated by the method's ``amg`` table. Cell
samples are stored as uint8 images ``x [B, H, W, 3]`` with the per-sample ``sscd_similarity`` /
``sscd_nearest``.

The modules: ``config`` (the TOML schema, ``parse_config`` / ``load_config``, ``Cell``), ``settings``
(a cell's resolved settings and the weights / file digests in them), ``backends`` (``CellRun``,
the testbed and Stable Diffusion backends), ``cells`` (the cell files), ``runner`` (``run_sweep``,
``main``), ``results`` (the tables, ``write_results``) and ``plots`` (grids and plots).
"""
from __future__ import annotations

from amg_jax.apps.sweep.config import (SD_SWEEP_KEYS, Cell, SDSettings, SweepConfig, cell_id, load_config, parse_config,
                                       read_prompts)
from amg_jax.apps.sweep.settings import (bench_settings, cell_settings, sd_bench_settings, sd_cell_settings,
                                         weights_digest)
from amg_jax.apps.sweep.backends import CellRun, StableDiffusionBackend, TestbedBackend, make_backend
from amg_jax.apps.sweep.cells import cell_status
from amg_jax.apps.sweep.runner import SweepError, main, run_sweep
from amg_jax.apps.sweep.results import (build_results, results_csv, results_json, results_markdown,
                                        sd_results_markdown, write_results)
from amg_jax.apps.sweep.plots import plot_similarity_cells, plot_tradeoff

__all__ = ["Cell", "CellRun", "SDSettings", "SD_SWEEP_KEYS", "SweepConfig", "SweepError", "StableDiffusionBackend",
           "TestbedBackend", "bench_settings", "build_results", "cell_id", "cell_settings", "cell_status",
           "load_config", "main", "make_backend", "parse_config", "plot_similarity_cells", "plot_tradeoff",
           "read_prompts", "results_csv", "results_json", "results_markdown", "run_sweep", "sd_bench_settings",
           "sd_cell_settings", "sd_results_markdown", "weights_digest", "write_results"]
