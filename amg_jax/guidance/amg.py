"""Anti-Memorization Guidance (Chen, Liu & Xu, CVPR 2024) as a guidance that wraps another.

At every step, with ``eps_hat`` from the base guidance (CFG, delayed CFG, OG, ...)::

    x0_hat = (x_t - sqrt(1 - ab) eps_hat) / sqrt(ab)
    sigma, n0, y_N = detector(x0_hat)                   # higher sigma = more memorized
    gate   = sigma > lambda_t                            # parabolic / constant / always
    s1     = clip(c1 * score(sigma), 0, w - 1)            # w: the base's current scale
    G_spe  = -s1 (eps(x_t, y) - eps_u)                   # despecification
    s2     = clip(c2 * score(sigma), 0, w - s1 - 1)
    G_dup  = -s2 (eps(x_t, y_N) - eps_u)                 # caption deduplication
    G_sim  = c3' sqrt(1 - ab) grad_{x_t} sigma           # dissimilarity
    eps_hat <- eps_hat + gate * (G_spe + G_dup + G_sim)

- ``score`` maps sigma to a non-negative score for ``G_spe``/``G_dup`` (METHODS.md: with
  ``sigma = -nL2 < 0`` the clipped scales would always be 0): ``"normalized"`` =
  ``(sigma - lo) / (hi - lo)`` over the detector's ``sigma_range`` (in [0, 1]),
  ``"identity"`` = sigma (SSCD / CLIP cosines, the paper's form); ``"auto"`` picks
  identity for ranges inside [-1, 1], normalized otherwise.
- ``c3' = c3 * detector.scale ** 2`` with ``c3_units="data"`` (default; pitfall 4: the
  push ``G_sim`` needs grows with the square of the bank's k-NN distance, so one value
  serves any resolution), ``c3' = c3`` with ``"raw"`` (the paper's SSCD setting).
- ``gradient="full"`` (default): ``grad_{x_t} sigma`` through the base guidance and the
  denoiser (one more forward and a backward pass, on gate-open steps only); ``"cheap"``:
  ``grad_{x0_hat} sigma / sqrt(ab)`` with eps_hat held fixed. The default is measured
  (METHODS.md pitfall 5; ``experiments/amg_partial.py``): on the partial memorizer the full
  gradient runs through the model's pull toward the copy and frees samples, the cheap one
  pushes radially into noise the copy re-absorbs (see README, "AMG on the testbed"). On a
  *perfect* memorizer (``x0_hat`` locally constant) only the cheap one moves samples.
- Pitfall 6: where the gradient vanishes (an exact copy) the ``fallback`` direction
  ``x_t / sqrt(ab) - x0_hat`` (the noisy sample's side) is used.
- ``max_shift`` (None = off): cap, per sample and step, on how far ``G_sim`` moves
  ``x0_hat`` (``sqrt((1 - ab) / ab) |G_sim|``), in units of ``detector.scale``. A
  constant ``c3`` moves ``x0_hat`` by ``~c3 (1 - ab) / ab |grad|``, huge when the gate opens
  early; the cap bounds that. Measured on the partial memorizer it trades escapes for
  quality (freeing a copy takes a few large steps), so it is off by default.
- **Batch-level gate**: ``G_dup``'s extra denoiser call and the gradient sit in one
  ``lax.cond`` on "any sample in the batch has its gate open"; when none has, they are not
  computed. (Under ``vmap`` a ``cond`` runs both branches: batch, do not vmap, AMG.)
  ``open_batch = m`` (default None = off): when 1..m samples are open, only those are
  gathered into a batch of m for ``G_dup`` and the gradient (a third branch, more to
  compile); more than m open runs the whole batch. Samples are independent, so the result
  is the same; a realistic mix (a few samples open at a time) pays for m, not B.
- ``detect_every = k`` (default 1, the paper's every step): the detector runs on steps
  0, k, 2k, ... and its detection (sigma, neighbour) is held in between; the gate is still
  compared with each step's ``lambda_t``, and ``G_sim``'s gradient, on open steps, still runs
  through the detector. Where one detection costs a large share of a step (SSCD through SD's
  VAE decoder: 1.6x the FLOPs of a CFG UNet call at 512 px) it divides the gate-closed
  overhead by k. Trace ``detected`` [B] marks the steps that ran it.
- For unconditional and class-conditional models use ``despecify=False, dedup=False``
  (the paper uses dissimilarity alone there).
- **Screen** (``screen=`` a ``guidance.screen`` screen, ``screen_threshold``): a training-data-free
  score from the step's own (eps_u, eps_c) pair flags samples (latched); the bank detector runs on
  the flagged ones only and the others keep their gate closed. With ``screen_batch = m`` 1..m
  flagged samples are gathered into a batch of m (as ``open_batch``; same values), more run the
  whole batch masked; a step with none flagged runs no detector, so it costs a CFG step.
  Without a bank (``detector=None``) the screen alone is the gate: ``G_spe`` at
  ``s1 = min(c1, w - 1)`` on flagged samples (``G_dup`` and ``G_sim`` need the bank). Trace
  ``screen`` (the score) and ``flagged`` [B].

Trace (each [B] per step): the base's entries (``scale``, ``d``, ...) plus ``sigma``,
``lambda``, ``gate``, ``s1``, ``s2``, ``index`` / ``label`` (the neighbour), ``grad_norm``,
``fallback`` and ``nonfinite`` (bit mask of the terms that were NaN/inf: 1 base eps_hat,
2 G_spe, 4 G_dup, 8 G_sim; ``check_trace`` turns it into a message naming term and step).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.guidance.base import GuidanceBase, StepContext, eps_uncond_cond, first_pass_of, per_sample_norm, x0_from_eps
from amg_jax.checks import unknown_fields
from amg_jax.guidance.screen import screened

Array = jax.Array

THRESHOLDS = ("parabolic", "constant", "always")
GRADIENTS = ("cheap", "full")
SCORES = ("auto", "identity", "normalized")
C3_UNITS = ("data", "raw")
TERMS = ("base eps_hat", "G_spe", "G_dup", "G_sim")
TERM_SETTINGS = ("the guidance scale (or c3 of the steps before)", "c1", "c2", "c3")    # what to lower on NaN/inf


@dataclasses.dataclass(frozen=True)
class AMGConfig:
    """AMG's settings (hashable). ``lambda_min`` / ``lambda_max``: the gate thresholds early /
    at the end (parabolic: ``lambda_t = lambda_min + (lambda_max - lambda_min) * ab_t**2``;
    constant: ``lambda_max`` throughout); None = the detector's ``default_thresholds``.

    Defaults are the ones measured on the testbed's partial memorizer with the pixel nL2
    detector (full gradient, data-scaled ``c3 = 0.25``). The papers' SSCD setting is
    ``c3=100, c3_units="raw"``; a perfect memorizer needs ``gradient="cheap"`` and
    ``c3 ~ 1e4`` (METHODS.md pitfalls 4-5)."""

    c1: float = 4.0
    c2: float = 3.0
    c3: float = 0.25
    c3_units: str = "data"
    despecify: bool = True
    dedup: bool = True
    dissimilar: bool = True
    threshold: str = "parabolic"
    lambda_min: float | None = None
    lambda_max: float | None = None
    gradient: str = "full"
    score: str = "auto"
    fallback: bool = True
    fallback_tol: float = 1e-6
    max_shift: float | None = None
    detect_every: int = 1
    open_batch: int | None = None
    screen_threshold: float | None = None
    screen_batch: int | None = None

    def __post_init__(self):
        for field in ("open_batch", "screen_batch"):
            ob = getattr(self, field)
            if ob is not None and (isinstance(ob, bool) or not isinstance(ob, (int, np.integer)) or ob < 1):
                raise ValueError(f"AMGConfig.{field} must be an integer >= 1 or None, got {ob!r}")
        k = self.detect_every
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"AMGConfig.detect_every must be an integer >= 1, got {k!r}")
        for field, allowed in (("threshold", THRESHOLDS), ("gradient", GRADIENTS), ("score", SCORES),
                               ("c3_units", C3_UNITS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"AMGConfig.{field} must be one of {list(allowed)}, got {getattr(self, field)!r}")
        for field in ("c1", "c2", "c3", "fallback_tol"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v < 0:
                raise ValueError(f"AMGConfig.{field} must be a finite number >= 0, got {v!r}")
        m = self.max_shift
        if m is not None and (isinstance(m, bool) or not isinstance(m, (int, float)) or not np.isfinite(m) or m <= 0):
            raise ValueError(f"AMGConfig.max_shift must be a finite number > 0 or None, got {m!r}")
        for field in ("lambda_min", "lambda_max", "screen_threshold"):
            v = getattr(self, field)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
                raise ValueError(f"AMGConfig.{field} must be a finite number or None, got {v!r}")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AMGState:
    base: Any           # the base guidance's state
    held: Any = None    # detect_every > 1: the last Detection (sigma, index, label: [B] each), else None
    screen: Any = None  # the screen's ScreenState, None without a screen


@dataclasses.dataclass(frozen=True)
class AMG(GuidanceBase):
    """AMG around ``base`` with ``detector`` (see the module docstring). Build with ``make_amg``,
    which checks the thresholds against the detector's range.

    base:            a guidance with ``combine(state, ctx, eps_u, eps_c)`` (every guidance in
                     ``amg_jax.guidance.cfg``).
    detector:        ``x0_hat -> Detection(sigma, index, label)`` (``amg_jax.similarity``), a pytree.
    config:          ``AMGConfig``.
    neighbour_conds: optional pytree [C, ...]: the condition of each label (e.g. caption
                     embeddings); None = the label id itself is the condition (testbed models).
    screen:          optional ``guidance.screen`` screen in front of the detector (static).
    """

    base: Any
    detector: Any
    config: AMGConfig = AMGConfig()
    neighbour_conds: Any = None
    screen: Any = None

    # ---------------------------------------------------------------- two-pass bases (OG+DTP)
    @property
    def first_pass(self):
        return first_pass_of(self.base)

    def after_first_pass(self, state: AMGState, probe) -> AMGState:
        """The wrapped guidance's ``after_first_pass`` on the probe's ``ProbeResult``."""
        return dataclasses.replace(state, base=self.base.after_first_pass(state.base, probe))

    # ---------------------------------------------------------------- protocol
    def init(self, x: Array) -> AMGState:
        """x: [B, *S] (x_T). With ``detect_every > 1`` the state also holds the last detection
        (zeros until the first step detects)."""
        held = None
        if self.config.detect_every > 1 and self.detector is not None:
            shapes = jax.eval_shape(self.detector, x)
            held = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)
        return AMGState(base=self.base.init(x), held=held,
                        screen=None if self.screen is None else self.screen.init(x))

    def thresholds(self) -> tuple[float, float]:
        """(lambda_min, lambda_max), defaults from the detector."""
        c = self.config
        if self.detector is None:
            return None, None
        lo, hi = getattr(self.detector, "default_thresholds", (None, None))
        lo = c.lambda_min if c.lambda_min is not None else lo
        hi = c.lambda_max if c.lambda_max is not None else hi
        if c.threshold != "always" and (lo is None or hi is None):
            raise ValueError(f"AMG: the detector {type(self.detector).__name__} has no default thresholds; "
                             "set AMGConfig.lambda_min and lambda_max")
        return lo, hi

    def lambda_t(self, alpha_bar: Array) -> Array:
        """The gate threshold at alpha-bar ``alpha_bar`` ([] or [B])."""
        c = self.config
        if c.threshold == "always":
            return jnp.full_like(alpha_bar, -jnp.inf)
        lo, hi = self.thresholds()
        if c.threshold == "constant":
            return jnp.full_like(alpha_bar, hi)
        return lo + (hi - lo) * jnp.square(alpha_bar)

    def score(self, sigma: Array) -> Array:
        lo, hi = (float(v) for v in self.detector.sigma_range)
        mode = self.config.score
        if mode == "auto":
            mode = "identity" if (lo >= -1.0 and hi <= 1.0) else "normalized"
        if mode == "identity":
            return sigma
        return (sigma - lo) / (hi - lo)

    def _neighbour_cond(self, label: Array, null_cond: Any) -> Any:
        """The condition y_N of each neighbour (the null condition where it has no label)."""
        has = label >= 0
        if self.neighbour_conds is None:
            shapes = [tuple(n.shape) for n in jax.tree.leaves(null_cond)]
            if any(len(sh) != 1 for sh in shapes):
                raise ValueError(f"AMG: the denoiser's conditions are {jax.tree.structure(null_cond)} with shapes "
                                 f"{shapes}, not label ids [B]: pass make_amg(neighbour_conds=...) with each bank "
                                 "label's condition in that structure (y_N for G_dup), or set dedup=False")
            return jax.tree.map(lambda n: jnp.where(has, label.astype(n.dtype), n), null_cond)

        def pick(table, n):
            row = jnp.take(table, jnp.maximum(label, 0), axis=0)
            return jnp.where(has.reshape((-1,) + (1,) * (row.ndim - 1)), row, n)
        return jax.tree.map(pick, self.neighbour_conds, null_cond)

    def _eps_hat_fn(self, state: AMGState, ctx: StepContext):
        """x_t -> the base guidance's eps_hat at x_t (for the full gradient)."""
        def f(x):
            c = ctx._replace(x_t=x)
            return self.base.combine(state.base, c, *eps_uncond_cond(c))[0]
        return f

    def _grad_xt(self, state: AMGState, ctx: StepContext, x0_hat: Array) -> Array:
        """grad_{x_t} sigma [B, *S], cheap (eps_hat fixed) or full (through the denoiser)."""
        ab = ctx.alpha_bar
        sigma_sum = lambda x0: jnp.sum(self.detector(x0).sigma)   # noqa: E731  samples are independent
        if self.config.gradient == "cheap":
            return jax.grad(sigma_sum)(x0_hat) / jnp.sqrt(ab)
        eps_fn = self._eps_hat_fn(state, ctx)
        return jax.grad(lambda x: sigma_sum(x0_from_eps(x, eps_fn(x), ab)))(ctx.x_t)

    # ---------------------------------------------------------------- the step, in named parts
    def detect(self, state: AMGState, ctx: StepContext, x0_hat: Array, flagged: Array | None = None):
        """(Detection of ``x0_hat`` [B, *S] (sigma, index, label: [B] each), detected or None): every
        step, or with ``detect_every = k`` on every k-th step, holding the last detection in between;
        with a screen on the ``flagged`` [B] samples only (``screened_detection``)."""
        x0 = jax.lax.stop_gradient(x0_hat)
        run = (lambda _: self.detector(x0)) if flagged is None else (lambda _: self.screened_detection(x0, flagged))
        if self.config.detect_every > 1:
            detected = ctx.step % self.config.detect_every == 0
            return jax.lax.cond(detected, run, lambda _: state.held, None), detected
        return run(None), None

    def closed_detection(self, x0_hat: Array):
        """The Detection of a sample the bank is not searched for: sigma at the bottom of the
        detector's range (below every threshold), no neighbour (index / label -1)."""
        shapes = jax.eval_shape(self.detector, x0_hat)
        lo = float(self.detector.sigma_range[0])
        return type(shapes)(jnp.full(shapes.sigma.shape, lo, shapes.sigma.dtype),
                            jnp.full(shapes.index.shape, -1, shapes.index.dtype),
                            jnp.full(shapes.label.shape, -1, shapes.label.dtype))

    def screened_detection(self, x0_hat: Array, flagged: Array):
        """The detector on the ``flagged`` [B] samples of ``x0_hat`` [B, *S], ``closed_detection``
        elsewhere: none flagged runs no detector; 1..``screen_batch`` flagged are gathered into a
        batch of ``screen_batch`` (padded with the first); more run the whole batch."""
        m = self.config.screen_batch
        closed = self.closed_detection(x0_hat)

        def none(_):
            return closed

        def whole(_):
            det = self.detector(x0_hat)
            return jax.tree.map(lambda d, z: jnp.where(flagged, d, z), det, closed)

        def gathered(_):
            idx = _first_true(flagged, m)
            det = self.detector(x0_hat[idx])
            return jax.tree.map(lambda z, d: z.at[idx].set(d), closed, det)

        return _masked_switch(flagged, m, none, gathered, whole)

    def scales(self, sigma: Array, alpha_bar: Array, w: Array):
        """(gate, lambda_t, s1, s2), [B] each, from the similarity ``sigma`` [B] and the wrapped
        guidance's scale ``w`` [B]: the parabolic gate, and G_spe's / G_dup's scales capped so the
        effective guidance scale stays >= 1 (README pitfall 7)."""
        c = self.config
        b = sigma.shape[0]
        lam = self.lambda_t(alpha_bar)
        gate = sigma > lam if c.threshold != "always" else jnp.ones((b,), bool)
        score = self.score(sigma).astype(jnp.float32)
        zeros_b = jnp.zeros((b,), jnp.float32)
        s1 = jnp.clip(c.c1 * score, 0.0, jnp.maximum(w - 1.0, 0.0)) if c.despecify else zeros_b
        s2 = jnp.clip(c.c2 * score, 0.0, jnp.maximum(w - s1 - 1.0, 0.0)) if c.dedup else zeros_b
        return gate, lam, s1, s2

    def open_terms(self, state: AMGState, ctx: StepContext, label: Array, s2: Array, x0_hat: Array,
                   eps_base: Array, eps_u: Array):
        """(G_dup, G_sim [n, *S], |grad sigma| [n], fallback [n]) for the n samples of ``ctx`` (all B,
        or a compacted few): the y_N pass and the dissimilarity gradient, the expensive part."""
        c = self.config
        ab = ctx.alpha_bar
        n = ctx.x_t.shape[0]
        shp = (n,) + (1,) * (ctx.x_t.ndim - 1)
        c3 = c.c3 * (float(self.detector.scale) ** 2 if c.c3_units == "data" else 1.0)
        ref_norm = 1.0 / (float(self.detector.scale) * jnp.sqrt(ab))   # |grad sigma| at unit scale
        g_dup = jnp.zeros_like(eps_base)
        if c.dedup:
            eps_n = ctx.eps(ctx.x_t, self._neighbour_cond(label, ctx.null_cond))
            g_dup = -s2.reshape(shp) * (eps_n - eps_u)
        g_sim, gnorm, fb = jnp.zeros_like(eps_base), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), bool)
        if c.dissimilar:
            g = self._grad_xt(state, ctx, x0_hat).astype(eps_base.dtype)
            gnorm = per_sample_norm(g)
            if c.fallback:
                fb = jnp.isfinite(gnorm) & (gnorm <= c.fallback_tol * ref_norm)   # NaN stays NaN
                u = eps_base / jnp.maximum(per_sample_norm(eps_base), 1e-30).reshape(shp)
                g = jnp.where(fb.reshape(shp), -u * ref_norm, g)
            g_sim = c3 * jnp.sqrt(1.0 - ab) * g
            if c.max_shift is not None:    # x0_hat moves by sqrt((1 - ab) / ab) |G_sim|
                shift = jnp.sqrt((1.0 - ab) / ab) * per_sample_norm(g_sim)
                cap = c.max_shift * float(self.detector.scale)
                g_sim = g_sim * jnp.minimum(1.0, cap / jnp.maximum(shift, 1e-30)).reshape(shp)
        return g_dup, g_sim, gnorm, fb

    def gated_open_terms(self, state: AMGState, ctx: StepContext, gate: Array, label: Array, s2: Array,
                         x0_hat: Array, eps_base: Array, eps_u: Array):
        """``open_terms`` under the batch-level gate: skipped (zeros) when no sample's gate is open,
        run on the open samples alone when at most ``open_batch`` are (same values), else on all."""
        c = self.config
        b = ctx.x_t.shape[0]

        def whole_batch(_):
            return self.open_terms(state, ctx, label, s2, x0_hat, eps_base, eps_u)

        def compacted(_):
            # the first open_batch open samples (padded with the first one), computed as a small batch
            idx = _first_true(gate, c.open_batch)
            take = functools.partial(jax.tree.map, lambda a: a[idx] if getattr(a, "ndim", 0) >= 1
                                     and a.shape[0] == b else a)
            sub = ctx._replace(x_t=ctx.x_t[idx], cond=take(ctx.cond), null_cond=take(ctx.null_cond),
                               key=take(ctx.key))
            outs = self.open_terms(take(state), sub, label[idx], s2[idx], x0_hat[idx], eps_base[idx], eps_u[idx])
            return tuple(jnp.zeros((b,) + o.shape[1:], o.dtype).at[idx].set(o) for o in outs)

        def closed(_):
            z = jnp.zeros_like(eps_base)
            return z, z, jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool)

        if not (c.dedup or c.dissimilar):
            return closed(None)
        return _masked_switch(gate, c.open_batch, closed, compacted, whole_batch)

    def apply(self, state: AMGState, ctx: StepContext) -> tuple[Array, AMGState, dict]:
        """One step: the base guidance's eps_hat, then detect -> scales -> the open terms, added
        where the gate is open; the trace records every quantity per sample."""
        c = self.config
        b = ctx.x_t.shape[0]
        bshape = (b,) + (1,) * (ctx.x_t.ndim - 1)
        eps_u, eps_c = eps_uncond_cond(ctx)
        eps_base, base_state, trace = self.base.combine(state.base, ctx, eps_u, eps_c)
        w = trace.get("scale", jnp.ones((b,), jnp.float32)).astype(jnp.float32)
        flagged, screen_state = None, None
        if self.screen is not None:
            score, flagged, screen_state = screened(self.screen, c.screen_threshold, state.screen, ctx, eps_u, eps_c)
            trace = dict(trace, screen=score, flagged=flagged)
        if self.detector is None:       # the screen alone gates G_spe
            s1 = jnp.where(flagged, jnp.clip(jnp.float32(c.c1), 0.0, jnp.maximum(w - 1.0, 0.0)), 0.0)
            if not c.despecify:
                s1 = jnp.zeros_like(s1)
            g_spe = -s1.reshape(bshape) * (eps_c - eps_u)
            eps_hat = eps_base + jnp.where(flagged.reshape(bshape), g_spe, 0.0)
            zero = jnp.zeros((b,), jnp.float32)
            trace = dict(trace, gate=flagged, s1=s1, s2=zero,
                         nonfinite=_nonfinite_bits(flagged, eps_base, g_spe, zero, zero))
            return eps_hat, AMGState(base=base_state, screen=screen_state), trace
        x0_hat = x0_from_eps(ctx.x_t, eps_base, ctx.alpha_bar)
        det, detected = self.detect(state, ctx, x0_hat, flagged)
        gate, lam, s1, s2 = self.scales(det.sigma, ctx.alpha_bar, w)
        if flagged is not None:
            gate = gate & flagged
        g_spe = -s1.reshape(bshape) * (eps_c - eps_u)
        g_dup, g_sim, gnorm, fb = self.gated_open_terms(state, ctx, gate, det.label, s2, x0_hat, eps_base, eps_u)
        eps_hat = eps_base + jnp.where(gate.reshape(bshape), g_spe + g_dup + g_sim, 0.0)
        trace = dict(trace, sigma=det.sigma.astype(jnp.float32), index=det.index, label=det.label,
                     gate=gate, s1=s1, s2=s2, grad_norm=jnp.where(gate, gnorm, 0.0), fallback=fb & gate,
                     nonfinite=_nonfinite_bits(gate, eps_base, g_spe, g_dup, g_sim),
                     **{"lambda": jnp.broadcast_to(lam, (b,)).astype(jnp.float32)})
        if detected is not None:
            trace["detected"] = jnp.broadcast_to(detected, (b,))
        return eps_hat, AMGState(base=base_state, held=det if c.detect_every > 1 else None, screen=screen_state), trace

    def check_trace(self, trace: dict) -> str | None:
        """A message naming each non-finite term, its first step and samples; None if all finite."""
        return nonfinite_message(trace)

    def strengths(self) -> dict:
        """c1 / c2 / c3 and the wrapped guidance's (under "base")."""
        c = self.config
        return {"c1": c.c1, "c2": c.c2, "c3": c.c3, "base": self.base}


