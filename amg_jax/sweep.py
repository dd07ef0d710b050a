"""`amg sweep CONFIG`: a grid of methods on one model -> resumable cells, a results table, grids, plots.

A sweep is a TOML file (``load_config`` validates all of it before any work)::

    [sweep]
    name = "text_table"
    model = "unet-text"          # a workbench model (workbench.MODELS) or "sd:PATH_OR_HUB_ID" (below)
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
                                 # models with a text encoder (unet-text, sd:PATH): workbench.baseline_conditions
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
settings) -> CellRun``: ``TestbedBackend`` for the workbench models, ``StableDiffusionBackend``
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
SSCD over ``bank`` through the VAE decoder (``sd_guidance.latent_detector``) at
``sd_guidance.SD_AMG`` (c1=4, c2=3, c3=100 raw) updated by the method's ``amg`` table. Cell
samples are stored as uint8 images ``x [B, H, W, 3]`` with the per-sample ``sscd_similarity`` /
``sscd_nearest``.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import math
import os
import re
import time
import tomllib
from typing import Any, NamedTuple

import jax
import numpy as np

from amg_jax import images as img
from amg_jax import workbench
from amg_jax.data import testbed as tb
from amg_jax.evaluate import DETECTORS
from amg_jax.guidance import GUIDANCES
from amg_jax.guidance.amg import AMGConfig
from amg_jax.jsonio import json_safe, write_atomic, write_json
from amg_jax.prompt_baselines import (BASELINE_DEFAULTS, EMBEDDING_BASELINES, GNI_BRANCHES, PROMPT_BASELINES, apply_baseline,
                                      baseline_params, gni_rows)
from amg_jax.samplers import SAMPLERS, SamplerConfig
from amg_jax.workbench import (DEFAULT_SCALE, MODELS, TRAINED, method_guidance, model_base, model_detector,
                               model_kind, resolve_testbed, sample_in_chunks)

GUIDANCE_NAMES = tuple(GUIDANCES) + ("amg",)
BASELINES = tuple(PROMPT_BASELINES)
AMG_FIELDS = tuple(f.name for f in dataclasses.fields(AMGConfig))
SD_PREFIX = "sd:"
CELL_FORMAT = "amg_jax.sweep_cell/1"
BENCH_FORMAT = "amg_jax.sweep_bench/1"

# [sweep] keys and their defaults (REQUIRED: must be given).
REQUIRED = object()
SWEEP_KEYS = {"name": None, "model": REQUIRED, "testbed": "auto", "prompts_per_kind": REQUIRED,
              "samples_per_prompt": REQUIRED, "kinds": tb.KINDS, "seed": 0, "sampler": "ddim", "steps": 50,
              "scale": None, "chunk": 16, "out": None}
# [[method]] scalar keys, in the order their grid values appear in a cell id; then amg.*, baseline_params.*
METHOD_SCALARS = ("guidance", "base", "detector", "baseline", "scale", "steps", "sampler")
METHOD_KEYS = ("name",) + METHOD_SCALARS + ("amg", "baseline_params")
AMG_ONLY = ("base", "detector")          # (and every amg.* axis)
# Models whose captions a prompt baseline can perturb (workbench.baseline_conditions: a text encoder).
BASELINE_MODELS = ("unet-text",)
# [sweep] keys of a Stable Diffusion model ("sd:PATH_OR_HUB_ID") and their defaults (module docstring).
SD_SWEEP_KEYS = {"name": None, "model": REQUIRED, "prompts_file": REQUIRED, "prompts_per_kind": None,
                 "samples_per_prompt": REQUIRED, "kinds": None, "seed": 0, "sampler": "ddim", "steps": 50,
                 "scale": DEFAULT_SCALE, "batch": 8, "out": None, "sscd": REQUIRED, "bank": REQUIRED, "clip": None,
                 "inception": None, "reference_images": None, "height": None, "width": None, "dtype": "float32"}
SD_KIND = "prompts"                     # the kind of every prompt of a plain-text prompts file
SSCD_THRESHOLD, SSCD_STRICT = 0.5, 0.4  # the papers' copy criterion: SSCD cosine > 0.5


class SweepError(RuntimeError):
    """Some cells failed; every other cell was run and written (``failures``: {cell id: exception})."""

    def __init__(self, message: str, failures: dict):
        super().__init__(message)
        self.failures = failures


# ----------------------------------------------------------------------------- the config

@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a sweep: a method at one point of its grid. ``scale`` / ``steps`` / ``sampler``
    are the method's (else the sweep's; ``scale`` None = the model's card scale); ``amg`` and
    ``baseline_params`` are ((field, value), ...); ``grid`` the ((axis, value), ...) that name it."""

    id: str
    method: str
    guidance: str
    scale: float | None
    steps: int
    sampler: str
    base: str = "auto"
    detector: str = "auto"
    amg: tuple = ()
    baseline: str | None = None
    baseline_params: tuple = ()
    grid: tuple = ()

    @property
    def label(self) -> str:
        """The method name and its grid values, for tables and plots: ``AMG (c3=1, scale=1.5)``."""
        if not self.grid:
            return self.method
        return f"{self.method} ({', '.join(f'{_short(a)}={_fmt(v)}' for a, v in self.grid)})"


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A validated sweep (``load_config``). ``out`` is absolute; ``cells`` in config order."""

    path: str
    name: str
    model: str
    testbed: str
    prompts_per_kind: int
    samples_per_prompt: int
    kinds: tuple
    seed: int
    sampler: str
    steps: int
    scale: float | None
    chunk: int
    out: str
    cells: tuple
    sd: "SDSettings | None" = None      # Stable Diffusion models only (``chunk`` is then its ``batch``)

    @property
    def methods(self) -> list:
        return list(dict.fromkeys(c.method for c in self.cells))


def _short(axis: str) -> str:
    return axis.rsplit(".", 1)[-1]


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def _safe(text: str) -> str:
    """Filesystem-safe: letters, digits and ``._=+-``; anything else becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", text)


def cell_id(method: str, grid) -> str:
    """``<method>__<axis>=<value>...`` (filesystem-safe), the name of a cell's files."""
    return "__".join([_safe(method)] + [_safe(f"{_short(a)}={_fmt(v)}") for a, v in grid])


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(key: str, v, fail) -> None:
    """Type / range of one value of method field ``key`` (``amg.*`` and ``baseline_params.*``
    are checked with their config objects)."""
    rules = {
        "guidance": (lambda x: x in GUIDANCE_NAMES, f"one of {list(GUIDANCE_NAMES)}"),
        "base": (lambda x: x in ("auto",) + tuple(GUIDANCES), f"one of {['auto'] + list(GUIDANCES)}"),
        "detector": (lambda x: x in DETECTORS, f"one of {list(DETECTORS)}"),
        "baseline": (lambda x: x in BASELINES + ("none",), f"one of {list(BASELINES) + ['none']}"),
        "scale": (lambda x: _is_number(x) and x >= 0, "a finite number >= 0"),
        "steps": (lambda x: _is_int(x) and x >= 1, "an integer >= 1"),
        "sampler": (lambda x: x in SAMPLERS, f"one of {list(SAMPLERS)}"),
    }
    if key in rules:
        ok, rule = rules[key]
        if not ok(v):
            fail(key, f"must be {rule}, got {v!r}")
    elif key.startswith("amg."):
        field = key[4:]
        default = next(f.default for f in dataclasses.fields(AMGConfig) if f.name == field)
        if isinstance(default, bool):
            good, rule = isinstance(v, bool), "true or false"
        elif isinstance(default, str):
            good, rule = isinstance(v, str), "a string"
        else:
            good, rule = _is_number(v), "a finite number"
        if not good:
            fail(key, f"must be {rule}, got {v!r}")
    elif not isinstance(v, (str, int, float, bool)):             # baseline_params.*
        fail(key, f"must be a string, number or boolean, got {v!r}")


def _axes(m: dict, fail) -> tuple[list, dict]:
    """A method table -> (axes [(key, values)], fixed {key: value}), keys in cell-id order."""
    items = [(k, m[k]) for k in METHOD_SCALARS if k in m]
    for table, order in (("amg", AMG_FIELDS), ("baseline_params", None)):
        sub = m.get(table)
        if sub is None:
            continue
        if not isinstance(sub, dict):
            fail(table, f"must be a table ({{ key = value, ... }}), got {sub!r}")
        if table == "amg":
            unknown = [k for k in sub if k not in AMG_FIELDS]
            if unknown:
                fail(f"amg.{unknown[0]}", f"is not an AMG setting; AMGConfig's fields are {list(AMG_FIELDS)}")
        keys = [k for k in order if k in sub] if order else sorted(sub)
        items += [(f"{table}.{k}", sub[k]) for k in keys]
    axes, fixed = [], {}
    for key, v in items:
        if isinstance(v, list):
            if not v:
                fail(key, "is an empty list (a grid axis needs at least one value)")
            for x in v:
                if isinstance(x, (list, dict)):
                    fail(key, f"grid values must be scalars, got {x!r}")
                _check_value(key, x, fail)
            if len(set(map(repr, v))) != len(v):
                fail(key, f"has repeated grid values {v!r}")
            axes.append((key, v))
        else:
            if isinstance(v, dict):
                fail(key, f"must be a scalar or a list of scalars, got a table {v!r}")
            _check_value(key, v, fail)
            fixed[key] = v
    return axes, fixed


