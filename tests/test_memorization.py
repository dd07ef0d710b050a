"""End-to-end mechanics on the testbed's perfect memorizer (the empirical denoiser).

The empirical denoiser is the optimal denoiser of the training set, so every method ends
on a training image (README pitfall 8): these tests check that as a *property of the
model*, plus the traced transitions of DTP and OG+DTP. Method differences are measured
on the partial memorizer (tests/models/test_mixture.py, ``amg demo``).
"""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.evaluation import metrics
from amg_jax.data import testbed as tb
from amg_jax.guidance import OppositeDynamic, make_guidance
from amg_jax.guidance.cfg import OppositeProbe
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample

STEPS = 25
DDIM = SamplerConfig("ddim", num_steps=STEPS)


@pytest.fixture(scope="module")
def bed():
    return tb.make_testbed()


@pytest.fixture(scope="module")
def den(bed):
    return empirical_denoiser(bed.images, bed.labels, condition_names=bed.captions, name="empirical")


def _conds(bed, kind, n, seed=0):
    ids = tb.prompts_by_kind(bed)[kind]
    return jnp.asarray(np.random.default_rng(seed).choice(ids, size=n), jnp.int32)


def test_cfg_on_specific_captions_reproduces_the_training_image(bed, den):
    cond = _conds(bed, "specific", 64)
    res = sample(den, make_guidance("cfg"), DDIM, keys_from_seeds(range(64)), cond)
    x0 = np.asarray(res.x0)
    nl2 = metrics.nl2_values(x0, bed.images)
    copied = nl2["nl2"] < 1.4
    assert copied.mean() >= 0.9, copied.mean()
    # ... and it is *the* image of that caption, not just any training image
    assert np.mean(bed.labels[nl2["index"]] == np.asarray(cond)) >= 0.9


