"""Classifier-free guidance and the attraction-basin methods (Jain et al., CVPR 2025).

Every guidance here is ``eps_hat = eps_u + w * (eps_c - eps_u)`` with a per-sample,
per-step scale ``w``; they differ only in how ``w`` is chosen:

- ``Unguided``:          w = 1 (the plain conditional model; one forward pass).
- ``CFG``:               w = scale.
- ``StaticTransition``:  w = early_scale while t > t_switch, then scale (delayed CFG, STP).
- ``OppositeGuidance``:  STP with a negative early scale (-2 before t = 650).
- ``DynamicTransition``: w = early_scale (1) until the first strict local minimum of
                         d_j = ||eps_u - eps_c|| is seen, then scale (DTP).
- ``OppositeDynamic``:   OG+DTP, two passes: a probe pass with w = early_scale at every step
                         records c_j = 1 - cos(x_{j+1}, x_j); the transition is the first
                         strict local minimum of c (the second if the first is at index 1,
                         ``default_step`` if none); the real pass uses early_scale before it
                         and scale from it on.

Each is a frozen dataclass (hashable config; fields carry the papers' defaults), with
``init(x_T) -> state`` and ``apply(state, ctx) -> (eps_hat, state, trace)``; ``apply`` is
one batched (eps_u, eps_c) call followed by ``combine(state, ctx, eps_u, eps_c)``, which a
wrapping guidance (AMG) calls with the predictions it already has. Traces
hold per-sample [B] values: ``scale`` (the w used) and ``d`` (||eps_u - eps_c||).
"""
from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp

from amg_jax.guidance.base import GuidanceBase, ProbeResult, StepContext, eps_uncond_cond, per_sample_norm

Array = jax.Array


def guidance_config(cls):
    """Decorator: a frozen dataclass of config fields, registered as a leaf-less pytree (the
    object itself is static), so it can be a field of a guidance that holds arrays (AMG)."""
    return jax.tree_util.register_static(dataclasses.dataclass(frozen=True)(cls))


def guided(eps_u: Array, eps_c: Array, w: Array) -> Array:
    """eps_u + w * (eps_c - eps_u) with a per-sample scale w [B] (or a scalar)."""
    w = jnp.asarray(w, eps_u.dtype)
    w = w.reshape(w.shape + (1,) * (eps_u.ndim - w.ndim))
    return eps_u + w * (eps_c - eps_u)


def _cfg_trace(w: Array, eps_u: Array, eps_c: Array) -> dict:
    b = eps_u.shape[0]
    return {"scale": jnp.broadcast_to(jnp.asarray(w, jnp.float32), (b,)),
            "d": per_sample_norm(eps_u - eps_c)}


@guidance_config
class Unguided(GuidanceBase):
    """eps_hat = eps(x_t, t, y): the conditional (or unconditional) model, one forward pass."""

    def init(self, x: Array) -> tuple:
        return ()

    def apply(self, state: tuple, ctx: StepContext) -> tuple[Array, tuple, dict]:
        eps = ctx.eps(ctx.x_t, ctx.cond)
        return eps, state, {"scale": jnp.ones((ctx.x_t.shape[0],), jnp.float32)}

    def combine(self, state: tuple, ctx: StepContext, eps_u: Array, eps_c: Array) -> tuple[Array, tuple, dict]:
        return eps_c, state, _cfg_trace(1.0, eps_u, eps_c)


@guidance_config
class CFG(GuidanceBase):
    """Classifier-free guidance, eps_u + scale * (eps_c - eps_u), in one batched call."""

    scale: float = 7.5

    def init(self, x: Array) -> tuple:
        return ()

    def apply(self, state: tuple, ctx: StepContext) -> tuple[Array, tuple, dict]:
        return self.combine(state, ctx, *eps_uncond_cond(ctx))

    def combine(self, state: tuple, ctx: StepContext, eps_u: Array, eps_c: Array) -> tuple[Array, tuple, dict]:
        return guided(eps_u, eps_c, self.scale), state, _cfg_trace(self.scale, eps_u, eps_c)


@guidance_config
class StaticTransition(GuidanceBase):
    """Delayed CFG with a static transition point (STP): early_scale while t > t_switch, then scale.

    Reference setting (Jain et al.): early_scale 0 (or 1) before t = 500, 7.5 after.
    """

    scale: float = 7.5
    early_scale: float = 0.0
    t_switch: int = 500

    def init(self, x: Array) -> tuple:
        return ()

    def apply(self, state: tuple, ctx: StepContext) -> tuple[Array, tuple, dict]:
        return self.combine(state, ctx, *eps_uncond_cond(ctx))

    def combine(self, state: tuple, ctx: StepContext, eps_u: Array, eps_c: Array) -> tuple[Array, tuple, dict]:
        w = jnp.where(ctx.t > self.t_switch, self.early_scale, self.scale)
        return guided(eps_u, eps_c, w), state, _cfg_trace(w, eps_u, eps_c)


