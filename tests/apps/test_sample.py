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


@pytest.mark.parametrize("args, message", [
    (["--model", "unet-text"], "must be sd:PATH_OR_HUB_ID"),
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
