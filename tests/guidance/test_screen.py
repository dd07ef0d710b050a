"""The training-data-free screens and the screen in front of AMG's bank search: the scores'
formulas, the latched flag, the gathered detector branch (same values on the flagged samples),
no detector call when nothing is flagged, the bank-free modes, and the errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from amg_jax.guidance import CFG, DynamicTransition, build_method
from amg_jax.guidance.amg import make_amg
from amg_jax.guidance.base import eps_uncond_cond, per_sample_norm
from amg_jax.guidance.screen import Anisotropy, NoiseMagnitude, ScreenedGuidance, get_screen, screened
from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample
from amg_jax.similarity.base import Detection
from toy_guidance import D, S, toy_ctx
from toy_guidance import toy_denoiser as _toy_denoiser

DDIM = SamplerConfig("ddim", num_steps=6)


@struct.dataclass
class CountingDetector:
    """sigma = value + <x0_hat, direction>; counts the samples it is called on (a callback)."""

    value: jax.Array
    direction: jax.Array
    scale: float = struct.field(pytree_node=False, default=2.0)
    sigma_range: tuple = struct.field(pytree_node=False, default=(-10.0, 10.0))
    default_thresholds: tuple = struct.field(pytree_node=False, default=(-1.5, -1.0))
    calls: list = struct.field(pytree_node=False, default=None)

    def __call__(self, x):
        if self.calls is not None:
            n = x.shape[0]
            jax.debug.callback(lambda: self.calls.append(n))
        s = self.value + x.reshape(x.shape[0], -1) @ self.direction
        b = x.shape[0]
        return Detection(s, jnp.zeros((b,), jnp.int32), jnp.ones((b,), jnp.int32))


def detector(value=-3.0, seed=5, calls=None):
    d = jnp.asarray(np.random.default_rng(seed).normal(size=D) * 0.02, jnp.float32)
    return CountingDetector(jnp.float32(value), d, calls=calls)


def toy_denoiser(counter=None):
    return _toy_denoiser(counter, num_conditions=4)


def ctx_at(den, x, cond, step, t=500, eps_at=True):
    return toy_ctx(den, x, cond, step=step, t=t, num_steps=6, eps_at=eps_at)


@pytest.fixture(scope="module")
def toy():
    den = toy_denoiser()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(4,) + S), jnp.float32)
    return den, x, jnp.array([0, 2, 1, 0], jnp.int32)


# ----------------------------------------------------------------------------- the scores

def test_noise_magnitude_per_step_and_windowed_mean(toy):
    """window=0 scores m_t = ||eps_c - eps_u|| itself; window=k the mean of the first k steps' m,
    held after step k - 1 (here m_t changes with x_t, which is redrawn per step)."""
    den, _, cond = toy
    rng = np.random.default_rng(2)
    xs = [jnp.asarray(rng.normal(size=(4,) + S) * (1 + i), jnp.float32) for i in range(5)]

    def m(x, step):
        eps_u, eps_c = eps_uncond_cond(ctx_at(den, x, cond, step))
        return np.asarray(per_sample_norm(eps_c - eps_u))

    ms = [m(x, i) for i, x in enumerate(xs)]
    per_step, win = NoiseMagnitude(window=0), NoiseMagnitude(window=3)
    s0, s3 = per_step.init(xs[0]), win.init(xs[0])
    for i, x in enumerate(xs):
        ctx = ctx_at(den, x, cond, i)
        eps_u, eps_c = eps_uncond_cond(ctx)
        a, s0 = per_step(s0, ctx, eps_u, eps_c)
        b, s3 = win(s3, ctx, eps_u, eps_c)
        np.testing.assert_allclose(np.asarray(a), ms[i], rtol=1e-6)
        np.testing.assert_allclose(np.asarray(b), np.mean(ms[:min(i + 1, 3)], axis=0), rtol=1e-6)
    # this toy's eps_c - eps_u is 0.1 (c + 1) w: the score is proportional to the condition id + 1
    np.testing.assert_allclose(ms[0] / ms[0][0], [1.0, 3.0, 2.0, 1.0], rtol=1e-5)


def test_anisotropy_is_norm_plus_gamma_cosine_at_the_probe_timestep_then_held(toy):
    den, x, cond = toy
    scr = Anisotropy(gamma=0.5, t_probe=40)
    ctx = ctx_at(den, x, cond, 0)
    eps_u, eps_c = eps_uncond_cond(ctx)
    u = np.asarray(den(x, 40, den.null_batch(4))).reshape(4, -1)
    c = np.asarray(den(x, 40, cond)).reshape(4, -1)
    g = c - u
    cos = np.sum(u * g, axis=1) / (np.linalg.norm(u, axis=1) * np.linalg.norm(g, axis=1))
    want = np.asarray(per_sample_norm(eps_c - eps_u)) + 0.5 * cos
    score, st = scr(scr.init(x), ctx, eps_u, eps_c)
    np.testing.assert_allclose(np.asarray(score), want, rtol=1e-5)
    ctx1 = ctx_at(den, x * 3.0, cond, 1)                  # another x_t: the step-0 score is held
    score1, _ = scr(st, ctx1, *eps_uncond_cond(ctx1))
    np.testing.assert_allclose(np.asarray(score1), want, rtol=1e-5)
    with pytest.raises(ValueError, match="needs the denoiser at another timestep"):
        scr(scr.init(x), ctx_at(den, x, cond, 0, eps_at=False), eps_u, eps_c)


def test_flag_is_latched_from_the_first_step_over_the_threshold(toy):
    den, _, cond = toy
    scr = NoiseMagnitude(window=0)
    x0 = jnp.zeros((4,) + S)
    st = scr.init(x0)
    eps_u = jnp.zeros((4,) + S)
    flags = []
    for step, size in enumerate([0.5, 2.0, 0.5]):     # sample 1's score passes 1.0 at step 1 only
        eps_c = jnp.zeros((4,) + S).at[1].set(size / np.sqrt(D))
        _, f, st = screened(scr, 1.0, st, ctx_at(den, x0, cond, step), eps_u, eps_c)
        flags.append(np.asarray(f))
    assert [f.tolist() for f in flags] == [[False] * 4, [False, True, False, False], [False, True, False, False]]
    np.testing.assert_allclose(np.asarray(st.peak)[1], 2.0, rtol=1e-6)


def test_get_screen_names_and_errors():
    assert get_screen("noise_magnitude") == NoiseMagnitude(window=5)
    assert get_screen("noise_magnitude_step") == NoiseMagnitude(window=0)
    assert get_screen("noise_magnitude", window=2) == NoiseMagnitude(window=2)
    assert get_screen("anisotropy", gamma=2.0) == Anisotropy(gamma=2.0)
    with pytest.raises(ValueError, match="unknown screen 'nope'"):
        get_screen("nope")
    with pytest.raises(ValueError, match="has no setting 'gamma'"):
        get_screen("noise_magnitude", gamma=1.0)
    with pytest.raises(ValueError, match="window must be an integer >= 0"):
        NoiseMagnitude(window=-1)
    with pytest.raises(ValueError, match="t_probe must be an integer"):
        Anisotropy(t_probe=1.5)


# ----------------------------------------------------------------------------- the screen in AMG

# conditions 0, 2, 1, 0, 3: the first-step magnitudes are 1, 3, 2, 1, 4 times that of condition 0
COND5 = jnp.array([0, 2, 1, 0, 3], jnp.int32)


def _m0(den):
    w = np.asarray(den.params["w"])
    return 0.1 * np.linalg.norm(w)          # ||eps_c - eps_u|| for condition 0


@pytest.mark.parametrize("screen_batch", [None, 2, 3])
def test_screened_amg_equals_every_step_amg_on_the_flagged_samples(screen_batch):
    """Samples 1 and 4 flagged from step 0 (threshold between 2.5 m and 3 m): with the whole batch
    masked (None), gathered into 2 or 3 rows, their samples, sigmas and gates equal every-step
    AMG's; the others keep their gates closed and equal plain CFG."""
    den = toy_denoiser()
    keys = keys_from_seeds(range(5))
    d = detector(-3.0)                                       # 2-3 samples' gates open per step unscreened
    kw = dict(gradient="cheap", c3=0.5)
    every = sample(den, make_amg(CFG(scale=3.0), d, **kw), DDIM, keys, COND5)
    cfg = sample(den, CFG(scale=3.0), DDIM, keys, COND5)
    g = make_amg(CFG(scale=3.0), d, screen=NoiseMagnitude(window=1), screen_threshold=2.5 * _m0(den),
                 screen_batch=screen_batch, **kw)
    scr = sample(den, g, DDIM, keys, COND5)
    flagged = np.asarray(scr.trace["flagged"])
    assert flagged.all(axis=1).tolist() == [False, True, False, False, True]
    assert not flagged[[0, 2, 3]].any()
    assert np.asarray(every.trace["gate"])[[1, 4]].any()      # the comparison is not vacuous
    on = np.array([1, 4])
    # the same elementwise eps and linear detector on a gathered sub-batch: rtol 1e-5 allows another
    # vectorization of the small batch (as the open_batch test); a wrong scatter is off by O(1)
    chex.assert_trees_all_close(scr.x0[on], every.x0[on], rtol=1e-5, atol=1e-5)
    for k in ("gate", "sigma", "s1", "s2"):
        np.testing.assert_allclose(np.asarray(scr.trace[k])[on], np.asarray(every.trace[k])[on], rtol=1e-5, atol=1e-6)
    off = np.array([0, 2, 3])
    assert not np.asarray(scr.trace["gate"])[off].any()
    chex.assert_trees_all_close(scr.x0[off], cfg.x0[off], rtol=1e-6, atol=1e-6)


