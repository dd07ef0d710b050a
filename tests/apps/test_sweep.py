"""`amg sweep`: config validation (each error names its key, nothing written), a tiny two-method
sweep on the perfect memorizer writing every output, resume after a kill, changed / stale cells,
rebuilding the results from the cell files alone, baselines, and process-0-only writing."""
import csv
import dataclasses
import json
import os
import shutil
import textwrap

import chex
import jax
import numpy as np
import pytest
from PIL import Image

from amg_jax.apps import models
from amg_jax.apps import sweep
from amg_jax.apps.sweep import backends as sweep_backends

# Tiny and fast: the empirical model on the small testbed, 1 prompt of 2 kinds x 2 seeds, 3 steps.
SWEEP = """\
[sweep]
name = "tiny"
model = "empirical"
testbed = "small"
prompts_per_kind = 1
samples_per_prompt = 2
kinds = ["duplicated", "generic"]
steps = 3
out = "{out}"
"""
METHODS = """
[[method]]
name = "CFG"
guidance = "cfg"
scale = [1.5, 3.0]

[[method]]
name = "AMG"
guidance = "amg"
scale = 1.5
amg = { c3 = 1.0, gradient = "cheap" }
"""
CELLS = ["CFG__scale=1.5", "CFG__scale=3", "AMG"]
TEXT_SWEEP = SWEEP.replace('"empirical"', '"unet-text"')    # baselines need a text encoder (validation only)


def write_config(folder, text: str, name: str = "sweep.toml") -> str:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))
    return path


def read_rows(out, drop=("seconds",)) -> list:
    with open(os.path.join(out, "results.csv")) as f:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(f)]


class Counter:
    """Wraps sweep_backends.run_method: counts calls, optionally raises on call number ``fail_at``."""

    def __init__(self, fail_at=None, exc=KeyboardInterrupt):
        self.calls, self.fail_at, self.exc = 0, fail_at, exc
        self.real = sweep_backends.run_method

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("simulated kill")
        return self.real(*args, **kwargs)


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """An uninterrupted run of the two-method sweep: (config path, out dir, returned table, echo lines)."""
    d = tmp_path_factory.mktemp("full")
    path = write_config(d, SWEEP.format(out="out") + METHODS)
    lines = []
    table = sweep.main(path, progress=False, echo=lines.append)
    return path, os.path.join(d, "out"), table, lines


# ----------------------------------------------------------------------------- config

def test_config_grid_cells_ids_and_defaults(tmp_path, monkeypatch):
    monkeypatch.setitem(models._MODELS, "empirical", dataclasses.replace(models.get_model("empirical"),
                                                                         has_text_encoder=True))
    path = write_config(tmp_path / "cfg", SWEEP.format(out="../res") + """
        [[method]]
        name = "AMG main"
        guidance = ["cfg", "amg"]
        detector = "nl2"
        amg = { c3 = [1.0, 3.0], threshold = "constant" }

        [[method]]
        name = "RNA"
        guidance = "cfg"
        baseline = "rna"
        baseline_params = { n = [1, 2] }
        steps = [3, 4]
    """)
    c = sweep.load_config(path)
    assert c.out == os.path.normpath(str(tmp_path / "res"))        # relative to the config's folder
    assert (c.name, c.model, c.seed, c.sampler, c.chunk, c.scale) == ("tiny", "empirical", 0, "ddim", 16, None)
    assert c.methods == ["AMG main", "RNA"]
    ids = [x.id for x in c.cells]
    # cfg drops the AMG-only axes (one cell, not two); amg keeps them
    assert ids == ["AMG_main__guidance=cfg", "AMG_main__guidance=amg__c3=1", "AMG_main__guidance=amg__c3=3",
                   "RNA__steps=3__n=1", "RNA__steps=3__n=2", "RNA__steps=4__n=1", "RNA__steps=4__n=2"]
    amg = c.cells[2]
    assert (amg.guidance, amg.detector, dict(amg.amg)) == ("amg", "nl2", {"c3": 3.0, "threshold": "constant"})
    assert amg.label == "AMG main (guidance=amg, c3=3)"
    rna = c.cells[-1]
    assert (rna.baseline, dict(rna.baseline_params), rna.steps) == ("rna", {"n": 2}, 4)
    # ids are stable: loading again gives the same cells
    assert sweep.load_config(path).cells == c.cells
    s = sweep.cell_settings(c, amg)
    assert (s["base"], s["detector"], s["scale"], s["amg"]["c3"], s["amg"]["c1"]) == ("cfg", "nl2", 7.5, 3.0, 4.0)
    assert s["testbed"] == "small" and s["kinds"] == ["duplicated", "generic"]


