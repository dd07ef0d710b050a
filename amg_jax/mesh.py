"""The one ``Mesh`` helper: a 1-D mesh over devices, in ``jax.devices()`` order.

Every sharded computation uses it: the seeds of a sampling batch along ``BATCH_AXIS``
(``sharding.sample_sharded``), a reference bank's rows along ``BANK_AXIS`` (``index.shard_bank``),
the images of a bank build (``index_build.sharded_embedder``) and the gather of a divergence report
(``samplers.report_divergence``). The same device order everywhere, so a sharded bank and the batch
share one device layout.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

BATCH_AXIS = "batch"       # a batch of samples / images split over the devices
BANK_AXIS = "bank"         # a reference bank's rows split over the devices


def make_mesh(devices=None, axis: str = BATCH_AXIS) -> Mesh:
    """One 1-D ``Mesh`` named ``axis`` over ``devices`` (default ``jax.devices()``: every device
    of every process once ``jax.distributed`` is initialized), in ``jax.devices()`` order, the
    order ``index.shard_bank`` uses, so a sharded bank and the batch share one device layout."""
    if not isinstance(axis, str) or not axis:
        raise ValueError(f"make_mesh: axis must be a non-empty string, got {axis!r}")
    devs = np.asarray(jax.devices() if devices is None else list(devices), dtype=object).reshape(-1)
    if devs.size == 0:
        raise ValueError("make_mesh: no devices given")
    if len({d.id for d in devs}) != devs.size:
        raise ValueError(f"make_mesh: repeated devices {[d.id for d in devs]}")
    return Mesh(devs, (axis,))


__all__ = ["BANK_AXIS", "BATCH_AXIS", "make_mesh"]