def _method_cells(m: dict, sweep: dict, where: str, model: str) -> list:
    """The cells of one [[method]] table (validated)."""
    def fail(key, msg):
        raise ValueError(f"{where}: {key} {msg}")

    unknown = [k for k in m if k not in METHOD_KEYS]
    if unknown:
        fail(unknown[0], f"is not a method key; method keys are {list(METHOD_KEYS)}")
    if "guidance" not in m:
        fail("guidance", f"is missing (one of {list(GUIDANCE_NAMES)})")
    axes, fixed = _axes(m, fail)
    guidances = next((v for k, v in axes if k == "guidance"), [fixed.get("guidance")])
    if "amg" not in guidances:
        for key in AMG_ONLY + ("amg",):
            if key in m:
                fail(key, "only applies to guidance 'amg'")
    if "baseline_params" in m and "baseline" not in m:
        fail("baseline_params", "needs a baseline")
    conditioning = "text" if model.startswith(SD_PREFIX) else model_kind(model)
    cells, seen = [], set()
    names = [k for k, _ in axes]
    for combo in itertools.product(*[v for _, v in axes]):
        d = dict(fixed, **dict(zip(names, combo)))
        guidance = d["guidance"]
        drop = set()
        if guidance != "amg":
            drop |= {k for k in d if k in AMG_ONLY or k.startswith("amg.")}
        baseline = d.get("baseline")
        if baseline in (None, "none"):
            baseline = None
            drop |= {k for k in d if k.startswith("baseline_params.")}
        d = {k: v for k, v in d.items() if k not in drop}
        if conditioning == "uncond":
            base = d.get("base", "auto")
            if guidance not in ("none", "amg"):
                fail("guidance", f"{guidance!r} needs a condition; model {model!r} is unconditional (use none or amg)")
            if guidance == "amg" and base not in ("auto", "none"):
                fail("base", f"{base!r} needs a condition; model {model!r} is unconditional (use none or auto)")
        if baseline is not None and not (model in BASELINE_MODELS or model.startswith(SD_PREFIX)):
            fail("baseline", f"{baseline!r} perturbs captions; it needs a model with a text encoder "
                             f"({', '.join(BASELINE_MODELS)} or 'sd:PATH'), not {model!r}")
        amg = tuple((k[4:], v) for k, v in d.items() if k.startswith("amg."))
        if guidance == "amg":
            try:
                AMGConfig(**dict(amg))
            except (TypeError, ValueError) as e:
                bad = next((f for f in AMG_FIELDS if f"AMGConfig.{f} " in str(e)), None)
                fail(f"amg.{bad}" if bad else "amg", f"is invalid: {e}")
        params = tuple((k[len("baseline_params."):], v) for k, v in d.items() if k.startswith("baseline_params."))
        if baseline is not None:
            _check_baseline(baseline, dict(params), fail)
        grid = tuple((k, d[k]) for k in names if k in d)
        cid = cell_id(m["name"], grid)
        if cid in seen:
            continue
        seen.add(cid)
        scale = d.get("scale", sweep["scale"])
        cells.append(Cell(id=cid, method=m["name"], guidance=guidance,
                          scale=None if scale is None else float(scale), steps=d.get("steps", sweep["steps"]),
                          sampler=d.get("sampler", sweep["sampler"]), base=d.get("base", "auto"),
                          detector=d.get("detector", "auto"), amg=amg, baseline=baseline,
                          baseline_params=params, grid=grid))
    return cells


def _check_baseline(name: str, params: dict, fail) -> None:
    """Baseline parameters: known to ``name`` (its vocabulary comes from the model) and accepted
    by it (a dry run on a short caption / embedding)."""
    allowed = [p for p in baseline_params(name) if p not in ("vocab", "null")]     # both come from the model
    bad = [p for p in params if p not in allowed]
    if bad:
        fail(f"baseline_params.{bad[0]}", f"is not a parameter of baseline {name!r}; it takes {allowed}")
    try:
        if name in EMBEDDING_BASELINES:
            std = params.get("std", 0.1)
            if not (_is_number(std) and std >= 0):
                raise ValueError(f"std must be a finite number >= 0, got {std!r}")
            if params.get("branches", "both") not in GNI_BRANCHES:
                raise ValueError(f"branches must be one of {list(GNI_BRANCHES)}, got {params['branches']!r}")
        else:
            apply_baseline(name, "a red circle on a gray background", 0, **params)
    except (TypeError, ValueError) as e:
        key = next((f"baseline_params.{p}" for p in params if p in str(e)), "baseline_params")
        fail(key, f"is invalid for baseline {name!r}: {e}")


def _check_sweep(s: dict, fail) -> None:
    """The [sweep] table's values (``fail(key, message)`` raises)."""
    model = s["model"]
    if not isinstance(model, str) or not (model in MODELS or (model.startswith(SD_PREFIX) and len(model) > 3)):
        fail("model", f"must be one of {list(MODELS)} or 'sd:PATH', got {model!r}")
    if not isinstance(s["name"], str) or not s["name"].strip():
        fail("name", f"must be a non-empty string, got {s['name']!r}")
    if not isinstance(s["out"], str) or not s["out"].strip():
        fail("out", f"must be a non-empty path string, got {s['out']!r}")
    for key in ("testbed", "sampler"):
        allowed = workbench.TESTBEDS + ("auto",) if key == "testbed" else SAMPLERS
        if s[key] not in allowed:
            fail(key, f"must be one of {list(allowed)}, got {s[key]!r}")
    for key in ("prompts_per_kind", "samples_per_prompt", "steps", "chunk"):
        if not (_is_int(s[key]) and s[key] >= 1):
            fail(key, f"must be an integer >= 1, got {s[key]!r}")
    if not (_is_int(s["seed"]) and s["seed"] >= 0):
        fail("seed", f"must be an integer >= 0, got {s['seed']!r}")
    if s["scale"] is not None and not (_is_number(s["scale"]) and s["scale"] >= 0):
        fail("scale", f"must be a finite number >= 0, got {s['scale']!r}")
    kinds = s["kinds"]
    if (not isinstance(kinds, (list, tuple)) or not kinds or any(k not in tb.KINDS for k in kinds)
            or len(set(kinds)) != len(kinds)):
        fail("kinds", f"must be a non-empty list of distinct kinds from {list(tb.KINDS)}, got {kinds!r}")


# ----------------------------------------------------------------------------- Stable Diffusion config

@dataclasses.dataclass(frozen=True)
class SDSettings:
    """The validated Stable Diffusion part of a sweep (absolute paths). ``source``: the model's
    directory or hub id; ``prompts`` / ``prompt_kinds``: the prompts sampled (after ``kinds`` and
    ``prompts_per_kind``) and their kinds, in file order; ``kinds``: the kinds, in config order;
    ``embed_dim``: the SSCD embedding size (= the bank's row size); ``clip``: a directory or hub id."""

    source: str
    prompts_file: str
    prompts: tuple
    prompt_kinds: tuple
    kinds: tuple
    sscd: str
    bank: str
    embed_dim: int
    clip: str | None = None
    inception: str | None = None
    reference_images: str | None = None
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"


def _unknown_sd_key(key: str) -> str:
    hint = {"chunk": " (use batch: seeds per sampler call)",
            "testbed": " (Stable Diffusion samples the prompts of prompts_file, not a testbed)"}.get(key, "")
    return f"is not a sweep key for Stable Diffusion models; their sweep keys are {list(SD_SWEEP_KEYS)}{hint}"


def _is_hub_id(text: str) -> bool:
    from amg_jax.models.stable_diffusion import HUB_ID

    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _npz_text(path: str, key: str) -> str | None:
    """The string entry ``key`` of an ``.npz`` (read alone, not the whole file); None if absent."""
    with np.load(path, allow_pickle=False) as z:
        return str(z[key]) if key in z.files else None


