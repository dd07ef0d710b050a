"""Memorization metrics, the calibrated copy criterion and Fréchet distance vs float64 NumPy / SciPy."""
import json

import numpy as np
import pytest
import scipy.linalg

from amg_jax.evaluation import metrics

SHAPE = (4, 4, 3)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    train = rng.uniform(-1, 1, (40,) + SHAPE).astype(np.float32)
    train = np.concatenate([train, train[[2, 2, 5]]])          # exact duplicates
    x = rng.uniform(-1, 1, (30,) + SHAPE).astype(np.float32)
    x[0] = train[2]                                             # exact copy (a duplicated image)
    x[1] = train[9] + 1e-3 * rng.normal(size=SHAPE)             # near copy
    x[2] = train[5] + 5e-2 * rng.normal(size=SHAPE)
    x[3] = 1.3 * x[3]                                           # some pixels out of range
    return train, x


def _dist64(x, ref):
    xf = np.asarray(x, np.float64).reshape(len(x), -1)
    rf = np.asarray(ref, np.float64).reshape(len(ref), -1)
    return np.sqrt(((xf[:, None, :] - rf[None, :, :]) ** 2).sum(-1))


def _nl2_64(x, ref, k=50, alpha=0.5):
    ds = np.sort(_dist64(x, ref), axis=1)
    return ds[:, 0] / (alpha * ds[:, :min(k, ds.shape[1])].mean(axis=1))


def _unique(train):
    _, first = np.unique(train.reshape(len(train), -1), axis=0, return_index=True)
    return train[np.sort(first)]


@pytest.mark.parametrize("dedup", [True, False])
def test_nl2_values(data, dedup):
    train, x = data
    r = metrics.nl2_values(x, train, k=10, dedup=dedup, batch_size=7)  # several chunks
    ref = _unique(train) if dedup else train
    with np.errstate(divide="ignore", invalid="ignore"):
        want = _nl2_64(x, ref, k=10)
    # float32 JAX (direct distances over 48 pixels) vs float64 NumPy: ~1e-7 relative (measured
    # 1.4e-7); 1e-5 leaves ~70x. A wrong neighbour, k or dedup is off by >1e-2.
    np.testing.assert_allclose(r["nl2"], want, rtol=1e-5, atol=1e-6)
    d = _dist64(x, train)
    np.testing.assert_allclose(r["nn_dist"], d.min(axis=1), rtol=1e-5, atol=1e-6)
    # index refers to rows of `train` as passed in, and is a nearest image: both sides are entries
    # of the same float64 matrix, so exact unless float32 picked a near-tie (allowed by the 1e-5).
    np.testing.assert_allclose(d[np.arange(len(x)), r["index"]], d.min(axis=1), rtol=1e-5, atol=1e-6)


def test_nl2_summary_conventions(data):
    train, x = data
    v = metrics.nl2_values(x, train)["nl2"]
    want64 = _nl2_64(x, _unique(train))
    s = metrics.nl2_summary(v)
    # float32 nL2 vs float64: ~2e-7 (margins <= 1.3%). top1 is the exact copy: a direct distance of
    # identical float32 images is exactly 0. The nL2 nearest a threshold is 3e-5 from 1.6, ~150x the
    # float32 round-off, so the fractions below are exact counts.
    np.testing.assert_allclose(s["nl2_top5pct"], np.percentile(want64, 5), rtol=1e-5)
    np.testing.assert_allclose(s["nl2_top1"], want64.min(), atol=1e-6)
    np.testing.assert_allclose(s["nl2_median"], np.median(want64), rtol=1e-5)
    np.testing.assert_allclose(s["nl2_mean"], want64.mean(), rtol=1e-5)
    assert s["frac_nl2_below_1.4"] == np.mean(want64 < 1.4)
    assert s["frac_nl2_below_1.6"] == np.mean(want64 < 1.6)
    assert s["nl2_top1"] == 0.0 and s["nl2_top1"] <= s["nl2_top5pct"] <= s["nl2_median"]
    # Direction on a hand-made vector: top5pct is the LOW (memorized) end.
    vals = np.linspace(0.0, 1.9, 101)
    s = metrics.nl2_summary(vals)
    # float64 percentile / mean of the same values: ~1e-16; approx's default 1e-6 is loose.
    assert s["nl2_top5pct"] == pytest.approx(np.percentile(vals, 5)) == pytest.approx(0.095)
    assert s["frac_nl2_below_1.4"] == pytest.approx(np.mean(vals < 1.4))


