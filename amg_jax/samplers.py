"""Samplers: DDPM ancestral, DDIM and DPM-Solver++(2M) as pure step functions, and ONE scan loop.

Each sampler is, for a (``SamplerConfig``, ``Schedule``) pair, a ``Sampler``: static numpy
tables (the timesteps and every per-step coefficient, computed in float32 exactly as
diffusers' PyTorch schedulers compute them) and two pure functions::

    init(x_T) -> solver_state
    step(x_t [B,*S], eps_hat [B,*S], i, keys [B], solver_state) -> (x_prev [B,*S], solver_state)

``i`` is the (traced) step index, 0 = noisiest; the tables are indexed with it inside jit.
Stochastic steps draw the noise of sample b at step i as
``normal(fold_in(keys[b], i), S)``, so a batch of seeds gives each seed's own result.

``sample`` runs any guidance with any sampler: ``jax.lax.scan`` over the steps, compiled
once per (denoiser eps_fn / shapes / schedule, guidance config, sampler config). The loop
knows nothing about any particular guidance; the samplers know nothing about guidance.

Parity with diffusers (tested against its PyTorch schedulers, to 1e-5):

- ``ddpm``:    DDPMScheduler (variance_type fixed_small / fixed_large, epsilon prediction);
               the previous timestep is the next entry of the timestep array (-1 after the last),
               noise is added whenever t > 0.
- ``ddim``:    DDIMScheduler; previous timestep t - T // N whatever the spacing (diffusers'
               rule), ``final_alpha_cumprod`` = 1 (set_alpha_to_one) or alpha-bar_0.
- ``dpm++2m``: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
               solver_type="midpoint"), sigma = sqrt((1 - ab) / ab); first order at the first
               step, and at the last when final_sigmas_type="zero" (or lower_order_final with
               fewer than 15 steps).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import sys
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from amg_jax import schedules
from amg_jax.guidance.base import (ProbeResult, StepContext, check_trace_of, describe_strengths, first_pass_of,
                                   has_trace_check)
from amg_jax.mesh import make_mesh
from amg_jax.schedules import Schedule

Array = jax.Array

SAMPLERS = ("ddpm", "ddim", "dpm++2m")
SAMPLER_ALIASES = {
    "ancestral": "ddpm", "ddpm_ancestral": "ddpm",
    "dpm++": "dpm++2m", "dpmpp2m": "dpm++2m", "dpmpp_2m": "dpm++2m", "dpm++_2m": "dpm++2m",
    "dpmsolver++": "dpm++2m", "dpm-solver++": "dpm++2m", "dpmsolver++2m": "dpm++2m",
    "dpm-solver++(2m)": "dpm++2m", "dpmsolvermultistep": "dpm++2m",
}
DDPM_VARIANCE_TYPES = ("fixed_small", "fixed_large")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# fold_in constants separating the random streams drawn from one per-sample key.
INIT_STREAM = 0      # x_T
NOISE_STREAM = 1     # sampler noise (DDPM, DDIM with eta > 0)
GUIDANCE_STREAM = 2  # StepContext.key


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Which sampler, how many steps, and diffusers' scheduler options (hashable: a jit static arg).

    name:              "ddpm" | "ddim" | "dpm++2m" (aliases such as "dpmsolver++" are resolved).
    num_steps:         number of denoising steps N (1 .. num_train_timesteps).
    spacing:           "leading" | "trailing" | "linspace" (diffusers' ``timestep_spacing``).
    eta:               DDIM noise scale (0 = deterministic DDIM, 1 = DDPM-like); DDIM only.
    steps_offset:      added to "leading" timesteps (Stable Diffusion uses 1).
    clip_sample:       clip x0_hat to [-clip_range, clip_range] (DDPM / DDIM).
    clip_range:        diffusers' ``clip_sample_range``.
    set_alpha_to_one:  DDIM: alpha-bar after the last step is 1 (else alpha-bar_0).
    variance_type:     DDPM: "fixed_small" (posterior variance) | "fixed_large" (beta_t).
    lower_order_final: DPM-Solver++: first-order last step when N < 15.
    final_sigmas_type: DPM-Solver++: sigma after the last step, "zero" | "sigma_min".

    Invalid values raise ValueError naming the field on construction; ``check(schedule)``
    adds the checks that need the training schedule.
    """

    name: str = "ddim"
    num_steps: int = 50
    spacing: str = "leading"
    eta: float = 0.0
    steps_offset: int = 0
    clip_sample: bool = False
    clip_range: float = 1.0
    set_alpha_to_one: bool = True
    variance_type: str = "fixed_small"
    lower_order_final: bool = True
    final_sigmas_type: str = "zero"

    def __post_init__(self):
        name = self.name.lower() if isinstance(self.name, str) else self.name
        name = SAMPLER_ALIASES.get(name, name)
        if name not in SAMPLERS:
            raise ValueError(f"SamplerConfig.name: unknown sampler {self.name!r}; choose one of "
                             f"{list(SAMPLERS)} (aliases: {sorted(SAMPLER_ALIASES)})")
        object.__setattr__(self, "name", name)
        if isinstance(self.num_steps, bool) or not isinstance(self.num_steps, (int, np.integer)):
            raise ValueError(f"SamplerConfig.num_steps must be an integer, got {self.num_steps!r}")
        if self.num_steps < 1:
            raise ValueError(f"SamplerConfig.num_steps must be >= 1, got {self.num_steps}")
        schedules.check_spacing(self.spacing, "SamplerConfig.spacing")
        if not self.eta >= 0:
            raise ValueError(f"SamplerConfig.eta must be >= 0, got {self.eta!r}")
        if self.eta != 0 and name != "ddim":
            raise ValueError(f"SamplerConfig.eta applies to 'ddim' only; got eta={self.eta!r} "
                             f"with sampler {name!r}")
        if not isinstance(self.steps_offset, (int, np.integer)) or self.steps_offset < 0:
            raise ValueError(f"SamplerConfig.steps_offset must be an integer >= 0, got {self.steps_offset!r}")
        if not self.clip_range > 0:
            raise ValueError(f"SamplerConfig.clip_range must be > 0, got {self.clip_range!r}")
        if self.clip_sample and name == "dpm++2m":
            raise ValueError("SamplerConfig.clip_sample is not supported by 'dpm++2m' "
                             "(diffusers' DPMSolverMultistepScheduler has no clip_sample)")
        if self.variance_type not in DDPM_VARIANCE_TYPES:
            raise ValueError(f"SamplerConfig.variance_type: unknown {self.variance_type!r}; "
                             f"choose one of {list(DDPM_VARIANCE_TYPES)}")
        if self.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"SamplerConfig.final_sigmas_type: unknown {self.final_sigmas_type!r}; "
                             f"choose one of {list(FINAL_SIGMAS_TYPES)}")

    def check(self, schedule: Schedule) -> None:
        """Raise ValueError when this config does not fit the training ``schedule``."""
        t_train = schedule.num_train_timesteps
        if self.num_steps > t_train:
            raise ValueError(f"SamplerConfig.num_steps={self.num_steps} exceeds the schedule's "
                             f"num_train_timesteps={t_train}")
        ts = sampler_timesteps(self, schedule)
        if len(ts) != self.num_steps or ts.min() < 0 or np.any(np.diff(ts) >= 0):
            raise ValueError(f"SamplerConfig: spacing {self.spacing!r} cannot place {self.num_steps} distinct "
                             f"{self.name} steps in {t_train} training timesteps (got {ts.tolist()[:8]}...)")
        if ts.max() >= t_train:
            raise ValueError(f"SamplerConfig.steps_offset={self.steps_offset} puts timestep {int(ts.max())} "
                             f"past the schedule's last one ({t_train - 1})")


