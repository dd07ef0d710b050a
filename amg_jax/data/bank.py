"""The testbed's reference bank: its training images as a pixel bank with the calibrated copy distance."""
from __future__ import annotations

from amg_jax.data.testbed import calibrate_copy_threshold
from amg_jax.index import ReferenceBank, build_bank


def bank_from_testbed(testbed, *, labels="captions", calibrate: bool = True, rng=0) -> ReferenceBank:
    """Pixel bank of ``testbed``'s training images (deduplicated) with their ``labels`` ([N] ints,
    e.g. class ids; ``"captions"``: the caption ids; None: no labels) and, when ``calibrate``, the
    calibrated copy threshold (``calibrate_copy_threshold(testbed, rng)``)."""
    thr = calibrate_copy_threshold(testbed, rng=rng) if calibrate else None
    labels = testbed.labels if isinstance(labels, str) and labels == "captions" else labels
    return build_bank(testbed.images, labels, kind="pixel", dedup=True, copy_threshold=thr)


__all__ = ["bank_from_testbed"]
