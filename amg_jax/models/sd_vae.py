"""Stable Diffusion's VAE (diffusers' ``AutoencoderKL``) as amg_jax's own Flax module, encoder and decoder.

The parameter tree is diffusers' Flax one (``decoder/up_blocks_0/resnets_0/conv1/kernel``, the mid
block's attention as ``query`` / ``key`` / ``value`` / ``proj_attn``), so ``diffusion_flax_model.msgpack``
loads as it is; PyTorch weights map by name (``sd_weights``, which also takes the ``to_q`` / ``to_out.0``
names of today's PyTorch files). SD 1.x / 2.x and SDXL share this architecture.

``VAEConfig.from_dict(config_json, where)``; ``AutoencoderKL(config, dtype, attention)``:
``.encode(pixels [B, H, W, 3] in [-1, 1]) -> (mean, logvar) [B, H/f, W/f, C]`` and
``.decode(z [B, h, w, C]) -> pixels [B, h*f, w*f, 3]`` (unscaled latents; the caller applies
``scaling_factor``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from amg_jax.models.attention import attend
from amg_jax.models.sd_unet import Downsample, ResnetBlock, Upsample, conv

FIXED = {"shift_factor": (None,), "latents_mean": (None,), "latents_std": (None,), "use_quant_conv": (True,),
         "use_post_quant_conv": (True,), "mid_block_add_attention": (True,), "act_fn": ("silu",)}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The fields of a diffusers ``AutoencoderKL`` config.json the module reads (hashable)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "vae/config.json") -> "VAEConfig":
        if cfg.get("_class_name", "AutoencoderKL") not in ("AutoencoderKL", "FlaxAutoencoderKL"):
            raise ValueError(f"{where}: _class_name={cfg['_class_name']!r} is not an AutoencoderKL")
        for key, allowed in FIXED.items():
            if key in cfg and cfg[key] not in allowed:
                raise ValueError(f"{where}: {key}={cfg[key]!r} is not supported (amg_jax's VAE implements "
                                 f"{' / '.join(map(repr, allowed))})")
        channels = tuple(cfg.get("block_out_channels", cls.block_out_channels))
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(cfg.get(key, [kind] * len(channels)))
            if len(types) != len(channels) or any(t != kind for t in types):
                raise ValueError(f"{where}: {key}={types!r}: amg_jax's VAE has one {kind} per block_out_channels "
                                 f"entry ({len(channels)})")
        groups = int(cfg.get("norm_num_groups", 32))
        if any(c % groups for c in channels):
            raise ValueError(f"{where}: block_out_channels {list(channels)} are not divisible by "
                             f"norm_num_groups={groups}")
        return cls(in_channels=int(cfg.get("in_channels", 3)), out_channels=int(cfg.get("out_channels", 3)),
                   block_out_channels=channels, layers_per_block=int(cfg.get("layers_per_block", 2)),
                   latent_channels=int(cfg.get("latent_channels", 4)), norm_num_groups=groups,
                   scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
                   force_upcast=bool(cfg.get("force_upcast", True)))


class VAEAttention(nn.Module):
    """The VAE mid block's single-head self-attention with a GroupNorm in front and a residual."""

    groups: int
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = nn.GroupNorm(self.groups, epsilon=1e-6, dtype=self.dtype, name="group_norm")(x).reshape(b, h * w, c)
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name)             # noqa: E731
        y = attend(dense("query")(y), dense("key")(y), dense("value")(y), 1, self.attention)
        return x + dense("proj_attn")(y).reshape(b, h, w, c)


def _resnet(remat: bool):
    return nn.remat(ResnetBlock) if remat else ResnetBlock


class VAEMid(nn.Module):
    channels: int
    groups: int
    dtype: Any = jnp.float32
    attention: str = "auto"
    remat: bool = False         # each resnet / attention under nn.remat

    @nn.compact
    def __call__(self, x):
        res, att = _resnet(self.remat), nn.remat(VAEAttention) if self.remat else VAEAttention
        x = res(self.channels, self.groups, 1e-6, self.dtype, name="resnets_0")(x)
        x = att(self.groups, self.dtype, self.attention, name="attentions_0")(x)
        return res(self.channels, self.groups, 1e-6, self.dtype, name="resnets_1")(x)