def read_prompts(path: str) -> list[tuple[str, str]]:
    """``(prompt, kind)`` pairs of a prompts file: ``.jsonl`` lines ``{"prompt": ..., "kind": ...}``
    (``kind`` optional: ``SD_KIND``), any other file one prompt per line; blank lines skipped.
    ValueError naming the file and line for anything malformed."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is unreadable: {e}") from None
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line:
            continue
        if not path.endswith(".jsonl"):
            out.append((line, SD_KIND))
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not valid JSON: {e}") from None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{path} line {i}: expected {{"prompt": "non-empty text", "kind": "..."}}, '
                             f"got {line[:80]}")
        kind = obj.get("kind", SD_KIND)
        if not isinstance(kind, str) or not kind.strip() or kind == "all":
            raise ValueError(f"{path} line {i}: kind must be a non-empty string other than 'all', got {kind!r}")
        out.append((prompt.strip(), kind))
    return out


def _sd_size_multiple(model_dir: str) -> int | None:
    """Pixel sizes a local SD must be a multiple of (as ``StableDiffusion.size_multiple``), from its
    configs alone; None when they cannot be read (``load_stable_diffusion`` says why later)."""
    try:
        with open(os.path.join(model_dir, "unet", "config.json")) as f:
            unet = json.load(f)
        with open(os.path.join(model_dir, "vae", "config.json")) as f:
            vae = json.load(f)
        return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _check_sd_sweep(s: dict, fail, base_dir: str) -> SDSettings:
    """The [sweep] table of an "sd:" model (``fail(key, message)`` raises): values, files (read
    only as far as their headers), the prompts. Returns the ``SDSettings``."""
    from amg_jax.models import stable_diffusion as sdm

    def path_of(key):
        v = s[key]
        if not isinstance(v, str) or not v.strip():
            fail(key, f"must be a non-empty path string, got {v!r}")
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(v)))

    def existing_file(key, what):
        p = path_of(key)
        if not os.path.isfile(p):
            fail(key, f"{s[key]!r} does not exist ({what}; resolved to {p})")
        return p

    for key in ("name", "out"):
        if not isinstance(s[key], str) or not s[key].strip():
            fail(key, f"must be a non-empty {'path ' if key == 'out' else ''}string, got {s[key]!r}")
    src = s["model"][len(SD_PREFIX):]
    if not src.strip():
        fail("model", "must be 'sd:PATH_OR_HUB_ID' (a diffusers Stable Diffusion directory or a hub id)")
    local = os.path.normpath(os.path.join(base_dir, os.path.expanduser(src)))
    multiple = None
    if os.path.isdir(local):
        try:
            sdm.check_layout(local)
        except (FileNotFoundError, ValueError) as e:
            fail("model", f"{s['model']!r}: {e}")
        source, multiple = local, _sd_size_multiple(local)
    elif os.path.exists(local) or not _is_hub_id(src):
        fail("model", f"{s['model']!r}: no Stable Diffusion directory {local} (and {src!r} is not a hub id "
                      "such as 'CompVis/stable-diffusion-v1-4')")
    else:
        source = src
    if s["sampler"] not in SAMPLERS:
        fail("sampler", f"must be one of {list(SAMPLERS)}, got {s['sampler']!r}")
    for key in ("samples_per_prompt", "steps", "batch"):
        if not (_is_int(s[key]) and s[key] >= 1):
            fail(key, f"must be an integer >= 1, got {s[key]!r}")
    if not (_is_int(s["seed"]) and s["seed"] >= 0):
        fail("seed", f"must be an integer >= 0, got {s['seed']!r}")
    if not (_is_number(s["scale"]) and s["scale"] >= 0):
        fail("scale", f"must be a finite number >= 0, got {s['scale']!r}")
    if s["dtype"] not in sdm.DTYPES:
        fail("dtype", f"must be one of {list(sdm.DTYPES)}, got {s['dtype']!r}")
    for key in ("height", "width"):
        v = s[key]
        if v is None:
            continue
        if not (_is_int(v) and v >= 8 and v % 8 == 0):
            fail(key, f"must be a positive multiple of 8 (the VAE's factor), got {v!r}")
        if multiple and v % multiple:
            fail(key, f"{v} is not a multiple of {multiple} (the VAE's and the Flax UNet's downsampling of "
                      f"{s['model']!r})")

    prompts_file = existing_file("prompts_file", "one prompt per line, or .jsonl lines {\"prompt\", \"kind\"}")
    try:
        pairs = read_prompts(prompts_file)
    except ValueError as e:
        fail("prompts_file", str(e))
    if not pairs:
        fail("prompts_file", f"{s['prompts_file']!r} holds no prompts (one per line, blank lines are skipped)")
    file_kinds = list(dict.fromkeys(k for _, k in pairs))
    kinds = s["kinds"]
    if kinds is None:
        kinds = file_kinds
    elif (not isinstance(kinds, list) or not kinds or not all(isinstance(k, str) for k in kinds)
          or len(set(kinds)) != len(kinds)):
        fail("kinds", f"must be a non-empty list of distinct prompt kinds of the prompts file {file_kinds}, "
                      f"got {kinds!r}")
    else:
        absent = [k for k in kinds if k not in file_kinds]
        if absent:
            fail("kinds", f"{absent[0]!r} is not a kind of {s['prompts_file']!r} (its kinds: {file_kinds})")
    n = s["prompts_per_kind"]
    if n is not None and not (_is_int(n) and n >= 1):
        fail("prompts_per_kind", f"must be an integer >= 1 (the first n prompts of each kind), got {n!r}")
    taken, chosen = {k: 0 for k in kinds}, []
    for prompt, kind in pairs:
        if kind in taken and (n is None or taken[kind] < n):
            taken[kind] += 1
            chosen.append((prompt, kind))

    def header(field: str, path: str, entry: str, fmt: str, what: str) -> dict:
        """The JSON header ``entry`` of the .npz ``path`` (read alone), checked to be of format ``fmt``."""
        try:
            meta = json.loads(_npz_text(path, entry) or "null")
        except Exception as e:    # noqa: BLE001 - any unreadable file is the same error
            fail(field, f"{s[field]!r} is not a readable .npz file: {type(e).__name__}: {e}")
        if not isinstance(meta, dict) or meta.get("format") != fmt:
            fail(field, f"{s[field]!r} is not {what}")
        return meta

    from amg_jax.index import FORMAT as BANK_FORMAT
    from amg_jax.similarity import inception as _inception, sscd as _sscd

    sscd_path = existing_file("sscd", "an SSCD params file from `amg convert sscd`")
    meta = header("sscd", sscd_path, "__config__", _sscd.PARAMS_FORMAT, "an SSCD params file (amg convert sscd)")
    try:
        embed_dim = int(meta["config"]["embed_dim"])
    except (KeyError, TypeError, ValueError):
        fail("sscd", f"{s['sscd']!r} is not an SSCD params file (amg convert sscd)")
    bank_path = existing_file("bank", "an embedding bank from `amg index build --embedder sscd:...`")
    meta = header("bank", bank_path, "metadata", BANK_FORMAT, "a reference bank (amg index build)")
    if meta.get("kind") != "embedding":
        fail("bank", f"{s['bank']!r} is a {meta.get('kind')!r} bank; the SSCD metric and detector need an embedding "
                     "bank (amg index build --embedder sscd:PARAMS)")
    dim = int(np.prod(meta.get("sample_shape") or [0]))
    if dim != embed_dim:
        fail("bank", f"{s['bank']!r} holds {dim}-d rows but the SSCD params of sweep.sscd give {embed_dim}-d "
                     "embeddings (built with another embedder?)")
    if not meta.get("num_rows"):
        fail("bank", f"{s['bank']!r} is empty")

    clip = s["clip"]
    if clip is not None:
        p = path_of("clip")
        if os.path.isdir(p):
            clip = p
        elif os.path.exists(p) or not _is_hub_id(clip):
            fail("clip", f"{clip!r}: no CLIP directory {p} (and not a hub id such as "
                         "'openai/clip-vit-large-patch14')")
    inception_path = refs = None
    if s["inception"] is not None:
        inception_path = existing_file("inception", "Inception params from `amg convert inception`")
        header("inception", inception_path, "__config__", _inception.PARAMS_FORMAT,
               "an Inception params file (amg convert inception)")
        if s["reference_images"] is None:
            fail("reference_images", "is missing: FID (sweep.inception) compares the samples with a folder of "
                                     "real images")
    if s["reference_images"] is not None:
        if s["inception"] is None:
            fail("inception", "is missing: FID against sweep.reference_images needs the Inception params "
                              "(amg convert inception)")
        refs = path_of("reference_images")
        from amg_jax.index_build import list_images

        try:
            found = list_images(refs)
        except ValueError as e:
            fail("reference_images", str(e).replace("index build: ", ""))
        if len(found) < 2:
            fail("reference_images", f"{s['reference_images']!r} holds {len(found)} image; FID needs at least 2")
    return SDSettings(source=source, prompts_file=prompts_file, prompts=tuple(p for p, _ in chosen),
                      prompt_kinds=tuple(k for _, k in chosen), kinds=tuple(kinds), sscd=sscd_path, bank=bank_path,
                      embed_dim=embed_dim, clip=clip, inception=inception_path, reference_images=refs,
                      height=s["height"], width=s["width"], dtype=s["dtype"])


def _check_sd_cells(cells: list, where: str) -> None:
    """AMG settings Stable Diffusion cannot take: invalid over ``sd_guidance.SD_AMG``, or gate
    thresholds outside the SSCD cosine's range."""
    from amg_jax.sd_guidance import SD_AMG

    for c in cells:
        if c.guidance != "amg":
            continue
        amg = dict(SD_AMG, **dict(c.amg))
        try:
            AMGConfig(**amg)
        except (TypeError, ValueError) as e:
            bad = next((f for f in AMG_FIELDS if f"AMGConfig.{f} " in str(e)), None)
            raise ValueError(f"{where}: {f'amg.{bad}' if bad else 'amg'} is invalid: {e}") from None
        for field in ("lambda_min", "lambda_max"):
            v = amg.get(field)
            if v is not None and not -1.0 < float(v) < 1.0:
                raise ValueError(f"{where}: amg.{field}={v} lies outside the SSCD cosine's range (-1, 1): the gate "
                                 "would be always or never open")


