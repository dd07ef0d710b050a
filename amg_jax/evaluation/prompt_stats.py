"""Per-prompt memorization statistics and bootstrap intervals over prompts.

On a memorized-prompt benchmark the seeds of one prompt are not independent draws: a prompt
either reproduces its training image or not, and its seeds follow. So the unit of the table's
uncertainty is the prompt: the aggregates (share of samples with SSCD > 0.5, the 95th percentile
and the max of SSCD, the CLIP score) get percentile-bootstrap intervals over resampled prompts
(``detection.bootstrap_ci``), and each prompt gets its own line: its max and mean SSCD to the bank
over its seeds and the share of its seeds above the threshold (the papers' per-prompt view:
"only 100-120 of the 500 prompts reach max SSCD > 0.7 over 10 seeds").
"""
from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np

from amg_jax.evaluation.detection import bootstrap_ci

PROMPT_COLUMNS = ("prompt_id", "kind", "seeds", "sscd_max", "sscd_mean", "frac_seeds_above", "clip_score", "prompt")


def prompt_rows(sims, prompt_ids, prompts: Sequence[str], kinds=None, *, threshold: float = 0.5,
                clip=None) -> list[dict]:
    """One row per prompt (in id order) from per-sample ``sims`` [N] (SSCD to the nearest bank
    image) and ``prompt_ids`` [N] (an index into ``prompts``): ``seeds``, ``sscd_max``,
    ``sscd_mean``, ``frac_seeds_above`` (> ``threshold``), ``clip_score`` (mean of ``clip`` [N],
    None without) and the prompt's ``kind`` (``kinds`` [N], per sample)."""
    s = np.asarray(sims, np.float64).reshape(-1)
    ids = np.asarray(prompt_ids).reshape(-1)
    if s.shape != ids.shape:
        raise ValueError(f"prompt_rows: {s.size} similarities for {ids.size} prompt ids")
    c = None if clip is None else np.asarray(clip, np.float64).reshape(-1)
    rows = []
    for p in np.unique(ids):
        sel = ids == p
        v = s[sel]
        rows.append({"prompt_id": int(p), "kind": None if kinds is None else str(np.asarray(kinds)[sel][0]),
                     "seeds": int(sel.sum()), "sscd_max": float(v.max()), "sscd_mean": float(v.mean()),
                     "frac_seeds_above": float(np.mean(v > threshold)),
                     "clip_score": None if c is None else float(c[sel].mean()), "prompt": prompts[int(p)]})
    return rows


def prompt_csv(rows: list[dict], threshold: float = 0.5) -> str:
    """``prompt_rows`` as CSV text; the share column is named after the threshold."""
    cols = [f"frac_seeds_above_{threshold:g}" if k == "frac_seeds_above" else k for k in PROMPT_COLUMNS]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r[k] is None else r[k] for k in PROMPT_COLUMNS])
    return buf.getvalue()


def aggregate_cis(sims, prompt_ids, *, threshold: float = 0.5, clip=None, n_boot: int = 1000,
                  level: float = 0.95, rng=0) -> dict:
    """``{metric: [lo, hi]}``: bootstrap-over-prompts intervals of the table's aggregates over
    samples ``sims`` [N]: ``frac_sscd_above_{threshold}``, ``sscd_top5pct`` (95th percentile),
    ``sscd_top1`` (max), ``sscd_mean`` and, with ``clip`` [N], ``clip_score``."""
    s = np.asarray(sims, np.float64).reshape(-1)
    stats = {f"frac_sscd_above_{threshold:g}": lambda rows, _: float(np.mean(s[rows] > threshold)),
             "sscd_top5pct": lambda rows, _: float(np.percentile(s[rows], 95.0)),
             "sscd_top1": lambda rows, _: float(np.max(s[rows])),
             "sscd_mean": lambda rows, _: float(np.mean(s[rows]))}
    if clip is not None:
        c = np.asarray(clip, np.float64).reshape(-1)
        stats["clip_score"] = lambda rows, _: float(np.mean(c[rows]))
    return {k: list(bootstrap_ci(f, prompt_ids, n_boot=n_boot, level=level, rng=rng)) for k, f in stats.items()}


__all__ = ["PROMPT_COLUMNS", "aggregate_cis", "prompt_csv", "prompt_rows"]
