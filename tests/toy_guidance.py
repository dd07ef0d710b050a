"""The toy conditional denoiser the guidance tests share: eps is smooth in x, t and the condition
id, so eps_c - eps_u = 0.1 (c + 1) w is known in closed form (the noise magnitude grows with c)."""
import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.guidance.base import StepContext
from amg_jax.models.base import Denoiser
from amg_jax.samplers import keys_from_seeds

S = (4, 4, 3)
D = int(np.prod(S))


def toy_eps(params, x, t, cond):
    """eps(x [B, *S], t [B], cond [B] int, -1 = unconditional) = 0.3 x + 0.1 (cond + 2) w + 1e-4 t."""
    c = (cond.astype(jnp.float32) + 2.0)[:, None, None, None]
    return 0.3 * x + 0.1 * c * params["w"] + 1e-4 * t.astype(jnp.float32)[:, None, None, None]


def toy_denoiser(counter=None, num_conditions=3):
    """The toy as a Denoiser; ``counter`` (a list) gets the row count of every call (a callback)."""
    def eps_fn(params, x, t, cond):
        if counter is not None:
            n = x.shape[0]
            jax.debug.callback(lambda: counter.append(n))
        return toy_eps(params, x, t, cond)
    w = jnp.asarray(np.random.default_rng(0).normal(size=S), jnp.float32)
    return Denoiser(params={"w": w}, null_cond=jnp.int32(-1), eps_fn=eps_fn, sample_shape=S,
                    num_conditions=num_conditions, name="toy")


def toy_ctx(den, x, cond, step=3, t=500, num_steps=10, eps_at=False):
    """A StepContext at timestep ``t`` for x [B, *S] and cond [B]; ``eps_at``: with the denoiser at
    other timesteps too."""
    ab = jnp.asarray(den.schedule.alphas_cumprod()[t])
    return StepContext(x_t=x, t=jnp.int32(t), step=jnp.int32(step), num_steps=num_steps, alpha_bar=ab, cond=cond,
                       null_cond=den.null_batch(x.shape[0]), eps=lambda xx, cc: den(xx, t, cc),
                       key=keys_from_seeds(range(x.shape[0])),
                       eps_at=(lambda xx, cc, tt: den(xx, tt, cc)) if eps_at else None)
