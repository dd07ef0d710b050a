"""The closed-form PARTIAL memorizer: per-condition Gaussian mixtures plus training images as atoms.

For a condition (caption id) ``c`` the model density of a clean sample is::

    p(x0 | c) = (1 - m_c) * sum_k pi_{c,k} N(x0; mu_k, Sigma_k)         "generalizing" part
              +      m_c  * sum_i w_{c,i} delta(x0 - X_i)                "memorized" part (atoms)

- ``k`` runs over Gaussian components shared by all conditions (on the testbed: one per
  full attribute combination, ``mu_k`` the mean of fresh renders of it, and ``pi_{c,k}`` the
  prior over the full combinations consistent with the caption);
- ``Sigma_k = U_k diag(s_k) U_k^T + diag(d_k)``: a low-rank part plus a per-component per-pixel
  diagonal ``d_k`` [D] (the residual variance the low-rank part does not explain, floored at
  ``min_variance``). The basis is either ONE ``U`` [D, r] shared by all components (fitted on
  the pooled within-component residuals, with per-component variances ``s_k`` along it), or one
  ``U_k`` [D, r] per component (its own principal directions). Both cost the same per sample
  (O(B K D r)); the per-component basis needs K D r floats. ``fit_mixture`` defaults to it
  because, measured on the default testbed at CFG 7.5, the shared basis (r = 16) left ghost
  stripes in the background and per-pixel speckle at shape edges (the variance it cannot
  explain lands in ``d_k``, which samples as independent pixel noise), while a per-component
  basis of rank 12 gives clean, render-like samples. (One pooled covariance for everything is
  worse still: ghost shapes in every quadrant, measured when the testbed was designed.)
- ``X_i`` are the (deduplicated) training images, point masses with weights ``w_{c,i}``.

The unconditional model (``cond = -1``) is the mixture of all conditions weighted by their
training frequency ``f_c`` (NOT one broad Gaussian: CFG at 7.5 diverges on that)::

    p(x0) = sum_c f_c p(x0 | c).

**Exact denoiser.** With ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps`` every component stays
closed-form: a Gaussian becomes ``N(x_t; sqrt(ab) mu_k, C_k)``, ``C_k = ab Sigma_k + (1 - ab) I``,
and an atom ``N(x_t; sqrt(ab) X_i, (1 - ab) I)``. The responsibilities ``r`` are the softmax
of log weight + log likelihood over all components, and (Tweedie)::

    eps(x_t)    = sqrt(1 - ab) * sum_j r_j C_j^{-1} (x_t - sqrt(ab) m_j)         (m_j = mu_j or X_j)
    E[x0 | x_t] = (x_t - sqrt(1 - ab) eps) / sqrt(ab)
                = sum_j r_j (m_j + sqrt(ab) Sigma_j C_j^{-1} (x_t - sqrt(ab) m_j)).

``C_k^{-1}`` and ``log det C_k`` use Woodbury and the matrix determinant lemma on
``C_k = E_k + W_k W_k^T``, ``E_k = ab d_k + (1 - ab)`` (diagonal), ``W_k = U_k diag(sqrt(ab s_k))``:
``C^{-1} = E^{-1} - E^{-1} W M^{-1} W^T E^{-1}``, ``M = I_r + W^T E^{-1} W``,
``log det C = sum log E + log det M``. Everything per timestep (``E_k``, the r x r ``M_k``, their
inverses and log-determinants, by an unrolled Cholesky written in jnp ops: LAPACK custom calls
inside the mixed-timestep ``lax.map`` deadlocked XLA:CPU on a 2-core host) is computed once per
call from ``ab`` when the batch shares one timestep (what the samplers do), so the per-sample
cost is a few matmuls of ``x`` against the component means and the rank-r factors: O(B K D r).
A batch with mixed timesteps takes a slower exact path (one timestep at a time, ``lax.map``;
under ``vmap`` both paths run).

Numerics: float32; the data are centred on one vector before anything else; ``1 - ab`` is
floored at ``1e-8`` (``ab = 1`` cannot divide by zero; ``ab = 0`` is fine); log-sum-exp over
components; ``E[x0|x_t]`` at ``ab < 1e-8`` (zero terminal SNR) is the responsibility-weighted
mean of the component means.

``fit_mixture(testbed, ...)`` builds one from a ``amg_jax.data.testbed.Testbed`` (atoms =
``testbed.unique_images``, in that order); ``mixture_denoiser(...)`` from arrays;
``fit_gaussians(samples)`` fits means/basis/variances from grouped samples of your own data.
``responsibilities`` / ``atom_responsibility`` give the per-sample ground truth of copying
(the posterior weight of the atoms), ``log_likelihood`` the exact log p_t(x_t | c), and
``x0_estimate`` E[x0 | x_t, c].

**Memorization weights (fit_mixture).** Per caption ``c`` with duplication count ``n_c`` (mean
number of training copies of its images) and specificity ``spec_c`` in [0, 1]
(``testbed.specificity``: 1 = names every attribute)::

    logit(m_c) = memorize_logit + duplication_gain * log(n_c) + specificity_gain * spec_c
    w_{c,i}   ∝ count_i ** atom_power                           (over the images of c)

so memorization grows with duplication and with specificity. ``memorization=`` overrides
``m_c`` per caption (or per kind). Defaults (memorize_logit -3.5, duplication_gain 1.5,
specificity_gain 2.3) give m = 0.23 for specific, 0.90 for duplicated (12 copies) and 0.07 for
the default generic captions; measured with DDIM-50 (leading), CFG 7.5, 128 samples per kind
and the calibrated copy criterion: 41% copies on specific prompts, 100% on duplicated, 11% on
generic (unguided: 23%, 95%, 9%); the atoms' responsibility at the end agrees with the
calibrated criterion on 98-100% of samples.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.data import testbed as tb
from amg_jax.models.base import Denoiser
from amg_jax.schedules import Schedule

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
MIN_VARIANCE = 1e-8       # floor of 1 - ab
MIN_ALPHA = 1e-8          # below this ab, E[x0|x_t] is the weighted component mean


def _mm(a, b):
    return jnp.matmul(a, b, precision=_HIGHEST)


# ----------------------------------------------------------------------------- per-timestep quantities


def _per_t(params: dict, s: Array, v: Array) -> dict:
    """What depends on the timestep only: E_k, Cholesky of M_k, log-determinants ([K, ...])."""
    a = s * s
    d = params["diag"]                                         # [K, D]
    e = a * d + v
    inv_e = 1.0 / e
    out = {"inv_e": inv_e, "logdet": jnp.sum(jnp.log(e), axis=-1)}
    mu = params["means"]                                       # [K, D] centred
    mu_inv_e = mu * inv_e
    out["mu_inv_e"] = mu_inv_e
    out["mu_quad"] = jnp.sum(mu * mu_inv_e, axis=-1)           # [K]
    u = params["basis"]                                        # [D, r] shared or [K, D, r] per component
    r = u.shape[-1]
    if r:
        k = d.shape[0]
        if u.ndim == 2:
            g = _mm(inv_e, params["basis_outer"]).reshape(k, r, r)             # U^T E^-1 U  [K, r, r]
            out["mu_u"] = _mm(mu_inv_e, u)                                      # U^T E^-1 mu  [K, r]
        else:
            v_k = u * inv_e[:, :, None]                                         # E_k^-1 U_k  [K, D, r]
            g = jnp.einsum("kdr,kds->krs", v_k, u, precision=_HIGHEST)
            out["mu_u"] = jnp.einsum("kd,kdr->kr", mu, v_k, precision=_HIGHEST)
            out["v_flat"] = jnp.transpose(v_k, (1, 0, 2)).reshape(d.shape[1], k * r)   # [D, K*r]
        sq = jnp.sqrt(a * params["basis_var"])                                  # [K, r]
        m = jnp.eye(r, dtype=g.dtype)[None] + sq[:, :, None] * g * sq[:, None, :]
        minv, logdet_m = _spd_inverse(m)
        out["minv"] = minv
        out["sq"] = sq
        out["logdet"] = out["logdet"] + logdet_m
    return out


def _spd_inverse(m: Array) -> tuple[Array, Array]:
    """(M^-1, log det M) of a batch of small SPD matrices m [K, r, r] (r static).

    A Cholesky factorisation and triangular inverse written as unrolled jnp ops (O(K r^3)), not
    LAPACK calls: on XLA:CPU a LAPACK custom call inside a ``lax.map``/``while`` loop inside a
    ``lax.cond`` that appears twice in one program (e.g. eps and the responsibilities in one
    sampler step) was measured to deadlock on a 2-core host. M = I + PSD, so no pivoting is needed.
    """
    r = m.shape[-1]
    idx = jnp.arange(r)
    chol = jnp.zeros_like(m)
    for j in range(r):
        v = m[:, :, j] - jnp.einsum("kip,kp->ki", chol[:, :, :j], chol[:, j, :j], precision=_HIGHEST)
        dj = jnp.sqrt(jnp.maximum(v[:, j], 1e-30))
        chol = chol.at[:, :, j].set(jnp.where(idx[None, :] >= j, v / dj[:, None], 0.0))
    diag = jnp.diagonal(chol, axis1=-2, axis2=-1)
    # L^-1 by forward substitution, row by row
    linv = jnp.zeros_like(m)
    eye = jnp.eye(r, dtype=m.dtype)
    for i in range(r):
        row = eye[i][None, :] - jnp.einsum("kp,kpc->kc", chol[:, i, :i], linv[:, :i, :], precision=_HIGHEST)
        linv = linv.at[:, i, :].set(row / diag[:, i, None])
    minv = jnp.einsum("kpr,kps->krs", linv, linv, precision=_HIGHEST)          # L^-T L^-1
    return minv, 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def _gauss_loglik(params: dict, pt: dict, x: Array, s: Array):
    """log N(x; s mu_k, C_k) + D/2 log 2 pi for x [B, D] (centred): [B, K], and the pieces the
    posterior needs."""
    x2 = x * x
    quad = (_mm(x2, pt["inv_e"].T) - 2.0 * s * _mm(x, pt["mu_inv_e"].T)
            + (s * s) * pt["mu_quad"][None, :])                 # [B, K] (x - s mu)^T E^-1 (x - s mu)
    aux = {}
    u = params["basis"]
    r = u.shape[-1]
    if r:
        b, dim = x.shape
        k = pt["inv_e"].shape[0]
        if u.ndim == 2:
            xu = (x[:, None, :] * u.T[None, :, :]).reshape(b * r, dim)
            p = _mm(xu, pt["inv_e"].T).reshape(b, r, k).transpose(0, 2, 1)
        else:
            p = _mm(x, pt["v_flat"]).reshape(b, k, r)
        p = p - s * pt["mu_u"][None]                             # U_k^T E_k^-1 (x - s mu_k)  [B, K, r]
        z = pt["sq"][None] * p                                   # W^T E^-1 v  [B, K, r]
        y = jnp.einsum("krs,bks->bkr", pt["minv"], z, precision=_HIGHEST)   # M^-1 W^T E^-1 v
        quad = quad - jnp.sum(z * y, axis=-1)
        aux["y"] = y
    return -0.5 * (quad + pt["logdet"][None, :]), aux


def _atom_loglik(params: dict, x: Array, s: Array, v: Array) -> Array:
    """log N(x; s X_i, v I) + D/2 log 2 pi for x [B, D] (centred): [B, N]."""
    dim = x.shape[1]
    x_sq = jnp.sum(x * x, axis=-1, keepdims=True)
    d2 = x_sq - 2.0 * s * _mm(x, params["atoms"].T) + (s * s) * params["atom_sq"][None, :]
    return -0.5 * (jnp.maximum(d2, 0.0) / v + dim * jnp.log(v))


def _core(params: dict, x: Array, s: Array, v: Array, rows: Array) -> tuple[Array, Array]:
    """For centred x [B, D] at ONE timestep (scalars s = sqrt(ab), v = 1 - ab) and weight rows [B]:
    (log responsibilities [B, K + N], g = sum_j r_j C_j^{-1}(x - s m_j) [B, D],
    log p(x | row) + D/2 log 2 pi [B])."""
    pt = _per_t(params, s, v)
    lg, aux = _gauss_loglik(params, pt, x, s)
    la = _atom_loglik(params, x, s, v)
    logits = jnp.concatenate([lg, la], axis=-1) + params["log_weights"][rows]
    lse = jax.nn.logsumexp(logits, axis=-1)
    logr = logits - lse[:, None]
    k = lg.shape[1]
    resp = jnp.exp(logr)
    rg, ra = resp[:, :k], resp[:, k:]
    # Gaussians: sum_k r_k E_k^-1 (x - s mu_k) - sum_k r_k E_k^-1 W_k y_k
    g = x * _mm(rg, pt["inv_e"]) - s * _mm(rg, pt["mu_inv_e"])
    u = params["basis"]
    r = u.shape[-1]
    if r:
        b, dim = x.shape
        q = rg[:, :, None] * pt["sq"][None] * aux["y"]          # [B, K, r]
        if u.ndim == 2:
            pmat = _mm(q.transpose(0, 2, 1).reshape(b * r, k), pt["inv_e"]).reshape(b, r, dim)
            g = g - jnp.sum(pmat * u.T[None], axis=1)
        else:
            g = g - _mm(q.reshape(b, k * r), pt["v_flat"].T)
    # atoms: sum_i r_i (x - s X_i) / v
    g = g + (x * jnp.sum(ra, axis=-1, keepdims=True) - s * _mm(ra, params["atoms"])) / v
    return logr, g, lse


def _coefficients(params: dict, t: Array) -> tuple[Array, Array]:
    t = jnp.clip(jnp.asarray(t, jnp.int32), 0, params["sqrt_ab"].shape[0] - 1)
    return params["sqrt_ab"][t], params["var"][t]


def _rows(params: dict, cond: Array, b: int) -> Array:
    c = jnp.broadcast_to(jnp.asarray(cond, jnp.int32), (b,))
    n_rows = params["log_weights"].shape[0]
    return jnp.where(c < 0, n_rows - 1, jnp.clip(c, 0, n_rows - 2))


def _evaluate(params: dict, x_t: Array, t: Array, cond: Array):
    """(log responsibilities [B, K+N], g [B, D], s [B], v [B], centred x [B, D], log-evidence [B])."""
    b = x_t.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
    s, v = _coefficients(params, t)
    rows = _rows(params, cond, b)
    x = x_t.reshape(b, -1).astype(jnp.float32) - s[:, None] * params["center"][None, :]

    def shared(_):
        return _core(params, x, s[0], v[0], rows)

    def per_sample(_):
        def one(args):
            xi, si, vi, ri = args
            lr, gi, li = _core(params, xi[None], si, vi, ri[None])
            return lr[0], gi[0], li[0]
        return jax.lax.map(one, (x, s, v, rows))

    logr, g, lse = jax.lax.cond(jnp.all(t == t[0]), shared, per_sample, None)
    return logr, g, s, v, x, lse


# ----------------------------------------------------------------------------- public functions


class MixtureResponsibilities(NamedTuple):
    """Posterior weights of the components given x_t: ``gaussians`` [B, K], ``atoms`` [B, N]
    (together they sum to 1 per sample); ``atom_total`` [B] = atoms.sum(-1), the probability
    that the sample is being denoised toward a training image (a copy)."""

    gaussians: Array
    atoms: Array
    atom_total: Array


@jax.jit
def mixture_eps(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """The denoiser's ``eps_fn``: sqrt(1 - ab) sum_j r_j C_j^{-1} (x_t - sqrt(ab) m_j)."""
    _, g, _, v, _, _ = _evaluate(params, x_t, t, cond)
    return (jnp.sqrt(v)[:, None] * g).reshape(x_t.shape).astype(x_t.dtype)


