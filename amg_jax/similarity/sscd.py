"""SSCD copy-detection embeddings (Pizzi et al. 2022) in Flax, and the converter from the official file.

    variables = convert_torchscript("sscd_disc_mixup.torchscript.pt")   # or load_params("sscd.npz")[0]
    det = sscd_detector(variables, embed_images(variables, reference_images), labels)
    det(x0_hat)      # x0_hat [B, H, W, 3] in [-1, 1] -> Detection(sigma = max cosine, index, label)

The network (facebookresearch/sscd-copy-detection, ``sscd/models/model.py``, backbone
"CV_RESNET50" of the released ``sscd_disc_mixup`` model)::

    x [B, H, W, 3] (ImageNet-normalised)
      -> ResNet-50 trunk (Classy Vision layout: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, bottleneck
         stages [3, 4, 6, 3] of width 64 (x4 expansion), stride on the 3x3 conv) -> [B, h, w, 2048]
      -> GeM pooling  (clamp(min=1e-6) ** p).mean(h, w) ** (1/p), p = 3      -> [B, 2048]
      -> Linear 2048 -> 512 -> L2 normalisation                              -> [B, 512]

Variables: the Flax ``variables`` dict ``{"params": ..., "batch_stats": ...}`` (BatchNorm is always
in inference mode: it uses the running statistics, eps 1e-5 as in PyTorch; BN is *not* folded
into the convolutions, so the tree mirrors the PyTorch modules one to one). Every function here
that takes ``params`` takes that whole variables dict. Parameter names: ``stem_conv``,
``stem_bn``, ``stage{s}_block{i}/{conv1,bn1,conv2,bn2,conv3,bn3[,proj_conv,proj_bn]}``, ``proj``.

Preprocessing (``preprocess``): our samplers produce ``x`` in [-1, 1]; the official pipeline is
PIL image -> ``Resize(288)`` (short side; or a fixed ``[320, 320]``) -> ``ToTensor`` ([0, 1]) ->
``Normalize(ImageNet mean, std)``. Here: ``(x + 1) / 2`` -> ``jax.image.resize`` (bilinear,
antialias) -> normalise. That resize equals torch's ``F.interpolate(mode="bilinear",
antialias=True)`` to ~1e-7 (measured) and uses PIL's triangle filter; the remaining difference
to the official pipeline is that PIL resizes 8-bit images (rounding to 1/255 before and after),
we resize floats. Values are not clipped (clipping would zero the gradient outside [-1, 1]).

Differentiable in the input (AMG's ``G_sim`` takes gradients through it). The GeM clamp has a
zero gradient where a trunk feature is below 1e-6 (e.g. the ReLU's zeros), as in PyTorch.

Precision (measured, random weights): float32 matches PyTorch to 1.4e-7 max abs on the 512-d
embeddings (ResNet-50, 64x64 input); ``dtype="bfloat16"`` differs from float32 by ~8e-4 max
abs (cosine 0.99999) on a small trunk. On GPUs, XLA may use TF32 for float32 convolutions.

``embed_fn`` / ``make_embed_fn(config)`` is the stable function object the ``EmbeddingDetector``
keeps as a static jit key (one object per config, cached).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import re
import warnings
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from amg_jax.jsonio import dataclass_from_json, dataclass_to_json
from amg_jax.params_io import load_variables, save_variables
from amg_jax.similarity.embedding import EmbeddingDetector, embedding_detector

Array = jax.Array

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PARAMS_FORMAT = "amg_jax.sscd/1"
EXPANSION = 4


# --------------------------------------------------------------------------------------------
# config and model
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SSCDConfig:
    """SSCD architecture and input size (hashable: it is a static jit argument).

    stage_sizes: bottleneck blocks per stage (ResNet-50: (3, 4, 6, 3)).
    width:       stem channels = first stage's bottleneck width; stage s has width * 2**s
                 inside its blocks and 4x that at the output (trunk_dim = width * 2**(S-1) * 4).
    embed_dim:   output dimension of the linear projection (512).
    gem_p, gem_eps: GeM pooling exponent and clamp.
    image_size:  what ``preprocess`` resizes to: an int = the short side (aspect kept, like
                 torchvision ``Resize(288)``; square images become 288x288), (H, W) = fixed, or
                 None = no resize.
    dtype:       compute dtype name ("float32", "bfloat16", ...); parameters stay float32,
                 GeM and the normalisation run in float32.
    remat:       rematerialise each bottleneck block in the backward pass (less memory for
                 gradients through the network, ~1 extra forward).
    bn_eps:      BatchNorm epsilon (PyTorch's 1e-5).
    """

    stage_sizes: tuple = (3, 4, 6, 3)
    width: int = 64
    embed_dim: int = 512
    gem_p: float = 3.0
    gem_eps: float = 1e-6
    image_size: Any = 288
    dtype: str = "float32"
    remat: bool = False
    bn_eps: float = 1e-5

    def __post_init__(self):
        sizes = self.stage_sizes
        if isinstance(sizes, (int, np.integer)) or not all(isinstance(n, (int, np.integer)) and n > 0 for n in sizes) \
                or len(sizes) == 0:
            raise ValueError(f"SSCDConfig.stage_sizes must be a non-empty sequence of positive ints, got {sizes!r}")
        object.__setattr__(self, "stage_sizes", tuple(int(n) for n in sizes))
        for name in ("width", "embed_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"SSCDConfig.{name} must be a positive int, got {v!r}")
            object.__setattr__(self, name, int(v))
        if not float(self.gem_p) > 0 or not float(self.gem_eps) > 0 or not float(self.bn_eps) > 0:
            raise ValueError(f"SSCDConfig: gem_p, gem_eps and bn_eps must be > 0, got {self.gem_p!r}, "
                             f"{self.gem_eps!r}, {self.bn_eps!r}")
        for name in ("gem_p", "gem_eps", "bn_eps"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "image_size", _check_size(self.image_size, "SSCDConfig.image_size"))
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"SSCDConfig.dtype must name a float dtype, got {self.dtype!r}") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"SSCDConfig.dtype must name a float dtype, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt.name)
        object.__setattr__(self, "remat", bool(self.remat))

    @property
    def trunk_dim(self) -> int:
        return self.width * 2 ** (len(self.stage_sizes) - 1) * EXPANSION

    def to_dict(self) -> dict:
        return dataclass_to_json(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "SSCDConfig":
        return dataclass_from_json(cls, d)


def _check_size(size, where: str):
    """None, a positive int (short side) or a pair of positive ints (H, W)."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size <= 0:
            raise ValueError(f"{where} must be positive, got {size}")
        return int(size)
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0 for v in size):
        return (int(size[0]), int(size[1]))
    raise ValueError(f"{where} must be None, a positive int (short side) or (H, W), got {size!r}")