def sampler_timesteps(cfg: SamplerConfig, schedule: Schedule) -> np.ndarray:
    """[N] int64 descending training timesteps visited by ``cfg`` (diffusers' ``scheduler.timesteps``)."""
    spacing_fn = schedules.dpm_solver_timesteps if cfg.name == "dpm++2m" else schedules.timesteps
    return spacing_fn(cfg.spacing, schedule.num_train_timesteps, cfg.num_steps, cfg.steps_offset)


# ----------------------------------------------------------------------------- noise


def keys_from_seeds(seeds) -> Array:
    """[B] typed PRNG keys, key b = ``jax.random.key(seeds[b])``."""
    seeds = np.atleast_1d(np.asarray(seeds))
    if seeds.ndim != 1 or not np.issubdtype(seeds.dtype, np.integer):
        raise ValueError(f"seeds must be a 1-D sequence of integers, got {seeds!r}")
    if seeds.size and seeds.min() >= 0 and seeds.max() < 2 ** 32:
        return jax.vmap(jax.random.key)(jnp.asarray(seeds.astype(np.uint32)))
    return jnp.stack([jax.random.key(int(s)) for s in seeds])


def as_keys(keys) -> Array:
    """[B] typed keys from typed keys [B] or raw uint32 key data [B, 2]; ValueError otherwise."""
    if isinstance(keys, (list, tuple)):
        keys = jnp.stack([jnp.asarray(k) for k in keys]) if keys else jnp.zeros((0,))
    if hasattr(keys, "dtype") and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 1:
            raise ValueError(f"keys must be [B] PRNG keys (one per sample), got shape {keys.shape}")
        return keys
    shape, dtype = np.shape(keys), getattr(keys, "dtype", None)
    if len(shape) != 2 or shape[1] != 2 or dtype != np.uint32:
        raise ValueError(f"keys must be [B] PRNG keys (e.g. keys_from_seeds(seeds)) or raw uint32 key "
                         f"data [B, 2]; got shape {shape} dtype {dtype}")
    return jax.random.wrap_key_data(jnp.asarray(keys))


