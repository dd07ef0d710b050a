"""The `amg` command line: help, argument errors before any work, and a tiny demo run."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from amg_jax.apps import cli, demo


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "amg_jax.apps.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "usage: amg" in out and "demo" in out and "COMMAND --help" in out


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: amg" in capsys.readouterr().out


def test_demo_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--out", "--models", "--methods", "--testbed", "--prompts", "--samples", "--sampler",
                "--steps", "--scale", "--seed", "--no-progress"):
        assert opt in out, opt
    assert "og_dtp" in out and "(default:" in out


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "--steps: must be >= 1"),
    (["--samples", "x"], "--samples: expected an integer"),
    (["--methods", "cfg,amg9"], "unknown 'amg9'"),
    (["--models", "unet"], "unknown 'unet'"),
    (["--sampler", "euler"], "invalid choice: 'euler'"),
    (["--scale", "nan"], "--scale: must be finite"),
    (["--testbed", "huge"], "invalid choice: 'huge'"),
])
def test_bad_demo_arguments_fail_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(out)] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_demo_config_names_the_bad_field():
    with pytest.raises(ValueError, match="demo: methods has unknown"):
        demo.DemoConfig(methods=("cfg", "nope"))
    with pytest.raises(ValueError, match="demo: steps must be an integer >= 1"):
        demo.DemoConfig(steps=0)


def test_tiny_demo_writes_grids_metrics_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--models", "empirical,mixture", "--testbed", "small", "--prompts", "1",
                     "--samples", "2", "--steps", "4",
                     "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "metrics.json").read_text())
    methods = list(demo.DEFAULT_METHODS)
    assert list(report["results"]) == ["true renders", "empirical", "mixture"]
    for model in ("empirical", "mixture"):
        assert list(report["results"][model]) == methods
        for method in methods:
            per_kind = report["results"][model][method]
            assert set(per_kind) == {"specific", "duplicated", "generic", "all"}
            for r in per_kind.values():
                for key in ("frac_copied", "frac_nl2_below_1.4", "nl2_median", "fd", "alignment",
                            "frac_out_of_range"):
                    assert np.isfinite(r[key]), (model, method, key)
                assert 0.0 <= r["frac_copied"] <= 1.0 and 0.0 <= r["alignment"] <= 1.0
        grid = np.asarray(Image.open(out / f"grid_{model}.png"))
        # rows: a training image + the methods; columns: 3 prompts; 16x16 images upscaled 4x, 1-px
        # padding; plus the label margin (72 px) and the header line (14 px)
        assert grid.shape == ((1 + len(methods)) * 65 + 1 + 14, 3 * 65 + 1 + 72, 3)
        assert Image.open(out / f"similarity_{model}.png").size[0] > 100
        assert 0.0 <= report["results"][model]["amg"]["all"]["gate_open_rate"] <= 1.0
    # the perfect memorizer copies the duplicated prompt with CFG (every seed)
    assert report["results"]["empirical"]["cfg"]["duplicated"]["frac_copied"] == 1.0
    assert report["copy_threshold"] > 0 and report["prompts"]["specific"][0]["caption"]
    assert "DTP" in printed and "AMG" in printed and "copied" in printed and "metrics.json" in printed
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


def test_eval_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--method", "--base", "--kinds", "--c1", "--c2", "--c3", "--c3-units", "--threshold",
                "--lambda-min", "--lambda-max", "--gradient", "--score", "--no-spe", "--no-dup", "--no-sim",
                "--no-fallback", "--max-shift", "--detector"):
        assert opt in out, opt


@pytest.mark.parametrize("args, message", [
    (["--method", "cfg", "--c3", "10"], "AMG settings (--c3) need --method amg"),
    (["--lambda-min", "-3"], "lambda_min=-3.0 lies outside the detector's sigma range"),
    (["--kinds", "rare"], "unknown 'rare'"),
    (["--method", "amg2"], "invalid choice: 'amg2'"),
])
def test_bad_eval_arguments_fail_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--testbed", "small", "--out", str(out)] + args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_eval_error_found_after_parsing_names_the_command(tmp_path, capsys):
    """A value argparse accepts but the command rejects (AMG settings without --method amg) is
    reported as argparse reports its own errors of `amg eval`: its usage, then ``amg eval: error:``
    (it said ``amg: error:`` after the top-level usage), exit 2, nothing written."""
    from cli_checks import assert_clean_error, run_cli

    out = tmp_path / "out"
    code, err = run_cli(["eval", "--testbed", "small", "--method", "cfg", "--c3", "10", "--out", str(out)], capsys)
    assert_clean_error(code, err, "AMG settings (--c3) need --method amg", prog="amg eval")
    assert err.strip().splitlines()[-1] == "amg eval: error: AMG settings (--c3) need --method amg"
    assert not out.exists()


def _strict_json(path):
    """The JSON of ``path``, failing on NaN / Infinity (Python writes them; they are not JSON)."""
    def reject(word):
        raise AssertionError(f"{path} holds {word}, which is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def test_write_json_writes_null_for_nan_and_inf(tmp_path):
    """The one writer of metrics / results files: NaN and +-inf, also inside numpy values, become
    null (strict JSON), finite numbers stay exact."""
    from amg_jax.jsonio import write_json

    obj = {"fd": float("nan"), "x": [float("inf"), np.float32(np.nan), (np.int64(3), np.bool_(True))],
           "rates": np.array([0.5, -np.inf]), "ok": 1.25, "none": None}
    path = tmp_path / "m.json"
    assert write_json(str(path), obj) == str(path)
    got = _strict_json(path)
    assert got == {"fd": None, "x": [None, None, [3, True]], "rates": [0.5, None], "ok": 1.25, "none": None}


def test_eval_writes_null_for_metrics_a_group_does_not_define(tmp_path):
    """One sample: its Frechet distance is not defined (NaN in the report); metrics.json holds
    null there (it held NaN, which is not JSON), the defined metrics as numbers."""
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", "empirical", "--testbed", "small", "--method", "cfg", "--kinds", "duplicated",
                     "--prompts", "1", "--samples", "1", "--steps", "2", "--out", str(out)]) == 0
    report = _strict_json(out / "metrics.json")
    for r in report["metrics"].values():
        assert r["quality_fd"] is None and r["fd"] is None and r["n"] == 1
        assert 0.0 <= r["memorized_frac"] <= 1.0


def test_tiny_eval_writes_the_agreed_keys(tmp_path):
    out = tmp_path / "eval"
    assert cli.main(["eval", "--model", "empirical", "--testbed", "small", "--kinds", "duplicated,generic",
                     "--prompts", "1", "--samples", "3", "--steps", "4", "--c3", "3000", "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    assert set(report["metrics"]) == {"duplicated", "generic", "all"}
    for r in report["metrics"].values():
        for key in ("memorized_frac", "sim_top5pct", "sim_top1", "quality_fd", "alignment", "frac_out_of_range",
                    "frac_nl2_below_1.4", "gate_open_rate"):
            assert np.isfinite(r[key]), key
        assert r["n"] == (6 if r is report["metrics"]["all"] else 3)
    assert report["config"]["amg"] == [["c3", 3000.0]]
    trace = np.load(out / "trace.npz")
    assert trace["sigma"].shape == (6, 4) and trace["gate"].dtype == bool
    assert Image.open(out / "similarity.png").size[0] > 100 and (out / "samples.png").exists()


def test_evalnet_command_trains_and_saves_a_loadable_evaluator(tmp_path, capsys):
    from amg_jax.evaluation.evalnet import load_evaluator

    out = tmp_path / "evalnet"
    assert cli.main(["evalnet", "--testbed", "small", "--steps", "3", "--batch", "8", "--out", str(out)]) == 0
    assert "held-out accuracy" in capsys.readouterr().out
    ev = load_evaluator(str(out))
    assert ev.training["steps"] == 3 and ev.config.image_size == 16
