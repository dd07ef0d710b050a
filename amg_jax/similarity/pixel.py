"""Pixel-level similarity: nearest neighbours, Carlini's nL2, pixel cosine, and the pixel detector.

Everything here is pure JAX, batched over the leading axis, jit-able, and differentiable in
the query ``x`` (the reference set is a constant).

Two rules from the README ("The methods", "Pitfalls"):

1. Neighbours are *chosen* with the expanded form ``|x|^2 - 2 x.z + |z|^2`` (one matmul +
   ``lax.top_k``), but every distance that is *returned* (and differentiated) is computed
   directly as ``||x - z||``. The expanded form has an error of ~0.1 near a copy in float32
   and a gradient of exactly 0 at ``x == z``. The chosen candidates are re-ranked by the
   direct distance, so the returned order is the exact one among the candidates.
2. nL2 expects a **deduplicated** reference set: exact duplicates put zero distances into
   the k-NN mean and push nL2 of a copy towards 0/0. ``dedup_reference`` removes them;
   the detector's ``ReferenceBank`` (``amg_jax.index``) applies it by default (``dedup=True``)
   and maps neighbour indices back to the caller's original rows (first occurrences).

Shapes: queries ``x`` are ``[B, ...]`` (e.g. [B, H, W, C]); references ``ref`` are
``[M, ...]`` with the same per-sample size (``[M, H, W, C]`` or already flattened
``[M, D]``). Distances are Euclidean over all pixels (no per-pixel normalisation).

nL2 (Carlini et al. 2023)::

    nL2(x) = ||x - n0|| / (alpha * mean_{z in kNN_k(x)} ||x - z||)

with ``n0`` the nearest neighbour, ``k = 50``, ``alpha = 0.5``; the k-NN mean includes
``n0`` itself, so ``0 <= nL2 <= 1 / alpha`` (= 2). Lower = more memorized; Carlini's
threshold is ``nL2 < 1.4``. ``k`` is clamped to the reference size. The detector reports
``sigma = -nL2`` (higher = more memorized, range ``[-1/alpha, 0]``).

Gradients: ``||x - z||`` has a kink at ``x == z``; in ``knn`` / ``nl2`` the gradient there is
defined as 0 (finite, never NaN). Next to a copy the gradient of nL2 is nonzero and points
away from ``n0``. The detector (``PixelDetector``, kind "nl2") gives an *exact* copy a nonzero
gradient as well: at ``x0_hat == n0`` the numerator's derivative is the unit vector from the
mean of n0's other k-NN rows to n0 (one of the equally steep ways out of the kink; README
pitfalls 1 and 6), so ``|grad sigma| = 1 / (alpha * kNN mean)`` there too.

The detector works over an ``amg_jax.index.ReferenceBank`` (possibly sharded over devices);
``pixel_detector`` builds one from raw images.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from amg_jax import index as _index
from amg_jax.checks import unknown_fields
from amg_jax.index import ReferenceBank, build_bank, flatten, safe_norm, squared_norms  # noqa: F401  (re-exported)
from amg_jax.similarity.base import Detection

Array = jax.Array


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
    nL2 expects a reference deduplicated this way (see the module docstring). Not jit-able.
    """
    return _index.dedup_rows(ref)


# ----------------------------------------------------------------------------- neighbours

def _flat_ref(x: Array, ref: Array, ref_sq: Array | None) -> tuple[Array, Array, Array]:
    xf, rf = flatten(x), flatten(ref)
    _check_dims(xf, rf)
    return xf, rf, jnp.sum(jnp.square(rf), axis=-1) if ref_sq is None else ref_sq


def knn(x: Array, ref: Array, k: int, *, ref_sq: Array | None = None) -> tuple[Array, Array]:
    """The k nearest reference rows of each query by L2.

    Candidates are chosen with the expanded form (matmul + ``lax.top_k``, a few more than k);
    the distances returned are direct ``||x - z||`` (differentiable in ``x``), sorted ascending.
    ``k`` is clamped to the reference size.

    Returns ``(dist [B, k'], index [B, k'] int32)`` with ``k' = min(k, M)``.
    """
    xf, rf, ref_sq = _flat_ref(x, ref, ref_sq)
    k = int(min(int(k), rf.shape[0]))
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _index.dense_search(xf, rf, ref_sq, k, metric="l2")


