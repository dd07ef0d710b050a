"""Pixel-level similarity: nearest neighbours, Carlini's nL2, pixel cosine, and the pixel detector.

Everything here is pure JAX, batched over the leading axis, jit-able, and differentiable in
the query ``x`` (the reference set is a constant).

Two rules from METHODS.md ("Pitfalls measured on a closed-form memorizer"):

1. Neighbours are *chosen* with the expanded form ``|x|^2 - 2 x.z + |z|^2`` (one matmul +
   ``lax.top_k``), but every distance that is *returned* (and differentiated) is computed
   directly as ``||x - z||``. The expanded form has an error of ~0.1 near a copy in float32
   and a gradient of exactly 0 at ``x == z``. The chosen candidates are re-ranked by the
   direct distance, so the returned order is the exact one among the candidates.
2. nL2 expects a **deduplicated** reference set: exact duplicates put zero distances into
   the k-NN mean and push nL2 of a copy towards 0/0. ``dedup_reference`` removes them;
   ``pixel_detector`` applies it by default (``PixelDetectorConfig.dedup = True``) and maps
   neighbour indices back to the caller's original rows (the first occurrence of each image).

Shapes: queries ``x`` are ``[B, ...]`` (e.g. [B, H, W, C]); references ``ref`` are
``[M, ...]`` with the same per-sample size (``[M, H, W, C]`` or already flattened
``[M, D]``). Distances are Euclidean over all pixels (no per-pixel normalisation).

nL2 (Carlini et al. 2023)::

    nL2(x) = ||x - n0|| / (alpha * mean_{z in kNN_k(x)} ||x - z||)

with ``n0`` the nearest neighbour, ``k = 50``, ``alpha = 0.5``; the k-NN mean includes
``n0`` itself, so ``0 <= nL2 <= 1 / alpha`` (= 2). Lower = more memorized; Carlini's
threshold is ``nL2 < 1.4``. ``k`` is clamped to the reference size. The detector reports
``sigma = -nL2`` (higher = more memorized, range ``[-1/alpha, 0]``).

Gradients: ``||x - z||`` has a kink at ``x == z``; there the gradient is defined as 0 (finite,
never NaN). Next to a copy the gradient of nL2 is nonzero and points away from ``n0``. A
guidance that must push an *exact* copy needs a fallback direction (METHODS.md pitfall 6).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------- helpers

def flatten(x: Array) -> Array:
    """[B, ...] -> [B, D] (float32)."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("expected a batch [B, ...], got a scalar")
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def safe_norm(v: Array, axis: int = -1) -> Array:
    """Euclidean norm along ``axis`` whose gradient is 0 (not NaN) where the norm is 0."""
    s = jnp.sum(jnp.square(v), axis=axis)
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def squared_norms(ref: Array) -> Array:
    """|z|^2 per reference row: [M, ...] -> [M] (precompute once per bank)."""
    r = flatten(ref)
    return jnp.sum(jnp.square(r), axis=-1)


def _check_dims(xf: Array, rf: Array) -> None:
    if rf.shape[0] == 0:
        raise ValueError("the reference set is empty")
    if xf.shape[1] != rf.shape[1]:
        raise ValueError(
            f"query and reference sizes differ: a query has {xf.shape[1]} values, "
            f"a reference row {rf.shape[1]}")


def dedup_reference(ref) -> tuple[np.ndarray, np.ndarray]:
    """Remove exact duplicates (bitwise-equal values) from a reference set (NumPy, host side).

    Returns ``(unique [M', ...], kept_index [M'] int32)``: the first occurrence of each
    distinct image, in original order, and its row in ``ref`` (so ``unique == ref[kept]``).
    nL2 expects a reference deduplicated this way (see the module docstring). Not jit-able
    (the output size depends on the data); call it once when building a bank.
    """
    ref = np.asarray(ref)
    if ref.ndim < 1 or ref.shape[0] == 0:
        raise ValueError(f"dedup_reference: expected a non-empty [M, ...] array, got shape {ref.shape}")
    flat = np.ascontiguousarray(ref.reshape(ref.shape[0], -1))
    _, first = np.unique(flat, axis=0, return_index=True)
    kept = np.sort(first).astype(np.int32)
    return ref[kept], kept


# ----------------------------------------------------------------------------- neighbours

