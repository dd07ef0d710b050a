"""Embedding detector with a random linear embedder, against a float64 NumPy brute force."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import index
from amg_jax.similarity import EmbeddingDetector, embedding, embedding_detector
from amg_jax.similarity.base import Detection

SHAPE = (4, 4, 3)
E = 8


def linear_embed(params, x):
    """A stand-in for SSCD / CLIP: x [B, *S] -> x.flat @ w [B, E]."""
    return x.reshape(x.shape[0], -1) @ params["w"]


@functools.lru_cache(maxsize=None)
def _data():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(int(np.prod(SHAPE)), E)) / 7).astype(np.float32)
    ref = rng.uniform(-1, 1, (30,) + SHAPE).astype(np.float32)
    labels = (np.arange(30) % 4).astype(np.int32)
    x = rng.uniform(-1, 1, (5,) + SHAPE).astype(np.float32)
    x[0] = ref[9] + 1e-3 * rng.normal(size=SHAPE).astype(np.float32)
    return {"w": w}, ref, labels, x


def _embed64(params, x):
    return np.asarray(x, np.float64).reshape(len(x), -1) @ params["w"].astype(np.float64)


def _cos64(params, x, ref):
    a, b = _embed64(params, x), _embed64(params, ref)
    return (a @ b.T) / (np.linalg.norm(a, axis=1)[:, None] * np.linalg.norm(b, axis=1)[None])


@pytest.fixture(scope="module")
def det():
    params, ref, labels, _ = _data()
    return embedding_detector(linear_embed, jax.tree.map(jnp.asarray, params),
                              np.asarray(_embed64(params, ref), np.float32), labels)


class EmbeddingDetectorTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    def test_matches_bruteforce(self):
        params, ref, labels, x = _data()
        d = embedding_detector(linear_embed, jax.tree.map(jnp.asarray, params),
                               np.asarray(_embed64(params, ref), np.float32), labels)
        out = self.variant(lambda dd, z: dd(z))(d, jnp.asarray(x))
        assert isinstance(out, Detection)
        chex.assert_shape(list(out), (len(x),))
        c = _cos64(params, x, ref)
        # float32 8-d cosines vs float64: ~1e-7 (margin 0.6%); the best and second-best cosines are
        # >= 0.047 apart, so the argmax is exact. A wrong row is off by >1e-2.
        np.testing.assert_allclose(np.asarray(out.sigma), c.max(axis=1), rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out.index), c.argmax(axis=1))
        np.testing.assert_array_equal(np.asarray(out.label), labels[c.argmax(axis=1)])
        assert out.index[0] == 9 and float(out.sigma[0]) > 0.999


def test_contract_attributes_and_pytree(det):
    assert det.sigma_range == (-1.0, 1.0) and det.scale == 1.0 and det.default_thresholds == (None, None)
    assert det.bank.kind == "embedding" and det.bank.normalized and det.size == 30
    # float32 normalised rows, float32 norms: 1 ulp here (6e-8), a few at most
    np.testing.assert_allclose(np.linalg.norm(np.asarray(det.bank.rows), axis=1), 1.0, rtol=1e-6)
    leaves = jax.tree.leaves(det)
    assert any(leaf is det.embed_params["w"] for leaf in leaves)          # params are traced leaves
    # new params under the same jit: same compiled function, new result
    f = jax.jit(lambda d, z: d(z).sigma)
    x = jnp.asarray(_data()[3])
    s1 = f(det, x)
    s2 = f(det.replace(embed_params={"w": -det.embed_params["w"]}), x)
    assert f._cache_size() == 1 and not np.allclose(np.asarray(s1), np.asarray(s2))


def test_gradient_through_the_embedder(det):
    """d sigma / d x0_hat = d <E(x)/|E(x)|, e_n> / dx with e_n the chosen row (finite, exact)."""
    _, _, _, x = _data()
    x = jnp.asarray(x)
    g = jax.jit(jax.grad(lambda d, z: d(z).sigma.sum(), argnums=1))(det, x)
    chex.assert_tree_all_finite(g)
    rows = np.asarray(det.bank.rows)[np.asarray(det(x).index)]

    def direct(z):
        e = linear_embed(det.embed_params, z)
        return jnp.sum(jnp.sum(e * rows, -1) / jnp.linalg.norm(e, axis=-1))
    # float32 gradients of two programs (the jitted detector vs the direct eager formula), |g| <= 0.2:
    # ~1e-7 relative (margin 1.8%); a gradient through the wrong row or without the norm is off by O(1).
    np.testing.assert_allclose(np.asarray(g), np.asarray(jax.grad(direct)(x)), rtol=1e-4, atol=1e-6)
    assert np.all(np.linalg.norm(np.asarray(g).reshape(len(x), -1), axis=1) > 0)


def test_bank_input_dedup_and_sharding(det):
    params, ref, labels, x = _data()
    emb = np.asarray(_embed64(params, ref), np.float32)
    dup = np.concatenate([emb, emb[[2, 2]]])
    d2 = embedding_detector(linear_embed, det.embed_params, dup, np.concatenate([labels, labels[[2, 2]]]))
    assert d2.size == 30                                                   # dedup on by default
    bank = index.build_bank(emb, labels, kind="embedding", normalize=True)
    call = jax.jit(lambda d, z: d(z))
    want = call(embedding_detector(linear_embed, det.embed_params, bank), jnp.asarray(x))
    got = call(embedding_detector(linear_embed, det.embed_params, index.shard_bank(bank)), jnp.asarray(x))
    for a, b in zip(want, got):         # exact by design (index.py): the same dot products on the same rows
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    d3 = embedding_detector(linear_embed, det.embed_params, bank, thresholds=(0.4, 0.5))
    assert d3.default_thresholds == (0.4, 0.5)


def test_bad_inputs(det):
    params, ref, labels, x = _data()
    emb = np.asarray(_embed64(params, ref), np.float32)
    with pytest.raises(ValueError, match="normalised rows"):
        embedding_detector(linear_embed, det.embed_params, index.build_bank(emb, kind="embedding"))
    with pytest.raises(ValueError, match=r"embeddings must be \[M, E\]"):
        embedding_detector(linear_embed, det.embed_params, emb[None])
    with pytest.raises(ValueError, match="embed_fn must be callable"):
        embedding_detector(None, det.embed_params, emb)
    with pytest.raises(ValueError, match="thresholds must be two numbers"):
        embedding_detector(linear_embed, det.embed_params, emb, thresholds=(0.4, 1.5))
    with pytest.raises(ValueError, match="labels must have shape"):
        embedding_detector(linear_embed, det.embed_params, emb, labels[:3])
    wide = det.replace(embed_params={"w": jnp.zeros((int(np.prod(SHAPE)), E + 1))})
    with pytest.raises(ValueError, match=r"embed_fn returned shape \(5, 9\).*expected \(5, 8\)"):
        wide(jnp.asarray(x))
    assert isinstance(det, EmbeddingDetector) and embedding.__all__


def _upsample_decode(params, z):
    """A stand-in for the VAE decoder: latents [B, 2, 2, 3] -> pixels [B, 4, 4, 3]."""
    return jnp.tanh(params["a"] * jnp.repeat(jnp.repeat(z, 2, axis=1), 2, axis=2))


def test_through_decoder_is_stable_and_differentiable():
    params, ref, labels, _ = _data()
    f = embedding.through_decoder(_upsample_decode, linear_embed)
    assert f is embedding.through_decoder(_upsample_decode, linear_embed)      # one jit key
    p = ({"a": jnp.float32(0.7)}, jax.tree.map(jnp.asarray, params))
    z = jnp.asarray(np.random.default_rng(1).normal(size=(3, 2, 2, 3)).astype(np.float32))
    d = embedding_detector(f, p, np.asarray(_embed64(params, ref), np.float32), labels)
    direct = linear_embed(p[1], _upsample_decode(p[0], z))
    # the same ops inside and outside through_decoder's jit, and remat recomputing the same forward:
    # bit-identical here; 1e-5 allows another fusion. A missing decoder or embedder is off by O(1).
    np.testing.assert_allclose(np.asarray(d.embed(z)), np.asarray(direct), rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda zz: d(zz).sigma.sum())(z)
    plain = embedding.through_decoder(_upsample_decode, linear_embed, remat=False)
    d2 = embedding_detector(plain, p, d.bank)
    g2 = jax.grad(lambda zz: d2(zz).sigma.sum())(z)
    chex.assert_tree_all_finite(g)
    np.testing.assert_allclose(np.asarray(g), np.asarray(g2), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(g).max()) > 0