class VAEBlock(nn.Module):
    """``DownEncoderBlock2D`` (``up=False``) or ``UpDecoderBlock2D``: resnets, then a resampler."""

    channels: int
    layers: int
    groups: int
    up: bool
    resample: bool
    dtype: Any = jnp.float32
    remat: bool = False         # each resnet under nn.remat

    @nn.compact
    def __call__(self, x):
        res = _resnet(self.remat)
        for j in range(self.layers):
            x = res(self.channels, self.groups, 1e-6, self.dtype, name=f"resnets_{j}")(x)
        if self.resample and self.up:
            x = Upsample(self.channels, self.dtype, name="upsamplers_0")(x)
        elif self.resample:    # diffusers' VAE pads right / bottom by one, then a VALID stride-2 conv
            x = Downsample(self.channels, ((0, 1), (0, 1)), self.dtype, name="downsamplers_0")(x)
        return x


class Encoder(nn.Module):
    config: VAEConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, x):
        cfg, dt, n = self.config, self.dtype, len(self.config.block_out_channels)
        x = conv(cfg.block_out_channels[0], dtype=dt, name="conv_in")(x.astype(dt))
        for i, ch in enumerate(cfg.block_out_channels):
            x = VAEBlock(ch, cfg.layers_per_block, cfg.norm_num_groups, False, i < n - 1, dt, name=f"down_blocks_{i}")(x)
        x = VAEMid(cfg.block_out_channels[-1], cfg.norm_num_groups, dt, self.attention, name="mid_block")(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=dt, name="conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, dtype=dt, name="conv_out")(x)


class Decoder(nn.Module):
    """``remat_blocks``: each resnet and attention layer of the mid / up blocks under ``nn.remat`` (same
    parameters): a backward pass through the decoder then holds one layer's activations at a time
    (at 512 px a layer of the last block alone holds 128 MiB tensors) instead of all of them."""

    config: VAEConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    remat_blocks: bool = False

    @nn.compact
    def __call__(self, z):
        cfg, dt, n = self.config, self.dtype, len(self.config.block_out_channels)
        rm = self.remat_blocks
        rev = cfg.block_out_channels[::-1]
        x = conv(rev[0], dtype=dt, name="conv_in")(z.astype(dt))
        x = VAEMid(rev[0], cfg.norm_num_groups, dt, self.attention, rm, name="mid_block")(x)
        for i, ch in enumerate(rev):
            x = VAEBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, True, i < n - 1, dt, rm,
                         name=f"up_blocks_{i}")(x)
        x = nn.silu(nn.GroupNorm(cfg.norm_num_groups, epsilon=1e-6, dtype=dt, name="conv_norm_out")(x))
        return conv(cfg.out_channels, dtype=dt, name="conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL``: ``encode`` pixels -> (mean, logvar), ``decode`` latents -> pixels (NHWC)."""

    config: VAEConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    remat_blocks: bool = False      # the decoder's blocks under nn.remat (``Decoder``)

    def setup(self):
        self.encoder = Encoder(self.config, self.dtype, self.attention)
        self.quant_conv = nn.Conv(2 * self.config.latent_channels, (1, 1), dtype=self.dtype)
        self.post_quant_conv = nn.Conv(self.config.latent_channels, (1, 1), dtype=self.dtype)
        self.decoder = Decoder(self.config, self.dtype, self.attention, self.remat_blocks)

    def encode(self, pixels):
        """pixels [B, H, W, C_in] -> (mean, logvar clipped to [-30, 20]) [B, H/f, W/f, C]."""
        mean, logvar = jnp.split(self.quant_conv(self.encoder(pixels)), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        """z [B, h, w, C] (unscaled) -> pixels [B, h*f, w*f, C_out] in ``dtype``."""
        return self.decoder(self.post_quant_conv(z.astype(self.dtype)))

    def __call__(self, pixels):
        return self.decode(self.encode(pixels)[0])


__all__ = ["AutoencoderKL", "VAEConfig"]
