"""CLIP image / text embeddings (amg_jax's own Flax CLIP, ``models.clip_model``), the CLIP detector and
the CLIP score.

- ``load_clip(path_or_hub_id, dtype)`` -> ``ClipBundle``: the ``ClipModel``, its params (read from
  ``flax_model.msgpack``, ``model.safetensors`` without torch, or ``pytorch_model.bin`` with it),
  the ``CLIPTokenizer`` and the image preprocessing (resize size, crop size, mean, std) read
  from ``preprocessor_config.json`` (``CLIPImageProcessor`` defaults where it is absent).
- ``clip_preprocess(x, size, mean, std)``: images ``[B, H, W, C]`` in [-1, 1] -> the model's
  normalised pixels ``[B, S, S, 3]``, differentiable (see "Preprocessing" below).
- ``clip_image_embed(bundle, x) -> [B, D]`` / ``clip_text_embed(bundle, prompts) -> [B, D]``:
  projected embeddings (L2-normalised by default).
- ``clip_embed_fn(bundle)`` (= ``bundle.embed_fn``): the stable ``embed_fn(params, x) -> [B, D]``
  that ``amg_jax.similarity.embedding.embedding_detector`` takes with ``bundle.vision_params``.
  It is part of the jit cache key, so it is one function object per (config, dtype,
  preprocessing): an ``lru_cache``d ``functools.partial``. ``clip_detector`` builds the detector.
- ``clip_score(bundle, images, prompts) -> [B]``: ``100 * max(cos(E_img, E_txt), 0)``, the CLIP
  score as torchmetrics computes it (``CLIPScore``; Hessel et al. 2021 define CLIP-S with a
  weight 2.5 instead of 100; the AMG paper's "CLIP 28.04" is on the 100 scale).
- ``write_tiny_clip(directory, seed)``: a tiny random-weight CLIP with a locally generated BPE
  vocabulary, for tests (nothing is downloaded).

**Preprocessing.** ``CLIPImageProcessor`` resizes the short side to ``size`` (bicubic, PIL),
centre-crops ``crop_size`` and normalises with ``mean`` / ``std`` on [0, 1] pixels. Here the same
steps run in JAX: ``x / 2 + 0.5`` -> ``jax.image.resize(..., "bicubic", antialias=True)`` of the
short side to ``size`` (long side ``int(size * long / short)``, as transformers computes it) ->
centre crop (``top = (H - crop) // 2``, as transformers) -> ``(x - mean) / std``. Differences
from the processor, all deliberate for a differentiable detector: no uint8 quantisation before
and after the resize (the processor rounds to uint8 for PIL), no clipping (values outside
[-1, 1] pass through, as does the bicubic overshoot), and JAX's Keys-cubic antialiased kernel
in place of PIL's (both a = -0.5; they differ slightly at the borders when downscaling).
Measured on the tiny test processor: max abs difference ~1e-2 in normalised units on
uint8-valued images. One-channel images are repeated to RGB (the processor's convert_rgb).

**Model / dtype.** transformers stays for the config and the tokenizer only; no transformers Flax
model class is imported. The vision tower's position embeddings are fixed to
``vision_config.image_size``, so the crop size must equal it. ``dtype`` ("float32",
"bfloat16", "float16") is the computation dtype and the params' dtype; embeddings are
returned in float32.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from amg_jax.index import ReferenceBank
from amg_jax.models.clip_model import ClipModel, ClipModelConfig
from amg_jax.models.sd_weights import expected_tree, read_state, to_params, weight_files
from amg_jax.similarity.embedding import EmbeddingDetector, embedding_detector

Array = jax.Array

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = ("float32", "bfloat16", "float16")
# the first present is loaded (safetensors also sharded / as an fp16 variant: sd_weights.weight_files)
WEIGHT_FILES = ("model.safetensors", "flax_model.msgpack", "pytorch_model.bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# the vision params the image tower needs (logit_scale: FlaxCLIPModule.setup declares it eagerly)
VISION_KEYS = ("vision_model", "visual_projection", "logit_scale")


def _quiet_transformers():
    """Silence transformers' "Flax classes are deprecated" and tokenizer length warnings."""
    import transformers    # heavy; used only when a model is built from it (and for its configs)

    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=".*Flax classes are deprecated.*")
    warnings.filterwarnings("ignore", message=".*TensorFlow and JAX classes are deprecated.*")


