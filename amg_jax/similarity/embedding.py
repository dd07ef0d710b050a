"""Embedding detectors: ``sigma = max cosine(E(x0_hat), bank rows)`` for any embedder ``E``.

The interface SSCD and CLIP plug into: an ``embed_fn(embed_params, x0_hat [B, *S]) -> [B, E]``
(static; e.g. a Flax module's ``apply``, with the VAE decoder in front for latents), its
``embed_params`` (a traced pytree) and an embedding ``ReferenceBank`` whose rows are
L2-normalised. The detector follows the contract in ``amg_jax.similarity.base``::

    sigma = <E(x0_hat) / |E(x0_hat)|, e_n>      the nearest (most cosine-similar) bank row e_n
    index, label = that row's source row and caption / class id

``sigma_range = (-1, 1)``, ``scale = 1`` (the paper keeps ``c3`` raw for SSCD cosine). The
paper calls a sample memorized when SSCD ``sigma > 0.5`` (strict: ``> 0.4``). ``sigma`` is
differentiable in ``x0_hat`` through ``embed_fn``.

``embed_fn`` is a static field: it is part of the jit cache key, so pass the same function
object each time (a new ``lambda`` per call recompiles).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np
from flax import struct

from amg_jax import index as _index
from amg_jax.index import ReferenceBank, build_bank
from amg_jax.similarity.base import Detection

Array = jax.Array


@struct.dataclass
class EmbeddingDetector:
    """``x0_hat [B, *S] -> Detection(sigma, index, label)`` by cosine in an embedding space.

    embed_fn:     static ``(embed_params, x0_hat [B, *S]) -> [B, E]``.
    embed_params: traced pytree of the embedder's parameters.
    bank:         ``ReferenceBank`` of kind "embedding", rows L2-normalised [M, E].
    thresholds:   static (lambda_min, lambda_max) AMG's gate uses when its config leaves them
                  unset; (None, None) = none (set them in the AMG config).
    """

    embed_params: Any
    bank: ReferenceBank
    embed_fn: Callable = struct.field(pytree_node=False, default=None)
    thresholds: tuple = struct.field(pytree_node=False, default=(None, None))

    sigma_range = (-1.0, 1.0)
    scale = 1.0

    @property
    def default_thresholds(self) -> tuple:
        return self.thresholds

    @property
    def size(self) -> int:
        return self.bank.size

    def embed(self, x0_hat: Array) -> Array:
        """The embedding of ``x0_hat`` [B, E] (not normalised), shape-checked against the bank."""
        e = self.embed_fn(self.embed_params, x0_hat)
        if e.ndim != 2 or e.shape[0] != x0_hat.shape[0] or e.shape[1] != self.bank.dim:
            raise ValueError(f"embedding detector: embed_fn returned shape {tuple(e.shape)} for a batch of "
                             f"{x0_hat.shape[0]}, expected ({x0_hat.shape[0]}, {self.bank.dim}) to match the bank")
        return e

    def __call__(self, x0_hat: Array) -> Detection:
        d = self.details(x0_hat)
        return Detection(sigma=d["sigma"], index=d["index"], label=d["label"])

    def details(self, x0_hat: Array) -> dict:
        """sigma (= cosine), index (source row), label, and the embedding [B, E]."""
        return _details(self, x0_hat)


@jax.jit
def _details(det: EmbeddingDetector, x0_hat: Array) -> dict:
    """EmbeddingDetector.details (jitted: eager calls hit the compilation cache)."""
    e = det.embed(x0_hat)
    cos, row = _index.search(det.bank, e, 1, metric="cosine")
    src, lab = det.bank.lookup(row[:, 0])
    return {"sigma": cos[:, 0], "index": src, "label": lab, "cosine": cos[:, 0], "embedding": e}


CHECKPOINT_POLICIES = ("none", "full", "dots")


@functools.lru_cache(maxsize=None)
def through_decoder(decode_fn: Callable, embed_fn: Callable, remat: bool | str = True) -> Callable:
    """``embed_fn`` behind a latent decoder, for detectors on Stable Diffusion latents:
    ``(params, z [B, h, w, c]) -> embed_fn(params[1], decode_fn(params[0], z))`` with
    ``params = (decoder_params, embed_params)``.

    ``remat``, the ``jax.checkpoint`` policy of the decoder + embedder (``G_sim`` differentiates
    through both): "full" (or True) saves nothing and recomputes both in the backward pass, so the
    UNet's backward never holds the decoder's full-resolution activations beside its own (README,
    "Design notes": performance rules); "dots" saves the convolution / matmul outputs
    (``jax.checkpoint_policies.dots_saveable``: less recomputation, more memory); "none" (or False)
    no checkpoint. Cached: the same arguments give the same function object, so jit caches hit."""
    policy = {True: "full", False: "none"}.get(remat, remat) if isinstance(remat, bool) else remat
    if policy not in CHECKPOINT_POLICIES:
        raise ValueError(f"through_decoder: remat must be one of {list(CHECKPOINT_POLICIES)} (or a bool), "
                         f"got {remat!r}")

    def decoded(params, z):
        dec_params, emb_params = params
        return embed_fn(emb_params, decode_fn(dec_params, z))

    if policy == "none":
        return decoded
    if policy == "dots":
        return jax.checkpoint(decoded, policy=jax.checkpoint_policies.dots_saveable)
    return jax.checkpoint(decoded)


def embedding_detector(embed_fn: Callable, embed_params: Any, bank_or_embeddings, labels=None, *,
                       dedup: bool | None = None, thresholds: tuple | None = None) -> EmbeddingDetector:
    """An embedding detector. ``bank_or_embeddings``: an embedding ``ReferenceBank`` with
    normalised rows (possibly sharded), or embeddings ``[M, E]`` of the reference images (a bank
    is built: L2-normalised, deduplicated unless ``dedup=False``, with ``labels [M]``).
    ``thresholds``: optional default (lambda_min, lambda_max) in (-1, 1) for AMG's gate."""
    if not callable(embed_fn):
        raise ValueError(f"embedding_detector: embed_fn must be callable, got {type(embed_fn).__name__}")
    if isinstance(bank_or_embeddings, ReferenceBank):
        if labels is not None or dedup is not None:
            raise ValueError("embedding_detector: labels / dedup belong to the bank; pass them to build_bank")
        bank = bank_or_embeddings
        if bank.kind != "embedding" or not bank.normalized:
            raise ValueError(f"embedding_detector: the bank must be of kind 'embedding' with normalised rows "
                             f"(build_bank(..., kind='embedding', normalize=True)), got kind {bank.kind!r}, "
                             f"normalized={bank.normalized}")
    else:
        e = np.asarray(bank_or_embeddings)
        if e.ndim != 2:
            raise ValueError(f"embedding_detector: embeddings must be [M, E], got shape {e.shape}")
        bank = build_bank(e, labels, kind="embedding", dedup=dedup is not False, normalize=True)
    if thresholds is None:
        thresholds = (None, None)
    else:
        thresholds = tuple(thresholds)
        if len(thresholds) != 2 or not all(-1.0 < float(v) < 1.0 for v in thresholds):
            raise ValueError(f"embedding_detector: thresholds must be two numbers in (-1, 1), got {thresholds!r}")
        thresholds = tuple(float(v) for v in thresholds)
    return EmbeddingDetector(embed_params=embed_params, bank=bank, embed_fn=embed_fn, thresholds=thresholds)


__all__ = ["EmbeddingDetector", "embedding_detector", "through_decoder"]
