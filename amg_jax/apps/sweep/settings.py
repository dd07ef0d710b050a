"""A cell's resolved settings (what decides its samples: a stored cell with equal settings is
not run again) and the content digests in them (model weights, SD prompts / files / folders)."""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os

from amg_jax.apps.models import get_model, is_sd, model_spec, resolve_testbed
from amg_jax.apps.sweep.config import Cell, SweepConfig
from amg_jax.apps.screens import MODEL_SCREEN, model_screen, read_bank_screen, resolve_screen
from amg_jax.guidance.amg import AMGConfig
from amg_jax.guidance.screen import get_screen
from amg_jax.index_build import captions_path, has_captions
from amg_jax.jsonio import json_safe
from amg_jax.prompt_baselines import BASELINE_DEFAULTS


def bench_settings(config: SweepConfig) -> dict:
    """What fixes the bench (prompts, seeds, references): part of every cell's settings."""
    if config.sd is not None:
        return sd_bench_settings(config)
    testbed = None if is_sd(config.model) else resolve_testbed(config.testbed, [config.model])
    return {"model": config.model, "testbed": testbed, "prompts_per_kind": config.prompts_per_kind,
            "samples_per_prompt": config.samples_per_prompt, "kinds": list(config.kinds), "seed": config.seed}


def cell_settings(config: SweepConfig, cell: Cell) -> dict:
    """Everything that decides a cell's samples, resolved ("auto" -> the model's choice, the
    full AMGConfig), and ``weights``, the content digest of the model's weights
    (``weights_digest``): a stored cell with equal settings is not run again, so a retrained
    checkpoint re-runs its cells. (``chunk`` is left out: it changes how seeds are batched, not
    the samples.)"""
    if config.sd is not None:
        return sd_cell_settings(config, cell)
    spec = get_model(config.model)
    amg = cell.guidance == "amg"
    base = (spec.base if cell.base == "auto" else cell.base) if amg else None
    scale_used = cell.guidance not in ("none",) and not (amg and base == "none")
    scale = spec.scale(cell.scale) if scale_used else None     # a trained model's card scale: no weights loaded
    return _jsonable(dict(
        bench_settings(config), weights=weights_digest(config), method=cell.method, guidance=cell.guidance, base=base,
        detector=(spec.detector if cell.detector == "auto" else cell.detector) if amg else None,
        scale=scale, sampler=cell.sampler, steps=cell.steps,
        amg=dataclasses.asdict(AMGConfig(**spec.amg_settings(dict(cell.amg)))) if amg else None,
        baseline=cell.baseline, baseline_params=_baseline_settings(cell),
        **_screen_settings(cell, model_screen(spec))))


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
# of the networks (SDXL: four), the scheduler and tokenizer configs and model_index.json (not the safety
# checker, feature extractor, README, ...).
SD_WEIGHT_FOLDERS = ("unet", "vae", "text_encoder", "text_encoder_2")
SD_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".msgpack", ".json")
SD_CONFIG_FOLDERS = ("scheduler", "tokenizer", "tokenizer_2")


def _sd_weight_files(path: str) -> list:
    """``weights_digest``'s files of the Stable Diffusion folder ``path`` (see ``SD_WEIGHT_FOLDERS``)."""
    def keep(name: str) -> bool:
        top = name.split("/", 1)[0]
        return (name == "model_index.json" or top in SD_CONFIG_FOLDERS
                or (top in SD_WEIGHT_FOLDERS and name.endswith(SD_WEIGHT_SUFFIXES)))
    return [f for f in _walk_files(path) if keep(f)]


