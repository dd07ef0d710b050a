"""A small conditional UNet in Flax for the testbed (the trained memorizers of ``checkpoints/``).

Residual blocks with GroupNorm and a sinusoidal time embedding, self-attention at the low
resolutions, and one of three conditionings (``UNetConfig.conditioning``):

- ``"text"``:  caption ids -> token ids (``CaptionTokenizer``) -> ``TextEncoder`` [B, L, D];
  the attention blocks cross-attend to the tokens and the pooled text embedding is added to
  the time embedding (Stable Diffusion's shape of conditioning, at testbed size);
- ``"class"``: a label embedding (``num_classes + 1`` rows, the last is the null class)
  added to the time embedding;
- ``"none"``:  unconditional.

Condition id -1 is the null condition everywhere (the empty caption / null class), which is
what classifier-free guidance and condition dropout in training use.

``UNetModel`` bundles the module config with the caption token table and exposes the
trainable-model interface (``init``, ``eps_fn``, ``config_dict``) ``amg_jax.train`` uses;
``unet_denoiser`` wraps trained params in the ``Denoiser`` contract the samplers take.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.models.base import Denoiser
from amg_jax.models.text import TextEncoder, pooled
from amg_jax.schedules import Schedule

CONDITIONINGS = ("text", "class", "none")
PREDICTIONS = ("eps", "v")


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture of the testbed UNet (hashable, JSON-able via ``dataclasses.asdict``).

    image_size / in_channels: x is [B, image_size, image_size, in_channels].
    channels: base width; channel_mult: width multiplier per resolution level (each level
    after the first halves the resolution); num_res_blocks per level; attention_resolutions:
    the resolutions with (self- and, for text, cross-) attention; num_groups: GroupNorm groups.
    conditioning: "text" | "class" | "none"; num_classes: class / caption count;
    vocab_size, max_tokens, text_dim, text_layers: the text encoder (text conditioning).
    prediction: what the network outputs, "eps" (the noise) or "v" (sqrt(ab) eps - sqrt(1-ab) x0,
    Salimans & Ho 2022; the default). ``UNetModel.eps_fn`` always returns eps. Measured on the
    testbed: an eps-UNet trained 3000 steps denoises well (eps MSE 0.004 at t=900) but its x0
    error there is 0.004 / ab = 15 (data variance 0.18) and DDIM from noise drifts out of range
    (half the pixels); v-prediction predicts x0 directly at high noise and samples in range.
    """

    image_size: int = 32
    in_channels: int = 3
    channels: int = 32
    channel_mult: tuple = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (8,)
    num_heads: int = 4
    num_groups: int = 8
    conditioning: str = "text"
    num_classes: int = 0
    vocab_size: int = 0
    max_tokens: int = 16
    text_dim: int = 64
    text_layers: int = 2
    prediction: str = "v"

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"UNetConfig.{field} {msg}")

        def pos_int(field, minimum=1):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
                fail(field, f"must be an integer >= {minimum}, got {v!r}")

        for field in ("image_size", "in_channels", "channels", "num_res_blocks", "num_heads", "num_groups",
                      "max_tokens", "text_dim", "text_layers"):
            pos_int(field)
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            fail("channel_mult", f"must be a non-empty tuple of integers >= 1, got {self.channel_mult!r}")
        levels = len(self.channel_mult)
        if self.image_size % (2 ** (levels - 1)):
            fail("image_size", f"{self.image_size} must be divisible by 2**(levels-1) = {2 ** (levels - 1)}")
        widths = [self.channels * m for m in self.channel_mult]
        if any(w % self.num_groups for w in widths):
            fail("num_groups", f"{self.num_groups} must divide every level width {widths}")
        if self.conditioning not in CONDITIONINGS:
            fail("conditioning", f"must be one of {list(CONDITIONINGS)}, got {self.conditioning!r}")
        if self.prediction not in PREDICTIONS:
            fail("prediction", f"must be one of {list(PREDICTIONS)}, got {self.prediction!r}")
        if self.conditioning in ("text", "class"):
            pos_int("num_classes")
        if self.conditioning == "text":
            pos_int("vocab_size", 4)
            if self.text_dim % self.num_heads:
                fail("text_dim", f"{self.text_dim} must be divisible by num_heads {self.num_heads}")

    @property
    def resolutions(self) -> list[int]:
        return [self.image_size // 2 ** i for i in range(len(self.channel_mult))]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of timesteps t [B] -> [B, dim] (cos | sin halves)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim - 2 * half)))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time/condition embedding added in between. x: [B, H, W, C]."""

    out_channels: int
    num_groups: int = 8

    @nn.compact
    def __call__(self, x, emb):
        h = nn.Conv(self.out_channels, (3, 3))(nn.silu(nn.GroupNorm(self.num_groups)(x)))
        h = h + nn.Dense(self.out_channels)(nn.silu(emb))[:, None, None, :]
        h = nn.Conv(self.out_channels, (3, 3), kernel_init=nn.initializers.zeros)(
            nn.silu(nn.GroupNorm(self.num_groups)(h)))
        if x.shape[-1] != self.out_channels:
            x = nn.Conv(self.out_channels, (1, 1))(x)
        return x + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions, then (with a context) cross-attention to it.
    x: [B, H, W, C]; context: [B, L, D] or None; context_mask: [B, L] bool."""

    num_heads: int = 4
    num_groups: int = 8

    @nn.compact
    def __call__(self, x, context=None, context_mask=None):
        b, hh, ww, c = x.shape
        h = nn.GroupNorm(self.num_groups)(x).reshape(b, hh * ww, c)
        h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=c, name="self_attn")(h, h)
        x = x + h.reshape(b, hh, ww, c)
        if context is not None:
            q = nn.LayerNorm()(x.reshape(b, hh * ww, c))
            mask = None if context_mask is None else nn.make_attention_mask(jnp.ones((b, hh * ww), bool), context_mask)
            h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=c, out_features=c,
                                                name="cross_attn")(q, context, mask=mask)
            x = x + h.reshape(b, hh, ww, c)
        return x


class UNet(nn.Module):
    """x [B, H, W, C], t [B] int, cond -> eps [B, H, W, C]. cond: class ids [B] (``"class"``;
    -1 = null), token ids [B, L] (``"text"``), or None (``"none"``)."""

    config: UNetConfig

    @nn.compact
    def __call__(self, x, t, cond=None, context_noise=None):
        """context_noise: optional [B, L, text_dim] added to the text encoder's output (Gaussian
        noise on the text embedding, Somepalli et al.'s GNI baseline); text conditioning only."""
        c = self.config
        emb_dim = c.channels * 4
        emb = timestep_embedding(t, c.channels)
        emb = nn.Dense(emb_dim)(nn.silu(nn.Dense(emb_dim)(emb)))
        context = mask = None
        if c.conditioning == "class":
            ids = jnp.where(cond < 0, c.num_classes, cond)
            emb = emb + nn.Embed(c.num_classes + 1, emb_dim, name="class_embed")(ids)
        elif c.conditioning == "text":
            context, mask = TextEncoder(c.vocab_size, c.max_tokens, c.text_dim, c.text_layers, c.num_heads,
                                        name="text_encoder")(cond)
            if context_noise is not None:
                context = context + context_noise.astype(context.dtype)
            emb = emb + nn.Dense(emb_dim, name="text_pool")(pooled(context, mask))

        def attn(h, res):
            if res in c.attention_resolutions:
                return AttentionBlock(c.num_heads, c.num_groups)(h, context, mask)
            return h

        h = nn.Conv(c.channels, (3, 3), name="conv_in")(x)
        skips = [h]
        res = c.image_size
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                h = attn(ResBlock(c.channels * mult, c.num_groups)(h, emb), res)
                skips.append(h)
            if level < len(c.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2))(h)
                res //= 2
                skips.append(h)
        mid = c.channels * c.channel_mult[-1]
        h = ResBlock(mid, c.num_groups)(h, emb)
        h = AttentionBlock(c.num_heads, c.num_groups)(h, context, mask)
        h = ResBlock(mid, c.num_groups)(h, emb)
        for level in reversed(range(len(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = attn(ResBlock(c.channels * c.channel_mult[level], c.num_groups)(h, emb), res)
            if level > 0:
                b, hh, ww, ch = h.shape
                h = nn.Conv(ch, (3, 3))(jax.image.resize(h, (b, hh * 2, ww * 2, ch), "nearest"))
                res *= 2
        h = nn.silu(nn.GroupNorm(c.num_groups)(h))
        return nn.Conv(c.in_channels, (3, 3), kernel_init=nn.initializers.zeros, name="conv_out")(h)


@dataclasses.dataclass(frozen=True, eq=False)
class UNetModel:
    """The UNet as a trainable, samplable model over integer condition ids.

    config: ``UNetConfig``; tokens: [num_classes, max_tokens] int32 caption token ids (text
    conditioning: condition id c uses row c; -1 uses ``null_tokens``, the empty caption);
    name: a label; schedule: the training noise schedule (v -> eps needs its alphas_cumprod).
    Hashable by identity (it is a static part of jitted functions).
    """

    config: UNetConfig
    tokens: np.ndarray | None = None
    null_tokens: np.ndarray | None = None
    name: str = "unet"
    schedule: Schedule = Schedule()

    def __post_init__(self):
        c = self.config
        if c.conditioning == "text":
            if self.tokens is None or self.null_tokens is None:
                raise ValueError("UNetModel: text conditioning needs tokens [num_classes, max_tokens] and "
                                 "null_tokens [max_tokens]")
            tok = np.asarray(self.tokens, np.int32)
            if tok.shape != (c.num_classes, c.max_tokens):
                raise ValueError(f"UNetModel: tokens must have shape [num_classes={c.num_classes}, "
                                 f"max_tokens={c.max_tokens}], got {tok.shape}")
            if tok.min() < 0 or tok.max() >= c.vocab_size:
                raise ValueError(f"UNetModel: token ids must lie in [0, vocab_size={c.vocab_size})")
            null = np.asarray(self.null_tokens, np.int32).reshape(c.max_tokens)
            object.__setattr__(self, "tokens", tok)
            object.__setattr__(self, "null_tokens", null)
        elif self.tokens is not None:
            raise ValueError(f"UNetModel: tokens are only for text conditioning, not {c.conditioning!r}")

    @property
    def module(self) -> UNet:
        return UNet(self.config)

    @property
    def num_conditions(self) -> int:
        return 0 if self.config.conditioning == "none" else self.config.num_classes

    def _cond_input(self, cond):
        c = self.config
        if c.conditioning == "none":
            return None
        cond = jnp.asarray(cond, jnp.int32)
        if c.conditioning == "class":
            return cond
        table = jnp.asarray(np.concatenate([self.tokens, self.null_tokens[None]], axis=0))
        return jnp.take(table, jnp.where(cond < 0, c.num_classes, cond), axis=0)

    def init(self, rng: jax.Array):
        """Fresh params (a pytree) from ``rng``."""
        c = self.config
        x = jnp.zeros((1, c.image_size, c.image_size, c.in_channels), jnp.float32)
        return self.module.init(rng, x, jnp.zeros((1,), jnp.int32), self._cond_input(jnp.full((1,), -1)))["params"]

    @property
    def prediction(self) -> str:
        return self.config.prediction

    def output_fn(self, params, x_t, t, cond):
        """The network's raw output (eps or v, ``prediction``) for x_t [B, H, W, C], t [B], cond [B]."""
        return self.module.apply({"params": params}, x_t, t, self._cond_input(cond))

    def eps_fn(self, params, x_t, t, cond):
        """The denoiser contract: x_t [B, H, W, C], t [B] int32, cond [B] int32 ids (-1 = null) -> eps."""
        return self._to_eps(self.output_fn(params, x_t, t, cond), x_t, t)

    def token_eps_fn(self, params, x_t, t, cond):
        """The denoiser contract on token conditions (text models): cond = {"tokens": [B, L] int32
        token ids (any caption, e.g. edited by a prompt baseline), "noise": [B, L, text_dim] added
        to the text embedding}; the null condition is the empty caption with zero noise."""
        if self.config.conditioning != "text":
            raise ValueError(f"token conditions need a text-conditional UNet, not {self.config.conditioning!r}")
        out = self.module.apply({"params": params}, x_t, t, jnp.asarray(cond["tokens"], jnp.int32),
                                context_noise=cond["noise"])
        return self._to_eps(out, x_t, t)

    def _to_eps(self, out, x_t, t):
        """The network output (eps or v) as eps."""
        if self.config.prediction == "eps":
            return out
        ab = jnp.take(jnp.asarray(self.schedule.alphas_cumprod(), jnp.float32), jnp.asarray(t, jnp.int32))
        ab = ab.reshape((-1,) + (1,) * (x_t.ndim - 1))
        return jnp.sqrt(ab) * out + jnp.sqrt(1.0 - ab) * x_t.astype(out.dtype)

    def config_dict(self) -> dict:
        """JSON-able description (architecture + a digest of the token table) for checkpoints."""
        d = dataclasses.asdict(self.config)
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
        if self.tokens is not None:
            d["tokens_sha1"] = hashlib.sha1(np.ascontiguousarray(self.tokens).tobytes()).hexdigest()[:16]
        return d


def count_params(params) -> int:
    return int(sum(np.prod(getattr(p, "shape", np.shape(p))) for p in jax.tree.leaves(params)))


def unet_denoiser(model: UNetModel, params, *, schedule: Schedule | None = None,
                  condition_names: Sequence[str] | None = None) -> Denoiser:
    """Trained ``params`` of ``model`` as a ``Denoiser`` (null condition id -1; schedule: the model's)."""
    c = model.config
    return Denoiser(params=params, null_cond=jnp.int32(-1), eps_fn=model.eps_fn,
                    sample_shape=(c.image_size, c.image_size, c.in_channels),
                    schedule=schedule if schedule is not None else model.schedule,
                    num_conditions=model.num_conditions,
                    condition_names=None if condition_names is None else tuple(condition_names),
                    name=model.name)


def token_denoiser(model: UNetModel, params, *, schedule: Schedule | None = None) -> Denoiser:
    """A text UNet as a ``Denoiser`` on token conditions ``{"tokens": [B, L], "noise": [B, L, D]}``
    (``UNetModel.token_eps_fn``): captions the model was not trained on (prompt baselines) and
    noise on the text embedding. Null condition: the empty caption, zero noise."""
    c = model.config
    if c.conditioning != "text":
        raise ValueError(f"token_denoiser: needs a text-conditional UNet, got {c.conditioning!r}")
    null = {"tokens": jnp.asarray(model.null_tokens, jnp.int32),
            "noise": jnp.zeros((c.max_tokens, c.text_dim), jnp.float32)}
    return Denoiser(params=params, null_cond=null, eps_fn=model.token_eps_fn,
                    sample_shape=(c.image_size, c.image_size, c.in_channels),
                    schedule=schedule if schedule is not None else model.schedule, name=model.name + "-tokens")


__all__ = ["AttentionBlock", "CONDITIONINGS", "PREDICTIONS", "ResBlock", "UNetModel", "UNet", "UNetConfig", "count_params",
           "timestep_embedding", "token_denoiser", "unet_denoiser"]
