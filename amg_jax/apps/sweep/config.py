"""The sweep config: the TOML schema (``[sweep]`` / ``[[method]]`` keys, the Stable Diffusion
keys), its validation (``parse_config`` / ``load_config``: a ValueError naming the key) and the
grid of ``Cell``s it gives (the format: ``amg_jax.apps.sweep``'s docstring)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import tomllib

import numpy as np

from amg_jax.apps.evaluate import DETECTORS
from amg_jax.apps.screens import SCREEN_CHOICES
from amg_jax.apps.models import DEFAULT_SCALE, MODELS, SD_PREFIX, TESTBEDS, get_model, is_sd, model_spec
from amg_jax.checks import is_int as _is_int
from amg_jax.checks import is_number as _is_number
from amg_jax.data import testbed as tb
from amg_jax.guidance import GUIDANCES, METHODS
from amg_jax.guidance.amg import AMGConfig
from amg_jax.guidance.registry import SCREENABLE_BASIN
from amg_jax.guidance.screen import SCREENS
from amg_jax.index import FORMAT as BANK_FORMAT
from amg_jax.index_build import list_images
from amg_jax.models import stable_diffusion as sdm
from amg_jax.prompt_baselines import (EMBEDDING_BASELINES, GNI_BRANCHES, PROMPT_BASELINES, apply_baseline,
                                      baseline_params)
from amg_jax.samplers import SAMPLERS
from amg_jax.sd_amg import SD_AMG
from amg_jax.evaluation import inception as _inception
from amg_jax.similarity import sscd as _sscd

GUIDANCE_NAMES = METHODS
BASELINES = tuple(PROMPT_BASELINES)
AMG_FIELDS = tuple(f.name for f in dataclasses.fields(AMGConfig))
CELL_FORMAT = "amg_jax.sweep_cell/1"
BENCH_FORMAT = "amg_jax.sweep_bench/1"

# [sweep] keys and their defaults (REQUIRED: must be given).
REQUIRED = object()
SWEEP_KEYS = {"name": None, "model": REQUIRED, "testbed": "auto", "prompts_per_kind": REQUIRED,
              "samples_per_prompt": REQUIRED, "kinds": tb.KINDS, "seed": 0, "sampler": "ddim", "steps": 50,
              "scale": None, "chunk": 16, "out": None}
# [[method]] scalar keys, in the order their grid values appear in a cell id; then amg.*, baseline_params.*
METHOD_SCALARS = ("guidance", "base", "detector", "baseline", "scale", "steps", "sampler", "screen", "screen_threshold")
METHOD_KEYS = ("name",) + METHOD_SCALARS + ("amg", "baseline_params")
AMG_ONLY = ("base", "detector")          # (and every amg.* axis)
# [sweep] keys of a Stable Diffusion model ("sd:PATH_OR_HUB_ID") and their defaults (the package docstring).
SD_SWEEP_KEYS = {"name": None, "model": REQUIRED, "prompts_file": REQUIRED, "prompts_per_kind": None,
                 "samples_per_prompt": REQUIRED, "kinds": None, "seed": 0, "sampler": "ddim", "steps": 50,
                 "scale": DEFAULT_SCALE, "batch": 8, "out": None, "sscd": REQUIRED, "bank": REQUIRED, "clip": None,
                 "inception": None, "reference_images": None, "height": None, "width": None, "dtype": "float32"}
SD_KIND = "prompts"                     # the kind of every prompt of a plain-text prompts file
SSCD_THRESHOLD, SSCD_STRICT = 0.5, 0.4  # the papers' copy criterion: SSCD cosine > 0.5
CI_BOOT = 1000                           # bootstrap resamples (over prompts) of the SD tables' intervals


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
    screen: str = "none"                  # "none" (every-step AMG), "auto" or a screen name (apps.screens)
    screen_threshold: float | None = None

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
        "screen": (lambda x: x in SCREEN_CHOICES, f"one of {list(SCREEN_CHOICES)}"),
        "screen_threshold": (lambda x: _is_number(x), "a finite number"),
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
    spec = model_spec(model)
    conditioning = spec.conditioning
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
        if baseline is not None and not spec.has_text_encoder:
            text_models = [n for n in MODELS if get_model(n).has_text_encoder]
            fail("baseline", f"{baseline!r} perturbs captions; it needs a model with a text encoder "
                             f"({', '.join(text_models)} or 'sd:PATH'), not {model!r}")
        screen, screen_thr = d.get("screen", "none"), d.get("screen_threshold")
        if screen == "auto" and guidance != "amg":        # auto: where a calibrated screen holds, i.e. AMG
            screen = "none"
        if screen != "none" and guidance != "amg" and guidance not in SCREENABLE_BASIN:
            fail("screen", f"{screen!r} gates AMG's bank search (or, by name, the switch of "
                           f"{list(SCREENABLE_BASIN)}); guidance {guidance!r} has nothing to gate")
        if screen_thr is not None and screen in ("none", "auto"):
            fail("screen_threshold", f"needs screen = NAME (one of {list(SCREENS)}), got screen {screen!r}")
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
                          baseline_params=params, grid=grid, screen=screen,
                          screen_threshold=None if screen_thr is None else float(screen_thr)))
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
    if not isinstance(model, str) or not (model in MODELS or is_sd(model)):
        fail("model", f"must be one of {list(MODELS)} or 'sd:PATH', got {model!r}")
    if not isinstance(s["name"], str) or not s["name"].strip():
        fail("name", f"must be a non-empty string, got {s['name']!r}")
    if not isinstance(s["out"], str) or not s["out"].strip():
        fail("out", f"must be a non-empty path string, got {s['out']!r}")
    for key in ("testbed", "sampler"):
        allowed = TESTBEDS + ("auto",) if key == "testbed" else SAMPLERS
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
    return bool(sdm.HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


def _npz_text(path: str, key: str) -> str | None:
    """The string entry ``key`` of an ``.npz`` (read alone, not the whole file); None if absent."""
    with np.load(path, allow_pickle=False) as z:
        return str(z[key]) if key in z.files else None


def read_prompts(path: str) -> list[tuple[str, str]]:
    """``(prompt, kind)`` pairs of a prompts file: ``.jsonl`` lines ``{"prompt": ..., "kind": ...}``
    (``"caption"`` for ``"prompt"`` also: Wen et al.'s lists; ``kind`` optional: ``SD_KIND``), any other file one prompt per line; blank lines skipped.
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
        prompt = (obj.get("prompt", obj.get("caption")) if isinstance(obj, dict) else None)
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{path} line {i}: expected {{"prompt": "non-empty text", "kind": "..."}} (or '
                             f'"caption", as sdv1_500_memorized.jsonl), got {line[:80]}')
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
    """AMG settings Stable Diffusion cannot take: invalid over ``sd_amg.SD_AMG``, or gate
    thresholds outside the SSCD cosine's range."""
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

    sd = is_sd(s.get("model"))
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
    """Read and validate a sweep TOML file (see ``amg_jax.apps.sweep``'s docstring). Raises
    FileNotFoundError for a missing file, ValueError naming the key (or the TOML line) for anything wrong."""
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
