"""Similarity detectors over a reference bank (``amg_jax.index``): pixel nL2 / cosine
(``pixel``), embedding cosine (``embedding``: the interface SSCD and CLIP plug into).

A detector maps ``x0_hat [B, ...]`` to ``Detection(sigma [B], index [B], label [B])``, higher
sigma = more memorized, differentiable in ``x0_hat`` (the contract in ``base``).
"""
from amg_jax.similarity.base import Detection, Detector
from amg_jax.similarity.embedding import EmbeddingDetector, embedding_detector
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

__all__ = [
    "DETECTOR_KINDS", "Detection", "Detector", "EmbeddingDetector", "NL2Result", "PixelDetector",
    "PixelDetectorConfig", "cosine_similarity", "dedup_reference", "embedding_detector", "flatten", "knn",
    "nearest_neighbor", "nl2", "pixel_cosine", "pixel_detector", "safe_norm", "squared_norms",
]