# ----------------------------------------------------------------------------- the bundle

@dataclasses.dataclass(frozen=True, eq=False)
class ClipBundle:
    """A loaded CLIP: module, params and everything needed to feed it.

    module:      the ``ClipModel`` (a linen module; static).
    params:      its params pytree (``text_model``, ``vision_model``, projections, ``logit_scale``).
    tokenizer:   the ``CLIPTokenizer``.
    config:      the ``CLIPConfig``.
    image_size:  the crop size S (= ``vision_config.image_size``); embedders take any [B, H, W, C].
    resize_size: the short side before the centre crop (``size["shortest_edge"]``).
    mean, std:   per-channel normalisation on [0, 1] pixels (3-tuples).
    max_length:  text tokens per prompt (incl. start/end), prompts longer are truncated.
    dtype:       computation / params dtype name.
    source:      the directory or hub id it was loaded from.
    attention:   the attention kernel (``models.attention``: "auto", "xla", "cudnn").
    """

    module: Any
    params: Any
    tokenizer: Any
    config: Any
    image_size: int
    resize_size: int
    mean: tuple
    std: tuple
    max_length: int
    dtype: str = "float32"
    source: str = ""
    attention: str = "auto"

    @property
    def embed_dim(self) -> int:
        """D, the projection dimension of image and text embeddings."""
        return int(self.config.projection_dim)

    @property
    def vision_params(self) -> dict:
        """The image tower's params (``embed_fn``'s ``params``; smaller than ``params``)."""
        return {k: self.params[k] for k in VISION_KEYS}

    @functools.cached_property
    def key(self) -> tuple:
        """Hashable (config, dtype, preprocessing): the cache key of the compiled embedders."""
        return (self.config.to_json_string(use_diff=False), self.dtype, int(self.resize_size),
                int(self.image_size), tuple(self.mean), tuple(self.std), self.attention)

    @property
    def embed_fn(self):
        """The stable ``embed_fn(vision_params, x [B, H, W, C] in [-1, 1]) -> [B, D]`` (projected,
        not normalised): the same object for every bundle of the same config."""
        return clip_embed_fn(self)


@functools.lru_cache(maxsize=None)
def _module(config_json: str, dtype: str, attention: str = "auto") -> ClipModel:
    """The ClipModel for a config (cached, so equal configs share one module)."""
    return ClipModel(ClipModelConfig.from_dict(json.loads(config_json)), dtype=jnp.dtype(dtype), attention=attention)


def _embed_images(module, dtype: str, resize_size: int, image_size: int, mean: tuple, std: tuple,
                  params, x: Array) -> Array:
    """x [B, H, W, C] in [-1, 1] -> projected image features [B, D] float32 (not normalised)."""
    px = clip_preprocess(x, resize_size, mean, std, crop_size=image_size).astype(jnp.dtype(dtype))
    out = module.apply({"params": params}, px, method="image_features")
    return out.astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _image_fns(key: tuple):
    """(embed_fn, jitted embed_fn) for a bundle key."""
    config_json, dtype, resize_size, image_size, mean, std, attention = key
    fn = functools.partial(_embed_images, _module(config_json, dtype, attention), dtype, resize_size, image_size,
                           mean, std)
    return fn, jax.jit(fn)


