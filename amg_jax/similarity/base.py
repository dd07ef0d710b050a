"""The detector contract AMG gates on: ``x0_hat -> Detection(sigma, index, label)``.

A detector is a pytree (its reference bank arrays are traced leaves; pass it into ``jit``
as an argument, never close over it) with::

    __call__(x0_hat [B, *S]) -> Detection     # differentiable in x0_hat (sigma)
    sigma_range: tuple[float, float]          # static: the interval sigma lies in
    scale: float                              # static: the detector's distance scale
                                              #   (pixel nL2: the bank's median k-NN mean
                                              #   distance m; 1 for cosines). AMG's
                                              #   data-scaled c3 is c3 * scale**2
    default_thresholds: tuple                 # optional: (lambda_min, lambda_max) for
                                              #   AMG's gate, (None, None) = none

``sigma`` is "higher = more memorized" (pixel nL2: ``-nL2`` in ``[-1/alpha, 0]``; SSCD /
CLIP / pixel cosine: the cosine in ``[-1, 1]``). ``label`` is the caption / class id of
the neighbour (-1 where the bank has none); caption deduplication uses it as ``y_N``.
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import jax

Array = jax.Array


class Detection(NamedTuple):
    """What a detector reports for a batch of ``x0_hat``: each field [B]."""

    sigma: Array    # float, higher = more memorized
    index: Array    # int32 row of the nearest neighbour in the bank (as the bank was built)
    label: Array    # int32 caption / class id of that neighbour, -1 if unlabelled


class Detector(Protocol):
    """What AMG needs of a detector (see the module docstring): a pytree with
    ``__call__(x0_hat [B, *S]) -> Detection`` (each field [B]), ``sigma_range`` and ``scale``
    (and optionally ``default_thresholds``)."""

    sigma_range: tuple
    scale: float

    def __call__(self, x0_hat: Array) -> Detection: ...


__all__ = ["Detection", "Detector"]