def test_nothing_flagged_runs_no_bank_search_and_costs_a_cfg_step():
    """A threshold above every score: the detector is never called and the denoiser sees CFG's
    2 B rows per step; with one flagged sample gathered into 1 row (and open_batch=1 for G_sim's
    gradient through the detector) the detector only ever sees 1 sample."""
    rows, calls = [], []
    den = toy_denoiser(rows)
    keys = keys_from_seeds(range(5))
    g = make_amg(CFG(scale=3.0), detector(-3.0, calls=calls), gradient="cheap", screen=NoiseMagnitude(window=1),
                 screen_threshold=100.0 * _m0(den), screen_batch=1)
    res = sample(den, g, DDIM, keys, COND5)
    jax.block_until_ready(res.x0)
    assert calls == []
    assert sum(rows) == 2 * 5 * DDIM.num_steps
    assert not np.asarray(res.trace["flagged"]).any()
    rows.clear()
    g1 = make_amg(CFG(scale=3.0), detector(-3.0, calls=calls), gradient="cheap", screen=NoiseMagnitude(window=1),
                  screen_threshold=3.5 * _m0(den), screen_batch=1, open_batch=1)   # condition 3 only: sample 4
    jax.block_until_ready(sample(den, g1, DDIM, keys, COND5).x0)
    assert calls and set(calls) == {1}


