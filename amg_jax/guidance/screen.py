"""Training-data-free memorization screens: cheap per-sample scores from CFG's own two calls.

A screen is a frozen (hashable) dataclass with::

    init(x_T [B, *S]) -> ScreenState
    __call__(state, ctx, eps_u [B, *S], eps_c [B, *S]) -> (score [B] float32, state)

``score`` is "higher = more likely memorized", like a detector's sigma. ``screened`` turns it
into a *latched* flag: a sample is flagged from the first step its score passes the threshold
on (a prompt-level decision: "watch this one with the bank from now on"), so the score a
threshold is calibrated on is the sample's largest score over the run (``ScreenState.peak``).

- ``NoiseMagnitude(window=k)`` (Wen et al., ICLR 2024): ``m_t = ||eps_c(x_t) - eps_u(x_t)||``,
  the L2 norm of the text-conditional noise (DTP's ``d``). ``window = 0``: the score at step t is
  ``m_t`` itself (per step); ``window = k``: the mean of ``m`` over the first ``k`` steps (held
  after step k - 1; Wen et al. average the first steps). A memorized prompt pulls hard toward
  one image from the first step on: the conditional and unconditional predictions differ much
  more than for an ordinary prompt.
- ``Anisotropy(gamma, t_probe)`` (Asthana & Belagiannis, ICLR 2026): on the pure noise x_T, the
  norm ``m_0`` plus ``gamma`` times the alignment ``cos(eps_u, eps_c - eps_u)`` of the guidance
  direction with the unconditional prediction at a *low-noise* timestep ``t_probe`` (their
  code: the third-lowest timestep of a 50-step grid, ~40 of 1000). At low noise the
  log-density is anisotropic and the norm alone misleads; memorized prompts align the two
  vectors. It costs one extra (u, c) pair of rows at step 0, then it is held. The cosine is
  taken over the whole sample (the paper takes it over SD's 4 latent channels per pixel and
  averages; over the whole sample it also serves 1- and 3-channel pixel models).

``SCREENS`` names the defaults (``get_screen(name, **fields)``); a new one is one
``register_screen``. ``ScreenedGuidance`` gates a basin method's switch with a screen (the
bank-free mode: a sample not flagged keeps plain CFG).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.checks import unknown_fields
from amg_jax.guidance.base import GuidanceBase, StepContext, concat_conds, eps_uncond_cond, per_sample_norm

Array = jax.Array


class ScreenState(NamedTuple):
    """A screen's carried state, each [B]: ``total`` its running sum (or held score), ``peak`` the
    largest score so far (what a latched flag compares), ``flagged`` the latched flag."""

    total: Array
    peak: Array
    flagged: Array


def _zeros(x: Array) -> ScreenState:
    b = x.shape[0]
    return ScreenState(jnp.zeros((b,), jnp.float32), jnp.full((b,), -jnp.inf, jnp.float32), jnp.zeros((b,), bool))


def _is_count(v, lo: int) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, np.integer)) and v >= lo


@dataclasses.dataclass(frozen=True)
class NoiseMagnitude:
    """``||eps_c - eps_u||`` per step (``window=0``) or its mean over the first ``window`` steps."""

    window: int = 5

    def __post_init__(self):
        if not _is_count(self.window, 0):
            raise ValueError(f"NoiseMagnitude.window must be an integer >= 0, got {self.window!r}")

    def init(self, x: Array) -> ScreenState:
        return _zeros(x)

    def __call__(self, state: ScreenState, ctx: StepContext, eps_u: Array, eps_c: Array):
        m = per_sample_norm((eps_c - eps_u).astype(jnp.float32))
        if self.window == 0:
            return m, state
        k = self.window
        total = jnp.where(ctx.step < k, state.total + m, state.total)
        seen = jnp.minimum(ctx.step + 1, k).astype(jnp.float32)
        return total / seen, state._replace(total=total)


@dataclasses.dataclass(frozen=True)
class Anisotropy:
    """``m_0 + gamma * cos(eps_u, eps_c - eps_u)`` on x_T, the cosine at timestep ``t_probe``."""

    gamma: float = 1.0
    t_probe: int = 40

    def __post_init__(self):
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or not np.isfinite(self.gamma):
            raise ValueError(f"Anisotropy.gamma must be a finite number, got {self.gamma!r}")
        if not _is_count(self.t_probe, 0):
            raise ValueError(f"Anisotropy.t_probe must be an integer timestep >= 0, got {self.t_probe!r}")

    def init(self, x: Array) -> ScreenState:
        return _zeros(x)

    def alignment(self, ctx: StepContext) -> Array:
        """cos(eps_u, eps_c - eps_u) [B] at ``t_probe`` on ``ctx.x_t`` (one batched call)."""
        if ctx.eps_at is None:
            raise ValueError("the anisotropy screen needs the denoiser at another timestep (StepContext.eps_at); "
                             "this caller passes none")
        b = ctx.x_t.shape[0]
        eps = ctx.eps_at(jnp.concatenate([ctx.x_t, ctx.x_t], axis=0), concat_conds(ctx.null_cond, ctx.cond),
                         self.t_probe).astype(jnp.float32)
        u, g = eps[:b].reshape(b, -1), (eps[b:] - eps[:b]).reshape(b, -1)
        den = jnp.maximum(jnp.linalg.norm(u, axis=-1) * jnp.linalg.norm(g, axis=-1), 1e-30)
        return jnp.sum(u * g, axis=-1) / den

    def __call__(self, state: ScreenState, ctx: StepContext, eps_u: Array, eps_c: Array):
        def first(_):
            m = per_sample_norm((eps_c - eps_u).astype(jnp.float32))
            return m + jnp.float32(self.gamma) * self.alignment(ctx)
        score = jax.lax.cond(ctx.step == 0, first, lambda _: state.total, None)
        return score, state._replace(total=score)


def screened(screen, threshold: float, state: ScreenState, ctx: StepContext, eps_u: Array, eps_c: Array):
    """(score [B], flagged [B] bool, state): ``screen``'s score at this step and the latched flag
    (flagged from the first step ``score > threshold`` on)."""
    score, state = screen(state, ctx, eps_u, eps_c)
    score = score.astype(jnp.float32)
    peak = jnp.maximum(state.peak, score)
    flagged = state.flagged | (score > threshold)
    return score, flagged, state._replace(peak=peak, flagged=flagged)


# ----------------------------------------------------------------------------- registry

_SCREENS: dict[str, Callable] = {}


def register_screen(name: str, build: Callable) -> None:
    """Register ``build(**fields) -> screen`` as screen ``name``."""
    if name in _SCREENS:
        raise ValueError(f"screen {name!r} is registered already")
    _SCREENS[name] = build


register_screen("noise_magnitude", lambda **f: NoiseMagnitude(**{"window": 5, **f}))
register_screen("noise_magnitude_step", lambda **f: NoiseMagnitude(**{"window": 0, **f}))
register_screen("noise_magnitude_first", lambda **f: NoiseMagnitude(**{"window": 1, **f}))
register_screen("anisotropy", lambda **f: Anisotropy(**f))
SCREENS = tuple(_SCREENS)


def get_screen(name: str, **fields):
    """The screen ``name`` (``SCREENS``) with ``fields`` over its defaults; ValueError naming an
    unknown screen or field."""
    if name not in _SCREENS:
        raise ValueError(f"unknown screen {name!r}; choose one of {list(SCREENS)}")
    cls = Anisotropy if name == "anisotropy" else NoiseMagnitude
    unknown, known = unknown_fields(cls, fields)
    if unknown:
        raise ValueError(f"screen {name!r} has no setting {unknown[0]!r}; its settings are {known}")
    return _SCREENS[name](**fields)


# ----------------------------------------------------------------------------- bank-free gating

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ScreenedState:
    inner: Any
    otherwise: Any
    screen: ScreenState


@dataclasses.dataclass(frozen=True)
class ScreenedGuidance(GuidanceBase):
    """``inner`` (a basin method: STP, DTP, OG) on the samples ``screen`` flags, ``otherwise`` (plain
    CFG) on the rest: a user without the training images pays the basin method's quality cost on
    suspicious prompts only. Both combine the same (eps_u, eps_c) pair: no extra denoiser call.
    Trace: ``inner``'s entries where flagged, ``otherwise``'s elsewhere, plus ``screen`` / ``flagged``."""

    inner: Any
    otherwise: Any
    screen: Any
    threshold: float

    def init(self, x: Array) -> ScreenedState:
        return ScreenedState(self.inner.init(x), self.otherwise.init(x), self.screen.init(x))

    def combine(self, state: ScreenedState, ctx: StepContext, eps_u: Array, eps_c: Array):
        a, s_in, tr_in = self.inner.combine(state.inner, ctx, eps_u, eps_c)
        b, s_ot, tr_ot = self.otherwise.combine(state.otherwise, ctx, eps_u, eps_c)
        score, flagged, s_scr = screened(self.screen, self.threshold, state.screen, ctx, eps_u, eps_c)
        shp = (-1,) + (1,) * (a.ndim - 1)
        eps_hat = jnp.where(flagged.reshape(shp), a, b)
        trace = {k: jnp.where(flagged, v, tr_ot[k]) if k in tr_ot else v for k, v in tr_in.items()}
        trace.update(screen=score, flagged=flagged)
        return eps_hat, ScreenedState(s_in, s_ot, s_scr), trace

    def apply(self, state: ScreenedState, ctx: StepContext):
        return self.combine(state, ctx, *eps_uncond_cond(ctx))

    def strengths(self) -> dict:
        return {"base": self.inner}


jax.tree_util.register_dataclass(ScreenedGuidance, data_fields=[], meta_fields=["inner", "otherwise", "screen",
                                                                                "threshold"])


__all__ = ["Anisotropy", "NoiseMagnitude", "SCREENS", "ScreenState", "ScreenedGuidance", "get_screen",
           "register_screen", "screened"]
