"""CLIP's text encoder (transformers' ``CLIPTextModel`` / ``CLIPTextModelWithProjection``) as amg_jax's own
Flax module: SD 1.x's (quick-GELU), SD 2.x's OpenCLIP one (GELU), and SDXL's two.

The parameter tree is transformers' Flax one (``text_model/encoder/layers/0/self_attn/q_proj/kernel``,
``text_projection/kernel``), so ``flax_model.msgpack`` loads as it is; PyTorch weights map by name.

``ClipTextConfig.from_dict(config_json, where)``; ``ClipTextEncoder(config, dtype, attention,
projection)(ids [B, L]) -> ClipTextOutput`` with ``last`` [B, L, D] (after the final LayerNorm: SD 1.x /
2.x's condition), ``penultimate`` [B, L, D] (the second-to-last layer's output, no final LayerNorm:
SDXL's), ``pooled`` [B, D] (``last`` at the end token) and ``projected`` [B, P] (``text_projection`` of
``pooled``; SDXL's ``text_embeds``; None without ``projection``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from amg_jax.models.attention import attend

ACTIVATIONS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
               "gelu": lambda x: jax.nn.gelu(x, approximate=False)}


def check_transformer(cfg: dict, where: str, prefix: str = "") -> tuple[str, int, int]:
    """(hidden_act, hidden_size, num_attention_heads) of a CLIP tower's config dict, checked: an activation
    we implement, and heads that divide the width (ValueError naming ``where`` and the field)."""
    act = cfg.get("hidden_act", "quick_gelu")
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: {prefix}hidden_act={act!r} is not supported; expected one of {list(ACTIVATIONS)}")
    hidden, heads = int(cfg.get("hidden_size", 768)), int(cfg.get("num_attention_heads", 12))
    if hidden % heads:
        raise ValueError(f"{where}: {prefix}hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    return act, hidden, heads


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 2
    projection_dim: int = 768

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "text_encoder/config.json") -> "ClipTextConfig":
        if cfg.get("model_type", "clip_text_model") not in ("clip_text_model", "clip"):
            raise ValueError(f"{where}: model_type={cfg['model_type']!r} is not a CLIP text model")
        if "text_config" in cfg:            # a full CLIPModel config: its text half
            cfg = dict(cfg["text_config"], projection_dim=cfg.get("projection_dim", 512))
        act, hidden, heads = check_transformer(cfg, where)
        return cls(vocab_size=int(cfg.get("vocab_size", 49408)), hidden_size=hidden,
                   intermediate_size=int(cfg.get("intermediate_size", 3072)),
                   num_hidden_layers=int(cfg.get("num_hidden_layers", 12)), num_attention_heads=heads,
                   max_position_embeddings=int(cfg.get("max_position_embeddings", 77)), hidden_act=act,
                   layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-5)), eos_token_id=int(cfg.get("eos_token_id", 2)),
                   projection_dim=int(cfg.get("projection_dim", 768)))


class ClipTextOutput(NamedTuple):
    last: jax.Array
    penultimate: jax.Array
    pooled: jax.Array
    projected: jax.Array | None


class ClipAttention(nn.Module):
    """Multi-head self-attention (q / k / v / out projections with biases); causal in the text tower,
    not in the vision tower (``clip_model``)."""

    config: ClipTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        c, dt = self.config.hidden_size, self.dtype
        q, k, v = (nn.Dense(c, dtype=dt, name=f"{n}_proj")(x) for n in "qkv")
        y = attend(q, k, v, self.config.num_attention_heads, self.attention, causal=self.causal)
        return nn.Dense(c, dtype=dt, name="out_proj")(y)


class ClipMlp(nn.Module):
    config: ClipTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(ACTIVATIONS[self.config.hidden_act](h))


class ClipLayer(nn.Module):
    """Pre-LayerNorm transformer layer: x + attn(ln1(x)), then + mlp(ln2(.))."""

    config: ClipTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        x = x + ClipAttention(cfg, dt, self.attention, self.causal, name="self_attn")(
            nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="layer_norm1")(x))
        return x + ClipMlp(cfg, dt, name="mlp")(nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=dt, name="layer_norm2")(x))


class ClipLayers(nn.Module):
    """The layer stack as transformers names it (``layers/0``, ``layers/1``, ...); returns every layer's
    output."""

    config: ClipTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        outs = []
        for i in range(self.config.num_hidden_layers):
            x = ClipLayer(self.config, self.dtype, self.attention, self.causal, name=str(i))(x)
            outs.append(x)
        return outs


class ClipEmbeddings(nn.Module):
    config: ClipTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        tok = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")(ids)
        pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype, name="position_embedding")(
            jnp.arange(ids.shape[-1])[None])
        return tok + pos


class ClipTextTransformer(nn.Module):
    config: ClipTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"

    @nn.compact
    def __call__(self, ids):
        cfg = self.config
        x = ClipEmbeddings(cfg, self.dtype, name="embeddings")(ids)
        outs = ClipEncoder(cfg, self.dtype, self.attention, name="encoder")(x)
        last = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name="final_layer_norm")(outs[-1])
        penultimate = outs[-2] if len(outs) > 1 else x
        # transformers' pooling: the end token's position (the highest id, for configs with the legacy eos id 2)
        end = jnp.argmax(ids, axis=-1) if cfg.eos_token_id == 2 else jnp.argmax(ids == cfg.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, end[:, None, None], axis=1)[:, 0]
        return last, penultimate, pooled


class ClipEncoder(nn.Module):
    """The layer stack under transformers' name (``encoder/layers``); every layer's output."""

    config: ClipTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    causal: bool = True

    @nn.compact
    def __call__(self, x):
        return ClipLayers(self.config, self.dtype, self.attention, self.causal, name="layers")(x)


class ClipTextEncoder(nn.Module):
    """ids [B, L] int32 -> ``ClipTextOutput`` (module docstring); ``projection``: CLIPTextModelWithProjection's
    ``text_projection`` (no bias) on the pooled output."""

    config: ClipTextConfig
    dtype: Any = jnp.float32
    attention: str = "auto"
    projection: bool = False

    @nn.compact
    def __call__(self, ids):
        last, penultimate, pooled = ClipTextTransformer(self.config, self.dtype, self.attention, name="text_model")(ids)
        projected = None
        if self.projection:
            projected = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                                 name="text_projection")(pooled)
        return ClipTextOutput(last, penultimate, pooled, projected)


__all__ = ["ACTIVATIONS", "check_transformer", "ClipEncoder", "ClipTextConfig", "ClipTextEncoder", "ClipTextOutput", "ClipTextTransformer"]
