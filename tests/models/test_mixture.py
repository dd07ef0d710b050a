"""The closed-form partial memorizer: exactness against a float64 reference, limits, the
unconditional mixture, jit, errors, and the memorization shape on a tiny testbed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.data import testbed as tb
from amg_jax.models import mixture as mx
from amg_jax.schedules import Schedule

K, D, R, N, C = 5, 12, 3, 4, 3
SHAPE = (2, 2, 3)


def _alphas_cumprod(schedule):
    try:
        return np.asarray(schedule.alphas_cumprod(), np.float64)
    except AttributeError:  # pragma: no cover - schedules.py being rewritten
        return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


def _instance(per_component: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = dict(
        means=rng.normal(size=(K, D)),
        diag_var=rng.uniform(0.05, 0.5, size=(K, D)),
        basis=rng.normal(size=(K, D, R) if per_component else (D, R)) * 0.5,
        basis_var=rng.uniform(0.0, 1.0, size=(K, R)),
        atoms=rng.normal(size=(N, D)),
        gauss_weights=rng.uniform(size=(C, K)) * (rng.uniform(size=(C, K)) > 0.3),
        atom_weights=rng.uniform(size=(C, N)) * (rng.uniform(size=(C, N)) > 0.3),
        cond_weights=rng.uniform(0.2, 1.0, size=C),
    )
    arrays["gauss_weights"][:, 0] += 0.1                       # no empty row
    den = mx.mixture_denoiser(arrays["means"], arrays["diag_var"], arrays["basis"], arrays["basis_var"],
                              arrays["atoms"], arrays["gauss_weights"], arrays["atom_weights"],
                              cond_weights=arrays["cond_weights"], sample_shape=SHAPE)
    return den, arrays


def _reference(arrays, x, t, c):
    """float64 brute force with dense covariances: (eps [D], responsibilities [K + N], log p + D/2 log 2pi)."""
    ab = _alphas_cumprod(Schedule())[t]
    s, v = np.sqrt(ab), 1.0 - ab
    w = np.concatenate([arrays["gauss_weights"], arrays["atom_weights"]], axis=1)
    w = w / w.sum(1, keepdims=True)
    cw = arrays["cond_weights"] / arrays["cond_weights"].sum()
    w = cw @ w if c < 0 else w[c]
    logs, grads = [], []
    for k in range(K):
        u = arrays["basis"][k] if arrays["basis"].ndim == 3 else arrays["basis"]
        sigma = u @ np.diag(arrays["basis_var"][k]) @ u.T + np.diag(arrays["diag_var"][k])
        cov = ab * sigma + v * np.eye(D)
        delta = x - s * arrays["means"][k]
        inv = np.linalg.inv(cov)
        logs.append(-0.5 * (delta @ inv @ delta + np.linalg.slogdet(cov)[1]))
        grads.append(inv @ delta)
    for i in range(N):
        delta = x - s * arrays["atoms"][i]
        logs.append(-0.5 * (delta @ delta / v + D * np.log(v)))
        grads.append(delta / v)
    with np.errstate(divide="ignore"):
        logits = np.asarray(logs) + np.log(w)
    lse = np.logaddexp.reduce(logits)
    resp = np.exp(logits - lse)
    return np.sqrt(v) * (resp[:, None] * np.asarray(grads)).sum(0), resp, lse


@pytest.fixture(scope="module", params=[False, True], ids=["shared_basis", "per_component_basis"])
def tiny(request):
    return _instance(request.param)


@pytest.mark.parametrize("tt", [[500] * 6, [0, 10, 300, 600, 999, 50]], ids=["same_t", "mixed_t"])
def test_matches_dense_float64_reference(tiny, tt):
    den, arrays = tiny
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6,) + SHAPE).astype(np.float32)
    t = jnp.asarray(tt, jnp.int32)
    cond = jnp.asarray([-1, 0, 1, 2, 0, -1], jnp.int32)
    eps = np.asarray(den(jnp.asarray(x), t, cond))
    resp = mx.responsibilities(den.params, jnp.asarray(x), t, cond)
    ll = np.asarray(mx.log_likelihood(den.params, jnp.asarray(x), t, cond))
    full = np.concatenate([np.asarray(resp.gaussians), np.asarray(resp.atoms)], axis=1)
    # float32 (Woodbury solves, log-sum-exp over K + N logits) vs dense float64: measured <= 8e-7 in
    # the sums of responsibilities, <= 1.5e-6 in eps / responsibilities (the same with AVX and another
    # BLAS kernel): >= 12x under each tolerance; a wrong covariance or weight is off by >1e-2.
    # atom_total is the same float32 sum here (exact); 1e-6 (8 ulps of 1) allows another order.
    np.testing.assert_allclose(full.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(resp.atom_total), full[:, K:].sum(1), atol=1e-6)
    for b in range(6):
        e_ref, r_ref, l_ref = _reference(arrays, x[b].reshape(-1).astype(np.float64), tt[b], int(cond[b]))
        np.testing.assert_allclose(eps[b].reshape(-1), e_ref, atol=2e-5, rtol=1e-4)
        np.testing.assert_allclose(full[b], r_ref, atol=2e-5)
        np.testing.assert_allclose(ll[b], l_ref, rtol=1e-5, atol=1e-3)


def test_mixed_timesteps_equal_one_at_a_time(tiny):
    den, _ = tiny
    x = jax.random.normal(jax.random.PRNGKey(0), (4,) + SHAPE)
    t = jnp.asarray([3, 200, 700, 999], jnp.int32)
    cond = jnp.asarray([0, -1, 2, 1], jnp.int32)
    batch = den(x, t, cond)
    # batch of 4 vs 1: bit-identical here; XLA may block the D=12 matmuls differently (~1e-7
    # relative of |eps| <= 2.5), atol 1e-5 leaves >30x. A mixed-up t or condition is off by O(0.1).
    for b in range(4):
        np.testing.assert_allclose(batch[b], den(x[b:b + 1], t[b:b + 1], cond[b:b + 1])[0], atol=1e-5)


def test_jit_matches_eager(tiny):
    den, _ = tiny
    x = jax.random.normal(jax.random.PRNGKey(1), (3,) + SHAPE)
    t, cond = jnp.full((3,), 321, jnp.int32), jnp.asarray([0, 1, -1], jnp.int32)
    with jax.disable_jit():
        eager = den.eps_fn(den.params, x, t, cond)
    jitted = jax.jit(den.eps_fn)(den.params, x, t, cond)
    # eager (op by op) vs fused jit: ~3 ulps of |eps| <= 2.5, measured 8.3e-7 (7e-7 with AVX):
    # atol 1e-5 leaves 12x. The Denoiser pytree is the same jitted function: exact here (1e-6 loose).
    np.testing.assert_allclose(eager, jitted, atol=1e-5)
    # and the whole Denoiser pytree goes through jit
    np.testing.assert_allclose(jax.jit(lambda d, x: d(x, t, cond))(den, x), jitted, atol=1e-6)


def test_near_an_atom_at_small_t_the_atom_wins(tiny):
    den, arrays = tiny
    ab = _alphas_cumprod(Schedule())
    i = 2
    c = int(np.flatnonzero(arrays["atom_weights"][:, i] > 0)[0]) if np.any(arrays["atom_weights"][:, i] > 0) else -1
    x0 = arrays["atoms"][i].reshape(SHAPE)
    noise = np.random.default_rng(3).normal(size=SHAPE)
    for t in (0, 2):
        xt = (np.sqrt(ab[t]) * x0 + np.sqrt(1 - ab[t]) * noise)[None].astype(np.float32)
        for cond in (c, -1):
            r = mx.responsibilities(den.params, jnp.asarray(xt), jnp.asarray([t]), jnp.asarray([cond]))
            assert float(r.atoms[0, i]) > 0.999
            x0_hat = np.asarray(mx.x0_estimate(den.params, jnp.asarray(xt), jnp.asarray([t]), jnp.asarray([cond])))
            # the atom up to the others' responsibility (< 1e-3) and float32 (measured 2e-7); a wrong atom is O(1)
            np.testing.assert_allclose(x0_hat[0], x0, atol=2e-3)
    # far from every atom at small t, the Gaussians take it
    far = (np.sqrt(ab[0]) * arrays["means"][0].reshape(SHAPE))[None].astype(np.float32)
    r = mx.atom_responsibility(den.params, jnp.asarray(far), jnp.asarray([0]), jnp.asarray([-1]))
    assert float(r[0]) < 1e-3


def test_unconditional_is_the_frequency_weighted_mixture(tiny):
    den, arrays = tiny
    x = jax.random.normal(jax.random.PRNGKey(2), (3,) + SHAPE)
    f = arrays["cond_weights"] / arrays["cond_weights"].sum()
    for t in (50, 400, 900):
        tt = jnp.full((3,), t, jnp.int32)
        eps_u = np.asarray(den(x, tt, jnp.full((3,), -1, jnp.int32)))
        eps_c = np.stack([np.asarray(den(x, tt, jnp.full((3,), c, jnp.int32))) for c in range(C)])
        ll_c = np.stack([np.asarray(mx.log_likelihood(den.params, x, tt, jnp.full((3,), c, jnp.int32)))
                         for c in range(C)])                           # [C, B]
        ll_u = np.asarray(mx.log_likelihood(den.params, x, tt, jnp.full((3,), -1, jnp.int32)))
        # p(x) = sum_c f_c p(x | c), and eps_u = sum_c p(c | x) eps_c. float32 log-likelihoods and
        # eps vs their float64 combination: margins <= 1.4% (with AVX too); a wrong f_c is off by >1e-2.
        np.testing.assert_allclose(ll_u, np.logaddexp.reduce(np.log(f)[:, None] + ll_c, axis=0), rtol=1e-5, atol=1e-3)
        post = np.exp(np.log(f)[:, None] + ll_c - ll_u[None])              # [C, B]
        np.testing.assert_allclose(post.sum(0), 1.0, atol=1e-4)
        np.testing.assert_allclose(eps_u, np.einsum("cb,cb...->b...", post, eps_c), atol=1e-4)


def test_bad_conditions_and_arrays(tiny):
    den, arrays = tiny
    assert den.num_conditions == C and int(den.null_cond) == -1
    den.validate_cond(jnp.asarray([0, C - 1, -1]))
    for bad in ([C], [-2], [0, 7]):
        with pytest.raises(ValueError, match="unknown condition id"):
            den.validate_cond(np.asarray(bad, np.int32))
    with pytest.raises(ValueError, match="diag_var"):
        mx.mixture_denoiser(arrays["means"], -arrays["diag_var"], arrays["basis"], arrays["basis_var"],
                            arrays["atoms"], arrays["gauss_weights"], arrays["atom_weights"])
    with pytest.raises(ValueError, match="all-zero"):
        mx.mixture_denoiser(arrays["means"], arrays["diag_var"], arrays["basis"], arrays["basis_var"],
                            arrays["atoms"], np.zeros((C, K)), np.zeros((C, N)))
    with pytest.raises(ValueError, match="basis"):
        mx.mixture_denoiser(arrays["means"], arrays["diag_var"], np.ones((D + 1, 2)), np.ones((K, 2)),
                            arrays["atoms"], arrays["gauss_weights"], arrays["atom_weights"])


def test_fit_gaussians_recovers_a_low_rank_covariance():
    rng = np.random.default_rng(0)
    dim, n = 20, 400
    u = np.linalg.qr(rng.normal(size=(dim, 2)))[0]
    samples = np.stack([m + (rng.normal(size=(n, 2)) * [2.0, 1.0]) @ u.T + 0.1 * rng.normal(size=(n, dim))
                        for m in (np.zeros(dim), np.ones(dim))])
    for per_component in (False, True):
        fit = mx.fit_gaussians(samples, rank=2, per_component=per_component, min_variance=1e-4)
        # means: float32 of a mean of 400 samples (margin 4e-4). The variances are statistical: 400
        # fixed (seeded) samples give ~7% (sqrt(2/400)) per variance (measured 6.5% and 11% off);
        # round-off (~1e-6) is no factor. A missing or swapped basis direction is off by >= 4x.
        np.testing.assert_allclose(fit.means, samples.mean(1), atol=1e-5)
        bv = np.sort(fit.basis_var, axis=1)[:, ::-1]
        np.testing.assert_allclose(bv, [[4.0, 1.0]] * 2, rtol=0.25)
        np.testing.assert_allclose(fit.diag_var.mean(), 0.01, rtol=0.3)


# ----------------------------------------------------------------------------- the testbed model

@pytest.fixture(scope="module")
def fitted(small_mixture):
    return small_mixture


def test_fit_mixture_structure(fitted):
    bed, den = fitted
    assert den.num_conditions == bed.num_captions and den.condition_names == bed.captions
    assert den.sample_shape == (16, 16, 3) and int(den.null_cond) == -1
    p = den.params
    # float32 parameters vs the float64 / exact testbed quantities: ~1e-7 (margins <= 0.7%); a
    # missing atom, a wrong mass or weight is off by >1e-2.
    np.testing.assert_allclose(np.asarray(p["atoms"] + p["center"]),
                               bed.unique_images.reshape(len(bed.unique_index), -1), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(p["atom_labels"]), bed.unique_labels)
    w = np.exp(np.asarray(p["log_weights"], np.float64))
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    k = p["means"].shape[0]
    m = mx.memorization_mass(bed)
    by = tb.prompts_by_kind(bed)
    assert m[by["duplicated"]].min() > m[by["specific"]].max() > m[by["generic"]].max()
    np.testing.assert_allclose(w[:-1, k:].sum(1), m, atol=1e-5)        # atom mass = m_c
    for c in by["generic"]:                                            # uniform over the consistent combos
        combos, _ = tb.full_captions(bed, c)
        gw = w[c, :k]
        assert np.sum(gw > 0) == len(combos)
        np.testing.assert_allclose(gw[gw > 0], (1 - m[c]) / len(combos), rtol=1e-4)
    freq = np.bincount(bed.labels, minlength=bed.num_captions) / len(bed.labels)
    np.testing.assert_allclose(w[-1], freq @ w[:-1], atol=1e-6)
    # an explicit memorization override
    den2 = mx.fit_mixture(bed, renders_per_component=4, rank=2, memorization={"specific": 0.0, "generic": 0.0})
    w2 = np.exp(np.asarray(den2.params["log_weights"], np.float64))
    assert np.all(w2[by["specific"], k:].sum(1) < 1e-6)
    with pytest.raises(ValueError, match="memorization"):
        mx.fit_mixture(bed, renders_per_component=4, memorization=np.ones(3))


def _ddim_cfg(den, cond, scale, steps=25, seed=0):
    ab = jnp.asarray(_alphas_cumprod(den.schedule), jnp.float32)
    ts = np.arange(steps)[::-1] * (1000 // steps)
    b = cond.shape[0]
    null = jnp.full((b,), -1, jnp.int32)

    @jax.jit
    def run(x):
        def body(x, t):
            e = den(jnp.concatenate([x, x]), jnp.full((2 * b,), t, jnp.int32), jnp.concatenate([null, cond]))
            eps = e[:b] + scale * (e[b:] - e[:b])
            a, ap = ab[t], jnp.where(t - 1000 // steps >= 0, ab[jnp.maximum(t - 1000 // steps, 0)], 1.0)
            x0 = (x - jnp.sqrt(1 - a) * eps) / jnp.sqrt(a)
            return jnp.sqrt(ap) * x0 + jnp.sqrt(1 - ap) * eps, None
        return jax.lax.scan(body, x, jnp.asarray(ts, jnp.int32))[0]

    return run(jax.random.normal(jax.random.PRNGKey(seed), (b,) + den.sample_shape))


def test_cfg_copies_duplicated_and_specific_more_than_generic(fitted):
    bed, den = fitted
    by = tb.prompts_by_kind(bed)
    rng = np.random.default_rng(0)
    n = 24
    kinds = {k: jnp.asarray(ids[rng.integers(len(ids), size=n)], jnp.int32) for k, ids in by.items()}
    conds = jnp.concatenate(list(kinds.values()))
    x0 = _ddim_cfg(den, conds, 7.5)
    assert np.all(np.isfinite(np.asarray(x0)))
    assert np.mean(np.abs(np.asarray(x0)) > 1.0) < 0.3
    resp = np.asarray(mx.atom_responsibility(den.params, x0, jnp.zeros(3 * n, jnp.int32), conds))
    share = {k: float(np.mean(resp[i * n:(i + 1) * n] > 0.5)) for i, k in enumerate(kinds)}
    thr = tb.calibrate_copy_threshold(bed, rng=0, n_pairs=1000)
    copies = tb.is_copy(np.asarray(x0), bed, thr)
    # the ground truth (atoms' responsibility) and the calibrated criterion agree on most samples
    assert np.mean(copies == (resp > 0.5)) > 0.9
    assert share["duplicated"] > 0.8, share
    assert share["duplicated"] > share["generic"] + 0.4, share
    assert share["specific"] > share["generic"], share


def test_score_identity_and_gradients(tiny):
    """grad_x log p_t(x_t | c) = -eps / sqrt(1 - ab): eps is the exact score, and everything differentiates."""
    den, _ = tiny
    x = jax.random.normal(jax.random.PRNGKey(5), (2,) + SHAPE)
    ab = _alphas_cumprod(Schedule())
    for tt in ([250, 250], [40, 800]):
        t, cond = jnp.asarray(tt, jnp.int32), jnp.asarray([1, -1], jnp.int32)
        score = jax.grad(lambda x: jnp.sum(mx.log_likelihood(den.params, x, t, cond)))(x)
        eps = den(x, t, cond)
        # autodiff of float32 log p vs the closed-form eps: margins <= 4e-4 (~1e-6); a wrong sign or
        # a missing 1 / sqrt(1 - ab) is off by O(1).
        np.testing.assert_allclose(np.asarray(score), -np.asarray(eps) / np.sqrt(1 - ab[tt])[:, None, None, None],
                                   rtol=2e-3, atol=2e-3)