def fold_keys(keys: Array, data) -> Array:
    """[B] keys -> [B] keys, each folded with ``data`` (an int or a traced int scalar)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(keys)


def initial_noise(keys: Array, shape: tuple, dtype=jnp.float32) -> Array:
    """x_T [B, *shape]: sample b is ``normal(fold_in(keys[b], INIT_STREAM), shape)``."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(fold_keys(keys, INIT_STREAM))


def step_noise(keys: Array, i, shape: tuple, dtype=jnp.float32) -> Array:
    """[B, *shape] noise for step i: sample b is ``normal(fold_in(keys[b], i), shape)``."""
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(fold_keys(keys, i))


# ----------------------------------------------------------------------------- step functions


def _bcast(c: Array, x: Array) -> Array:
    """A per-step scalar (or [B] vector) reshaped to broadcast against x [B, *S]."""
    c = jnp.asarray(c, x.dtype)
    return c.reshape(c.shape + (1,) * (x.ndim - c.ndim))


def _clip(x0: Array, clip_range: float | None) -> Array:
    return x0 if clip_range is None else jnp.clip(x0, -clip_range, clip_range)


class DDPMTables(NamedTuple):
    """Per-step float32 coefficients [N] of DDPMScheduler.step."""

    sqrt_one_minus_ab: np.ndarray  # beta_prod_t ** 0.5
    sqrt_ab: np.ndarray            # alpha_prod_t ** 0.5
    x0_coeff: np.ndarray           # pred_original_sample_coeff
    xt_coeff: np.ndarray           # current_sample_coeff
    std: np.ndarray                # noise std (0 where t == 0)


def ddpm_tables(cfg: SamplerConfig, schedule: Schedule, timesteps: np.ndarray) -> DDPMTables:
    """DDPMScheduler's coefficients for each step, float32 as diffusers computes them:
    ``timesteps [N]`` (noisiest first) -> ``DDPMTables`` of [N] arrays."""
    ac = schedule.alphas_cumprod()
    one = np.float32(1.0)
    prev = np.append(timesteps[1:], -1)
    ab_t = ac[timesteps]
    ab_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], one).astype(np.float32)
    beta_prod_t = one - ab_t
    beta_prod_prev = one - ab_prev
    current_alpha = ab_t / ab_prev
    current_beta = one - current_alpha
    x0_coeff = (np.sqrt(ab_prev) * current_beta) / beta_prod_t
    xt_coeff = np.sqrt(current_alpha) * beta_prod_prev / beta_prod_t
    if cfg.variance_type == "fixed_small":
        var = np.maximum((one - ab_prev) / (one - ab_t) * current_beta, np.float32(1e-20))
    else:
        var = current_beta
    std = np.where(timesteps > 0, np.sqrt(var), np.float32(0.0)).astype(np.float32)
    return DDPMTables(np.sqrt(beta_prod_t), np.sqrt(ab_t), x0_coeff, xt_coeff, std)


def ddpm_step(tables: DDPMTables, x_t: Array, eps_hat: Array, i: Array, keys: Array, state: tuple,
              *, clip_range: float | None = None) -> tuple[Array, tuple]:
    """DDPM ancestral step: x_{t'} = x0_coeff x0_hat + xt_coeff x_t + std z, z = normal(fold_in(keys[b], i)).

    x_t, eps_hat: [B, *S]; i: [] step index; keys: [B]. ``clip_range`` clips x0_hat.
    """
    tab = jax.tree.map(lambda a: jnp.asarray(a)[i], tables)
    x0 = (x_t - _bcast(tab.sqrt_one_minus_ab, x_t) * eps_hat) / _bcast(tab.sqrt_ab, x_t)
    x0 = _clip(x0, clip_range)
    mean = _bcast(tab.x0_coeff, x_t) * x0 + _bcast(tab.xt_coeff, x_t) * x_t
    z = step_noise(keys, i, x_t.shape[1:], x_t.dtype)
    return mean + _bcast(tab.std, x_t) * z, state


class DDIMTables(NamedTuple):
    """Per-step float32 coefficients [N] of DDIMScheduler.step."""

    sqrt_one_minus_ab: np.ndarray  # beta_prod_t ** 0.5
    sqrt_ab: np.ndarray            # alpha_prod_t ** 0.5
    sqrt_ab_prev: np.ndarray       # alpha_prod_t_prev ** 0.5
    dir_coeff: np.ndarray          # (1 - alpha_prod_t_prev - std ** 2) ** 0.5
    std: np.ndarray                # eta * variance ** 0.5