BAD = [
    ("[sweep\nname = 1", "is not valid TOML", "line 1"),
    ("[other]\nx = 1\n" + SWEEP + METHODS, "unknown top-level key 'other'", None),
    (SWEEP.replace('steps = 3', 'stepz = 3') + METHODS, "sweep.stepz is not a sweep key", None),
    (SWEEP.replace('steps = 3', 'steps = 0') + METHODS, "sweep.steps must be an integer >= 1", None),
    (SWEEP.replace('"empirical"', '"unet"') + METHODS, "sweep.model must be one of", None),
    (SWEEP.replace('prompts_per_kind = 1\n', '') + METHODS, "sweep.prompts_per_kind is missing", None),
    (SWEEP.replace('kinds = ["duplicated", "generic"]', 'kinds = ["rare"]') + METHODS, "sweep.kinds", None),
    (SWEEP, "no [[method]] tables", None),
    (SWEEP + METHODS.replace('scale = [1.5, 3.0]', 'scael = 2'), "method 'CFG': scael is not a method key", None),
    (SWEEP + METHODS.replace('guidance = "cfg"', 'guidance = "cgf"'), "method 'CFG': guidance must be one of", None),
    (SWEEP + METHODS.replace('scale = [1.5, 3.0]', 'scale = []'), "method 'CFG': scale is an empty list", None),
    (SWEEP + METHODS.replace('scale = [1.5, 3.0]', 'scale = [1.5, -3.0]'),
     "method 'CFG': scale must be a finite number >= 0", None),
    (SWEEP + METHODS.replace('scale = [1.5, 3.0]', 'scale = ["big"]'), "method 'CFG': scale must be", None),
    (SWEEP + METHODS.replace('scale = [1.5, 3.0]', 'steps = [3, 0]'), "method 'CFG': steps must be an integer >= 1",
     None),
    (SWEEP + METHODS.replace('scale = [1.5, 3.0]', 'amg = { c3 = 1.0 }'),
     "method 'CFG': amg only applies to guidance 'amg'", None),
    (SWEEP + METHODS.replace('c3 = 1.0', 'c4 = 1.0'), "method 'AMG': amg.c4 is not an AMG setting", None),
    (SWEEP + METHODS.replace('c3 = 1.0', 'c3 = [1.0, -1.0]'), "method 'AMG': amg.c3 is invalid", None),
    (SWEEP + METHODS.replace('gradient = "cheap"', 'gradient = 3'), "method 'AMG': amg.gradient must be a string",
     None),
    (SWEEP + METHODS.replace('gradient = "cheap"', 'threshold = "sometimes"'), "method 'AMG': amg.threshold", None),
    (SWEEP + METHODS.replace('name = "AMG"', 'name = "CFG"'), "method 'CFG': name is a duplicate", None),
    (SWEEP + METHODS + '\n[[method]]\nname = "X"\nguidance = "amg"\ndetector = "ssim"\n',
     "method 'X': detector must be one of", None),
    (SWEEP + METHODS + '\n[[method]]\nname = "X"\nguidance = "cfg"\nbaseline = "dropout"\n',
     "method 'X': baseline must be one of", None),
    (TEXT_SWEEP + METHODS + '\n[[method]]\nname = "X"\nguidance = "cfg"\nbaseline = "rna"\n'
     'baseline_params = { std = 1.0 }\n',
     "method 'X': baseline_params.std is not a parameter of baseline 'rna'", None),
    (TEXT_SWEEP + METHODS + '\n[[method]]\nname = "X"\nguidance = "cfg"\nbaseline = "rt"\n'
     'baseline_params = { mode = "swap" }\n',
     "method 'X': baseline_params.mode is invalid", None),
    (SWEEP.replace('"empirical"', '"unet-uncond"') + METHODS, "method 'CFG': guidance 'cfg' needs a condition", None),
    (SWEEP.replace('"empirical"', '"unet-class"') + '[[method]]\nname = "R"\nguidance = "cfg"\nbaseline = "gni"\n',
     "method 'R': baseline 'gni' perturbs captions; it needs a model with a text encoder", None),
    (SWEEP + '[[method]]\nname = "R"\nguidance = "cfg"\nbaseline = "rna"\n',
     "method 'R': baseline 'rna' perturbs captions; it needs a model with a text encoder", None),
]