@guidance_config
class OppositeGuidance(StaticTransition):
    """Opposite guidance (OG): a negative scale while t > t_switch pushes out of the basin, then scale.

    Reference setting: -2 before t = 650, 7.5 after.
    """

    scale: float = 7.5
    early_scale: float = -2.0
    t_switch: int = 650


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DynamicState:
    """Per-sample state of the dynamic transition point.

    d_prev, d_prev2: [B] d_{j-1}, d_{j-2} (-1 before they exist, as the reference code does).
    switched:        [B] bool, the transition has been found.
    transition:      [B] int32 step index at which `scale` started (-1 while not switched).
    """

    d_prev: Array
    d_prev2: Array
    switched: Array
    transition: Array


@guidance_config
class DynamicTransition(GuidanceBase):
    """Delayed CFG with the dynamic transition point (DTP).

    d_j = ||eps_u - eps_c|| per sample; at the first step j with d_j > d_{j-1} and
    d_{j-2} > d_{j-1} (step j-1 is the first strict local minimum) the sample switches from
    early_scale (1 = plain conditional) to scale, for step j and every later step.
    ``fallback_step`` (None = never) forces the switch at that step index if no minimum
    has been seen by then.
    """

    scale: float = 7.5
    early_scale: float = 1.0
    fallback_step: int | None = None

    def init(self, x: Array) -> DynamicState:
        batch = x.shape[0]
        return DynamicState(d_prev=-jnp.ones((batch,), jnp.float32),
                            d_prev2=-jnp.ones((batch,), jnp.float32),
                            switched=jnp.zeros((batch,), bool),
                            transition=-jnp.ones((batch,), jnp.int32))

    def apply(self, state: DynamicState, ctx: StepContext) -> tuple[Array, DynamicState, dict]:
        return self.combine(state, ctx, *eps_uncond_cond(ctx))

    def combine(self, state: DynamicState, ctx: StepContext, eps_u: Array,
                eps_c: Array) -> tuple[Array, DynamicState, dict]:
        d = per_sample_norm(eps_u - eps_c)
        found = is_local_min_end(state.d_prev2, state.d_prev, d)
        if self.fallback_step is not None:
            found = found | (ctx.step >= self.fallback_step)
        newly = found & ~state.switched
        switched = state.switched | found
        transition = jnp.where(newly, ctx.step.astype(jnp.int32), state.transition)
        w = jnp.where(switched, self.scale, self.early_scale)
        new_state = DynamicState(d_prev=d, d_prev2=state.d_prev, switched=switched, transition=transition)
        trace = {"scale": w.astype(jnp.float32), "d": d, "transition": transition}
        return guided(eps_u, eps_c, w), new_state, trace


def is_local_min_end(a: Array, b: Array, c: Array) -> Array:
    """True where b is a strict local minimum of the sequence (a, b, c): c > b and a > b.
    a, b, c: [B] (d_{j-2}, d_{j-1}, d_j per sample) -> [B] bool."""
    return (c > b) & (a > b)


def first_strict_local_min(values: Array, *, skip_index: int = -1, default: int = -1) -> Array:
    """Index of the first strict interior local minimum of each row of ``values`` [B, N].

    A minimum at ``skip_index`` is passed over in favour of the next one when there is one
    (the OG+DTP rule: "the second if the first is at index 1"). Returns [B] int32, ``default``
    where a row has no minimum. Non-finite entries never count as minima or neighbours.
    """
    v = jnp.asarray(values)
    n = v.shape[-1]
    if n < 3:                      # no interior point: no minimum (and no empty reduction)
        return jnp.full(v.shape[:-1], default, jnp.int32)
    inner = (v[:, 1:-1] < v[:, :-2]) & (v[:, 1:-1] < v[:, 2:])
    inner = inner & jnp.isfinite(v[:, 1:-1]) & jnp.isfinite(v[:, :-2]) & jnp.isfinite(v[:, 2:])
    idx = jnp.arange(1, n - 1)
    big = jnp.int32(n + 1)
    cand = jnp.where(inner, idx, big)
    first = jnp.min(cand, axis=-1)
    second = jnp.min(jnp.where(cand > first[:, None], cand, big), axis=-1)
    pick = jnp.where((first == skip_index) & (second < big), second, first)
    return jnp.where(pick < big, pick, default).astype(jnp.int32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ProbeState:
    """x_prev: [B, *S] the sample seen at the previous step (for 1 - cos(x_{j+1}, x_j))."""

    x_prev: Array


def _cosine_distance(a: Array, b: Array) -> Array:
    """1 - cos(a, b) per sample, as ||a/|a| - b/|b|||^2 / 2: accurate for nearly parallel
    vectors (the early steps, where 1 - cos ~ 1e-6 and the naive form is float32 noise)."""
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    tiny = jnp.asarray(1e-30, a.dtype)
    an = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), tiny)
    bn = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), tiny)
    return 0.5 * jnp.sum(jnp.square(an - bn), axis=-1)