DEFAULT_CONFIG = SSCDConfig()


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (stride on the 3x3 conv), BN in inference mode: [B, H, W, Cin] ->
    [B, H/stride, W/stride, 4 * mid]; a 1x1 projection shortcut when the shape changes."""

    mid: int
    stride: int
    project: bool
    dtype: Any
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
        bn = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=self.eps, dtype=self.dtype)
        s = (self.stride, self.stride)
        y = nn.relu(bn(name="bn1")(conv(self.mid, (1, 1), padding="VALID", name="conv1")(x)))
        y = nn.relu(bn(name="bn2")(conv(self.mid, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv2")(y)))
        y = bn(name="bn3")(conv(self.mid * EXPANSION, (1, 1), padding="VALID", name="conv3")(y))
        if self.project:
            x = bn(name="proj_bn")(conv(self.mid * EXPANSION, (1, 1), strides=s, padding="VALID",
                                        name="proj_conv")(x))
        return nn.relu(y + x)


def gem_pool(x: Array, p: float = 3.0, eps: float = 1e-6) -> Array:
    """Generalised-mean pooling over H, W: [B, H, W, C] -> [B, C] (float32), SSCD's
    ``x.clamp(min=eps).pow(p).mean((H, W)).pow(1/p)``."""
    x = jnp.maximum(x.astype(jnp.float32), eps)
    return jnp.mean(x ** p, axis=(1, 2)) ** (1.0 / p)


def l2_normalize(x: Array, eps: float = 1e-12) -> Array:
    """``x / max(|x|, eps)`` along the last axis (torch ``F.normalize``)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