def ddim_tables(cfg: SamplerConfig, schedule: Schedule, timesteps: np.ndarray) -> DDIMTables:
    """DDIMScheduler's coefficients for each step (previous timestep t - T // N), float32:
    ``timesteps [N]`` (noisiest first) -> ``DDIMTables`` of [N] arrays."""
    ac = schedule.alphas_cumprod()
    one = np.float32(1.0)
    final = one if cfg.set_alpha_to_one else ac[0]
    prev = timesteps - schedule.num_train_timesteps // cfg.num_steps
    ab_t = ac[timesteps]
    ab_prev = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(np.float32)
    beta_prod_t = one - ab_t
    variance = ((one - ab_prev) / beta_prod_t) * (one - ab_t / ab_prev)
    std = (np.float32(cfg.eta) * np.sqrt(variance)).astype(np.float32)
    dir_coeff = np.sqrt(one - ab_prev - std * std)
    return DDIMTables(np.sqrt(beta_prod_t), np.sqrt(ab_t), np.sqrt(ab_prev), dir_coeff, std)


def ddim_step(tables: DDIMTables, x_t: Array, eps_hat: Array, i: Array, keys: Array, state: tuple,
              *, clip_range: float | None = None, stochastic: bool = False) -> tuple[Array, tuple]:
    """DDIM step: x_{t'} = sqrt(ab') x0_hat + sqrt(1 - ab' - std^2) eps_hat [+ std z].

    x_t, eps_hat: [B, *S]; i: [] step index; keys: [B]. ``stochastic`` (eta > 0) adds
    z = normal(fold_in(keys[b], i)).
    """
    tab = jax.tree.map(lambda a: jnp.asarray(a)[i], tables)
    x0 = (x_t - _bcast(tab.sqrt_one_minus_ab, x_t) * eps_hat) / _bcast(tab.sqrt_ab, x_t)
    x0 = _clip(x0, clip_range)
    x_prev = _bcast(tab.sqrt_ab_prev, x_t) * x0 + _bcast(tab.dir_coeff, x_t) * eps_hat
    if stochastic:
        x_prev = x_prev + _bcast(tab.std, x_t) * step_noise(keys, i, x_t.shape[1:], x_t.dtype)
    return x_prev, state


class DPMSolverTables(NamedTuple):
    """Per-step float32 coefficients [N] of DPMSolverMultistepScheduler (dpmsolver++, order 2)."""

    alpha: np.ndarray     # alpha_s = 1 / sqrt(sigma_s^2 + 1)
    sigma: np.ndarray     # sigma_s * alpha_s (the VP sigma)
    ratio: np.ndarray     # sigma_t / sigma_s0 (VP sigmas; t = next step)
    coeff: np.ndarray     # alpha_t * (exp(-h) - 1)
    half_coeff: np.ndarray  # 0.5 * coeff
    inv_r0: np.ndarray    # 1 / r0 = h / h_0 on second-order steps, 0 on first-order steps


def dpm_solver_tables(cfg: SamplerConfig, schedule: Schedule, timesteps: np.ndarray) -> DPMSolverTables:
    """DPM-Solver++(2M) coefficients for each step, float32 as diffusers computes them:
    ``timesteps [N]`` (noisiest first) -> ``DPMSolverTables`` of [N] arrays."""
    ac = schedule.alphas_cumprod()
    one = np.float32(1.0)
    all_sigmas = np.sqrt((one - ac) / ac)
    last = np.float32(0.0) if cfg.final_sigmas_type == "zero" else all_sigmas[0]
    sigmas = np.append(all_sigmas[timesteps], last).astype(np.float32)   # [N + 1]
    alpha = (one / np.sqrt(sigmas * sigmas + one)).astype(np.float32)
    sigma = (sigmas * alpha).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = (np.log(alpha) - np.log(sigma)).astype(np.float32)        # +inf at sigma = 0
        h = lam[1:] - lam[:-1]                                           # [N]
        ratio = sigma[1:] / sigma[:-1]
        coeff = alpha[1:] * (np.exp(-h) - one)
        h0 = np.append(np.float32(np.nan), lam[1:-1] - lam[:-2])         # h_0 at step i >= 1
        inv_r0 = one / (h0 / h)
    n = len(timesteps)
    steps = np.arange(n)
    final_first_order = (cfg.final_sigmas_type == "zero") or (cfg.lower_order_final and n < 15)
    first_order = (steps == 0) | ((steps == n - 1) & final_first_order)
    inv_r0 = np.where(first_order, np.float32(0.0), inv_r0).astype(np.float32)
    return DPMSolverTables(alpha[:-1], sigma[:-1], ratio.astype(np.float32), coeff.astype(np.float32),
                           (np.float32(0.5) * coeff).astype(np.float32), inv_r0)


