"""Samplers: parity with diffusers' PyTorch schedulers, the scan loop's contract, and input errors.

The denoiser is closed-form: the optimal eps of a per-condition Gaussian N(mu_c, S2) plus a small
nonlinear term, written identically in JAX (for ``sample``) and in torch (for diffusers).
"""
import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import samplers
from amg_jax.guidance.base import eps_uncond_cond, per_sample_norm
from amg_jax.models.base import Denoiser
from amg_jax.samplers import (
    NOISE_STREAM, SampleResult, SamplerConfig, fold_keys, initial_noise, keys_from_seeds, make_sampler,
    sample, sampler_timesteps, step_noise)
from amg_jax.schedules import SPACINGS, Schedule

S = (4, 4, 3)
N = 10
S2 = 0.25
MU = np.array([0.3, -0.2, 0.1], np.float32)
LINEAR = Schedule()
# float32 JAX vs diffusers' float32 torch, the same formulas in other op orders (per-step torch
# coefficients, XLA fusion): ~1 ulp of |x| <= 4 per step, measured <= 1.1e-6 over 10-20 steps (with
# AVX / another BLAS kernel too). 2e-5 leaves ~20x; an off-by-one timestep or a wrong alpha_prev /
# variance / clip is off by >1e-3.
PARITY_ATOL = 2e-5
# The same math through two programs (jit vs eager, batch 3 vs 1, x_T drawn inside vs passed in, a
# probe pass inside a two-pass program): bit-identical here, but fusion may differ by an ulp per
# step (|x0| <= 4, 10 steps); 1e-5 leaves >10x over that, a mixed-up key or row is off by O(1).
SAME_MATH = dict(atol=1e-5, rtol=1e-5)
SCALED = Schedule("scaled_linear", beta_start=0.00085, beta_end=0.012)
COSINE = Schedule("cosine")


# ------------------------------------------------------------------ the denoiser, in JAX and torch


def gaussian_eps(params, x, t, cond):
    """eps of N(mu + 0.2 (c + 1), S2) at alpha-bar[t], plus 0.05 sin(3 x + t / 250)."""
    shape = (-1,) + (1,) * (x.ndim - 1)
    ab = params["ab"][t].reshape(shape)
    mu = params["mu"] + 0.2 * (cond.astype(jnp.float32) + 1.0).reshape(shape)
    tt = (t.astype(jnp.float32) / 250.0).reshape(shape)
    return jnp.sqrt(1 - ab) * (x - jnp.sqrt(ab) * mu) / (ab * S2 + 1 - ab) + 0.05 * jnp.sin(3.0 * x + tt)


def gaussian_eps_torch(x, t, cond, ab_table):
    import torch

    ab = ab_table[t]
    mu = torch.from_numpy(MU) + 0.2 * (torch.from_numpy(np.asarray(cond, np.float32)) + 1.0).reshape(-1, 1, 1, 1)
    return torch.sqrt(1 - ab) * (x - torch.sqrt(ab) * mu) / (ab * S2 + 1 - ab) + 0.05 * torch.sin(3.0 * x + t / 250.0)


def make_denoiser(schedule=LINEAR, eps_fn=gaussian_eps):
    return Denoiser(params={"mu": jnp.asarray(MU), "ab": jnp.asarray(schedule.alphas_cumprod())},
                    null_cond=jnp.int32(-1), eps_fn=eps_fn, sample_shape=S, schedule=schedule,
                    num_conditions=3, name="gaussian")


# ------------------------------------------------------------------ tiny guidances


@dataclasses.dataclass(frozen=True)
class CondEps:
    """eps_hat = eps(x_t, y); traces the step's t, alpha-bar and index."""

    def init(self, x):
        return ()

    def apply(self, state, ctx):
        b = ctx.x_t.shape[0]
        trace = {"t": jnp.full((b,), ctx.t), "alpha_bar": jnp.full((b,), ctx.alpha_bar),
                 "step": jnp.full((b,), ctx.step)}
        return ctx.eps(ctx.x_t, ctx.cond), state, trace