jax.tree_util.register_dataclass(AMG, data_fields=["base", "detector", "neighbour_conds"],
                                 meta_fields=["config", "screen"])


def _first_true(mask: Array, m: int) -> Array:
    """[m] int32: the indices of the first m True entries of ``mask`` [B], padded with the first."""
    idx = jnp.nonzero(mask, size=m, fill_value=-1)[0]
    return jnp.where(idx < 0, idx[0], idx)


def _masked_switch(mask: Array, m: int | None, none, gathered, whole):
    """Run ``none`` when ``mask`` [B] has no True entry, ``gathered`` when it has 1..m (only with
    ``m`` < B), else ``whole`` (each a function of one ignored operand, under ``lax.switch`` /
    ``lax.cond``: the branches not taken are not run)."""
    b = mask.shape[0]
    n = jnp.sum(mask.astype(jnp.int32))
    if m is not None and m < b:
        return jax.lax.switch(jnp.where(n == 0, 0, jnp.where(n <= m, 1, 2)), (none, gathered, whole), None)
    return jax.lax.cond(n > 0, whole, none, None)


def _nonfinite_bits(gate: Array, eps_base: Array, g_spe: Array, g_dup: Array, g_sim: Array) -> Array:
    """[B] int32 bit mask: 1 the base eps_hat, 2 G_spe, 4 G_dup, 8 G_sim hold NaN/inf (a term only
    counts where the gate adds it)."""
    b = gate.shape[0]

    def bad(v):
        return ~jnp.all(jnp.isfinite(v.reshape(b, -1)), axis=-1)
    used = lambda v: bad(v) & gate        # noqa: E731
    return (bad(eps_base).astype(jnp.int32) | (used(g_spe).astype(jnp.int32) << 1)
            | (used(g_dup).astype(jnp.int32) << 2) | (used(g_sim).astype(jnp.int32) << 3))


