"""`amg sample` (``apps.sample``) on Stable Diffusion: CFG equals the library call, AMG with SSCD
moves samples off their bank copy, bad arguments are named before any work.

All on a tiny random-weight SD and a tiny SSCD written by the tests themselves (``tiny_sd``).
"""
import json
import os

import chex
import numpy as np
import pytest

from amg_jax.apps import cli
from amg_jax.images import to_uint8
from amg_jax.similarity import sscd
from tiny_sd import PROMPTS, SSCD_CFG, STEPS


@pytest.fixture(scope="module")
def env(tiny_sd_env):
    return tiny_sd_env


def test_cli_sample_cfg_and_amg(env, tmp_path, capsys):
    """CFG through `amg sample` equals the library call; AMG with SSCD (gate always open, G_dup from
    the bank's captions, a random-number prompt baseline) moves both samples off their bank copy."""
    from PIL import Image

    root = env["root"]
    common = ["sample", "--model", f"sd:{env['sd_dir']}", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
              "--steps", str(STEPS), "--batch", "3"]
    out = tmp_path / "cfg"
    assert cli.main(common + ["--out", str(out)]) == 0
    rep = json.loads((out / "samples.json").read_text())
    assert rep["complete"] and [s["prompt"] for s in rep["samples"]] == PROMPTS
    assert [s["seed"] for s in rep["samples"]] == [0, 0]
    assert sorted(os.listdir(out / "images")) == ["0000.png", "0001.png"]
    ref = to_uint8(np.asarray(env["den"].decode(env["cfg"].x0))).astype(np.float32)
    cfg_png = np.stack([np.asarray(Image.open(out / "images" / f"000{i}.png"), np.float32) for i in range(2)])
    assert np.abs(cfg_png - ref).max() <= 1.0                         # batches sharded over the test's devices

    out2 = tmp_path / "amg"
    assert cli.main(common + ["--out", str(out2), "--guidance", "amg", "--detector", f"sscd:{root / 'sscd.npz'}",
                              "--bank", str(root / "bank.npz"), "--c3", "1000", "--lambda-min", "-0.5",
                              "--lambda-max", "-0.5", "--baseline", "rna"]) == 0
    rep = json.loads((out2 / "samples.json").read_text())
    assert len(rep["samples"]) == 2 and all(s["gate_open_rate"] == 1.0 for s in rep["samples"])
    assert rep["samples"][0]["prompt"] != PROMPTS[0]                  # random numbers were added
    trace = np.load(out2 / "trace.npz")
    chex.assert_shape(trace["sigma"], (2, STEPS))
    assert trace["s2"].max() > 0                                      # caption deduplication acted
    amg_png = np.stack([np.asarray(Image.open(out2 / "images" / f"000{i}.png"), np.float32) for i in range(2)])

    def bank_cosine(png):
        e = sscd.embed_images(env["params"], png / 127.5 - 1.0, SSCD_CFG)
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        return np.max(e @ np.asarray(env["bank"].rows).T, axis=1)
    assert np.all(bank_cosine(amg_png) < bank_cosine(cfg_png) - 1e-4)     # (a random tiny SSCD: cosines all ~1)