@dataclasses.dataclass(frozen=True)
class TinyCFG:
    """CFG with a per-sample step counter as state; traces a draw from ctx.key and the counter."""

    scale: float = 3.0

    def init(self, x):
        return {"count": jnp.zeros((x.shape[0],), jnp.float32)}

    def apply(self, state, ctx):
        eps_u, eps_c = eps_uncond_cond(ctx)
        u = jax.vmap(jax.random.uniform)(ctx.key)
        count = state["count"] + 1.0
        return eps_u + self.scale * (eps_c - eps_u), {"count": count}, {"u": u, "count": count}


@dataclasses.dataclass(frozen=True)
class NormProbe:
    """First pass: unguided conditional, traces ||x_t|| per sample."""

    def init(self, x):
        return ()

    def apply(self, state, ctx):
        return ctx.eps(ctx.x_t, ctx.cond), state, {"xnorm": per_sample_norm(ctx.x_t)}


@dataclasses.dataclass(frozen=True)
class TwoPass:
    """Two-pass guidance: the real pass reads the probe's argmin of ||x_t|| into its state."""

    @property
    def first_pass(self):
        return NormProbe()

    def init(self, x):
        return {"pick": jnp.full((x.shape[0],), -1, jnp.int32)}

    def after_first_pass(self, state, probe):
        return {"pick": jnp.argmin(probe.trace["xnorm"], axis=1).astype(jnp.int32)}

    def apply(self, state, ctx):
        return ctx.eps(ctx.x_t, ctx.cond), state, {"pick": state["pick"]}


# ------------------------------------------------------------------ parity with diffusers


def diffusers_scheduler(cfg: SamplerConfig, schedule: Schedule):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=schedule.num_train_timesteps, beta_schedule=schedule.beta_schedule,
                  beta_start=schedule.beta_start, beta_end=schedule.beta_end,
                  timestep_spacing=cfg.spacing, steps_offset=cfg.steps_offset)
    if cfg.name == "ddpm":
        sch = DDPMScheduler(clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_range,
                            variance_type=cfg.variance_type, **common)
    elif cfg.name == "ddim":
        sch = DDIMScheduler(clip_sample=cfg.clip_sample, clip_sample_range=cfg.clip_range,
                            set_alpha_to_one=cfg.set_alpha_to_one, **common)
    else:
        sch = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                          lower_order_final=cfg.lower_order_final,
                                          final_sigmas_type=cfg.final_sigmas_type, **common)
    sch.set_timesteps(cfg.num_steps)
    return sch


def diffusers_sample(cfg, schedule, x_T, cond, noises, monkeypatch):
    """Run diffusers' scheduler on gaussian_eps_torch from x_T, feeding it our per-step noise."""
    import torch
    from diffusers.schedulers import scheduling_ddpm

    sch = diffusers_scheduler(cfg, schedule)
    ab_table = sch.alphas_cumprod
    current = {}
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda *a, **k: current["z"])
    x = torch.from_numpy(np.array(x_T))
    for i, t in enumerate(sch.timesteps):
        eps = gaussian_eps_torch(x, int(t), cond, ab_table)
        current["z"] = torch.from_numpy(np.array(noises[i]))
        if cfg.name == "ddim":
            kw = dict(eta=cfg.eta, variance_noise=current["z"] if cfg.eta > 0 else None)
        else:
            kw = {}
        x = sch.step(eps, t, x, **kw).prev_sample
    return x.numpy(), sch.timesteps.numpy()


def _parity_cases():
    cases = []
    for spacing in SPACINGS:
        for sched_name, sched in [("linear", LINEAR), ("scaled_linear", SCALED)]:
            for clip in (False, True):
                for name in ("ddpm", "ddim"):
                    cases.append((f"{name}-{spacing}-{sched_name}-clip{int(clip)}",
                                  SamplerConfig(name, N, spacing, clip_sample=clip), sched))
            cases.append((f"ddim_eta-{spacing}-{sched_name}",
                          SamplerConfig("ddim", N, spacing, eta=0.8, clip_sample=spacing == "trailing"), sched))
            cases.append((f"dpm++2m-{spacing}-{sched_name}", SamplerConfig("dpm++2m", N, spacing), sched))
    cases += [
        ("ddim-offset1-alpha0-cosine",
         SamplerConfig("ddim", N, "leading", steps_offset=1, set_alpha_to_one=False), COSINE),
        ("ddim_eta1-clip0.5", SamplerConfig("ddim", N, "linspace", eta=1.0, clip_sample=True, clip_range=0.5),
         SCALED),
        ("ddpm-fixed_large-offset1", SamplerConfig("ddpm", N, "leading", steps_offset=1, variance_type="fixed_large"),
         LINEAR),
        ("dpm++2m-offset1-cosine", SamplerConfig("dpm++2m", N, "leading", steps_offset=1), COSINE),
        ("dpm++2m-sigma_min-2nd_order_final",
         SamplerConfig("dpm++2m", N, "trailing", final_sigmas_type="sigma_min", lower_order_final=False), SCALED),
        ("dpm++2m-sigma_min-20steps", SamplerConfig("dpm++2m", 20, "linspace", final_sigmas_type="sigma_min"),
         LINEAR),
    ]
    return cases


