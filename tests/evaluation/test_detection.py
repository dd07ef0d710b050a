"""AUC, TPR at a fixed FPR, the recall calibration and the bootstrap against brute-force NumPy
references, ties included (scores on a coarse grid so many tie)."""
import numpy as np
import pytest

from amg_jax.evaluation.detection import (auc, bootstrap_ci, calibrate_threshold, detection_report, per_prompt,
                                          recall, tpr_at_fpr)


def brute_auc(s, p):
    pos, neg = s[p], s[~p]
    total = 0.0
    for a in pos:
        for b in neg:
            total += 1.0 if a > b else 0.5 if a == b else 0.0
    return total / (pos.size * neg.size)


def brute_tpr(s, p, fpr):
    best = 0.0
    for thr in np.r_[-np.inf, np.unique(s)]:       # every distinct cut, flagging score > thr
        if np.mean(s[~p] > thr) <= fpr + 1e-12:
            best = max(best, np.mean(s[p] > thr))
    return best


@pytest.mark.parametrize("seed", range(6))
def test_auc_and_tpr_match_brute_force_with_ties(seed):
    r = np.random.default_rng(seed)
    n = int(r.integers(20, 300))
    p = r.random(n) < 0.3
    s = np.round(r.normal(size=n) + 1.2 * p, 1)          # one decimal: many ties, across classes too
    assert np.unique(s).size < n
    assert auc(s, p) == pytest.approx(brute_auc(s, p), abs=1e-12)
    for fpr in (0.0, 0.01, 0.05, 0.3):
        assert tpr_at_fpr(s, p, fpr) == pytest.approx(brute_tpr(s, p, fpr), abs=1e-12)


def test_edge_cases():
    s, p = np.array([1.0, 1.0, 1.0]), np.array([True, False, False])
    assert auc(s, p) == 0.5                                 # all tied
    assert tpr_at_fpr(s, p, 0.01) == 0.0                    # flagging the tie would flag every negative
    assert np.isnan(auc([1.0, 2.0], [True, True]))
    with pytest.raises(ValueError, match="NaN/inf"):
        auc([np.nan, 1.0], [True, False])
    with pytest.raises(ValueError, match="differ in length"):
        auc([1.0, 2.0], [True])


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95, 1.0])
def test_calibration_reaches_its_recall_and_is_the_largest_such_threshold(target):
    r = np.random.default_rng(3)
    s = np.round(r.normal(size=400), 2).astype(np.float32)
    p = r.random(400) < 0.4
    thr = calibrate_threshold(s, p, target)
    assert recall(s, p, thr) >= target
    higher = np.unique(s[p][s[p] > thr])                     # the next cut up loses the recall
    if higher.size:
        assert recall(s, p, float(higher[0])) < target
    with pytest.raises(ValueError, match="no positives"):
        calibrate_threshold(s, np.zeros(400, bool))
    with pytest.raises(ValueError, match="recall must be in"):
        calibrate_threshold(s, p, 0.0)


def test_per_prompt_and_bootstrap():
    ids = np.array([3, 3, 1, 1, 1, 7])
    u, m = per_prompt([1.0, 3.0, 0.0, 0.0, 3.0, 5.0], ids, "mean")
    assert u.tolist() == [1, 3, 7] and m.tolist() == [1.0, 2.0, 5.0]
    assert per_prompt([False, True, False, False, False, False], ids, "any")[1].tolist() == [False, True, False]
    # the bootstrap of the mean over 40 prompts x 5 seeds brackets the mean, and narrows with more prompts
    r = np.random.default_rng(0)
    v = r.normal(size=200)
    g = np.repeat(np.arange(40), 5)
    lo, hi = bootstrap_ci(lambda rows, draw: float(np.mean(v[rows])), g, n_boot=400, rng=1)
    assert lo < v.mean() < hi
    v2, g2 = r.normal(size=2000), np.repeat(np.arange(400), 5)
    lo2, hi2 = bootstrap_ci(lambda rows, draw: float(np.mean(v2[rows])), g2, n_boot=400, rng=1)
    assert (hi2 - lo2) < 0.6 * (hi - lo)
    # a prompt drawn twice counts as two prompts: the draw index separates them
    seen = []
    bootstrap_ci(lambda rows, draw: seen.append((rows.copy(), draw.copy())) or 0.0, np.array([0, 0, 1]), n_boot=5)
    for rows, draw in seen:
        assert rows.size == draw.size and np.all(np.diff(draw) >= 0) and draw.max() == 1


def test_detection_report_matches_the_functions():
    r = np.random.default_rng(4)
    ids = np.repeat(np.arange(30), 4)
    mem = np.repeat(r.random(30) < 0.4, 4)
    p = mem & (r.random(120) < 0.7)
    s = r.normal(size=120) + 2.0 * mem
    rep = detection_report(s, p, ids, n_boot=200)
    assert rep["auc_sample"] == pytest.approx(brute_auc(s, p))
    ps, pp = per_prompt(s, ids)[1], per_prompt(p, ids, "any")[1]
    assert rep["auc_prompt"] == pytest.approx(brute_auc(ps, pp))
    assert rep["tpr_at_1pct_fpr_prompt"] == pytest.approx(brute_tpr(ps, pp, 0.01))
    assert rep["n_prompts"] == 30 and rep["n_positive"] == int(p.sum())
    for k in ("auc_sample", "auc_prompt"):
        lo, hi = rep[k + "_ci"]
        assert lo <= rep[k] <= hi
