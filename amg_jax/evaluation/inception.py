"""FID Inception-v3 in Flax (the network of pytorch-fid / TTUR), its converter, and FID.

    variables = convert_state_dict("pt_inception-2015-12-05-6726825d.pth")  # or load_params("inception.npz")[0]
    feats = compute_features(variables, images)          # images [N, H, W, 3] in [-1, 1] -> [N, 2048]
    fid(variables, images_a, images_b)                    # Fréchet distance of the two feature sets

The network is pytorch-fid's ``FIDInceptionV3`` (mseitzer/pytorch-fid, ``src/pytorch_fid/inception.py``):
torchvision's ``Inception3`` (``aux_logits=False``, 1008 classes) with the blocks patched to match
the TensorFlow graph of TTUR's FID (``inception-2015-12-05``)::

    x [B, H, W, 3] in [-1, 1], bilinearly resized to 299x299 (align_corners=False, no antialias)
      -> Conv2d_1a_3x3 (s2), Conv2d_2a_3x3, Conv2d_2b_3x3 (pad 1), max pool 3x3/2
      -> Conv2d_3b_1x1, Conv2d_4a_3x3, max pool 3x3/2                        -> [B, 35, 35, 192]
      -> Mixed_5b, 5c, 5d (FIDInceptionA), Mixed_6a (InceptionB)              -> [B, 17, 17, 768]
      -> Mixed_6b .. 6e (FIDInceptionC), Mixed_7a (InceptionD)                -> [B, 8, 8, 1280]
      -> Mixed_7b (FIDInceptionE_1), Mixed_7c (FIDInceptionE_2)               -> [B, 8, 8, 2048]
      -> global average pool ("pool3")                                        -> [B, 2048]

The FID patches: the 3x3/1 average pools inside the A, C and E blocks do not count the zero
padding (``count_include_pad=False``), and Mixed_7c's pool branch is a 3x3/1 *max* pool.
Every convolution is torchvision's ``BasicConv2d``: bias-free conv -> BatchNorm (eps 0.001,
inference mode: running statistics) -> ReLU. The classifier (``fc``, 2048 -> 1008) is not used
for FID and is not converted.

Variables: the Flax ``variables`` dict ``{"params": ..., "batch_stats": ...}`` with torchvision's
module names, e.g. ``params/Mixed_5b/branch1x1/conv/kernel`` (HWIO), ``params/.../bn/{scale,bias}``,
``batch_stats/.../bn/{mean,var}`` (BN is not folded, so the tree maps one to one onto the
state dict: ``Mixed_5b.branch1x1.conv.weight`` ...). Every function here that takes ``params``
takes that whole variables dict.

Preprocessing: pytorch-fid feeds ``[0, 1]`` tensors, resizes to 299 and maps to ``[-1, 1]``.
Bilinear resizing commutes with that affine map, so here ``x`` in ``[-1, 1]`` is resized directly
(``jax.image.resize``, ``antialias=False`` = torch ``F.interpolate(mode="bilinear",
align_corners=False)``, up- and downsampling). pytorch-fid reads 8-bit PNG/JPEG files; ``fid``
clips to ``[-1, 1]`` (``clip=True``) but does not quantise to 1/255. The architecture needs at
least 75x75 pixels after resizing.

Differentiable in the input (``inception_features`` is a pure function; ``compute_features`` /
``fid`` jit it per config and run it in fixed-size batches).
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from amg_jax.evaluation import metrics
from amg_jax.jsonio import dataclass_from_json, dataclass_to_json
from amg_jax.params_io import load_variables, save_variables

Array = jax.Array

PARAMS_FORMAT = "amg_jax.inception/1"
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FEATURE_DIM = 2048
MIN_SIZE = 75


# --------------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InceptionConfig:
    """What the FID Inception computes on (hashable: it is a static jit argument).

    image_size: what ``preprocess`` resizes to: an int = a square side (299, as pytorch-fid), (H, W),
                or None = no resize (the input must then be >= 75x75). Sizes other than 299 give
                features that are not comparable with published FIDs (useful for small tests).
    dtype:      compute dtype name ("float32", "bfloat16", ...); parameters stay float32, the
                final pooling runs in float32.
    bn_eps:     BatchNorm epsilon (torchvision's BasicConv2d: 0.001).
    """

    image_size: Any = 299
    dtype: str = "float32"
    bn_eps: float = 1e-3

    def __post_init__(self):
        object.__setattr__(self, "image_size", _check_size(self.image_size, "InceptionConfig.image_size"))
        if not float(self.bn_eps) > 0:
            raise ValueError(f"InceptionConfig.bn_eps must be > 0, got {self.bn_eps!r}")
        object.__setattr__(self, "bn_eps", float(self.bn_eps))
        try:
            dt = jnp.dtype(self.dtype)
        except TypeError:
            raise ValueError(f"InceptionConfig.dtype must name a float dtype, got {self.dtype!r}") from None
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"InceptionConfig.dtype must name a float dtype, got {self.dtype!r}")
        object.__setattr__(self, "dtype", dt.name)

    def to_dict(self) -> dict:
        return dataclass_to_json(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "InceptionConfig":
        return dataclass_from_json(cls, d)


def _check_size(size, where: str):
    """None, an int >= 75 (square) or a pair of ints >= 75 (H, W)."""
    if size is None:
        return None
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        size = (int(size), int(size))
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in size):
        size = (int(size[0]), int(size[1]))
        if min(size) < MIN_SIZE:
            raise ValueError(f"{where} must be at least {MIN_SIZE}x{MIN_SIZE} (Inception-v3's smallest input), "
                             f"got {size}")
        return size
    raise ValueError(f"{where} must be None, an int (square side) or (H, W), got {size!r}")


DEFAULT_CONFIG = InceptionConfig()


# --------------------------------------------------------------------------------------------
# architecture (one table shared by the Flax modules, the expected shapes and the converter)
# --------------------------------------------------------------------------------------------

class ConvSpec(NamedTuple):
    """One BasicConv2d: channels, kernel (kh, kw), stride, padding (ph, pw)."""

    cin: int
    cout: int
    kernel: tuple
    stride: int = 1
    padding: tuple = (0, 0)


# (name, block kind, in channels, pool_features / channels_7x7), in forward order.
MIXED = (
    ("Mixed_5b", "A", 192, 32), ("Mixed_5c", "A", 256, 64), ("Mixed_5d", "A", 288, 64),
    ("Mixed_6a", "B", 288, None),
    ("Mixed_6b", "C", 768, 128), ("Mixed_6c", "C", 768, 160), ("Mixed_6d", "C", 768, 160),
    ("Mixed_6e", "C", 768, 192),
    ("Mixed_7a", "D", 768, None), ("Mixed_7b", "E1", 1280, None), ("Mixed_7c", "E2", 2048, None),
)

STEM = (
    ("Conv2d_1a_3x3", ConvSpec(3, 32, (3, 3), 2)),
    ("Conv2d_2a_3x3", ConvSpec(32, 32, (3, 3))),
    ("Conv2d_2b_3x3", ConvSpec(32, 64, (3, 3), 1, (1, 1))),
    ("Conv2d_3b_1x1", ConvSpec(64, 80, (1, 1))),
    ("Conv2d_4a_3x3", ConvSpec(80, 192, (3, 3))),
)


def block_convs(kind: str, cin: int, arg=None) -> dict:
    """``{branch name: ConvSpec}`` of one Mixed block (torchvision's InceptionA..E layout)."""
    one = (1, 1)
    if kind == "A":
        return {"branch1x1": ConvSpec(cin, 64, one),
                "branch5x5_1": ConvSpec(cin, 48, one), "branch5x5_2": ConvSpec(48, 64, (5, 5), 1, (2, 2)),
                "branch3x3dbl_1": ConvSpec(cin, 64, one), "branch3x3dbl_2": ConvSpec(64, 96, (3, 3), 1, (1, 1)),
                "branch3x3dbl_3": ConvSpec(96, 96, (3, 3), 1, (1, 1)),
                "branch_pool": ConvSpec(cin, arg, one)}
    if kind == "B":
        return {"branch3x3": ConvSpec(cin, 384, (3, 3), 2),
                "branch3x3dbl_1": ConvSpec(cin, 64, one), "branch3x3dbl_2": ConvSpec(64, 96, (3, 3), 1, (1, 1)),
                "branch3x3dbl_3": ConvSpec(96, 96, (3, 3), 2)}
    if kind == "C":
        c7, r, c = arg, (1, 7), (7, 1)
        return {"branch1x1": ConvSpec(cin, 192, one),
                "branch7x7_1": ConvSpec(cin, c7, one), "branch7x7_2": ConvSpec(c7, c7, r, 1, (0, 3)),
                "branch7x7_3": ConvSpec(c7, 192, c, 1, (3, 0)),
                "branch7x7dbl_1": ConvSpec(cin, c7, one), "branch7x7dbl_2": ConvSpec(c7, c7, c, 1, (3, 0)),
                "branch7x7dbl_3": ConvSpec(c7, c7, r, 1, (0, 3)), "branch7x7dbl_4": ConvSpec(c7, c7, c, 1, (3, 0)),
                "branch7x7dbl_5": ConvSpec(c7, 192, r, 1, (0, 3)),
                "branch_pool": ConvSpec(cin, 192, one)}
    if kind == "D":
        return {"branch3x3_1": ConvSpec(cin, 192, one), "branch3x3_2": ConvSpec(192, 320, (3, 3), 2),
                "branch7x7x3_1": ConvSpec(cin, 192, one), "branch7x7x3_2": ConvSpec(192, 192, (1, 7), 1, (0, 3)),
                "branch7x7x3_3": ConvSpec(192, 192, (7, 1), 1, (3, 0)),
                "branch7x7x3_4": ConvSpec(192, 192, (3, 3), 2)}
    if kind in ("E1", "E2"):
        return {"branch1x1": ConvSpec(cin, 320, one),
                "branch3x3_1": ConvSpec(cin, 384, one), "branch3x3_2a": ConvSpec(384, 384, (1, 3), 1, (0, 1)),
                "branch3x3_2b": ConvSpec(384, 384, (3, 1), 1, (1, 0)),
                "branch3x3dbl_1": ConvSpec(cin, 448, one), "branch3x3dbl_2": ConvSpec(448, 384, (3, 3), 1, (1, 1)),
                "branch3x3dbl_3a": ConvSpec(384, 384, (1, 3), 1, (0, 1)),
                "branch3x3dbl_3b": ConvSpec(384, 384, (3, 1), 1, (1, 0)),
                "branch_pool": ConvSpec(cin, 192, one)}
    raise ValueError(f"block_convs: unknown Inception block kind {kind!r}")


def conv_specs() -> dict:
    """``{"Conv2d_1a_3x3": ConvSpec, "Mixed_5b/branch1x1": ConvSpec, ...}``: every BasicConv2d of
    the FID Inception in forward (= PyTorch registration) order; 94 convolutions."""
    specs = dict(STEM)
    for name, kind, cin, arg in MIXED:
        specs.update({f"{name}/{b}": s for b, s in block_convs(kind, cin, arg).items()})
    return specs


class BasicConv2d(nn.Module):
    """torchvision's BasicConv2d: bias-free conv -> BatchNorm (inference) -> ReLU, NHWC."""

    spec: ConvSpec
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = self.spec
        x = nn.Conv(s.cout, s.kernel, strides=(s.stride, s.stride),
                    padding=((s.padding[0], s.padding[0]), (s.padding[1], s.padding[1])),
                    use_bias=False, dtype=self.dtype, name="conv")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=self.eps, dtype=self.dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_3x3(x: Array) -> Array:
    """3x3/1 average pool, padding 1, padded zeros not counted (TensorFlow / pytorch-fid)."""
    return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


class MixedBlock(nn.Module):
    """One Mixed block: kind "A" (FIDInceptionA), "B", "C" (FIDInceptionC), "D", "E1"
    (FIDInceptionE_1, average pool), "E2" (FIDInceptionE_2, max pool). Branches are concatenated
    on the channel axis in torchvision's order."""

    kind: str
    cin: int
    arg: Any
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: Array) -> Array:
        specs = block_convs(self.kind, self.cin, self.arg)

        def c(name, y):
            return BasicConv2d(specs[name], self.eps, self.dtype, name=name)(y)

        k = self.kind
        if k == "A":
            b5 = c("branch5x5_2", c("branch5x5_1", x))
            b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
            return jnp.concatenate([c("branch1x1", x), b5, b3, c("branch_pool", _avg_pool_3x3(x))], axis=-1)
        if k == "B":
            b3 = c("branch3x3dbl_3", c("branch3x3dbl_2", c("branch3x3dbl_1", x)))
            pool = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            return jnp.concatenate([c("branch3x3", x), b3, pool], axis=-1)
        if k == "C":
            b7 = c("branch7x7_3", c("branch7x7_2", c("branch7x7_1", x)))
            bd = x
            for i in range(1, 6):
                bd = c(f"branch7x7dbl_{i}", bd)
            return jnp.concatenate([c("branch1x1", x), b7, bd, c("branch_pool", _avg_pool_3x3(x))], axis=-1)
        if k == "D":
            b3 = c("branch3x3_2", c("branch3x3_1", x))
            b7 = c("branch7x7x3_4", c("branch7x7x3_3", c("branch7x7x3_2", c("branch7x7x3_1", x))))
            pool = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
            return jnp.concatenate([b3, b7, pool], axis=-1)
        # E1 / E2
        b3 = c("branch3x3_1", x)
        b3 = jnp.concatenate([c("branch3x3_2a", b3), c("branch3x3_2b", b3)], axis=-1)
        bd = c("branch3x3dbl_2", c("branch3x3dbl_1", x))
        bd = jnp.concatenate([c("branch3x3dbl_3a", bd), c("branch3x3dbl_3b", bd)], axis=-1)
        if k == "E1":
            pool = _avg_pool_3x3(x)
        else:   # pytorch-fid: "The FID Inception model uses max pooling instead of average pooling"
            pool = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
        return jnp.concatenate([c("branch1x1", x), b3, bd, c("branch_pool", pool)], axis=-1)


class InceptionV3(nn.Module):
    """FID Inception-v3 trunk: ``x [B, H, W, 3]`` in [-1, 1], already resized (H, W >= 75) ->
    pool3 features [B, 2048] float32. Apply with ``{"params", "batch_stats"}``."""

    config: InceptionConfig = DEFAULT_CONFIG

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        dt = jnp.dtype(cfg.dtype)
        x = x.astype(dt)
        for i, (name, spec) in enumerate(STEM):
            x = BasicConv2d(spec, cfg.bn_eps, dt, name=name)(x)
            if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):      # maxpool1, maxpool2
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")
        for name, kind, cin, arg in MIXED:
            x = MixedBlock(kind, cin, arg, cfg.bn_eps, dt, name=name)(x)
        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