def knn(x: Array, ref: Array, k: int, *, ref_sq: Array | None = None) -> tuple[Array, Array]:
    """The k nearest reference rows of each query by L2.

    Candidates are chosen with the expanded form (matmul + ``lax.top_k``); the distances
    returned are direct ``||x - z||`` (differentiable in ``x``), sorted ascending.
    ``k`` is clamped to the reference size.

    Returns ``(dist [B, k'], index [B, k'] int32)`` with ``k' = min(k, M)``.
    """
    xf, rf = flatten(x), flatten(ref)
    _check_dims(xf, rf)
    k = int(min(int(k), rf.shape[0]))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if ref_sq is None:
        ref_sq = jnp.sum(jnp.square(rf), axis=-1)
    # |x|^2 - d^2 = 2 x.z - |z|^2: the larger, the nearer (|x|^2 is constant per row).
    xs = jax.lax.stop_gradient(xf)
    scores = 2.0 * jnp.matmul(xs, rf.T, precision=_HIGHEST) - ref_sq[None, :]
    _, cand = jax.lax.top_k(scores, k)                      # [B, k]
    nbrs = jnp.take(rf, cand, axis=0)                       # [B, k, D]
    dist = safe_norm(xf[:, None, :] - nbrs, axis=-1)        # [B, k] direct distances
    order = jnp.argsort(jax.lax.stop_gradient(dist), axis=-1, stable=True)
    dist = jnp.take_along_axis(dist, order, axis=-1)
    cand = jnp.take_along_axis(cand, order, axis=-1)
    return dist, cand.astype(jnp.int32)


def nearest_neighbor(x: Array, ref: Array, *, ref_sq: Array | None = None,
                     num_candidates: int = 4) -> tuple[Array, Array]:
    """Nearest reference row of each query by L2: ``(dist [B], index [B] int32)``.

    The ``num_candidates`` best rows by the expanded form are re-ranked by the direct
    distance (guards against float32 mis-ranking of near ties); ``dist`` is direct.
    """
    dist, idx = knn(x, ref, max(1, int(num_candidates)), ref_sq=ref_sq)
    return dist[:, 0], idx[:, 0]


class NL2Result(NamedTuple):
    """Per-sample nL2 and its parts (all [B])."""

    nl2: Array        # ||x - n0|| / (alpha * knn_mean); lower = more memorized
    index: Array      # int32 row of n0 in the reference passed in
    nn_dist: Array    # ||x - n0||
    knn_mean: Array   # mean_{z in kNN_k(x)} ||x - z||  (includes n0)


def nl2(x: Array, ref: Array, *, k: int = 50, alpha: float = 0.5, ref_sq: Array | None = None,
        eps: float = 1e-12) -> NL2Result:
    """Carlini's normalised L2 of each query against ``ref`` (expects a deduplicated ``ref``).

    ``nl2 = ||x - n0|| / max(alpha * mean_kNN ||x - z||, eps)``, ``k`` clamped to ``M``.
    """
    dist, idx = knn(x, ref, k, ref_sq=ref_sq)
    m = jnp.mean(dist, axis=-1)
    denom = jnp.maximum(alpha * m, eps)
    return NL2Result(nl2=dist[:, 0] / denom, index=idx[:, 0], nn_dist=dist[:, 0], knn_mean=m)


# ----------------------------------------------------------------------------- cosine

def cosine_similarity(a: Array, b: Array, eps: float = 1e-12) -> Array:
    """Pixel cosine similarity of paired samples: [B, ...] x [B, ...] -> [B]."""
    af, bf = flatten(a), flatten(b)
    num = jnp.sum(af * bf, axis=-1)
    return num / jnp.maximum(safe_norm(af) * safe_norm(bf), eps)


def pixel_cosine(x: Array, ref: Array, *, by: str = "cosine", ref_sq: Array | None = None,
                 num_candidates: int = 4) -> tuple[Array, Array]:
    """Pixel cosine similarity of each query to its nearest reference row.

    ``by="cosine"``: the neighbour is the row with the highest cosine; ``by="l2"``: the L2
    nearest neighbour. Candidates come from one matmul + ``top_k``; the returned cosine is
    computed directly from the pair (differentiable in ``x``).
    Returns ``(cos [B], index [B] int32)``.
    """
    xf, rf = flatten(x), flatten(ref)
    _check_dims(xf, rf)
    if by == "l2":
        _, idx = nearest_neighbor(xf, rf, ref_sq=ref_sq, num_candidates=num_candidates)
        return cosine_similarity(xf, jnp.take(rf, idx, axis=0)), idx
    if by != "cosine":
        raise ValueError(f"pixel_cosine: by must be 'cosine' or 'l2', got {by!r}")
    if ref_sq is None:
        ref_sq = jnp.sum(jnp.square(rf), axis=-1)
    rn = rf / jnp.maximum(jnp.sqrt(ref_sq), 1e-12)[:, None]
    kc = int(min(max(1, int(num_candidates)), rf.shape[0]))
    scores = jnp.matmul(jax.lax.stop_gradient(xf), rn.T, precision=_HIGHEST)
    _, cand = jax.lax.top_k(scores, kc)                                    # [B, kc]
    nbrs = jnp.take(rf, cand, axis=0)                                      # [B, kc, D]
    num = jnp.sum(xf[:, None, :] * nbrs, axis=-1)
    cos = num / jnp.maximum(safe_norm(xf)[:, None] * safe_norm(nbrs, axis=-1), 1e-12)
    best = jnp.argmax(jax.lax.stop_gradient(cos), axis=-1)
    return (jnp.take_along_axis(cos, best[:, None], axis=-1)[:, 0],
            jnp.take_along_axis(cand, best[:, None], axis=-1)[:, 0].astype(jnp.int32))


# ----------------------------------------------------------------------------- detector

DETECTOR_KINDS = ("nl2", "cosine")


