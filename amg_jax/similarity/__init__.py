"""Similarity detectors over a reference bank (``amg_jax.index``): pixel nL2 / cosine
(``pixel``), embedding cosine (``embedding``: the interface SSCD and CLIP plug into), the SSCD
copy-detection network (``sscd``) and CLIP (``clip``; import it as ``amg_jax.similarity.clip``:
it loads transformers).

A detector maps ``x0_hat [B, ...]`` to ``Detection(sigma [B], index [B], label [B])``, higher
sigma = more memorized, differentiable in ``x0_hat`` (the contract in ``base``).
"""
from amg_jax.similarity.base import Detection, Detector
from amg_jax.similarity.embedding import EmbeddingDetector, embedding_detector, through_decoder
from amg_jax.similarity.pixel import (
    DETECTOR_KINDS,
    NL2Result,
    PixelDetector,
    PixelDetectorConfig,
    cosine_similarity,
    dedup_reference,
    flatten,
    knn,
    nearest_neighbor,
    nl2,
    pixel_cosine,
    pixel_detector,
    safe_norm,
    squared_norms,
)
from amg_jax.similarity.sscd import SSCD, SSCDConfig, convert_torchscript, sscd_detector

__all__ = [
    "DETECTOR_KINDS", "Detection", "Detector", "EmbeddingDetector", "NL2Result", "PixelDetector",
    "PixelDetectorConfig", "cosine_similarity", "dedup_reference", "embedding_detector", "flatten", "knn",
    "nearest_neighbor", "nl2", "pixel_cosine", "pixel_detector", "safe_norm", "squared_norms",
    "SSCD", "SSCDConfig", "convert_torchscript", "sscd_detector", "through_decoder",
]