@functools.lru_cache(maxsize=None)
def _model(config: InceptionConfig) -> InceptionV3:
    return InceptionV3(config)


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------

def expected_shapes() -> dict:
    """``{"params/Conv2d_1a_3x3/conv/kernel": (3, 3, 3, 32), ...}``: every variable's shape, in
    forward order ("params" first, then "batch_stats"); the same tree as ``InceptionV3().init``
    (tested). The architecture is fixed: it does not depend on the config."""
    return dict(_expected_shapes())


@functools.lru_cache(maxsize=None)
def _expected_shapes() -> dict:
    params, stats = {}, {}
    for path, s in conv_specs().items():
        params[f"params/{path}/conv/kernel"] = (s.kernel[0], s.kernel[1], s.cin, s.cout)
        params[f"params/{path}/bn/scale"] = params[f"params/{path}/bn/bias"] = (s.cout,)
        stats[f"batch_stats/{path}/bn/mean"] = stats[f"batch_stats/{path}/bn/var"] = (s.cout,)
    return {**params, **stats}


def init_params(seed: int = 0) -> dict:
    """Random variables ``{"params", "batch_stats"}`` (NumPy float32: conv kernels ~ N(0, 2/fan_in),
    BN scale 1 / bias 0, running stats 0 / 1) for tests and smoke runs; real weights come from
    ``convert_state_dict``. (NumPy, not ``Module.init``: no compilation.)"""
    rng = np.random.default_rng(seed)
    flat = {}
    for k, shape in expected_shapes().items():
        leaf = k.rsplit("/", 1)[-1]
        if leaf == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            flat[k] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        elif leaf in ("scale", "var"):
            flat[k] = np.ones(shape, np.float32)
        else:
            flat[k] = np.zeros(shape, np.float32)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def _to_dict(tree):
    """Plain nested dicts (FrozenDict / mappings)."""
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def check_params(params, where: str = "inception") -> None:
    """Raise ValueError naming the first missing / unexpected / wrongly shaped variable."""
    if not isinstance(params, Mapping) or "params" not in params:
        keys = f" with keys {sorted(params)}" if isinstance(params, Mapping) else ""
        raise ValueError(f"{where}: expected the Flax variables dict {{'params', 'batch_stats'}}, got "
                         f"{type(params).__name__}{keys}")
    want = expected_shapes()
    got = {k: tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(_to_dict(params), sep="/").items()}
    for k, shape in want.items():
        if k not in got:
            raise ValueError(f"{where}: variable {k!r} is missing (expected shape {shape})")
        if got[k] != shape:
            raise ValueError(f"{where}: variable {k!r} has shape {got[k]}, expected {shape}")
    extra = [k for k in got if k not in want]
    if extra:
        raise ValueError(f"{where}: unexpected variable {extra[0]!r} (shape {got[extra[0]]})")