@pytest.mark.parametrize("text, message, also", BAD, ids=[b[1][:40] for b in BAD])
def test_malformed_configs_name_the_key_and_write_nothing(tmp_path, text, message, also):
    path = write_config(tmp_path, text.replace("{out}", "out"))
    with pytest.raises(ValueError) as e:
        sweep.main(path, progress=False, echo=lambda *a: None)
    assert message in str(e.value), str(e.value)
    assert also is None or also in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["sweep.toml"]


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sweep.load_config(tmp_path / "nope.toml")


def test_sd_model_with_testbed_keys_is_rejected_before_any_work(tmp_path):
    path = write_config(tmp_path, SWEEP.format(out="out").replace('"empirical"', '"sd:/models/sd14"') + METHODS)
    with pytest.raises(ValueError, match="sweep.testbed"):
        sweep.load_config(path)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- running

def test_two_method_sweep_writes_every_output(done):
    _, out, table, lines = done
    for cid in CELLS:
        assert os.path.exists(os.path.join(out, "cells", cid + ".json")), cid
        rec = json.load(open(os.path.join(out, "cells", cid + ".json")))
        assert rec["cell"] == cid and rec["seconds"] > 0 and set(rec["metrics"]) == {"duplicated", "generic", "all"}
        assert rec["metrics"]["all"]["count"] == 4 and 0 <= rec["metrics"]["all"]["frac_copied"] <= 1
        z = np.load(os.path.join(out, "cells", cid + ".npz"))
        chex.assert_shape(z["x"], (4, 16, 16, 3))
        assert z["x"].dtype == np.float16 and list(z["kinds"]) == ["duplicated"] * 2 + ["generic"] * 2
        if cid == "AMG":
            for k in ("sigma", "lambda", "gate"):
                chex.assert_shape(z[k], (4, 3))
            assert rec["settings"]["detector"] == "nl2" and rec["settings"]["amg"]["gradient"] == "cheap"
            assert 0 <= rec["metrics"]["all"]["gate_open_rate"] <= 1
        else:
            assert "sigma" not in z.files and rec["metrics"]["all"]["gate_open_rate"] is None
        grid = np.asarray(Image.open(os.path.join(out, "grids", cid + ".png")))
        assert grid.ndim == 3 and grid.shape[0] > 2 * 16
    assert json.load(open(os.path.join(out, "cells", "CFG__scale=3.json")))["settings"]["scale"] == 3.0
    rows = read_rows(out)
    assert [(r["cell"], r["kind"]) for r in rows] == [(c, k) for c in CELLS for k in ("duplicated", "generic", "all")]
    assert rows[0]["scale"] == "1.5" and rows[-1]["scale"] == "1.5" and rows[-1]["detector"] == "nl2"
    assert len(table["rows"]) == 9 and list(table["cells"]) == CELLS and table["missing"] == []
    md = open(os.path.join(out, "results.md")).read()
    assert "copied duplicated / generic" in md and "| copied all |" in md
    assert "| true renders |" in md and "| CFG (scale=1.5) |" in md and "| AMG |" in md
    res = json.load(open(os.path.join(out, "results.json")))          # experiments/table_md.py's format
    assert list(res) == ["_meta", "true renders", "CFG (scale=1.5)", "CFG (scale=3)", "AMG"]
    for plot in ("similarity", "tradeoff"):
        assert Image.open(os.path.join(out, "plots", plot + ".png")).size[0] > 100
    assert json.load(open(os.path.join(out, "bench.json")))["truth"]["all"]["count"] == 4
    assert sum(line.startswith("[") for line in lines) == 3 and "[3/3] AMG: copied" in lines[3]
    assert not [f for f in os.listdir(os.path.join(out, "cells")) if f.startswith(".tmp")]


