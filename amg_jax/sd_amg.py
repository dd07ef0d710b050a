"""AMG's parts on Stable Diffusion: the latent detector, the bank's captions as y_N, the papers' settings.

AMG's detector on SD works on latents: ``x0_hat [B, h, w, 4]`` is decoded by the VAE and embedded
by SSCD (the papers' copy detector) or CLIP, and ``sigma`` is the cosine to the nearest bank row::

    det = latent_detector(sd, "sscd", "sscd.npz", "bank.npz")       # amg index build --embedder sscd:...
    conds = bank_conditions(sd, load_captions("bank.npz"))           # y_N of G_dup, [C, 77, D]
    g = build_method("amg", 7.5, detector=det, neighbour_conds=conds, amg=SD_AMG)
    res = sample(sd_denoiser(sd), g, sd_sampler_config(sd, 50), keys, encode_prompts(sd, prompts))

``G_sim`` differentiates through the UNet (full gradient), the VAE decoder and the embedder; the
decoder + embedder run under ``jax.checkpoint`` (``through_decoder``), so the backward pass
recomputes their activations instead of holding them (the decoder's are at full resolution).

Gate defaults on SD (a choice; the README's methods section): SSCD ``(0.2, 0.5)`` - the
papers call a sample copied at SSCD > 0.5, and an early, blurry ``x0_hat`` has a low similarity
to everything; CLIP image cosine ``(0.7, 0.9)``. ``c3`` is raw (``c3_units="raw"``, the paper's
100 on SSCD cosine).
"""
from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from amg_jax.index import ReferenceBank, load_bank
from amg_jax.models import stable_diffusion as sdm
from amg_jax.similarity import clip, sscd
from amg_jax.similarity.embedding import EmbeddingDetector, embedding_detector, through_decoder

Array = jax.Array

DETECTOR_KINDS = ("sscd", "clip")
DEFAULT_THRESHOLDS = {"sscd": (0.2, 0.5), "clip": (0.7, 0.9)}
SD_AMG = {"c1": 4.0, "c2": 3.0, "c3": 100.0, "c3_units": "raw"}       # the papers' SD settings
CHECKPOINT_POLICIES = ("dots", "full", "blocks", "none")              # latent_detector's ``remat``


@functools.lru_cache(maxsize=None)
def _decoder(static: Any):
    def decode(vae_params, latents: Array) -> Array:
        """latents [B, h, w, C] -> pixels [B, 8h, 8w, 3] (float32, not clipped: differentiable)."""
        return sdm.vae_decode_raw(static, vae_params, latents)

    return decode


def latent_decoder(sd, *, remat_blocks: bool = False) -> Any:
    """The VAE decoder of ``sd`` as a stable function ``(vae_params, latents [B, h, w, C]) -> pixels
    [B, H, W, 3]`` (one object per VAE config / scaling / dtype / ``remat_blocks``, so jit caches hit);
    ``remat_blocks``: each decoder block under ``nn.remat`` (the "blocks" checkpoint policy)."""
    vae = sd.vae.clone(remat_blocks=True) if remat_blocks else sd.vae
    return _decoder(sdm.vae_static(vae, sd.vae_scaling_factor, jnp.dtype(vae.dtype).name))


def _embedder(kind: str, weights):
    """(embed_fn, embed_params) of an SSCD params file / (params, config) or a CLIP dir / bundle."""
    if kind == "sscd":
        params, config = sscd.load_params(weights) if isinstance(weights, (str, os.PathLike)) else weights
        return sscd.make_embed_fn(config), params
    bundle = clip.load_clip(os.fspath(weights)) if isinstance(weights, (str, os.PathLike)) else weights
    return bundle.embed_fn, bundle.vision_params


def latent_detector(sd, kind: str, weights, bank, *, thresholds: tuple | None = None,
                    remat: bool | str = "dots") -> EmbeddingDetector:
    """AMG's detector on SD latents: VAE decode -> ``kind`` ("sscd" | "clip") -> cosine to ``bank``.

    weights: SSCD: a params file from ``amg convert sscd`` or ``(params, SSCDConfig)``; CLIP: a
             model directory / hub id or a ``ClipBundle``.
    bank:    an embedding ``ReferenceBank`` (or its ``.npz`` path, ``amg index build``) of the
             same embedder; thresholds: AMG's default gate (default ``DEFAULT_THRESHOLDS[kind]``).
    remat:   the ``jax.checkpoint`` policy of the VAE decoder + embedder under ``G_sim``'s gradient
             (``CHECKPOINT_POLICIES``): "dots" (default: keep convolution / matmul outputs, recompute the
             norms and activations; measured the least memory and time, README "Performance"), "full"
             (recompute both in the backward pass), "blocks" ("full", and inside it each decoder layer
             rematerialised on its own), "none".
    """
    if isinstance(remat, bool):
        remat = "full" if remat else "none"
    if remat not in CHECKPOINT_POLICIES:
        raise ValueError(f"latent detector: remat must be one of {list(CHECKPOINT_POLICIES)}, got {remat!r}")
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"latent detector: kind must be one of {DETECTOR_KINDS}, got {kind!r}")
    if isinstance(bank, (str, os.PathLike)):
        bank = load_bank(os.fspath(bank))
    if not isinstance(bank, ReferenceBank) or bank.kind != "embedding":
        raise ValueError(f"latent detector: the bank must be an embedding bank (amg index build --embedder "
                         f"{kind}:...), got {getattr(bank, 'kind', type(bank).__name__)!r}")
    embed_fn, params = _embedder(kind, weights)
    blocks = remat == "blocks"
    fn = through_decoder(latent_decoder(sd, remat_blocks=blocks), embed_fn, "full" if blocks else remat)
    det = embedding_detector(fn, (sd.vae_params, params), bank,
                             thresholds=DEFAULT_THRESHOLDS[kind] if thresholds is None else thresholds)
    probe = jax.eval_shape(det.embed_fn, det.embed_params,
                           jax.ShapeDtypeStruct((1, 8, 8, sd.latent_channels), jnp.float32))
    if probe.shape[-1] != bank.dim:
        raise ValueError(f"latent detector: the {kind} embedder gives {probe.shape[-1]}-d embeddings, the bank "
                         f"holds {bank.dim}-d rows (built with another embedder?)")
    return det


def bank_conditions(sd, captions: Sequence[str], *, batch: int = 64) -> Array:
    """Text embeddings [C, L, D] of the bank's captions (label id -> condition): AMG's ``y_N`` for
    caption deduplication (``make_amg(..., neighbour_conds=...)``)."""
    captions = list(captions)
    if not captions:
        raise ValueError("bank_conditions: the bank has no captions (caption deduplication needs them)")
    return sdm.encode_prompts(sd, captions, batch=batch)


__all__ = ["CHECKPOINT_POLICIES", "DEFAULT_THRESHOLDS", "DETECTOR_KINDS", "SD_AMG", "bank_conditions", "latent_decoder", "latent_detector"]
