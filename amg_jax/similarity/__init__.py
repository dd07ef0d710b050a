"""Similarity detectors: pixel nL2 / cosine (``pixel``); SSCD and CLIP come later.

A detector maps ``x0_hat [B, ...]`` to ``(sigma [B], neighbour_index [B])`` against a
reference bank, higher sigma = more memorized, differentiable in ``x0_hat``.
"""
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
    "DETECTOR_KINDS", "NL2Result", "PixelDetector", "PixelDetectorConfig", "cosine_similarity",
    "dedup_reference", "flatten", "knn", "nearest_neighbor", "nl2", "pixel_cosine",
    "pixel_detector", "safe_norm", "squared_norms",
]