PARITY = _parity_cases()


@pytest.mark.torch
@pytest.mark.parametrize("cfg, schedule", [c[1:] for c in PARITY], ids=[c[0] for c in PARITY])
def test_sample_matches_diffusers(cfg, schedule, monkeypatch):
    keys = keys_from_seeds([3, 11])
    cond = np.array([0, 2], np.int32)
    x_T = initial_noise(keys, S)  # passed in: keeps threefry out of the compiled loop when no step noise
    res = sample(make_denoiser(schedule), CondEps(), cfg, keys, jnp.asarray(cond), x_T=x_T)
    nk = fold_keys(keys, NOISE_STREAM)
    noises = [step_noise(nk, i, S) for i in range(cfg.num_steps)]
    want, want_ts = diffusers_sample(cfg, schedule, x_T, cond, noises, monkeypatch)

    # integer timesteps, and alpha-bars looked up from the same float32 table: exact
    np.testing.assert_array_equal(sampler_timesteps(cfg, schedule), want_ts)
    np.testing.assert_array_equal(np.asarray(res.trace["t"]), np.broadcast_to(want_ts, (2, cfg.num_steps)))
    np.testing.assert_array_equal(np.asarray(res.trace["alpha_bar"][0]), schedule.alphas_cumprod()[want_ts])
    np.testing.assert_array_equal(np.asarray(res.trace["step"][1]), np.arange(cfg.num_steps))
    assert np.all(np.isfinite(want)) and np.abs(want).max() < 10
    np.testing.assert_allclose(np.asarray(res.x0), want, rtol=0, atol=PARITY_ATOL)


@pytest.mark.torch
@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++2m"])
@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("num_steps, offset", [(1, 0), (7, 0), (25, 1), (50, 1), (100, 0)])
def test_timesteps_match_diffusers(name, spacing, num_steps, offset):
    cfg = SamplerConfig(name, num_steps, spacing, steps_offset=offset)
    want = diffusers_scheduler(cfg, LINEAR).timesteps.numpy()
    np.testing.assert_array_equal(sampler_timesteps(cfg, LINEAR), want)
    np.testing.assert_array_equal(make_sampler(cfg, LINEAR).timesteps, want)


# ------------------------------------------------------------------ the loop's contract

B3 = 3
CFG_DDPM = SamplerConfig("ddpm", N, "trailing")
CFG_DPM = SamplerConfig("dpm++2m", N, "linspace")


@pytest.fixture(scope="module")
def den():
    return make_denoiser(SCALED)


@pytest.fixture(scope="module")
def cond3():
    return jnp.array([0, 1, 2], jnp.int32)


@pytest.fixture(scope="module")
def batch_ddpm(den, cond3):
    """TinyCFG + DDPM on three seeds, jitted (shared by several tests)."""
    return sample(den, TinyCFG(), CFG_DDPM, keys_from_seeds([5, 6, 7]), cond3)


def test_output_and_trace_shapes(batch_ddpm):
    assert isinstance(batch_ddpm, SampleResult)
    chex.assert_shape(batch_ddpm.x0, (B3,) + S)
    chex.assert_shape([batch_ddpm.trace["u"], batch_ddpm.trace["count"]], (B3, N))
    chex.assert_tree_all_finite(batch_ddpm)
    assert batch_ddpm.first_pass_trace is None
    # float32 counts of small integers: exact
    np.testing.assert_array_equal(np.asarray(batch_ddpm.trace["count"]), np.tile(np.arange(1, N + 1), (B3, 1)))