def dpm_solver_step(tables: DPMSolverTables, x_t: Array, eps_hat: Array, i: Array, keys: Array,
                    x0_prev: Array) -> tuple[Array, Array]:
    """DPM-Solver++(2M) step with data prediction x0 = (x_t - sigma eps_hat) / alpha.

    x_{t'} = (sigma'/sigma) x_t - coeff * D0 - 0.5 coeff * D1, D0 = x0, D1 = (x0 - x0_prev) / r0
    (D1 = 0 on first-order steps). Solver state: x0_prev [B, *S], the previous step's x0.
    """
    del keys
    tab = jax.tree.map(lambda a: jnp.asarray(a)[i], tables)
    x0 = (x_t - _bcast(tab.sigma, x_t) * eps_hat) / _bcast(tab.alpha, x_t)
    d1 = _bcast(tab.inv_r0, x_t) * (x0 - x0_prev)
    x_prev = _bcast(tab.ratio, x_t) * x_t - _bcast(tab.coeff, x_t) * x0 - _bcast(tab.half_coeff, x_t) * d1
    return x_prev, x0


# ----------------------------------------------------------------------------- samplers


class Sampler(NamedTuple):
    """One sampler for one (SamplerConfig, Schedule): static tables + pure functions.

    timesteps:  [N] int64 training timesteps, descending.
    alpha_bars: [N] float32 alpha-bar at each of them.
    init:       x_T [B,*S] -> solver_state.
    step:       (x_t, eps_hat, i, keys [B], solver_state) -> (x_prev, solver_state).
    """

    timesteps: np.ndarray
    alpha_bars: np.ndarray
    init: Callable[[Array], Any]
    step: Callable[..., tuple[Array, Any]]


def _no_state(x: Array) -> tuple:
    return ()


@functools.lru_cache(maxsize=256)
def make_sampler(cfg: SamplerConfig, schedule: Schedule) -> Sampler:
    """Build the ``Sampler`` of ``cfg`` on the training ``schedule`` (validated; cached)."""
    cfg.check(schedule)
    ts = sampler_timesteps(cfg, schedule)
    ab = schedule.alphas_cumprod()[ts]
    clip = float(cfg.clip_range) if cfg.clip_sample else None
    if cfg.name == "ddpm":
        step = functools.partial(ddpm_step, ddpm_tables(cfg, schedule, ts), clip_range=clip)
        return Sampler(ts, ab, _no_state, step)
    if cfg.name == "ddim":
        step = functools.partial(ddim_step, ddim_tables(cfg, schedule, ts), clip_range=clip,
                                 stochastic=cfg.eta > 0)
        return Sampler(ts, ab, _no_state, step)
    step = functools.partial(dpm_solver_step, dpm_solver_tables(cfg, schedule, ts))
    return Sampler(ts, ab, jnp.zeros_like, step)


# ----------------------------------------------------------------------------- the loop


class SampleResult(NamedTuple):
    """x0: [B, *S] final samples; trace: {name: [B, N]} the guidance's per-step trace;
    first_pass_trace: the probe pass's trace {name: [B, N]} for two-pass guidances, else None."""

    x0: Array
    trace: dict
    first_pass_trace: dict | None


def _eps_at(denoiser, t: Array, x: Array, cond: Any) -> Array:
    """The denoiser at timestep t for a batch x [B', *S] with conditions cond [B', ...]."""
    return denoiser.eps_fn(denoiser.params, x, jnp.full((x.shape[0],), t, jnp.int32), cond)


def _eps_any_t(denoiser, x: Array, cond: Any, t) -> Array:
    """``_eps_at`` with the timestep last (``StepContext.eps_at``)."""
    return _eps_at(denoiser, jnp.asarray(t, jnp.int32), x, cond)


def _batch_major(trace: dict) -> dict:
    """Stacked trace leaves [N, B, ...] -> [B, N, ...]."""
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), trace)


def run_loop(denoiser, guidance, sampler: Sampler, keys: Array, cond: Any, x_T: Array,
             state: Any) -> tuple[Array, dict]:
    """Denoise x_T [B,*S] through every step of ``sampler`` with ``guidance`` from ``state``.

    Returns (x0 [B,*S], trace {name: [B, N]}). Pure and traceable (one ``lax.scan``).
    """
    x0, trace, _ = _scan(denoiser, guidance, sampler, keys, cond, x_T, state)
    return x0, trace