@functools.lru_cache(maxsize=None)
def _text_fn(config_json: str, dtype: str, attention: str = "auto"):
    """Jitted (params, ids [B, L]) -> projected text features [B, D] float32 (causal attention pools at
    the end token, so the padding mask changes nothing and is not passed)."""
    module = _module(config_json, dtype, attention)

    def f(params, ids):
        return module.apply({"params": params}, ids, method="text_features").astype(jnp.float32)

    return jax.jit(f)


def clip_embed_fn(bundle: ClipBundle):
    """The stable ``embed_fn(vision_params, x) -> [B, D]`` of ``bundle`` for ``embedding_detector``
    (one object per config / dtype / preprocessing, so jit caches hit)."""
    return _image_fns(bundle.key)[0]


# ----------------------------------------------------------------------------- loading

def _fail(msg: str):
    raise ValueError(f"load_clip: {msg}")


def _looks_like_path(s: str) -> bool:
    return os.path.isabs(s) or s.startswith(("./", "../", "~", ".\\")) or s in (".", "..") \
        or os.path.exists(s) or s.count("/") > 1


def _check_local(path: str) -> dict:
    """Checks a local CLIP directory; returns its config dict."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        _fail(f"{path!r} has no config.json (expected a transformers CLIP directory written by "
              f"save_pretrained, e.g. a copy of openai/clip-vit-large-patch14)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        _fail(f"{cfg_path} is not valid JSON: {e}")
    if not isinstance(cfg, dict) or cfg.get("model_type") != "clip":
        got = cfg.get("model_type") if isinstance(cfg, dict) else type(cfg).__name__
        _fail(f"{cfg_path} is not a CLIP config: model_type is {got!r}, expected 'clip' (a full CLIP "
              f"with text and vision towers; CLIPTextModel / CLIPVisionModel directories are not enough)")
    if weight_files(path, WEIGHT_FILES) is None:
        _fail(f"{path!r} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    missing = [t for t in TOKENIZER_FILES if not os.path.isfile(os.path.join(path, t))]
    if missing:
        _fail(f"{path!r} has no tokenizer files {missing} (CLIPTokenizer needs vocab.json and merges.txt)")
    return cfg


def _processor_settings(proc, image_size: int) -> tuple[int, tuple, tuple]:
    """(resize_size, mean, std) from a CLIPImageProcessor; checks its crop against the model."""
    size = dict(proc.size)
    if "shortest_edge" in size:
        resize = int(size["shortest_edge"])
    elif "height" in size and "width" in size:
        resize = min(int(size["height"]), int(size["width"]))   # square resize == short side on squares
    else:
        _fail(f"preprocessor size {size} has neither 'shortest_edge' nor 'height'/'width'")
    crop = dict(proc.crop_size) if getattr(proc, "do_center_crop", True) and proc.crop_size else None
    if crop is not None and (int(crop["height"]) != image_size or int(crop["width"]) != image_size):
        _fail(f"preprocessor crop_size {crop} differs from the model's vision image_size {image_size} "
              f"(the Flax vision tower's position embeddings are fixed to image_size)")
    if resize < image_size:
        _fail(f"preprocessor size {resize} is smaller than the crop {image_size}")
    mean = tuple(float(v) for v in np.broadcast_to(np.asarray(proc.image_mean, float), (3,)))
    std = tuple(float(v) for v in np.broadcast_to(np.asarray(proc.image_std, float), (3,)))
    return resize, mean, std


def _download(repo_id: str) -> str:
    """The files of a hub CLIP that loading needs (config, tokenizer, preprocessor, one weights file)."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        files = set(list_repo_files(repo_id))
    except Exception as e:   # not found, gated, offline, ...: say what was tried
        _fail(f"{repo_id!r} is not a local directory, and listing it as a hub repo failed: {type(e).__name__}: {e}")
    weights = [w for w in WEIGHT_FILES if w in files or f"{w}.index.json" in files]
    if not weights:
        _fail(f"hub repo {repo_id!r} has none of the weight files {', '.join(WEIGHT_FILES)}")
    patterns = ["config.json", "preprocessor_config.json", "tokenizer*", "vocab.json", "merges.txt",
                "special_tokens_map.json", weights[0], weights[0] + ".index.json",
                weights[0].replace(".safetensors", "-*.safetensors")]
    return snapshot_download(repo_id, allow_patterns=patterns)


