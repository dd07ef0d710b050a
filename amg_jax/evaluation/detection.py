"""Detection quality the way the memorization papers report it: ROC AUC and TPR at a fixed FPR
(Wen et al. 2024: TPR at 1% FPR), per sample and per prompt, with bootstrap confidence intervals
over prompts; and the screen's threshold for a target recall of copies.

Conventions: ``scores`` [n] higher = more likely memorized; ``positive`` [n] bool (the ground
truth: a copy); a detector flags ``score > threshold``. Ties count half in the AUC (the
Mann-Whitney statistic) and never split at a threshold (tied scores are flagged together).
"""
from __future__ import annotations

from typing import Callable

import numpy as np


def _split(scores, positive) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, np.float64).reshape(-1)
    p = np.asarray(positive, bool).reshape(-1)
    if s.shape != p.shape:
        raise ValueError(f"scores {s.shape} and positive {p.shape} differ in length")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} NaN/inf values")
    return s[p], s[~p]


def auc(scores, positive) -> float:
    """ROC AUC = P(score_pos > score_neg) + P(equal) / 2; NaN when one class is empty."""
    pos, neg = _split(scores, positive)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left")
    upto = np.searchsorted(neg, pos, side="right")
    return float(np.sum(below + 0.5 * (upto - below)) / (pos.size * neg.size))


def tpr_at_fpr(scores, positive, fpr: float = 0.01) -> float:
    """The largest TPR of a threshold whose FPR (share of negatives with ``score > threshold``) is at
    most ``fpr``: the threshold is the (k+1)-th largest negative, k = floor(fpr * n_neg)."""
    pos, neg = _split(scores, positive)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    allowed = int(np.floor(fpr * neg.size + 1e-9))
    if allowed >= neg.size:
        return 1.0
    thr = np.sort(neg)[::-1][allowed]
    return float(np.mean(pos > thr))