def _scan(denoiser, guidance, sampler: Sampler, keys: Array, cond: Any, x_T: Array,
          state: Any) -> tuple[Array, dict, Any]:
    """``run_loop`` that also returns the guidance state after the last step."""
    n = len(sampler.timesteps)
    batch = x_T.shape[0]
    t_all = jnp.asarray(sampler.timesteps, jnp.int32)
    ab_all = jnp.asarray(sampler.alpha_bars, jnp.float32)
    cond, null_cond = denoiser.split_cond(cond, batch)
    noise_keys = fold_keys(keys, NOISE_STREAM)
    guide_keys = fold_keys(keys, GUIDANCE_STREAM)

    def body(carry, i):
        x, g_state, s_state = carry
        t = t_all[i]
        ctx = StepContext(x_t=x, t=t, step=i, num_steps=n, alpha_bar=ab_all[i], cond=cond,
                          null_cond=null_cond, eps=functools.partial(_eps_at, denoiser, t),
                          key=fold_keys(guide_keys, i), eps_at=functools.partial(_eps_any_t, denoiser))
        eps_hat, g_state, trace = guidance.apply(g_state, ctx)
        x_prev, s_state = sampler.step(x, eps_hat.astype(x.dtype), i, noise_keys, s_state)
        return (x_prev.astype(x.dtype), g_state, s_state), trace

    carry = (x_T, state, sampler.init(x_T))
    (x0, g_state, _), trace = jax.lax.scan(body, carry, jnp.arange(n, dtype=jnp.int32))
    return x0, _batch_major(trace), g_state


def sample_loop(denoiser, guidance, sampler_cfg: SamplerConfig, keys: Array, cond: Any,
                x_T: Array | None = None) -> SampleResult:
    """The whole sampling computation, unchecked and un-jitted (``sample`` validates and jits it).

    Pure: use it inside your own jit / vmap / shard_map. keys: [B] typed keys; cond: [B, ...];
    x_T: [B, *S] or None (then ``initial_noise(keys, denoiser.sample_shape)``).
    Two-pass guidances (``first_pass`` not None) run the probe pass from the same noise first and
    hand its ``ProbeResult`` (final samples, trace, final state) to ``after_first_pass``.
    """
    sampler = make_sampler(sampler_cfg, denoiser.schedule)
    if x_T is None:
        x_T = initial_noise(keys, tuple(denoiser.sample_shape))
    state = guidance.init(x_T)
    first_pass = first_pass_of(guidance)
    first_trace = None
    if first_pass is not None:
        probe = ProbeResult(*_scan(denoiser, first_pass, sampler, keys, cond, x_T, first_pass.init(x_T)))
        first_trace = probe.trace
        state = guidance.after_first_pass(state, probe)
    x0, trace = run_loop(denoiser, guidance, sampler, keys, cond, x_T, state)
    return SampleResult(x0, trace, first_trace)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class StaticGuidance:
    """Carries a hashable guidance that is not a registered pytree through ``jit`` as static."""

    guidance: Any


def is_pytree_guidance(guidance) -> bool:
    """Whether ``guidance`` is a registered pytree (its arrays traced, its config static)."""
    leaves = jax.tree.leaves(guidance)
    return not (len(leaves) == 1 and leaves[0] is guidance)


def jit_guidance(guidance):
    """The guidance as ``sample_entry`` takes it through ``jit``: a pytree as it is, any other
    hashable guidance wrapped as static (``StaticGuidance``)."""
    return guidance if is_pytree_guidance(guidance) else StaticGuidance(guidance)


def sample_entry(denoiser, guidance, sampler_cfg, keys, cond, x_T):
    """``sample_loop`` (keys [B], cond [B, ...], x_T [B, *S] or None) with the guidance as
    ``jit_guidance`` passes it: the function every entry point jits (``sample``; ``sharding.sample_sharded`` over a mesh, ``sample_pmap`` per device),
    with ``sampler_cfg`` static."""
    if isinstance(guidance, StaticGuidance):
        guidance = guidance.guidance
    return sample_loop(denoiser, guidance, sampler_cfg, keys, cond, x_T)


# The guidance is a pytree argument: its config is static (part of the tree structure), the
# arrays it holds (AMG's reference bank) are traced, so a large bank is never a constant.
_sample_jit = jax.jit(sample_entry, static_argnums=(2,))


def check_guidance(guidance) -> None:
    """Raise ValueError unless ``guidance`` has init/apply and can go through ``jit``: a pytree
    whose leaves are arrays and whose static part is hashable (``guidance_config`` /
    ``register_dataclass``), or a plain hashable object (then it is static as a whole)."""
    for name in ("init", "apply"):
        if not callable(getattr(guidance, name, None)):
            raise ValueError(f"guidance {guidance!r} has no {name}() method")
    name = type(guidance).__name__
    if is_pytree_guidance(guidance):
        leaves, treedef = jax.tree.flatten(guidance)
        bad = [type(v).__name__ for v in leaves if not isinstance(v, (jax.Array, np.ndarray, np.generic))]
        if bad:
            raise ValueError(f"guidance {name}: its pytree leaves must be arrays, got {bad[:3]} "
                             "(mark config fields static)")
        try:
            hash(treedef)
        except TypeError as e:
            raise ValueError(f"guidance {name}: its static config must be hashable: {e}") from e
    else:
        try:
            hash(guidance)
        except TypeError as e:
            raise ValueError(f"guidance {name} must be hashable (a frozen dataclass) or a pytree: {e}") from e
    first_pass = first_pass_of(guidance)
    if first_pass is not None:
        check_guidance(first_pass)
        if not callable(getattr(guidance, "after_first_pass", None)):
            raise ValueError(f"guidance {type(guidance).__name__} has a first_pass but no after_first_pass()")