def test_copy_threshold_and_pair_distances():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(50,) + SHAPE)
    b = a + rng.normal(size=a.shape) * rng.uniform(0.1, 1.0, (50, 1, 1, 1))
    d = metrics.pair_distances(a, b)
    # float64 sums of 48 squares in two summation orders: <= ~1e-15 relative; the percentiles are
    # the same NumPy call on the same d (exact). 1e-12 is loose; a wrong axis is off by O(1).
    np.testing.assert_allclose(d, np.linalg.norm((a - b).reshape(50, -1), axis=1), rtol=1e-12)
    assert metrics.copy_threshold(d) == pytest.approx(np.percentile(d, 1.0), rel=1e-12)
    assert metrics.copy_threshold(d, percentile=10) == pytest.approx(np.percentile(d, 10), rel=1e-12)
    with pytest.raises(ValueError):
        metrics.copy_threshold(d, percentile=101)
    with pytest.raises(ValueError):
        metrics.copy_threshold([])
    with pytest.raises(ValueError):
        metrics.pair_distances(a, b[:3])


def test_calibrated_copies(data):
    train, x = data
    rng = np.random.default_rng(2)
    near = train[9] + 1e-2 * rng.normal(size=SHAPE)
    near_d = float(np.linalg.norm((near - train[9]).astype(np.float64)))
    q = np.stack([train[2], train[17], near, rng.uniform(-1, 1, SHAPE)]).astype(np.float32)
    thr = 2.0 * near_d
    np.testing.assert_array_equal(metrics.calibrated_copies(q, train, thr), [True, True, True, False])
    np.testing.assert_array_equal(metrics.calibrated_copies(q, train, 0.5 * near_d), [True, True, False, False])
    assert metrics.frac_copied(q, train, thr) == 0.75
    d, i = metrics.nearest_distances(q, train)
    # float32 direct distances vs float64: ~1e-7 relative (margin 0.7%); copies are exactly 0.
    np.testing.assert_allclose(d, _dist64(q, train).min(axis=1), rtol=1e-5, atol=1e-6)
    assert d[0] == 0.0 and d[1] == 0.0 and i[1] == 17
    with pytest.raises(ValueError):
        metrics.calibrated_copies(q, train, -1.0)
    with pytest.raises(ValueError, match="differ"):
        metrics.calibrated_copies(q[:, :2], train, 1.0)


def test_frac_out_of_range(data):
    _, x = data
    want = np.mean((x.astype(np.float64) < -1) | (x > 1))
    assert want > 0
    # A count over pixels: 1 - mean(inside) vs mean(outside) differ by an ulp at most.
    assert metrics.frac_out_of_range(x) == pytest.approx(want, abs=1e-12)
    assert metrics.frac_out_of_range(x, -2, 2) == 0.0
    assert metrics.frac_out_of_range(np.array([0.0, np.nan, 2.0, -1.0])) == 0.5


def test_memorization_report(data):
    train, x = data
    thr = 0.05
    rep = metrics.memorization_report(x, train, threshold=thr, k=10)
    json.dumps(rep)
    assert all(type(v) in (int, float) for v in rep.values())
    want = _nl2_64(x, _unique(train), k=10)
    d = _dist64(x, train).min(axis=1)
    assert rep["n"] == len(x)
    # float32 nL2 / distances vs float64, as in test_nl2_summary_conventions (margins <= 0.6%); the
    # fractions are exact counts (no value within 100x round-off of a threshold).
    np.testing.assert_allclose(rep["nl2_median"], np.median(want), rtol=1e-5)
    np.testing.assert_allclose(rep["nl2_top5pct"], np.percentile(want, 5), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rep["nl2_top1"], want.min(), atol=1e-6)
    assert rep["frac_nl2_below_1.4"] == np.mean(want < 1.4)
    assert rep["frac_nl2_below_1.6"] == np.mean(want < 1.6)
    assert rep["frac_copied"] == np.mean(d < thr) == 2 / 30   # the exact and the 1e-3 near copy
    np.testing.assert_allclose(rep["nn_dist_median"], np.median(d), rtol=1e-5)
    assert rep["copy_threshold"] == thr
    assert rep["frac_out_of_range"] == metrics.frac_out_of_range(x)
    rep2 = metrics.memorization_report(x, train)
    assert "frac_copied" not in rep2 and "nn_dist_median" not in rep2


def _fd_scipy(a, b):
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_frechet_matches_scipy_and_properties():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    fd = metrics.frechet_distance(a, b)
    # float64, two algorithms (eigh vs scipy's Schur sqrtm) on well-conditioned 6-d covariances:
    # ~1e-14 relative (measured 7e-15); 1e-7 / 1e-9 are loose, a wrong term is off by >1e-2. The
    # self-distances are ~eps * tr(S) ~ 1e-13 (clipped at 0 where the round-off goes negative).
    np.testing.assert_allclose(fd, _fd_scipy(a, b), rtol=1e-7)
    assert fd == pytest.approx(metrics.frechet_distance(b, a), rel=1e-9)
    assert abs(metrics.frechet_distance(a, a)) < 1e-9
    # Rank-deficient covariances (N < D) stay finite and non-negative.
    c = rng.normal(size=(5, 12))
    assert 0.0 <= metrics.frechet_distance(c, c) < 1e-9
    assert np.isfinite(metrics.frechet_distance(c, rng.normal(size=(7, 12))))
    with pytest.raises(ValueError):
        metrics.frechet_distance(a, b[:, :3])
    with pytest.raises(ValueError):
        metrics.frechet_distance(a[:1], b)