def parse_config(data: dict, path: str = "<config>") -> SweepConfig:
    """A parsed TOML document -> ``SweepConfig``; ValueError naming the key on anything wrong."""
    where = f"sweep config {path}"
    unknown = [k for k in data if k not in ("sweep", "method")]
    if unknown:
        raise ValueError(f"{where}: unknown top-level key {unknown[0]!r}; expected [sweep] and [[method]] tables")
    s = data.get("sweep")
    if not isinstance(s, dict):
        raise ValueError(f"{where}: [sweep] table is missing")

    def fail(key, msg):
        raise ValueError(f"{where}: sweep.{key} {msg}")

    sd = isinstance(s.get("model"), str) and s["model"].startswith(SD_PREFIX)
    keys = SD_SWEEP_KEYS if sd else SWEEP_KEYS
    bad = [k for k in s if k not in keys]
    if bad:
        fail(bad[0], _unknown_sd_key(bad[0]) if sd else f"is not a sweep key; sweep keys are {list(SWEEP_KEYS)}"
             + (f" ({bad[0]} applies to Stable Diffusion models, model = 'sd:PATH')" if bad[0] in SD_SWEEP_KEYS
                else ""))
    missing = [k for k, v in keys.items() if v is REQUIRED and k not in s]
    if missing:
        fail(missing[0], "is missing")
    stem = os.path.splitext(os.path.basename(path))[0] or "sweep"
    s = {k: s.get(k, v) for k, v in keys.items()}
    s["name"] = stem if s["name"] is None else s["name"]
    s["out"] = os.path.join("results", str(s["name"])) if s["out"] is None else s["out"]
    base_dir = os.path.dirname(os.path.abspath(path)) if path != "<config>" else os.getcwd()
    sd_settings = _check_sd_sweep(s, fail, base_dir) if sd else _check_sweep(s, fail)
    methods = data.get("method")
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"{where}: no [[method]] tables (a sweep needs at least one method)")
    cells, names = [], {}
    for i, m in enumerate(methods, 1):
        mwhere = f"{where}: method #{i}"
        if not isinstance(m, dict):
            raise ValueError(f"{mwhere} must be a table")
        name = m.get("name")
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{mwhere}: name must be a non-empty string, got {name!r}")
        mwhere = f"{where}: method {name!r}"
        if name in names:
            raise ValueError(f"{mwhere}: name is a duplicate (method #{names[name]} has it too)")
        names[name] = i
        if sd and m.get("detector", "auto") != "auto":
            raise ValueError(f"{mwhere}: detector {m['detector']!r}: on Stable Diffusion AMG's detector is SSCD over "
                             "sweep.bank through the VAE (leave detector out)")
        new = _method_cells(m, s, mwhere, s["model"])
        if sd:
            _check_sd_cells(new, mwhere)
        cells += new
    ids = [c.id for c in cells]
    dup = next((c for c in cells if ids.count(c.id) > 1), None)
    if dup is not None:
        raise ValueError(f"{where}: method {dup.method!r}: name gives cell id {dup.id!r}, which another method's "
                         "cell has too (rename one)")
    out = os.path.normpath(os.path.join(base_dir, os.path.expanduser(s["out"])))
    if sd:
        return SweepConfig(path=os.path.abspath(path) if path != "<config>" else path, name=s["name"],
                           model=s["model"], testbed=None, prompts_per_kind=s["prompts_per_kind"],
                           samples_per_prompt=s["samples_per_prompt"], kinds=sd_settings.kinds, seed=s["seed"],
                           sampler=s["sampler"], steps=s["steps"],
                           scale=float(s["scale"]), chunk=s["batch"], out=out, cells=tuple(cells), sd=sd_settings)
    return SweepConfig(path=os.path.abspath(path) if path != "<config>" else path, name=s["name"], model=s["model"],
                       testbed=s["testbed"], prompts_per_kind=s["prompts_per_kind"],
                       samples_per_prompt=s["samples_per_prompt"], kinds=tuple(s["kinds"]), seed=s["seed"],
                       sampler=s["sampler"], steps=s["steps"],
                       scale=None if s["scale"] is None else float(s["scale"]), chunk=s["chunk"], out=out,
                       cells=tuple(cells))


def load_config(path) -> SweepConfig:
    """Read and validate a sweep TOML file (see the module docstring). Raises FileNotFoundError
    for a missing file, ValueError naming the key (or the TOML line) for anything wrong."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"sweep config {path} is a directory, not a .toml file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep config {path} does not exist")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"sweep config {path} is not valid TOML: {e}") from None
    return parse_config(data, path)


# ----------------------------------------------------------------------------- resolved settings

def bench_settings(config: SweepConfig) -> dict:
    """What fixes the bench (prompts, seeds, references): part of every cell's settings."""
    if config.sd is not None:
        return sd_bench_settings(config)
    testbed = None if config.model.startswith(SD_PREFIX) else resolve_testbed(config.testbed, [config.model])
    return {"model": config.model, "testbed": testbed, "prompts_per_kind": config.prompts_per_kind,
            "samples_per_prompt": config.samples_per_prompt, "kinds": list(config.kinds), "seed": config.seed}


def _default_scale(model: str) -> float:
    """``workbench.model_scale(model)`` from the card alone (no parameters loaded)."""
    if model in TRAINED:
        from amg_jax.models.zoo import read_card

        return float(read_card(os.path.join(workbench.checkpoints_dir(), TRAINED[model])).get(
            "guidance_scale", DEFAULT_SCALE))
    return DEFAULT_SCALE


def cell_settings(config: SweepConfig, cell: Cell) -> dict:
    """Everything that decides a cell's samples, resolved ("auto" -> the model's choice, the
    full AMGConfig), and ``weights``, the content digest of the model's weights
    (``weights_digest``): a stored cell with equal settings is not run again, so a retrained
    checkpoint re-runs its cells. (``chunk`` is left out: it changes how seeds are batched, not
    the samples.)"""
    if config.sd is not None:
        return sd_cell_settings(config, cell)
    amg = cell.guidance == "amg"
    base = (model_base(config.model) if cell.base == "auto" else cell.base) if amg else None
    scale_used = cell.guidance not in ("none",) and not (amg and base == "none")
    scale = (cell.scale if cell.scale is not None else _default_scale(config.model)) if scale_used else None
    return _jsonable(dict(
        bench_settings(config), weights=weights_digest(config), method=cell.method, guidance=cell.guidance, base=base,
        detector=(model_detector(config.model) if cell.detector == "auto" else cell.detector) if amg else None,
        scale=scale, sampler=cell.sampler, steps=cell.steps,
        amg=dataclasses.asdict(AMGConfig(**workbench.model_amg(config.model, dict(cell.amg)))) if amg else None,
        baseline=cell.baseline, baseline_params=_baseline_settings(cell)))


def _baseline_settings(cell: Cell) -> dict | None:
    """A cell's prompt-baseline parameters with the baseline's defaults filled in (a changed default,
    e.g. GNI's branches, makes the cell stale), None without a baseline."""
    return {**BASELINE_DEFAULTS[cell.baseline], **dict(cell.baseline_params)} if cell.baseline else None


@functools.lru_cache(maxsize=4096)       # a few strings per file: a model folder's files all stay cached
def _file_digest_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()[:20]


def _file_digest(path: str | None) -> str | None:
    """A short sha256 of a file's bytes (cached per path, size and mtime), None for no file: it
    fingerprints SD cells by content, so a sweep moved to another host or folder still resumes."""
    if path is None or not os.path.isfile(path):
        return None
    st = os.stat(path)
    return _file_digest_cached(path, st.st_size, st.st_mtime_ns)


def _files_digest(root: str, names) -> str | None:
    """A short sha256 of the files ``names`` (relative to ``root``): each name and the sha256 of
    its bytes (``_file_digest``); None when there are none."""
    names = sorted(names)
    if not names:
        return None
    h = hashlib.sha256()
    for name in names:
        h.update(f"{name}\0{_file_digest(os.path.join(root, *name.split('/')))}\n".encode())
    return "sha256:" + h.hexdigest()[:20]


def _walk_files(path: str) -> list:
    """The files under ``path``, relative with "/" separators; dot files and folders (editor and
    OS litter, ``write_atomic``'s temporaries) left out."""
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, path)
        out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files if not f.startswith(".")]
    return out


# The files of a diffusers Stable Diffusion folder that decide its samples: the weights and configs
# of the three networks, the scheduler and tokenizer configs and model_index.json (not the safety
# checker, feature extractor, README, ...).
SD_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder")
SD_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".json")
SD_CONFIG_FOLDERS = ("scheduler", "tokenizer")


def _sd_weight_files(path: str) -> list:
    """``weights_digest``'s files of the Stable Diffusion folder ``path`` (see ``SD_WEIGHT_FOLDERS``)."""
    def keep(name: str) -> bool:
        top = name.split("/", 1)[0]
        return (name == "model_index.json" or top in SD_CONFIG_FOLDERS
                or (top in SD_WEIGHT_FOLDERS and name.endswith(SD_WEIGHT_SUFFIXES)))
    return [f for f in _walk_files(path) if keep(f)]


def weights_digest(config: SweepConfig) -> str | None:
    """A short sha256 of the model's weights, by content: a trained testbed model's checkpoint
    folder (``workbench.checkpoints_dir()/<kind>``: params, bank, card), every file; a local
    Stable Diffusion folder's weights and configs (``SD_WEIGHT_FOLDERS``); None for the
    closed-form models (no weights: the testbed fixes them) and a hub id that is not a local folder.
    Every byte is hashed, GBs for SD too: a fine-tune keeps the file sizes and safetensors headers,
    so sizes or the first and last MiB would miss it. The cost (~1 s/GB) is paid once per file and
    process (``_file_digest``'s cache per path, size and mtime)."""
    if config.sd is not None:
        src = config.sd.source
        return _files_digest(src, _sd_weight_files(src)) if os.path.isdir(src) else None
    if config.model in TRAINED:
        path = os.path.join(workbench.checkpoints_dir(), TRAINED[config.model])
        return _files_digest(path, _walk_files(path)) if os.path.isdir(path) else None
    return None


def _folder_digest(path: str | None) -> str | None:
    """A short sha256 of a folder's file names (relative) and sizes; None for no folder."""
    if path is None or not os.path.isdir(path):
        return None
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            p = os.path.join(root, f)
            h.update(f"{os.path.relpath(p, path)}\0{os.path.getsize(p)}\n".encode())
    return "sha256:" + h.hexdigest()[:20]