def test_resume_after_a_kill_recomputes_only_unfinished_cells(done, tmp_path, monkeypatch):
    _, full_out, _, _ = done
    path = write_config(tmp_path, SWEEP.format(out="out") + METHODS)
    out = str(tmp_path / "out")
    killer = Counter(fail_at=2)                           # "killed" while sampling the second cell
    monkeypatch.setattr(sweep_backends, "run_method", killer)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(path, progress=False, echo=lambda *a: None)
    assert sorted(os.listdir(os.path.join(out, "cells"))) == ["CFG__scale=1.5.json", "CFG__scale=1.5.npz"]
    assert not os.path.exists(os.path.join(out, "results.csv"))
    first = os.path.join(out, "cells", "CFG__scale=1.5.json")
    stamp = os.stat(first).st_mtime_ns
    counter = Counter()
    monkeypatch.setattr(sweep_backends, "run_method", counter)
    lines = []
    sweep.main(path, progress=False, echo=lines.append)
    assert counter.calls == 2                             # the finished cell was not sampled again
    assert os.stat(first).st_mtime_ns == stamp
    assert any("CFG__scale=1.5: done before, skipped" in line for line in lines)
    assert read_rows(out) == read_rows(full_out)           # == the uninterrupted run (timings aside)
    assert open(os.path.join(out, "results.md")).read() == open(os.path.join(full_out, "results.md")).read()


def test_changed_config_reruns_changed_and_stale_cells_only(done, tmp_path, monkeypatch):
    _, full_out, _, _ = done
    out = tmp_path / "out"
    shutil.copytree(full_out, out)
    stale = out / "cells" / "AMG.json"
    rec = json.loads(stale.read_text())
    rec["settings"]["steps"] = 99                        # as if written by another config
    stale.write_text(json.dumps(rec))
    kept = out / "cells" / "CFG__scale=1.5.json"
    stamp = os.stat(kept).st_mtime_ns
    path = write_config(tmp_path, SWEEP.format(out="out") + METHODS.replace("[1.5, 3.0]", "[1.5, 2.0]"))
    counter = Counter()
    monkeypatch.setattr(sweep_backends, "run_method", counter)
    lines = []
    table = sweep.main(path, progress=False, echo=lines.append)
    assert counter.calls == 2                             # CFG 2.0 (new) and AMG (stale)
    assert os.stat(kept).st_mtime_ns == stamp
    assert any(line.startswith("warning:") and "AMG" in line and "steps" in line for line in lines)
    assert list(table["cells"]) == ["CFG__scale=1.5", "CFG__scale=2", "AMG"]
    assert json.loads(stale.read_text())["settings"]["steps"] == 3
    assert {r["cell"] for r in read_rows(out)} == {"CFG__scale=1.5", "CFG__scale=2", "AMG"}   # old cell 3.0 not listed
    full = {(r["cell"], r["kind"]): r for r in read_rows(full_out)}
    for r in read_rows(out):
        if r["cell"] in ("CFG__scale=1.5", "AMG"):
            assert r == full[(r["cell"], r["kind"])]


def test_a_finished_sweep_rebuilds_its_results_from_the_cell_files(done, tmp_path, monkeypatch):
    config_path, full_out, _, _ = done
    out = tmp_path / "out"
    shutil.copytree(full_out, out)
    for name in ("results.csv", "results.md", "results.json", "grids", "plots"):
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    path = write_config(tmp_path, open(config_path).read())

    def nothing(*a, **k):
        raise AssertionError("a finished sweep must not build the model, bench or samples")

    for name in ("prepare_bench", "build_testbed"):
        monkeypatch.setattr(sweep_backends, name, nothing)
    monkeypatch.setattr(models.ModelSpec, "denoiser", nothing)
    monkeypatch.setattr(sweep_backends, "run_method", nothing)
    table = sweep.main(path, progress=False, echo=lambda *a: None)
    assert read_rows(out, drop=()) == read_rows(full_out, drop=())
    assert len(table["rows"]) == 9
    for cid in CELLS:
        assert (out / "grids" / f"{cid}.png").exists()
    assert (out / "plots" / "similarity.png").exists() and (out / "plots" / "tradeoff.png").exists()