def validate_inputs(denoiser, guidance, sampler_cfg, keys, cond, x_T=None, where: str = ""):
    """Every check ``sample`` makes before compiling (ValueError naming the problem, prefixed by
    ``where``); returns ``(keys [B] typed, x_T as an array or None)``. Shared by the sharded and
    ``pmap`` entry points (``amg_jax.sharding``)."""
    pre = f"{where}: " if where else ""
    if not isinstance(sampler_cfg, SamplerConfig):
        raise ValueError(f"{pre}sampler_cfg must be a SamplerConfig, got {type(sampler_cfg).__name__}")
    sampler_cfg.check(denoiser.schedule)
    check_guidance(guidance)
    keys = as_keys(keys)
    batch = keys.shape[0]
    if batch < 1:
        raise ValueError(f"{pre}keys is empty: pass one PRNG key per sample")
    denoiser.validate_cond(cond, batch)
    if x_T is not None:
        denoiser.validate_x(x_T)
        if np.shape(x_T)[0] != batch:
            raise ValueError(f"{pre}x_T batch {np.shape(x_T)[0]} does not match the number of keys {batch}")
        x_T = jnp.asarray(x_T)
    return keys, x_T


def sample(denoiser, guidance, sampler_cfg: SamplerConfig, keys, cond, *, x_T: Array | None = None,
           jit: bool = True) -> SampleResult:
    """Sample B = len(keys) images with ``guidance`` and the sampler of ``sampler_cfg``.

    denoiser:    a ``Denoiser``; guidance: a guidance (``init`` / ``apply``): a pytree whose
                 config is static (traced arrays such as a reference bank are arguments of
                 the compiled loop, not constants), or any hashable object.
    keys:        [B] PRNG keys, one per seed (``keys_from_seeds``), or raw uint32 [B, 2].
    cond:        pytree [B, ...] of conditions.
    x_T:         optional [B, *S] initial noise (default: drawn from each sample's own key).
    jit:         False runs the same loop without ``jax.jit`` (for debugging / tests).
    Returns ``SampleResult(x0 [B,*S], trace {name: [B, N]}, first_pass_trace | None)``.
    Everything is validated (ValueError naming the problem) before anything is compiled.

    Divergence: samples that are NaN/inf or beyond ``DIVERGED``, and a guidance's
    ``check_trace(trace) -> message | None`` (AMG: NaN/inf in a term), are reported as one
    RuntimeWarning; the samples are returned all the same. ``sample`` reads nothing back to the
    host (``report_divergence``: the check runs on the device after the samples), so it returns
    as soon as the work is queued and a loop over batches queues the next batch while the
    device computes. The warning therefore arrives when the computation completes, possibly
    after ``sample`` returned and from another thread; ``jax.effects_barrier()`` waits for it
    (reading ``x0`` does not).
    """
    keys, x_T = validate_inputs(denoiser, guidance, sampler_cfg, keys, cond, x_T)
    if not jit:
        res = sample_loop(denoiser, guidance, sampler_cfg, keys, cond, x_T)
    else:
        res = _sample_jit(denoiser, jit_guidance(guidance), sampler_cfg, keys, cond, x_T)
    report_divergence(guidance, res)   # report, keep the samples: nothing computed is thrown away
    return res


DIVERGED = 1e6      # |x0| beyond this is no image (samples live at the data's unit scale): the guidance diverged


def diverged(x0: Array) -> Array:
    """[B] bool: sample b of ``x0`` [B, *S] holds NaN/inf or a value beyond ``DIVERGED``
    (traceable; computed where ``x0`` lives, nothing is read back)."""
    flat = jnp.reshape(x0, (x0.shape[0], -1))
    return jnp.any(~(jnp.abs(flat) <= DIVERGED), axis=1)       # NaN compares False


def _diverged_message(bad: np.ndarray, guidance) -> str | None:
    """``nonfinite_samples_message`` from the host flags ``bad`` [B] (``diverged``)."""
    bad = np.asarray(bad, bool)
    if not bad.any():
        return None
    return (f"sample: {int(bad.sum())} of {bad.size} samples are NaN/inf or beyond +-{DIVERGED:g} (samples "
            f"{np.flatnonzero(bad)[:8].tolist()}): the guidance diverged; lower its strength: {describe_strengths(guidance)}")


def nonfinite_samples_message(x0, guidance) -> str | None:
    """A message when samples ``x0`` [B, *S] hold NaN/inf or values beyond ``DIVERGED`` (the
    guidance diverged, e.g. a huge guidance strength), naming the guidance's strength settings;
    None when all are fine. It reads the flags back, so it waits for ``x0``; ``sample`` issues
    the same message without waiting (``report_divergence``)."""
    return _diverged_message(np.asarray(diverged(x0)), guidance)


