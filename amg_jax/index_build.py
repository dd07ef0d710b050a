"""Build a reference bank from a folder of images (and their captions): ``amg index build``.

    bank = build_index("train_images/", embedder, "bank.npz", size=(288, 288))

The images are read in a stable (sorted) order, resized (short side) and centre-cropped to
``size``, scaled to [-1, 1] (what the samplers produce), embedded in batches by ``embedder``
(``[b, H, W, 3] -> [b, E]``: SSCD, CLIP, or the pixels themselves), and written as one
``ReferenceBank`` (``amg_jax.index.save_bank``) whose labels are caption ids; the captions go
beside it in ``<out>.captions.json`` (``AMG``'s caption deduplication conditions on them).

Nothing already embedded is lost: every batch is written to ``<out>.partial/`` as it is done,
and a re-run skips the batches already there (same files, same settings). An unreadable image
stops the build with a message naming it (the batches before it are kept), or is skipped with a
warning when ``skip_bad=True``.

Captions (optional), by the first that exists:
- ``captions=`` a ``.jsonl`` file of ``{"file": name, "caption": text}`` lines or a ``.csv``
  with ``file,caption`` columns (names relative to the folder);
- else ``<folder>/captions.jsonl`` / ``<folder>/captions.csv``;
- else a sidecar ``<image stem>.txt`` next to each image.
Images without a caption get label -1.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import warnings
from typing import Callable, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from PIL import Image

from amg_jax.index import ReferenceBank, build_bank, load_bank, save_bank
from amg_jax.jsonio import read_json, write_json
from amg_jax.mesh import make_mesh
from amg_jax.similarity import clip, sscd

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
PARTIAL_FORMAT = "amg_jax.index_build.partial/1"


def list_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive), as paths relative to it, sorted."""
    if not os.path.isdir(folder):
        raise ValueError(f"index build: {folder!r} is not a directory")
    out = []
    for root, _, files in os.walk(folder):
        for f in files:
            if f.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(root, f), folder))
    if not out:
        raise ValueError(f"index build: no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
    return sorted(out)


def _read_caption_file(path: str) -> dict:
    where = f"index build: captions file {path!r}"
    out = {}
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    out[str(item["file"])] = str(item["caption"])
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{where}, line {n}: expected {{\"file\": ..., \"caption\": ...}}: {err}") from err
    elif path.endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"file", "caption"} <= set(reader.fieldnames):
                raise ValueError(f"{where}: needs the columns 'file' and 'caption', got {reader.fieldnames}")
            for row in reader:
                out[str(row["file"])] = str(row["caption"])
    else:
        raise ValueError(f"{where}: expected a .jsonl or .csv file")
    return out


def read_captions(folder: str, files: Sequence[str], captions: str | None = None) -> list[str | None]:
    """The caption of each file in ``files`` (None where there is none); see the module docstring."""
    if captions is not None and not os.path.isfile(captions):
        raise ValueError(f"index build: captions file {captions!r} does not exist")
    path = captions or next((p for p in (os.path.join(folder, "captions.jsonl"), os.path.join(folder, "captions.csv"))
                             if os.path.isfile(p)), None)
    if path is not None:
        table = _read_caption_file(path)
        unknown = sorted(set(table) - set(files))
        if unknown:
            warnings.warn(f"index build: {len(unknown)} captions in {path!r} name no image found "
                          f"(first: {unknown[0]!r})", stacklevel=2)
        return [table.get(f) for f in files]
    out = []
    for f in files:
        side = os.path.join(folder, os.path.splitext(f)[0] + ".txt")
        out.append(open(side, encoding="utf-8").read().strip() if os.path.isfile(side) else None)
    return out


def load_image(path: str, size: tuple[int, int]) -> np.ndarray:
    """One image as float32 [H, W, 3] in [-1, 1]: RGB, short side resized to fit ``size`` (H, W)
    (bicubic), centre-cropped. Raises ValueError naming the file when it cannot be read."""
    h, w = size
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            s = max(h / im.height, w / im.width)
            nh, nw = max(h, round(im.height * s)), max(w, round(im.width * s))
            im = im.resize((nw, nh), Image.BICUBIC)
            top, left = (nh - h) // 2, (nw - w) // 2
            a = np.asarray(im.crop((left, top, left + w, top + h)), np.float32)
    except (OSError, ValueError, SyntaxError) as err:
        raise ValueError(f"index build: cannot read image {path!r}: {err}") from err
    return a / 127.5 - 1.0


def _settings_hash(files: Sequence[str], size, embedder_name: str) -> str:
    h = hashlib.sha256(json.dumps([list(files), list(size), embedder_name]).encode())
    return h.hexdigest()[:16]


def _partial_dir(out: str) -> str:
    return out + ".partial"


def build_index(folder: str, embedder: Callable[[np.ndarray], np.ndarray], out: str, *,
                size: tuple[int, int], batch: int = 32, captions: str | None = None,
                embedder_name: str = "embedder", kind: str = "embedding", skip_bad: bool = False,
                progress: bool = True, copy_threshold: float | None = None) -> ReferenceBank:
    """Embed every image under ``folder`` and write the bank to ``out`` (see the module docstring).

    embedder:      ``[b, H, W, 3] in [-1, 1] -> [b, E]`` (NumPy in, array-like out).
    size:          (H, W) every image is brought to.
    kind:          "embedding" (rows L2-normalised, cosine search) or "pixel" (rows = the images).
    embedder_name: names the embedder in the partial-results key (a re-run with another
                   embedder, size or file list starts over instead of mixing results).
    Returns the bank (also saved to ``out``; captions in ``out + ".captions.json"``).
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ValueError(f"index build: batch must be an integer >= 1, got {batch!r}")
    size = tuple(int(s) for s in size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"index build: size must be (H, W) with positive entries, got {size!r}")
    if kind not in ("embedding", "pixel"):
        raise ValueError(f"index build: kind must be 'embedding' or 'pixel', got {kind!r}")
    files = list_images(folder)
    caps = read_captions(folder, files, captions)
    key = _settings_hash(files, size, embedder_name)
    part = _partial_dir(out)
    meta_path = os.path.join(part, "meta.json")
    if os.path.isdir(part):
        try:
            old = json.load(open(meta_path))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("key") != key:
            warnings.warn(f"index build: {part!r} holds batches of other settings (images, size or embedder); "
                          "starting over", stacklevel=2)
            shutil.rmtree(part)
    os.makedirs(part, exist_ok=True)
    write_json(meta_path, {"format": PARTIAL_FORMAT, "key": key, "folder": os.path.abspath(folder),
                           "num_files": len(files), "size": list(size), "embedder": embedder_name})
    chunks = range(0, len(files), batch)
    bar = None
    if progress:
        bar = tqdm(total=len(files), desc=f"index build ({embedder_name})", unit="img")
    skipped = []
    try:
        for lo in chunks:
            path = os.path.join(part, f"batch_{lo // batch:06d}.npz")
            names = files[lo:lo + batch]
            if os.path.isfile(path):
                try:
                    with np.load(path) as z:
                        if [str(n) for n in z["attempted"]] == [str(n) for n in names]:
                            if bar is not None:
                                bar.update(len(names))
                            continue
                except (OSError, ValueError, KeyError):
                    pass                                   # a torn batch file: redo it
            imgs, ok = [], []
            for name in names:
                try:
                    imgs.append(load_image(os.path.join(folder, name), size))
                    ok.append(name)
                except ValueError as err:
                    if not skip_bad:
                        done = lo
                        raise ValueError(f"{err}. The {done} images before it are embedded and kept in {part!r}; "
                                         "fix or remove the file (or pass --skip-bad) and re-run to continue") from None
                    warnings.warn(f"{err}; skipped", stacklevel=2)
                    skipped.append(name)
            emb = (np.asarray(embedder(np.stack(imgs)), np.float32) if imgs
                   else np.zeros((0, 0), np.float32))
            if kind == "pixel" and imgs:
                emb = emb.reshape(len(imgs), -1)
            if imgs and (emb.ndim != 2 or emb.shape[0] != len(imgs)):
                raise ValueError(f"index build: the embedder returned shape {emb.shape} for {len(imgs)} images; "
                                 "expected [b, E]")
            if imgs and not np.all(np.isfinite(emb)):
                raise ValueError(f"index build: the embedder returned NaN/inf for batch starting at {names[0]!r}")
            tmp = path + ".tmp.npz"
            np.savez(tmp, files=np.array(ok, dtype=str), attempted=np.array(names, dtype=str), embeddings=emb)
            os.replace(tmp, path)
            if bar is not None:
                bar.update(len(names))
    finally:
        if bar is not None:
            bar.close()
    embs, kept = [], []
    for lo in chunks:
        with np.load(os.path.join(part, f"batch_{lo // batch:06d}.npz")) as z:
            if z["files"].size:
                embs.append(z["embeddings"])
                kept.extend(str(f) for f in z["files"])
    if not embs:
        raise ValueError(f"index build: no image under {folder!r} could be read")
    rows = np.concatenate(embs)
    if kind == "pixel":
        rows = rows.reshape((len(rows),) + size + (3,))
    by_file = dict(zip(files, caps))
    vocab = sorted({c for c in caps if c is not None})
    ids = {c: i for i, c in enumerate(vocab)}
    labels = np.array([ids[by_file[f]] if by_file[f] is not None else -1 for f in kept], np.int32)
    bank = build_bank(rows, labels, kind=kind, dedup=True, normalize=kind == "embedding",
                      copy_threshold=copy_threshold)
    save_bank(out, bank)
    write_json(captions_path(out), {"captions": vocab, "files": kept, "labels": labels.tolist(),
                                        "skipped": skipped, "embedder": embedder_name, "size": list(size)})
    shutil.rmtree(part, ignore_errors=True)
    return bank


def sharded_embedder(embed_fn: Callable, params, *, mesh=None) -> Callable:
    """``images [b, H, W, 3] -> [b, E]`` (NumPy) running ``jit(embed_fn)(params, images)`` with the
    batch sharded over all devices of ``mesh`` (default: every device) and ``params`` replicated;
    a batch not divisible by the device count is padded (with its last image) and cut."""
    mesh = make_mesh() if mesh is None else mesh
    n = int(mesh.devices.size)
    rep = NamedSharding(mesh, P())
    params = jax.device_put(params, rep)
    f = jax.jit(embed_fn, in_shardings=(rep, NamedSharding(mesh, P(mesh.axis_names[0]))), out_shardings=rep)

    def run(images):
        x = np.asarray(images, np.float32)
        b = len(x)
        pad = (-b) % n
        if pad:
            x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
        return np.asarray(f(params, x))[:b]

    return run


def nearest_in_bank(embed: Callable, bank: ReferenceBank, what: str = "the embedder") -> Callable:
    """``measure(u8 [b, H, W, 3]) -> (cosine to the nearest bank row [b], that row's source index
    [b])``: the stored uint8 images embedded by ``embed`` (``sharded_embedder``: images in [-1, 1]
    -> [b, E]) against the L2-normalised rows of ``bank``; the papers' SSCD-to-training-set metric.
    ``what`` names the embedder in the error for a bank of another width."""
    rows = np.asarray(bank.rows, np.float32)[:bank.size]
    rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    source = np.asarray(bank.source_index)[:bank.size]

    def measure(u8):
        e = np.asarray(embed(np.asarray(u8).astype(np.float32) / 127.5 - 1.0))
        if e.shape[1] != rows.shape[1]:
            raise ValueError(f"the bank has rows of {rows.shape[1]}, {what} embeds to {e.shape[1]}: build the "
                             "bank with the same embedder (amg index build --embedder ...)")
        sims = (e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)) @ rows.T
        return sims.max(axis=1), source[sims.argmax(axis=1)]
    return measure


def sscd_nearest(bank_path: str, sscd_path: str, where: str) -> Callable:
    """``nearest_in_bank`` for the SSCD params file ``sscd_path`` against the bank file
    ``bank_path``, both read now; ValueError (prefixed ``where``) for a bank of another width,
    before any model is loaded."""
    bank = load_bank(bank_path)
    params, config = sscd.load_params(sscd_path)
    if bank.dim != config.embed_dim:
        raise ValueError(f"{where}: bank {bank_path!r} has rows of {bank.dim}, the SSCD {sscd_path!r} embeds to "
                         f"{config.embed_dim}: build the bank with the same SSCD (amg index build --embedder sscd:...)")
    return nearest_in_bank(sharded_embedder(sscd.make_embed_fn(config), params), bank, f"the SSCD {sscd_path!r}")


EMBEDDERS = ("pixel", "sscd", "clip")


def image_embedder(spec: str, *, size=None, dtype: str = "float32") -> tuple[Callable, str, tuple, str]:
    """The embedder of ``spec``: ``"pixel"`` (the images themselves: a pixel bank for the nL2
    detector), ``"sscd:PARAMS.npz"`` (``amg convert sscd`` output) or ``"clip:DIR_OR_HUB_ID"``.
    Returns ``(embed [b, H, W, 3] -> [b, E], name, size (H, W), bank kind)``; ``size`` defaults to
    SSCD's / CLIP's input size (pixel banks need it given)."""
    kind, _, arg = str(spec).partition(":")
    if kind not in EMBEDDERS or (kind != "pixel" and not arg):
        raise ValueError(f"index build: embedder must be 'pixel', 'sscd:PARAMS.npz' or 'clip:DIR_OR_HUB_ID', got {spec!r}")
    if kind == "pixel":
        if size is None:
            raise ValueError("index build: a pixel bank needs --size H W (the model's image size)")
        return (lambda x: np.asarray(x, np.float32)), "pixel", tuple(size), "pixel"
    if kind == "sscd":
        params, config = sscd.load_params(arg)
        if size is None:
            s = config.image_size
            size = (s, s) if isinstance(s, int) else (tuple(s) if s is not None else (288, 288))
        return sharded_embedder(sscd.make_embed_fn(config), params), f"sscd:{os.path.abspath(arg)}", tuple(size), "embedding"
    bundle = clip.load_clip(arg, dtype=dtype)
    if size is None:
        size = (bundle.resize_size, bundle.resize_size)
    return (sharded_embedder(bundle.embed_fn, bundle.vision_params), f"clip:{bundle.source}", tuple(size),
            "embedding")


CAPTIONS_SUFFIX = ".captions.json"


def captions_path(bank_path: str) -> str:
    """Where ``build_index`` writes a bank's captions: beside it, ``<bank>.captions.json``."""
    return os.fspath(bank_path) + CAPTIONS_SUFFIX


def has_captions(bank_path: str) -> bool:
    """Whether the bank at ``bank_path`` has a captions file beside it."""
    return os.path.isfile(captions_path(bank_path))


def load_captions(bank_path: str) -> list[str]:
    """The captions of a bank written by ``build_index`` (label id -> caption)."""
    path = captions_path(bank_path)
    if not os.path.isfile(path):
        raise ValueError(f"no captions beside the bank: {path!r} does not exist")
    data = read_json(path, "captions file")                     # ValueError naming it when damaged
    caps = data.get("captions") if isinstance(data, dict) else None
    if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
        raise ValueError(f"captions file {path} has no 'captions' list of strings (written by amg index build?)")
    return caps


__all__ = ["CAPTIONS_SUFFIX", "EMBEDDERS", "captions_path", "has_captions", "IMAGE_EXTENSIONS", "build_index", "image_embedder", "sharded_embedder", "nearest_in_bank", "sscd_nearest", "list_images", "load_captions", "load_image", "read_captions"]