def test_a_failing_cell_does_not_stop_the_others(tmp_path, monkeypatch):
    path = write_config(tmp_path, SWEEP.format(out="out") + METHODS.split("[[method]]\nname = \"AMG\"")[0])
    monkeypatch.setattr(sweep_backends, "run_method", Counter(fail_at=1, exc=RuntimeError))
    with pytest.raises(sweep.SweepError, match="1 of 2 cells failed.*CFG__scale=1.5: RuntimeError") as e:
        sweep.main(path, progress=False, echo=lambda *a: None)
    assert list(e.value.failures) == ["CFG__scale=1.5"]
    assert sorted(os.listdir(tmp_path / "out" / "cells")) == ["CFG__scale=3.json", "CFG__scale=3.npz"]
    assert [r["cell"] for r in read_rows(tmp_path / "out")] == ["CFG__scale=3"] * 3
    assert "not done: CFG__scale=1.5" in (tmp_path / "out" / "results.md").read_text()


ONE_CELL = """
[[method]]
name = "CFG"
guidance = "cfg"
scale = 1.5
"""


def test_only_process_zero_writes(tmp_path, monkeypatch):
    path = write_config(tmp_path, SWEEP.format(out="out") + ONE_CELL)
    monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
    lines = []
    table = sweep.main(path, progress=False, echo=lines.append)
    assert sorted(os.listdir(tmp_path)) == ["sweep.toml"] and lines == []
    assert [r["kind"] for r in table["rows"]] == ["duplicated", "generic", "all"]
    assert table["cells"]["CFG"]["settings"]["scale"] == 1.5


def test_baseline_cells_use_the_models_baseline_conditions(tmp_path, monkeypatch):
    path = write_config(tmp_path, SWEEP.format(out="out") + """
        [[method]]
        name = "RNA"
        guidance = "cfg"
        scale = 1.5
        baseline = "rna"
        baseline_params = { n = 2 }
    """)
    with pytest.raises(ValueError, match="needs a model with a text encoder"):      # empirical has none
        sweep.main(path, progress=False, echo=lambda *a: None)
    assert sorted(os.listdir(tmp_path)) == ["sweep.toml"]

    seen = []

    def fake(spec, bed, bench, baseline, params, seed):
        seen.append((spec.name, baseline, params, seed, len(bench.cond)))
        return spec.denoiser(bed), bench.cond

    monkeypatch.setitem(models._MODELS, "empirical", dataclasses.replace(models.get_model("empirical"),
                                                                         has_text_encoder=True))  # the fake serves it
    monkeypatch.setattr(sweep_backends, "baseline_conditions", fake)
    table = sweep.main(path, progress=False, echo=lambda *a: None)
    assert seen == [("empirical", "rna", {"n": 2}, 0, 4)]
    s = table["cells"]["RNA"]["settings"]
    # the stored settings fill in the baseline's defaults (a changed default makes the cell stale)
    assert (s["baseline"], s["baseline_params"], s["guidance"]) == ("rna", {"n": 2, "high": 100000}, "cfg")
    assert read_rows(tmp_path / "out")[0]["baseline"] == "rna"


def test_amg_under_gni_on_the_text_unet(tmp_path):
    """AMG with a Somepalli baseline on unet-text: the sweep accepts the cell and it runs (y_N = the
    neighbour caption's tokens, GNI on both CFG branches by default); the model's AMG defaults
    (c3 = 1) sit under the cell's settings."""
    path = write_config(tmp_path, TEXT_SWEEP.replace("steps = 3", "steps = 2").replace('"small"', '"auto"')
                        .format(out="out") + """
        [[method]]
        name = "AMG GNI"
        guidance = "amg"
        baseline = "gni"
        amg = { threshold = "always", gradient = "cheap" }
    """)
    table = sweep.main(path, progress=False, echo=lambda *a: None)
    rec = table["cells"]["AMG_GNI"]
    s = rec["settings"]
    assert s["baseline_params"] == {"std": 0.1, "branches": "both"}
    assert (s["amg"]["c3"], s["amg"]["gradient"], s["amg"]["threshold"]) == (1.0, "cheap", "always")
    assert rec["metrics"]["all"]["gate_open_rate"] == 1.0


