"""The shipped artefacts in checkpoints/: three trained UNets with cards and banks, the evaluation network."""
import json
import os

import numpy as np
import pytest

from amg_jax.apps import cli
from amg_jax.apps import models as registry
from amg_jax.models import zoo
from amg_jax.evaluation.evalnet import load_evaluator

ROOT = registry.checkpoints_dir()


@pytest.mark.parametrize("kind", zoo.KINDS)
def test_shipped_model_loads_with_its_card(kind):
    lm = zoo.load_model(os.path.join(ROOT, kind))
    card = lm.card
    assert card["kind"] == kind and lm.bed.config == registry.testbed_config("unet")
    assert card["unet"]["prediction"] == "v"
    assert card["training"]["steps"] >= 1000 and card["training"]["seconds"] > 0
    assert card["training_command"].startswith("amg train --kind " + kind)
    mem = card["memorization"]["per_kind"]
    assert 0.0 <= mem["all"]["frac_copied"] <= 1.0 and mem["all"]["count"] >= 256
    assert lm.bank.copy_threshold is not None and lm.bank.num_rows == len(lm.bed.unique_images)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ROOT, kind)) for f in fs)
    assert size < 8 * 2 ** 20, f"{kind}: {size / 2 ** 20:.1f} MiB"


def test_shipped_evaluator_judges_the_unet_testbed():
    ev = load_evaluator(os.path.join(ROOT, registry.EVALNET))
    assert ev.config == registry.testbed_config("unet")
    assert min(ev.accuracy[a] for a in ("shape", "colour", "size", "position", "background", "texture")) > 0.95
    assert registry.bench_evaluator(registry.build_testbed("unet")) is not None
    assert registry.bench_evaluator(registry.build_testbed("small")) is None


def test_default_demo_runs_on_the_shipped_text_model(tmp_path):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--prompts", "1", "--samples", "2", "--steps", "3", "--out", str(out),
                     "--no-progress"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["config"]["models"] == ["unet-text"] and rep["fd_features"] == "evalnet"
    assert list(rep["results"]["unet-text"]) == ["cfg", "stp", "dtp", "amg"]
    for r in rep["results"]["unet-text"].values():
        assert np.isfinite(r["all"]["fd"]) and 0 <= r["all"]["alignment"] <= 1
    assert (out / "grid_unet-text.png").exists() and (out / "similarity_unet-text.png").exists()


@pytest.mark.parametrize("model, method, kinds", [("unet-class", "amg", {"circle", "square", "triangle", "cross"}),
                                                  ("unet-uncond", "amg", {"uncond"}),
                                                  ("unet-uncond", "none", {"uncond"})])
def test_eval_runs_the_shipped_class_and_unconditional_models(tmp_path, model, method, kinds):
    out = tmp_path / "ev"
    assert cli.main(["eval", "--model", model, "--method", method, "--prompts", "1", "--samples", "2", "--steps",
                     "3", "--out", str(out)]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert set(rep["metrics"]) == kinds | {"all"}
    assert np.isfinite(rep["metrics"]["all"]["fd"])


def test_unconditional_model_refuses_cfg(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "unet-uncond", "--method", "cfg", "--out", str(tmp_path / "x")])
    assert "needs a condition" in capsys.readouterr().err