def test_cli_sample_measures_sscd_per_prompt(env, tmp_path, capsys):
    """--measure: each stored image's SSCD to the bank, the per-prompt CSV and the aggregates with
    bootstrap intervals; --clip: each image's CLIP score with its prompt, in the CSV and the aggregates;
    prompts from a Wen et al.-style .jsonl ("caption" lines)."""
    import csv

    from PIL import Image

    from amg_jax.similarity import clip

    root = env["root"]
    clip_dir = clip.write_tiny_clip(str(tmp_path / "clip"), seed=0)
    plist = tmp_path / "mem.jsonl"
    plist.write_text("".join(json.dumps({"caption": p, "index": i, "url": "http://127.0.0.1:1/x.jpg"}) + "\n"
                             for i, p in enumerate(PROMPTS)))
    out = tmp_path / "measured"
    assert cli.main(["sample", "--model", f"sd:{env['sd_dir']}", "--prompts-file", str(plist), "--seeds", "2",
                     "--steps", str(STEPS), "--batch", "3", "--out", str(out), "--measure", f"sscd:{root / 'sscd.npz'}",
                     "--bank", str(root / "bank.npz"), "--clip", clip_dir]) == 0
    printed = capsys.readouterr().out
    assert "SSCD to the bank > 0.5" in printed and "2 prompts" in printed and "CLIP score: " in printed
    rep = json.loads((out / "samples.json").read_text())
    assert [s["prompt"] for s in rep["samples"]] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    png = np.stack([np.asarray(Image.open(out / s["image"]), np.float32) for s in rep["samples"]])
    e = sscd.embed_images(env["params"], png / 127.5 - 1.0, SSCD_CFG)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    rows = np.asarray(env["bank"].rows)[:env["bank"].size]
    ref = np.max(e @ (rows / np.linalg.norm(rows, axis=1, keepdims=True)).T, axis=1)
    got = np.array([s["sscd"] for s in rep["samples"]])
    np.testing.assert_allclose(got, ref, atol=1e-5)        # float32 embeddings of the same PNGs, sharded vs not
    table = list(csv.DictReader(open(out / "per_prompt.csv")))
    assert [r["prompt"] for r in table] == PROMPTS and [r["seeds"] for r in table] == ["2", "2"]
    for p, r in enumerate(table):
        assert float(r["sscd_max"]) == pytest.approx(got[2 * p: 2 * p + 2].max(), abs=1e-12)
    m = rep["sscd"]
    assert m["prompts"] == 2 and m["frac_sscd_above_0.5"] == np.mean(got > 0.5)
    lo, hi = m["sscd_top1_ci"]
    assert min(got[:2].max(), got[2:].max()) - 1e-9 <= lo <= hi <= got.max() + 1e-9
    # CLIP scores of the stored PNGs with their prompts: the same float32 computation on the same images
    # (batch of 3 vs 4, padded to a bucket either way): 1e-4 on a 0-100 scale
    bundle = clip.load_clip(clip_dir)
    cs = np.array([s["clip_score"] for s in rep["samples"]])
    np.testing.assert_allclose(cs, np.asarray(clip.clip_score(bundle, png / 127.5 - 1.0,
                                                              [s["prompt"] for s in rep["samples"]])), atol=1e-3)
    assert m["clip_score"] == pytest.approx(cs.mean()) and m["clip_score_ci"][0] <= m["clip_score_ci"][1]
    for p, r in enumerate(table):
        assert float(r["clip_score"]) == pytest.approx(cs[2 * p: 2 * p + 2].mean(), abs=1e-9)


@pytest.mark.parametrize("args, message", [
    (["--measure", "clip:x"], "must be sscd:PARAMS.npz"),
    (["--measure", "sscd:/no/sscd.npz"], "does not exist (make it with amg convert sscd)"),
    (["--measure", "sscd:{sscd}"], "--measure needs --bank"),
    (["--model", "unet-text"], "must be sd:PATH_OR_HUB_ID"),
    (["--clip", "{sscd}"], "must be a CLIP directory or hub id"),
    (["--guidance", "amg"], "AMG needs --detector"),
    (["--guidance", "amg", "--detector", "sscd:{sscd}"], "AMG needs --bank"),
    (["--guidance", "amg", "--detector", "sscd:/no/sscd.npz"], "does not exist (make it with amg convert sscd)"),
    (["--guidance", "amg", "--detector", "sscd:{sscd}", "--bank", "/no/bank.npz"], "does not exist"),
    (["--c3", "5"], "AMG settings need --method amg"),
    (["--guidance", "amg", "--detector", "sscd:{sscd}", "--bank", "{bank}", "--lambda-min", "-3"], "lambda_min=-3.0 lies outside"),
    (["--height", "60"], "not divisible by 8"),
])
def test_cli_sample_bad_arguments(env, tmp_path, capsys, args, message):
    base = ["sample", "--model", f"sd:{env['sd_dir']}", "--prompt", "x", "--out", str(tmp_path / "o"), "--steps", "1"]
    if "--model" in args:
        base = base[:1] + base[3:]
    args = [a.format(bank=env["root"] / "bank.npz", sscd=env["root"] / "sscd.npz") for a in args]
    with pytest.raises(SystemExit) as e:
        cli.main(base + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
