"""CFG and the attraction-basin guidances, step by step on a hand-built context."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.signal import argrelextrema

from amg_jax.guidance import (
    CFG, DynamicTransition, OppositeDynamic, OppositeGuidance, StaticTransition, StepContext,
    Unguided, first_strict_local_min, make_guidance)
from amg_jax.guidance.base import ProbeResult
from amg_jax.guidance.cfg import ProbeState, probe_curve

B, S = 3, (2, 2, 1)
# The hand-built contexts use values exact in float32 (halves, 7.5, norms of perfect squares): the
# formulas come out exact (every margin 0), so rtol 1e-6 / atol 1e-6 are loose and the scales are
# compared at the default 1e-7; a wrong scale or switch step is off by O(1).


def _ctx(step, t, d_values, counter=None):
    """A context whose eps_c - eps_u has per-sample norm d_values [B] (eps_u = 0)."""
    x = jnp.ones((B,) + S)

    def eps(xx, cond):
        if counter is not None:
            counter.append(xx.shape[0])
        scale = jnp.where(cond >= 0, jnp.tile(jnp.asarray(d_values), xx.shape[0] // B), 0.0)
        return scale[:, None, None, None] * jnp.ones_like(xx) / 2.0  # ||.|| over 4 entries = scale

    return StepContext(x_t=x, t=jnp.int32(t), step=jnp.int32(step), num_steps=10,
                       alpha_bar=jnp.float32(0.5), cond=jnp.zeros((B,), jnp.int32),
                       null_cond=-jnp.ones((B,), jnp.int32), eps=eps,
                       key=jax.random.split(jax.random.key(0), B))


def test_cfg_is_one_batched_call_and_the_formula():
    calls = []
    ctx = _ctx(0, 900, np.array([1.0, 2.0, 3.0]), calls)
    eps_hat, _, tr = CFG(scale=7.5).apply(CFG().init(ctx.x_t), ctx)
    assert calls == [2 * B]
    np.testing.assert_allclose(np.asarray(eps_hat[:, 0, 0, 0]), 7.5 * np.array([1, 2, 3]) / 2, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(tr["d"]), [1, 2, 3], rtol=1e-6)
    chex.assert_shape(tr["scale"], (B,))


def test_unguided_is_the_conditional_model():
    calls = []
    ctx = _ctx(0, 900, np.array([1.0, 2.0, 3.0]), calls)
    eps_hat, _, _ = Unguided().apply((), ctx)
    assert calls == [B]
    np.testing.assert_allclose(np.asarray(eps_hat[:, 0, 0, 0]), [0.5, 1.0, 1.5], rtol=1e-6)


@pytest.mark.parametrize("g", [StaticTransition(), OppositeGuidance(), StaticTransition(early_scale=1.0, t_switch=300)])
def test_static_transition_uses_early_scale_above_t_switch(g):
    for t in [999, g.t_switch + 1, g.t_switch, g.t_switch - 1, 0]:
        _, _, tr = g.apply((), _ctx(0, t, np.ones(B)))
        want = g.early_scale if t > g.t_switch else g.scale
        np.testing.assert_allclose(np.asarray(tr["scale"]), want)


def test_paper_defaults():
    assert (StaticTransition().early_scale, StaticTransition().t_switch, StaticTransition().scale) == (0.0, 500, 7.5)
    assert (OppositeGuidance().early_scale, OppositeGuidance().t_switch) == (-2.0, 650)
    assert DynamicTransition().early_scale == 1.0
    assert (OppositeDynamic().default_step, OppositeDynamic().skip_index) == (5, 1)


def _run_dtp(g, seq):
    """Feed a [N, B] sequence of d values through DynamicTransition step by step."""
    state = g.init(jnp.ones((B,) + S))
    scales, transitions = [], []
    for j, d in enumerate(seq):
        _, state, tr = g.apply(state, _ctx(j, 1000 - j, d))
        scales.append(np.asarray(tr["scale"]))
        transitions.append(np.asarray(tr["transition"]))
    return np.stack(scales), np.stack(transitions)


def test_dtp_switches_right_after_the_first_strict_local_minimum():
    seq = np.array([
        [9, 9, 9], [8, 7, 9], [7, 8, 9], [7, 6, 9], [8, 7, 9], [5, 4, 9], [6, 9, 9], [7, 9, 9],
    ], dtype=np.float32)
    # sample 0: plateau 7,7 is not strict; strict min at index 5 -> switch at step 6.
    # sample 1: first strict min at index 1 -> switch at step 2.
    # sample 2: constant, never switches.
    scales, transitions = _run_dtp(DynamicTransition(scale=7.5, early_scale=1.0), seq)
    np.testing.assert_array_equal(transitions[-1], [6, 2, -1])
    for b, sw in enumerate([6, 2, None]):
        want = np.where(np.arange(len(seq)) >= (sw if sw is not None else 99), 7.5, 1.0)
        np.testing.assert_allclose(scales[:, b], want)


def test_dtp_fallback_step_forces_the_switch():
    seq = np.tile(np.array([[5.0, 5.0, 5.0]], np.float32), (6, 1))
    _, transitions = _run_dtp(DynamicTransition(fallback_step=4), seq)
    np.testing.assert_array_equal(transitions[-1], [4, 4, 4])


def _reference_transition(c, skip_index=1, default=5):
    mins = argrelextrema(np.asarray(c), np.less)[0]
    if len(mins) == 0:
        return default
    if mins[0] == skip_index and len(mins) >= 2:
        return int(mins[1])
    return int(mins[0])


def test_first_strict_local_min_matches_scipy_and_the_reference_rule():
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, 4, size=12).astype(np.float32) for _ in range(200)]
    rows += [np.arange(12, dtype=np.float32), np.array([3, 1, 2, 0, 1, 5, 6, 7, 8, 9, 9, 9], np.float32)]
    v = np.stack(rows)
    got = np.asarray(first_strict_local_min(jnp.asarray(v), skip_index=1, default=5))
    want = np.array([_reference_transition(r) for r in v])
    np.testing.assert_array_equal(got, want)
    for n in (0, 1, 2):            # too short for an interior point: the default, not an empty-reduction error
        got = first_strict_local_min(jnp.zeros((3, n)), skip_index=1, default=5)
        np.testing.assert_array_equal(np.asarray(got), [5, 5, 5])


def _probe(c: np.ndarray, last: np.ndarray) -> ProbeResult:
    """A ProbeResult whose trace is ``c`` [B, N] (c_{s-1} at column s) and whose final step gives
    c_{N-1} = ``last`` [B]: x_prev = e_0, x0 at angle acos(1 - last) from it (S = (2, 2, 1))."""
    x_prev = jnp.zeros((B,) + S).at[:, 0, 0, 0].set(1.0)
    cos = 1.0 - last
    x0 = x_prev.at[:, 0, 1, 0].set(jnp.sqrt(1.0 - cos ** 2) / cos)
    return ProbeResult(x0=x0, trace={"cos_dist": jnp.asarray(c)}, state=ProbeState(x_prev=x_prev))


def test_og_dtp_reads_its_transition_from_the_probe_trace():
    g = OppositeDynamic()
    n = 10
    c = np.full((B, n), np.nan, np.float32)
    c[0, 1:] = [5, 4, 3, 4, 5, 6, 7, 8, 9]        # c_j: min at j=2
    c[1, 1:] = [5, 3, 4, 2, 3, 4, 5, 6, 7]        # first min at j=1 -> take the second, j=3
    c[2, 1:] = np.arange(9)                       # none -> default 5
    state = g.after_first_pass(g.init(jnp.ones((B,) + S)), _probe(c, np.array([0.99, 0.99, 0.99])))
    np.testing.assert_array_equal(np.asarray(state.transition), [2, 3, 5])
    for j in range(n):
        _, _, tr = g.apply(state, _ctx(j, 999 - j, np.ones(B)))
        np.testing.assert_allclose(np.asarray(tr["scale"]), np.where(j >= np.array([2, 3, 5]), 7.5, -7.5))


def test_og_dtp_curve_includes_the_last_step():
    """c_{N-1} = 1 - cos(x_N, x_{N-1}) closes the curve: a minimum at j = N-2 is found (the
    reference code's curve has all N values); without it row 0 would fall back to the default."""
    g = OppositeDynamic()
    n = 10
    c = np.full((B, n), np.nan, np.float32)
    c[:, 1:] = np.arange(9, 0, -1) / 10.0          # c_0..c_8 = 0.9 .. 0.1, falling
    last = np.array([0.5, 0.05, 0.5])              # c_9: rises after c_8 = 0.1 (rows 0, 2), falls (row 1)
    probe = _probe(c, last)
    curve = np.asarray(probe_curve(probe))
    chex.assert_shape(curve, (B, n))
    np.testing.assert_allclose(curve[:, :-1], c[:, 1:])                  # copied values: exact
    np.testing.assert_allclose(curve[:, -1], last, rtol=1e-5)   # float32 cosine of unit-scale vectors
    state = g.after_first_pass(g.init(jnp.ones((B,) + S)), probe)
    np.testing.assert_array_equal(np.asarray(state.transition), [n - 2, 5, n - 2])


def test_og_probe_records_cosine_distance_to_the_previous_sample():
    probe = OppositeDynamic().first_pass
    state = probe.init(jnp.ones((B,) + S))
    _, state, tr = probe.apply(state, _ctx(0, 999, np.ones(B)))
    assert np.all(np.isnan(np.asarray(tr["cos_dist"])))
    ctx = _ctx(1, 998, np.ones(B))._replace(x_t=jnp.concatenate(
        [jnp.ones((1,) + S), -jnp.ones((1,) + S), jnp.array([1.0, 0, 0, 0]).reshape((1,) + S)]))
    _, _, tr = probe.apply(state, ctx)
    np.testing.assert_allclose(np.asarray(tr["cos_dist"]), [0.0, 2.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(np.asarray(tr["scale"]), -7.5)


def test_make_guidance_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown guidance 'cgf'"):
        make_guidance("cgf")
    with pytest.raises(ValueError, match="no field 'tswitch'"):
        make_guidance("stp", tswitch=3)
    assert make_guidance("delayed_cfg", t_switch=400) == StaticTransition(t_switch=400)