def divergence_message(guidance, bad: np.ndarray, trace: dict) -> str | None:
    """The one divergence message of a run from host values: the guidance's ``check_trace(trace)``
    (trace {name: [B, N]}) and ``nonfinite_samples_message`` of the flags ``bad`` [B], joined by "; "."""
    message = "; ".join(m for m in (check_trace_of(guidance, trace), _diverged_message(bad, guidance)) if m)
    return message or None


# Reports in flight: ticket -> (guidance, keep). The device program of a report carries only its
# ticket (a traced int32, so one compilation serves every guidance); the callback looks the
# guidance up here to word the message. ``keep``: a report traced inside the caller's own jit
# fires on every run of it, so its entry stays; the oldest entries go beyond _MAX_REPORTS.
_REPORTS: dict = {}
_TICKETS = itertools.count()
_MAX_REPORTS = 4096


def _report_callback(ticket, bad, trace) -> None:
    """Host side of ``report_divergence`` (a ``jax.debug.callback``): warn if the run diverged.
    It never raises: an exception in a callback fails the device program and every later
    ``jax.effects_barrier()``, so one it cannot hand to the caller (a warnings filter set to
    "error", a failing ``check_trace``) is printed to stderr instead."""
    try:
        with jax.transfer_guard("allow"):       # it may run inline on a thread that disallows transfers
            t = int(np.asarray(ticket))
            entry = _REPORTS.get(t)
            if entry is None:
                return
            guidance, keep = entry
            if not keep:
                _REPORTS.pop(t, None)
            message = divergence_message(guidance, np.asarray(bad), {k: np.asarray(v) for k, v in trace.items()})
        if message:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
    except Exception as e:      # noqa: BLE001 - see the docstring
        print(f"amg_jax.samplers: the divergence report of a sample call failed: {type(e).__name__}: {e}",
              file=sys.stderr)


@functools.partial(jax.jit, static_argnums=(3,))
def _report_program(ticket, x0, trace, gather):
    """The device side of ``report_divergence``: ``diverged(x0)`` and the trace handed to
    ``_report_callback`` when they are computed (``gather``: a replicated sharding to collect
    sharded outputs on first, or None)."""
    bad = diverged(x0)
    if gather is not None:                 # sharded -> replicated, then the callback's one device
        bad, trace = jax.lax.with_sharding_constraint((bad, trace), gather)
    jax.debug.callback(_report_callback, ticket, bad, trace)


def _gather_sharding(x):
    """A replicated sharding over the devices ``x`` is split over (None on one device, or traced)."""
    sharding = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
    if sharding is None or len(sharding.device_set) < 2:
        return None
    mesh = getattr(sharding, "mesh", None)
    if not isinstance(mesh, Mesh):
        mesh = make_mesh(sorted(sharding.device_set, key=lambda d: d.id))
    return NamedSharding(mesh, PartitionSpec())


def report_divergence(guidance, res: SampleResult) -> None:
    """Queue the divergence check of a sampling result (``x0`` [B, *S], trace {name: [B, N]}):
    ``diverged(x0)`` runs on the device after the samples, and a ``jax.debug.callback`` issues
    ``divergence_message`` as a RuntimeWarning when it is computed. Nothing is read back here,
    so this returns at once; ``jax.effects_barrier()`` waits for the warning. Skipped for outputs
    this process cannot read whole (several hosts)."""
    leaves = jax.tree.leaves((res.x0, res.trace))
    if not all(getattr(a, "is_fully_addressable", True) for a in leaves if not isinstance(a, jax.core.Tracer)):
        return
    ticket = next(_TICKETS) % (2 ** 31 - 1)
    _REPORTS[ticket] = (guidance, isinstance(res.x0, jax.core.Tracer))
    while len(_REPORTS) > _MAX_REPORTS:
        _REPORTS.pop(next(iter(_REPORTS)), None)
    trace = dict(res.trace) if has_trace_check(guidance) else {}
    _report_program(np.int32(ticket), res.x0, trace, _gather_sharding(res.x0))


__all__ = [
    "DDIMTables", "DDPMTables", "DPMSolverTables", "ProbeResult", "SAMPLERS", "SampleResult", "Sampler", "SamplerConfig",
    "StaticGuidance", "as_keys", "check_guidance", "is_pytree_guidance", "jit_guidance", "sample_entry", "ddim_step", "ddim_tables", "ddpm_step", "ddpm_tables", "dpm_solver_step",
    "dpm_solver_tables", "fold_keys", "initial_noise", "keys_from_seeds", "make_sampler", "nonfinite_samples_message",
    "diverged", "divergence_message", "report_divergence",
    "run_loop",
    "sample", "sample_loop", "sampler_timesteps", "step_noise", "validate_inputs",
]
