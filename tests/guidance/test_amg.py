"""Anti-Memorization Guidance: formulas, gate, batch-level gating, errors, and mechanics on the
perfect memorizer (every number here is a property the code must keep, not a tuned result)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from amg_jax.evaluation import metrics
from amg_jax.data import testbed as tb
from amg_jax.guidance import CFG, StaticTransition, Unguided, make_guidance
from amg_jax.guidance.amg import AMGConfig, make_amg
from amg_jax.guidance.base import eps_uncond_cond, x0_from_eps
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample, sample_loop
from amg_jax.similarity.base import Detection
from amg_jax.similarity.pixel import pixel_detector
from toy_guidance import D, S, toy_ctx, toy_denoiser



# ----------------------------------------------------------------------------- toy parts

@struct.dataclass
class LinearDetector:
    """sigma = value + <x0_hat, direction> for every sample; the neighbour has label ``label``."""

    value: jax.Array
    direction: jax.Array
    label: int = struct.field(pytree_node=False, default=1)
    scale: float = struct.field(pytree_node=False, default=2.0)
    sigma_range: tuple = struct.field(pytree_node=False, default=(-2.0, 0.0))
    default_thresholds: tuple = struct.field(pytree_node=False, default=(-1.5, -1.0))

    def __call__(self, x):
        s = self.value + x.reshape(x.shape[0], -1) @ self.direction
        b = x.shape[0]
        return Detection(s, jnp.zeros((b,), jnp.int32), jnp.full((b,), self.label, jnp.int32))


def det(value, direction=None, **kw):
    d = jnp.zeros((D,), jnp.float32) if direction is None else jnp.asarray(direction, jnp.float32)
    return LinearDetector(jnp.float32(value), d, **kw)


def ctx_for(den, x, cond, step=3, t=500):
    return toy_ctx(den, x, cond, step=step, t=t)


@pytest.fixture(scope="module")
def toy():
    den = toy_denoiser()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(3,) + S), jnp.float32)
    cond = jnp.array([0, 2, 1], jnp.int32)
    return den, x, cond


# ----------------------------------------------------------------------------- formulas

def test_one_step_matches_the_formulas(toy):
    den, x, cond = toy
    direction = np.random.default_rng(2).normal(size=D).astype(np.float32) * 0.01
    g = make_amg(CFG(7.5), det(-0.5, direction), c1=4.0, c2=3.0, c3=10.0, lambda_min=-1.5, lambda_max=-1.0,
                 gradient="cheap")
    ctx = ctx_for(den, x, cond)
    eps_hat, _, tr = g.apply(g.init(x), ctx)

    eps_u, eps_c = eps_uncond_cond(ctx)
    base = eps_u + 7.5 * (eps_c - eps_u)
    x0 = x0_from_eps(x, base, ctx.alpha_bar)
    sigma = -0.5 + np.asarray(x0).reshape(3, -1) @ direction
    score = (sigma + 2.0) / 2.0                              # normalized over (-2, 0)
    s1 = np.clip(4.0 * score, 0, 6.5)
    s2 = np.clip(3.0 * score, 0, 7.5 - s1 - 1)
    eps_n = den(x, 500, jnp.full((3,), 1, jnp.int32))        # the neighbour's caption y_N = 1
    ab = float(ctx.alpha_bar)
    grad_xt = np.broadcast_to(direction.reshape(S), (3,) + S) / np.sqrt(ab)   # cheap gradient
    g_sim = 10.0 * 2.0 ** 2 * np.sqrt(1 - ab) * grad_xt     # data units: c3 * scale^2
    lam = -1.5 + 0.5 * ab ** 2
    gate = sigma > lam
    expect = np.asarray(base) + gate[:, None, None, None] * (
        -s1[:, None, None, None] * np.asarray(eps_c - eps_u) - s2[:, None, None, None] * np.asarray(eps_n - eps_u)
        + g_sim)
    assert gate.all()
    # float32 JAX step vs the formulas in float64 on the same float32 eps: ~1e-7 relative (margins
    # <= 2%); a wrong term or strength is off by >1e-2. 7.5 is exact in float32.
    np.testing.assert_allclose(np.asarray(eps_hat), expect, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(tr["sigma"]), sigma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tr["s1"]), s1, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(tr["s2"]), s2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(tr["lambda"]), lam, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(tr["label"]), 1)
    np.testing.assert_allclose(np.asarray(tr["scale"]), 7.5)       # the base's trace is kept


def test_identity_score_and_raw_c3_for_cosine_detectors(toy):
    den, x, cond = toy
    d = det(0.95, sigma_range=(-1.0, 1.0), default_thresholds=(0.3, 0.5), scale=1.0)
    g = make_amg(CFG(7.5), d, c1=4.0, c2=3.0, dissimilar=False)
    _, _, tr = g.apply(g.init(x), ctx_for(den, x, cond))
    # float32 4 * 0.95 and 7.5 - s1 - 1: a few ulps (<= 2e-8 measured); a wrong cap is off by O(1).
    np.testing.assert_allclose(np.asarray(tr["s1"]), 3.8, rtol=1e-6)              # c1 * sigma
    np.testing.assert_allclose(np.asarray(tr["s2"]), 7.5 - 3.8 - 1.0, rtol=1e-6)  # capped (c2 sigma = 2.85)


def test_gate_closed_or_everything_off_is_the_base_guidance(toy):
    den, x, cond = toy
    ctx = ctx_for(den, x, cond)
    base, _, _ = CFG(7.5).apply((), ctx)
    closed = make_amg(CFG(7.5), det(-1.9))                                    # sigma below lambda
    off = make_amg(CFG(7.5), det(-0.1), despecify=False, dedup=False, dissimilar=False)
    for g, gate in ((closed, False), (off, True)):
        eps_hat, _, tr = g.apply(g.init(x), ctx)
        # the base plus exact zeros (or a closed gate's select): bit-identical; 1e-6 is loose.
        chex.assert_trees_all_close(eps_hat, base, rtol=1e-6, atol=1e-6)
        assert np.all(np.asarray(tr["gate"]) == gate)


def test_threshold_schedules():
    g = make_amg(CFG(), det(-1.0), lambda_min=-1.6, lambda_max=-1.2)
    ab = jnp.array([0.0, 0.5, 1.0])
    # float32 thresholds vs float64 literals: float32(1.2) is 4e-8 off (IEEE rounding, the same on
    # every CPU), lo + (hi - lo) ab^2 adds an ulp; rtol 1e-6 (the default 1e-7 was 2.5x the rounding).
    np.testing.assert_allclose(np.asarray(g.lambda_t(ab)), [-1.6, -1.6 + 0.4 * 0.25, -1.2], rtol=1e-6)
    const = make_amg(CFG(), det(-1.0), threshold="constant", lambda_min=-1.6, lambda_max=-1.2)
    np.testing.assert_allclose(np.asarray(const.lambda_t(ab)), -1.2, rtol=1e-6)
    always = make_amg(CFG(), det(-1.0), threshold="always")
    assert np.all(np.isneginf(np.asarray(always.lambda_t(ab))))


@pytest.mark.parametrize("kwargs, message", [
    (dict(lambda_min=-2.5), r"lambda_min=-2.5 lies outside the detector's sigma range"),
    (dict(lambda_max=0.2), r"lambda_max=0.2 lies outside"),
    (dict(threshold="cosine"), r"AMGConfig.threshold must be one of"),
    (dict(gradient="exact"), r"AMGConfig.gradient must be one of"),
    (dict(c3=-1.0), r"AMGConfig.c3 must be a finite number >= 0"),
    (dict(c33=1.0), r"AMG has no setting 'c33'"),
    (dict(max_shift=0.0), r"AMGConfig.max_shift must be a finite number > 0"),
])
def test_bad_settings_are_rejected_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_amg(CFG(), det(-1.0), **kwargs)


def test_detector_without_defaults_needs_thresholds():
    @struct.dataclass
    class Bare:
        scale: float = struct.field(pytree_node=False, default=1.0)
        sigma_range: tuple = struct.field(pytree_node=False, default=(-1.0, 1.0))

        def __call__(self, x):
            raise AssertionError

    with pytest.raises(ValueError, match="set AMGConfig.lambda_min and lambda_max"):
        make_amg(CFG(), Bare())
    make_amg(CFG(), Bare(), lambda_min=0.3, lambda_max=0.5)
    with pytest.raises(ValueError, match="has no combine"):
        make_amg(object(), Bare(), lambda_min=0.3, lambda_max=0.5)


def test_fallback_direction_where_the_gradient_vanishes(toy):
    den, x, cond = toy
    g = make_amg(CFG(7.5), det(-0.2), despecify=False, dedup=False, c3=1.0)   # zero gradient
    ctx = ctx_for(den, x, cond)
    eps_hat, _, tr = g.apply(g.init(x), ctx)
    base, _, _ = CFG(7.5).apply((), ctx)
    assert np.asarray(tr["fallback"]).all()
    delta = np.asarray(eps_hat - base).reshape(3, -1)
    u = np.asarray(base).reshape(3, -1)
    u = u / np.linalg.norm(u, axis=1, keepdims=True)
    ab = float(ctx.alpha_bar)
    ref = 1.0 / (2.0 * np.sqrt(ab))                          # 1 / (scale * sqrt(ab))
    # G_sim = c3' sqrt(1-ab) * (-u * ref): pushes x0_hat toward x_t / sqrt(ab), away from n0.
    # float32 eps_hat - base: ~ulp(|base| <= 5.4) absolute (margin 0.3%); with fallback off the
    # zero gradient adds exact zeros.
    np.testing.assert_allclose(delta, -1.0 * 4.0 * np.sqrt(1 - ab) * ref * u, rtol=1e-4, atol=1e-6)
    off = make_amg(CFG(7.5), det(-0.2), despecify=False, dedup=False, c3=1.0, fallback=False)
    chex.assert_trees_all_close(off.apply(off.init(x), ctx)[0], base, atol=1e-6)


def test_max_shift_caps_how_far_g_sim_moves_x0_hat(toy):
    den, x, cond = toy
    direction = np.random.default_rng(4).normal(size=D).astype(np.float32) * 0.01
    ctx = ctx_for(den, x, cond)
    ab = float(ctx.alpha_bar)
    base, _, _ = CFG(7.5).apply((), ctx)
    kw = dict(despecify=False, dedup=False, c3=1e4)
    free = make_amg(CFG(7.5), det(-0.5, direction), **kw)
    capped = make_amg(CFG(7.5), det(-0.5, direction), max_shift=0.25, **kw)
    shift = lambda g: np.linalg.norm(np.asarray(x0_from_eps(x, g.apply(g.init(x), ctx)[0], ab)  # noqa: E731
                                                - x0_from_eps(x, base, ab)).reshape(3, -1), axis=1)
    assert np.all(shift(free) > 1.0)                              # far beyond the cap (2.3e4)
    # float32 norms of x0 differences: ~1e-6 relative (margins ~1%); a missing cap is off by 5e4x.
    np.testing.assert_allclose(shift(capped), 0.25 * 2.0, rtol=1e-4)   # max_shift * detector scale
    d_free = np.asarray(free.apply(free.init(x), ctx)[0] - base).reshape(3, -1)
    d_cap = np.asarray(capped.apply(capped.init(x), ctx)[0] - base).reshape(3, -1)
    cos = np.sum(d_free * d_cap, 1) / np.linalg.norm(d_free, axis=1) / np.linalg.norm(d_cap, axis=1)
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)               # same direction, shorter
    small = make_amg(CFG(7.5), det(-0.5, direction), max_shift=1e6, **kw)   # a loose cap changes nothing
    # G_sim times exactly 1.0: bit-identical here; rtol 1e-6 (~8 ulps, |eps_hat| >= 3.6) allows a fusion change.
    chex.assert_trees_all_close(small.apply(small.init(x), ctx)[0], free.apply(free.init(x), ctx)[0], rtol=1e-6)


def test_full_gradient_runs_through_the_denoiser(toy):
    den, x, cond = toy
    direction = np.random.default_rng(3).normal(size=D).astype(np.float32) * 0.01
    d = det(-0.5, direction)
    ctx = ctx_for(den, x, cond)
    cheap = make_amg(CFG(7.5), d, despecify=False, dedup=False, c3=1.0, gradient="cheap")
    full = make_amg(CFG(7.5), d, despecify=False, dedup=False, c3=1.0, gradient="full")
    base, _, _ = CFG(7.5).apply((), ctx)
    ab = float(ctx.alpha_bar)
    # toy: eps_hat = 0.3 x + const, so x0_hat = (x - sqrt(1-ab) 0.3 x) / sqrt(ab) + const and
    # grad_{x_t} sigma = direction * (1 - 0.3 sqrt(1-ab)) / sqrt(ab) (cheap: direction / sqrt(ab))
    k = np.sqrt(1 - ab) * 4.0
    for g, factor in ((cheap, 1.0), (full, 1.0 - 0.3 * np.sqrt(1 - ab))):
        delta = np.asarray(g.apply(g.init(x), ctx)[0] - base)
        expect = k * factor / np.sqrt(ab) * np.broadcast_to(direction.reshape(S), (3,) + S)
        # float32 eps_hat - base loses the digits of |base| <= 5.4: ~ulp(5.4) = 5e-7 absolute
        # (measured 2e-7; 7e-6 relative on the smallest deltas). atol 1e-5 leaves >10x where the
        # old 1e-6 left 5x; full vs cheap differ by 29%, a wrong chain rule by >1e-2.
        np.testing.assert_allclose(delta, expect, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- sampling

CFG_DDIM = SamplerConfig("ddim", num_steps=6)


def _count_rows(g, *, jit=True):
    counter = []
    den = toy_denoiser(counter)
    res = sample(den, g, CFG_DDIM, keys_from_seeds(range(4)), jnp.array([0, 1, 2, 0], jnp.int32), jit=jit)
    jax.block_until_ready(res.x0)
    return sum(counter), res


def test_batch_level_gate_skips_the_extra_pass_when_no_gate_is_open():
    b, n = 4, CFG_DDIM.num_steps
    rows_cfg, _ = _count_rows(CFG(7.5))
    rows_closed, res = _count_rows(make_amg(CFG(7.5), det(-1.9), gradient="cheap"))           # gate never open
    rows_open, res_open = _count_rows(make_amg(CFG(7.5), det(-0.1), gradient="cheap"))        # gate open every step
    assert rows_cfg == 2 * b * n
    assert not np.asarray(res.trace["gate"]).any()
    assert rows_closed == rows_cfg                      # no y_N pass, no gradient pass
    assert np.asarray(res_open.trace["gate"]).all()
    assert rows_open == 3 * b * n                       # + one y_N pass per step (cheap gradient)
    rows_full, _ = _count_rows(make_amg(CFG(7.5), det(-0.1), gradient="full"))
    assert rows_full == 5 * b * n                       # + the forward pass the full gradient differentiates


def test_jit_and_eager_agree_and_batch_equals_single():
    g = make_amg(StaticTransition(7.5, t_switch=600), det(-0.3, np.full(D, 0.01)))
    den = toy_denoiser()
    keys = keys_from_seeds([5, 6, 7])
    cond = jnp.array([0, 1, 2], jnp.int32)
    a = sample(den, g, CFG_DDIM, keys, cond)
    e = sample(den, g, CFG_DDIM, keys, cond, jit=False)
    # Same math through different programs (jit vs eager, batch 3 vs 1, vmap): ~1 ulp of |x0| <= 36
    # per step (batch vs single measured 1.9e-6 absolute, 5e-8 relative); rtol 1e-5 leaves >10x over
    # 6 steps, and every gate is >= 0.02 from its threshold. A mixed-up key or row is off by O(1).
    chex.assert_trees_all_close(a.x0, e.x0, rtol=1e-5, atol=1e-5)
    chex.assert_shape(a.x0, (3,) + S)
    for key in ("sigma", "lambda", "gate", "s1", "s2", "index", "label", "grad_norm", "scale"):
        chex.assert_shape(a.trace[key], (3, CFG_DDIM.num_steps))
    for i in range(3):
        one = sample(den, g, CFG_DDIM, keys[i:i + 1], cond[i:i + 1])
        chex.assert_trees_all_close(one.x0[0], a.x0[i], rtol=1e-5, atol=1e-5)
    # vmap over seeds of the pure loop (batch 1 each: the batch-level cond becomes a select)
    per_seed = jax.jit(jax.vmap(lambda k, c: sample_loop(den, g, CFG_DDIM, k[None], c[None]).x0[0]))
    chex.assert_trees_all_close(per_seed(keys, cond), a.x0, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m"])
def test_composes_with_every_sampler(name):
    g = make_amg(make_guidance("dtp"), det(-0.3, np.full(D, 0.01)))
    res = sample(toy_denoiser(), g, SamplerConfig(name, num_steps=5), keys_from_seeds([1, 2]),
                 jnp.array([0, 1], jnp.int32))
    assert np.all(np.isfinite(np.asarray(res.x0)))
    assert "transition" in res.trace and "sigma" in res.trace


def test_nonfinite_terms_are_reported_with_term_and_step():
    g = make_amg(CFG(7.5), det(-0.3, np.full(D, np.nan)), threshold="always", despecify=False, dedup=False)
    with pytest.warns(RuntimeWarning, match=r"G_sim is NaN/inf from step 0"):
        res = sample(toy_denoiser(), g, CFG_DDIM, keys_from_seeds([1, 2]), jnp.array([0, 1], jnp.int32))
        jax.effects_barrier()                           # the warning arrives when the computation completes
    assert res.x0.shape == (2,) + S                     # the samples are still returned


def test_wraps_a_two_pass_base():
    g = make_amg(make_guidance("og_dtp"), det(-0.3, np.full(D, 0.01)))
    res = sample(toy_denoiser(), g, CFG_DDIM, keys_from_seeds([1, 2]), jnp.array([0, 1], jnp.int32))
    assert res.first_pass_trace is not None and "cos_dist" in res.first_pass_trace
    assert "transition" in res.trace and "sigma" in res.trace


# ----------------------------------------------------------------------------- perfect memorizer

@pytest.fixture(scope="module")
def memorizer():
    bed = tb.make_testbed()
    return bed, empirical_denoiser(bed.images, bed.labels), pixel_detector(bed.images, labels=bed.labels)


def _copied(bed, x):
    return float(np.mean(metrics.nl2_values(np.asarray(x), bed.images)["nl2"] < 1.4))


def test_memorized_fraction_falls_as_c3_grows(memorizer):
    bed, den, detector = memorizer
    n = 24
    ids = tb.prompts_by_kind(bed)["specific"]
    cond = jnp.asarray(np.random.default_rng(0).choice(ids, n), jnp.int32)
    keys = keys_from_seeds(range(n))
    ddim = SamplerConfig("ddim", num_steps=25)
    fracs = [_copied(bed, sample(den, CFG(7.5), ddim, keys, cond).x0)]
    for c3 in (300.0, 3000.0, 30000.0):
        g = make_amg(CFG(7.5), detector, c3=c3, gradient="cheap")     # pitfall 5: cheap on a perfect memorizer
        fracs.append(_copied(bed, sample(den, g, ddim, keys, cond).x0))
    assert fracs[0] >= 0.9
    assert all(a >= b for a, b in zip(fracs, fracs[1:])), fracs
    assert fracs[-1] == 0.0, fracs
    # despecification + caption deduplication alone cannot undo a point mass (pitfall 7)
    spe_dup = make_amg(CFG(7.5), detector, dissimilar=False)
    assert _copied(bed, sample(den, spe_dup, ddim, keys, cond).x0) >= 0.9


def test_unconditional_model_with_dissimilarity_alone(memorizer):
    bed, _, detector = memorizer
    den = empirical_denoiser(bed.images)                       # unconditional
    n = 16
    keys = keys_from_seeds(range(n))
    cond = jnp.full((n,), -1, jnp.int32)
    ddim = SamplerConfig("ddim", num_steps=25)
    assert _copied(bed, sample(den, Unguided(), ddim, keys, cond).x0) == 1.0
    g = make_amg(Unguided(), detector, despecify=False, dedup=False, c3=10000.0, gradient="cheap")
    assert _copied(bed, sample(den, g, ddim, keys, cond).x0) == 0.0


# ----------------------------------------------------------------------------- partial memorizer

def test_default_full_gradient_frees_duplicated_prompts_where_the_cheap_one_does_not():
    """README pitfall 5 on the small testbed's partial memorizer (the default gradient is
    chosen from this measurement): CFG copies every duplicated-prompt sample; AMG's default
    (full gradient) frees almost all; the cheap gradient at the same c3 frees none."""
    from amg_jax.apps.models import build_testbed, calibrated_bank, get_model, make_detector
    from amg_jax.guidance import build_method

    bed = build_testbed("small")
    den = get_model("mixture").denoiser(bed)
    thr = tb.calibrate_copy_threshold(bed, rng=0)
    ids = tb.prompts_by_kind(bed)["duplicated"]
    n = 24
    cond = jnp.asarray(np.repeat(ids, n // len(ids)), jnp.int32)
    keys = keys_from_seeds(range(n))
    ddim = SamplerConfig("ddim", num_steps=25)

    def copied(method, amg=None):
        det = make_detector("nl2", calibrated_bank(bed)) if method == "amg" else None
        x = np.asarray(sample(den, build_method(method, 7.5, detector=det, amg=amg), ddim, keys, cond).x0)
        return float(np.mean(tb.nearest_training(x, bed)[0] < thr))

    assert AMGConfig().gradient == "full"
    assert copied("cfg") >= 0.9
    assert copied("amg") <= 0.15
    assert copied("amg", {"gradient": "cheap"}) >= 0.9


def test_detect_every_holds_the_detection_between_detecting_steps():
    """detect_every=3: the detector runs on steps 0, 3, 6, ... (counted through a callback) and its
    sigma / neighbour are held in between; every other step of a k=1 run it equals where they meet."""
    calls = []

    @struct.dataclass
    class Counted(LinearDetector):
        def __call__(self, x):
            jax.debug.callback(lambda: calls.append(1))
            return LinearDetector.__call__(self, x)

    den = toy_denoiser()
    d = Counted(jnp.float32(-1.2), jnp.asarray(np.random.default_rng(3).normal(size=D) * 0.05, jnp.float32))
    keys, cond = keys_from_seeds(range(2)), jnp.array([0, 2], jnp.int32)
    cfg = SamplerConfig("ddim", num_steps=7)
    every = sample(den, make_amg(CFG(scale=3.0), d, detect_every=1, gradient="cheap"), cfg, keys, cond)
    n_every = len(calls)
    calls.clear()
    held = sample(den, make_amg(CFG(scale=3.0), d, detect_every=3, gradient="cheap"), cfg, keys, cond)
    assert "detected" not in every.trace
    np.testing.assert_array_equal(np.asarray(held.trace["detected"])[0], [1, 0, 0, 1, 0, 0, 1])
    sig = np.asarray(held.trace["sigma"])
    # held values are carried, not recomputed: exact
    np.testing.assert_array_equal(sig[:, 1], sig[:, 0])
    np.testing.assert_array_equal(sig[:, 5], sig[:, 3])
    # step 0 of two programs (the detector under lax.cond or not): bit-identical here, but sigma =
    # -1.2 + <x0_hat, d> with |x0_hat| ~ 50 at t ~ 850, so an ulp of x0_hat moves |sigma| ~ 3-9 by
    # ~1e-6: rtol 1e-5. A sigma held from a wrong step is off by >0.1.
    np.testing.assert_allclose(sig[:, 0], np.asarray(every.trace["sigma"])[:, 0], rtol=1e-5)
    # the gate still compares the held sigma with each step's own threshold (the traced values: exact)
    np.testing.assert_array_equal(np.asarray(held.trace["gate"]), sig > np.asarray(held.trace["lambda"]))
    # gradient calls aside (cheap G_sim differentiates the detector on open steps), fewer detections
    open_steps = int(np.asarray(held.trace["gate"]).any(axis=0).sum())
    assert len(calls) == 3 + open_steps      # steps 0, 3, 6 detect; each open step's gradient calls it once
    assert n_every > 7 - 1                   # k=1: every one of the 7 steps detects
    with pytest.raises(ValueError, match="detect_every must be an integer >= 1"):
        make_amg(CFG(), d, detect_every=0)


@pytest.mark.parametrize("gradient", ["full", "cheap"])
def test_open_batch_compacts_the_open_samples_with_the_same_result(gradient):
    """open_batch=2 on a batch of 5: steps where 1-2 samples are open run them as a batch of 2,
    steps with more open run the whole batch; samples, gates and gradients equal open_batch=None."""
    counter = []
    den = toy_denoiser(counter)
    d = det(-3.0, np.random.default_rng(5).normal(size=D) * 0.02)        # 3, 3, 3, 2, 2, 2 samples open
    keys, cond = keys_from_seeds(range(5)), jnp.array([0, 2, 1, 0, 2], jnp.int32)
    cfg = SamplerConfig("ddim", num_steps=6)
    kw = dict(gradient=gradient, c3=0.0)      # G_sim computed (grad_norm) but not applied: the gates stay put
    plain = sample(den, make_amg(CFG(scale=3.0), d, **kw), cfg, keys, cond)
    counter.clear()
    comp = sample(den, make_amg(CFG(scale=3.0), d, open_batch=2, **kw), cfg, keys, cond)
    n_open = np.asarray(comp.trace["gate"]).sum(axis=0)
    assert ((n_open >= 1) & (n_open <= 2)).any() and (n_open > 2).any()      # both branches were taken
    small = [n for n in counter if n == 2]                                     # G_dup's pass on 2 samples
    assert len(small) >= int(((n_open >= 1) & (n_open <= 2)).sum())
    # The same elementwise eps and linear detector on a gathered sub-batch of 2: bit-identical here;
    # rtol 1e-5 (|x0| <= 46, grad_norm <= 4.3) allows another vectorization of the small batch. Every
    # sigma is >= 0.07 from its threshold, so the gates cannot flip; a wrong scatter is off by O(1).
    chex.assert_trees_all_close(comp.x0, plain.x0, rtol=1e-5, atol=1e-5)
    for k in ("gate", "grad_norm", "s2", "sigma"):
        np.testing.assert_allclose(np.asarray(comp.trace[k]), np.asarray(plain.trace[k]), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="open_batch must be an integer >= 1 or None"):
        make_amg(CFG(), d, open_batch=0)