def test_cli_sweep_rejects_a_bad_config_before_any_work(tmp_path, capsys):
    from amg_jax.apps import cli

    bad = tmp_path / "bad.toml"
    bad.write_text('[sweep]\nmodel = "unet-text"\nprompts_per_kind = 1\nsamples_per_prompt = 1\n'
                   '[[method]]\nname = "X"\nguidance = "nope"\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", str(bad)])
    assert e.value.code == 2 and "guidance" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()
    with pytest.raises(SystemExit):
        cli.main(["sweep", str(tmp_path / "missing.toml")])
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["text_table", "uncond_table", "class_table", "guidance_ablation", "gate_ablation",
                                  "basin_text", "basin_class", "combo"])
def test_shipped_testbed_configs_are_valid(name):
    """The committed experiment configs load (every key, grid and method checked)."""
    root = os.path.join(os.path.dirname(__file__), "..", "..", "experiments", "configs")
    cfg = sweep.load_config(os.path.join(root, name + ".toml"))
    assert cfg.cells and cfg.out.endswith(os.path.join("results", "sweeps", name))


# ----------------------------------------------------------------------------- JSON files and fingerprints

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments",
                       "configs")


def strict_json(path):
    """The JSON value of ``path``, failing on NaN / Infinity (not JSON: a strict parser rejects them)."""
    def reject(word):
        raise AssertionError(f"{path} holds {word}, which is not JSON")
    with open(path) as f:
        return json.load(f, parse_constant=reject)


def test_undefined_metrics_are_null_in_every_file_and_a_resume_reads_them(tmp_path, monkeypatch):
    """One sample per kind: the FD of a kind is not defined (NaN in memory). The cell, bench and
    results files hold null there (NaN is not JSON), the tables "-", and a re-run reads the cell
    back as done and writes the same tables."""
    text = SWEEP.replace("samples_per_prompt = 2", "samples_per_prompt = 1").format(out="out")
    path = write_config(tmp_path, text + '\n[[method]]\nname = "CFG"\nguidance = "cfg"\n')
    sweep.main(path, progress=False, echo=lambda *a: None)
    out = tmp_path / "out"
    rec = strict_json(out / "cells" / "CFG.json")
    assert rec["metrics"]["duplicated"]["fd"] is None and rec["metrics"]["generic"]["fd"] is None
    assert rec["metrics"]["all"]["fd"] > 0                                   # 2 samples: defined
    assert strict_json(out / "bench.json")["truth"]["generic"]["fd"] is None
    assert strict_json(out / "results.json")["CFG"]["metrics"]["generic"]["fd"] is None
    md, rows = (out / "results.md").read_text(), read_rows(out)
    assert "| - / - |" in md and rows[0]["fd"] == ""
    counter = Counter()
    monkeypatch.setattr(sweep_backends, "run_method", counter)
    lines = []
    sweep.main(path, progress=False, echo=lines.append)
    assert counter.calls == 0 and any("CFG: done before, skipped" in line for line in lines)
    assert (out / "results.md").read_text() == md and read_rows(out) == rows


def committed_sweep(tmp_path, name: str):
    """A committed sweep (experiments/configs/NAME.toml) writing to a copy of its committed cell
    JSONs, with empty stand-ins for their samples (.npz files are not committed)."""
    import dataclasses

    cfg = sweep.load_config(os.path.join(CONFIGS, name + ".toml"))
    cells = tmp_path / name / "cells"
    os.makedirs(cells)
    for c in cfg.cells:
        shutil.copy(os.path.join(cfg.out, "cells", c.id + ".json"), cells)
        (cells / f"{c.id}.npz").write_bytes(b"")
    return dataclasses.replace(cfg, out=str(tmp_path / name))


def cell_states(cfg) -> dict:
    """{cell id: cell_status} as ``run_sweep`` decides which cells are done."""
    return {c.id: sweep.cell_status(cfg.out, c.id, sweep.cell_settings(cfg, c))[:2] for c in cfg.cells}


@pytest.mark.parametrize("name", ["basin_text", "basin_class"])
def test_committed_cells_are_done_with_the_shipped_checkpoints(tmp_path, name):
    """The committed cells were computed from the committed checkpoints and carry their weights'
    digest: a re-run of the committed config finds every cell done (nothing re-sampled)."""
    cfg = committed_sweep(tmp_path, name)
    states = cell_states(cfg)
    assert {s for s, _ in states.values()} == {"done"}, states
    assert {rec["settings"]["weights"] for _, rec in states.values()} == {sweep.weights_digest(cfg)}