def sd_bench_settings(config: SweepConfig) -> dict:
    """``bench_settings`` of a Stable Diffusion sweep: the prompts (a digest), seeds, image size,
    dtype and the contents of the SSCD params, bank (+ captions), CLIP, Inception and reference
    images — everything the samples and metrics depend on besides the method."""
    sd = config.sd
    prompts = json.dumps([list(sd.prompts), list(sd.prompt_kinds)], ensure_ascii=False).encode()
    captions = sd.bank + ".captions.json"
    clip = None if sd.clip is None else (_folder_digest(sd.clip) if os.path.isdir(sd.clip) else sd.clip)
    return {"model": config.model, "testbed": None, "prompts_per_kind": config.prompts_per_kind,
            "samples_per_prompt": config.samples_per_prompt, "kinds": list(config.kinds), "seed": config.seed,
            "prompts": "sha256:" + hashlib.sha256(prompts).hexdigest()[:20], "num_prompts": len(sd.prompts),
            "height": sd.height, "width": sd.width, "dtype": sd.dtype, "sscd": _file_digest(sd.sscd),
            "bank": _file_digest(sd.bank), "captions": _file_digest(captions), "clip": clip,
            "inception": _file_digest(sd.inception), "reference_images": _folder_digest(sd.reference_images)}


def sd_cell_settings(config: SweepConfig, cell: Cell) -> dict:
    """``cell_settings`` of a Stable Diffusion cell: AMG's settings are ``sd_guidance.SD_AMG``
    updated by the cell's (the full AMGConfig; ``dedup`` off without captions beside the bank),
    its detector "sscd"; ``weights`` the digest of a local model folder (``weights_digest``)."""
    from amg_jax.sd_guidance import SD_AMG

    amg = cell.guidance == "amg"
    base = ("cfg" if cell.base == "auto" else cell.base) if amg else None
    scale_used = cell.guidance != "none" and not (amg and base == "none")
    scale = (cell.scale if cell.scale is not None else config.scale) if scale_used else None
    settings = dataclasses.asdict(AMGConfig(**dict(SD_AMG, **dict(cell.amg)))) if amg else None
    if amg and not os.path.isfile(config.sd.bank + ".captions.json"):
        settings["dedup"] = False                   # no captions: no y_N, G_dup is off (sd_guidance.method_guidance)
    return _jsonable(dict(
        bench_settings(config), weights=weights_digest(config), method=cell.method, guidance=cell.guidance, base=base,
        detector="sscd" if amg else None, scale=scale, sampler=cell.sampler, steps=cell.steps, amg=settings,
        baseline=cell.baseline, baseline_params=_baseline_settings(cell)))


def _jsonable(obj):
    """``obj`` as it reads back from JSON (tuples -> lists, numpy scalars -> Python, NaN / inf ->
    None: the files hold ``null`` there, ``jsonio.json_safe``), so a record kept in memory equals
    the one a resumed sweep reads back."""
    return json_safe(json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o))))


# ----------------------------------------------------------------------------- model backends

class CellRun(NamedTuple):
    """What a backend returns for one cell: ``metrics`` {kind: {...}} (and "all"), ``samples``
    [B, H, W, C], ``kinds`` / ``caption_ids`` [B], ``trace`` {name: [B, N]} (may be empty)."""

    metrics: dict
    samples: np.ndarray
    kinds: np.ndarray
    caption_ids: np.ndarray
    trace: dict
    seconds: float


class TestbedBackend:
    """The workbench models (trained UNets, empirical, mixture) on the sweep's bench; the model,
    bank and bench are built on first use (a sweep whose cells are all done builds nothing)."""

    def __init__(self, config: SweepConfig, *, echo=print):
        self.config, self.echo = config, echo
        self._ready = False

    def _setup(self):
        if self._ready:
            return
        c = self.config
        self.bed = workbench.build_testbed(resolve_testbed(c.testbed, [c.model]))
        self.denoiser = workbench.build_model(c.model, self.bed)
        self.bank = workbench.model_bank(c.model, self.bed)
        self.bench = workbench.prepare_bench(self.bed, c.prompts_per_kind, c.samples_per_prompt, c.seed, c.kinds,
                                             conditioning=model_kind(c.model),
                                             evaluator=workbench.bench_evaluator(self.bed))
        self._ready = True

    def bench_record(self) -> dict:
        """The bench's prompts, copy threshold, FD features and "true renders" metrics."""
        self._setup()
        b = self.bench
        truth = b.measure(b.truth)
        for kind, r in truth.items():
            r["count"] = int(len(b.kinds) if kind == "all" else np.sum(b.kinds == kind))
        return _jsonable({"format": BENCH_FORMAT, "settings": bench_settings(self.config), "threshold": b.threshold,
                          "fd_features": "evalnet" if b.evaluator is not None else "pooled pixels",
                          "image_size": self.bed.config.image_size, "conditioning": b.conditioning,
                          "prompts": {k: [int(i) for i in v] for k, v in b.prompts.items()}, "truth": truth})

    def _conditions(self, cell: Cell):
        """(denoiser, cond [B]) of a cell: the model's, or a prompt baseline's."""
        if cell.baseline is None:
            return self.denoiser, self.bench.cond
        fn = getattr(workbench, "baseline_conditions", None)
        if fn is None:
            raise ValueError("baselines need workbench.baseline_conditions")
        return fn(self.config.model, self.bed, self.bench, cell.baseline, dict(cell.baseline_params), self.config.seed)

    def run_cell(self, cell: Cell, settings: dict) -> CellRun:
        """Sample the cell on the bench's seeds and measure it (as experiments/trained_models.py)."""
        self._setup()
        b = self.bench
        den, cond = self._conditions(cell)
        scale = settings["scale"] if settings["scale"] is not None else DEFAULT_SCALE
        # under a prompt baseline the text UNet takes token conditions: y_N is the neighbour caption's tokens
        conds = (workbench.caption_conditions(self.config.model, self.bed)
                 if cell.baseline and cell.guidance == "amg" else None)
        g = method_guidance(cell.guidance, scale, bed=self.bed, bank=self.bank, base=settings["base"] or "cfg",
                            detector=settings["detector"] or "nl2", amg=settings["amg"], neighbour_conds=conds)
        t0 = time.time()
        res = sample_in_chunks(den, g, SamplerConfig(cell.sampler, num_steps=cell.steps), b.keys, cond,
                               self.config.chunk, sharded=jax.device_count() > 1)   # seeds over all devices
        x = np.asarray(res.x0)
        seconds = time.time() - t0
        if not np.all(np.isfinite(x)):
            self.echo(f"warning: {cell.id}: {int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())} samples "
                      "are not finite; clipped to [-1e3, 1e3] for the metrics")
        m = b.measure(np.clip(np.nan_to_num(x, nan=0.0), -1e3, 1e3))
        trace = {k: np.asarray(v) for k, v in res.trace.items()}
        for kind, r in m.items():
            sel = np.ones(len(x), bool) if kind == "all" else b.kinds == kind
            r["count"] = int(sel.sum())
            r["gate_open_rate"] = float(trace["gate"][sel].mean()) if "gate" in trace else None
            if "fallback" in trace:
                r["fallback_rate"] = float(trace["fallback"][sel].mean())
            if "transition" in trace:
                r["transition_mean"] = float(np.mean(trace["transition"][sel][:, -1]))
        return CellRun(metrics=m, samples=x, kinds=np.asarray(b.kinds), caption_ids=np.asarray(b.caption_ids),
                       trace={k: trace[k] for k in ("sigma", "lambda", "gate") if k in trace}, seconds=seconds)