def test_bank_free_screen_gates_despecification_alone():
    """detector=None: flagged samples get G_spe at s1 = min(c1, w - 1) (eps_u + (w - s1)(eps_c - eps_u)),
    the others plain CFG; dedup / dissimilar need a bank and are refused."""
    den = toy_denoiser()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5,) + S), jnp.float32)
    g = make_amg(CFG(scale=3.0), None, c1=1.5, screen=NoiseMagnitude(window=1), screen_threshold=2.5 * _m0(den))
    ctx = ctx_at(den, x, COND5, 0)
    eps_hat, _, tr = g.apply(g.init(x), ctx)
    eps_u, eps_c = eps_uncond_cond(ctx)
    w = np.array([3.0, 1.5, 3.0, 3.0, 1.5])[:, None, None, None]
    np.testing.assert_allclose(np.asarray(eps_hat), np.asarray(eps_u + w * (eps_c - eps_u)), rtol=1e-5, atol=1e-6)
    assert np.asarray(tr["gate"]).tolist() == [False, True, False, False, True]
    with pytest.raises(ValueError, match="dedup=True needs a detector"):
        make_amg(CFG(), None, dedup=True, screen=NoiseMagnitude(), screen_threshold=1.0)
    with pytest.raises(ValueError, match="or a screen to gate G_spe"):
        make_amg(CFG(), None)
    with pytest.raises(ValueError, match="a screen needs its threshold"):
        make_amg(CFG(), detector(), screen=NoiseMagnitude())
    with pytest.raises(ValueError, match="there is no screen"):
        make_amg(CFG(), detector(), screen_threshold=1.0)


def test_screened_basin_method_switches_only_flagged_samples():
    """ScreenedGuidance(DTP, CFG): flagged samples follow DTP exactly, the others plain CFG."""
    den = toy_denoiser()
    keys = keys_from_seeds(range(5))
    dtp, cfg = DynamicTransition(scale=3.0), CFG(scale=3.0)
    g = ScreenedGuidance(dtp, cfg, NoiseMagnitude(window=1), float(2.5 * _m0(den)))
    res = sample(den, g, DDIM, keys, COND5)
    a, b = sample(den, dtp, DDIM, keys, COND5), sample(den, cfg, DDIM, keys, COND5)
    on, off = np.array([1, 4]), np.array([0, 2, 3])
    chex.assert_trees_all_close(res.x0[on], a.x0[on], rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_close(res.x0[off], b.x0[off], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(res.trace["scale"])[on], np.asarray(a.trace["scale"])[on])
    # the same through the method registry
    g2 = build_method("dtp", 3.0, screen=NoiseMagnitude(window=1), screen_threshold=float(2.5 * _m0(den)))
    assert g2 == g
    with pytest.raises(ValueError, match="nothing to gate"):
        build_method("cfg", 3.0, screen=NoiseMagnitude(), screen_threshold=1.0)
