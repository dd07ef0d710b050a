"""Metrics on final samples: memorization (nL2 and the calibrated copy criterion), range, Fréchet distance.

Conventions (read before comparing with the papers' tables):

- **nL2** (Carlini et al. 2023; ``amg_jax.similarity.pixel.nl2``): LOWER = MORE memorized;
  a sample is memorized when ``nL2 < 1.4`` (a looser line: ``< 1.6``). The training set is
  deduplicated (exact duplicates removed) before nL2 unless ``dedup=False``.
  Summary names are unambiguous about the direction:

  ``nl2_top5pct``  the 5th PERCENTILE of nL2 (``np.percentile(nl2, 5)``, linear
                   interpolation) - the most-memorized 5% end of the distribution. It plays
                   the role of the papers' "top-5% similarity" (their 95th percentile of a
                   higher-is-more-similar score such as SSCD).
  ``nl2_top1``     the MINIMUM nL2 (the single most-memorized sample).
  ``frac_nl2_below_1.4`` / ``frac_nl2_below_1.6``  share of samples with nL2 strictly below.
  ``nl2_median``, ``nl2_mean``.

- **Embedding similarity** (SSCD / CLIP cosine, ``similarity_report``): HIGHER = MORE memorized;
  the AMG paper calls a sample memorized at SSCD ``> 0.5`` (strict: ``> 0.4``). Keys parallel
  the nL2 ones, with a prefix (default ``sim``; e.g. ``sscd``):

  ``sim_top5pct``  the 95th PERCENTILE (``np.percentile(s, 95)``, linear interpolation): the
                   papers' "top-5% similarity", the most-memorized 5% end.
  ``sim_top1``     the MAXIMUM (the single most-memorized sample).
  ``frac_sim_above_0.5`` / ``frac_sim_above_0.4``  share of samples strictly above.
  ``sim_median``, ``sim_mean``.

- **Calibrated copy criterion** (README, "Design notes": the copy criterion): nL2 < 1.4
  cannot tell a copy from a correct render on a few hundred images. A sample is a *copy*
  when its L2 distance to the nearest training image is STRICTLY below a threshold, the 1st
  percentile (configurable) of distances between two independent true renders of the same
  caption: ``copy_threshold(pair_distances(render_a, render_b))``. Store the threshold with
  the bank and report both criteria (``memorization_report``).

- **Fréchet distance**: ``||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)``
  with unbiased covariances (``ddof = 1``, as pytorch-fid), in NumPy float64, the matrix
  square root by symmetric eigendecompositions (no SciPy). ``pixel_features`` gives
  (average-pooled) pixels as features until a learned feature network is added.

All functions take ``x [B, ...]`` (NHWC pixels in [-1, 1] for the testbed) and return NumPy
values / plain Python floats.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.similarity import pixel

NL2_THRESHOLD = 1.4
NL2_THRESHOLD_LOOSE = 1.6


def _as_batch(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch [B, ...], got shape {x.shape}")
    return x


def _check_same_size(x: np.ndarray, train: np.ndarray) -> None:
    if int(np.prod(x.shape[1:])) != int(np.prod(train.shape[1:])):
        raise ValueError(f"samples {x.shape[1:]} and training images {train.shape[1:]} differ in size")


# ----------------------------------------------------------------------------- nL2

@partial(jax.jit, static_argnames=("k", "alpha"))
def _nl2_jit(x, ref, ref_sq, *, k, alpha):
    return pixel.nl2(x, ref, k=k, alpha=alpha, ref_sq=ref_sq)


@jax.jit
def _nn_jit(x, ref, ref_sq):
    return pixel.nearest_neighbor(x, ref, ref_sq=ref_sq)


def _chunks(n: int, batch_size: int):
    for s in range(0, n, max(1, int(batch_size))):
        yield slice(s, min(n, s + max(1, int(batch_size))))


def nl2_values(x, train, *, k: int = 50, alpha: float = 0.5, dedup: bool = True,
               batch_size: int = 256) -> dict:
    """nL2 of every sample against the training set (deduplicated unless ``dedup=False``).

    Returns a dict of NumPy arrays [B]: ``nl2``, ``index`` (row of the nearest image in
    ``train`` as passed, first occurrence for duplicates), ``nn_dist``, ``knn_mean``.
    """
    x, train = _as_batch(x, "samples"), _as_batch(train, "training images")
    _check_same_size(x, train)
    if dedup:
        train, kept = pixel.dedup_reference(train)
    else:
        kept = np.arange(train.shape[0])
    ref = jnp.asarray(train.reshape(train.shape[0], -1))
    ref_sq = pixel.squared_norms(ref)
    k = int(min(int(k), ref.shape[0]))
    parts = [_nl2_jit(jnp.asarray(x[s].reshape(x[s].shape[0], -1)), ref, ref_sq, k=k, alpha=float(alpha))
             for s in _chunks(x.shape[0], batch_size)]
    out = {f: np.concatenate([np.asarray(getattr(p, f)) for p in parts]) for f in pixel.NL2Result._fields}
    out["index"] = kept[out["index"]].astype(np.int64)
    return out


def nl2_summary(nl2) -> dict:
    """Summary of nL2 values [N] (any shape, flattened; lower = more memorized) as plain floats;
    see the module docstring."""
    v = np.asarray(nl2, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("nl2_summary: no values")
    return {
        "nl2_median": float(np.median(v)),
        "nl2_mean": float(np.mean(v)),
        "nl2_top5pct": float(np.percentile(v, 5.0)),
        "nl2_top1": float(np.min(v)),
        "frac_nl2_below_1.4": float(np.mean(v < NL2_THRESHOLD)),
        "frac_nl2_below_1.6": float(np.mean(v < NL2_THRESHOLD_LOOSE)),
    }


# ----------------------------------------------------------------------------- embedding similarity

SIM_THRESHOLD = 0.5
SIM_THRESHOLD_STRICT = 0.4


def similarity_report(sims, threshold: float = SIM_THRESHOLD, strict: float = SIM_THRESHOLD_STRICT, *,
                      name: str = "sim") -> dict:
    """Summary of similarity scores ``sims [N]`` (SSCD / CLIP cosine; higher = more memorized) as
    plain floats, the mirror of ``nl2_summary``: ``{name}_median``, ``{name}_mean``,
    ``{name}_top5pct`` (95th percentile), ``{name}_top1`` (max), ``frac_{name}_above_{threshold}``
    and ``frac_{name}_above_{strict}`` (strictly above; thresholds written with ``%g``)."""
    v = np.asarray(sims, np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError("similarity_report: no values")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"similarity_report: {int(np.sum(~np.isfinite(v)))} of {v.size} values are NaN or inf")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"similarity_report: name must be an identifier such as 'sscd' or 'clip', got {name!r}")
    for what, t in (("threshold", threshold), ("strict", strict)):
        if not np.isfinite(float(t)):
            raise ValueError(f"similarity_report: {what} must be finite, got {t!r}")
    out = {
        f"{name}_median": float(np.median(v)),
        f"{name}_mean": float(np.mean(v)),
        f"{name}_top5pct": float(np.percentile(v, 95.0)),
        f"{name}_top1": float(np.max(v)),
    }
    for t in (threshold, strict):
        out[f"frac_{name}_above_{float(t):g}"] = float(np.mean(v > float(t)))
    return out


# ----------------------------------------------------------------------------- calibrated copies

def pair_distances(a, b) -> np.ndarray:
    """L2 distance between paired samples ``a[i]`` and ``b[i]`` (float64) [N].

    Feed it two independent true renders of the same captions to calibrate ``copy_threshold``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape or a.ndim < 1:
        raise ValueError(f"pair_distances: shapes must match, got {a.shape} and {b.shape}")
    return np.sqrt(np.sum(np.square(a - b).reshape(a.shape[0], -1), axis=-1))


