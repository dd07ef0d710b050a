"""CLIP's two towers (transformers' ``CLIPModel``) as amg_jax's own Flax module: the vision transformer
beside ``clip_text``'s text transformer, with both projections. It is what the CLIP similarity detector
and the CLIP score run (``amg_jax.similarity.clip``), so no transformers Flax class is needed at run time.

The parameter tree is transformers' Flax one (``vision_model/embeddings/class_embedding``,
``vision_model/pre_layrnorm`` (sic), ``visual_projection/kernel``, ``logit_scale``), so
``flax_model.msgpack`` loads as it is; PyTorch weights map by name (``sd_weights.to_params``).

- ``ClipModelConfig.from_dict(config_json, where)``: a full CLIP config (``model_type`` ``clip``).
- ``ClipModel(config, dtype, attention)``: ``.apply(v, px, method="image_features")`` with px
  [B, S, S, 3] normalised pixels -> [B, P]; ``.apply(v, ids, method="text_features")`` with ids
  [B, L] -> [B, P] (both projected, not normalised). ``__call__(ids, px)`` returns both (init).

The vision tower: patches of ``patch_size`` embedded by a bias-free strided conv, a learnt class token
in front, learnt position embeddings, a LayerNorm *before* the (non-causal) encoder, and the class
token's output through ``post_layernorm`` as the pooled output. The text tower pools at the end token
under causal attention, so padding after it never reaches the pooled output (no mask is needed).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from amg_jax.models.clip_text import ClipEncoder, ClipTextConfig, ClipTextTransformer, check_transformer


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "config.json") -> "ClipVisionConfig":
        act, hidden, heads = check_transformer(cfg, where, "vision_config.")
        size, patch = int(cfg.get("image_size", 224)), int(cfg.get("patch_size", 32))
        if size % patch:
            raise ValueError(f"{where}: vision_config.image_size={size} is not a multiple of patch_size={patch}")
        return cls(hidden_size=hidden, intermediate_size=int(cfg.get("intermediate_size", 3072)),
                   num_hidden_layers=int(cfg.get("num_hidden_layers", 12)), num_attention_heads=heads,
                   image_size=size, patch_size=patch, num_channels=int(cfg.get("num_channels", 3)),
                   hidden_act=act, layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)))

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class ClipModelConfig:
    text: ClipTextConfig
    vision: ClipVisionConfig
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "config.json") -> "ClipModelConfig":
        if cfg.get("model_type") != "clip":
            raise ValueError(f"{where}: model_type={cfg.get('model_type')!r} is not a full CLIP ('clip')")
        proj = int(cfg.get("projection_dim", 512))
        return cls(text=ClipTextConfig.from_dict(dict(cfg.get("text_config") or {}, projection_dim=proj), where),
                   vision=ClipVisionConfig.from_dict(cfg.get("vision_config") or {}, where), projection_dim=proj)


class ClipVisionEmbeddings(nn.Module):
    """px [B, S, S, C] -> tokens [B, 1 + (S/p)^2, D]: class token, then the patches, plus positions."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, px):
        cfg = self.config
        cls_tok = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,))
        p = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(px)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)
        tokens = jnp.concatenate([jnp.broadcast_to(cls_tok.astype(patches.dtype), (b, 1, cfg.hidden_size)),
                                  patches], axis=1)
        pos = nn.Embed(cfg.num_positions, cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(cfg.num_positions)[None])
        return tokens + pos


class ClipVisionTransformer(nn.Module):
    """px [B, S, S, C] -> pooled [B, D] (the class token after ``post_layernorm``)."""

    config: ClipVisionConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, px):
        cfg = self.config
        if px.shape[1:3] != (cfg.image_size, cfg.image_size):
            raise ValueError(f"CLIP vision tower: pixels must be [B, {cfg.image_size}, {cfg.image_size}, C] "
                             f"(its position embeddings are fixed to image_size), got {px.shape}")
        x = ClipVisionEmbeddings(cfg, self.dtype, name="embeddings")(px)
        x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="pre_layrnorm")(x)
        x = ClipEncoder(cfg, self.dtype, self.attention, causal=False, name="encoder")(x)[-1]
        return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="post_layernorm")(x[:, 0])


class ClipModel(nn.Module):
    """Both towers and projections (module docstring); features are projected, not normalised."""

    config: ClipModelConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    def setup(self):
        cfg, dt = self.config, self.dtype
        self.text_model = ClipTextTransformer(cfg.text, dt, self.attention)
        self.vision_model = ClipVisionTransformer(cfg.vision, dt, self.attention)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=dt)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False, dtype=dt)
        # CLIP's learnt temperature (log of 1 / 0.07 at init); the score does not use it
        self.logit_scale = self.param("logit_scale", lambda _, s: jnp.full(s, 2.6592), ())

    def image_features(self, px):
        """px [B, S, S, C] normalised pixels -> [B, P]."""
        return self.visual_projection(self.vision_model(px))

    def text_features(self, ids):
        """ids [B, L] int32 -> [B, P]."""
        return self.text_projection(self.text_model(ids)[2])

    def __call__(self, ids, px):
        return self.text_features(ids), self.image_features(px), self.logit_scale


__all__ = ["ClipModel", "ClipModelConfig", "ClipVisionConfig", "ClipVisionTransformer"]
