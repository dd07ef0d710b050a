"""The closed-form optimal denoiser of a finite set (a perfect memorizer)."""
import chex
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.models.base import Denoiser
from amg_jax.models.empirical import (
    alphas_cumprod, empirical_denoiser, posterior_weights, training_images, x0_estimate)

SHAPE = (4, 4, 3)
N = 9
LABELS = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])


def _ab64():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float32)
    return np.cumprod(1.0 - betas.astype(np.float64))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (N,) + SHAPE).astype(np.float32)
    return images, empirical_denoiser(images, LABELS, name="emp")


def _noisy(images, idx, t, rng):
    ab = _ab64()[np.asarray(t)]
    sa = np.sqrt(ab)[:, None, None, None]
    noise = rng.normal(size=(len(idx),) + SHAPE)
    x_t = sa * images[idx] + np.sqrt(1 - ab)[:, None, None, None] * noise
    return jnp.asarray(x_t, jnp.float32), noise


def _weights64(images, labels, x_t, t, cond, temperature=1.0):
    ab = _ab64()[np.asarray(t)]
    x = np.asarray(x_t, np.float64).reshape(len(x_t), -1)
    X = images.astype(np.float64).reshape(len(images), -1)
    d2 = ((x[:, None, :] - np.sqrt(ab)[:, None, None] * X[None]) ** 2).sum(-1)
    logits = -d2 / (2 * (1 - ab)[:, None] * temperature)
    logits = np.where((np.asarray(cond)[:, None] < 0) | (labels[None] == np.asarray(cond)[:, None]), logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return w / w.sum(axis=1, keepdims=True)


def test_metadata(setup):
    images, den = setup
    assert isinstance(den, Denoiser)
    assert den.sample_shape == SHAPE and den.num_conditions == 3 and den.name == "emp"
    assert int(den.null_cond) == -1 and den.null_cond.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(training_images(den)), images)     # stored float32: exact
    # the schedule's betas are torch.linspace's float32 values, NumPy's linspace differs by an ulp in
    # places: 3.6e-7 after the cumulative product (deterministic); a wrong schedule is off by >1e-3.
    np.testing.assert_allclose(alphas_cumprod(den.schedule), _ab64(), rtol=1e-5)


def test_small_t_recovers_the_training_image(setup):
    images, den = setup
    rng = np.random.default_rng(1)
    idx = np.array([0, 4, 8, 2, 5, 7])
    t = np.array([0, 1, 2, 0, 1, 2])
    x_t, noise = _noisy(images, idx, t, rng)
    cond = jnp.asarray(np.where(np.arange(6) < 3, -1, LABELS[idx]), jnp.int32)
    x0 = x0_estimate(den.params, x_t, jnp.asarray(t, jnp.int32), cond)
    # at t <= 2 the posterior is one-hot (exp(0) / 1): x0 and the weights are exact (margins 0)
    np.testing.assert_allclose(np.asarray(x0), images[idx], atol=1e-4)
    w = posterior_weights(den.params, x_t, jnp.asarray(t, jnp.int32), cond)
    np.testing.assert_array_equal(np.asarray(w).argmax(axis=1), idx)
    np.testing.assert_allclose(np.asarray(w).max(axis=1), 1.0, atol=1e-6)
    eps = den(x_t, jnp.asarray(t, jnp.int32), cond)
    # the true noise, up to float32: the model keeps diffusers' float32 alpha-bars, and float32(0.9999)
    # at t = 0 is 1.7e-8 off, i.e. 1.7e-4 of 1 - ab: eps is off by ~1e-4 |noise| (measured 2.4e-4,
    # the same IEEE rounding on every CPU; <= ~6e-4 for any noise). A wrong image is off by O(1).
    np.testing.assert_allclose(np.asarray(eps), noise, atol=2e-3)


def test_matches_float64_posterior_and_eps(setup):
    images, den = setup
    rng = np.random.default_rng(2)
    idx = np.array([1, 3, 6, 8])
    t = np.array([40, 200, 600, 999])
    x_t, _ = _noisy(images, idx, t, rng)
    for cond in (np.array([-1, -1, -1, -1]), np.array([0, 1, 2, -1])):
        w = posterior_weights(den.params, x_t, jnp.asarray(t, jnp.int32), jnp.asarray(cond, jnp.int32))
        w64 = _weights64(images, LABELS, x_t, t, cond)
        # float32 softmax / posterior mean vs float64 (the same float32 x_t): margins <= 2.4%; a wrong
        # temperature, condition mask or timestep is off by >1e-2.
        np.testing.assert_allclose(np.asarray(w), w64, atol=2e-5)
        x0_64 = w64 @ images.reshape(N, -1).astype(np.float64)
        ab = _ab64()[t][:, None]
        eps64 = (np.asarray(x_t, np.float64).reshape(4, -1) - np.sqrt(ab) * x0_64) / np.sqrt(1 - ab)
        eps = den(x_t, jnp.asarray(t, jnp.int32), jnp.asarray(cond, jnp.int32))
        np.testing.assert_allclose(np.asarray(eps).reshape(4, -1), eps64, atol=5e-4, rtol=1e-4)
    # temperature flattens the posterior (same formula with the variance scaled).
    hot = empirical_denoiser(images, LABELS, temperature=4.0)
    w = posterior_weights(hot.params, x_t, jnp.asarray(t, jnp.int32), -jnp.ones(4, jnp.int32))
    np.testing.assert_allclose(np.asarray(w), _weights64(images, LABELS, x_t, t, -np.ones(4, int), 4.0), atol=2e-5)