def nonfinite_message(trace: dict) -> str | None:
    """Read a trace's ``nonfinite`` bit mask [B, N]: which term went NaN/inf, at which step."""
    if "nonfinite" not in trace:
        return None
    m = np.asarray(trace["nonfinite"])
    if not m.any():
        return None
    parts = []
    for bit, term in enumerate(TERMS):
        hit = (m >> bit) & 1
        if hit.any():
            steps = np.flatnonzero(hit.any(axis=0))
            samples = np.flatnonzero(hit.any(axis=1))
            parts.append(f"{term} is NaN/inf from step {int(steps[0])} (steps {steps[:5].tolist()}..., "
                         f"samples {samples[:8].tolist()}; lower {TERM_SETTINGS[bit]})")
    return "AMG: " + "; ".join(parts)


def make_amg(base, detector, *, neighbour_conds=None, screen=None, **config) -> AMG:
    """AMG around ``base`` with ``detector``; ``config`` are ``AMGConfig`` fields. Checks the
    gate thresholds against the detector's ``sigma_range`` (METHODS.md pitfall 3): a threshold
    outside it means "always open" or "never open" and is rejected. ``neighbour_conds``: a
    pytree [C, ...] with the condition of each bank label (``y_N`` for ``G_dup``; SD: text
    embeddings [C, 77, D]), None = the label id itself is the condition. ``screen``: a
    ``guidance.screen`` screen (with ``screen_threshold``) in front of the detector; with
    ``detector=None`` the screen alone gates ``G_spe`` (``dedup`` / ``dissimilar`` need a bank)."""
    if not callable(getattr(base, "combine", None)):
        raise ValueError(f"AMG: base guidance {type(base).__name__} has no combine(state, ctx, eps_u, eps_c)")
    unknown, known = unknown_fields(AMGConfig, config)
    if unknown:
        raise ValueError(f"AMG has no setting {unknown[0]!r}; its settings are {known}")
    if screen is not None:
        if not (callable(screen) and callable(getattr(screen, "init", None))):
            raise ValueError(f"AMG: screen {type(screen).__name__} has no init(x) / __call__(state, ctx, eps_u, eps_c)")
        thr = config.get("screen_threshold")
        if isinstance(thr, (np.floating, np.integer)):
            config = dict(config, screen_threshold=float(thr))
        if thr is None:
            raise ValueError("AMG: a screen needs its threshold (screen_threshold=...; calibrate it with "
                             "evaluation.detection.calibrate_threshold on copies of calibration prompts)")
    elif config.get("screen_threshold") is not None or config.get("screen_batch") is not None:
        raise ValueError("AMG: screen_threshold / screen_batch are set but there is no screen")
    if detector is None:
        if screen is None:
            raise ValueError("AMG needs a detector (a reference bank), or a screen to gate G_spe without one")
        for field in ("dedup", "dissimilar"):
            if config.get(field):
                raise ValueError(f"AMG: {field}=True needs a detector over a reference bank; without one only "
                                 "despecification (G_spe) runs, gated by the screen")
        config = dict(config, dedup=False, dissimilar=False)
        return AMG(base=base, detector=None, config=AMGConfig(**config), screen=screen)
    for name in ("sigma_range", "scale"):
        if not hasattr(detector, name):
            raise ValueError(f"AMG: detector {type(detector).__name__} has no {name!r} (see amg_jax.similarity.base)")
    amg = AMG(base=base, detector=detector, config=AMGConfig(**config), neighbour_conds=neighbour_conds,
              screen=screen)
    labels = getattr(getattr(detector, "bank", None), "labels", None)
    if (neighbour_conds is not None and labels is not None and not isinstance(labels, jax.core.Tracer)
            and getattr(labels, "is_fully_addressable", True)):
        rows, top = jax.tree.leaves(neighbour_conds)[0].shape[0], int(np.max(np.asarray(labels), initial=-1))
        if top >= rows:      # jnp.take would clamp: G_dup would silently use another caption
            raise ValueError(f"AMG: the bank's labels go up to {top} but neighbour_conds has {rows} rows "
                             "(the captions of another bank?)")
    if amg.config.threshold != "always":
        lo_r, hi_r = (float(v) for v in detector.sigma_range)
        for name, v in zip(("lambda_min", "lambda_max"), amg.thresholds()):
            if not lo_r < float(v) < hi_r:
                raise ValueError(f"AMG: {name}={v} lies outside the detector's sigma range ({lo_r}, {hi_r}): "
                                 "the gate would be always open or never open")
    if not float(detector.scale) > 0:
        raise ValueError(f"AMG: detector scale must be > 0, got {detector.scale}")
    return amg


__all__ = ["AMG", "AMGConfig", "AMGState", "GRADIENTS", "SCORES", "THRESHOLDS", "make_amg", "nonfinite_message"]