@functools.lru_cache(maxsize=1)
def _load_sd(source: str, dtype: str):
    """The last Stable Diffusion loaded (one per process): a second sweep on the same model in a
    notebook reuses its weights and compiled functions."""
    from amg_jax.models.stable_diffusion import load_stable_diffusion

    return load_stable_diffusion(source, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _clipped_decoder(decode):
    """jit of ``sd_guidance.latent_decoder``'s ``decode`` clipped to [-1, 1] (= ``StableDiffusion.decode``),
    to run on latents sharded over the devices with the VAE params replicated there."""
    return jax.jit(lambda params, z: jax.numpy.clip(decode(params, z), -1.0, 1.0))


class StableDiffusionBackend:
    """Stable Diffusion ("sd:PATH_OR_HUB_ID") on the sweep's prompts: each prompt with
    ``samples_per_prompt`` seeds (its j-th sample has seed ``seed + j``, as ``amg sample``), in
    batches of ``batch`` seeds sharded over all devices (``sharding.sample_sharded``; the last
    batch padded, so one compilation), decoded to uint8 images and measured against the bank
    with SSCD (+ the CLIP score and FID when configured). The model, SSCD, bank and metric
    networks are loaded for the first cell (a sweep whose cells are all done loads nothing)."""

    def __init__(self, config: SweepConfig, *, echo=print):
        if config.sd is None:
            raise ValueError(f"StableDiffusionBackend: sweep model {config.model!r} is not a Stable Diffusion model")
        self.config, self.echo = config, echo
        self._ready = False
        self._amg = None           # (detector, neighbour conditions): built for the first AMG cell

    def bench_record(self) -> dict:
        """The prompts per kind and the copy criterion (no "true renders" row); loads nothing."""
        c, s = self.config, self.config.sd
        prompts = {k: [p for p, pk in zip(s.prompts, s.prompt_kinds) if pk == k] for k in c.kinds}
        return _jsonable({"format": BENCH_FORMAT, "settings": bench_settings(c), "threshold": SSCD_THRESHOLD,
                          "fd_features": "inception" if s.inception else None, "conditioning": "text",
                          "memorized": f"frac_sscd_above_{SSCD_THRESHOLD:g}", "prompts": prompts, "truth": None})

    def _setup(self):
        if self._ready:
            return
        from amg_jax.index import load_bank
        from amg_jax.index_build import sharded_embedder
        from amg_jax.models import stable_diffusion as sdm
        from amg_jax.samplers import keys_from_seeds
        from amg_jax.similarity import sscd

        c, s = self.config, self.config.sd
        self.sd = _load_sd(s.source, s.dtype)
        self.den = sdm.sd_denoiser(self.sd, s.height, s.width)
        from jax.sharding import NamedSharding, PartitionSpec

        from amg_jax.sd_guidance import latent_decoder
        from amg_jax.sharding import make_mesh

        self.vae_params = jax.device_put(self.sd.vae_params, NamedSharding(make_mesh(), PartitionSpec()))
        self.decode = functools.partial(_clipped_decoder(latent_decoder(self.sd)), self.vae_params)
        self.sscd_params, self.sscd_config = sscd.load_params(s.sscd)
        self.bank = load_bank(s.bank)
        rows = np.asarray(self.bank.rows, np.float32)[:self.bank.size]
        self.bank_rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        self.bank_source = np.asarray(self.bank.source_index)[:self.bank.size]
        self.embed = sharded_embedder(sscd.make_embed_fn(self.sscd_config), self.sscd_params)
        per = c.samples_per_prompt
        self.caption_ids = np.repeat(np.arange(len(s.prompts)), per)
        self.prompts = [s.prompts[i] for i in self.caption_ids]
        self.kinds = np.asarray([s.prompt_kinds[i] for i in self.caption_ids])
        self.keys = keys_from_seeds([c.seed + j for _ in s.prompts for j in range(per)])
        self.embeddings = self._encode(list(s.prompts))                          # [P, L, D]
        self.clip = self.inception = self.ref_feats = None
        if s.clip is not None:
            from amg_jax.similarity import clip

            self.clip = clip.load_clip(s.clip)
        if s.inception is not None:
            from amg_jax.index_build import list_images, load_image
            from amg_jax.similarity import inception

            self.inception = inception.load_params(s.inception)             # (variables, config)
            f = self.sd.vae_factor
            size = (self.den.sample_shape[0] * f, self.den.sample_shape[1] * f)
            refs = np.stack([load_image(os.path.join(s.reference_images, name), size)
                             for name in list_images(s.reference_images)])
            self.ref_feats = inception.compute_features(self.inception[0], refs, self.inception[1],
                                                        batch_size=c.chunk, clip=True)
        self._ready = True

    def _encode(self, prompts: list) -> jax.Array:
        from amg_jax.models.stable_diffusion import encode_prompts

        return encode_prompts(self.sd, prompts)

    def _amg_parts(self):
        """AMG's SSCD detector through the VAE and its G_dup conditions (the bank's captions)."""
        if self._amg is None:
            from amg_jax import sd_guidance as sg
            from amg_jax.index_build import load_captions

            det = sg.latent_detector(self.sd, "sscd", (self.sscd_params, self.sscd_config), self.bank)
            bank = self.config.sd.bank          # a damaged captions file raises (naming it); a missing one: no G_dup
            captions = load_captions(bank) if os.path.isfile(bank + ".captions.json") else []
            conds = sg.bank_conditions(self.sd, captions) if captions else None
            if conds is None:
                self.echo(f"note: {bank} has no captions beside it: AMG's caption deduplication (G_dup) is off")
            self._amg = (det, conds)
        return self._amg

    def _conditions(self, cell: Cell):
        """``cond_of(index [b]) -> [b, L, D]``: the text embeddings of samples ``index``, with the
        cell's prompt baseline, per-sample streams seeded by the sweep's seed as ``apply_baseline``
        (GNI: a ``WithNull`` of both noisy CFG branches, unless branches="cond")."""
        params = dict(cell.baseline_params)
        if cell.baseline is None:
            return lambda idx: self.embeddings[self.caption_ids[idx]]
        if cell.baseline in EMBEDDING_BASELINES:    # row i's streams from the global sample number i (gni_rows)
            null = self.sd.null_embedding
            return lambda idx: gni_rows(self.config.seed, self.embeddings[self.caption_ids[idx]], null=null,
                                        index=np.asarray(idx, np.int32), **params)
        edited = apply_baseline(cell.baseline, self.prompts, self.config.seed, **params)
        return lambda idx: self._encode([edited[i] for i in idx])

    def run_cell(self, cell: Cell, settings: dict) -> CellRun:
        """Sample the cell's prompts x seeds, decode, measure (SSCD to the bank, CLIP score, FID)."""
        from amg_jax import sd_guidance as sg
        from amg_jax import sharding
        from amg_jax.metrics import frechet_distance, similarity_report
        from amg_jax.models.stable_diffusion import sd_sampler_config
        from amg_jax.similarity.inception import span_projection

        self._setup()
        c = self.config
        det, conds = self._amg_parts() if cell.guidance == "amg" else (None, None)
        scale = settings["scale"] if settings["scale"] is not None else c.scale
        g = sg.method_guidance(cell.guidance, scale, detector=det, neighbour_conds=conds,
                               base=settings["base"] or "cfg", amg=dict(cell.amg))
        sampler = sd_sampler_config(self.sd, cell.steps, cell.sampler)
        cond_of = self._conditions(cell)
        n, b = len(self.prompts), c.chunk
        out = {k: [] for k in ("x", "sim", "nn", "clip", "feats", "trace")}
        seconds, bad = 0.0, 0
        for lo in range(0, n, b):
            idx = np.minimum(np.arange(lo, lo + b), n - 1)          # the last batch padded with its last seed
            m = min(b, n - lo)
            t0 = time.time()
            res = sharding.sample_sharded(self.den, g, sampler, self.keys[idx], cond_of(idx))
            pix = np.asarray(self.decode(res.x0))                   # [b, H, W, 3] in [-1, 1], on all devices
            seconds += time.time() - t0
            finite = np.isfinite(pix).reshape(b, -1).all(axis=1)
            bad += int(np.sum(~finite[:m]))
            u8 = img.to_uint8(np.nan_to_num(pix, nan=0.0))
            x = u8.astype(np.float32) / 127.5 - 1.0                 # the stored image is what is measured
            e = self.embed(x)
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            sims = e @ self.bank_rows.T
            out["x"].append(u8[:m])
            out["sim"].append(np.max(sims, axis=1)[:m])
            out["nn"].append(self.bank_source[np.argmax(sims, axis=1)][:m])
            if self.clip is not None:
                from amg_jax.similarity.clip import clip_score

                out["clip"].append(np.asarray(clip_score(self.clip, x, [self.prompts[i] for i in idx]))[:m])
            if self.inception is not None:
                from amg_jax.similarity.inception import compute_features

                out["feats"].append(compute_features(self.inception[0], x, self.inception[1], batch_size=b)[:m])
            out["trace"].append({k: np.asarray(v)[:m] for k, v in res.trace.items()})
        if bad:
            self.echo(f"warning: {cell.id}: {bad} samples are not finite; their NaN pixels are stored as 0 (gray)")
        cat = {k: np.concatenate(v) for k, v in out.items() if v and k != "trace"}
        trace = {k: np.concatenate([t[k] for t in out["trace"]]) for k in out["trace"][0]}
        groups = [(k, self.kinds == k) for k in c.kinds] if len(c.kinds) > 1 else []
        metrics = {}
        for kind, sel in groups + [("all", np.ones(n, bool))]:
            r = similarity_report(cat["sim"][sel], SSCD_THRESHOLD, SSCD_STRICT, name="sscd")
            r["count"] = int(sel.sum())
            r["frac_copied"] = r[f"frac_sscd_above_{SSCD_THRESHOLD:g}"]
            r["fd"] = (frechet_distance(*span_projection(cat["feats"][sel], self.ref_feats))
                       if "feats" in cat and sel.sum() >= 2 else float("nan"))
            if "clip" in cat:
                r["clip_score"] = float(np.mean(cat["clip"][sel]))
            r["gate_open_rate"] = float(trace["gate"][sel].mean()) if "gate" in trace else None
            if "fallback" in trace:
                r["fallback_rate"] = float(trace["fallback"][sel].mean())
            if "transition" in trace:
                r["transition_mean"] = float(np.mean(trace["transition"][sel][:, -1]))
            metrics[kind] = r
        kept = {k: trace[k] for k in ("sigma", "lambda", "gate") if k in trace}
        kept.update(sscd_similarity=cat["sim"], sscd_nearest=cat["nn"])
        return CellRun(metrics=metrics, samples=cat["x"], kinds=self.kinds, caption_ids=self.caption_ids,
                       trace=kept, seconds=seconds)


def make_backend(config: SweepConfig, *, echo=print):
    """The backend of the sweep's model (raises for one that cannot run)."""
    cls = StableDiffusionBackend if config.model.startswith(SD_PREFIX) else TestbedBackend
    return cls(config, echo=echo)


# ----------------------------------------------------------------------------- cell files

def _cell_paths(out: str, cid: str) -> tuple[str, str]:
    return os.path.join(out, "cells", cid + ".json"), os.path.join(out, "cells", cid + ".npz")


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cell_status(out: str, cid: str, settings: dict) -> tuple[str, Any]:
    """("done", record) when the cell's JSON and samples exist with these settings; ("stale",
    differing setting names) when they hold other settings; ("new", None) otherwise."""
    jpath, npath = _cell_paths(out, cid)
    rec = _read(jpath) if os.path.exists(jpath) else None
    if not isinstance(rec, dict) or "settings" not in rec or "metrics" not in rec:
        return ("stale", ["unreadable file"]) if os.path.exists(jpath) else ("new", None)
    stored = rec["settings"]
    if stored != settings:
        keys = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        return "stale", keys
    if not os.path.exists(npath):
        return "stale", ["samples file missing"]
    return "done", rec


def _write_cell(out: str, cell: Cell, rec: dict, run: CellRun) -> None:
    """Samples first, then the JSON (its presence marks the cell done); both atomic. A metric
    not defined for a group (NaN: the FD / FID of fewer than 2 samples, the alignment of an
    unconditional model) is ``null`` in the JSON, since NaN is not JSON; the tables show it as "-"."""
    jpath, npath = _cell_paths(out, cell.id)
    x = run.samples if run.samples.dtype == np.uint8 else run.samples.astype(np.float16)   # SD: uint8 images
    arrays = {"x": x, "kinds": run.kinds.astype(str),
              "caption_ids": run.caption_ids.astype(np.int32)}
    arrays.update({k: (v if k == "gate" else v.astype(np.float32)) for k, v in run.trace.items()})
    write_atomic(npath, lambda f: np.savez(f, **arrays), binary=True)
    write_json(jpath, rec, indent=1)


# ----------------------------------------------------------------------------- running

def _writer() -> bool:
    return jax.process_index() == 0


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, unit="cell", dynamic_ncols=True)