def copy_threshold(pair_distances, percentile: float = 1.0) -> float:
    """The copy threshold: the ``percentile``-th percentile (default 1st, linear interpolation)
    of distances between two independent true renders of the same caption (``pair_distances``
    [P], any shape, flattened)."""
    d = np.asarray(pair_distances, np.float64).reshape(-1)
    if d.size == 0:
        raise ValueError("copy_threshold: no pair distances")
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"copy_threshold: percentile must be in [0, 100], got {percentile}")
    if not np.all(np.isfinite(d)) or np.any(d < 0):
        raise ValueError("copy_threshold: pair distances must be finite and >= 0")
    return float(np.percentile(d, float(percentile)))


def nearest_distances(x, train, *, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Direct L2 distance of each sample to its nearest training image, and that image's row.

    Returns ``(dist [B] float, index [B] int)``.
    """
    x, train = _as_batch(x, "samples"), _as_batch(train, "training images")
    _check_same_size(x, train)
    ref = jnp.asarray(train.reshape(train.shape[0], -1))
    ref_sq = pixel.squared_norms(ref)
    d, i = [], []
    for s in _chunks(x.shape[0], batch_size):
        dd, ii = _nn_jit(jnp.asarray(x[s].reshape(x[s].shape[0], -1)), ref, ref_sq)
        d.append(np.asarray(dd))
        i.append(np.asarray(ii))
    return np.concatenate(d).astype(np.float64), np.concatenate(i).astype(np.int64)


def calibrated_copies(x, train, threshold: float) -> np.ndarray:
    """bool [B]: the sample's distance to its nearest training image is < ``threshold``."""
    if not np.isfinite(threshold) or threshold < 0:
        raise ValueError(f"calibrated_copies: threshold must be finite and >= 0, got {threshold}")
    d, _ = nearest_distances(x, train)
    return d < float(threshold)


def frac_copied(x, train, threshold: float) -> float:
    """Share of samples ``x [B, H, W, C]`` that are calibrated copies of ``train [M, H, W, C]``
    (see ``calibrated_copies``)."""
    return float(np.mean(calibrated_copies(x, train, threshold)))


# ----------------------------------------------------------------------------- range

def frac_out_of_range(x, lo: float = -1.0, hi: float = 1.0) -> float:
    """Share of pixel values strictly outside ``[lo, hi]`` (NaN counts as outside)."""
    v = np.asarray(x, np.float64)
    if v.size == 0:
        raise ValueError("frac_out_of_range: empty input")
    inside = (v >= lo) & (v <= hi)
    return float(1.0 - np.mean(inside))


# ----------------------------------------------------------------------------- report

def memorization_report(x, train, *, threshold: float | None = None, k: int = 50, alpha: float = 0.5,
                        dedup: bool = True, lo: float = -1.0, hi: float = 1.0) -> dict:
    """One JSON-ready dict of plain floats for samples ``x`` against ``train``.

    Always: ``n``, the ``nl2_summary`` keys (``nl2_median``, ``nl2_mean``, ``nl2_top5pct`` =
    5th percentile, ``nl2_top1`` = min, ``frac_nl2_below_1.4``, ``frac_nl2_below_1.6``),
    ``frac_out_of_range`` (outside ``[lo, hi]``). With a ``threshold`` (see
    ``copy_threshold``): ``copy_threshold``, ``frac_copied`` (calibrated criterion) and
    ``nn_dist_median`` (median distance to the nearest training image, NOT deduplicated -
    duplicates do not change a nearest distance).
    """
    x = _as_batch(x, "samples")
    r = nl2_values(x, train, k=k, alpha=alpha, dedup=dedup)
    out = {"n": int(x.shape[0])}
    out.update(nl2_summary(r["nl2"]))
    out["frac_out_of_range"] = frac_out_of_range(x, lo, hi)
    if threshold is not None:
        threshold = float(threshold)
        if not np.isfinite(threshold) or threshold < 0:
            raise ValueError(f"memorization_report: threshold must be finite and >= 0, got {threshold}")
        # nL2's nearest neighbour is the nearest training image (dedup keeps one of each).
        d = r["nn_dist"].astype(np.float64)
        out["copy_threshold"] = threshold
        out["frac_copied"] = float(np.mean(d < threshold))
        out["nn_dist_median"] = float(np.median(d))
    return out


# ----------------------------------------------------------------------------- Fréchet distance

def pixel_features(x, pool: int = 1) -> np.ndarray:
    """Pixels as features: ``x [N, H, W, C]`` average-pooled by ``pool`` x ``pool`` (H and W must
    be divisible by it) and flattened -> ``[N, (H/pool)*(W/pool)*C]`` float64. Other ranks are
    just flattened (``pool`` must then be 1)."""
    x = np.asarray(x, np.float64)
    pool = int(pool)
    if pool < 1:
        raise ValueError(f"pixel_features: pool must be >= 1, got {pool}")
    if pool > 1:
        if x.ndim != 4:
            raise ValueError(f"pixel_features: pooling needs [N, H, W, C], got shape {x.shape}")
        n, h, w, c = x.shape
        if h % pool or w % pool:
            raise ValueError(f"pixel_features: H={h} and W={w} must be divisible by pool={pool}")
        x = x.reshape(n, h // pool, pool, w // pool, pool, c).mean(axis=(2, 4))
    return x.reshape(x.shape[0], -1)


def _sqrtm_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet(mu_a, cov_a, mu_b, cov_b) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mu_a, cov_a) and N(mu_b, cov_b):
    means [D], covariances [D, D].

    ``tr(sqrt(S_a S_b))`` is computed as ``sum sqrt(eig(S_a^1/2 S_b S_a^1/2))`` of a symmetric
    PSD matrix (float64), which is stable where ``S_a S_b`` is singular or ill-conditioned.
    """
    mu_a, mu_b = np.atleast_1d(np.asarray(mu_a, np.float64)), np.atleast_1d(np.asarray(mu_b, np.float64))
    cov_a, cov_b = np.atleast_2d(np.asarray(cov_a, np.float64)), np.atleast_2d(np.asarray(cov_b, np.float64))
    d = mu_a.shape[0]
    if mu_b.shape != (d,) or cov_a.shape != (d, d) or cov_b.shape != (d, d):
        raise ValueError(f"gaussian_frechet: shapes do not match: mu {mu_a.shape}/{mu_b.shape}, "
                         f"cov {cov_a.shape}/{cov_b.shape}")
    ra = _sqrtm_psd(cov_a)
    m = ra @ cov_b @ ra
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    tr_covmean = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
    diff = mu_a - mu_b
    fd = float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D] in float64 (N >= 2)."""
    f = np.asarray(feats, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
    if not np.all(np.isfinite(f)):
        raise ValueError("features contain NaN or inf")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False, ddof=1))


def frechet_distance(feats_a, feats_b) -> float:
    """Fréchet distance between two feature sets [N, D] and [M, D] (Gaussian fits, float64)."""
    mu_a, cov_a = feature_stats(feats_a)
    mu_b, cov_b = feature_stats(feats_b)
    if mu_a.shape != mu_b.shape:
        raise ValueError(f"frechet_distance: feature sizes differ: {mu_a.shape[0]} vs {mu_b.shape[0]}")
    return gaussian_frechet(mu_a, cov_a, mu_b, cov_b)


def pixel_frechet(x, y, pool: int = 1) -> float:
    """Fréchet distance between two image sets ``x [N, H, W, C]`` and ``y [M, H, W, C]`` on
    ``pixel_features(., pool)``."""
    return frechet_distance(pixel_features(x, pool), pixel_features(y, pool))
