"""The denoiser contract every model (empirical, mixture, UNet, Stable Diffusion) is exposed through.

A denoiser is a pure function ``eps_fn(params, x_t, t, cond) -> eps``:

- ``x_t``:  [B, *sample_shape] noisy samples (pixels [B, H, W, C] or SD latents),
- ``t``:    [B] int32 training timesteps (diffusers' convention, 0 .. T-1),
- ``cond``: a pytree with leading axis B (int32 condition ids [B] for the testbed
  models, text embeddings [B, L, D] for Stable Diffusion),
- ``eps``:  [B, *sample_shape] noise prediction.

``Denoiser`` bundles it with the metadata the samplers and guidances need. It is a
``flax.struct`` pytree: ``params`` and ``null_cond`` are traced, everything else is
static, so ``jax.jit`` compiles once per (eps_fn, shapes, configs).

A batch of conditions may carry its own unconditional condition per sample: ``WithNull(cond,
null)`` (both [B, ...], ``null`` shaped like the denoiser's ``null_cond`` plus the batch axis).
CFG then pairs sample b's ``cond`` with ``null[b]`` instead of the shared null condition: GNI
noises both branches that way, as the reference code does.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from amg_jax.schedules import Schedule

Array = jax.Array
EpsFn = Callable[[Any, Array, Array, Any], Array]


def _identity(x):
    return x


@struct.dataclass
class WithNull:
    """Conditions with a per-sample unconditional condition: cond [B, ...], null [B, ...]."""

    cond: Any
    null: Any


@struct.dataclass
class Denoiser:
    """An eps-predicting model plus its metadata.

    Fields:
      params:        model parameters (any pytree; traced under jit).
      null_cond:     the "unconditional" condition for ONE sample (no batch axis),
                     e.g. ``jnp.int32(-1)`` or the empty-prompt embedding [L, D].
      eps_fn:        ``(params, x_t [B,*S], t [B], cond [B,...]) -> eps [B,*S]``.
      sample_shape:  per-sample shape S, e.g. (32, 32, 3).
      schedule:      the training noise schedule (a hashable config).
      num_conditions: number of integer condition ids the model knows (ids are
                     0..num_conditions-1, and -1 means unconditional); ``None``
                     when conditions are not integer ids (e.g. text embeddings).
      condition_names: optional human-readable name per condition id.
      decode:        latents -> pixels in [-1, 1] (identity for pixel models).
      name:          a short label for tables and file names.
    """

    params: Any
    null_cond: Any
    eps_fn: EpsFn = struct.field(pytree_node=False)
    sample_shape: tuple = struct.field(pytree_node=False)
    schedule: Schedule = struct.field(pytree_node=False, default_factory=Schedule)
    num_conditions: int | None = struct.field(pytree_node=False, default=None)
    condition_names: tuple | None = struct.field(pytree_node=False, default=None)
    decode: Callable = struct.field(pytree_node=False, default=_identity)
    name: str = struct.field(pytree_node=False, default="denoiser")

    def __call__(self, x_t: Array, t: Array, cond: Any) -> Array:
        """eps [B,*S] for x_t [B,*S], t [B] (or a scalar, broadcast), cond [B,...]."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (x_t.shape[0],))
        return self.eps_fn(self.params, x_t, t, cond)

    def null_batch(self, batch: int) -> Any:
        """The unconditional condition broadcast to a batch: pytree [B, ...]."""
        return jax.tree.map(lambda c: jnp.broadcast_to(c, (batch,) + jnp.shape(c)), self.null_cond)

    def split_cond(self, cond: Any, batch: int) -> tuple[Any, Any]:
        """(cond, null [B, ...]): a ``WithNull``'s parts, else ``cond`` and the shared null condition."""
        if isinstance(cond, WithNull):
            return cond.cond, cond.null
        return cond, self.null_batch(batch)

    def validate_cond(self, cond: Any, batch: int | None = None) -> None:
        """Raise ValueError (before any compilation) when ``cond`` is not a valid batch of conditions
        (for a ``WithNull``: both parts, and ``null`` shaped like ``null_cond`` per sample)."""
        if isinstance(cond, WithNull):
            self.validate_cond(cond.cond, batch)
            want = jax.tree.structure(self.null_cond)
            if jax.tree.structure(cond.null) != want:
                raise ValueError(f"{self.name}: WithNull.null must have the structure of the null condition "
                                 f"({want}), got {jax.tree.structure(cond.null)}")
            for got, ref in zip(jax.tree.leaves(cond.null), jax.tree.leaves(self.null_cond)):
                if tuple(np.shape(got)[1:]) != tuple(np.shape(ref)) or (batch is not None and np.shape(got)[:1] != (batch,)):
                    raise ValueError(f"{self.name}: WithNull.null leaf shape {tuple(np.shape(got))} is not "
                                     f"[{batch if batch is not None else 'B'}, {', '.join(map(str, np.shape(ref)))}]")
            return
        leaves = jax.tree.leaves(cond)
        if not leaves:
            raise ValueError(f"{self.name}: condition is empty")
        for leaf in leaves:
            shape = np.shape(leaf)
            if len(shape) == 0:
                raise ValueError(f"{self.name}: condition must have a leading batch axis, got a scalar")
            if batch is not None and shape[0] != batch:
                raise ValueError(
                    f"{self.name}: condition batch {shape[0]} does not match the sample batch {batch}")
        if self.num_conditions is not None:
            if isinstance(leaves[0], jax.core.Tracer):
                return
            ids = np.asarray(leaves[0])
            if not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"{self.name}: condition ids must be integers, got dtype {ids.dtype}")
            bad = ids[(ids < -1) | (ids >= self.num_conditions)]
            if bad.size:
                raise ValueError(
                    f"{self.name}: unknown condition id {int(bad[0])}; this model knows ids "
                    f"0..{self.num_conditions - 1} (and -1 = unconditional)")

    def validate_x(self, x: Array) -> None:
        """Raise ValueError when ``x`` is not [B, *sample_shape]."""
        if tuple(np.shape(x)[1:]) != tuple(self.sample_shape):
            raise ValueError(
                f"{self.name}: sample shape mismatch: got {tuple(np.shape(x))}, expected "
                f"[B, {', '.join(map(str, self.sample_shape))}]")