def nearest_neighbor(x: Array, ref: Array, *, ref_sq: Array | None = None,
                     num_candidates: int = 4) -> tuple[Array, Array]:
    """Nearest reference row of each query by L2: ``(dist [B], index [B] int32)``.

    The ``num_candidates`` best rows by the expanded form are re-ranked by the direct
    distance (guards against float32 mis-ranking of near ties); ``dist`` is direct.
    """
    xf, rf, ref_sq = _flat_ref(x, ref, ref_sq)
    dist, idx = _index.dense_search(xf, rf, ref_sq, 1, metric="l2", num_candidates=max(1, int(num_candidates)))
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
    x: [B, ...] queries; ref: [M, ...] (or flattened [M, D]). Returns ``NL2Result``, each field [B].
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
    if by not in ("cosine", "l2"):
        raise ValueError(f"pixel_cosine: by must be 'cosine' or 'l2', got {by!r}")
    xf, rf, ref_sq = _flat_ref(x, ref, ref_sq)
    if by == "l2":
        _, idx = nearest_neighbor(xf, rf, ref_sq=ref_sq, num_candidates=num_candidates)
        return cosine_similarity(xf, jnp.take(rf, idx, axis=0)), idx
    cos, idx = _index.dense_search(xf, rf, ref_sq, 1, metric="cosine", num_candidates=max(1, int(num_candidates)))
    return cos[:, 0], idx[:, 0]


# ----------------------------------------------------------------------------- detector

@jax.custom_jvp
def _copy_distance(v: Array, away: Array) -> Array:
    """``||v||`` per row ([B, D] -> [B]) whose derivative at ``v == 0`` (an exact copy) is the
    unit vector of ``away`` instead of 0: one of the (equally steep) directions out of the
    kink, so the dissimilarity gradient does not vanish on exactly the memorized samples.
    ``away`` (no gradient) is ``n0`` minus the mean of its other k-NN rows; where it is 0 too
    (k = 1, or a copy without other neighbours) the derivative stays 0."""
    return _index.row_norm(v)


@_copy_distance.defjvp
def _copy_distance_jvp(primals, tangents):
    v, away = primals
    dv, _ = tangents
    n = _index.row_norm(v)
    u = jnp.where((n > 0)[:, None], v, away)
    u = u / jnp.maximum(safe_norm(u, axis=-1), 1e-30)[:, None]
    return n, jnp.sum(u * dv, axis=-1)


DETECTOR_KINDS = ("nl2", "cosine")
NL2_GATE_LOW = -1.6        # default lambda_min: sigma = -nL2 at the loose copy threshold nL2 < 1.6
NL2_GATE_HIGH = -1.4       # default lambda_max: Carlini's nL2 < 1.4 (without a calibrated copy distance)
GATE_EARLY = 1.5           # calibrated bank: the early gate threshold, in calibrated copy distances