# OG+DTP is left out on purpose: on this model its probe curve 1 - cos(x_{j+1}, x_j) has its
# first minimum near the end (step 22 of 25), so it spends almost every step at -7.5, leaves
# the data far behind (|x| ~ 13) and the last +7.5 steps extrapolate between the
# unconditional and conditional posteriors' different images instead of landing on one.
@pytest.mark.parametrize("name", ["none", "cfg", "stp", "dtp", "og"])
def test_every_method_ends_on_a_training_image_of_the_perfect_memorizer(bed, den, name):
    n = 12
    cond = jnp.concatenate([_conds(bed, k, n // 3, seed=1) for k in tb.KINDS])
    x0 = np.asarray(sample(den, make_guidance(name), DDIM, keys_from_seeds(range(100, 100 + n)), cond).x0)
    dist, idx = metrics.nearest_distances(x0, bed.images)
    rms = dist / np.sqrt(x0[0].size)
    # the final x0_hat of the optimal denoiser is one training image (up to float32 rounding, ~1e-6:
    # 1e-2 rms is a model tolerance, not round-off)
    assert np.all(rms < 1e-2), (name, rms.max())
    # of the caption it was conditioned on (the conditional posterior is restricted to it)
    np.testing.assert_array_equal(bed.labels[idx], np.asarray(cond))


def _first_strict_min_np(v):
    for j in range(1, len(v) - 1):
        if v[j] < v[j - 1] and v[j] < v[j + 1]:
            return j
    return -1


@pytest.mark.parametrize("model", ["empirical", "mixture"])
def test_dtp_transition_is_the_first_strict_local_min_of_the_traced_curve(bed, den, small_mixture, model):
    # On the perfect memorizer d_j = ||eps_u - eps_c|| rarely has an interior minimum (it
    # grows, then drops to 0 once both posteriors hold the same image); on the partial
    # memorizer about half the trajectories have one. The rule must hold on both.
    n = 16
    if model == "mixture":
        bed, den = small_mixture
    cond = jnp.concatenate([_conds(bed, k, n // 4, seed=2) for k in ("specific", "duplicated", "generic", "generic")])
    g = make_guidance("dtp")
    res = sample(den, g, DDIM, keys_from_seeds(range(200, 200 + n)), cond)
    d = np.asarray(res.trace["d"], np.float64)           # [B, N] ||eps_u - eps_c||
    trans = np.asarray(res.trace["transition"])[:, -1]    # the final state's transition index
    scale = np.asarray(res.trace["scale"])
    found = 0
    for b in range(n):
        m = _first_strict_min_np(d[b])
        # the rule switches at the step *after* the minimum; d before the switch is the
        # early-scale trajectory's curve, so the first minimum is read off that part
        expect = m + 1 if m >= 0 else -1
        assert trans[b] == expect, (b, d[b], trans[b])
        if expect >= 0:
            found += 1
            np.testing.assert_array_equal(scale[b, :expect], g.early_scale)
            np.testing.assert_array_equal(scale[b, expect:], g.scale)
        else:
            np.testing.assert_array_equal(scale[b], g.early_scale)
    if model == "mixture":
        assert found >= n // 4, f"only {found}/{n} trajectories had a local minimum"


@dataclasses.dataclass(frozen=True)
class RecordingProbe:
    """OppositeProbe that also records x_t, so the test can recompute the cosine curve."""

    inner: OppositeProbe = OppositeProbe()

    def init(self, x):
        return self.inner.init(x)

    def apply(self, state, ctx):
        eps, state, trace = self.inner.apply(state, ctx)
        return eps, state, dict(trace, x=ctx.x_t)


def test_og_dtp_first_pass_transition_from_independently_recomputed_cosines(bed, den):
    n = 8
    cond = _conds(bed, "duplicated", n, seed=3)
    keys = keys_from_seeds(range(300, 300 + n))
    g = OppositeDynamic()
    res = sample(den, g, DDIM, keys, cond)
    rec = sample(den, RecordingProbe(OppositeProbe(early_scale=g.early_scale)), DDIM, keys, cond)
    # the library's probe pass is the recorded OG pass from the same noise: the same math in two
    # programs, bit-identical here; an ulp of x_t, amplified by the memorizer's softmax (~1e3, see
    # test_sharding), moves c (>= 2.5e-5) by ~1e-7, hence atol 1e-6 instead of 1e-7. A probe from other
    # noise or guidance is off by O(c).
    np.testing.assert_allclose(np.asarray(res.first_pass_trace["cos_dist"]),
                               np.asarray(rec.trace["cos_dist"]), rtol=1e-5, atol=1e-6)
    xs = np.asarray(rec.trace["x"], np.float64).reshape(n, STEPS, -1)   # x_{T}, ..., x at each step
    xs = np.concatenate([xs, np.asarray(rec.x0, np.float64).reshape(n, 1, -1)], axis=1)   # + the final x_N
    a, b = xs[:, 1:], xs[:, :-1]
    c = 1.0 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))   # [B, N]: c_0..c_{N-1}
    # float64 recomputation of the float32 cosine distance (c >= 2.5e-5 here): measured 2.3e-7 relative,
    # where a naive float32 1 - cos would be ~2e-3 off at the smallest c; rtol 1e-3 leaves >1000x. The
    # consecutive c's are >= 3e-6 apart (1000x the error), so the local minima below are exact.
    np.testing.assert_allclose(np.asarray(res.first_pass_trace["cos_dist"])[:, 1:], c[:, :-1], rtol=1e-3, atol=1e-8)
    assert np.isnan(np.asarray(res.first_pass_trace["cos_dist"])[:, 0]).all()   # no x_{-1}
    assert all(v.shape == (n, STEPS) for v in res.trace.values())
    trans = np.asarray(res.trace["transition"])[:, 0]
    scale = np.asarray(res.trace["scale"])
    for i in range(n):
        mins = [j for j in range(1, STEPS - 1) if c[i, j] < c[i, j - 1] and c[i, j] < c[i, j + 1]]
        if not mins:
            expect = g.default_step
        elif mins[0] == g.skip_index and len(mins) > 1:
            expect = mins[1]
        else:
            expect = mins[0]
        assert trans[i] == expect, (i, c[i], trans[i])
        np.testing.assert_array_equal(scale[i, :expect], g.early_scale)
        np.testing.assert_array_equal(scale[i, expect:], g.scale)