@jax.jit
def responsibilities(params: dict, x_t: Array, t: Array, cond: Array) -> MixtureResponsibilities:
    """Component posteriors of a mixture denoiser (``denoiser.params``) at (x_t [B,*S], t [B], cond [B])."""
    logr = _evaluate(params, x_t, t, cond)[0]
    r = jnp.exp(logr)
    k = params["means"].shape[0]
    atoms = r[:, k:]
    return MixtureResponsibilities(r[:, :k], atoms, jnp.sum(atoms, axis=-1))


@jax.jit
def atom_responsibility(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """[B] posterior weight of all atoms (training images) together: the per-sample copy ground truth."""
    return responsibilities(params, x_t, t, cond).atom_total


@jax.jit
def log_likelihood(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """[B] log p_t(x_t | cond) + D/2 log(2 pi) (the exact marginal density of x_t under the model,
    up to that constant; cond = -1: the unconditional model). Differences between conditions give
    the model's implicit classifier log p(c | x_t) - log p(c' | x_t) + log(f_c' / f_c)."""
    return _evaluate(params, x_t, t, cond)[5]


@jax.jit
def x0_estimate(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """E[x0 | x_t, cond] [B, *S]."""
    logr, g, s, v, x, _ = _evaluate(params, x_t, t, cond)
    k = params["means"].shape[0]
    r = jnp.exp(logr)
    x0 = (x - v[:, None] * g) / jnp.maximum(s, MIN_ALPHA)[:, None]
    prior_mean = _mm(r[:, :k], params["means"]) + _mm(r[:, k:], params["atoms"])
    x0 = jnp.where((s * s < MIN_ALPHA)[:, None], prior_mean, x0) + params["center"][None, :]
    return x0.reshape(x_t.shape).astype(x_t.dtype)


# ----------------------------------------------------------------------------- construction


def _as_2d(name: str, a, rows: int | None = None, cols: int | None = None) -> np.ndarray:
    a = np.asarray(a, np.float64)
    if a.ndim < 1:
        raise ValueError(f"mixture: {name} must be an array, got a scalar")
    a = a.reshape(a.shape[0], -1) if a.ndim != 1 else a[:, None]
    if rows is not None and a.shape[0] != rows:
        raise ValueError(f"mixture: {name} must have {rows} rows, got shape {a.shape}")
    if cols is not None and a.shape[1] != cols:
        raise ValueError(f"mixture: {name} must have {cols} columns (per-sample size), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"mixture: {name} contains NaN or inf")
    return a


def _log(w: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(w > 0, np.log(np.maximum(w, 1e-300)), -np.inf)


def mixture_denoiser(means, diag_var, basis, basis_var, atoms, gauss_weights, atom_weights, *,
                     cond_weights=None, schedule: Schedule | None = None,
                     condition_names: Sequence[str] | None = None, sample_shape: tuple | None = None,
                     atom_labels=None, name: str = "mixture") -> Denoiser:
    """A mixture denoiser from arrays (float64 inputs are fine; stored as float32).

    means:         [K, *S] (or [K, D]) Gaussian means mu_k.
    diag_var:      [K, D] per-component diagonal variance d_k (> 0).
    basis:         [D, r] a low-rank basis U shared by all components, or [K, D, r] one basis U_k
                   per component (r may be 0; columns need not be orthonormal).
    basis_var:     [K, r] (or [r]) per-component variance s_k along the basis (>= 0).
    atoms:         [N, *S] point masses X_i (N may be 0).
    gauss_weights: [C, K] >= 0, atom_weights: [C, N] >= 0: the weight of every component in
                   condition c, i.e. (1 - m_c) pi_{c,k} and m_c w_{c,i}; each row is normalised
                   to sum 1 (a row must not be all zero).
    cond_weights:  [C] >= 0 the unconditional mixture's weight of each condition (training
                   frequency; default uniform); normalised.
    sample_shape:  per-sample shape S (default: means.shape[1:] when means is not 2-D).
    atom_labels:   optional [N] int, stored as params["atom_labels"] (e.g. the caption of each atom).

    ``params`` keys: means/atoms (centred on ``center``), diag, basis, basis_outer, basis_var,
    atom_sq, log_weights [C + 1, K + N] (last row = unconditional), sqrt_ab, var, center.
    Raises ValueError for inconsistent shapes, negative/NaN values or empty rows.
    """
    schedule = schedule if schedule is not None else Schedule()
    means_in = np.asarray(means)
    if sample_shape is None:
        sample_shape = tuple(means_in.shape[1:]) if means_in.ndim > 2 else (int(np.prod(means_in.shape[1:])),)
    sample_shape = tuple(int(v) for v in sample_shape)
    dim = int(np.prod(sample_shape))
    mu = _as_2d("means", means_in, cols=dim)
    k = mu.shape[0]
    if k == 0:
        raise ValueError("mixture: means is empty (K = 0); a mixture needs at least one Gaussian")
    dv = _as_2d("diag_var", diag_var, rows=k, cols=dim)
    if np.any(dv <= 0):
        raise ValueError(f"mixture: diag_var must be > 0 (got min {dv.min():.3g}); floor it")
    u = np.asarray(basis, np.float32)
    if not ((u.ndim == 2 and u.shape[0] == dim) or (u.ndim == 3 and u.shape[:2] == (k, dim))):
        raise ValueError(f"mixture: basis must have shape [D, r] = [{dim}, r] (shared) or [K, D, r] = "
                         f"[{k}, {dim}, r] (per component), got {u.shape}")
    if not np.all(np.isfinite(u)):
        raise ValueError("mixture: basis contains NaN or inf")
    r = u.shape[-1]
    bv = np.asarray(basis_var, np.float64)
    bv = np.broadcast_to(bv, (k, r)) if bv.ndim <= 1 else bv
    if bv.shape != (k, r):
        raise ValueError(f"mixture: basis_var must have shape [K, r] = [{k}, {r}], got {bv.shape}")
    if not np.all(np.isfinite(bv)) or np.any(bv < 0):
        raise ValueError("mixture: basis_var must be finite and >= 0")
    at = np.asarray(atoms, np.float64)
    at = at.reshape(at.shape[0], -1) if at.size else np.zeros((0, dim))
    if at.shape[1] != dim:
        raise ValueError(f"mixture: atoms must have {dim} values per sample, got shape {np.shape(atoms)}")
    if not np.all(np.isfinite(at)):
        raise ValueError("mixture: atoms contain NaN or inf")
    n = at.shape[0]
    gw = np.asarray(gauss_weights, np.float64)
    if gw.ndim != 2 or gw.shape[1] != k:
        raise ValueError(f"mixture: gauss_weights must have shape [C, K={k}], got {gw.shape}")
    c = gw.shape[0]
    if c == 0:
        raise ValueError("mixture: gauss_weights has no rows (C = 0 conditions)")
    if n and np.shape(atom_weights) != (c, n):
        raise ValueError(f"mixture: atom_weights must have shape [C={c}, N={n}], got {np.shape(atom_weights)}")
    aw = np.asarray(atom_weights, np.float64) if n else np.zeros((c, 0))
    w = np.concatenate([gw, aw], axis=1)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("mixture: gauss_weights / atom_weights must be finite and >= 0")
    tot = w.sum(axis=1)
    if np.any(tot <= 0):
        raise ValueError(f"mixture: condition(s) {np.flatnonzero(tot <= 0).tolist()[:10]} have all-zero weights")
    w = w / tot[:, None]
    cw = np.ones(c) if cond_weights is None else np.asarray(cond_weights, np.float64).reshape(-1)
    if cw.shape != (c,) or not np.all(np.isfinite(cw)) or np.any(cw < 0) or cw.sum() <= 0:
        raise ValueError(f"mixture: cond_weights must be [C={c}] finite, >= 0, not all zero")
    cw = cw / cw.sum()
    w_all = np.concatenate([w, (cw @ w)[None]], axis=0)          # [C + 1, K + N]
    if condition_names is not None:
        condition_names = tuple(str(x) for x in condition_names)
        if len(condition_names) != c:
            raise ValueError(f"mixture: {len(condition_names)} condition_names for C={c} conditions")
    ab = np.asarray(schedule.alphas_cumprod(), np.float64)

    center = np.concatenate([mu, at]).mean(axis=0).astype(np.float32).astype(np.float64)
    mu_c = (mu - center).astype(np.float32)
    at_c = (at - center).astype(np.float32)
    u32 = u
    outer = (u32[:, :, None] * u32[:, None, :]).reshape(dim, r * r) if u.ndim == 2 else np.zeros((0,), np.float32)
    params = {
        "means": jnp.asarray(mu_c),                                               # [K, D]
        "diag": jnp.asarray(dv, jnp.float32),                                     # [K, D]
        "basis": jnp.asarray(u32),                                                # [D, r] / [K, D, r]
        "basis_outer": jnp.asarray(outer),                                        # [D, r*r] (shared U)
        "basis_var": jnp.asarray(bv, jnp.float32),                                # [K, r]
        "atoms": jnp.asarray(at_c),                                               # [N, D]
        "atom_sq": jnp.asarray(np.sum(at_c.astype(np.float64) ** 2, axis=1), jnp.float32),
        "log_weights": jnp.asarray(_log(w_all), jnp.float32),                     # [C + 1, K + N]
        "sqrt_ab": jnp.asarray(np.sqrt(ab), jnp.float32),
        "var": jnp.asarray(np.maximum(1.0 - ab, MIN_VARIANCE), jnp.float32),
        "center": jnp.asarray(center, jnp.float32),
    }
    if atom_labels is not None:
        al = np.asarray(atom_labels)
        if al.shape != (n,):
            raise ValueError(f"mixture: atom_labels must have shape [N={n}], got {al.shape}")
        params["atom_labels"] = jnp.asarray(al, jnp.int32)
    return Denoiser(params=params, null_cond=jnp.int32(-1), eps_fn=mixture_eps, sample_shape=sample_shape,
                    schedule=schedule, num_conditions=c, condition_names=condition_names, name=name)


class GaussianFit(NamedTuple):
    """``fit_gaussians`` result: means [K, D], diag_var [K, D], basis [D, r], basis_var [K, r]."""

    means: np.ndarray
    diag_var: np.ndarray
    basis: np.ndarray
    basis_var: np.ndarray


def _randomized_basis(res: np.ndarray, rank: int, rng: np.random.Generator, oversample: int = 10,
                      power_iters: int = 3) -> np.ndarray:
    """Top-``rank`` right singular vectors [D, rank] of res [M, D] (randomized range finder)."""
    m, dim = res.shape
    ell = min(rank + oversample, dim, m)
    q = rng.standard_normal((dim, ell)).astype(res.dtype)
    q, _ = np.linalg.qr(res.T @ (res @ q))
    for _ in range(power_iters):
        q, _ = np.linalg.qr(res.T @ (res @ q))
    b = res @ q                                                 # [M, ell]
    _, _, vt = np.linalg.svd(b.astype(np.float64), full_matrices=False)
    return (q.astype(np.float64) @ vt.T)[:, :rank]


def fit_gaussians(samples, rank: int = 16, *, per_component: bool = False, min_variance: float = 1e-3,
                  rng=0) -> GaussianFit:
    """Fit the Gaussian part from grouped samples [K, n, *S] (n >= 2 samples of each component).

    means = per-group means. Low-rank part:

    - ``per_component=False``: one basis U [D, rank] = the top principal directions of the pooled
      within-group residuals (randomized SVD); basis_var[k] = the variance of group k's residuals
      along each column of U.
    - ``per_component=True``: a basis U_k [K, D, rank] per group = the top principal directions of
      that group's residuals (rank <= n - 1), basis_var[k] = their variances.

    diag_var[k] = max(per-pixel residual variance - diag(U s_k U^T), min_variance).
    """
    x = np.asarray(samples, np.float32)
    if x.ndim < 3:
        raise ValueError(f"fit_gaussians: samples must be [K, n, *S], got shape {x.shape}")
    k, n = x.shape[:2]
    if k < 1 or n < 2:
        raise ValueError(f"fit_gaussians: need K >= 1 groups of n >= 2 samples, got K={k}, n={n}")
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 0:
        raise ValueError(f"fit_gaussians: rank must be an integer >= 0, got {rank!r}")
    if not (np.isfinite(min_variance) and min_variance > 0):
        raise ValueError(f"fit_gaussians: min_variance must be > 0, got {min_variance!r}")
    x = x.reshape(k, n, -1)
    dim = x.shape[2]
    means = x.mean(axis=1, dtype=np.float64)
    res = (x - means[:, None, :].astype(np.float32))
    var = np.sum(np.square(res, dtype=np.float64), axis=1) / (n - 1)        # [K, D]
    if per_component:
        rank = int(min(rank, dim, n - 1))
        u = np.zeros((k, dim, rank), np.float32)
        s = np.zeros((k, rank))
        for i in range(k):
            _, sv, vt = np.linalg.svd(res[i].astype(np.float64), full_matrices=False)
            u[i] = vt[:rank].T
            s[i] = sv[:rank] ** 2 / (n - 1)
        explained = np.einsum("kdr,kr->kd", u.astype(np.float64) ** 2, s)
    else:
        rank = int(min(rank, dim, k * (n - 1)))
        if rank:
            r = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
            u = _randomized_basis(res.reshape(k * n, dim), rank, r)
            proj = res.reshape(k * n, dim) @ u.astype(np.float32)            # [K*n, r]
            s = np.sum(np.square(proj.reshape(k, n, rank), dtype=np.float64), axis=1) / (n - 1)
            explained = s @ (u ** 2).T                                       # diag(U s_k U^T)  [K, D]
        else:
            u, s, explained = np.zeros((dim, 0)), np.zeros((k, 0)), 0.0
    diag = np.maximum(var - explained, float(min_variance))
    return GaussianFit(means, diag, u, s)


def memorization_mass(testbed, *, memorize_logit: float = -3.5, duplication_gain: float = 1.5,
                      specificity_gain: float = 2.3) -> np.ndarray:
    """[C] m_c = sigmoid(memorize_logit + duplication_gain * log(n_c) + specificity_gain * spec_c),
    n_c = mean number of training copies of caption c's images, spec_c = ``specificity``."""
    counts = testbed.duplicate_counts.astype(np.float64)                     # [U]
    ulab = testbed.unique_labels
    c = testbed.num_captions
    n_c = np.bincount(ulab, weights=counts, minlength=c) / np.maximum(np.bincount(ulab, minlength=c), 1)
    z = memorize_logit + duplication_gain * np.log(np.maximum(n_c, 1.0)) + specificity_gain * tb.specificity(testbed)
    return 1.0 / (1.0 + np.exp(-z))


def fit_mixture(testbed, *, rank: int = 12, per_component: bool = True, renders_per_component: int = 48,
                memorize_logit: float = -3.5, duplication_gain: float = 1.5, specificity_gain: float = 2.3,
                atom_power: float = 1.0, memorization=None, min_variance: float = 1e-3, diag_scale: float = 1.0,
                schedule: Schedule | None = None, rng=0, name: str = "mixture") -> Denoiser:
    """The partial memorizer of a testbed (``amg_jax.data.testbed.Testbed``).

    Gaussians: one per full attribute combination consistent with any caption (in
    ``all_combinations`` order), fitted by ``fit_gaussians`` on ``renders_per_component`` fresh
    renders each: mean, a rank-``rank`` basis (``per_component=True``: one per component, the
    default; False: one shared basis) with per-component variances, and a per-component diagonal
    (times ``diag_scale``, floored at ``min_variance``). In caption c they carry the prior
    probabilities of ``full_captions``. Atoms: ``testbed.unique_images`` (in that order;
    ``params["atom_labels"]`` = their captions), weight ∝ duplicate count ** ``atom_power`` within
    their caption. Memorization mass m_c: ``memorization_mass`` with the three knobs, or
    ``memorization`` ([C] in [0, 1], or a dict {kind: m} overriding those kinds) to set it directly.
    Unconditional = the conditions weighted by training frequency (rows per caption).
    ``num_conditions`` = number of captions, ``condition_names`` = captions, ``null_cond`` = -1.
    Takes ~15 s on 2 CPU cores at the default testbed (477 components, 23k renders).
    """
    if not isinstance(testbed, tb.Testbed):
        raise ValueError(f"fit_mixture: expected a Testbed, got {type(testbed).__name__}")
    if not isinstance(renders_per_component, (int, np.integer)) or renders_per_component < 2:
        raise ValueError(f"fit_mixture: renders_per_component must be an integer >= 2, got {renders_per_component!r}")
    if not (np.isfinite(atom_power) and atom_power >= 0):
        raise ValueError(f"fit_mixture: atom_power must be >= 0, got {atom_power!r}")
    if not (np.isfinite(diag_scale) and diag_scale > 0):
        raise ValueError(f"fit_mixture: diag_scale must be > 0, got {diag_scale!r}")
    r = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    cfg = testbed.config
    c_count = testbed.num_captions

    per_caption = [tb.consistent_combinations(cfg, testbed.constraints[c]) for c in range(c_count)]
    comp_index = np.unique(np.concatenate([tb.combination_index(cfg, cc) for cc in per_caption]))
    combos = tb.all_combinations(cfg)[comp_index]
    k = len(comp_index)
    pos = {int(i): j for j, i in enumerate(comp_index)}
    gw = np.zeros((c_count, k))
    for c, cc in enumerate(per_caption):
        gw[c, [pos[int(i)] for i in tb.combination_index(cfg, cc)]] = 1.0 / len(cc)

    if memorization is None:
        m = memorization_mass(testbed, memorize_logit=memorize_logit, duplication_gain=duplication_gain,
                              specificity_gain=specificity_gain)
    elif isinstance(memorization, dict):
        bad = [kk for kk in memorization if kk not in tb.KINDS]
        if bad:
            raise ValueError(f"fit_mixture: memorization keys must be caption kinds {tb.KINDS}, got {bad}")
        m = memorization_mass(testbed, memorize_logit=memorize_logit, duplication_gain=duplication_gain,
                              specificity_gain=specificity_gain)
        for kind, val in memorization.items():
            m[np.asarray(testbed.caption_kind) == kind] = float(val)
    else:
        m = np.asarray(memorization, np.float64).reshape(-1)
        if m.shape != (c_count,):
            raise ValueError(f"fit_mixture: memorization must have shape [C={c_count}], got {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0) or np.any(m > 1):
        raise ValueError("fit_mixture: memorization masses must lie in [0, 1]")

    counts = testbed.duplicate_counts.astype(np.float64)
    ulab = testbed.unique_labels
    n_u = len(ulab)
    aw = np.zeros((c_count, n_u))
    aw[ulab, np.arange(n_u)] = counts ** atom_power
    aw = aw / np.maximum(aw.sum(axis=1, keepdims=True), 1e-300)
    weights_g = gw * (1.0 - m)[:, None]
    weights_a = aw * m[:, None]
    freq = np.bincount(testbed.labels, minlength=c_count).astype(np.float64)

    samples = tb.combination_renders(cfg, combos, int(renders_per_component), r)
    fit = fit_gaussians(samples, rank, per_component=per_component, min_variance=min_variance, rng=r)
    del samples
    diag = np.maximum(fit.diag_var * float(diag_scale), float(min_variance))
    return mixture_denoiser(fit.means, diag, fit.basis, fit.basis_var, testbed.unique_images,
                            weights_g, weights_a, cond_weights=freq, schedule=schedule,
                            condition_names=testbed.captions, sample_shape=testbed.image_shape,
                            atom_labels=ulab, name=name)


__all__ = [
    "GaussianFit", "MixtureResponsibilities", "atom_responsibility", "fit_gaussians", "fit_mixture",
    "log_likelihood", "memorization_mass", "mixture_denoiser", "mixture_eps", "responsibilities", "x0_estimate",
]
