"""Multi-head attention through ``jax.nn.dot_product_attention``, the kernel a setting.

``attend(q, k, v, heads, implementation)``: q [B, T, H*D], k / v [B, S, H*D] -> [B, T, H*D].
JAX's ``xla`` path computes the logits and the softmax in float32 whatever the inputs' dtype (as
diffusers' ``upcast_attention`` does); cuDNN accumulates in float32 inside the kernel.

implementation (``ATTENTION_IMPLEMENTATIONS``):
- ``"xla"``: the plain XLA computation (any device, any dtype; float16 on a CPU computes in float32, as
  XLA:CPU has no float16 dot with float32 accumulation).
- ``"cudnn"``: cuDNN's fused flash attention (NVIDIA GPUs, bfloat16 / float16 only; JAX raises otherwise).
- ``"auto"`` (the default): ``cudnn`` on a GPU for 16-bit inputs with head dim <= 128 (the kernel's
  limits), else ``xla``. On a TPU that is ``xla``: ``jax.nn.dot_product_attention`` has no TPU
  kernel, and XLA's TPU compiler fuses the softmax itself.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn")


def check_attention(implementation: str) -> str:
    """``implementation`` unchanged, or ValueError naming the choices."""
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got "
                         f"{implementation!r}")
    return implementation


def resolve_attention(implementation: str, dtype, head_dim: int, platform: str | None = None) -> str:
    """The kernel ``"auto"`` stands for on ``platform`` (default: JAX's default backend): ``"cudnn"`` or
    ``"xla"``; an explicit choice is returned as it is."""
    check_attention(implementation)
    if implementation != "auto":
        return implementation
    platform = jax.default_backend() if platform is None else platform
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim <= 128:
        return "cudnn"
    return "xla"


def attend(q: jax.Array, k: jax.Array, v: jax.Array, heads: int, implementation: str = "auto", *,
           causal: bool = False) -> jax.Array:
    """Scaled dot-product attention over ``heads`` heads: q [B, T, H*D], k / v [B, S, H*D] -> [B, T, H*D]
    in q's dtype; ``causal``: position i attends to positions <= i (CLIP's text encoder)."""
    b, t, c = q.shape
    d = c // heads
    impl = resolve_attention(implementation, q.dtype, d)
    dtype = q.dtype
    if impl == "xla" and dtype == jnp.float16 and jax.default_backend() == "cpu":
        # XLA:CPU has no float16 dot with float32 accumulation (the xla path's logits): compute in float32
        q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d)                  # noqa: E731
    out = jax.nn.dot_product_attention(split(q), split(k), split(v), is_causal=causal, implementation=impl)
    return out.reshape(b, t, c).astype(dtype)


__all__ = ["ATTENTION_IMPLEMENTATIONS", "attend", "check_attention", "resolve_attention"]
