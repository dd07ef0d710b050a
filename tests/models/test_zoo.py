"""Shipped testbed models: train (tiny), export, load back, and the clear errors of a bad directory."""
import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.apps import cli
from amg_jax.data import testbed as tb
from amg_jax.guidance import CFG
from amg_jax.models import zoo
from amg_jax.samplers import SamplerConfig, keys_from_seeds, sample
from amg_jax.train import TrainConfig
from amg_jax.apps.models import SMALL_TESTBED, build_testbed, get_model

TINY = dict(channels=8, channel_mult=(1, 2), attention_resolutions=(8,), num_heads=2, num_groups=4, text_dim=8,
            text_layers=1)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cfg = TrainConfig(steps=2, batch_size=8, checkpoint_every=2)
    model, res, bed = zoo.train_model("text", str(root / "run"), cfg, testbed=tb.TestbedConfig(**SMALL_TESTBED),
                                      progress=False, echo=lambda *a: None, **TINY)
    out = zoo.export_model(str(root / "text"), "text", model, res.ema_params, bed, train_config=cfg,
                           train_seconds=res.seconds)
    return root, out, model, res


def test_export_then_load_gives_the_same_model(shipped):
    root, out, model, res = shipped
    assert sorted(os.listdir(out)) == sorted([zoo.CARD, zoo.PARAMS, zoo.BANK])
    lm = zoo.load_model(out)
    assert lm.card["kind"] == "text" and lm.card["training"]["steps"] == 2
    assert lm.model.config_dict() == model.config_dict()
    assert lm.denoiser.num_conditions == lm.bed.num_captions == len(lm.card["condition_names"])
    assert lm.bank.copy_threshold is not None and lm.bank.num_rows == len(lm.bed.unique_images)
    x = jnp.ones((2, 16, 16, 3))
    t = jnp.array([10, 500])
    c = jnp.array([0, -1])
    # exported and loaded params are exact copies, the same eps_fn: exact here (1e-5 is loose)
    np.testing.assert_allclose(np.asarray(lm.denoiser(x, t, c)), np.asarray(model.eps_fn(res.ema_params, x, t, c)),
                               rtol=1e-5, atol=1e-6)
    r = sample(lm.denoiser, CFG(3.0), SamplerConfig("ddim", num_steps=2), keys_from_seeds([0]), jnp.array([1]))
    assert r.x0.shape == (1, 16, 16, 3)
    zoo.update_card(out, memorization={"cfg": {"copied": 0.5}})
    assert zoo.read_card(out)["memorization"]["cfg"]["copied"] == 0.5


def test_bad_directories_fail_clearly(shipped, tmp_path):
    _, out, _, _ = shipped
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.load_model(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="has no card.json"):
        zoo.load_model(str(tmp_path / "empty"))

    def copy(name):
        d = tmp_path / name
        shutil.copytree(out, d)
        return d

    bad = copy("badjson")
    (bad / zoo.CARD).write_text("{oops")
    with pytest.raises(ValueError, match="unreadable"):
        zoo.load_model(str(bad))
    other = copy("other")                                       # weights of another architecture
    card = json.loads((other / zoo.CARD).read_text())
    card["unet"]["channels"] = 16
    (other / zoo.CARD).write_text(json.dumps(card))
    with pytest.raises(ValueError, match="do not match the card's UNet config"):
        zoo.load_model(str(other))
    trunc = copy("trunc")                                       # a truncated weights file
    files = [os.path.join(r, f) for r, _, fs in os.walk(trunc / zoo.PARAMS) for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    with pytest.raises(ValueError, match="weights"):
        zoo.load_model(str(trunc))
    noparams = copy("noparams")
    shutil.rmtree(noparams / zoo.PARAMS)
    with pytest.raises(FileNotFoundError, match="has no params/"):
        zoo.load_model(str(noparams))
    with pytest.raises(ValueError, match="unknown testbed model kind"):
        zoo.training_data(tb.make_testbed(tb.TestbedConfig(**SMALL_TESTBED)), "image")


def test_train_cli_validates_before_work(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--kind", "text"])                  # --workdir is required
    assert "--workdir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--kind", "text", "--workdir", "w", "--ema", "1.5"])
    assert "TrainConfig.ema_decay" in capsys.readouterr().err


def test_bench_loads_a_shipped_model_by_name_and_checks_its_testbed(shipped, monkeypatch, tmp_path):
    root, out, model, res = shipped
    monkeypatch.setenv("AMG_CHECKPOINTS", str(root))
    small = build_testbed("small")
    den = get_model("unet-text").denoiser(small)
    assert den.num_conditions == small.num_captions
    assert get_model("unet-text").bank(small).copy_threshold is not None
    with pytest.raises(ValueError, match=r"trained on another testbed .*image_size"):
        get_model("unet-text").denoiser(build_testbed("default"))
    with pytest.raises(FileNotFoundError, match="amg train --kind class"):
        get_model("unet-class").denoiser(small)
    # `amg eval` and `amg demo` run it by name
    assert cli.main(["eval", "--model", "unet-text", "--testbed", "small", "--prompts", "1", "--samples", "2",
                     "--steps", "3", "--out", str(tmp_path / "ev")]) == 0
    rep = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(rep["metrics"]) == {"specific", "duplicated", "generic", "all"}
    assert 0.0 <= rep["metrics"]["all"]["gate_open_rate"] <= 1.0
    assert cli.main(["demo", "--models", "unet-text", "--methods", "cfg,amg", "--testbed", "small", "--prompts",
                     "1", "--samples", "2", "--steps", "3", "--out", str(tmp_path / "demo"), "--no-progress"]) == 0
    rep = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert list(rep["results"]["unet-text"]) == ["cfg", "amg"]
    assert (tmp_path / "demo" / "grid_unet-text.png").exists()