def test_jit_and_no_jit_agree(den, cond3, batch_ddpm):
    eager = sample(den, TinyCFG(), CFG_DDPM, keys_from_seeds([5, 6, 7]), cond3, jit=False)
    chex.assert_trees_all_close(eager, batch_ddpm, **SAME_MATH)


def test_batch_of_seeds_equals_each_seed_alone(den, cond3, batch_ddpm):
    for b, seed in enumerate([5, 6, 7]):
        one = sample(den, TinyCFG(), CFG_DDPM, keys_from_seeds([seed]), cond3[b:b + 1])
        chex.assert_trees_all_close(one.x0[0], batch_ddpm.x0[b], **SAME_MATH)
        chex.assert_trees_all_close(jax.tree.map(lambda a: a[0], one.trace),
                                    jax.tree.map(lambda a: a[b], batch_ddpm.trace), **SAME_MATH)


def test_same_seed_same_output_and_seeds_differ(den, cond3, batch_ddpm):
    again = sample(den, TinyCFG(), CFG_DDPM, keys_from_seeds([5, 6, 7]), cond3)
    # the same compiled program on the same inputs: deterministic, so exact; rows 1-2 below see the
    # same inputs in the same program (an elementwise eps: no row mixes with another), also exact
    chex.assert_trees_all_equal(again, batch_ddpm)
    other = sample(den, TinyCFG(), CFG_DDPM, keys_from_seeds([8, 6, 7]), cond3)
    assert not np.allclose(other.x0[0], batch_ddpm.x0[0])
    np.testing.assert_array_equal(other.x0[1:], batch_ddpm.x0[1:])
    u = np.asarray(batch_ddpm.trace["u"])
    assert len(np.unique(u)) == u.size  # guidance keys differ per sample and per step


def test_compiled_once_per_config(den, cond3, batch_ddpm):
    before = samplers._sample_jit._cache_size()
    other_params = den.replace(params=jax.tree.map(lambda p: p * 1.0001, den.params))
    sample(other_params, TinyCFG(), CFG_DDPM, keys_from_seeds([1, 2, 3]), cond3[::-1])
    sample(den, TinyCFG(scale=3.0), SamplerConfig("DDPM", N, "trailing"), keys_from_seeds([9, 9, 9]), cond3)
    assert samplers._sample_jit._cache_size() == before


def test_x_T_overrides_the_initial_noise(den, cond3):
    keys = keys_from_seeds([5, 6, 7])
    default = sample(den, CondEps(), CFG_DPM, keys, cond3)
    same = sample(den, CondEps(), CFG_DPM, keys, cond3, x_T=initial_noise(keys, S))
    chex.assert_trees_all_close(same, default, **SAME_MATH)
    other = sample(den, CondEps(), CFG_DPM, keys, cond3, x_T=np.zeros((B3,) + S, np.float32))
    assert not np.allclose(other.x0, default.x0)


def test_raw_uint32_keys_are_accepted(den, cond3):
    keys = keys_from_seeds([5, 6, 7])
    a = sample(den, CondEps(), CFG_DPM, keys, cond3)
    b = sample(den, CondEps(), CFG_DPM, jax.random.key_data(keys), cond3)
    chex.assert_trees_all_equal(a, b)     # raw keys are wrapped before the call: the same program, exact


def test_keys_from_seeds_matches_jax_random_key():
    keys = keys_from_seeds([0, 7, 2 ** 32 - 1, 2 ** 40])
    chex.assert_shape(keys, (4,))
    for k, s in zip(keys, [0, 7, 2 ** 32 - 1, 2 ** 40]):
        np.testing.assert_array_equal(jax.random.key_data(k), jax.random.key_data(jax.random.key(s)))