class SSCD(nn.Module):
    """SSCD: ``x [B, H, W, 3]`` ImageNet-normalised (see ``preprocess``) -> L2-normalised
    embeddings [B, embed_dim] (float32). Apply with ``{"params", "batch_stats"}``."""

    config: SSCDConfig = DEFAULT_CONFIG

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        x = x.astype(dt)
        x = nn.Conv(cfg.width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False, dtype=dt,
                    name="stem_conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=True, epsilon=cfg.bn_eps, dtype=dt, name="stem_bn")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        block = nn.remat(Bottleneck) if cfg.remat else Bottleneck
        cin = cfg.width
        for s, n in enumerate(cfg.stage_sizes):
            mid = cfg.width * 2 ** s
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                project = i == 0 and (stride != 1 or cin != mid * EXPANSION)
                x = block(mid=mid, stride=stride, project=project, dtype=dt, eps=cfg.bn_eps,
                          name=f"stage{s}_block{i}")(x)
                cin = mid * EXPANSION
        x = gem_pool(x, cfg.gem_p, cfg.gem_eps)
        x = nn.Dense(cfg.embed_dim, dtype=jnp.float32, name="proj")(x)
        return l2_normalize(x)


@functools.lru_cache(maxsize=None)
def _model(config: SSCDConfig) -> SSCD:
    return SSCD(config)


def init_params(config: SSCDConfig = DEFAULT_CONFIG, seed: int = 0) -> dict:
    """Random variables ``{"params", "batch_stats"}`` for ``config`` (NumPy float32: conv and
    Linear weights ~ N(0, 1/fan_in), BN scale 1 / bias 0, running stats 0 / 1) — for tests and
    smoke runs; real weights come from ``convert_torchscript``. (NumPy, not ``Module.init``:
    jitting the Flax initialisers of a ResNet-50 takes ~20 s to compile on CPU.)"""
    rng = np.random.default_rng(seed)
    flat = {}
    for k, shape in expected_shapes(config).items():
        leaf = k.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            flat[k] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        elif leaf in ("scale", "var"):
            flat[k] = np.ones(shape, np.float32)
        else:
            flat[k] = np.zeros(shape, np.float32)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def expected_shapes(config: SSCDConfig = DEFAULT_CONFIG) -> dict:
    """``{"params/stem_conv/kernel": (7, 7, 3, 64), ...}``: every variable's shape for ``config``,
    in forward order ("params" first, then "batch_stats"); the same tree as ``SSCD(config).init``
    (tested), derived from the conversion plan without tracing the model."""
    return dict(_expected_shapes(config.stage_sizes, config.width, config.embed_dim))


@functools.lru_cache(maxsize=None)
def _expected_shapes(stage_sizes: tuple, width: int, embed_dim: int) -> dict:
    config = SSCDConfig(stage_sizes=stage_sizes, width=width, embed_dim=embed_dim)
    params, stats = {}, {}
    for path, kind, shape in _plan(config):
        k = "/".join(path)
        if kind == "conv":
            params[f"params/{k}/kernel"] = (shape[2], shape[3], shape[1], shape[0])
        elif kind == "linear":
            params[f"params/{k}/kernel"] = (shape[1], shape[0])
            params[f"params/{k}/bias"] = (shape[0],)
        else:
            params[f"params/{k}/scale"] = params[f"params/{k}/bias"] = shape
            stats[f"batch_stats/{k}/mean"] = stats[f"batch_stats/{k}/var"] = shape
    return {**params, **stats}


def check_params(params, config: SSCDConfig = DEFAULT_CONFIG, where: str = "sscd") -> None:
    """Raise ValueError naming the first missing / unexpected / wrongly shaped variable."""
    if not isinstance(params, Mapping) or "params" not in params:
        keys = f" with keys {sorted(params)}" if isinstance(params, Mapping) else ""
        raise ValueError(f"{where}: expected the Flax variables dict {{'params', 'batch_stats'}}, got "
                         f"{type(params).__name__}{keys}")
    want = expected_shapes(config)
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(_to_dict(params), sep="/").items()}
    for k, shape in want.items():
        if k not in got:
            raise ValueError(f"{where}: variable {k!r} is missing (config expects shape {shape}; {_cfg_str(config)})")
        if got[k] != shape:
            raise ValueError(f"{where}: variable {k!r} has shape {got[k]}, the config expects {shape} "
                             f"({_cfg_str(config)})")
    extra = [k for k in got if k not in want]
    if extra:
        raise ValueError(f"{where}: unexpected variable {extra[0]!r} (shape {got[extra[0]]}) for {_cfg_str(config)}")


