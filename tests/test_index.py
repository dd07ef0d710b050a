"""Reference bank: exact / approximate / sharded search against a float64 NumPy brute force,
knn_scale, deduplication, save / load, and input errors."""
import functools
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import index

SHAPE = (4, 4, 3)
M = 37                      # not a multiple of the 4 test devices: the sharded bank is padded
# Tolerances: float32 direct values (48-d distances / cosines) vs the float64 brute force: ~1e-7
# relative (margins <= 6%), so rtol 1e-5 / atol 1e-6 leave >15x; a wrong row is off by >1e-3. Orders
# and indices are compared exactly: neighbouring values here are >= 7e-4 relative apart.


@functools.lru_cache(maxsize=None)
def _data():
    rng = np.random.default_rng(0)
    rows = rng.uniform(-1, 1, (M,) + SHAPE).astype(np.float32)
    labels = (np.arange(M) % 5).astype(np.int32)
    q = rng.uniform(-1, 1, (6,) + SHAPE).astype(np.float32)
    q[0] = rows[7] + 1e-3 * rng.normal(size=SHAPE).astype(np.float32)    # a near copy
    q[1] = rows[11]                                                       # an exact copy
    return rows, labels, q


@pytest.fixture(scope="module")
def banks():
    rows, labels, _ = _data()
    bank = index.build_bank(rows, labels)
    return bank, index.shard_bank(bank)


def _brute(q, rows, metric):
    """float64 values [B, M] and the order (nearest first) of every row."""
    qf = np.asarray(q, np.float64).reshape(len(q), -1)
    rf = np.asarray(rows, np.float64).reshape(len(rows), -1)
    if metric == "l2":
        v = np.sqrt(((qf[:, None] - rf[None]) ** 2).sum(-1))
        return v, np.argsort(v, axis=1, kind="stable")
    v = qf @ rf.T / (np.linalg.norm(qf, axis=1)[:, None] * np.linalg.norm(rf, axis=1)[None])
    return v, np.argsort(-v, axis=1, kind="stable")


class SearchTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_bruteforce(self):
        rows, labels, q = _data()
        bank = index.build_bank(rows, labels)
        for metric in ("l2", "cosine"):
            full, order = _brute(q, rows, metric)
            for k in (1, 5):
                v, i = self.variant(lambda b, x: index.search(b, x, k, metric=metric))(bank, jnp.asarray(q))
                chex.assert_shape([v, i], (len(q), k))
                assert i.dtype == jnp.int32
                np.testing.assert_array_equal(np.asarray(i), order[:, :k])
                np.testing.assert_allclose(np.asarray(v), np.take_along_axis(full, order[:, :k], 1),
                                           rtol=1e-5, atol=1e-6)
        # Direct values: the exact copy is at distance exactly 0 / cosine 1 (float32 q.q / |q|^2: 1 ulp
        # here, a few at most; rtol 1e-6 = 16 ulps).
        assert float(index.search(bank, jnp.asarray(q), 1)[0][1, 0]) == 0.0
        np.testing.assert_allclose(float(index.search(bank, jnp.asarray(q), 1, metric="cosine")[0][1, 0]), 1.0,
                                   rtol=1e-6)


def test_k_is_clamped_and_lookup_maps_rows(banks):
    bank, _ = banks
    rows, labels, q = _data()
    v, i = index.search(bank, jnp.asarray(q), 500)
    chex.assert_shape([v, i], (len(q), M))
    assert np.all(np.diff(np.asarray(v), axis=1) >= 0)
    src, lab = bank.lookup(i[:, :1])
    np.testing.assert_array_equal(np.asarray(src)[:, 0], _brute(q, rows, "l2")[1][:, 0])
    np.testing.assert_array_equal(np.asarray(lab), labels[np.asarray(src)])


def test_gradient_is_direct_at_a_copy(banks):
    """README pitfall 1: the value is ||q - z|| computed directly, so d/dq at a near copy is
    the unit vector (q - z) / ||q - z||, and at an exact copy it is finite."""
    bank, _ = banks
    rows, _, q = _data()
    g = np.asarray(jax.grad(lambda x: index.search(bank, x, 1)[0].sum())(jnp.asarray(q)))
    assert np.all(np.isfinite(g))
    delta = (q[0] - rows[7]).reshape(-1).astype(np.float64)
    # float32 unit vector of a 1e-3 difference (delta itself is exact in float32): margin 7e-6
    np.testing.assert_allclose(g[0].reshape(-1), delta / np.linalg.norm(delta), rtol=2e-3, atol=2e-3)