def load_clip(path_or_hub_id: str, dtype: str = "float32", *, attention: str = "auto") -> ClipBundle:
    """Loads a CLIP (config + Flax ``.msgpack`` / PyTorch ``.safetensors`` / ``.bin`` weights + tokenizer +
    preprocessor config) from a local directory, or from the hub when online, into amg_jax's own
    ``ClipModel``. ``dtype``: "float32" | "bfloat16" | "float16" (computation and params); ``attention``:
    the kernel (``models.attention``). Missing files / a non-CLIP config raise ``ValueError`` before
    anything is loaded; weights that do not fit the config raise naming the file and the weight."""
    from amg_jax.models.attention import check_attention

    name = jnp.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        _fail(f"dtype must be one of {DTYPES}, got {dtype!r}")
    check_attention(attention)
    src = os.fspath(path_or_hub_id)
    if not os.path.isdir(src):
        if os.path.isfile(src):
            _fail(f"{src!r} is a file; expected a CLIP directory (config.json, weights, vocab.json, merges.txt)")
        if _looks_like_path(src):
            _fail(f"directory {src!r} does not exist")
        folder = _download(src)
    else:
        folder = src
    _check_local(folder)
    _quiet_transformers()
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTokenizer  # configs and the tokenizer only

    try:
        config = CLIPConfig.from_pretrained(folder)
        tokenizer = CLIPTokenizer.from_pretrained(folder)
    except (OSError, EnvironmentError, ValueError) as e:
        _fail(f"could not read the CLIP config / tokenizer in {folder!r}: {e}")
    where = os.path.join(folder, "config.json")
    model_cfg = ClipModelConfig.from_dict(config.to_dict(), where)
    image_size = int(model_cfg.vision.image_size)
    proc = None
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        try:
            proc = CLIPImageProcessor.from_pretrained(folder)
        except (OSError, EnvironmentError):
            proc = None
    if proc is None:       # the processor's defaults, sized to the model
        proc = CLIPImageProcessor(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    resize, mean, std = _processor_settings(proc, image_size)
    config_json = config.to_json_string(use_diff=False)
    module = _module(config_json, name, attention)
    file = weight_files(folder, WEIGHT_FILES)
    ids = np.zeros((1, model_cfg.text.max_position_embeddings), np.int32)
    px = np.zeros((1, image_size, image_size, model_cfg.vision.num_channels), np.float32)
    with warnings.catch_warnings():    # weights the towers do not use (e.g. position_ids buffers) are fine
        warnings.simplefilter("ignore")
        params = to_params(read_state(file), expected_tree(module, ids, px), file, dtype=jnp.dtype(name))
    max_length = int(min(model_cfg.text.max_position_embeddings, tokenizer.model_max_length or 10 ** 9))
    return ClipBundle(module=module, params=params, tokenizer=tokenizer, config=config,
                      image_size=image_size, resize_size=resize, mean=mean, std=std,
                      max_length=max_length, dtype=name, source=src, attention=attention)


# ----------------------------------------------------------------------------- preprocessing

def _resize_short_side(x: Array, size: int) -> Array:
    h, w = x.shape[1], x.shape[2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nh, nw = (new_long, size) if w <= h else (size, new_long)
    if (nh, nw) == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], nh, nw, x.shape[3]), method="bicubic", antialias=True)