def _to_dict(tree):
    """Plain nested dicts (FrozenDict / mappings)."""
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def _cfg_str(config: SSCDConfig) -> str:
    return (f"config stage_sizes={list(config.stage_sizes)}, width={config.width}, "
            f"embed_dim={config.embed_dim}")


# --------------------------------------------------------------------------------------------
# preprocessing and embedding
# --------------------------------------------------------------------------------------------

def resize_shape(h: int, w: int, size) -> tuple[int, int]:
    """Output (H, W) of ``preprocess``: an int resizes the short side to ``size`` and the long
    side to ``int(size * long / short)`` (torchvision ``Resize(int)``); a pair is used as is."""
    size = _check_size(size, "preprocess: size")
    if size is None:
        return h, w
    if isinstance(size, tuple):
        return size
    if h <= w:
        return size, int(size * w / h)
    return int(size * h / w), size


def preprocess(x: Array, size=DEFAULT_CONFIG.image_size) -> Array:
    """``x [B, H, W, 3]`` in [-1, 1] -> [0, 1] -> resized (bilinear, antialias; ``size`` as in
    ``resize_shape``, None = keep) -> ImageNet-normalised ``[B, H', W', 3]`` float32."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"sscd.preprocess: expected images [B, H, W, 3] (NHWC, RGB), got shape {tuple(x.shape)}")
    x = (jnp.asarray(x, jnp.float32) + 1.0) * 0.5
    h, w = resize_shape(x.shape[1], x.shape[2], size)
    if (h, w) != x.shape[1:3]:
        x = jax.image.resize(x, (x.shape[0], h, w, 3), method="bilinear", antialias=True)
    return (x - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


def sscd_embed(params, x: Array, config: SSCDConfig = DEFAULT_CONFIG) -> Array:
    """``x [B, H, W, 3]`` in [-1, 1] -> L2-normalised SSCD embeddings [B, embed_dim] float32
    (``preprocess`` to ``config.image_size``, then the network). Differentiable in ``x``."""
    return _model(config).apply(params, preprocess(x, config.image_size))


def make_embed_fn(config: SSCDConfig = DEFAULT_CONFIG) -> Callable:
    """``embed_fn(params, x [B, H, W, 3] in [-1, 1]) -> [B, embed_dim]`` for ``config``: one
    cached function object per (equal) config (a stable static jit key for ``EmbeddingDetector``)."""
    if not isinstance(config, SSCDConfig):
        raise ValueError(f"make_embed_fn: config must be an SSCDConfig, got {type(config).__name__}")
    return _embed_fn_for(config)


@functools.lru_cache(maxsize=None)
def _embed_fn_for(config: SSCDConfig) -> Callable:
    fn = functools.partial(sscd_embed, config=config)
    functools.update_wrapper(fn, sscd_embed)
    return fn


embed_fn = make_embed_fn(DEFAULT_CONFIG)


@functools.lru_cache(maxsize=None)
def _jitted_embed(config: SSCDConfig):
    return jax.jit(make_embed_fn(config))


def embed_images(params, images, config: SSCDConfig = DEFAULT_CONFIG, *, batch_size: int = 32) -> np.ndarray:
    """Embeddings [N, embed_dim] (NumPy float32) of ``images [N, H, W, 3]`` in [-1, 1], jitted, in
    batches of ``batch_size`` (the last batch padded, so one compilation) — e.g. a bank's rows."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(f"sscd.embed_images: expected a non-empty [N, H, W, 3] array, got shape {images.shape}")
    if batch_size <= 0:
        raise ValueError(f"sscd.embed_images: batch_size must be positive, got {batch_size}")
    f = _jitted_embed(config)
    b = min(batch_size, len(images))
    out = []
    for i in range(0, len(images), b):
        chunk = images[i:i + b]
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(f(params, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


def sscd_detector(params, bank_or_embeddings, labels=None, *, config: SSCDConfig | None = None,
                  thresholds: tuple | None = None, dedup: bool | None = None) -> EmbeddingDetector:
    """An ``EmbeddingDetector`` with SSCD as the embedder: ``sigma`` = max cosine between
    ``SSCD(x0_hat)`` and the bank (``bank_or_embeddings``: an embedding ``ReferenceBank`` or
    SSCD embeddings [M, embed_dim], e.g. from ``embed_images``; ``labels [M]``). ``params`` are
    checked against ``config`` first. The paper calls a sample memorized at sigma > 0.5."""
    config = DEFAULT_CONFIG if config is None else config
    check_params(params, config, "sscd_detector")
    params = jax.tree.map(jnp.asarray, _to_dict(params))
    return embedding_detector(make_embed_fn(config), params, bank_or_embeddings, labels,
                              dedup=dedup, thresholds=thresholds)


# --------------------------------------------------------------------------------------------
# conversion from PyTorch (the official TorchScript file, a torchvision-layout model, a state dict)
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _TorchLayer:
    """One PyTorch module's tensors: kind "conv" | "bn" | "linear", its key prefix, arrays."""

    kind: str
    key: str
    arrays: dict

    @property
    def shape(self) -> tuple:
        return tuple(self.arrays["weight"].shape)


def _plan(config: SSCDConfig) -> list:
    """The layers the config expects, in PyTorch registration order (shared by the Classy Vision
    and torchvision layouts): [(flax path, kind, torch weight shape)]."""
    w = config.width
    plan = [(("stem_conv",), "conv", (w, 3, 7, 7)), (("stem_bn",), "bn", (w,))]
    cin = w
    for s, n in enumerate(config.stage_sizes):
        mid = w * 2 ** s
        out = mid * EXPANSION
        for i in range(n):
            b = f"stage{s}_block{i}"
            plan += [((b, "conv1"), "conv", (mid, cin, 1, 1)), ((b, "bn1"), "bn", (mid,)),
                     ((b, "conv2"), "conv", (mid, mid, 3, 3)), ((b, "bn2"), "bn", (mid,)),
                     ((b, "conv3"), "conv", (out, mid, 1, 1)), ((b, "bn3"), "bn", (out,))]
            if i == 0 and (s > 0 or cin != out):
                plan += [((b, "proj_conv"), "conv", (out, cin, 1, 1)), ((b, "proj_bn"), "bn", (out,))]
            cin = out
    plan.append((("proj",), "linear", (config.embed_dim, config.trunk_dim)))
    return plan


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if hasattr(t, "float") and str(t.dtype) in ("torch.float16", "torch.bfloat16", "torch.float64"):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _load_torch(src) -> tuple[dict, Any, str]:
    """(state dict {key: ndarray} in registration order, the module or None, source name)."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"convert_torchscript: no such file: {path!r} (the official SSCD model is "
                                    f"sscd_disc_mixup.torchscript.pt from facebookresearch/sscd-copy-detection)")
        import torch    # optional (the torch extra): only to read PyTorch weights

        try:
            with warnings.catch_warnings():     # torch 2.13 deprecates TorchScript; the official file is one
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(path, map_location="cpu")
        except Exception as e_jit:       # not TorchScript: maybe a torch.save'd state dict
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:
                raise ValueError(f"convert_torchscript: could not read {path!r} as a TorchScript file or a "
                                 f"PyTorch state dict (is the file complete / not corrupted?): "
                                 f"{type(e_jit).__name__}: {_first_line(e_jit)}") from None
            sd, _, _ = _load_torch(obj)
            return sd, None, path
        sd, _, _ = _load_torch(module)
        return sd, module, path
    if hasattr(src, "state_dict") and callable(src.state_dict):
        return {k: _to_numpy(v) for k, v in src.state_dict().items()}, src, type(src).__name__
    if isinstance(src, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if wrapper in src and isinstance(src[wrapper], Mapping):
                return _load_torch(src[wrapper])
        bad = [k for k, v in src.items() if not (hasattr(v, "shape") or isinstance(v, (int, float)))]
        if bad:
            raise ValueError(f"convert_torchscript: state-dict entry {bad[0]!r} is a {type(src[bad[0]]).__name__}, "
                             f"not a tensor")
        return {k: _to_numpy(v) for k, v in src.items()}, None, "state dict"
    raise ValueError(f"convert_torchscript: expected a file path, a torch module or a state dict, "
                     f"got {type(src).__name__}")


def _group_layers(sd: dict) -> list:
    """Group a state dict into modules (in first-appearance order) and classify each one by its
    tensors: conv (4-D weight, no bias), bn (weight, bias, running_mean, running_var), linear
    (2-D weight + bias). ``num_batches_tracked`` is ignored; anything else is an error naming the key."""
    groups: dict = {}
    for key, arr in sd.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf == "num_batches_tracked":
            continue
        groups.setdefault(prefix, {})[leaf] = np.asarray(arr)
    layers = []
    for prefix, arrays in groups.items():
        names = set(arrays)
        first = f"{prefix}.{sorted(names)[0]}" if prefix else sorted(names)[0]
        w = arrays.get("weight")
        if {"running_mean", "running_var"} <= names:
            if names != {"weight", "bias", "running_mean", "running_var"} or w.ndim != 1:
                raise ValueError(f"convert_torchscript: unmatched key {first!r}: a BatchNorm without affine "
                                 f"weight/bias (tensors {sorted(names)}) is not supported")
            layers.append(_TorchLayer("bn", prefix, arrays))
        elif names == {"weight"} and w.ndim == 4:
            layers.append(_TorchLayer("conv", prefix, arrays))
        elif names == {"weight", "bias"} and w.ndim == 2:
            layers.append(_TorchLayer("linear", prefix, arrays))
        else:
            raise ValueError(f"convert_torchscript: unmatched key {first!r} (tensors {sorted(names)} with shapes "
                             f"{[tuple(a.shape) for a in arrays.values()]}): not a bias-free conv, an affine "
                             f"BatchNorm or a Linear layer of an SSCD ResNet")
    return layers


def _infer_config(layers: list, base: SSCDConfig) -> SSCDConfig:
    """Read stage sizes, width and embed dim off the layer sequence (bottleneck ResNet + Linear)."""
    def fail(i, what):
        if i < len(layers):
            where = f"unmatched key {layers[i].key + '.weight'!r} ({layers[i].kind} {layers[i].shape})"
        else:
            where = f"the state dict ends after {layers[-1].key!r}" if layers else "the state dict is empty"
        raise ValueError(f"convert_torchscript: {where}: expected {what} of a bottleneck ResNet "
                         f"(SSCD CV_RESNET50 / TV_RESNET50 layout)")

    def is_(i, kind, ndim_k=None):
        return i < len(layers) and layers[i].kind == kind and (ndim_k is None or layers[i].shape[2:] == ndim_k)

    if not (is_(0, "conv", (7, 7)) and layers[0].shape[1] == 3):
        fail(0, "the 7x7 stem convolution [width, 3, 7, 7]")
    if not is_(1, "bn"):
        fail(1, "the stem BatchNorm")
    width = layers[0].shape[0]
    i, cin, stages = 2, width, []
    while is_(i, "conv", (1, 1)):
        for j, (kind, k) in enumerate([("bn", None), ("conv", (3, 3)), ("bn", None), ("conv", (1, 1)), ("bn", None)]):
            if not is_(i + 1 + j, kind, k):
                fail(i + 1 + j, f"a {kind}{' ' + 'x'.join(map(str, k)) if k else ''} layer inside a bottleneck block")
        start, mid, out = i, layers[i].shape[0], layers[i + 4].shape[0]
        i += 6
        project = is_(i, "conv", (1, 1)) and layers[i].shape[:2] == (out, cin) and cin != out
        if project:
            if not is_(i + 1, "bn"):
                fail(i + 1, "the projection shortcut's BatchNorm")
            i += 2
            stages.append(0)
        elif not stages:
            fail(start, "a first block with a projection shortcut")
        if mid != width * 2 ** (len(stages) - 1) or out != mid * EXPANSION:
            fail(start, f"a bottleneck of width {width * 2 ** (len(stages) - 1)} (x{EXPANSION} out)")
        stages[-1] += 1
        cin = out
    if not stages:
        fail(2, "the first bottleneck block")
    if not is_(i, "linear"):
        fail(i, "the Linear projection [embed_dim, trunk_dim] after the last block")
    return dataclasses.replace(base, stage_sizes=tuple(stages), width=width, embed_dim=layers[i].shape[0])


def _layout_name(keys) -> str:
    keys = list(keys)
    if any("convolutional_block" in k for k in keys):
        return "Classy Vision"
    if any(re.search(r"(^|\.)layer\d+\.\d+\.conv\d", k) for k in keys):
        return "torchvision"
    return "unrecognised key names, mapped by structure"


def _gem_p_of(module) -> float | None:
    """The GeM exponent stored on a scripted/eager SSCD module (``pooling_param``), if any."""
    if module is None or not hasattr(module, "modules"):
        return None
    try:
        for m in module.modules():
            p = getattr(m, "pooling_param", None)
            if isinstance(p, (int, float)) and not isinstance(p, bool):
                return float(p)
    except Exception:
        return None
    return None


def convert_torchscript(src, config: SSCDConfig | None = None, *, return_config: bool = False):
    """PyTorch SSCD -> Flax variables ``{"params", "batch_stats"}`` (float32 NumPy arrays).

    src: the official TorchScript file (``torch.jit.load``; a ``torch.save``'d state dict file
         also works), a torch module (eager or scripted) or a state dict.
    config: the architecture to convert into; None = read it off the weights (stage sizes,
         width, embed dim; GeM p from the module's ``pooling_param`` if stored, else 3; the other
         fields from ``SSCDConfig()``). With a config, the first layer that does not match it is
         an error naming its key.

    The mapping is by module structure, not by key names: the state dict is grouped into modules
    in registration order and each is classified by its tensors (bias-free 4-D conv, affine
    BatchNorm, Linear), then matched one to one against the config's layer sequence
    (stem conv, stem bn, per block conv1 bn1 conv2 bn2 conv3 bn3 [projection conv, bn], Linear).
    The Classy Vision layout (``backbone.blocks.S.blockS-I.convolutional_block.{0,1,3,4,6}``,
    ``.bn``, ``.downsample``, ``embeddings.1``) and torchvision's (``layer1.0.conv1``, ...,
    ``fc``) register in that same order. Conv OIHW -> HWIO, Linear transposed, BN weight/bias ->
    scale/bias, running_mean/var -> batch_stats mean/var. ``return_config=True`` returns
    ``(variables, config)``.
    """
    sd, module, _ = _load_torch(src)
    layers = _group_layers(sd)
    if config is None:
        gem_p = _gem_p_of(module)
        base = DEFAULT_CONFIG if gem_p is None else dataclasses.replace(DEFAULT_CONFIG, gem_p=gem_p)
        config = _infer_config(layers, base)
    plan = _plan(config)
    params: dict = {}
    stats: dict = {}
    for n, (path, kind, shape) in enumerate(plan):
        if n >= len(layers):
            last = layers[-1].key if layers else "(nothing)"
            raise ValueError(f"convert_torchscript: the state dict ends after {last!r} but the config expects "
                             f"{len(plan)} layers; missing {'/'.join(path)} ({kind} {shape}); {_cfg_str(config)}")
        layer = layers[n]
        if layer.kind != kind or layer.shape != shape:
            raise ValueError(f"convert_torchscript: unmatched key {layer.key + '.weight'!r} ({layer.kind} "
                             f"{layer.shape}): the config expects {kind} {shape} for {'/'.join(path)} "
                             f"(layer {n + 1} of {len(plan)}); {_cfg_str(config)}")
        a = {k: np.asarray(v, np.float32) for k, v in layer.arrays.items()}
        if kind == "conv":
            leaf = {"kernel": np.ascontiguousarray(a["weight"].transpose(2, 3, 1, 0))}
        elif kind == "linear":
            leaf = {"kernel": np.ascontiguousarray(a["weight"].T), "bias": a["bias"]}
        else:
            leaf = {"scale": a["weight"], "bias": a["bias"]}
            _set(stats, path, {"mean": a["running_mean"], "var": a["running_var"]})
        _set(params, path, leaf)
    if len(layers) > len(plan):
        extra = layers[len(plan)]
        raise ValueError(f"convert_torchscript: unmatched key {extra.key + '.weight'!r} ({extra.kind} {extra.shape}) "
                         f"after the last layer the config expects ({len(plan)} layers); {_cfg_str(config)}")
    variables = {"params": params, "batch_stats": stats}
    check_params(variables, config, "convert_torchscript")
    return (variables, config) if return_config else variables


def _set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def save_params(path, params, config: SSCDConfig = DEFAULT_CONFIG) -> str:
    """Write ``params`` (the variables dict, checked against ``config``) and the config to one
    ``.npz`` (keys ``params/stem_conv/kernel`` ..., ``__config__`` = JSON), atomically."""
    check_params(params, config, "save_params")
    return save_variables(path, _to_dict(params), config, PARAMS_FORMAT)


def load_params(path) -> tuple[dict, SSCDConfig]:
    """``(variables, config)`` from ``save_params``' file; FileNotFoundError if it is missing,
    ValueError naming the file if it is corrupt, not an SSCD params file, or its shapes do not
    match its config."""
    params, config = load_variables(path, PARAMS_FORMAT, SSCDConfig, "load_params", "SSCD params",
                                    " (make one with `amg convert sscd IN OUT` / sscd.convert_file)")
    check_params(params, config, f"load_params({os.fspath(path)!r})")
    return params, config


def convert_file(src, dst, config: SSCDConfig | None = None) -> str:
    """``amg convert sscd SRC DST``: the official TorchScript file (or a state dict) -> ``.npz``
    for ``load_params``. Returns a one-line summary."""
    sd, module, name = _load_torch(src)
    p_note = " (not stored in the source: default)" if config is None and _gem_p_of(module) is None else ""
    variables, config = convert_torchscript(module if module is not None else sd, config, return_config=True)
    out = save_params(dst, variables, config)
    n = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    return (f"converted {name} ({_layout_name(sd)} layout) -> {out}: ResNet stages {list(config.stage_sizes)}, "
            f"width {config.width}, trunk {config.trunk_dim} -> embed {config.embed_dim}, GeM p={config.gem_p:g}"
            f"{p_note}, {n / 1e6:.2f}M params")


__all__ = [
    "DEFAULT_CONFIG", "IMAGENET_MEAN", "IMAGENET_STD", "SSCD", "SSCDConfig", "Bottleneck", "check_params",
    "convert_file", "convert_torchscript", "embed_fn", "embed_images", "expected_shapes", "gem_pool",
    "init_params", "l2_normalize", "load_params", "make_embed_fn", "preprocess", "resize_shape",
    "save_params", "sscd_detector", "sscd_embed",
]