def _exact_samples(rng, n, mu, cov):
    """n samples whose sample mean / unbiased covariance are exactly mu / cov."""
    z = rng.normal(size=(n, len(mu)))
    z -= z.mean(0)
    lz = np.linalg.cholesky(np.cov(z, rowvar=False))
    z = z @ np.linalg.inv(lz).T
    return z @ np.linalg.cholesky(cov).T + mu


def test_frechet_closed_form_gaussians():
    rng = np.random.default_rng(4)
    d = 5
    # Commuting (diagonal) covariances: FD = |dmu|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    va, vb = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    want = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2))
    # float64 closed forms vs eigh on well-conditioned 5-d covariances: ~1e-15 relative (measured
    # <= 3e-15); _exact_samples' Cholesky round trip adds ~1e-14. rel 1e-10..1e-8 are loose.
    assert metrics.gaussian_frechet(mu1, np.diag(va), mu2, np.diag(vb)) == pytest.approx(want, rel=1e-10)
    a = _exact_samples(rng, 40, mu1, np.diag(va))
    b = _exact_samples(rng, 60, mu2, np.diag(vb))
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=1e-8)
    # Scalar multiples of one covariance: FD = |dmu|^2 + (sqrt(s1) - sqrt(s2))^2 tr(S).
    m = rng.normal(size=(d, d))
    s = m @ m.T + 0.1 * np.eye(d)
    want = float(np.sum((mu1 - mu2) ** 2) + (np.sqrt(2.0) - np.sqrt(0.5)) ** 2 * np.trace(s))
    assert metrics.gaussian_frechet(mu1, 2.0 * s, mu2, 0.5 * s) == pytest.approx(want, rel=1e-9)


def test_pixel_features():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(3, 8, 8, 2))
    f = metrics.pixel_features(x, pool=4)
    assert f.shape == (3, 2 * 2 * 2)
    want = np.stack([[x[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4, c].mean() for i in range(2) for j in range(2)
                      for c in range(2)] for n in range(3)])
    # float64 means of 16 values in two orders: <= 16 eps sum|x| / |sum| = 6e-14 for this data
    # (smallest |mean| 0.05). pool=1 is a reshape and pixel_frechet the same call: exact.
    np.testing.assert_allclose(f, want, rtol=1e-12)
    np.testing.assert_array_equal(metrics.pixel_features(x), x.reshape(3, -1))
    y = rng.normal(size=(6, 8, 8, 2))
    assert metrics.pixel_frechet(x, y, pool=4) == pytest.approx(
        metrics.frechet_distance(metrics.pixel_features(x, 4), metrics.pixel_features(y, 4)))
    with pytest.raises(ValueError):
        metrics.pixel_features(x, pool=3)


def test_similarity_report_matches_numpy():
    rng = np.random.default_rng(6)
    s = np.clip(rng.normal(0.3, 0.2, 237), -1, 1)
    s[:3] = [0.5, 0.4, 0.97]                  # exactly at the thresholds: not counted (strictly above)
    r = metrics.similarity_report(s)
    json.dumps(r)
    assert all(type(v) is float for v in r.values())
    assert set(r) == {"sim_median", "sim_mean", "sim_top5pct", "sim_top1", "frac_sim_above_0.5",
                      "frac_sim_above_0.4"}
    # float64 NumPy percentile / median / mean of the same values on both sides: exact or ~1 ulp.
    assert r["sim_top5pct"] == pytest.approx(np.percentile(s, 95), rel=1e-12)
    assert r["sim_top1"] == 0.97 == s.max()
    assert r["sim_median"] == pytest.approx(np.median(s)) and r["sim_mean"] == pytest.approx(s.mean())
    assert r["frac_sim_above_0.5"] == np.sum(s > 0.5) / 237
    assert r["frac_sim_above_0.4"] == np.sum(s > 0.4) / 237
    assert r["frac_sim_above_0.5"] < r["frac_sim_above_0.4"]
    # Direction on a hand-made vector: top5pct is the HIGH (memorized) end, the mirror of nl2_top5pct.
    vals = np.linspace(0.0, 1.0, 101)
    r = metrics.similarity_report(vals, threshold=0.9, strict=0.75, name="sscd")
    assert r["sscd_top5pct"] == pytest.approx(0.95) and r["sscd_top1"] == 1.0
    assert r["frac_sscd_above_0.9"] == pytest.approx(10 / 101)
    assert r["frac_sscd_above_0.75"] == pytest.approx(25 / 101)
    with pytest.raises(ValueError, match="no values"):
        metrics.similarity_report([])
    with pytest.raises(ValueError, match="NaN"):
        metrics.similarity_report([0.1, np.nan])
    with pytest.raises(ValueError, match="identifier"):
        metrics.similarity_report([0.1], name="bad name")


