"""A sweep's cell files: ``out/cells/<id>.npz`` (samples, kinds, caption ids, AMG's trace) and
``out/cells/<id>.json`` (metrics, settings), written atomically; ``cell_status`` decides which
cells are done."""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from amg_jax.apps.sweep.backends import CellRun
from amg_jax.apps.sweep.config import Cell
from amg_jax.jsonio import write_atomic, write_json


def _cell_paths(out: str, cid: str) -> tuple[str, str]:
    return os.path.join(out, "cells", cid + ".json"), os.path.join(out, "cells", cid + ".npz")


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def cell_status(out: str, cid: str, settings: dict) -> tuple[str, Any]:
    """("done", record) when the cell's JSON and samples exist with these settings; ("stale",
    differing setting names) when they hold other settings; ("new", None) otherwise."""
    jpath, npath = _cell_paths(out, cid)
    rec = _read(jpath) if os.path.exists(jpath) else None
    if not isinstance(rec, dict) or "settings" not in rec or "metrics" not in rec:
        return ("stale", ["unreadable file"]) if os.path.exists(jpath) else ("new", None)
    stored = rec["settings"]
    if stored != settings:
        keys = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        return "stale", keys
    if not os.path.exists(npath):
        return "stale", ["samples file missing"]
    return "done", rec


def _write_cell(out: str, cell: Cell, rec: dict, run: CellRun) -> None:
    """Samples first, then the JSON (its presence marks the cell done); both atomic. A metric
    not defined for a group (NaN: the FD / FID of fewer than 2 samples, the alignment of an
    unconditional model) is ``null`` in the JSON, since NaN is not JSON; the tables show it as "-"."""
    jpath, npath = _cell_paths(out, cell.id)
    x = run.samples if run.samples.dtype == np.uint8 else run.samples.astype(np.float16)   # SD: uint8 images
    arrays = {"x": x, "kinds": run.kinds.astype(str),
              "caption_ids": run.caption_ids.astype(np.int32)}
    arrays.update({k: (v if k == "gate" else v.astype(np.float32)) for k, v in run.trace.items()})
    write_atomic(npath, lambda f: np.savez(f, **arrays), binary=True)
    write_json(jpath, rec, indent=1)


def _load_samples(out: str, cid: str) -> dict:
    with np.load(_cell_paths(out, cid)[1]) as z:
        return {k: z[k] for k in z.files}
