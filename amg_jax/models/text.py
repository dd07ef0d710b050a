"""Text conditioning for the testbed: a word-level tokenizer and a small Flax transformer encoder.

The same shape of conditioning Stable Diffusion uses (a token sequence -> per-token embeddings
[B, L, D] that the UNet cross-attends to), sized for the testbed's captions:

- ``CaptionTokenizer``: a word vocabulary built from the training captions (plus ``<pad>``,
  ``<bos>``, ``<unk>``); ``encode(captions) -> ids [N, L]`` with ``<bos>`` first and ``<pad>``
  after the words. The empty caption ``""`` is ``[<bos>, <pad>, ...]``: the null condition of
  classifier-free guidance. Captions longer than ``max_length - 1`` words are truncated with a
  warning (as CLIP's tokenizer truncates at 77 tokens). Unknown words map to ``<unk>``.
- ``TextEncoder``: token + learned position embeddings, ``num_layers`` pre-LayerNorm
  self-attention blocks with a padding mask, a final LayerNorm. Trained jointly with the UNet.
"""
from __future__ import annotations

import dataclasses
import re
import warnings
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.jsonio import read_json, write_json

PAD, BOS, UNK = "<pad>", "<bos>", "<unk>"
SPECIALS = (PAD, BOS, UNK)


def words(caption: str) -> list[str]:
    """Lower-cased words of a caption (letters, digits and apostrophes)."""
    return re.findall(r"[a-z0-9']+", str(caption).lower())


@dataclasses.dataclass(frozen=True)
class CaptionTokenizer:
    """Word-level tokenizer. ``vocab``: the words (ids ``len(SPECIALS)`` ...); ``max_length``:
    tokens per caption including ``<bos>``."""

    vocab: tuple
    max_length: int = 16

    def __post_init__(self):
        if not isinstance(self.max_length, (int, np.integer)) or isinstance(self.max_length, bool) \
                or self.max_length < 2:
            raise ValueError(f"CaptionTokenizer.max_length must be an integer >= 2, got {self.max_length!r}")
        vocab = tuple(str(w) for w in self.vocab)
        if len(set(vocab)) != len(vocab):
            raise ValueError("CaptionTokenizer.vocab has repeated words")
        bad = [w for w in vocab if w in SPECIALS or words(w) != [w]]
        if bad:
            raise ValueError(f"CaptionTokenizer.vocab has entries that are not single lower-case words: {bad[:3]}")
        object.__setattr__(self, "vocab", vocab)

    @classmethod
    def from_captions(cls, captions: Sequence[str], max_length: int | None = None) -> "CaptionTokenizer":
        """The vocabulary of ``captions`` (sorted); ``max_length`` defaults to the longest + 1."""
        vocab = sorted({w for c in captions for w in words(c)})
        longest = max((len(words(c)) for c in captions), default=0)
        return cls(vocab=tuple(vocab), max_length=int(max_length or longest + 1))

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.vocab)

    @property
    def pad_id(self) -> int:
        return SPECIALS.index(PAD)

    @property
    def bos_id(self) -> int:
        return SPECIALS.index(BOS)

    @property
    def unk_id(self) -> int:
        return SPECIALS.index(UNK)

    def encode(self, captions: Sequence[str] | str) -> np.ndarray:
        """Token ids [N, max_length] int32 (a single string gives [1, max_length])."""
        if isinstance(captions, str):
            captions = [captions]
        index = {w: i + len(SPECIALS) for i, w in enumerate(self.vocab)}
        out = np.full((len(captions), self.max_length), self.pad_id, np.int32)
        out[:, 0] = self.bos_id
        for n, c in enumerate(captions):
            ws = words(c)
            if len(ws) > self.max_length - 1:
                warnings.warn(f"caption {c!r} has {len(ws)} words; truncated to {self.max_length - 1} "
                              f"(max_length {self.max_length} includes <bos>)", stacklevel=2)
                ws = ws[: self.max_length - 1]
            out[n, 1:1 + len(ws)] = [index.get(w, self.unk_id) for w in ws]
        return out

    def decode(self, ids) -> list[str]:
        """Captions back from ids [N, L] (specials dropped)."""
        names = list(SPECIALS) + list(self.vocab)
        return [" ".join(names[i] for i in row if i >= len(SPECIALS)) for row in np.asarray(ids).reshape(-1, self.max_length)]

    def to_dict(self) -> dict:
        return {"vocab": list(self.vocab), "max_length": int(self.max_length)}

    @classmethod
    def from_dict(cls, d: dict) -> "CaptionTokenizer":
        try:
            return cls(vocab=tuple(d["vocab"]), max_length=int(d["max_length"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a tokenizer description (needs 'vocab' and 'max_length'): {e}") from None

    def save(self, path: str) -> None:
        write_json(path, self.to_dict(), indent=None)

    @classmethod
    def load(cls, path: str) -> "CaptionTokenizer":
        return cls.from_dict(read_json(path, "tokenizer file"))


class TransformerBlock(nn.Module):
    """Pre-LN self-attention + MLP. x: [B, L, D]; mask: [B, L] bool (True = a real token)."""

    dim: int
    num_heads: int = 4
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, x, mask):
        att_mask = nn.make_attention_mask(mask, mask)
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(num_heads=self.num_heads, qkv_features=self.dim)(h, h, mask=att_mask)
        h = nn.LayerNorm()(x)
        h = nn.Dense(self.dim * self.mlp_ratio)(h)
        return x + nn.Dense(self.dim)(nn.gelu(h))


class TextEncoder(nn.Module):
    """ids [B, L] int32 -> (embeddings [B, L, dim], mask [B, L] bool). ``<pad>`` (id 0) is masked
    out; ``<bos>`` is always present, so every caption (the empty one too) has a key to attend to."""

    vocab_size: int
    max_length: int
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4

    @nn.compact
    def __call__(self, ids):
        mask = ids != 0
        x = nn.Embed(self.vocab_size, self.dim, name="token")(ids)
        pos = self.param("position", nn.initializers.normal(0.02), (self.max_length, self.dim))
        x = x + pos[None, : ids.shape[1]]
        for i in range(self.num_layers):
            x = TransformerBlock(self.dim, self.num_heads, name=f"block{i}")(x, mask)
        return nn.LayerNorm(name="final_norm")(x), mask


def pooled(emb: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of the real tokens' embeddings: [B, L, D], [B, L] -> [B, D]."""
    m = mask.astype(emb.dtype)[..., None]
    return jnp.sum(emb * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


__all__ = ["BOS", "CaptionTokenizer", "PAD", "SPECIALS", "TextEncoder", "TransformerBlock", "UNK", "pooled", "words"]
