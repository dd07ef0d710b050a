"""The SD detection table (``apps.sd_detection``): memorized prompts against a contrast set on the
tiny random SD with the tiny SSCD; the per-prompt AUC against a brute-force reference on the
written per-sample scores, the copy criterion, the stored screen, and config errors."""
import json
import os
import shutil

import numpy as np
import pytest

from amg_jax.apps.screens import read_bank_screen
from amg_jax.apps.sd_detection import load_config, run_sd_detection
from tiny_sd import PROMPTS, STEPS

DETECTORS = {"noise_magnitude_first", "noise_magnitude", "noise_magnitude_step", "alignment", "anisotropy"}


def _config(tmp_path, env, **over) -> str:
    (tmp_path / "mem.jsonl").write_text("".join(json.dumps({"caption": p, "url": "http://127.0.0.1:1/x"}) + "\n"
                                                for p in PROMPTS))
    (tmp_path / "ordinary.txt").write_text("a green cone\na yellow torus\n")
    shutil.copy(env["root"] / "bank.npz", tmp_path / "bank.npz")      # the stored screen goes beside this copy
    keys = dict(model=f"sd:{env['sd_dir']}", memorized="mem.jsonl", ordinary="ordinary.txt", out="out",
                samples_per_prompt=2, steps=STEPS, batch=4, n_boot=50, window=2, sscd=str(env["root"] / "sscd.npz"),
                bank="bank.npz")
    keys.update(over)
    path = tmp_path / "detection.toml"
    path.write_text("[detection]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items() if v is not None))
    return str(path)


def test_memorized_against_ordinary_prompts_and_the_stored_screen(tmp_path, tiny_sd_env):
    cfg = load_config(_config(tmp_path, tiny_sd_env))
    rep = run_sd_detection(cfg, store=True, echo=lambda *a: None)
    assert rep["samples"] == 8 and rep["prompts"] == {"memorized": 2, "ordinary": 2}
    assert set(rep["memorized_vs_ordinary"]) == DETECTORS
    ps = rep["per_sample"]
    mem = np.array(ps["memorized"])
    assert mem.tolist() == [True] * 4 + [False] * 4 and ps["prompt_id"] == [0, 0, 1, 1, 2, 2, 3, 3]
    for name in DETECTORS:
        r = rep["memorized_vs_ordinary"][name]
        s = np.array(ps[name])
        # brute force: the share of (memorized, ordinary) pairs ranked right, ties 1/2 (scores rounded to 1e-6)
        pairs = [(a > b) + 0.5 * (a == b) for a in s[mem] for b in s[~mem]]
        assert r["auc_sample"] == pytest.approx(np.mean(pairs), abs=1e-4)
        pm = s.reshape(4, 2).mean(axis=1)
        assert r["auc_prompt"] == pytest.approx(np.mean([(a > b) + 0.5 * (a == b) for a in pm[:2] for b in pm[2:]]),
                                                abs=1e-4)
        assert r["auc_sample_ci"][0] <= r["auc_sample_ci"][1]
    # the copy criterion: the bank holds seed 0 of the memorized prompts' CFG samples
    sims = np.array(ps["sscd"])
    assert rep["copy_rate"]["memorized"] == np.mean(sims[:4] > 0.5)
    s = rep["screen"]
    assert s["name"] == "noise_magnitude" and s["recall"] >= 0.95
    stored = read_bank_screen(str(tmp_path / "bank.npz"))
    assert stored is not None and stored.name == "noise_magnitude" and stored.threshold == pytest.approx(s["threshold"])
    assert dict(stored.settings) == {"window": 2}
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == ["detection.json", "detection.md", "per_sample.csv"]
    md = (out / "detection.md").read_text()
    assert "## memorized vs ordinary prompts" in md and "| noise_magnitude |" in md
    lines = (out / "per_sample.csv").read_text().splitlines()
    assert len(lines) == 9 and lines[1].endswith(PROMPTS[0])


@pytest.mark.parametrize("over, message", [
    ({"bogus": 1}, "has no setting 'bogus'"),
    ({"ordinary": "missing.txt"}, "ordinary: "),
    ({"bank": None}, "sscd and bank go together"),
    ({"model": "unet-text"}, "must be sd:PATH_OR_HUB_ID"),
    ({"recall": 1.5}, "recall: must lie in (0, 1]"),
    ({"screen": "anything"}, "screen: must be one of"),
])
def test_bad_configs_name_the_key(tmp_path, tiny_sd_env, over, message):
    with pytest.raises(ValueError) as e:
        load_config(_config(tmp_path, tiny_sd_env, **over))
    assert message in str(e.value)
