"""Stable Diffusion's conditional UNet (diffusers' ``UNet2DConditionModel``) as amg_jax's own Flax module.

Covers SD 1.x (conv projections), SD 2.x (linear projections, per-block heads) and SDXL
(``transformer_layers_per_block``, the ``text_time`` added conditioning). The parameter tree is the
one diffusers' Flax UNet has (``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q/kernel``),
so its ``diffusion_flax_model.msgpack`` loads as it is and PyTorch weights map by name
(``sd_weights``). The arithmetic follows the PyTorch module (not diffusers' Flax one): exact GELU
in the feed-forward, eps 1e-6 in the transformers' GroupNorm, the config's ``norm_num_groups``.
Attention goes through ``jax.nn.dot_product_attention`` (``attention.attend``), its kernel a setting.

``UNetConfig.from_dict(config_json, where)`` checks every field amg_jax does not implement and names it.
``UNet2DCondition(config, dtype, attention)(x [B, h, w, C] NHWC, t [B], context [B, L, D],
added=(text_embeds [B, P], time_ids [B, 6]) | None) -> [B, h, w, C_out]``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from amg_jax.models.attention import attend

Array = jax.Array

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
# config keys whose other values change the network in ways this module does not implement: key -> the
# values it does (None: the key may be absent or null)
FIXED = {"mid_block_type": ("UNetMidBlock2DCrossAttn",), "class_embed_type": (None,), "encoder_hid_dim": (None,),
         "encoder_hid_dim_type": (None,), "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
         "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
         "resnet_time_scale_shift": ("default",), "act_fn": ("silu",), "conv_in_kernel": (3,),
         "conv_out_kernel": (3,), "dual_cross_attention": (False,), "center_input_sample": (False,),
         "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False),
         "cross_attention_norm": (None,), "attention_type": ("default",), "addition_embed_type_num_heads": None,
         "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0, 1), "reverse_transformer_layers_per_block":
             (None,), "num_class_embeds": (None,), "mid_block_scale_factor": (1.0, 1), "downsample_padding": (1,),
         "upcast_attention": None, "dropout": None, "only_cross_attention": (False,)}


def _per_block(value, n: int, key: str, where: str, kind=int) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{where}: {key} has {len(value)} entries, the UNet has {n} down blocks")
        vals = tuple(value)
    else:
        vals = (value,) * n
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, kind) or v <= 0:
            raise ValueError(f"{where}: {key}={value!r} must be a positive integer (or a list of them)")
    return vals


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The fields of a diffusers ``UNet2DConditionModel`` config.json the module reads (hashable)."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    heads: tuple = (8, 8, 8, 8)
    transformer_layers: tuple = (1, 1, 1, 1)
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None

    @property
    def time_embed_dim(self) -> int:
        return self.block_out_channels[0] * 4

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def is_sdxl(self) -> bool:
        return self.addition_embed_type == "text_time"

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "unet/config.json") -> "UNetConfig":
        """The config of a diffusers UNet2DConditionModel config.json; ValueError naming ``where`` and the
        field for anything this module does not implement or that does not add up."""
        if cfg.get("_class_name", "UNet2DConditionModel") not in ("UNet2DConditionModel", "FlaxUNet2DConditionModel"):
            raise ValueError(f"{where}: _class_name={cfg['_class_name']!r} is not a UNet2DConditionModel")
        for key, allowed in FIXED.items():
            if allowed is not None and key in cfg and cfg[key] not in allowed:
                raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (amg_jax's UNet implements "
                                 f"{' / '.join(map(repr, allowed))})")
        down = tuple(cfg.get("down_block_types", cls.down_block_types))
        up = tuple(cfg.get("up_block_types", cls.up_block_types))
        channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        n = len(down)
        for key, types, allowed in (("down_block_types", down, DOWN_BLOCKS), ("up_block_types", up, UP_BLOCKS)):
            bad = [b for b in types if b not in allowed]
            if bad:
                raise ValueError(f"{where}: {key} has {bad[0]!r}; amg_jax's UNet has {list(allowed)}")
        if len(up) != n or len(channels) != n:
            raise ValueError(f"{where}: down_block_types ({n}), up_block_types ({len(up)}) and block_out_channels "
                             f"({len(channels)}) must have one entry per level")
        # diffusers' naming quirk (its issue 2011): attention_head_dim holds the number of heads
        heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
        heads = _per_block(heads, n, "attention_head_dim", where)
        groups = int(cfg.get("norm_num_groups", 32))
        for c, h in zip(channels, heads):
            if c % groups or c % h:
                raise ValueError(f"{where}: block_out_channels {c} is not divisible by norm_num_groups={groups} "
                                 f"and its {h} attention heads")
        if "layers_per_block" in cfg and not isinstance(cfg["layers_per_block"], int):
            raise ValueError(f"{where}: layers_per_block={cfg['layers_per_block']!r} must be one integer")
        add = cfg.get("addition_embed_type")
        if add not in (None, "text_time"):
            raise ValueError(f"{where}: addition_embed_type={add!r} is not supported (None or 'text_time', SDXL's)")
        if add == "text_time" and not (cfg.get("addition_time_embed_dim") and
                                       cfg.get("projection_class_embeddings_input_dim")):
            raise ValueError(f"{where}: addition_embed_type='text_time' needs addition_time_embed_dim and "
                             "projection_class_embeddings_input_dim")
        return cls(in_channels=int(cfg.get("in_channels", 4)), out_channels=int(cfg.get("out_channels", 4)),
                   sample_size=int(cfg.get("sample_size", 64)), down_block_types=down, up_block_types=up,
                   block_out_channels=channels, layers_per_block=int(cfg.get("layers_per_block", 2)), heads=heads,
                   transformer_layers=_per_block(cfg.get("transformer_layers_per_block", 1), n,
                                                 "transformer_layers_per_block", where),
                   cross_attention_dim=int(cfg.get("cross_attention_dim", 768)),
                   use_linear_projection=bool(cfg.get("use_linear_projection", False)), norm_num_groups=groups,
                   norm_eps=float(cfg.get("norm_eps", 1e-5)), flip_sin_to_cos=bool(cfg.get("flip_sin_to_cos", True)),
                   freq_shift=int(cfg.get("freq_shift", 0)), addition_embed_type=add,
                   addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
                   projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"))


def timestep_embedding(t: Array, dim: int, flip_sin_to_cos: bool, shift: float) -> Array:
    """diffusers' ``get_timestep_embedding``: t [N] -> [N, dim] float32 sinusoids."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift))
    arg = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    sin, cos = jnp.sin(arg), jnp.cos(arg)
    emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
    return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(x)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(x))