def _sqrt_psd(s):
    w, v = np.linalg.eigh(s)
    return v * np.sqrt(np.clip(w, 0, None))


def _gf_nuclear(mu1, s1, mu2, s2):
    """Independent FD: tr sqrt(S1 S2) = the nuclear norm of L1^T L2 for any factors S = L L^T
    (exact also for singular covariances)."""
    tr = np.linalg.svd(_sqrt_psd(s1).T @ _sqrt_psd(s2), compute_uv=False).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr)


def _gf_scipy(mu1, s1, mu2, s2):
    covmean = np.real(scipy.linalg.sqrtm(s1 @ s2))
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_gaussian_frechet_matches_scipy():
    rng = np.random.default_rng(7)
    d = 7
    m1, m2 = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = m1 @ m1.T + 0.05 * np.eye(d), m2 @ m2.T + 0.05 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    got = metrics.gaussian_frechet(mu1, s1, mu2, s2)
    # float64, three algorithms (eigh, Schur sqrtm, SVD) on 7-d covariances of condition ~1e2:
    # ~1e-15 relative (measured <= 8e-16); 1e-9 / 1e-10 are loose, a wrong term is off by >1e-2.
    assert got == pytest.approx(_gf_scipy(mu1, s1, mu2, s2), rel=1e-9)
    assert got == pytest.approx(_gf_nuclear(mu1, s1, mu2, s2), rel=1e-10)
    assert got == pytest.approx(metrics.gaussian_frechet(mu2, s2, mu1, s1), rel=1e-10)
    assert abs(metrics.gaussian_frechet(mu1, s1, mu1, s1)) < 1e-10 * np.trace(s1)
    with pytest.raises(ValueError, match="shapes"):
        metrics.gaussian_frechet(mu1, s1, mu2[:3], s2)


def test_frechet_near_singular_covariance():
    """Features on a 3-d subspace of R^8 plus 1e-5 noise: covariance eigenvalues ~1 and ~1e-10."""
    rng = np.random.default_rng(8)
    w1, w2 = rng.normal(size=(3, 8)), rng.normal(size=(3, 8))
    a = rng.normal(size=(300, 3)) @ w1 + 1e-5 * rng.normal(size=(300, 8))
    b = rng.normal(size=(250, 3)) @ w2 + 1e-5 * rng.normal(size=(250, 8)) + 0.2
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    ev = np.linalg.eigvalsh(s1)
    assert ev.min() < 1e-8 * ev.max()                       # near-singular indeed
    got = metrics.frechet_distance(a, b)
    # float64 with near-null directions: eigvalsh returns the 5 near-zero eigenvalues of
    # S1^1/2 S2 S1^1/2 as +-eps * |m| ~ 1e-14, and each square root adds up to sqrt(eps |m|) ~ 2.5e-7
    # to tr sqrt: FD = 40 is fixed to ~1e-8 relative; 1 ulp in a covariance entry moves it by ~1e-9
    # (so even the same NumPy calls are not held to 1e-12). Measured vs the SVD: 4e-9 (3.5e-9 on
    # another BLAS kernel); rel 1e-7 leaves 25x, and ddof=0 for 1 would be off by 3e-3.
    assert got == pytest.approx(metrics.gaussian_frechet(mu1, s1, mu2, s2), rel=1e-7)
    want = _gf_nuclear(mu1, s1, mu2, s2)
    assert got == pytest.approx(want, rel=1e-7)
    with np.errstate(all="ignore"):
        ref = _gf_scipy(mu1, s1, mu2, s2)
    # scipy's sqrtm of the singular, non-symmetric S1 S2: measured 1.4e-8; 1e-6 leaves 70x.
    assert got == pytest.approx(ref, rel=1e-6)
    # The same subspace for both: a small FD (0.098) with near-null directions in both covariances:
    # the same <= 5 sqrt(eps |m|) ~ 1.2e-6 absolute (measured 0.8e-7 to 3.6e-7 across BLAS kernels
    # and runs); abs 5e-6 leaves >10x and is still 5e-5 of the FD.
    c = rng.normal(size=(200, 3)) @ w1 + 1e-5 * rng.normal(size=(200, 8))
    fd = metrics.frechet_distance(a, c)
    assert 0.0 <= fd and fd == pytest.approx(_gf_nuclear(mu1, s1, c.mean(0), np.cov(c, rowvar=False)), abs=5e-6)