@dataclasses.dataclass(frozen=True)
class PixelDetectorConfig:
    """Config of a pixel-level detector (hashable).

    kind:  "nl2"    -> sigma = -nL2, in [-1/alpha, 0] (Carlini: memorized when nL2 < 1.4,
                       i.e. sigma > -1.4);
           "cosine" -> sigma = pixel cosine to the most cosine-similar reference row, in [-1, 1].
    k, alpha: nL2's neighbourhood size (clamped to the bank size) and normaliser.
    dedup: remove exact duplicates from the reference before use (on by default; nL2
           needs it, METHODS.md pitfall 2). Neighbour indices always refer to the rows
           of the reference as passed in (first occurrence of a duplicated image).
    eps:   floor of nL2's denominator.
    """

    kind: str = "nl2"
    k: int = 50
    alpha: float = 0.5
    dedup: bool = True
    eps: float = 1e-12

    def __post_init__(self):
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"PixelDetectorConfig.kind must be one of {DETECTOR_KINDS}, got {self.kind!r}")
        if int(self.k) < 1:
            raise ValueError(f"PixelDetectorConfig.k must be >= 1, got {self.k}")
        if not float(self.alpha) > 0:
            raise ValueError(f"PixelDetectorConfig.alpha must be > 0, got {self.alpha}")
        if not float(self.eps) > 0:
            raise ValueError(f"PixelDetectorConfig.eps must be > 0, got {self.eps}")

    def sigma_range(self) -> tuple[float, float]:
        """The interval sigma lies in (for validating gate thresholds, METHODS.md pitfall 3)."""
        return (-1.0 / float(self.alpha), 0.0) if self.kind == "nl2" else (-1.0, 1.0)


@struct.dataclass
class PixelDetector:
    """``x0_hat [B, ...] -> (sigma [B], neighbour_index [B])``, higher sigma = more memorized.

    A pytree: the reference arrays are traced leaves (pass the detector into ``jit`` as an
    argument, not as a closed-over constant), the config is static. Build with
    ``pixel_detector``.

    ref:          [M', D] float32 reference rows (deduplicated when ``config.dedup``).
    ref_sq:       [M'] their squared norms.
    source_index: [M'] int32 row of each in the reference passed to ``pixel_detector``.
    """

    ref: Array
    ref_sq: Array
    source_index: Array
    config: PixelDetectorConfig = struct.field(pytree_node=False, default_factory=PixelDetectorConfig)
    sample_shape: tuple = struct.field(pytree_node=False, default=())

    def __call__(self, x0_hat: Array) -> tuple[Array, Array]:
        d = self.details(x0_hat)
        return d["sigma"], d["index"]

    def details(self, x0_hat: Array) -> dict:
        """sigma, index (original rows) and the raw scores: nl2/nn_dist/knn_mean or cosine."""
        c = self.config
        if int(np.prod(x0_hat.shape[1:])) != int(self.ref.shape[1]):
            raise ValueError(f"detector: sample shape {tuple(x0_hat.shape[1:])} does not match the "
                             f"reference's {tuple(self.sample_shape)}")
        if c.kind == "nl2":
            r = nl2(x0_hat, self.ref, k=c.k, alpha=c.alpha, ref_sq=self.ref_sq, eps=c.eps)
            idx = jnp.take(self.source_index, r.index)
            return {"sigma": -r.nl2, "index": idx, "nl2": r.nl2, "nn_dist": r.nn_dist,
                    "knn_mean": r.knn_mean}
        cos, i = pixel_cosine(x0_hat, self.ref, by="cosine", ref_sq=self.ref_sq)
        return {"sigma": cos, "index": jnp.take(self.source_index, i), "cosine": cos}

    @property
    def size(self) -> int:
        return int(self.ref.shape[0])


def pixel_detector(reference, config: PixelDetectorConfig | None = None, **overrides) -> PixelDetector:
    """Build a pixel detector over ``reference [M, ...]`` (host-side; validates the input).

    ``pixel_detector(train_images)`` is the nL2 detector (k=50, alpha=0.5, dedup on);
    ``pixel_detector(train_images, kind="cosine")`` the pixel-cosine one.
    """
    config = dataclasses.replace(config or PixelDetectorConfig(), **overrides)
    ref = np.asarray(reference, np.float32)
    if ref.ndim < 2 or ref.shape[0] == 0:
        raise ValueError(f"pixel_detector: reference must be a non-empty [M, ...] array, got shape {ref.shape}")
    if not np.all(np.isfinite(ref)):
        raise ValueError("pixel_detector: reference contains NaN or inf")
    if config.dedup:
        ref, kept = dedup_reference(ref)
    else:
        kept = np.arange(ref.shape[0], dtype=np.int32)
    flat = jnp.asarray(ref.reshape(ref.shape[0], -1))
    return PixelDetector(ref=flat, ref_sq=jnp.sum(jnp.square(flat), axis=-1),
                         source_index=jnp.asarray(kept, jnp.int32), config=config,
                         sample_shape=tuple(ref.shape[1:]))