def conv(features: int, k: int = 3, stride: int = 1, dtype=jnp.float32, name: str | None = None, pad=None):
    p = k // 2 if pad is None else pad
    return nn.Conv(features, (k, k), (stride, stride), padding=((p, p), (p, p)) if isinstance(p, int) else p,
                   dtype=dtype, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ``ResnetBlock2D`` (default time-scale-shift): x [B, h, w, C], temb [B, T] | None."""

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm1")(x))
        h = conv(self.out_channels, dtype=self.dtype, name="conv1")(h)
        if temb is not None:
            h = h + nn.Dense(self.out_channels, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))[:, None, None]
        h = nn.silu(nn.GroupNorm(self.groups, epsilon=self.eps, dtype=self.dtype, name="norm2")(h))
        h = conv(self.out_channels, dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """diffusers' ``Attention`` (to_q / to_k / to_v without bias, to_out.0 with): x [B, T, C], context [B, S, D]."""

    heads: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context=None):
        c = x.shape[-1]
        context = x if context is None else context
        q = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_q")(x)
        k = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_k")(context)
        v = nn.Dense(c, use_bias=False, dtype=self.dtype, name="to_v")(context)
        return nn.Dense(c, dtype=self.dtype, name="to_out_0")(attend(q, k, v, self.heads, self.attention))


class GEGLU(nn.Module):
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h, gate = jnp.split(nn.Dense(self.dim * 8, dtype=self.dtype, name="proj")(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.dim, dtype=self.dtype, name="net_2")(GEGLU(self.dim, self.dtype, name="net_0")(x))


class TransformerBlock(nn.Module):
    """diffusers' ``BasicTransformerBlock``: self-attention, cross-attention, GEGLU feed-forward."""

    heads: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=name)            # noqa: E731
        x = x + Attention(self.heads, self.dtype, self.attention, name="attn1")(ln("norm1")(x))
        x = x + Attention(self.heads, self.dtype, self.attention, name="attn2")(ln("norm2")(x), context)
        return x + FeedForward(x.shape[-1], self.dtype, name="ff")(ln("norm3")(x))


class Transformer2D(nn.Module):
    """diffusers' ``Transformer2DModel`` on [B, h, w, C]: GroupNorm (eps 1e-6), proj_in (1x1 conv or linear),
    ``layers`` transformer blocks, proj_out, residual."""

    heads: int
    layers: int = 1
    linear: bool = False
    groups: int = 32
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        proj = (lambda name: nn.Dense(c, dtype=self.dtype, name=name)) if self.linear else (
            lambda name: conv(c, 1, dtype=self.dtype, name=name))
        if self.linear:
            y = proj("proj_in")(y.reshape(b, h * w, c))
        else:
            y = proj("proj_in")(y).reshape(b, h * w, c)
        for i in range(self.layers):
            y = TransformerBlock(self.heads, self.dtype, self.attention, name=f"transformer_blocks_{i}")(y, context)
        if self.linear:
            y = proj("proj_out")(y).reshape(b, h, w, c)
        else:
            y = proj("proj_out")(y.reshape(b, h, w, c))
        return x + y