def clip_preprocess(x: Array, size: int, mean: Sequence[float], std: Sequence[float], *,
                    crop_size: int | None = None) -> Array:
    """Images ``x [B, H, W, C]`` in [-1, 1] (C = 3, or 1 repeated to RGB) -> CLIP pixels
    ``[B, crop, crop, 3]``: short side bicubic-resized to ``size``, centre crop ``crop_size``
    (default ``size``), normalised ``(x01 - mean) / std``. Differentiable; differences from
    ``CLIPImageProcessor`` in the module docstring."""
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"clip_preprocess: images must be [B, H, W, C] with C = 3 (or 1), got shape {x.shape}")
    size = int(size)
    crop = size if crop_size is None else int(crop_size)
    if not 0 < crop <= size:
        raise ValueError(f"clip_preprocess: need 0 < crop_size <= size, got crop_size {crop}, size {size}")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    x = _resize_short_side(x * 0.5 + 0.5, size)
    h, w = x.shape[1], x.shape[2]
    top, left = (h - crop) // 2, (w - crop) // 2
    x = x[:, top:top + crop, left:left + crop, :]
    mean = jnp.asarray(mean, x.dtype).reshape(1, 1, 1, -1)
    std = jnp.asarray(std, x.dtype).reshape(1, 1, 1, -1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- embeddings

def _bucket(n: int) -> int:
    """Batch size the eager embedders pad to (powers of two up to 64, then multiples of 64), so
    that varying batch sizes in a sweep reuse a few compiled functions."""
    return 1 << max(n - 1, 0).bit_length() if n <= 64 else -(-n // 64) * 64


def _normalize(e: Array) -> Array:
    return e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-12)


def _check_images(bundle: ClipBundle, x, where: str) -> Array:
    x = jnp.asarray(x)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: images must be [B, H, W, C] in [-1, 1] with C = 3 (or 1), got shape {x.shape}")
    return x


def clip_image_embed(bundle: ClipBundle, x, *, params=None, normalize: bool = True) -> Array:
    """Projected CLIP image embeddings ``[B, D]`` float32 of images ``x [B, H, W, C]`` in [-1, 1]
    (any H, W: resized and cropped as ``clip_preprocess``), L2-normalised unless
    ``normalize=False``. ``params``: the full or vision params (default ``bundle.params``).
    Jit-compiled per config and input shape, the batch padded to a bucket (``_bucket``) so
    that varying batch sizes share compilations; differentiable in ``x``."""
    x = _check_images(bundle, x, "clip_image_embed")
    p = bundle.vision_params if params is None else {k: params[k] for k in VISION_KEYS}
    n = x.shape[0]
    if _bucket(n) > n:
        x = jnp.concatenate([x, jnp.zeros((_bucket(n) - n,) + x.shape[1:], x.dtype)])
    e = _image_fns(bundle.key)[1](p, x)[:n]
    return _normalize(e) if normalize else e


def tokenize(bundle: ClipBundle, prompts: Sequence[str] | str) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask) ``[B, max_length]`` int32, padded to ``bundle.max_length``
    as Stable Diffusion pads; over-long prompts are truncated (keeping the end token) with a
    ``UserWarning`` naming them."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"CLIP prompts must be a non-empty list of strings, got {prompts!r:.200}")
    tok = bundle.tokenizer
    lengths = [len(ids) for ids in tok(prompts, truncation=False)["input_ids"]]
    long = [(p, n) for p, n in zip(prompts, lengths) if n > bundle.max_length]
    if long:
        shown = "; ".join(f"{p[:60]!r} ({n} tokens)" for p, n in long[:3])
        warnings.warn(f"{len(long)} prompt(s) longer than CLIP's {bundle.max_length} tokens (incl. start/end) are "
                      f"truncated: {shown}", UserWarning, stacklevel=3)
    enc = tok(prompts, padding="max_length", max_length=bundle.max_length, truncation=True, return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def clip_text_embed(bundle: ClipBundle, prompts: Sequence[str] | str, *, params=None,
                    normalize: bool = True) -> Array:
    """Projected CLIP text embeddings ``[B, D]`` float32 of ``prompts`` (L2-normalised unless
    ``normalize=False``); prompts over ``bundle.max_length`` tokens are truncated with a warning.
    The batch is padded with empty prompts to a bucket size (one compilation per bucket)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    ids, _ = tokenize(bundle, prompts + [""] * (_bucket(n) - n) if n else prompts)
    p = bundle.params if params is None else params
    e = _text_fn(bundle.key[0], bundle.dtype, bundle.attention)(p, jnp.asarray(ids))[:n]
    return _normalize(e) if normalize else e


def clip_score(bundle: ClipBundle, images, prompts: Sequence[str] | str) -> Array:
    """CLIP score ``[B]`` = ``100 * max(cos(E_img(images[i]), E_txt(prompts[i])), 0)`` in [0, 100]
    (torchmetrics' CLIPScore per sample; average it for the usual single number). ``images
    [B, H, W, C]`` in [-1, 1]; ``prompts``: B strings, or one string for all images."""
    x = _check_images(bundle, images, "clip_score")
    if isinstance(prompts, str):
        prompts = [prompts] * x.shape[0]
    prompts = list(prompts)
    if len(prompts) != x.shape[0]:
        raise ValueError(f"clip_score: {x.shape[0]} images but {len(prompts)} prompts (need one per image)")
    cos = jnp.sum(clip_image_embed(bundle, x) * clip_text_embed(bundle, prompts), axis=-1)
    return 100.0 * jnp.maximum(cos, 0.0)


# ----------------------------------------------------------------------------- detector

def clip_detector(bundle: ClipBundle, bank_or_embeddings, labels=None, thresholds=None, *,
                  dedup: bool | None = None, batch_size: int = 64) -> EmbeddingDetector:
    """The CLIP cosine detector (``sigma`` = cosine to the nearest bank row, in [-1, 1]) over
    ``bank_or_embeddings``: an embedding ``ReferenceBank``, CLIP embeddings ``[M, D]``, or
    reference images ``[M, H, W, C]`` in [-1, 1] (embedded here in chunks of ``batch_size``).
    ``labels [M]``: caption / class ids; ``thresholds``: default (lambda_min, lambda_max)."""
    ref = bank_or_embeddings
    if isinstance(ref, ReferenceBank):
        if ref.kind != "embedding":
            raise ValueError(f"clip_detector: the bank is of kind {ref.kind!r}; pass the reference images "
                             f"[M, H, W, C] (or their CLIP embeddings) instead")
        if ref.dim != bundle.embed_dim:
            raise ValueError(f"clip_detector: bank rows have dim {ref.dim}, CLIP embeddings have {bundle.embed_dim}")
    else:
        arr = np.asarray(ref)
        if arr.ndim == 4:
            if arr.shape[0] == 0:
                raise ValueError("clip_detector: the reference image set is empty")
            ref = np.concatenate([np.asarray(clip_image_embed(bundle, arr[i:i + batch_size]))
                                  for i in range(0, arr.shape[0], batch_size)])
        elif arr.ndim == 2:
            if arr.shape[1] != bundle.embed_dim:
                raise ValueError(f"clip_detector: embeddings have dim {arr.shape[1]}, CLIP's is {bundle.embed_dim}")
            ref = arr
        else:
            raise ValueError(f"clip_detector: expected a ReferenceBank, embeddings [M, {bundle.embed_dim}] or images "
                             f"[M, H, W, C], got shape {arr.shape}")
    return embedding_detector(bundle.embed_fn, bundle.vision_params, ref, labels, dedup=dedup, thresholds=thresholds)


# ----------------------------------------------------------------------------- tiny test model

_TINY_WORDS = (
    "a an the of on in with and photo picture image painting drawing red green blue yellow white black gray "
    "purple orange small large big circle square triangle star striped dotted background cat dog bird house "
    "tree person car"
).split()
_TINY_MAX_LENGTH = 16


def _bytes_to_unicode() -> dict:
    from transformers.models.clip.tokenization_clip import bytes_to_unicode  # heavy / optional

    return bytes_to_unicode()


def _learn_bpe(words: Sequence[str], num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE merges over ``words`` (end-of-word marked ``</w>`` as CLIP does); ties broken
    by the pair itself, so the result is deterministic."""
    corpus = collections.Counter(tuple(w[:-1]) + (w[-1] + "</w>",) for w in words)
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, f in corpus.items():
            for a, b in zip(word, word[1:]):
                pairs[(a, b)] += f
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        new = collections.Counter()
        for word, f in corpus.items():
            out, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new[tuple(out)] += f
        corpus = new
    return merges


def _tiny_params(shapes, seed: int) -> dict:
    """NumPy-initialised params for a tiny CLIP (no init compile). Scales chosen so that the
    random model still separates inputs: kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1),
    position / class embeddings ~ N(0, 0.1^2), LayerNorm identity, biases 0, CLIP's
    logit_scale = log(1 / 0.07). (transformers' own init makes every image embed to nearly
    the same vector at this size: the CLS token barely attends to the patches.)"""

    rng = np.random.default_rng(int(seed))
    out = {}
    for path, leaf in sorted(flatten_dict(shapes).items()):
        shape, name = tuple(leaf.shape), path[-1]
        if name == "logit_scale":
            v = np.full(shape, np.log(1 / 0.07))
        elif name == "scale":
            v = np.ones(shape)
        elif name == "bias":
            v = np.zeros(shape)
        elif name == "kernel":
            v = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        elif "position_embedding" in path or name == "class_embedding":
            v = 0.1 * rng.normal(size=shape)
        else:
            v = rng.normal(size=shape)
        out[path] = np.asarray(v, np.float32)
    return unflatten_dict(out)


def write_tiny_clip(directory: str, seed: int = 0, *, num_merges: int = 120) -> str:
    """Writes a tiny random-weight CLIP into ``directory`` (made if needed) and returns it:
    CLIPConfig with text/vision towers of hidden 32, 2 layers, 4 heads, image_size 32, patch 8,
    projection_dim 16, 16 text positions; Flax weights (``flax_model.msgpack``); a CLIPTokenizer
    with a byte-level BPE vocabulary learnt here from a few caption words (all 256 bytes, so
    any text encodes; ``<|startoftext|>`` / ``<|endoftext|>`` have the highest ids, as in CLIP);
    ``preprocessor_config.json`` (short side 32, crop 32, OpenAI mean / std)."""
    _quiet_transformers()
    from flax.serialization import to_bytes
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig  # configs

    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    merges = _learn_bpe(_TINY_WORDS, num_merges)
    tokens = chars + [c + "</w>" for c in chars]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab_file, merges_file = os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_file, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=_TINY_MAX_LENGTH)
    tokenizer.save_pretrained(directory)

    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    text = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=_TINY_MAX_LENGTH, bos_token_id=bos,
                          eos_token_id=eos, pad_token_id=eos)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, num_channels=3)
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    config.architectures = ["CLIPModel"]
    config.save_pretrained(directory)
    module = ClipModel(ClipModelConfig.from_dict(config.to_dict()))
    shapes = expected_tree(module, np.zeros((1, _TINY_MAX_LENGTH), np.int32), np.zeros((1, 32, 32, 3), np.float32))
    with open(os.path.join(directory, "flax_model.msgpack"), "wb") as f:
        f.write(to_bytes(_tiny_params(shapes, seed)))
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


__all__ = [
    "ClipBundle", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_detector", "clip_embed_fn", "clip_image_embed",
    "clip_preprocess", "clip_score", "clip_text_embed", "load_clip", "tokenize", "write_tiny_clip",
]