def test_approx_search_recall():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(400, 16)).astype(np.float32)
    q = rng.normal(size=(16, 16)).astype(np.float32)
    bank = index.build_bank(rows, scale_rows=64)
    k = 10
    for metric in ("l2", "cosine"):
        v, i = index.search(bank, jnp.asarray(q), k, metric=metric, approx=True, recall_target=0.95)
        i = np.asarray(i)
        assert np.all((i >= 0) & (i < 400)) and all(len(set(r)) == k for r in i)
        full, order = _brute(q, rows, metric)
        np.testing.assert_allclose(np.asarray(v), np.take_along_axis(full, i, 1), rtol=1e-5, atol=1e-6)
        recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(i, order[:, :k])])
        assert recall >= 0.95, recall


def test_shard_bank_pads_with_rows_never_chosen(banks):
    bank, sharded = banks
    assert len(jax.devices()) == 4
    assert sharded.sharded and sharded.size == M and sharded.rows.shape == (40, bank.dim)
    assert sharded.rows.sharding.spec[0] == "bank"
    assert np.all(np.isinf(np.asarray(sharded.sq_norms)[M:]))
    np.testing.assert_array_equal(np.asarray(sharded.source_index)[M:], -1)
    # Every row is reachable, and padding never is, even when k = M.
    _, i = index.search(sharded, jnp.asarray(_data()[2]), M)
    assert np.all(np.sort(np.asarray(i), axis=1) == np.arange(M))
    un = index.unshard_bank(sharded)
    assert not un.sharded and un.rows.shape == (M, bank.dim)


def _search_all(b, x):
    """values, indices and grad w.r.t. the queries for l2 / cosine, k = 1 / 5."""
    out = {}
    for metric in ("l2", "cosine"):
        for k in (1, 5):
            out[metric, k] = index.search(b, x, k, metric=metric) + (
                jax.grad(lambda z: index.search(b, z, k, metric=metric)[0].sum())(x),)
    return out


def test_sharded_search_equals_unsharded(banks):
    bank, sharded = banks
    q = jnp.asarray(_data()[2])
    f = jax.jit(_search_all)
    want, got = f(bank, q), f(sharded, q)
    # Exact by design (index.py): the chosen rows are gathered exactly (one owner per row in the
    # psum) and the values are the same dot products on them, sharded or not, jitted inside or out;
    # any difference is a bug in the sharded path, not round-off.
    for key in want:
        for a, b in zip(want[key], got[key]):
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a), err_msg=str(key))
    # eagerly too (search is jitted inside), and equal to the jitted results
    v, i = index.search(sharded, q, 5, metric="cosine")
    g = jax.grad(lambda z: index.search(sharded, z, 5, metric="cosine")[0].sum())(q)
    for a, b in zip(want["cosine", 5], (v, i, g)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    # approximate candidates per shard, exact merge: still valid rows
    _, i = index.search(sharded, q, 5, approx=True)
    assert np.all((np.asarray(i) >= 0) & (np.asarray(i) < M))


def test_knn_scale_matches_bruteforce():
    rows, _, _ = _data()
    for k in (3, 50):
        bank = index.build_bank(rows, k=k)
        d = _brute(rows, rows, "l2")[0]
        np.fill_diagonal(d, np.inf)
        want = np.median(np.mean(np.sort(d, axis=1)[:, :min(k, M - 1)], axis=1))
        # knn_scale's values are direct float64 distances too: ~1e-16 (margin 0), 1e-6 is loose
        np.testing.assert_allclose(bank.knn_scale, want, rtol=1e-6)
    # a subset of rows estimates it (neighbours still from every row)
    sub = index.knn_mean_distances(rows, 5, max_rows=10)
    assert sub.shape == (10,) and np.all(sub > 0)


def test_dedup_is_default_and_duplicates_shrink_knn_means():
    """README pitfall 2: exact duplicates put zero distances into the k-NN mean."""
    rows, labels, _ = _data()
    uniq = rows[:12]
    dup = np.concatenate([uniq, uniq[[0, 0, 0, 0, 5]]])
    dlab = np.concatenate([labels[:12], labels[[0, 0, 0, 0, 5]]])
    on = index.build_bank(dup, dlab, k=3)
    off = index.build_bank(dup, dlab, k=3, dedup=False)
    assert on.dedup and on.size == 12 and off.size == 17
    np.testing.assert_array_equal(np.asarray(on.source_index), np.arange(12))
    np.testing.assert_array_equal(np.asarray(on.labels), labels[:12])
    np.testing.assert_allclose(on.knn_scale, index.build_bank(uniq, k=3).knn_scale, rtol=1e-6)  # same rows: exact
    m_on = index.knn_mean_distances(np.asarray(on.rows), 3)
    m_off = index.knn_mean_distances(np.asarray(off.rows), 3)
    assert m_on[0] > 0 and m_off[0] == 0.0            # row 0 has 4 copies: its 3 nearest are at 0
    assert 0 < m_off[5] < m_on[5]                     # row 5 has 1 copy: one zero in its mean
    np.testing.assert_allclose(m_off[1], m_on[1], rtol=1e-6)    # not duplicated: unaffected


def test_normalize_and_embedding_kind():
    rows, _, _ = _data()
    e = rows.reshape(M, -1)[:, :8] * 3.0
    bank = index.build_bank(e, kind="embedding", normalize=True)
    # float32 rows normalised, their float32 norms: 1 ulp here (6e-8), a few at most
    np.testing.assert_allclose(np.linalg.norm(np.asarray(bank.rows), axis=1), 1.0, rtol=1e-6)
    assert bank.kind == "embedding" and bank.normalized and bank.sample_shape == (8,)
    with pytest.raises(ValueError, match="cannot normalise zero rows"):
        index.build_bank(np.zeros((2, 3)), normalize=True)


# ----------------------------------------------------------------------------- save / load

def _assert_same_bank(a, b):
    for name in ("rows", "sq_norms", "labels", "source_index"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name)), np.asarray(getattr(b, name)))
        assert getattr(a, name).dtype == getattr(b, name).dtype
    for name in ("sample_shape", "kind", "knn_scale", "copy_threshold", "dedup", "normalized", "num_rows"):
        assert getattr(a, name) == getattr(b, name), name