@guidance_config
class OppositeProbe(GuidanceBase):
    """First pass of OG+DTP: opposite guidance (w = early_scale) at every step.

    The trace entry ``cos_dist`` at step s is c_{s-1} = 1 - cos(x_s, x_{s-1}) (NaN at step 0):
    the curve the transition is read from.
    """

    early_scale: float = -7.5

    def init(self, x: Array) -> ProbeState:
        return ProbeState(x_prev=jnp.full_like(x, jnp.nan))

    def apply(self, state: ProbeState, ctx: StepContext) -> tuple[Array, ProbeState, dict]:
        return self.combine(state, ctx, *eps_uncond_cond(ctx))

    def combine(self, state: ProbeState, ctx: StepContext, eps_u: Array,
                eps_c: Array) -> tuple[Array, ProbeState, dict]:
        c = _cosine_distance(ctx.x_t, state.x_prev)
        trace = _cfg_trace(self.early_scale, eps_u, eps_c)
        trace["cos_dist"] = c.astype(jnp.float32)
        return guided(eps_u, eps_c, self.early_scale), ProbeState(x_prev=ctx.x_t), trace


def probe_curve(probe: ProbeResult) -> Array:
    """The OG+DTP curve c_j = 1 - cos(x_{j+1}, x_j), j = 0 .. N-1, of a probe pass: [B, N].

    The probe's trace holds c_{s-1} at step s (column 0 is NaN: no x_{-1}); the last value
    c_{N-1} = 1 - cos(x_N, x_{N-1}) compares its final sample with the one its last step saw
    (``probe.state.x_prev``), so a minimum at j = N-2 can be found, as in the reference code.
    """
    last = _cosine_distance(probe.x0, probe.state.x_prev).astype(jnp.float32)
    return jnp.concatenate([probe.trace["cos_dist"][:, 1:], last[:, None]], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SwitchState:
    """transition: [B] int32 step index from which `scale` is used."""

    transition: Array


@guidance_config
class OppositeDynamic(GuidanceBase):
    """OG+DTP (two passes): opposite guidance until a transition read from a probe pass, then scale.

    The probe pass runs ``early_scale`` (default -scale, as the reference code does) at every
    step and records c_j = 1 - cos(x_{j+1}, x_j). The transition is the first strict local
    minimum of c (the second when the first is at ``skip_index`` = 1), ``default_step`` (5)
    when there is none. The real pass uses early_scale for steps < transition and scale after.
    """

    scale: float = 7.5
    early_scale: float = -7.5
    default_step: int = 5
    skip_index: int = 1

    @property
    def first_pass(self) -> OppositeProbe:
        return OppositeProbe(early_scale=self.early_scale)

    def init(self, x: Array) -> SwitchState:
        return SwitchState(transition=jnp.full((x.shape[0],), self.default_step, jnp.int32))

    def after_first_pass(self, state: SwitchState, probe: ProbeResult) -> SwitchState:
        """The transition from the probe's curve ``probe_curve(probe)`` [B, N]."""
        return SwitchState(transition=first_strict_local_min(
            probe_curve(probe), skip_index=self.skip_index, default=self.default_step))

    def apply(self, state: SwitchState, ctx: StepContext) -> tuple[Array, SwitchState, dict]:
        return self.combine(state, ctx, *eps_uncond_cond(ctx))

    def combine(self, state: SwitchState, ctx: StepContext, eps_u: Array,
                eps_c: Array) -> tuple[Array, SwitchState, dict]:
        w = jnp.where(ctx.step >= state.transition, self.scale, self.early_scale)
        trace = _cfg_trace(w, eps_u, eps_c)
        trace["transition"] = state.transition
        return guided(eps_u, eps_c, w), state, trace
