"""The Colab notebooks (colab/*.ipynb).

- quickstart.ipynb runs end to end (nbclient, kernel "python3", from a temporary working
  directory) with tiny parameters injected after its "parameters" cell, as papermill does: it
  must run clean, print the metrics table with a row per method and prompt kind, draw its
  figures, write metrics.json, and its CFG must copy the duplicated prompt where AMG copies less.
- stable_diffusion.ipynb and tpu_sweep.ipynb need downloads and accelerators (and the SD one takes
  minutes to compile AMG's gradient through a tiny SD), so they are checked statically: every
  code cell parses (IPython syntax: `!` shell lines), and every amg_jax module and attribute they
  name exists; the sweep config the TPU notebook writes passes the sweep's validator.
- All three are valid nbformat v4, carry no outputs, and have one cell tagged "parameters".
"""
import ast
import importlib
import json
import math
import pathlib
import re
import tomllib

import nbformat
import pytest
from IPython.core.inputtransformer2 import TransformerManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

ROOT = pathlib.Path(__file__).resolve().parents[1]
COLAB = ROOT / "colab"
NOTEBOOKS = ("quickstart.ipynb", "stable_diffusion.ipynb", "tpu_sweep.ipynb")
QUICK = dict(NUM_PROMPTS=1, SAMPLES_PER_PROMPT=2, STEPS=3, METHODS=["cfg", "amg"],
             AMG_SETTINGS={"c3": 1.0, "gradient": "cheap"}, OUT_DIR="qs_out")
LABELS = {"cfg": "CFG", "amg": "AMG"}
KINDS = ("specific", "duplicated", "generic")


def read(name: str):
    return nbformat.read(COLAB / name, as_version=4)


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"expected one cell tagged 'parameters', found {len(tagged)}"
    return tagged[0]


def inject(nb, **values):
    """papermill's injection: a cell tagged "injected-parameters" right after the parameters cell."""
    src = "\n".join(f"{k} = {v!r}" for k, v in values.items())
    nb.cells.insert(parameters_index(nb) + 1, new_code_cell(src, metadata={"tags": ["injected-parameters"]}))
    return nb


def outputs(nb, kind: str):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == kind]


def stream_text(nb) -> str:
    return "".join(o.text for o in outputs(nb, "stream") if o.name == "stdout")


def python_source(cell) -> str:
    """A code cell as plain Python (IPython's own transform: `!cmd` -> get_ipython().system(...))."""
    return TransformerManager().transform_cell(cell.source)


# ----------------------------------------------------------------------------- every notebook

@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_valid_clean_and_parametrized(name):
    nb = read(name)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ")
    assert f"colab.research.google.com/github/amg-jax/amg_jax/blob/main/colab/{name}" in first.source
    for i, c in enumerate(nb.cells):
        if c.cell_type == "code":
            assert c.outputs == [], f"{name} cell {i} carries outputs (clear them before committing)"
            assert c.execution_count is None, f"{name} cell {i} has an execution count"
    params = nb.cells[parameters_index(nb)]
    assert params.cell_type == "code"
    ast.parse(params.source)                          # plain assignments papermill can override
    assert all(isinstance(s, ast.Assign) for s in ast.parse(params.source).body)


# ----------------------------------------------------------------------------- the quickstart, executed

@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quickstart")      # not the repository: it must find checkpoints/ itself
    nb = inject(read("quickstart.ipynb"), **QUICK)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb, cwd


def test_quickstart_runs_clean(quickstart):
    nb, _ = quickstart
    assert outputs(nb, "error") == []
    assert "Traceback" not in "".join(o.text for o in outputs(nb, "stream"))
    images = [o for o in outputs(nb, "display_data") if "image/png" in o.data]
    assert len(images) == 3, "expected the two sample grids and the similarity plot"


def test_quickstart_prints_the_demo_table(quickstart):
    nb, _ = quickstart
    text = stream_text(nb)
    assert re.search(r"^model\s+method\s+kind\s+copied\s+nL2<1\.4\s+med nL2\s+FD\s+align\s+out$", text, re.M)
    rows = {tuple(line.split()[1:3]) for line in text.splitlines() if line.startswith("unet-text ")}
    assert rows == {(LABELS[m], k) for m in QUICK["METHODS"] for k in KINDS}
    assert all(re.search(rf"^true renders\s+-\s+{k}\s", text, re.M) for k in KINDS)


def test_quickstart_metrics(quickstart):
    _, cwd = quickstart
    report = json.loads((cwd / QUICK["OUT_DIR"] / "metrics.json").read_text())
    res = report["results"]["unet-text"]
    assert sorted(res) == sorted(QUICK["METHODS"])
    assert report["samples_per_kind"] == {k: QUICK["NUM_PROMPTS"] * QUICK["SAMPLES_PER_PROMPT"] for k in KINDS}
    for m, per_kind in res.items():
        for kind in KINDS + ("all",):
            r = per_kind[kind]
            assert 0.0 <= r["frac_copied"] <= 1.0 and math.isfinite(r["fd"]), (m, kind, r)
    # the shipped model copies its duplicated caption under CFG, even at 3 steps; AMG copies less
    assert res["cfg"]["duplicated"]["frac_copied"] >= 0.5
    assert res["amg"]["all"]["frac_copied"] < res["cfg"]["all"]["frac_copied"]
    assert 0.0 < res["amg"]["all"]["gate_open_rate"] < 1.0