def weights_digest(config: SweepConfig) -> str | None:
    """A short sha256 of the model's weights, by content: a trained testbed model's checkpoint
    folder (``ModelSpec.path``: params, bank, card), every file but ``screen.json``; a local
    Stable Diffusion folder's weights and configs (``SD_WEIGHT_FOLDERS``); None for the
    closed-form models (no weights: the testbed fixes them) and a hub id that is not a local folder.
    Every byte is hashed, GBs for SD too: a fine-tune keeps the file sizes and safetensors headers,
    so sizes or the first and last MiB would miss it. The cost (~1 s/GB) is paid once per file and
    process (``_file_digest``'s cache per path, size and mtime)."""
    if config.sd is not None:
        src = config.sd.source
        return _files_digest(src, _sd_weight_files(src)) if os.path.isdir(src) else None
    spec = get_model(config.model)
    if spec.trained:
        # every file but the calibrated screen (measured on the model; a cell with a screen holds its threshold)
        files = [f for f in _walk_files(spec.path) if f != MODEL_SCREEN] if os.path.isdir(spec.path) else []
        return _files_digest(spec.path, files) if os.path.isdir(spec.path) else None
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
    captions = captions_path(sd.bank)
    clip = None if sd.clip is None else (_folder_digest(sd.clip) if os.path.isdir(sd.clip) else sd.clip)
    return {"model": config.model, "testbed": None, "prompts_per_kind": config.prompts_per_kind,
            "samples_per_prompt": config.samples_per_prompt, "kinds": list(config.kinds), "seed": config.seed,
            "prompts": "sha256:" + hashlib.sha256(prompts).hexdigest()[:20], "num_prompts": len(sd.prompts),
            "height": sd.height, "width": sd.width, "dtype": sd.dtype, "sscd": _file_digest(sd.sscd),
            "bank": _file_digest(sd.bank), "captions": _file_digest(captions), "clip": clip,
            "inception": _file_digest(sd.inception), "reference_images": _folder_digest(sd.reference_images)}


def sd_cell_settings(config: SweepConfig, cell: Cell) -> dict:
    """``cell_settings`` of a Stable Diffusion cell: AMG's settings are ``sd_amg.SD_AMG``
    updated by the cell's (the full AMGConfig; ``dedup`` off without captions beside the bank),
    its detector "sscd"; ``weights`` the digest of a local model folder (``weights_digest``)."""
    spec = model_spec(config.model)
    amg = cell.guidance == "amg"
    base = (spec.base if cell.base == "auto" else cell.base) if amg else None
    scale_used = cell.guidance != "none" and not (amg and base == "none")
    scale = (cell.scale if cell.scale is not None else config.scale) if scale_used else None
    # no captions beside the bank: no y_N, G_dup is off (StableDiffusionSpec.amg_settings)
    settings = (dataclasses.asdict(AMGConfig(**spec.amg_settings(dict(cell.amg), dedup=has_captions(config.sd.bank))))
                if amg else None)
    return _jsonable(dict(
        bench_settings(config), weights=weights_digest(config), method=cell.method, guidance=cell.guidance, base=base,
        detector=spec.detector if amg else None, scale=scale, sampler=cell.sampler, steps=cell.steps, amg=settings,
        baseline=cell.baseline, baseline_params=_baseline_settings(cell),
        **_screen_settings(cell, read_bank_screen(config.sd.bank))))


def _screen_settings(cell: Cell, calibrated) -> dict:
    """``{"screen": {name, settings, threshold}}`` of a cell with a screen, else {} (a cell without
    one keeps the settings, and so the fingerprint, it had before screens existed)."""
    screen, thr = resolve_screen(cell.screen, calibrated, cell.screen_threshold, cell.guidance, cell.id)
    if screen is None:
        return {}
    name = calibrated.name if cell.screen == "auto" else cell.screen
    return {"screen": {"name": name, "settings": dataclasses.asdict(screen), "threshold": thr, "choice": cell.screen}}


def screen_of(settings: dict):
    """(screen, threshold) from a cell's settings (``_screen_settings``), or (None, None)."""
    s = settings.get("screen")
    if not s:
        return None, None
    return get_screen(s["name"], **s["settings"]), float(s["threshold"])


def _jsonable(obj):
    """``obj`` as it reads back from JSON (tuples -> lists, numpy scalars -> Python, NaN / inf ->
    None: the files hold ``null`` there, ``jsonio.json_safe``), so a record kept in memory equals
    the one a resumed sweep reads back."""
    return json_safe(json.loads(json.dumps(obj, default=lambda o: o.item() if hasattr(o, "item") else str(o))))
