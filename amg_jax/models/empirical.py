"""The closed-form optimal denoiser of a finite image set: a perfect memorizer.

For training images ``X_i`` (``[N, H, W, C]``) and ``x_t = sqrt(ab) x0 + sqrt(1 - ab) eps``
with ``x0`` drawn uniformly from the set, the MMSE estimate of ``x0`` is::

    w_i(x_t)     = softmax_i( -||x_t - sqrt(ab) X_i||^2 / (2 (1 - ab) * temperature) )
    E[x0 | x_t]  = sum_i w_i X_i
    eps(x_t, t)  = (x_t - sqrt(ab) E[x0 | x_t]) / sqrt(1 - ab)

(``temperature = 1`` is the exact posterior; larger values flatten it.) Conditioned on a
label ``c``, the softmax runs only over images with ``label == c``; ``c = -1`` is the
unconditional model (all images). Sampling with it ends on a training image, so it tests
mechanics only (README pitfall 8).

Numerics: the logits use the expanded form with ``|x_t|^2`` dropped (constant per row) and
the images centred on their mean (smaller magnitudes, less float32 cancellation); the
softmax subtracts the per-row max. ``1 - ab`` is floored at ``min_variance`` (1e-8) so a
schedule with ``ab = 1`` cannot divide by 0; ``ab = 0`` (zero terminal SNR) is fine.
A condition with no images would give NaN; the constructor rejects labelings that leave
a condition id in ``0 .. num_conditions-1`` empty, and ``Denoiser.validate_cond`` rejects
unknown ids.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.models.base import Denoiser
from amg_jax.schedules import Schedule

Array = jax.Array

_HIGHEST = jax.lax.Precision.HIGHEST
MIN_VARIANCE = 1e-8


def alphas_cumprod(schedule: Schedule) -> np.ndarray:
    """alpha-bar [T] of the schedule as float64 (the schedule's own float32 values, widened,
    so that ``x_t`` built by the samplers and the denoiser agree)."""
    return np.asarray(schedule.alphas_cumprod(), np.float64)


def _coefficients(params: dict, t: Array) -> tuple[Array, Array]:
    """(sqrt(ab) [B], 1 - ab [B]) at timesteps t [B]."""
    t = jnp.clip(jnp.asarray(t, jnp.int32), 0, params["sqrt_ab"].shape[0] - 1)
    return params["sqrt_ab"][t], params["var"][t]


def posterior_logits(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """Log posterior weights (unnormalised, -inf outside the condition) [B, N]."""
    b = x_t.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
    cond = jnp.broadcast_to(jnp.asarray(cond, jnp.int32), (b,))
    s, v = _coefficients(params, t)
    xc = x_t.reshape(b, -1).astype(jnp.float32) - s[:, None] * params["mean"][None, :]
    imgs = params["images"] - params["mean"][None, :]                     # [N, D] centred
    # -||x - s X||^2 / (2 v T) up to a per-row constant: (s x.X - s^2 |X|^2 / 2) / (v T)
    dots = jnp.matmul(xc, imgs.T, precision=_HIGHEST)                      # [B, N]
    logits = (s[:, None] * dots - 0.5 * jnp.square(s)[:, None] * params["sq_norms"][None, :])
    logits = logits / (v * params["temperature"])[:, None]
    allowed = (cond[:, None] < 0) | (params["labels"][None, :] == cond[:, None])
    return jnp.where(allowed, logits, -jnp.inf)


def posterior_weights(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """Which training image the sample is committing to: softmax weights [B, N] (rows sum to 1,
    0 outside the condition). ``params`` is ``denoiser.params`` of an empirical denoiser."""
    return jax.nn.softmax(posterior_logits(params, x_t, t, cond), axis=-1)


def x0_estimate(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """E[x0 | x_t, cond] [B, *S] (a convex combination of training images)."""
    w = posterior_weights(params, x_t, t, cond)
    x0 = jnp.matmul(w, params["images"], precision=_HIGHEST)
    return x0.reshape(x_t.shape).astype(x_t.dtype)


def empirical_eps(params: dict, x_t: Array, t: Array, cond: Array) -> Array:
    """The denoiser's ``eps_fn``: (x_t - sqrt(ab) E[x0|x_t]) / sqrt(1 - ab)."""
    b = x_t.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (b,))
    s, v = _coefficients(params, t)
    x0 = x0_estimate(params, x_t, t, cond)
    shape = (b,) + (1,) * (x_t.ndim - 1)
    return ((x_t - s.reshape(shape) * x0) / jnp.sqrt(v).reshape(shape)).astype(x_t.dtype)