def test_save_load_round_trip(tmp_path, banks):
    bank, sharded = banks
    bank = bank.replace(copy_threshold=1.25)
    p = index.save_bank(str(tmp_path / "bank.npz"), bank)
    _assert_same_bank(index.load_bank(p), bank)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []      # atomic: no leftovers
    # a sharded bank is saved without its padding and mesh
    p2 = index.save_bank(str(tmp_path / "sub" / "sharded.npz"), sharded)
    loaded = index.load_bank(p2)
    _assert_same_bank(loaded, index.unshard_bank(sharded))
    assert loaded.mesh is None


def test_load_errors_name_the_file_and_problem(tmp_path, banks):
    bank, _ = banks
    missing = str(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match=r"nope\.npz.*no such file"):
        index.load_bank(missing)
    good = index.save_bank(str(tmp_path / "good.npz"), bank)
    data = open(good, "rb").read()
    trunc = tmp_path / "trunc.npz"
    trunc.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"trunc\.npz.*not a readable \.npz"):
        index.load_bank(str(trunc))
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=r"junk\.npz.*not a readable"):
        index.load_bank(str(junk))

    with np.load(good) as z:
        arrays = {n: z[n] for n in z.files}

    def write(name, **changes):
        p = str(tmp_path / name)
        with open(p, "wb") as f:
            np.savez(f, **{**arrays, **changes})
        return p

    with pytest.raises(ValueError, match=r"bad_labels\.npz.*labels has shape \(36,\), expected \(37,\)"):
        index.load_bank(write("bad_labels.npz", labels=arrays["labels"][:-1]))
    with pytest.raises(ValueError, match=r"rows have shape \(37, 47\)"):
        index.load_bank(write("bad_rows.npz", rows=arrays["rows"][:, :-1]))
    with pytest.raises(ValueError, match="version 99 is not supported"):
        meta = str(arrays["metadata"]).replace('"version": 1', '"version": 99')
        index.load_bank(write("bad_version.npz", metadata=np.array(meta)))
    with pytest.raises(ValueError, match="metadata is not valid JSON"):
        index.load_bank(write("bad_meta.npz", metadata=np.array("{oops")))
    with pytest.raises(ValueError, match="NaN or inf"):
        rows = arrays["rows"].copy()
        rows[3, 0] = np.nan
        index.load_bank(write("nan.npz", rows=rows))


# ----------------------------------------------------------------------------- errors

def test_bad_inputs(banks):
    bank, _ = banks
    rows, labels, q = _data()
    with pytest.raises(ValueError, match="empty"):
        index.build_bank(np.zeros((0,) + SHAPE))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        index.build_bank(np.zeros(5))
    bad = rows.copy()
    bad[4, 1, 1, 1] = np.inf
    with pytest.raises(ValueError, match=r"NaN or inf \(1 rows, first row 4\)"):
        index.build_bank(bad)
    with pytest.raises(ValueError, match=r"labels must have shape \[M\] = \(37,\)"):
        index.build_bank(rows, labels[:-2])
    with pytest.raises(ValueError, match="kind must be one of"):
        index.build_bank(rows, kind="sscd")
    with pytest.raises(ValueError, match="copy_threshold"):
        index.build_bank(rows, copy_threshold=float("nan"))
    with pytest.raises(ValueError, match=r"queries of shape \(2, 2, 3\).*sample shape \(4, 4, 3\)"):
        index.search(bank, jnp.zeros((3, 2, 2, 3)), 1)
    with pytest.raises(ValueError, match="metric must be"):
        index.search(bank, jnp.asarray(q), 1, metric="dot")
    with pytest.raises(ValueError, match="k must be"):
        index.search(bank, jnp.asarray(q), 0)
    with pytest.raises(ValueError, match="mesh must be 1-D"):
        index.shard_bank(bank, jax.make_mesh((2, 2), ("a", "b")))