def _line(i: int, n: int, cell: Cell, m: dict, seconds: float) -> str:
    r = m["all"]
    gate = r.get("gate_open_rate")
    if "sscd_mean" in r:                        # Stable Diffusion
        clip = r.get("clip_score")
        return (f"[{i}/{n}] {cell.id}: SSCD>{SSCD_THRESHOLD:g} {r['frac_copied']:.1%}  SSCD mean {r['sscd_mean']:.3f}"
                f"  FID {_fd(r['fd'])}" + (f"  CLIP {clip:.2f}" if clip is not None else "")
                + (f"  gate {gate:.1%}" if gate is not None else "") + f"  ({seconds:.1f} s)")
    return (f"[{i}/{n}] {cell.id}: copied {r['frac_copied']:.1%}  nL2<1.4 {r['frac_nl2_below_1.4']:.1%}  "
            f"FD {_fd(r['fd'])}  align {_pct(r['alignment'])}  out {r['frac_out_of_range']:.1%}"
            + (f"  gate {gate:.1%}" if gate is not None else "") + f"  ({seconds:.1f} s)")


def run_sweep(config: SweepConfig, *, progress: bool = True, echo=print) -> dict:
    """Run every cell of ``config`` not done yet, then write the results (module docstring);
    returns the results table (``build_results``)."""
    writer = _writer()
    say = echo if writer else (lambda *a, **k: None)
    settings = {c.id: cell_settings(config, c) for c in config.cells}
    status = {c.id: cell_status(config.out, c.id, settings[c.id]) for c in config.cells}
    todo = [c for c in config.cells if status[c.id][0] != "done"]
    if (config.sd is None and any(c.baseline for c in todo)
            and getattr(workbench, "baseline_conditions", None) is None):
        raise ValueError("baselines need workbench.baseline_conditions (cells "
                         f"{[c.id for c in todo if c.baseline]})")
    bench_path = os.path.join(config.out, "bench.json")
    bench = _read(bench_path) if os.path.exists(bench_path) else None
    if not (isinstance(bench, dict) and bench.get("settings") == _jsonable(bench_settings(config))):
        bench = None
    bar = _progress_bar(len(config.cells), progress and writer)
    if progress and writer and echo is print:      # lines above the bar, not through it
        say = bar.write
    n = len(config.cells)
    records, failures = {}, {}
    try:
        backend = make_backend(config, echo=say) if todo or bench is None else None
        say(f"sweep {config.name}: {config.model}, {n} cells ({n - len(todo)} done before) -> {config.out}")
        if bench is None:
            bench = backend.bench_record()
            if writer:
                write_json(bench_path, bench, indent=1)
        for i, cell in enumerate(config.cells, 1):
            state, info = status[cell.id]
            if state == "done":
                records[cell.id] = info
                say(f"[{i}/{n}] {cell.id}: done before, skipped")
                bar.update(1)
                continue
            if state == "stale":
                say(f"warning: [{i}/{n}] {cell.id}: the stored cell has other settings ({', '.join(info)}); re-running")
            bar.set_description(cell.id)
            try:
                run = backend.run_cell(cell, settings[cell.id])
            except Exception as e:          # keep going: the other cells are still worth having
                failures[cell.id] = e
                say(f"[{i}/{n}] {cell.id}: FAILED: {type(e).__name__}: {e}")
                bar.update(1)
                continue
            rec = _jsonable({"format": CELL_FORMAT, "cell": cell.id, "method": cell.method, "label": cell.label,
                             "grid": dict(cell.grid), "settings": settings[cell.id], "metrics": run.metrics,
                             "seconds": round(run.seconds, 3), "chunk": config.chunk})
            if writer:
                _write_cell(config.out, cell, rec, run)
            records[cell.id] = rec
            say(_line(i, n, cell, rec["metrics"], run.seconds))
            bar.update(1)
    finally:
        bar.close()
    table = build_results(config, bench, records)
    if writer:
        paths = write_results(config, bench, records, table)
        say(f"wrote {', '.join(os.path.relpath(p, config.out) for p in paths)} in {config.out}")
    if failures:
        raise SweepError(f"sweep {config.name}: {len(failures)} of {n} cells failed (the others are written; "
                         "re-run to retry them): " + "; ".join(f"{k}: {type(e).__name__}: {e}"
                                                             for k, e in failures.items()), failures)
    return table


def main(config_path, *, progress: bool = True, echo=print) -> dict:
    """`amg sweep CONFIG`: validate the config (before any work), run it, return the results
    table (``build_results``)."""
    return run_sweep(load_config(config_path), progress=progress, echo=echo)


# ----------------------------------------------------------------------------- results

# CSV columns after the cell's settings and grid: these metrics first, then any others sorted.
METRIC_COLUMNS = ("count", "frac_copied", "frac_nl2_below_1.4", "nl2_median", "nl2_top5pct", "nl2_top1", "fd",
                  "alignment", "frac_out_of_range", "gate_open_rate")
SETTING_COLUMNS = ("guidance", "base", "detector", "baseline", "scale", "sampler", "steps")
# ... for Stable Diffusion: frac_copied = frac_sscd_above_0.5, fd = FID (NaN without inception)
SD_METRIC_COLUMNS = ("count", "frac_copied", "frac_sscd_above_0.5", "frac_sscd_above_0.4", "sscd_mean",
                     "sscd_median", "sscd_top5pct", "sscd_top1", "fd", "clip_score", "gate_open_rate")


def build_results(config: SweepConfig, bench: dict, records: dict) -> dict:
    """The results table from the bench and cell records: ``rows`` (one per cell and kind, the
    CSV's), ``cells`` {id: record}, ``truth`` (the true renders' metrics) and the bench facts."""
    cells = [c for c in config.cells if c.id in records]
    columns = SD_METRIC_COLUMNS if config.model.startswith(SD_PREFIX) else METRIC_COLUMNS
    axes = list(dict.fromkeys(a for c in cells for a, _ in c.grid if a not in SETTING_COLUMNS))
    extra = sorted({k for c in cells for r in records[c.id]["metrics"].values() for k in r} - set(columns))
    rows = []
    for c in cells:
        rec = records[c.id]
        s = rec["settings"]
        for kind, r in rec["metrics"].items():
            row = {"cell": c.id, "method": c.method}
            row.update({k: s.get(k) for k in SETTING_COLUMNS})
            for key in ("amg", "baseline_params"):          # the full settings, as compact JSON
                row[key] = json.dumps(s[key], sort_keys=True) if s.get(key) else None
            row.update({a: dict(c.grid).get(a) for a in axes})
            row["kind"] = kind
            row.update({k: r.get(k) for k in columns + tuple(extra)})
            row["seconds"] = rec.get("seconds")
            rows.append(row)
    return {"name": config.name, "model": config.model, "out": config.out, "threshold": bench.get("threshold"),
            "fd_features": bench.get("fd_features"), "prompts": bench.get("prompts"), "truth": bench.get("truth"),
            "cells": {c.id: records[c.id] for c in cells}, "rows": rows,
            "missing": [c.id for c in config.cells if c.id not in records]}


def results_csv(table: dict) -> str:
    """The rows as CSV text (floats at full precision; None, a metric that is not defined or does
    not apply (``null`` in the cell files), as empty; a NaN of an older cell file as ``nan``)."""
    rows = table["rows"]
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def _fd(v) -> str:
    return "-" if v is None or v != v else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.1e}")


def results_markdown(table: dict) -> str:
    """A markdown table per kind group (each kind side by side, then all prompts), one row per
    cell after the true renders, the columns of experiments/table_md.py (Stable Diffusion:
    ``sd_results_markdown``)."""
    if table["model"].startswith(SD_PREFIX):
        return sd_results_markdown(table)
    truth = table["truth"] or {}
    kinds = [k for k in truth if k != "all"]
    rows = [("true renders", truth)] + [(rec["label"], rec["metrics"]) for rec in table["cells"].values()]
    parts = [f"# sweep {table['name']}: {table['model']}\n"]
    parts += _kind_tables(
        kinds, rows,
        lambda ks: f"| method | copied {ks} | nL2<1.4 {ks} | FD {ks} | align {ks} | out of range | gate open |",
        lambda label, per, overall: (
            f"| {label} | {per('frac_copied', _pct)} | {per('frac_nl2_below_1.4', _pct)} | "
            f"{per('fd', _fd)} | {per('alignment', _pct)} | "
            f"{_pct(overall.get('frac_out_of_range'))} | {_pct(overall.get('gate_open_rate'))} |"))
    counts = {k: truth[k].get("count") for k in kinds} if truth else {}
    settings = {(s["sampler"], s["steps"], s["scale"]) for s in (r["settings"] for r in table["cells"].values())}
    parts.append(f"{table['model']}: samples per kind {counts}, copy threshold {table['threshold']:.3f}, FD on "
                 f"{table['fd_features']}; sampler / steps / scale: "
                 + ", ".join(f"{a} {b} {_scale_text(c)}" for a, b, c in sorted(settings, key=str))
                 + (f"\n\nnot done: {', '.join(table['missing'])}" if table["missing"] else ""))
    return "\n".join(parts) + "\n"