# --------------------------------------------------------------------------------------------
# preprocessing and features
# --------------------------------------------------------------------------------------------

def resize(x: Array, size: tuple) -> Array:
    """Bilinear resize of ``x [B, H, W, C]`` to ``size = (H', W')``, half-pixel centres and no
    antialiasing: torch ``F.interpolate(mode="bilinear", align_corners=False)`` (pytorch-fid)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    return jax.image.resize(x, (x.shape[0], size[0], size[1], x.shape[3]), method="bilinear", antialias=False)


def preprocess(x: Array, size=DEFAULT_CONFIG.image_size) -> Array:
    """``x [B, H, W, 3]`` in [-1, 1] -> resized to ``size`` ((H, W), an int = square, None = keep)
    float32 [B, H', W', 3]; ValueError for a wrong shape or an image below 75x75."""
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"inception.preprocess: expected images [B, H, W, 3] (NHWC, RGB), got shape "
                         f"{tuple(x.shape)}")
    x = jnp.asarray(x, jnp.float32)
    if size is None:
        if min(x.shape[1:3]) < MIN_SIZE:
            raise ValueError(f"inception.preprocess: images of {x.shape[1]}x{x.shape[2]} are below Inception-v3's "
                             f"smallest input {MIN_SIZE}x{MIN_SIZE}; set InceptionConfig.image_size to resize them")
        return x
    return resize(x, _check_size(size, "inception.preprocess: size"))


def inception_features(params, x: Array, config: InceptionConfig = DEFAULT_CONFIG) -> Array:
    """``x [B, H, W, 3]`` in [-1, 1] -> pool3 features [B, 2048] float32 (``preprocess`` to
    ``config.image_size``, then the network). Pure and differentiable in ``x``; jit it yourself
    or use ``compute_features``."""
    return _model(config).apply(params, preprocess(x, config.image_size))


@functools.lru_cache(maxsize=None)
def _jitted_features(config: InceptionConfig) -> Callable:
    return jax.jit(functools.partial(inception_features, config=config))


def _as_images(images, where: str, min_n: int = 1) -> np.ndarray:
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) < min_n:
        raise ValueError(f"{where}: expected images [N >= {min_n}, H, W, 3] (NHWC, RGB, in [-1, 1]), got shape "
                         f"{images.shape}")
    return images


def compute_features(params, images, config: InceptionConfig = DEFAULT_CONFIG, *, batch_size: int = 50,
                     clip: bool = False) -> np.ndarray:
    """pool3 features [N, 2048] (NumPy float32) of ``images [N, H, W, 3]`` in [-1, 1], jitted, in
    batches of ``batch_size`` (the last batch zero-padded, so one compilation per input shape);
    ``clip`` clips the images to [-1, 1] first."""
    images = _as_images(images, "inception.compute_features")
    if int(batch_size) <= 0:
        raise ValueError(f"inception.compute_features: batch_size must be positive, got {batch_size}")
    if config.image_size is None and min(images.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"inception.compute_features: images of {images.shape[1]}x{images.shape[2]} are below "
                         f"{MIN_SIZE}x{MIN_SIZE}; set InceptionConfig.image_size to resize them")
    check_params(params, "inception.compute_features")
    params = jax.tree.map(jnp.asarray, _to_dict(params))
    if clip:
        images = np.clip(images, -1.0, 1.0)
    f = _jitted_features(config)
    b = min(int(batch_size), len(images))
    out = []
    for i in range(0, len(images), b):
        chunk = images[i:i + b]
        n = len(chunk)
        if n < b:
            chunk = np.concatenate([chunk, np.zeros((b - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(f(params, jnp.asarray(chunk)))[:n])
    return np.concatenate(out)


def fid(params, images_a, images_b, config: InceptionConfig = DEFAULT_CONFIG, *, batch_size: int = 50,
        clip: bool = True) -> float:
    """FID: ``amg_jax.evaluation.metrics.frechet_distance`` of the pool3 features of ``images_a [N, H, W, 3]``
    and ``images_b [M, H', W', 3]`` (both in [-1, 1], N, M >= 2; clipped to [-1, 1] unless
    ``clip=False``). With N + M <= 2048 it is computed exactly in the features' span
    (``span_projection``), which is much faster. Published FIDs use ``image_size=299``, the
    converted FID weights and 10k-50k images; with fewer images than 2048 the covariances are
    rank-deficient and the value is biased upwards (compare FIDs only at equal N, M)."""
    a = _as_images(images_a, "inception.fid: images_a", 2)
    b = _as_images(images_b, "inception.fid: images_b", 2)
    fa = compute_features(params, a, config, batch_size=batch_size, clip=clip)
    fb = compute_features(params, b, config, batch_size=batch_size, clip=clip)
    return metrics.frechet_distance(*span_projection(fa, fb))


def span_projection(feats_a, feats_b) -> tuple[np.ndarray, np.ndarray]:
    """Both feature sets [N, D], [M, D] in an orthonormal basis (of N + M vectors) containing the
    affine span of all N + M points: float64 [N, N + M], [M, N + M] when N + M <= D, else
    unchanged (float64).

    The Fréchet distance is invariant under translations and orthogonal maps, and both Gaussian
    fits live in that span (their covariances vanish outside it, their means differ inside it),
    so ``frechet_distance`` of the projections is exact and costs O(k^3) instead of O(D^3)
    (D = 2048: ~30 s of eigendecompositions on a busy CPU; a few hundred images: milliseconds).
    """
    a = np.asarray(feats_a, np.float64)
    b = np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) + len(b) > a.shape[1]:
        return a, b
    origin = b.mean(axis=0)
    pts = np.concatenate([a, b]) - origin
    q, _ = np.linalg.qr(pts.T)                # [D, N + M]: spans every point (minus origin)
    return (a - origin) @ q, (b - origin) @ q


# --------------------------------------------------------------------------------------------
# conversion from PyTorch (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)
# --------------------------------------------------------------------------------------------

_IGNORED_PREFIXES = ("fc.", "AuxLogits.")
# pytorch-fid's InceptionV3 wrapper registers the same modules as ``blocks.{i}.{j}``.
_WRAPPER_NAMES = {
    "blocks.0.0": "Conv2d_1a_3x3", "blocks.0.1": "Conv2d_2a_3x3", "blocks.0.2": "Conv2d_2b_3x3",
    "blocks.1.0": "Conv2d_3b_1x1", "blocks.1.1": "Conv2d_4a_3x3",
    **{f"blocks.2.{j}": n for j, n in enumerate(["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                                                  "Mixed_6c", "Mixed_6d", "Mixed_6e"])},
    **{f"blocks.3.{j}": n for j, n in enumerate(["Mixed_7a", "Mixed_7b", "Mixed_7c"])},
}
# torch leaf -> (collection, flax leaf)
_BN_LEAVES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
              "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def torch_key_map() -> dict:
    """``{torch state-dict key: flax variable path}`` for every tensor the FID Inception uses,
    e.g. ``"Mixed_5b.branch1x1.conv.weight" -> "params/Mixed_5b/branch1x1/conv/kernel"``."""
    out = {}
    for path in conv_specs():
        t = path.replace("/", ".")
        out[f"{t}.conv.weight"] = f"params/{path}/conv/kernel"
        for leaf, (col, fl) in _BN_LEAVES.items():
            out[f"{t}.bn.{leaf}"] = f"{col}/{path}/bn/{fl}"
    return out


def _to_numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) in ("torch.float16", "torch.bfloat16", "torch.float64"):
            t = t.float()
        return t.numpy()
    return np.asarray(t)


def _load_state_dict(src) -> tuple[dict, str]:
    """({key: tensor or array}, source name) from a file path, a torch module or a mapping."""
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"convert_state_dict: no such file: {path!r} (the FID Inception weights are "
                                    f"{FID_WEIGHTS_FILE} from mseitzer/pytorch-fid's releases)")
        import torch    # optional (the torch extra): only to read PyTorch weights

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            msg = str(e)        # torch's advice to load unsafely (weights_only=False) does not fix a damaged file
            msg = msg.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in msg else msg
            first = (msg.strip().splitlines() or [""])[0][:300]
            raise ValueError(f"convert_state_dict: could not read {path!r} as a PyTorch state dict (is the file "
                             f"complete / not corrupted?): {type(e).__name__}: {first}") from None
        sd, _ = _load_state_dict(obj)
        return sd, os.path.basename(path)
    if hasattr(src, "state_dict") and callable(src.state_dict):
        return dict(src.state_dict()), type(src).__name__
    if isinstance(src, Mapping):
        for wrapper in ("state_dict", "model", "model_state_dict"):
            if wrapper in src and isinstance(src[wrapper], Mapping):
                return _load_state_dict(src[wrapper])
        return dict(src), "state dict"
    raise ValueError(f"convert_state_dict: expected a file path, a torch module or a state dict, "
                     f"got {type(src).__name__}")


def _normalise_keys(sd: dict) -> tuple[dict, list]:
    """Strip a DataParallel ``module.`` prefix, map pytorch-fid's ``blocks.i.j`` wrapper names onto
    torchvision's, drop what FID does not use (``fc``, ``AuxLogits``, ``num_batches_tracked``).
    Returns (state dict, ignored keys)."""
    keys = list(sd)
    if keys and all(k.startswith("module.") for k in keys):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    out, ignored = {}, []
    for k, v in sd.items():
        if not isinstance(k, str):
            raise ValueError(f"convert_state_dict: state-dict key {k!r} is not a string")
        head, sep, rest = k.partition(".")
        if head == "blocks":
            prefix = ".".join(k.split(".")[:3])
            if prefix in _WRAPPER_NAMES:
                k = _WRAPPER_NAMES[prefix] + k[len(prefix):]
        if k.endswith("num_batches_tracked") or k.startswith(_IGNORED_PREFIXES):
            ignored.append(k)
            continue
        out[k] = v
    return out, ignored


def convert_state_dict(src, *, return_ignored: bool = False):
    """pytorch-fid's FID Inception (torchvision ``Inception3`` key names) -> Flax variables
    ``{"params", "batch_stats"}`` (float32 NumPy arrays).

    src: ``pt_inception-2015-12-05-6726825d.pth`` (a torch state dict; loaded with
         ``weights_only=True``), any path to a ``torch.save``'d state dict, a torch module, or a
         mapping of tensors / arrays. Keys are mapped by name (``torch_key_map``):
         ``X.conv.weight`` OIHW -> ``params/X/conv/kernel`` HWIO, ``X.bn.weight/bias`` ->
         ``params/X/bn/scale/bias``, ``X.bn.running_mean/var`` -> ``batch_stats/X/bn/mean/var``.
         ``fc.*`` (the 1008-class classifier), ``AuxLogits.*`` and ``num_batches_tracked`` are
         ignored; a ``module.`` prefix and pytorch-fid's ``blocks.i.j`` wrapper names are accepted.

    ValueError naming the key for a missing key, an unexpected key or a wrongly shaped tensor.
    ``return_ignored=True`` returns ``(variables, ignored keys)``.
    """
    sd, _ = _load_state_dict(src)
    sd, ignored = _normalise_keys(sd)
    kmap = torch_key_map()
    shapes = expected_shapes()
    unexpected = [k for k in sd if k not in kmap]
    if unexpected:
        raise ValueError(f"convert_state_dict: unexpected key {unexpected[0]!r}"
                         f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}: not a tensor "
                         f"of the FID Inception-v3 (torchvision Inception3 names, e.g. "
                         f"'Mixed_5b.branch1x1.conv.weight')")
    missing = [k for k in kmap if k not in sd]
    if missing:
        raise ValueError(f"convert_state_dict: missing key {missing[0]!r}"
                         f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: the state dict is "
                         f"not a complete FID Inception-v3 ({len(sd)} of {len(kmap)} tensors present)")
    flat = {}
    for tk, fk in kmap.items():
        try:
            a = np.asarray(_to_numpy(sd[tk]), np.float32)
        except Exception as e:
            raise ValueError(f"convert_state_dict: key {tk!r} is not a numeric tensor "
                             f"({type(sd[tk]).__name__}: {e})") from None
        if fk.endswith("/kernel"):
            if a.ndim != 4:
                raise ValueError(f"convert_state_dict: key {tk!r} has shape {a.shape}, expected a 4-D conv "
                                 f"weight (O, I, kH, kW)")
            a = np.ascontiguousarray(a.transpose(2, 3, 1, 0))
        if a.shape != shapes[fk]:
            want = shapes[fk]
            torch_want = (want[3], want[2], want[0], want[1]) if fk.endswith("/kernel") else want
            got = (a.shape[3], a.shape[2], a.shape[0], a.shape[1]) if fk.endswith("/kernel") else a.shape
            raise ValueError(f"convert_state_dict: key {tk!r} has shape {tuple(got)}, the FID Inception-v3 "
                             f"expects {tuple(torch_want)}")
        flat[tuple(fk.split("/"))] = a
    variables = traverse_util.unflatten_dict(flat)
    check_params(variables, "convert_state_dict")
    return (variables, ignored) if return_ignored else variables


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def save_params(path, params, config: InceptionConfig = DEFAULT_CONFIG) -> str:
    """Write ``params`` (the variables dict, checked) and ``config`` to one ``.npz`` (keys
    ``params/Conv2d_1a_3x3/conv/kernel`` ..., ``__config__`` = JSON), atomically; returns the path."""
    check_params(params, "inception.save_params")
    if not isinstance(config, InceptionConfig):
        raise ValueError(f"inception.save_params: config must be an InceptionConfig, got {type(config).__name__}")
    return save_variables(path, _to_dict(params), config, PARAMS_FORMAT)


def load_params(path) -> tuple[dict, InceptionConfig]:
    """``(variables, config)`` from ``save_params``' file; FileNotFoundError if it is missing,
    ValueError naming the file if it is corrupt, not an Inception params file, or a variable is
    missing / wrongly shaped."""
    params, config = load_variables(path, PARAMS_FORMAT, InceptionConfig, "inception.load_params",
                                    "Inception params", f" (make one with `amg convert inception {FID_WEIGHTS_FILE} OUT.npz` / "
                                    "inception.convert_file)")
    check_params(params, f"inception.load_params({os.fspath(path)!r})")
    return params, config


def convert_file(src, dst, config: InceptionConfig = DEFAULT_CONFIG) -> str:
    """``amg convert inception SRC DST``: pytorch-fid's weights file (or any state dict of its FID
    Inception) -> ``.npz`` for ``load_params``. Returns a one-line summary."""
    name = os.path.basename(os.fspath(src)) if isinstance(src, (str, os.PathLike)) else type(src).__name__
    variables, ignored = convert_state_dict(src, return_ignored=True)
    out = save_params(dst, variables, config)
    n = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    dropped = sorted({k.split(".")[0] for k in ignored if not k.endswith("num_batches_tracked")})
    note = f", ignored {', '.join(dropped)} (not used for FID)" if dropped else ""
    size = "no resize" if config.image_size is None else "input resized to {}x{}".format(*config.image_size)
    return (f"converted {name} -> {out}: FID Inception-v3, {len(conv_specs())} conv+BN layers, "
            f"{n / 1e6:.2f}M params, pool3 features {FEATURE_DIM}-d, {size}{note}")


__all__ = [
    "DEFAULT_CONFIG", "FEATURE_DIM", "FID_WEIGHTS_FILE", "MIN_SIZE", "BasicConv2d", "ConvSpec", "InceptionConfig",
    "InceptionV3", "MixedBlock", "block_convs", "check_params", "compute_features", "conv_specs", "convert_file",
    "convert_state_dict", "expected_shapes", "fid", "inception_features", "init_params", "load_params",
    "preprocess", "resize", "save_params", "span_projection", "torch_key_map",
]
