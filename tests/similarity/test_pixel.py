"""Pixel nearest neighbours, nL2, cosine and the pixel detector against a float64 NumPy brute force."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import index
from amg_jax.data.bank import bank_from_testbed
from amg_jax.data import testbed as tb
from amg_jax.similarity import pixel
from amg_jax.similarity.base import Detection

SHAPE = (4, 4, 3)
D = int(np.prod(SHAPE))
# Tolerances: float32 JAX (direct distances / cosines over 48 pixels) vs the float64 brute force:
# ~1e-7 relative (margins <= 6% across ISAs and BLAS kernels), so rtol 1e-5 / atol 1e-6 leave >15x;
# a wrong neighbour, k or dedup is off by >1e-3. Index and order checks are exact: the candidate
# distances here are >= 1.3e-4 relative apart (cosines >= 1e-2), 1000x the float32 round-off.


@functools.lru_cache(maxsize=None)
def _data():
    rng = np.random.default_rng(0)
    ref = rng.uniform(-1, 1, (60,) + SHAPE).astype(np.float32)
    x = rng.uniform(-1, 1, (6,) + SHAPE).astype(np.float32)
    x[0] = ref[7] + 1e-2 * rng.normal(size=SHAPE).astype(np.float32)   # a near copy
    x[1] = ref[11]                                                      # an exact copy
    # A reference with exact duplicates: rows 0, 3 of a 20-image set repeated.
    uniq = ref[:20]
    dup = np.concatenate([uniq, uniq[[0, 0, 3]], uniq[[0]]])
    perm = rng.permutation(dup.shape[0])
    return ref, x, uniq, dup[perm]


def _dist64(x, ref):
    xf = np.asarray(x, np.float64).reshape(len(x), -1)
    rf = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return np.sqrt(((xf[:, None, :] - rf[None, :, :]) ** 2).sum(-1))


def _nl2_64(x, ref, k=50, alpha=0.5):
    d = _dist64(x, ref)
    k = min(k, d.shape[1])
    ds = np.sort(d, axis=1)
    m = ds[:, :k].mean(axis=1)
    return ds[:, 0] / np.maximum(alpha * m, 1e-12), np.argmin(d, axis=1), ds[:, 0], m


def _cos64(x, ref):
    xf = np.asarray(x, np.float64).reshape(len(x), -1)
    rf = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return (xf @ rf.T) / (np.linalg.norm(xf, axis=1)[:, None] * np.linalg.norm(rf, axis=1)[None])


@pytest.mark.parametrize("k", [1, 5, 50, 60, 500])
def test_nl2_matches_bruteforce(k):
    ref, x, _, _ = _data()
    r = pixel.nl2(jnp.asarray(x), jnp.asarray(ref), k=k, alpha=0.5)
    want, idx, nn, m = _nl2_64(x, ref, k=k)
    chex.assert_shape([r.nl2, r.index, r.nn_dist, r.knn_mean], (x.shape[0],))
    np.testing.assert_allclose(np.asarray(r.nl2), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(r.index), idx)
    np.testing.assert_allclose(np.asarray(r.nn_dist), nn, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.knn_mean), m, rtol=1e-5)
    assert float(r.nl2[1]) == 0.0  # the exact copy: a direct distance of identical float32 rows is exactly 0


def test_knn_sorted_and_direct():
    ref, x, _, _ = _data()
    d, i = pixel.knn(jnp.asarray(x), jnp.asarray(ref).reshape(60, -1), 7)  # flattened ref works too
    full = _dist64(x, ref)
    np.testing.assert_allclose(np.asarray(d), np.sort(full, axis=1)[:, :7], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(i), np.argsort(full, axis=1)[:, :7])
    # Direct distances: the exact copy is exactly 0, the near copy accurate far below 0.1.
    assert float(d[1, 0]) == 0.0
    np.testing.assert_allclose(float(d[0, 0]), full[0].min(), rtol=1e-5)
    nd, ni = pixel.nearest_neighbor(jnp.asarray(x), jnp.asarray(ref))
    np.testing.assert_allclose(np.asarray(nd), full.min(axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ni), full.argmin(axis=1))


def test_dedup_reference():
    _, _, uniq, dup = _data()
    u, kept = pixel.dedup_reference(dup)
    assert u.shape == uniq.shape
    np.testing.assert_array_equal(u, dup[kept])
    assert np.all(np.diff(kept) > 0)  # original order, first occurrences
    # Same set of images as the unique set.
    np.testing.assert_array_equal(np.sort(u.reshape(20, -1), axis=0), np.sort(uniq.reshape(20, -1), axis=0))
    u2, kept2 = pixel.dedup_reference(uniq)
    np.testing.assert_array_equal(kept2, np.arange(20))


def test_dedup_on_vs_off():
    _, _, uniq, dup = _data()
    rng = np.random.default_rng(1)
    k = 5
    # Queries: training image 0 (4 copies in `dup`) itself, a near copy of it, and of image 5 (1 copy).
    q = np.stack([uniq[0], uniq[0] + 1e-2 * rng.normal(size=SHAPE), uniq[5] + 1e-2 * rng.normal(size=SHAPE)])
    q = q.astype(np.float32)
    off = pixel.nl2(jnp.asarray(q), jnp.asarray(dup), k=k)
    dd, kept = pixel.dedup_reference(dup)
    on = pixel.nl2(jnp.asarray(q), jnp.asarray(dd), k=k)
    np.testing.assert_allclose(np.asarray(off.nl2), _nl2_64(q, dup, k)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(on.nl2), _nl2_64(q, uniq, k)[0], rtol=1e-5, atol=1e-6)
    # With dedup, a training image itself scores exactly 0 (finite), its k-NN mean is > 0.
    assert float(on.nl2[0]) == 0.0 and float(on.knn_mean[0]) > 0
    # Duplicates put near-zero distances into the k-NN mean: the near copy of the duplicated
    # image gets a much larger nL2 without dedup (here 4 of 5 neighbours are copies) ...
    assert float(off.nl2[1]) > 3.0 * float(on.nl2[1])
    # ... while the near copy of an image that is not duplicated is unaffected (the same 5 distances:
    # exact here, 1e-5 allows another summation order).
    np.testing.assert_allclose(float(off.nl2[2]), float(on.nl2[2]), rtol=1e-5)


def test_degenerate_single_reference():
    ref = np.ones((1,) + SHAPE, np.float32)
    r = pixel.nl2(jnp.asarray(ref), jnp.asarray(ref), k=50)
    assert np.isfinite(float(r.nl2[0])) and float(r.nl2[0]) == 0.0
    r = pixel.nl2(jnp.zeros((1,) + SHAPE), jnp.asarray(ref), k=50)
    np.testing.assert_allclose(float(r.nl2[0]), 2.0, rtol=1e-6)  # k = M = 1: d0 / (alpha * d0), exact in float32


def test_gradient_at_near_copy_points_away():
    ref, _, _, _ = _data()
    rng = np.random.default_rng(2)
    n0 = ref[7]
    delta = (1e-3 * rng.normal(size=SHAPE)).astype(np.float32)
    x = jnp.asarray((n0 + delta)[None])

    g_dist = jax.grad(lambda z: pixel.nearest_neighbor(z, jnp.asarray(ref))[0].sum())(x)
    g_nl2 = jax.grad(lambda z: pixel.nl2(z, jnp.asarray(ref)).nl2.sum())(x)
    for g in (g_dist, g_nl2):
        g = np.asarray(g).reshape(-1)
        assert np.all(np.isfinite(g)) and np.linalg.norm(g) > 0
        cos = g @ delta.reshape(-1) / (np.linalg.norm(g) * np.linalg.norm(delta))
        assert cos > 0.99, cos  # increasing distance / nL2 = moving away from n0
    # d||x - n0|| / dx is the unit vector (x - n0) / ||x - n0||: float32 n0 + delta rounds delta by
    # ulp(1) / 1e-3 ~ 1e-4 relative (margin 0.2%); a wrong direction is off by O(1).
    np.testing.assert_allclose(np.asarray(g_dist).reshape(-1), delta.reshape(-1) / np.linalg.norm(delta),
                               rtol=2e-3, atol=2e-3)
    # sigma = -nL2 (the detector) decreases in the same direction.
    det = pixel.pixel_detector(ref)
    g_sigma = np.asarray(jax.grad(lambda z: det(z)[0].sum())(x)).reshape(-1)
    assert g_sigma @ delta.reshape(-1) < 0


def test_gradient_at_exact_copy_is_finite():
    ref, _, _, _ = _data()
    x = jnp.asarray(ref[3:4])
    g = jax.grad(lambda z: pixel.nl2(z, jnp.asarray(ref)).nl2.sum())(x)
    assert np.all(np.isfinite(np.asarray(g)))  # the kink: 0, never NaN


@pytest.mark.parametrize("by", ["cosine", "l2"])
def test_pixel_cosine_matches_bruteforce(by):
    ref, x, _, _ = _data()
    cos, idx = pixel.pixel_cosine(jnp.asarray(x), jnp.asarray(ref), by=by)
    c = _cos64(x, ref)
    want_idx = c.argmax(axis=1) if by == "cosine" else _dist64(x, ref).argmin(axis=1)
    np.testing.assert_array_equal(np.asarray(idx), want_idx)
    np.testing.assert_allclose(np.asarray(cos), c[np.arange(len(x)), want_idx], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(cos[1]), 1.0, rtol=1e-6)  # exact copy: float32 x.x / |x|^2, 1 ulp here (<= ~5)
    np.testing.assert_allclose(np.asarray(pixel.cosine_similarity(jnp.asarray(x), jnp.asarray(ref[:6]))),
                               np.diag(_cos64(x, ref[:6])), rtol=1e-5, atol=1e-6)


def test_detector_nl2_and_cosine():
    _, _, uniq, dup = _data()
    rng = np.random.default_rng(3)
    q = (uniq[[0, 3, 9]] + 1e-2 * rng.normal(size=(3,) + SHAPE)).astype(np.float32)
    det = pixel.pixel_detector(dup, k=5)
    assert det.size == 20 and det.bank.dedup
    out = det(jnp.asarray(q))
    assert isinstance(out, Detection)
    chex.assert_shape(list(out), (3,))
    np.testing.assert_allclose(np.asarray(out.sigma), -_nl2_64(q, uniq, 5)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.label), -1)          # no labels given
    # Indices refer to rows of the reference as passed in (first occurrence).
    _, kept = pixel.dedup_reference(dup)
    for j, i in zip([0, 3, 9], np.asarray(out.index)):
        np.testing.assert_array_equal(dup[i], uniq[j])
        assert i in kept
    lo, hi = det.sigma_range
    assert (lo, hi) == (-2.0, 0.0) == det.config.sigma_range()
    assert np.all((np.asarray(out.sigma) >= lo) & (np.asarray(out.sigma) <= hi))
    d = det.details(jnp.asarray(q))
    np.testing.assert_allclose(np.asarray(d["nl2"]), _nl2_64(q, uniq, 5)[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(d["knn_mean"]), _nl2_64(q, uniq, 5)[3], rtol=1e-5)
    # scale = m (the bank's typical k-NN mean distance); the nl2 gate defaults
    assert det.scale == det.bank.knn_scale > 0
    assert det.default_thresholds == (-1.6, -1.4)

    det_off = pixel.pixel_detector(dup, k=5, dedup=False)
    np.testing.assert_allclose(np.asarray(det_off(jnp.asarray(q)).sigma), -_nl2_64(q, dup, 5)[0],
                               rtol=1e-5, atol=1e-6)

    cdet = pixel.pixel_detector(dup, kind="cosine")
    s, i, _ = cdet(jnp.asarray(q))
    c = _cos64(q, dup)
    np.testing.assert_allclose(np.asarray(s), c.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(_cos64(q, dup[np.asarray(i)]).diagonal(), c.max(axis=1), rtol=1e-5)
    assert cdet.sigma_range == (-1.0, 1.0) and cdet.scale == 1.0 and cdet.default_thresholds == (None, None)

    # The detector is a pytree: it goes through jit as an argument.
    s_jit, i_jit, _ = jax.jit(lambda d, z: d(z))(det, jnp.asarray(q))
    # jit vs eager: the same ops, bit-identical here; another fusion may reorder the float32 sums
    # (a few ulps), so rtol 1e-5 rather than 1e-6 (~8 ulps); a detector lost in jit is off by O(1).
    np.testing.assert_allclose(np.asarray(s_jit), np.asarray(out.sigma), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(i_jit), np.asarray(out.index))


def test_detector_gradient_at_exact_and_near_copy():
    """README pitfalls 1 and 6: grad sigma is finite and nonzero at x0_hat == n0 exactly and
    next to it, with |grad sigma| = 1 / (alpha * kNN mean), and a step down it lowers sigma."""
    ref, _, _, _ = _data()
    det = pixel.pixel_detector(ref)
    rng = np.random.default_rng(4)
    n0 = ref[[7, 11]]
    grad = jax.jit(jax.grad(lambda d, z: d(z).sigma.sum(), argnums=1))
    for x in (n0, n0 + 1e-3 * rng.normal(size=n0.shape).astype(np.float32)):
        x = jnp.asarray(x)
        g = np.asarray(grad(det, x)).reshape(2, -1)
        assert np.all(np.isfinite(g))
        m = np.asarray(det.details(x)["knn_mean"])
        # a model tolerance: next to the copy grad nL2 also has the k-NN mean's term (~d0 / m of the
        # first); measured 2e-4 relative, round-off ~1e-6. A missing 1 / (alpha m) is off by 2x.
        np.testing.assert_allclose(np.linalg.norm(g, axis=1), 1.0 / (0.5 * m), rtol=2e-2)
        unit = (g / np.linalg.norm(g, axis=1, keepdims=True)).reshape(x.shape)
        step = x - 0.1 * m[:, None, None, None] * unit
        assert np.all(np.asarray(det(step).sigma) < np.asarray(det(x).sigma) - 0.05)
    # the raw nl2 function keeps the plain kink (gradient 0 there), the detector does not
    g_raw = jax.grad(lambda z: pixel.nl2(z, jnp.asarray(ref)).nl2.sum())(jnp.asarray(n0))
    # exactly 0 by definition at the kink (a where, not round-off)
    assert np.all(np.asarray(g_raw) == 0.0)


def test_detector_dedup_keeps_knn_mean_of_duplicated_image():
    """README pitfall 2 through the detector: with the default dedup the k-NN mean of a
    duplicated training image stays positive; without it, its copies zero most of it."""
    _, _, uniq, dup = _data()
    q = jnp.asarray(uniq[[0, 5]])                     # image 0 has 4 copies in `dup`, image 5 one
    on = pixel.pixel_detector(dup, k=5).details(q)
    off = pixel.pixel_detector(dup, k=5, dedup=False).details(q)
    _, _, _, m_unique = _nl2_64(np.asarray(q), uniq, 5)
    np.testing.assert_allclose(np.asarray(on["knn_mean"]), m_unique, rtol=1e-5)
    assert float(off["knn_mean"][0]) < 0.25 * float(on["knn_mean"][0])     # 4 of 5 distances are 0
    np.testing.assert_allclose(float(off["knn_mean"][1]), float(on["knn_mean"][1]), rtol=1e-5)


@pytest.fixture(scope="module")
def small_bed():
    return tb.make_testbed(tb.TestbedConfig(
        seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"), backgrounds=("black", "gray"),
        textures=("plain", "striped"), n_specific=6, n_duplicated=2, duplicate_count=6, n_generic=2,
        generic_images=8))


def test_detector_labels_on_testbed(small_bed):
    """The neighbour's caption comes back as ``label`` (caption deduplication's y_N), for the
    nl2 and cosine detectors, unsharded and sharded (equal results, gradients included)."""
    bed = small_bed
    bank = bank_from_testbed(bed)
    rng = np.random.default_rng(5)
    x = jnp.asarray(bed.images + 1e-3 * rng.normal(size=bed.images.shape).astype(np.float32))
    near = bed.unique_index[bed.source]                           # first occurrence of each image
    call = jax.jit(lambda d, z: d(z))
    grad = jax.jit(jax.grad(lambda d, z: d(z).sigma.sum(), argnums=1))
    sharded = index.shard_bank(bank)
    for kind in ("nl2", "cosine"):
        det = pixel.pixel_detector(bank, kind=kind)
        out = call(det, x)
        np.testing.assert_array_equal(np.asarray(out.index), near)
        np.testing.assert_array_equal(np.asarray(out.label), bed.labels)
        sdet = pixel.pixel_detector(sharded, kind=kind)
        # Exact by design (index.py): the sharded search gathers the chosen rows exactly (one owner
        # per row in the psum) and computes the same dot products on them as the unsharded one, in
        # the same process; a sharded bank that differs at all is a bug, not round-off.
        for a, b in zip(out, call(sdet, x)):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        if kind == "nl2":
            np.testing.assert_array_equal(np.asarray(grad(sdet, x)), np.asarray(grad(det, x)))
    # with the bank's calibrated copy distance c (in nL2 units) the nl2 gate runs from -1.5 c to -c
    lo, hi = pixel.pixel_detector(bank).default_thresholds
    c = bank.copy_threshold / (0.5 * bank.knn_scale)
    assert 0.05 < c < 2 / 1.5 - 0.05                      # inside the clamp, so the formula is what is tested
    assert hi == pytest.approx(-c) and lo == pytest.approx(-1.5 * c)   # float64, the same formula
    assert -2.0 < lo < hi < 0


def test_bad_inputs():
    ref, x, _, _ = _data()
    with pytest.raises(ValueError, match="kind"):
        pixel.PixelDetectorConfig(kind="sscd")
    with pytest.raises(ValueError, match="k must"):
        pixel.PixelDetectorConfig(k=0)
    with pytest.raises(ValueError, match="alpha"):
        pixel.PixelDetectorConfig(alpha=0.0)
    with pytest.raises(ValueError, match="empty"):
        pixel.pixel_detector(np.zeros((0,) + SHAPE))
    with pytest.raises(ValueError, match="NaN"):
        pixel.pixel_detector(np.full((2,) + SHAPE, np.nan))
    with pytest.raises(ValueError, match=r"labels must have shape \[M\]"):
        pixel.pixel_detector(ref, np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="sizes differ"):
        pixel.nl2(jnp.asarray(x), jnp.zeros((5, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"pixel detector: queries of shape \(2, 2, 3\).*do not match"):
        pixel.pixel_detector(ref)(jnp.zeros((2, 2, 2, 3)))
    with pytest.raises(ValueError, match="unknown setting 'alhpa'"):
        pixel.pixel_detector(ref, alhpa=0.5)
    with pytest.raises(ValueError, match="thresholds must be two numbers inside"):
        pixel.PixelDetectorConfig(thresholds=(-2.5, -1.0))
    emb = index.build_bank(ref.reshape(60, -1), kind="embedding", normalize=True)
    with pytest.raises(ValueError, match="expected 'pixel'"):
        pixel.pixel_detector(emb)
    with pytest.raises(ValueError, match="belong to the bank"):
        pixel.pixel_detector(index.build_bank(ref), dedup=False)
    with pytest.raises(ValueError, match="by must"):
        pixel.pixel_cosine(jnp.asarray(x), jnp.asarray(ref), by="dot")


class JitTest(chex.TestCase):
    """jit and no-jit agree."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_nl2_and_cosine(self):
        ref, x, _, _ = _data()
        want = _nl2_64(x, ref, k=50)
        r = self.variant(lambda a, b: pixel.nl2(a, b, k=50, alpha=0.5))(jnp.asarray(x), jnp.asarray(ref))
        np.testing.assert_allclose(np.asarray(r.nl2), want[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(r.index), want[1])
        cos, idx = self.variant(pixel.pixel_cosine)(jnp.asarray(x), jnp.asarray(ref))
        c = _cos64(x, ref)
        np.testing.assert_allclose(np.asarray(cos), c.max(axis=1), rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(idx), c.argmax(axis=1))

    @chex.variants(with_jit=True, without_jit=True)
    def test_detector_grad(self):
        ref, x, _, _ = _data()
        det = pixel.pixel_detector(ref)
        g = self.variant(jax.grad(lambda d, z: d(z)[0].sum(), argnums=1))(det, jnp.asarray(x))
        chex.assert_tree_all_finite(g)
        chex.assert_shape(g, x.shape)


def test_bank_normalized_detector_gates_exactly_at_the_copy_distance():
    _, _, uniq, dup = _data()
    rng = np.random.default_rng(5)
    q = (uniq[[0, 3, 9, 4]] + np.array([1e-2, 5e-2, 0.2, 3.0])[:, None, None, None]
         * rng.normal(size=(4,) + SHAPE)).astype(np.float32)
    d_true = np.sqrt(((q[:, None] - uniq[None]) ** 2).reshape(4, len(uniq), -1).sum(-1)).min(1)
    thr = float(np.sqrt(d_true[1] * d_true[2]))             # between the 2nd and 3rd query
    bank = index.build_bank(dup, copy_threshold=thr)
    det = pixel.pixel_detector(bank, k=5, normalize="bank")
    sigma = np.asarray(det(jnp.asarray(q)).sigma)
    m = float(bank.knn_scale)
    np.testing.assert_allclose(sigma, -np.minimum(d_true / (0.5 * m), 2.0), rtol=1e-5, atol=1e-6)
    assert sigma[3] == -2.0                                  # far away: clipped to the range (exact)
    lam_min, lam_max = det.default_thresholds
    # the late gate threshold is the copy criterion itself: sigma > lambda_max <=> distance < thr
    # (thr is the geometric mean of two query distances, far from both: the comparison is robust)
    np.testing.assert_array_equal(sigma > lam_max, d_true < thr)
    assert lam_min == pytest.approx(1.5 * lam_max)
    g = jax.grad(lambda z: det(z).sigma.sum())(jnp.asarray(q[:3]))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0
    with pytest.raises(ValueError, match="normalize must be 'knn' or 'bank'"):
        pixel.PixelDetectorConfig(normalize="global")
