"""The guidance protocol: pure ``init`` / ``apply`` over a small pytree state (optax-shaped).

A guidance is a frozen (hashable) dataclass of config fields with two methods::

    init(x_T) -> state            # x_T: [B, *S], gives batch size, shape and dtype
    apply(state, ctx) -> (eps_hat [B,*S], new_state, trace)

``ctx`` (a ``StepContext``) carries everything about the current step, including a
handle to call the denoiser, so a guidance may ask for extra forward passes or
gradients. ``trace`` is a dict of per-sample arrays [B] (floats / ints / bools)
that the sampler stacks over steps into [B, num_steps]. Being hashable, a guidance
config is a static argument of the jitted sampling loop: one compilation per config.

Two-pass methods (OG+DTP) set ``first_pass`` to the guidance of the probing pass and
implement ``after_first_pass(state, probe: ProbeResult) -> state``; the sampling loop runs the
probe from the same noise and hands over its final samples, stacked trace and final state
before the real pass.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp

Array = jax.Array


class StepContext(NamedTuple):
    """What a guidance sees at one sampling step (all arrays traced).

    x_t:       [B, *S] current noisy sample.
    t:         [] int32 training timestep of this step (diffusers' convention).
    step:      [] int32 step index, 0 .. num_steps-1 (0 = noisiest).
    num_steps: static int, number of sampling steps.
    alpha_bar: [] float32 alpha-bar at ``t``.
    cond:      pytree [B, ...] the user's condition.
    null_cond: pytree [B, ...] the unconditional condition.
    eps:       ``eps(x [B',*S], cond [B',...]) -> [B',*S]`` the denoiser at this ``t``.
    key:       [B] per-sample PRNG keys for this step (already folded with the step index).
    eps_at:    ``eps_at(x [B',*S], cond [B',...], t) -> [B',*S]`` the denoiser at another
               timestep ``t`` (a screen's probe on x_T at low noise); None where the caller has none.
    """

    x_t: Array
    t: Array
    step: Array
    num_steps: int
    alpha_bar: Array
    cond: Any
    null_cond: Any
    eps: Callable[[Array, Any], Array]
    key: Array
    eps_at: Callable[[Array, Any, Any], Array] | None = None


class ProbeResult(NamedTuple):
    """A two-pass guidance's probe pass, as ``after_first_pass`` receives it: x0 [B,*S] its final
    samples, trace {name: [B, N]}, state its guidance state after the last step."""

    x0: Array
    trace: dict
    state: Any


class GuidanceBase:
    """The protocol's optional hooks with their defaults; every guidance of this package inherits
    them, and ``first_pass_of`` / ``check_trace_of`` / ``describe_strengths`` give the same defaults
    to any other object with ``init`` / ``apply``, so the sampler calls hooks and never probes.

    first_pass:       the probe pass of a two-pass method (OG+DTP), else None; such a guidance
                      also implements ``after_first_pass(state, probe: ProbeResult) -> state``.
    check_trace:      ``trace {name: [B, N]} -> message | None``: what went wrong in a run (AMG:
                      a term that went NaN/inf), read by the divergence report.
    strengths:        ``{name: value}`` of the settings that set how hard the guidance pushes
                      (CFG's scale; AMG's c1 / c2 / c3 and, under "base", its base guidance):
                      what the divergence message tells the user to lower.
    A guidance AMG can wrap also has ``combine(state, ctx, eps_u, eps_c)``: ``apply`` without its
    denoiser call, and a ``"scale"`` trace entry (the guidance scale at that step)."""

    first_pass = None

    def check_trace(self, trace: dict) -> str | None:
        return None

    def strengths(self) -> dict:
        return {k: getattr(self, k) for k in ("scale", "early_scale")
                if isinstance(getattr(self, k, None), (int, float)) and not isinstance(getattr(self, k), bool)}


def first_pass_of(guidance):
    """The probe pass of a two-pass guidance, or None (any guidance object)."""
    return guidance.first_pass if isinstance(guidance, GuidanceBase) else getattr(guidance, "first_pass", None)


def check_trace_of(guidance, trace: dict) -> str | None:
    """``guidance.check_trace(trace)``, None for a guidance without the hook."""
    hook = guidance.check_trace if isinstance(guidance, GuidanceBase) else getattr(guidance, "check_trace", None)
    return hook(trace) if callable(hook) else None


def has_trace_check(guidance) -> bool:
    """Whether ``guidance`` checks its trace (the divergence report then hands the trace over)."""
    if isinstance(guidance, GuidanceBase):
        return type(guidance).check_trace is not GuidanceBase.check_trace
    return callable(getattr(guidance, "check_trace", None))


def describe_strengths(guidance) -> str:
    """``Name(scale=.., c3=.., base Name(scale=..))``: the guidance's ``strengths`` (a default for
    other objects: their numeric ``scale`` / ``early_scale``), the wrapped guidance's nested."""
    values = guidance.strengths() if isinstance(guidance, GuidanceBase) else GuidanceBase.strengths(guidance)
    parts = [f"{k}={v:g}" for k, v in values.items() if k != "base"]
    base = values.get("base")
    if base is not None and base is not guidance:
        parts.append("base " + describe_strengths(base))
    return f"{type(guidance).__name__}({', '.join(parts)})"


class Guidance(Protocol):
    """What ``sample`` needs of a guidance (see the module docstring): a hashable config with
    ``init(x_T [B, *S]) -> state`` and ``apply(state, ctx) -> (eps_hat [B, *S], state, trace)``,
    ``trace`` a dict of [B] arrays. A guidance AMG can wrap also has ``combine(state, ctx, eps_u,
    eps_c)`` (``apply`` without the denoiser call) and a ``"scale"`` trace entry."""

    def init(self, x: Array) -> Any: ...

    def apply(self, state: Any, ctx: StepContext) -> tuple[Array, Any, dict]: ...


def concat_conds(a: Any, b: Any) -> Any:
    """Concatenate two condition pytrees along the batch axis."""
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def eps_uncond_cond(ctx: StepContext) -> tuple[Array, Array]:
    """(eps_u, eps_c), each [B, *S], from ONE batched denoiser call (as diffusers does)."""
    b = ctx.x_t.shape[0]
    eps = ctx.eps(jnp.concatenate([ctx.x_t, ctx.x_t], axis=0), concat_conds(ctx.null_cond, ctx.cond))
    return eps[:b], eps[b:]


def per_sample_norm(x: Array) -> Array:
    """L2 norm of each sample: [B, ...] -> [B]."""
    return jnp.sqrt(jnp.sum(jnp.square(x.reshape(x.shape[0], -1)), axis=-1))


def x0_from_eps(x_t: Array, eps: Array, alpha_bar: Array) -> Array:
    """x0_hat = (x_t - sqrt(1 - ab) eps) / sqrt(ab): x_t, eps [B, *S], alpha_bar [] -> [B, *S]."""
    return (x_t - jnp.sqrt(1.0 - alpha_bar) * eps) / jnp.sqrt(alpha_bar)