def empirical_denoiser(images, labels=None, *, schedule: Schedule | None = None,
                       temperature: float = 1.0, num_conditions: int | None = None,
                       condition_names: Sequence[str] | None = None,
                       name: str = "empirical") -> Denoiser:
    """The optimal denoiser of ``images [N, H, W, C]`` (optionally labelled ``[N]`` ints).

    - ``labels=None``: an unconditional model (``num_conditions = 0``; only ``cond = -1``).
    - With labels: ``num_conditions`` defaults to ``max(labels) + 1``; every id in
      ``0 .. num_conditions-1`` must have at least one image. ``cond = -1`` = all images.
    - ``temperature`` (> 0) divides the logits' variance; 1 = exact posterior. It is a
      traced parameter (``params["temperature"]``), so changing it does not recompile.
    - ``null_cond = jnp.int32(-1)``.

    Raises ValueError for images that are not a non-empty finite 4-D array, labels of the
    wrong length / non-integer / negative / >= num_conditions, an empty condition id,
    a bad temperature, or condition_names of the wrong length.
    """
    schedule = schedule if schedule is not None else Schedule()
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"{name}: images must be a 4-D array [N, H, W, C], got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: images is empty (N = 0)")
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
        raise ValueError(f"{name}: images must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}: images contain NaN or inf")
    n = x.shape[0]
    temperature = float(temperature)
    if not (np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{name}: temperature must be a finite number > 0, got {temperature}")

    if labels is None:
        if num_conditions not in (None, 0):
            raise ValueError(f"{name}: num_conditions={num_conditions} needs labels (got labels=None)")
        lab = np.full((n,), -1, np.int32)
        num_conditions = 0
    else:
        lab = np.asarray(labels)
        if lab.ndim != 1 or lab.shape[0] != n:
            raise ValueError(f"{name}: labels must have shape [N] = [{n}], got {lab.shape}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError(f"{name}: labels must be integers, got dtype {lab.dtype}")
        if np.any(lab < 0):
            raise ValueError(f"{name}: labels must be >= 0 (-1 is reserved for 'unconditional'), "
                             f"got {int(lab.min())}")
        if num_conditions is None:
            num_conditions = int(lab.max()) + 1
        num_conditions = int(num_conditions)
        if np.any(lab >= num_conditions):
            raise ValueError(f"{name}: label {int(lab.max())} is >= num_conditions={num_conditions}")
        counts = np.bincount(lab, minlength=num_conditions)
        empty = np.flatnonzero(counts == 0)
        if empty.size:
            raise ValueError(
                f"{name}: condition id(s) {empty.tolist()[:10]} have no images; every id in "
                f"0..{num_conditions - 1} must label at least one image (relabel contiguously, or "
                f"lower num_conditions)")
        lab = lab.astype(np.int32)
    if condition_names is not None:
        condition_names = tuple(str(c) for c in condition_names)
        if len(condition_names) != num_conditions:
            raise ValueError(f"{name}: {len(condition_names)} condition_names for "
                             f"num_conditions={num_conditions}")

    ab = alphas_cumprod(schedule)
    if ab.ndim != 1 or ab.size == 0 or np.any(~np.isfinite(ab)) or np.any(ab < 0) or np.any(ab > 1):
        raise ValueError(f"{name}: the schedule's alphas_cumprod must be a non-empty vector in [0, 1]")
    flat = x.reshape(n, -1).astype(np.float64)
    mean = flat.mean(axis=0).astype(np.float32).astype(np.float64)  # the float32 mean used in eps_fn
    centered = flat - mean
    params = {
        "images": jnp.asarray(x.reshape(n, -1)),                           # [N, D] float32
        "mean": jnp.asarray(mean, jnp.float32),                            # [D]
        "sq_norms": jnp.asarray(np.sum(centered ** 2, axis=-1), jnp.float32),  # [N] |X_i - mean|^2
        "labels": jnp.asarray(lab, jnp.int32),                             # [N], -1 if unlabelled
        "sqrt_ab": jnp.asarray(np.sqrt(ab), jnp.float32),                  # [T]
        "var": jnp.asarray(np.maximum(1.0 - ab, MIN_VARIANCE), jnp.float32),   # [T]
        "temperature": jnp.float32(temperature),
    }
    return Denoiser(params=params, null_cond=jnp.int32(-1), eps_fn=empirical_eps,
                    sample_shape=tuple(x.shape[1:]), schedule=schedule,
                    num_conditions=num_conditions, condition_names=condition_names, name=name)


def training_images(denoiser: Denoiser) -> Array:
    """The training images [N, *S] of an empirical denoiser (float32)."""
    p = denoiser.params
    return p["images"].reshape((-1,) + tuple(denoiser.sample_shape))
