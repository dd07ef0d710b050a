"""The --screen choice: resolution against a stored calibration, the stored files, the errors
before any work, and `amg eval --screen auto` reporting the flag rate beside the gate-open rate."""
import json

import pytest

from amg_jax.apps import cli
from amg_jax.apps.models import get_model
from amg_jax.apps.screens import (bank_screen_path, check_screen_choice, model_screen, read_bank_screen,
                                  resolve_screen, write_screen)
from amg_jax.guidance.screen import NoiseMagnitude, ScreenedGuidance


def _fail(field, msg):
    raise ValueError(f"{field} {msg}")


def test_stored_screen_round_trip_and_resolution(tmp_path):
    bank = str(tmp_path / "bank.npz")
    assert read_bank_screen(bank) is None
    path = write_screen(bank_screen_path(bank), "noise_magnitude", 0.25, {"window": 3}, recall=0.96)
    assert path.endswith("bank.screen.json") and json.load(open(path))["recall"] == 0.96
    cal = read_bank_screen(bank)
    assert cal.build() == NoiseMagnitude(window=3) and cal.threshold == 0.25
    assert resolve_screen("auto", cal, None, "amg", "x") == (NoiseMagnitude(window=3), 0.25)
    assert resolve_screen("auto", cal, None, "dtp", "x") == (None, None)     # auto: AMG only
    assert resolve_screen("auto", None, None, "amg", "x") == (None, None)
    assert resolve_screen("none", cal, None, "amg", "x") == (None, None)
    assert resolve_screen("noise_magnitude", cal, None, "amg", "x") == (NoiseMagnitude(window=3), 0.25)
    assert resolve_screen("noise_magnitude_first", None, 0.5, "dtp", "x") == (NoiseMagnitude(window=1), 0.5)
    with pytest.raises(ValueError, match="has no calibrated threshold here"):
        resolve_screen("anisotropy", cal, None, "amg", "x")
    with pytest.raises(ValueError, match="nothing to gate"):
        resolve_screen("noise_magnitude", cal, None, "cfg", "x")
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        write_screen(str(tmp_path / "s.json"), "noise_magnitude", float("nan"))
    with pytest.raises(ValueError, match="needs --screen NAME"):
        check_screen_choice("auto", 1.0, _fail)
    with pytest.raises(ValueError, match="must be one of"):
        check_screen_choice("nope", None, _fail)


def test_the_shipped_text_unet_has_a_calibrated_screen():
    cal = model_screen(get_model("unet-text"))
    assert cal is not None and cal.threshold > 0
    assert model_screen(get_model("mixture")) is None


def test_bad_screen_arguments_fail_before_any_work(tmp_path, capsys):
    out = tmp_path / "e"
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "unet-text", "--method", "cfg", "--screen", "noise_magnitude",
                  "--screen-threshold", "1", "--out", str(out)])
    assert "nothing to gate" in capsys.readouterr().err and not out.exists()


def test_eval_with_the_stored_screen_reports_its_flag_rate(tmp_path, capsys):
    out = tmp_path / "e"
    assert cli.main(["eval", "--model", "unet-text", "--method", "amg", "--screen", "auto", "--kinds",
                     "duplicated,generic", "--prompts", "1", "--samples", "2", "--steps", "3", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    for r in report["metrics"].values():
        assert 0.0 <= r["screen_flag_rate"] <= 1.0 and r["gate_open_rate"] is not None
    assert report["config"]["screen"] == "auto"
    assert "screen flagged" in capsys.readouterr().out


def test_sweep_cells_resolve_the_screen_into_their_settings():
    from amg_jax.apps.sweep.config import Cell
    from amg_jax.apps.sweep.settings import _screen_settings, screen_of
    cell = Cell(id="c", method="AMG", guidance="amg", scale=None, steps=3, sampler="ddim", screen="auto")
    cal = model_screen(get_model("unet-text"))
    s = _screen_settings(cell, cal)
    assert screen_of(s) == (cal.build(), cal.threshold)
    assert _screen_settings(Cell(id="c", method="AMG", guidance="amg", scale=None, steps=3, sampler="ddim"), cal) == {}
    dtp = Cell(id="d", method="DTP", guidance="dtp", scale=None, steps=3, sampler="ddim",
               screen="noise_magnitude_first", screen_threshold=0.1)
    assert screen_of(_screen_settings(dtp, None)) == (NoiseMagnitude(window=1), 0.1)
    assert isinstance(get_model("unet-text").guidance("dtp", 1.5, None, screen=NoiseMagnitude(window=1),
                                                      screen_threshold=0.1), ScreenedGuidance)


def test_sd_amg_without_a_bank_keeps_a_users_bank_terms_visible():
    """Bank-free AMG on SD: the defaults' G_dup / G_sim are turned off, but a user's own
    ``dissimilar=True`` reaches make_amg's error instead of being dropped."""
    from amg_jax.apps.models import StableDiffusionSpec
    spec = StableDiffusionSpec("unused-folder")       # guidance() builds the method only, loads nothing
    g = spec.guidance("amg", 7.5, screen=NoiseMagnitude(window=1), screen_threshold=0.1)
    assert g.detector is None and not g.config.dissimilar and not g.config.dedup
    with pytest.raises(ValueError, match="dissimilar=True needs a detector"):
        spec.guidance("amg", 7.5, screen=NoiseMagnitude(window=1), screen_threshold=0.1, amg={"dissimilar": True})