class Downsample(nn.Module):
    """A stride-2 3x3 conv (``conv``); ``pad``: diffusers' UNet pads 1 each side, its VAE pads (0, 1)."""

    channels: int
    pad: Any = 1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        return conv(self.channels, stride=2, dtype=self.dtype, name="conv", pad=self.pad)(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv (``conv``)."""

    channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv(self.channels, dtype=self.dtype, name="conv")(x)


class UNetBlock(nn.Module):
    """One down / up level of the UNet: ``layers`` resnets (each followed by a transformer when ``heads``),
    then a down / up sampler. Down: returns (h, skips); up: pops its skips from the end of ``skips``."""

    channels: int
    layers: int
    heads: int | None            # None: no attention (DownBlock2D / UpBlock2D)
    transformer_layers: int
    linear: bool
    groups: int
    eps: float
    up: bool
    resample: bool
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, temb, context, skips=()):
        out, skips = [], list(skips)
        for j in range(self.layers):
            if self.up:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = ResnetBlock(self.channels, self.groups, self.eps, self.dtype, name=f"resnets_{j}")(h, temb)
            if self.heads:
                h = Transformer2D(self.heads, self.transformer_layers, self.linear, self.groups, self.dtype,
                                  self.attention, name=f"attentions_{j}")(h, context)
            out.append(h)
        if self.resample and self.up:
            h = Upsample(self.channels, self.dtype, name="upsamplers_0")(h)
        elif self.resample:
            h = Downsample(self.channels, 1, self.dtype, name="downsamplers_0")(h)
            out.append(h)
        return h, (skips if self.up else out)


class MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2DCrossAttn``: resnet, transformer, resnet."""

    channels: int
    heads: int
    transformer_layers: int
    linear: bool
    groups: int
    eps: float
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, h, temb, context):
        h = ResnetBlock(self.channels, self.groups, self.eps, self.dtype, name="resnets_0")(h, temb)
        h = Transformer2D(self.heads, self.transformer_layers, self.linear, self.groups, self.dtype, self.attention,
                          name="attentions_0")(h, context)
        return ResnetBlock(self.channels, self.groups, self.eps, self.dtype, name="resnets_1")(h, temb)


class UNet2DCondition(nn.Module):
    """The SD UNet: x [B, h, w, C] NHWC, t [B] (int or float), context [B, L, D]; ``added``: SDXL's
    (text_embeds [B, P], time_ids [B, K]) -> eps / v [B, h, w, C_out] in ``dtype``."""

    config: UNetConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x, t, context, added=None):
        cfg, dt = self.config, self.dtype
        groups, eps, n = cfg.norm_num_groups, cfg.norm_eps, len(cfg.block_out_channels)
        t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
        temb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = TimestepEmbedding(cfg.time_embed_dim, dt, name="time_embedding")(temb.astype(dt))
        if cfg.is_sdxl:
            if added is None:
                raise ValueError("an SDXL UNet (addition_embed_type='text_time') needs added=(text_embeds, time_ids)")
            text_embeds, time_ids = added
            tid = timestep_embedding(jnp.ravel(time_ids), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                     cfg.freq_shift).reshape(text_embeds.shape[0], -1)
            add = jnp.concatenate([text_embeds.astype(dt), tid.astype(dt)], axis=-1)
            temb = temb + TimestepEmbedding(cfg.time_embed_dim, dt, name="add_embedding")(add)
        context = context.astype(dt)
        h = conv(cfg.block_out_channels[0], dtype=dt, name="conv_in")(x.astype(dt))
        skips = [h]
        for i, kind in enumerate(cfg.down_block_types):
            heads = cfg.heads[i] if kind == "CrossAttnDownBlock2D" else None
            h, out = UNetBlock(cfg.block_out_channels[i], cfg.layers_per_block, heads, cfg.transformer_layers[i],
                               cfg.use_linear_projection, groups, eps, False, i < n - 1, dt, self.attention,
                               name=f"down_blocks_{i}")(h, temb, context)
            skips += out
        h = MidBlock(cfg.block_out_channels[-1], cfg.heads[-1], cfg.transformer_layers[-1], cfg.use_linear_projection,
                     groups, eps, dt, self.attention, name="mid_block")(h, temb, context)
        for i, kind in enumerate(cfg.up_block_types):
            level = n - 1 - i
            heads = cfg.heads[level] if kind == "CrossAttnUpBlock2D" else None
            h, skips = UNetBlock(cfg.block_out_channels[level], cfg.layers_per_block + 1, heads,
                                 cfg.transformer_layers[level], cfg.use_linear_projection, groups, eps, True, i < n - 1,
                                 dt, self.attention, name=f"up_blocks_{i}")(h, temb, context, skips)
        h = nn.silu(nn.GroupNorm(groups, epsilon=eps, dtype=dt, name="conv_norm_out")(h))
        return conv(cfg.out_channels, dtype=dt, name="conv_out")(h)


__all__ = ["UNet2DCondition", "UNetConfig", "timestep_embedding"]