@dataclasses.dataclass(frozen=True)
class PixelDetectorConfig:
    """Config of a pixel-level detector (hashable).

    kind:  "nl2"    -> sigma = -nL2, in [-1/alpha, 0] (Carlini: memorized when nL2 < 1.4,
                       i.e. sigma > -1.4);
           "cosine" -> sigma = pixel cosine to the most cosine-similar bank row, in [-1, 1].
    k, alpha: nL2's neighbourhood size (clamped to the bank size) and normaliser.
    eps:   floor of nL2's denominator.
    normalize: nL2's denominator: "knn" = alpha times the query's own k-NN mean distance
           (Carlini's nL2), "bank" = alpha times the bank's typical one (``knn_scale``), so that
           sigma is the distance to the nearest training image in fixed units (clipped to the
           sigma range) and the calibrated gate threshold -c is exactly the copy criterion.
           Measured on the trained UNets: with "knn" a copy of an image with close neighbours of
           its own has a larger nL2 than its distance implies and the gate stays shut.
    thresholds: (lambda_min, lambda_max) AMG uses when its config leaves them unset; None =
           the kind's default (see ``PixelDetector.default_thresholds``).
    """

    kind: str = "nl2"
    k: int = 50
    alpha: float = 0.5
    eps: float = 1e-12
    thresholds: tuple | None = None
    normalize: str = "knn"

    def __post_init__(self):
        if self.normalize not in ("knn", "bank"):
            raise ValueError(f"PixelDetectorConfig.normalize must be 'knn' or 'bank', got {self.normalize!r}")
        if self.kind not in DETECTOR_KINDS:
            raise ValueError(f"PixelDetectorConfig.kind must be one of {DETECTOR_KINDS}, got {self.kind!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or int(self.k) < 1:
            raise ValueError(f"PixelDetectorConfig.k must be an integer >= 1, got {self.k!r}")
        if not float(self.alpha) > 0:
            raise ValueError(f"PixelDetectorConfig.alpha must be > 0, got {self.alpha}")
        if not float(self.eps) > 0:
            raise ValueError(f"PixelDetectorConfig.eps must be > 0, got {self.eps}")
        if self.thresholds is not None:
            t = tuple(self.thresholds)
            lo, hi = self.sigma_range()
            if len(t) != 2 or not all(lo < float(v) < hi for v in t):
                raise ValueError(f"PixelDetectorConfig.thresholds must be two numbers inside the sigma range "
                                 f"({lo}, {hi}), got {self.thresholds!r}")
            object.__setattr__(self, "thresholds", (float(t[0]), float(t[1])))

    def sigma_range(self) -> tuple[float, float]:
        """The interval sigma lies in (for validating gate thresholds, README pitfall 3)."""
        return (-1.0 / float(self.alpha), 0.0) if self.kind == "nl2" else (-1.0, 1.0)


@struct.dataclass
class PixelDetector:
    """``x0_hat [B, *S] -> Detection(sigma, index, label)`` against a pixel ``ReferenceBank``,
    higher sigma = more memorized (the contract in ``amg_jax.similarity.base``).

    A pytree: the bank's arrays are traced leaves (pass the detector into ``jit`` as an
    argument, not as a closed-over constant), the config is static. A sharded bank
    (``amg_jax.index.shard_bank``) is searched per shard. Build with ``pixel_detector``.

    index: the neighbour's row in the array the bank was built from (first occurrence of a
    duplicated image); label: its caption / class id (-1 when the bank has none).
    """

    bank: ReferenceBank
    config: PixelDetectorConfig = struct.field(pytree_node=False, default_factory=PixelDetectorConfig)

    @property
    def sigma_range(self) -> tuple[float, float]:
        return self.config.sigma_range()

    @property
    def scale(self) -> float:
        """nl2: ``m = bank.knn_scale``, the bank's typical k-NN mean distance (AMG's data-scaled
        ``c3`` is ``c3 * scale**2``; |grad sigma| ~ 1 / (alpha * m)); cosine: 1."""
        return float(self.bank.knn_scale) if self.config.kind == "nl2" else 1.0

    @property
    def default_thresholds(self) -> tuple:
        """(lambda_min, lambda_max) for AMG's gate when its config leaves them unset.

        nl2 with a calibrated bank (``copy_threshold`` set): with ``c = copy_threshold / (alpha *
        knn_scale)``, the calibrated copy distance in nL2 units, ``(-GATE_EARLY * c, -c)``: the
        gate opens early only where x0_hat is within 1.5x the copy distance of a training
        image, and at the end at the copy distance itself. Measured on the partial memorizer
        (``experiments/amg_partial.py``): a low end at -1.6 keeps the gate open on 30-45% of
        steps of samples that were never going to copy (their nL2 stays near 1.0-1.3 on this
        small set), which costs quality; -0.8 to -1.0 (here c = 0.61) copies as little at
        2-3% gate-open. nl2 without calibration: (-1.6, -1.4) (a blurry early x0_hat, nL2 ~
        1.7-1.9, keeps the gate shut; Carlini's nL2 < 1.4 at the end; README pitfall 3).
        cosine: none (set them in the AMG config).
        """
        if self.config.thresholds is not None:
            return self.config.thresholds
        if self.config.kind != "nl2":
            return (None, None)
        thr, m = self.bank.copy_threshold, float(self.bank.knn_scale)
        if thr is None or not (np.isfinite(m) and m > 0):
            return (NL2_GATE_LOW, NL2_GATE_HIGH)
        lo_r = -1.0 / float(self.config.alpha)
        c = float(np.clip(thr / (float(self.config.alpha) * m), 0.05, -lo_r / GATE_EARLY - 0.05))
        return (-GATE_EARLY * c, -c)

    @property
    def sample_shape(self) -> tuple:
        return tuple(self.bank.sample_shape)

    @property
    def size(self) -> int:
        return self.bank.size

    def __call__(self, x0_hat: Array) -> Detection:
        d = self.details(x0_hat)
        return Detection(sigma=d["sigma"], index=d["index"], label=d["label"])

    def details(self, x0_hat: Array) -> dict:
        """sigma, index (source rows), label and the raw scores: nl2 / nn_dist / knn_mean, or cosine."""
        _index.check_queries(self.bank, x0_hat, "pixel detector")
        return _details(self, jnp.asarray(x0_hat))


@jax.jit
def _details(det: PixelDetector, x0_hat: Array) -> dict:
    """PixelDetector.details after validation (jitted: eager calls hit the compilation cache)."""
    c, bank = det.config, det.bank
    if c.kind == "nl2":
        dist, row, nbrs = _index.search_rows(bank, x0_hat, c.k, metric="l2")
        m = jnp.mean(dist, axis=-1)
        n0 = nbrs[:, 0]
        away = n0 - jnp.mean(nbrs[:, 1:], axis=1) if nbrs.shape[1] > 1 else jnp.zeros_like(n0)
        d0 = _copy_distance(flatten(x0_hat) - n0, away)             # direct ||x0_hat - n0|| (pitfall 1)
        if c.normalize == "knn":
            r = d0 / jnp.maximum(c.alpha * m, c.eps)
        else:
            r = jnp.minimum(d0 / max(c.alpha * float(bank.knn_scale), c.eps), 1.0 / c.alpha)
        src, lab = bank.lookup(row[:, 0])
        return {"sigma": -r, "index": src, "label": lab, "nl2": r, "nn_dist": d0, "knn_mean": m}
    cos, row = _index.search(bank, x0_hat, 1, metric="cosine")
    src, lab = bank.lookup(row[:, 0])
    return {"sigma": cos[:, 0], "index": src, "label": lab, "cosine": cos[:, 0]}


def pixel_detector(reference, labels=None, *, config: PixelDetectorConfig | None = None,
                   dedup: bool | None = None, copy_threshold: float | None = None, **overrides) -> PixelDetector:
    """A pixel detector over ``reference``: a pixel ``ReferenceBank`` (possibly sharded), or an
    image array ``[M, ...]`` from which one is built (``build_bank(reference, labels, dedup=dedup,
    copy_threshold=copy_threshold)``; dedup on unless ``dedup=False``, README pitfall 2).

    ``pixel_detector(train_images, labels)`` is the nL2 detector (k=50, alpha=0.5);
    ``pixel_detector(train_images, kind="cosine")`` the pixel-cosine one; ``overrides`` are
    ``PixelDetectorConfig`` fields.
    """
    unknown, known = unknown_fields(PixelDetectorConfig, overrides)
    if unknown:
        raise ValueError(f"pixel_detector: unknown setting {unknown[0]!r}; settings are {known}")
    config = dataclasses.replace(config or PixelDetectorConfig(), **overrides)
    if isinstance(reference, ReferenceBank):
        if labels is not None or copy_threshold is not None or dedup is not None:
            raise ValueError("pixel_detector: labels / dedup / copy_threshold belong to the bank; "
                             "pass them to build_bank")
        bank = reference
    else:
        bank = build_bank(reference, labels, kind="pixel", dedup=dedup is not False, copy_threshold=copy_threshold)
    if bank.kind != "pixel":
        raise ValueError(f"pixel_detector: the bank holds {bank.kind!r} rows, expected 'pixel'")
    return PixelDetector(bank=bank, config=config)