def test_conditional_restriction(setup):
    images, den = setup
    rng = np.random.default_rng(3)
    # A sample sitting on image 0 (label 0), asked for label 1: it must commit to a label-1 image.
    idx = np.array([0, 0, 0, 0])
    t = np.array([0, 300, 700, 999])
    x_t, _ = _noisy(images, idx, t, rng)
    for c in (0, 1, 2):
        w = np.asarray(posterior_weights(den.params, x_t, jnp.asarray(t, jnp.int32), jnp.full((4,), c, jnp.int32)))
        np.testing.assert_array_equal(w[:, LABELS != c], 0.0)            # exp(-inf): exactly 0
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-5)       # float32 sum of 3: ~1e-7
    x0 = np.asarray(x0_estimate(den.params, x_t[:1], jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32)))
    d = np.linalg.norm((x0 - images).reshape(N, -1), axis=1)
    assert LABELS[d.argmin()] == 1 and d.min() < 1e-4


def test_unconditional_is_all_images(setup):
    images, den = setup
    rng = np.random.default_rng(4)
    x_t, _ = _noisy(images, np.array([2, 5, 7]), np.array([100, 500, 900]), rng)
    t = jnp.asarray([100, 500, 900], jnp.int32)
    uncond = empirical_denoiser(images)  # no labels
    assert uncond.num_conditions == 0
    a = den(x_t, t, den.null_batch(3))
    b = uncond(x_t, t, uncond.null_batch(3))
    # the same ops (the null condition masks nothing): bit-identical, 1e-6 is loose
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
    w = np.asarray(posterior_weights(den.params, x_t, t, -jnp.ones(3, jnp.int32)))
    assert np.all(w[2] > 0.01)  # every image contributes at high noise (t = 900)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_matches(self):
        rng = np.random.default_rng(5)
        images = rng.uniform(-1, 1, (N,) + SHAPE).astype(np.float32)
        den = empirical_denoiser(images, LABELS)
        x_t, _ = _noisy(images, np.array([0, 4, 8]), np.array([0, 250, 999]), rng)
        t = jnp.asarray([0, 250, 999], jnp.int32)
        cond = jnp.asarray([0, -1, 2], jnp.int32)
        eps = self.variant(lambda d, x, tt, c: d(x, tt, c))(den, x_t, t, cond)
        chex.assert_shape(eps, (3,) + SHAPE)
        chex.assert_tree_all_finite(eps)
        w64 = _weights64(images, LABELS, x_t, np.asarray(t), np.asarray(cond))
        x0_64 = (w64 @ images.reshape(N, -1).astype(np.float64)).reshape((3,) + SHAPE)
        x0 = self.variant(x0_estimate)(den.params, x_t, t, cond)
        # float32 (jitted or eager) vs float64: margin 0.1%
        np.testing.assert_allclose(np.asarray(x0), x0_64, atol=1e-4)


def test_bad_inputs():
    imgs = np.zeros((4,) + SHAPE, np.float32)
    imgs[1] = 1.0
    with pytest.raises(ValueError, match="4-D"):
        empirical_denoiser(np.zeros((4, 16)))
    with pytest.raises(ValueError, match="empty"):
        empirical_denoiser(np.zeros((0,) + SHAPE))
    with pytest.raises(ValueError, match="NaN"):
        empirical_denoiser(np.full((2,) + SHAPE, np.nan))
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        empirical_denoiser(imgs, np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="integers"):
        empirical_denoiser(imgs, np.array([0.0, 1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match=">= 0"):
        empirical_denoiser(imgs, np.array([0, -1, 0, 1]))
    with pytest.raises(ValueError, match="no images"):
        empirical_denoiser(imgs, np.array([0, 2, 0, 2]))       # id 1 empty
    with pytest.raises(ValueError, match="no images"):
        empirical_denoiser(imgs, np.array([0, 1, 0, 1]), num_conditions=3)
    with pytest.raises(ValueError, match="num_conditions"):
        empirical_denoiser(imgs, np.array([0, 1, 0, 2]), num_conditions=2)
    with pytest.raises(ValueError, match="needs labels"):
        empirical_denoiser(imgs, num_conditions=2)
    with pytest.raises(ValueError, match="temperature"):
        empirical_denoiser(imgs, temperature=0.0)
    with pytest.raises(ValueError, match="condition_names"):
        empirical_denoiser(imgs, np.array([0, 1, 0, 1]), condition_names=["a"])
    den = empirical_denoiser(imgs, np.array([0, 1, 0, 1]), condition_names=["a", "b"])
    assert den.condition_names == ("a", "b")
    with pytest.raises(ValueError, match="unknown condition id 2"):
        den.validate_cond(np.array([0, 2]))
    den.validate_cond(np.array([0, 1, -1]))
    with pytest.raises(ValueError, match="unknown condition id 0"):
        empirical_denoiser(imgs).validate_cond(np.array([0]))