def test_two_pass_guidance_runs_the_probe_from_the_same_noise(den, cond3):
    keys = keys_from_seeds([5, 6, 7])
    res = sample(den, TwoPass(), CFG_DPM, keys, cond3)
    probe = sample(den, NormProbe(), CFG_DPM, keys, cond3)
    chex.assert_shape(res.first_pass_trace["xnorm"], (B3, N))
    chex.assert_trees_all_close(res.first_pass_trace, probe.trace, **SAME_MATH)
    np.testing.assert_array_equal(np.asarray(res.trace["pick"]),     # an argmin over norms far apart
                                  np.tile(np.argmin(probe.trace["xnorm"], axis=1)[:, None], (1, N)))
    chex.assert_trees_all_close(res.x0, probe.x0, **SAME_MATH)  # same eps, same noise
    eager = sample(den, TwoPass(), CFG_DPM, keys, cond3, jit=False)
    chex.assert_trees_all_close(eager, res, **SAME_MATH)


def test_with_the_library_two_pass_guidance(den, cond3):
    cfg_mod = pytest.importorskip("amg_jax.guidance.cfg")
    guidance = getattr(cfg_mod, "OppositeDynamic", None)
    if guidance is None:
        pytest.skip("OppositeDynamic not available")
    res = sample(den, guidance(scale=2.0, early_scale=-2.0), CFG_DPM, keys_from_seeds([5, 6, 7]), cond3)
    chex.assert_shape(res.x0, (B3,) + S)
    chex.assert_shape(res.first_pass_trace["cos_dist"], (B3, N))
    chex.assert_shape(res.trace["transition"], (B3, N))


# ------------------------------------------------------------------ step functions


def test_dpm_solver_first_order_step_is_ddim():
    """DPM-Solver++'s first-order update equals DDIM (eta 0) between the same two timesteps."""
    sched = SCALED
    ts = sampler_timesteps(CFG_DPM, sched)
    ab = sched.alphas_cumprod()
    dpm = make_sampler(CFG_DPM, sched)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2,) + S).astype(np.float32)
    eps = rng.standard_normal((2,) + S).astype(np.float32)
    x_dpm, x0 = dpm.step(x, eps, jnp.int32(0), None, dpm.init(x))
    a_t, a_p = ab[ts[0]], ab[ts[1]]
    x0_ref = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    # float32 step vs float64 formula: x - sqrt(1 - a_t) eps (|x|, |eps| <= ~4) is rounded to an ulp
    # (~4e-7) and then scaled by 1 / sqrt(a_t) ~ 15 at the first step, on every element whatever its
    # size: measured 3.1e-6 (margin 0.31 at the old atol 1e-5), <= ~1.5e-5 for 2 ulps. atol 1e-4
    # leaves >30x; the wrong timestep pair is off by >1e-2.
    chex.assert_trees_all_close(x0, x0_ref, atol=1e-4)
    chex.assert_trees_all_close(x_dpm, np.sqrt(a_p) * x0_ref + np.sqrt(1 - a_p) * eps, atol=1e-4)


def test_ddim_final_step_with_set_alpha_to_one_returns_x0_hat():
    cfg = SamplerConfig("ddim", N, "leading")
    smp = make_sampler(cfg, LINEAR)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2,) + S).astype(np.float32)
    eps = rng.standard_normal((2,) + S).astype(np.float32)
    ab = smp.alpha_bars[-1]
    x_prev, _ = smp.step(x, eps, jnp.int32(N - 1), None, ())
    # float32 vs float64 at ab ~ 1: ~1 ulp of |x| (margin 2%); returning x_t instead of x0_hat is 1e-2 off
    chex.assert_trees_all_close(x_prev, (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), atol=1e-5)


def test_ddpm_noise_is_per_sample():
    keys = keys_from_seeds([4, 9])
    z = step_noise(keys, 3, S)
    # the same threefry bits; their float conversion is compiled in two programs (vmapped or not),
    # which may differ in the last ulp: atol 1e-5 (a wrong key or stream is off by O(1))
    for b in range(2):
        np.testing.assert_allclose(z[b], jax.random.normal(jax.random.fold_in(keys[b], 3), S), rtol=0, atol=1e-5)


# ------------------------------------------------------------------ configs and errors