def test_changed_checkpoint_bytes_make_its_cells_stale(tmp_path, monkeypatch):
    """The fingerprint hashes the checkpoint's bytes: a copy of it elsewhere keeps the cells done;
    one changed byte (same name and size, a new mtime as any rewrite gives it) makes them stale."""
    ckpt = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(models.checkpoints_dir(), "text"), ckpt / "text")
    monkeypatch.setenv("AMG_CHECKPOINTS", str(ckpt))
    cfg = committed_sweep(tmp_path, "basin_text")
    assert {s for s, _ in cell_states(cfg).values()} == {"done"}
    params = [os.path.join(r, f) for r, _, fs in os.walk(ckpt / "text" / "params") for f in fs]
    p = max(params, key=os.path.getsize)                     # the largest weight file
    data = bytearray(open(p, "rb").read())
    data[len(data) // 2] ^= 0xFF
    st = os.stat(p)
    with open(p, "wb") as f:
        f.write(data)
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))
    assert os.path.getsize(p) == st.st_size
    states = cell_states(cfg)
    assert all(state == ("stale", ["weights"]) for state in states.values()), states


def test_sd_weights_digest_hashes_the_model_files_by_content(tmp_path):
    """A local Stable Diffusion folder: its networks' weights and configs, the scheduler and
    tokenizer are hashed by content (a same-size change counts), other files (safety checker,
    README) are not; a hub id that is no local folder gives None."""
    sd = tmp_path / "sd"
    files = {"model_index.json": b"{}", "unet/config.json": b"{}", "unet/diffusion_flax_model.msgpack": b"u" * 64,
             "vae/diffusion_pytorch_model.safetensors": b"v" * 64, "text_encoder/pytorch_model.bin": b"t" * 64,
             "scheduler/scheduler_config.json": b"{}", "tokenizer/merges.txt": b"a b",
             "safety_checker/pytorch_model.bin": b"s", "README.md": b"r"}
    for name, data in files.items():
        os.makedirs(sd / os.path.dirname(name), exist_ok=True)
        (sd / name).write_bytes(data)
    kinds = ("prompts",)
    settings = sweep.SDSettings(source=str(sd), prompts_file="p.txt", prompts=("a cat",), prompt_kinds=kinds,
                                kinds=kinds, sscd=str(tmp_path / "sscd.npz"), bank=str(tmp_path / "bank.npz"),
                                embed_dim=8)
    cell = sweep.Cell(id="CFG", method="CFG", guidance="cfg", scale=None, steps=2, sampler="ddim")
    cfg = sweep.SweepConfig(path="<config>", name="sd", model=f"sd:{sd}", testbed=None, prompts_per_kind=None,
                            samples_per_prompt=1, kinds=kinds, seed=0, sampler="ddim", steps=2, scale=7.5, chunk=1,
                            out=str(tmp_path / "out"), cells=(cell,), sd=settings)

    def digest():
        d = sweep.cell_settings(cfg, cell)["weights"]
        assert d == sweep.weights_digest(cfg) and d.startswith("sha256:")
        return d

    def rewrite(name, data):
        st = os.stat(sd / name)
        (sd / name).write_bytes(data)
        os.utime(sd / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10 ** 9))

    first = digest()
    rewrite("README.md", b"edited")
    rewrite("safety_checker/pytorch_model.bin", b"x")
    assert digest() == first
    rewrite("unet/diffusion_flax_model.msgpack", b"u" * 63 + b"!")          # same size, other bytes
    second = digest()
    assert second != first
    rewrite("tokenizer/merges.txt", b"a c")
    assert digest() != second
    hub = sweep.SweepConfig(**{**cfg.__dict__, "model": "sd:CompVis/stable-diffusion-v1-4",
                               "sd": sweep.SDSettings(**{**settings.__dict__, "source": "CompVis/stable-diffusion-v1-4"})})
    assert sweep.weights_digest(hub) is None and sweep.cell_settings(hub, cell)["weights"] is None
