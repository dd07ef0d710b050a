"""Flax variables + their config in one ``.npz``: the converted SSCD and FID Inception weights.

Layout: one array per variable under its ``/``-joined path (``params/stem_conv/kernel``) and
``__config__``, a JSON string ``{"format": FORMAT, "config": config.to_dict()}``. Written
atomically; reading names the file and the problem (missing, truncated, another format).
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from flax import traverse_util

from amg_jax.jsonio import write_atomic


def _plain(tree):
    """Nested mappings (FrozenDict included) as plain dicts."""
    return {k: _plain(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def save_variables(path, variables, config, fmt: str) -> str:
    """Write ``variables`` (nested dict of arrays) and ``config`` (with ``to_dict``) as format
    ``fmt`` to ``path``, atomically; returns the path."""
    flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(_plain(variables), sep="/").items()}
    flat["__config__"] = np.array(json.dumps({"format": fmt, "config": config.to_dict()}))
    return write_atomic(os.fspath(path), lambda f: np.savez(f, **flat), binary=True)


def load_variables(path, fmt: str, config_cls, where: str, what: str = "params",
                   missing_hint: str = "") -> tuple[dict, object]:
    """``(variables, config)`` from a ``save_variables`` file of format ``fmt``. FileNotFoundError
    for a missing file ("no such {what} file", with ``missing_hint``), ValueError naming the file for an unreadable
    one, one without a config entry, or one of another format / with a bad config."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: no such {what} file: {path!r}{missing_hint}")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:
        raise ValueError(f"{where}: {path!r} is not a readable .npz file (truncated or corrupt?): "
                         f"{type(e).__name__}: {e}") from None
    if "__config__" not in arrays:
        raise ValueError(f"{where}: {path!r} has no '__config__' entry: not a params file written by save_params")
    try:
        meta = json.loads(str(arrays.pop("__config__")))
        if meta.get("format") != fmt:
            raise ValueError(f"format {meta.get('format')!r}, expected {fmt!r}")
        config = config_cls.from_dict(meta["config"])
    except Exception as e:
        raise ValueError(f"{where}: {path!r} has an invalid config entry: {e}") from None
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()}), config


__all__ = ["load_variables", "save_variables"]