def calibrate_threshold(scores, positive, recall: float = 0.95) -> float:
    """The largest threshold that flags (``score > threshold``) at least ``recall`` of the positives:
    just below the k-th smallest positive score, k = n_pos - ceil(recall * n_pos)."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall!r}")
    pos, _ = _split(scores, positive)
    if pos.size == 0:
        raise ValueError("no positives (copies) to calibrate the screen on: sample more, or more memorized prompts")
    pos = np.sort(pos)
    k = pos.size - int(np.ceil(recall * pos.size - 1e-9))
    return float(np.nextafter(np.float32(pos[k]), np.float32(-np.inf)))


def recall(scores, positive, threshold: float) -> float:
    """Share of the positives flagged (``score > threshold``)."""
    pos, _ = _split(scores, positive)
    return float(np.mean(pos > threshold)) if pos.size else float("nan")


def per_prompt(values, prompt_ids, how: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """(prompt ids [P], value per prompt [P]): the ``mean`` (scores, averaged over a prompt's seeds
    as Wen et al.) or ``any`` (ground truth: a prompt copies if any of its seeds does)."""
    v = np.asarray(values).reshape(-1)
    ids = np.asarray(prompt_ids).reshape(-1)
    uniq, inv = np.unique(ids, return_inverse=True)
    if how == "mean":
        out = np.bincount(inv, weights=v.astype(np.float64)) / np.bincount(inv)
    elif how == "any":
        out = np.bincount(inv, weights=v.astype(bool).astype(np.float64)) > 0
    else:
        raise ValueError(f"how must be 'mean' or 'any', got {how!r}")
    return uniq, out


def bootstrap_ci(stat: Callable[[np.ndarray, np.ndarray], float], groups, *, n_boot: int = 1000,
                 level: float = 0.95, rng=0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``stat(rows, draw)`` over resampled groups: ``groups`` [n]
    the cluster of each row (a prompt: its seeds are not independent); one resample draws as many
    groups as there are, with replacement, and hands ``stat`` the row indices and, per row, the
    draw it came from (a prompt drawn twice counts as two prompts). Resamples where ``stat`` is
    NaN (a class went empty) are dropped."""
    g = np.asarray(groups).reshape(-1)
    uniq, inv = np.unique(g, return_inverse=True)
    members = [np.flatnonzero(inv == i) for i in range(uniq.size)]
    r = np.random.default_rng(rng)
    vals = []
    for _ in range(n_boot):
        pick = r.integers(0, uniq.size, uniq.size)
        rows = np.concatenate([members[i] for i in pick])
        draw = np.repeat(np.arange(pick.size), [members[i].size for i in pick])
        v = stat(rows, draw)
        if np.isfinite(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(np.asarray(vals), [a, 1.0 - a])
    return float(lo), float(hi)


def detection_report(scores, positive, prompt_ids, *, fpr: float = 0.01, n_boot: int = 1000, rng=0) -> dict:
    """``auc_sample`` / ``tpr_at_1pct_fpr`` (per sample) and ``auc_prompt`` / ``tpr_at_1pct_fpr_prompt``
    (per prompt: the mean score of its seeds against "any of its seeds copies"), each with ``*_ci``
    [lo, hi] (bootstrap over prompts), and the counts."""
    s = np.asarray(scores, np.float64).reshape(-1)
    p = np.asarray(positive, bool).reshape(-1)
    ids = np.asarray(prompt_ids).reshape(-1)
    if not s.shape == p.shape == ids.shape:
        raise ValueError(f"scores {s.shape}, positive {p.shape} and prompt_ids {ids.shape} differ in length")

    def prompts(rows, draw):
        return per_prompt(s[rows], draw, "mean")[1], per_prompt(p[rows], draw, "any")[1]

    stats = {"auc_sample": lambda r, d: auc(s[r], p[r]),
             "tpr_at_1pct_fpr": lambda r, d: tpr_at_fpr(s[r], p[r], fpr),
             "auc_prompt": lambda r, d: auc(*prompts(r, d)),
             "tpr_at_1pct_fpr_prompt": lambda r, d: tpr_at_fpr(*prompts(r, d), fpr)}
    _, any_copy = per_prompt(p, ids, "any")
    out = {"n_samples": int(s.size), "n_positive": int(p.sum()), "n_prompts": int(any_copy.size),
           "n_positive_prompts": int(any_copy.sum())}
    rows = np.arange(s.size)
    draw = np.unique(ids, return_inverse=True)[1]
    for name, fn in stats.items():
        out[name] = fn(rows, draw)
        out[name + "_ci"] = list(bootstrap_ci(fn, ids, n_boot=n_boot, rng=rng))
    return out



def cummax_of_running_mean(d: np.ndarray, k: int) -> np.ndarray:
    """The latched windowed screen's peak: max over j < k of mean(d[:, :j+1]); d [B, N] -> [B]."""
    k = min(k, d.shape[1])
    means = np.cumsum(d[:, :k], axis=1) / np.arange(1, k + 1)
    return means.max(axis=1)


def screen_signals(trace: dict, window: int, gamma: float) -> tuple[dict, dict]:
    """({detector: score [B]}, {detector: the latched screen's peak [B]}) from the trace of a CFG run
    behind the anisotropy probe with gamma 1 (``ScreenedGuidance(CFG, CFG, Anisotropy(gamma=1), inf)``:
    ``d`` [B, N] is ||eps_c - eps_u|| per step, ``screen`` [B, N] the probe's m_0 + cos); ``gamma``
    weighs the cosine in the anisotropy score."""
    d = np.asarray(trace["d"], np.float64)
    align = np.asarray(trace["screen"], np.float64)[:, 0] - d[:, 0]
    scores = {"noise_magnitude_first": d[:, 0],
              "noise_magnitude": d[:, :window].mean(axis=1),
              "noise_magnitude_step": d.max(axis=1),
              "alignment": align,
              "anisotropy": d[:, 0] + gamma * align}
    peaks = dict(scores, noise_magnitude=cummax_of_running_mean(d, window))
    return scores, peaks

__all__ = ["cummax_of_running_mean", "screen_signals", "auc", "bootstrap_ci", "calibrate_threshold", "detection_report", "per_prompt", "recall", "tpr_at_fpr"]
