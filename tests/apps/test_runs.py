"""One run of one method (``apps.runs.run_method``): chunked sampling equals one batch."""
import numpy as np

from amg_jax.apps.runs import run_method
from amg_jax.guidance import build_method


def test_sample_in_chunks_equals_one_batch(small_mixture):
    import jax.numpy as jnp

    from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample

    bed, den = small_mixture
    g = build_method("dtp", 5.0)
    keys = keys_from_seeds(range(5))
    cond = jnp.asarray([0, 3, 5, 7, 9], jnp.int32)
    sampler = SamplerConfig("ddim", num_steps=4)
    whole = sample(den, g, sampler, keys, cond)
    parts = run_method(den, g, sampler, keys, cond, batch=2)     # 2 + 2 + 1 (padded)
    # Batch-size round-off only: a float32 matmul blocked for 2 rows instead of 5 differs by ~1e-7
    # relative, and the partial memorizer's softmax over quadratic logits (|logit| ~ 1e3 at small
    # noise) turns that into ~1e-4 relative in its responsibilities, then in eps; d = ||eps_u - eps_c||
    # is a difference of two such predictions (|eps| ~ 10x d). Measured over 4 DDIM steps: up to
    # 2.1e-4 relative (abs 5.4e-4 on d ~ 2.6) on another CPU. 2e-3 leaves ~4x over that; a chunking
    # bug (a wrong row, padding leaking in) is off by O(1).
    np.testing.assert_allclose(parts.x, np.asarray(whole.x0), rtol=2e-3, atol=2e-3)
    assert parts.x.shape == (5, 16, 16, 3)
    for k, v in whole.trace.items():
        np.testing.assert_allclose(parts.trace[k], np.asarray(v), rtol=2e-3, atol=2e-3)