# ----------------------------------------------------------------------------- the others, statically

def amg_names(tree: ast.AST) -> list:
    """(module, attribute or None) for every amg_jax import and every attribute read off an
    imported amg_jax module alias (``sg.method_guidance``) in ``tree``."""
    aliases, found = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "amg_jax":
                    found.append((a.name, None))
                    if a.asname:
                        aliases[a.asname] = a.name
                    elif "." not in a.name:
                        aliases["amg_jax"] = "amg_jax"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "amg_jax":
            for a in node.names:
                found.append((node.module, a.name))
                sub = f"{node.module}.{a.name}"
                try:
                    importlib.import_module(sub)
                    aliases[a.asname or a.name] = sub
                except ImportError:
                    pass
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            found.append((aliases[node.value.id], node.attr))
    return found


@pytest.mark.parametrize("name", ["stable_diffusion.ipynb", "tpu_sweep.ipynb", "quickstart.ipynb"])
def test_code_cells_parse_and_name_real_amg_jax_api(name):
    sources = [python_source(c) for c in read(name).cells if c.cell_type == "code"]
    for i, src in enumerate(sources):
        try:
            ast.parse(src)
        except SyntaxError as e:
            pytest.fail(f"{name}: code cell {i} does not parse: {e}")
    # setup cells bind `amg_jax` by calling import_amg_jax(); treat the name as the package
    names = amg_names(ast.parse("import amg_jax\n" + "\n".join(sources)))
    assert len(names) > 5
    missing = []
    for module, attr in names:
        mod = importlib.import_module(module)
        if attr is not None and not hasattr(mod, attr):
            missing.append(f"{module}.{attr}")
    assert not missing, f"{name} names amg_jax attributes that do not exist: {missing}"


def test_stable_diffusion_notebook_uses_the_sharded_sd_api():
    src = "\n".join(python_source(c) for c in read("stable_diffusion.ipynb").cells if c.cell_type == "code")
    for call in ("load_stable_diffusion(", "sample_sharded(", "spec.guidance(", "latent_detector(",
                 "build_index(", "sscd.convert_file(", "DOWNLOAD"):
        assert call in src
    assert "sscd_disc_mixup.torchscript.pt" in src and "CompVis/stable-diffusion-v1-4" in src


def _run_tpu_cells(markers, **params) -> dict:
    """Run the TPU notebook's parameters cell, then (with ``params`` overriding it) each code cell
    whose source contains one of ``markers``, in one namespace; returns the namespace."""
    nb = read("tpu_sweep.ipynb")
    ns: dict = {}
    exec(python_source(nb.cells[parameters_index(nb)]), ns)
    ns.update(params)
    for marker in markers:
        cell = next(c for c in nb.cells if c.cell_type == "code" and marker in c.source)
        exec(python_source(cell), ns)
    return ns


WRITE_CELLS = ("config_text =", "sweep.load_config(config_path)")


@pytest.mark.parametrize("params", [{}, {"MODEL": "unet-uncond", "AMG_C3": [3]}, {"MODEL": "unet-class"}])
def test_tpu_notebook_writes_a_valid_sweep_config(params, tmp_path):
    """The config the notebook writes from its parameters passes the sweep's validator."""
    ns = _run_tpu_cells(WRITE_CELLS, WORK_DIR=str(tmp_path), REPO_ROOT=str(ROOT), **params)
    config = ns["config"]
    assert ns["config_path"] == str(tmp_path / f"{ns['NAME']}.toml")
    assert config.model == ns["MODEL"] and config.samples_per_prompt == ns["SAMPLES_PER_PROMPT"]
    assert config.out == str(tmp_path / ns["NAME"])
    amg_cells = [c for c in config.cells if c.guidance == "amg"]
    assert [dict(c.amg)["c3"] for c in amg_cells] == [float(v) for v in ns["AMG_C3"]]
    assert tomllib.loads(ns["config_text"])["sweep"]["chunk"] == ns["CHUNK"]


def test_tpu_notebook_runs_shipped_configs_with_results_in_its_work_dir(tmp_path):
    """A shipped testbed config is copied with `out` pointing into WORK_DIR (same cells); an SD
    config (file paths relative to its folder) is used where it is."""
    from amg_jax.apps import sweep

    shipped = "experiments/configs/basin_text.toml"
    ns = _run_tpu_cells(WRITE_CELLS, WORK_DIR=str(tmp_path), REPO_ROOT=str(ROOT), CONFIG=shipped)
    original = sweep.load_config(ROOT / shipped)
    assert ns["config"].out == str(tmp_path / "basin_text")
    assert [c.id for c in ns["config"].cells] == [c.id for c in original.cells]
    sd = "experiments/configs/sd_v14_amg.toml"
    with pytest.raises(ValueError, match="sweep config"):      # its placeholder SSCD / bank paths
        _run_tpu_cells(WRITE_CELLS, WORK_DIR=str(tmp_path / "sd"), REPO_ROOT=str(ROOT), CONFIG=sd)
    assert not (tmp_path / "sd" / "sd_v14_amg.toml").exists()
    src = "\n".join(python_source(c) for c in read("tpu_sweep.ipynb").cells if c.cell_type == "code")
    assert 'cli.main(["sweep", config_path])' in src and "maybe_initialize_distributed()" in src
