"""Per-prompt SSCD statistics and the bootstrap intervals over prompts, against NumPy references
on fixed inputs."""
import csv
import io

import numpy as np
import pytest

from amg_jax.evaluation.prompt_stats import aggregate_cis, prompt_csv, prompt_rows

SIMS = np.array([0.9, 0.2, 0.6, 0.1, 0.3, 0.45, 0.8, 0.55, 0.7])
IDS = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
PROMPTS = ["copied one", "ordinary", "half, copied"]


def test_prompt_rows_and_csv():
    clip = np.arange(9, dtype=float)
    rows = prompt_rows(SIMS, IDS, PROMPTS, np.array(["m"] * 3 + ["g"] * 3 + ["m"] * 3), clip=clip)
    assert [r["prompt_id"] for r in rows] == [0, 1, 2] and [r["kind"] for r in rows] == ["m", "g", "m"]
    for r, p in zip(rows, range(3)):
        v = SIMS[IDS == p]
        assert r["seeds"] == 3 and r["sscd_max"] == v.max() and r["sscd_mean"] == pytest.approx(v.mean())
        assert r["frac_seeds_above"] == pytest.approx(np.mean(v > 0.5))
        assert r["clip_score"] == pytest.approx(clip[IDS == p].mean())
    table = list(csv.DictReader(io.StringIO(prompt_csv(rows))))
    assert table[2]["prompt"] == "half, copied" and float(table[2]["frac_seeds_above_0.5"]) == 1.0
    assert float(table[1]["sscd_max"]) == 0.45
    no_clip = list(csv.DictReader(io.StringIO(prompt_csv(prompt_rows(SIMS, IDS, PROMPTS)))))
    assert no_clip[0]["clip_score"] == "" and no_clip[0]["kind"] == ""
    with pytest.raises(ValueError, match="9 similarities for 3 prompt ids"):
        prompt_rows(SIMS, IDS[:3], PROMPTS)


def _numpy_bootstrap(stat, n_boot, rng):
    """The reference: draw prompts with replacement (the same generator calls), pool their seeds."""
    r = np.random.default_rng(rng)
    vals = []
    for _ in range(n_boot):
        pick = r.integers(0, 3, 3)
        pooled = np.concatenate([SIMS[IDS == p] for p in pick])
        vals.append(stat(pooled))
    return np.quantile(vals, [0.025, 0.975])


def test_aggregate_intervals_match_a_numpy_bootstrap():
    cis = aggregate_cis(SIMS, IDS, n_boot=200, rng=3)
    refs = {"frac_sscd_above_0.5": lambda v: np.mean(v > 0.5), "sscd_top5pct": lambda v: np.percentile(v, 95),
            "sscd_top1": np.max, "sscd_mean": np.mean}
    assert set(cis) == set(refs)
    for k, f in refs.items():
        np.testing.assert_allclose(cis[k], _numpy_bootstrap(f, 200, 3), rtol=0, atol=1e-12)   # same draws, float64
        full = f(SIMS)
        assert cis[k][0] <= full + 1e-12 and cis[k][1] >= full - 1e-12, (k, cis[k], full)
    with_clip = aggregate_cis(SIMS, IDS, clip=SIMS * 100, n_boot=200, rng=3)
    np.testing.assert_allclose(with_clip["clip_score"], np.asarray(cis["sscd_mean"]) * 100, atol=1e-9)