def test_sampler_config_aliases_and_hashing():
    assert SamplerConfig("dpmsolver++") == SamplerConfig("dpm++2m") == SamplerConfig("DPM++2M")
    assert SamplerConfig("dpmsolver++").name == "dpm++2m"
    assert hash(SamplerConfig("ddim")) == hash(SamplerConfig("DDIM"))
    d = SamplerConfig()
    assert (d.name, d.num_steps, d.spacing, d.eta, d.steps_offset, d.clip_sample, d.set_alpha_to_one) == \
        ("ddim", 50, "leading", 0.0, 0, False, True)


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="euler"), r"SamplerConfig\.name.*'euler'.*ddim"),
    (dict(num_steps=0), r"num_steps must be >= 1"),
    (dict(num_steps=2.5), r"num_steps must be an integer"),
    (dict(spacing="karras"), r"spacing.*'karras'.*leading"),
    (dict(eta=-0.1), r"eta must be >= 0"),
    (dict(name="ddpm", eta=0.5), r"eta applies to 'ddim' only"),
    (dict(name="dpm++2m", clip_sample=True), r"clip_sample"),
    (dict(steps_offset=-1), r"steps_offset"),
    (dict(clip_range=0.0), r"clip_range"),
    (dict(variance_type="learned"), r"variance_type"),
    (dict(final_sigmas_type="one"), r"final_sigmas_type"),
])
def test_bad_sampler_config_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplerConfig(**kwargs)


def _never_traced(params, x, t, cond):
    raise AssertionError("the denoiser was traced: validation must come before compilation")


@pytest.fixture(scope="module")
def untraceable():
    return make_denoiser(LINEAR, eps_fn=_never_traced)


@pytest.mark.parametrize("case, message", [
    ("too_many_steps", r"num_steps=2000 exceeds .*num_train_timesteps=1000"),
    ("offset_past_end", r"steps_offset=5 puts timestep 1004"),
    ("dpm_repeated_timesteps", r"cannot place 1000 distinct dpm\+\+2m steps"),
    ("x_T_shape", r"sample shape mismatch: got \(2, 4, 4, 1\)"),
    ("x_T_batch", r"x_T batch 3 does not match the number of keys 2"),
    ("cond_batch", r"condition batch 3 does not match the sample batch 2"),
    ("cond_id", r"unknown condition id 7"),
    ("keys_shape", r"keys must be \[B\] PRNG keys"),
    ("keys_empty", r"keys is empty"),
    ("unhashable_guidance", r"hashable"),
    ("not_a_guidance", r"has no init\(\) method"),
    ("not_a_config", r"sampler_cfg must be a SamplerConfig"),
])
def test_bad_inputs_raise_before_compilation(untraceable, case, message):
    keys = keys_from_seeds([0, 1])
    cond = jnp.array([0, 1], jnp.int32)
    args = dict(guidance=CondEps(), sampler_cfg=SamplerConfig("ddim", N), keys=keys, cond=cond, x_T=None)
    if case == "too_many_steps":
        args["sampler_cfg"] = SamplerConfig("ddim", 2000)
    elif case == "offset_past_end":
        args["sampler_cfg"] = SamplerConfig("ddim", 1000, steps_offset=5)
    elif case == "dpm_repeated_timesteps":
        args["sampler_cfg"] = SamplerConfig("dpm++2m", 1000, "linspace")
    elif case == "x_T_shape":
        args["x_T"] = np.zeros((2, 4, 4, 1), np.float32)
    elif case == "x_T_batch":
        args["x_T"] = np.zeros((3,) + S, np.float32)
    elif case == "cond_batch":
        args["cond"] = jnp.array([0, 1, 2], jnp.int32)
    elif case == "cond_id":
        args["cond"] = jnp.array([0, 7], jnp.int32)
    elif case == "keys_shape":
        args["keys"] = keys.reshape(1, 2)
    elif case == "keys_empty":
        args["keys"] = keys[:0]
        args["cond"] = cond[:0]
    elif case == "unhashable_guidance":
        args["guidance"] = UnhashableGuidance()
    elif case == "not_a_guidance":
        args["guidance"] = object()
    elif case == "not_a_config":
        args["sampler_cfg"] = "ddim"
    with pytest.raises(ValueError, match=message):
        sample(untraceable, args["guidance"], args["sampler_cfg"], args["keys"], args["cond"], x_T=args["x_T"])


class UnhashableGuidance:
    __hash__ = None

    def init(self, x):
        return ()

    def apply(self, state, ctx):
        return ctx.eps(ctx.x_t, ctx.cond), state, {}