def _scale_text(scale) -> str:
    """A cell's guidance scale for a table footer ("unguided" for a model sampled without guidance)."""
    return "unguided" if scale is None else str(scale)


def _kind_tables(kinds: list, rows: list, header, line) -> list:
    """The markdown tables of a results page: one over the prompt kinds (when there are several),
    one over all prompts. ``rows``: (label, metrics by kind); ``header(ks)`` the header line for
    the kinds' label ``ks`` ("a / b"); ``line(label, per, overall)`` one row, ``per(key, fmt)``
    giving the kinds' values of ``key`` joined by " / ", ``overall`` the "all" metrics."""
    groups = [(kinds, "per prompt kind")] if len(kinds) > 1 else []
    tables = []
    for group, title in groups + [(["all"], "all prompts")]:
        head = header(" / ".join(group))
        out = [f"## {title}\n", head, "|" + "---|" * (head.count("|") - 1)]
        for label, m in rows:
            per = lambda key, f, m=m: " / ".join(f(m.get(k, {}).get(key)) for k in group)  # noqa: E731
            out.append(line(label, per, m.get("all", {})))
        tables.append("\n".join(out) + "\n")
    return tables


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def sd_results_markdown(table: dict) -> str:
    """``results_markdown`` of a Stable Diffusion sweep: per kind group, the memorized share
    (SSCD > 0.5) and mean SSCD per kind, then FID, CLIP score and AMG's gate rate over all prompts."""
    prompts = table["prompts"] or {}
    kinds = list(prompts)
    rows = [(rec["label"], rec["metrics"]) for rec in table["cells"].values()]
    parts = [f"# sweep {table['name']}: {table['model']}\n"]
    t = f"{table['threshold']:g}"
    parts += _kind_tables(
        kinds, rows,
        lambda ks: f"| method | SSCD>{t} {ks} | SSCD mean {ks} | FID (all) | CLIP score (all) | gate open |",
        lambda label, per, overall: (
            f"| {label} | {per('frac_copied', _pct)} | {per('sscd_mean', _num)} | {_fd(overall.get('fd'))} | "
            f"{_num(overall.get('clip_score'), '.2f')} | {_pct(overall.get('gate_open_rate'))} |"))
    counts = {k: len(v) for k, v in prompts.items()}
    settings = {(s["sampler"], s["steps"], s["scale"]) for s in (r["settings"] for r in table["cells"].values())}
    per_prompt = next((r["settings"]["samples_per_prompt"] for r in table["cells"].values()), None)
    parts.append(f"{table['model']}: prompts per kind {counts}, {per_prompt} samples per prompt; memorized = SSCD "
                 f"cosine to the nearest bank image > {t}; FID on "
                 f"{table['fd_features'] or '- (no sweep.inception)'}; sampler / steps / scale: "
                 + ", ".join(f"{a} {b} {_scale_text(c)}" for a, b, c in sorted(settings, key=str))
                 + (f"\n\nnot done: {', '.join(table['missing'])}" if table["missing"] else ""))
    return "\n".join(parts) + "\n"


def results_json(table: dict) -> dict:
    """The table in experiments/table_md.py's input format ({"_meta", label: {spec, metrics}})."""
    out = {"_meta": {"model": table["model"], "threshold": table["threshold"], "fd_features": table["fd_features"],
                     "sweep": table["name"]},
           "true renders": {"spec": {}, "metrics": table["truth"]}}
    if table["truth"] is None:                  # Stable Diffusion: no true renders
        del out["true renders"]
    for rec in table["cells"].values():
        out[rec["label"]] = {"spec": rec["settings"], "metrics": rec["metrics"], "cell": rec["cell"]}
    return out


def _load_samples(out: str, cid: str) -> dict:
    with np.load(_cell_paths(out, cid)[1]) as z:
        return {k: z[k] for k in z.files}


def cell_grid(z: dict, *, per_kind: int = 8, label: str = "") -> np.ndarray:
    """uint8 grid of a cell's samples: a row per prompt kind, its first ``per_kind`` samples."""
    x = np.asarray(z["x"])
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else np.nan_to_num(x.astype(np.float32), nan=0.0)
    if x.shape[1] > 256:                        # Stable Diffusion's 512 px: 2x2 (or more) mean-pooled
        f = -(-x.shape[1] // 256)
        h, w = x.shape[1] // f * f, x.shape[2] // f * f
        x = x[:, :h, :w].reshape(x.shape[0], h // f, f, w // f, f, x.shape[3]).mean(axis=(2, 4))
    kinds = list(dict.fromkeys(z["kinds"].tolist()))
    ncol = min(per_kind, max(int(np.sum(z["kinds"] == k)) for k in kinds))
    blank = np.ones(x.shape[1:], np.float32)
    rows = []
    for k in kinds:
        sel = x[z["kinds"] == k][:ncol]
        rows += list(sel) + [blank] * (ncol - len(sel))
    size = x.shape[1]
    up = max(1, 64 // size)
    grid = img.image_grid(np.stack(rows), ncol=ncol, upscale=up)
    return img.label_rows(grid, kinds, cell=size * up, header=label or None)


def _savefig(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    write_atomic(path, lambda f: fig.savefig(f, format="png"), binary=True)
    plt.close(fig)
    return path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_similarity_cells(traces: dict, path: str, *, max_samples: int = 8) -> str:
    """AMG's similarity sigma_t of a few samples vs the gate threshold lambda_t over the steps,
    a panel per cell (``traces`` {label: {"sigma", "lambda", "gate"} [B, N]}): evaluate.plot_similarity
    side by side."""
    plt = _pyplot()
    n = len(traces)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.2 * nrow), dpi=100, squeeze=False)
    from amg_jax.evaluate import draw_similarity

    for ax, (label, t) in zip(axes.ravel(), traces.items()):
        draw_similarity(ax, t, max_samples=max_samples, fontsize=8)
        ax.set_title(label, fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _savefig(fig, path)


def plot_tradeoff(table: dict, path: str) -> str:
    """Memorized fraction vs FD over all prompts, a labelled point per cell (and the true renders)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    pts = [(rec["label"], rec["metrics"]["all"]) for rec in table["cells"].values()]
    truth = (table["truth"] or {}).get("all")
    xkey, xlabel = "fd", f"FD (all prompts, {table['fd_features']}; lower is better)"
    if table["model"].startswith(SD_PREFIX):
        xlabel = "FID (all prompts, Inception; lower is better)"
        if (not any(r.get("fd") is not None and np.isfinite(r["fd"]) for _, r in pts)
                and any("clip_score" in r for _, r in pts)):
            xkey, xlabel = "clip_score", "CLIP score (all prompts; higher is better)"
    xs = []
    for i, (label, r) in enumerate(pts + ([("true renders", truth)] if truth else [])):
        fd, copied = r.get(xkey), r.get("frac_copied")
        if fd is None or copied is None or not (np.isfinite(fd) and np.isfinite(copied)):
            continue
        xs.append(fd)
        marker = "*" if label == "true renders" else "o"
        ax.scatter([fd], [100 * copied], marker=marker, s=60 if marker == "*" else 25,
                   color="k" if marker == "*" else None)
        ax.annotate(label, (fd, 100 * copied), fontsize=7, xytext=(3, 3 - 10 * (i % 3)),   # staggered: close
                    textcoords="offset points")                                          # points stay legible
    if xs and min(xs) > 0 and max(xs) / min(xs) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("memorized (% copied; lower is better)" if xkey == "fd" and not table["model"].startswith(SD_PREFIX)
                  else f"memorized (% SSCD > {table['threshold']:g}; lower is better)")
    ax.set_title(f"{table['name']}: {table['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _savefig(fig, path)


def write_results(config: SweepConfig, bench: dict, records: dict, table: dict | None = None) -> list:
    """Write results.csv / .md / .json, grids/<id>.png and the plots from the cell files; the paths."""
    table = table or build_results(config, bench, records)
    out = config.out
    paths = [write_atomic(os.path.join(out, "results.csv"), lambda f: f.write(results_csv(table))),
             write_atomic(os.path.join(out, "results.md"), lambda f: f.write(results_markdown(table))),
             write_json(os.path.join(out, "results.json"), results_json(table), indent=1)]
    traces = {}
    for cid, rec in table["cells"].items():
        z = _load_samples(out, cid)
        paths.append(img.save_png(os.path.join(out, "grids", cid + ".png"), cell_grid(z, label=rec["label"])))
        if "sigma" in z:
            traces[rec["label"]] = z
    if traces:
        paths.append(plot_similarity_cells(traces, os.path.join(out, "plots", "similarity.png")))
    if table["cells"]:
        paths.append(plot_tradeoff(table, os.path.join(out, "plots", "tradeoff.png")))
    return paths


__all__ = ["Cell", "CellRun", "SDSettings", "SD_SWEEP_KEYS", "SweepConfig", "SweepError", "StableDiffusionBackend",
           "TestbedBackend", "bench_settings", "build_results", "cell_id", "cell_settings", "cell_status",
           "load_config", "main", "make_backend", "parse_config", "plot_similarity_cells", "plot_tradeoff",
           "read_prompts", "results_csv", "results_json", "results_markdown", "run_sweep", "sd_bench_settings",
           "sd_cell_settings", "sd_results_markdown", "weights_digest", "write_results"]
