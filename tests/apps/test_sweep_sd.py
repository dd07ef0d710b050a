"""`amg sweep` on Stable Diffusion: a tiny random-weight SD, a tiny SSCD whose bank holds the CFG
samples themselves (so CFG "copies" them), CFG / AMG / GNI cells with the optional CLIP score and
FID, resume, SD config validation (each error names its key, nothing written) and the shipped
sd_v14_*.toml configs."""
import csv
import json
import os
import shutil
import tomllib

import chex
import numpy as np
import pytest
from PIL import Image

from amg_jax.apps import runs
from amg_jax.apps import sweep
from amg_jax.apps.sweep import runner as sweep_runner
from amg_jax.index import build_bank, save_bank
from amg_jax.models import sd_tiny
from amg_jax.evaluation import inception
from amg_jax.similarity import clip, sscd

STEPS = 3
PROMPTS = [{"prompt": "a red cube", "kind": "memorized"}, {"prompt": "a blue sphere", "kind": "generic"}]
SSCD_CFG = sscd.SSCDConfig(stage_sizes=(1, 1), width=4, embed_dim=8, image_size=32)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "experiments",
                       "configs")
# AMG with its gate always open (SSCD cosines of a random tiny SSCD are all near 1), the cheap gradient
AMG = 'amg = { c3 = 5000.0, lambda_min = -0.5, lambda_max = -0.5, gradient = "cheap" }'
METHODS = f"""
[[method]]
name = "CFG"
guidance = "cfg"

[[method]]
name = "AMG"
guidance = "amg"
{AMG}

[[method]]
name = "GNI"
guidance = "cfg"
baseline = "gni"
baseline_params = {{ std = 0.5 }}
"""
CELLS = ["CFG", "AMG", "GNI"]
ONE = '\n[[method]]\nname = "CFG"\nguidance = "cfg"\n'


def q(path) -> str:
    return json.dumps(str(path))          # a TOML basic string


def sweep_text(env, out, extra: str = "", **keys) -> str:
    s = dict(name='"tiny_sd"', model=q(f"sd:{env['sd_dir']}"), prompts_file=q(env["prompts"]), samples_per_prompt=2,
             steps=STEPS, batch=4, sscd=q(env["sscd"]), bank=q(env["bank"]), out=q(out))
    s.update(keys)
    return "[sweep]\n" + "".join(f"{k} = {v}\n" for k, v in s.items() if v is not None) + extra


def write(path, text) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def read_rows(out) -> list:
    with open(os.path.join(out, "results.csv")) as f:
        return list(csv.DictReader(f))


def bank_cosines(emb, bank_emb):
    a = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    b = bank_emb / np.linalg.norm(bank_emb, axis=1, keepdims=True)
    return np.max(a @ b.T, axis=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Tiny SD / SSCD / CLIP / Inception files; a CFG-only sweep (random bank) whose images become the
    bank's rows; then the CFG + AMG + GNI sweep with CLIP score and FID ("main")."""
    root = tmp_path_factory.mktemp("sdsweep")
    env = dict(root=root, sd_dir=sd_tiny.write_tiny_sd(root / "tiny-sd", seed=0))
    sscd.save_params(str(root / "sscd.npz"), sscd.init_params(SSCD_CFG, seed=0), SSCD_CFG)
    env["sscd"], env["bank"] = root / "sscd.npz", root / "bank.npz"
    env["prompts"] = write(root / "prompts.jsonl", "".join(json.dumps(p) + "\n" for p in PROMPTS))
    rng = np.random.default_rng(0)
    save_bank(str(env["bank"]), build_bank(rng.normal(size=(3, 8)), kind="embedding", normalize=True))
    # 1) a CFG cell against a random bank (the backend alone): its samples become the bank's rows
    #    ("training images" CFG copies); no captions beside the bank (G_dup off: its compilation is slow)
    pre = sweep.load_config(write(root / "pre" / "sweep.toml", sweep_text(env, "out", extra=ONE)))
    env["pre"] = sweep.make_backend(pre, echo=print).run_cell(pre.cells[0], sweep.cell_settings(pre, pre.cells[0]))
    x = env["pre"].samples
    params, _ = sscd.load_params(str(env["sscd"]))
    cfg_emb = sscd.embed_images(params, x.astype(np.float32) / 127.5 - 1.0, SSCD_CFG)
    others = sscd.embed_images(params, rng.uniform(-1, 1, size=(3,) + x.shape[1:]), SSCD_CFG)
    env["bank_emb"] = np.concatenate([cfg_emb, others])
    save_bank(str(env["bank"]), build_bank(env["bank_emb"], kind="embedding", normalize=True))
    # 2) metric networks
    env["clip"] = clip.write_tiny_clip(str(root / "clip"), seed=0)
    inception.save_params(str(root / "inception.npz"), inception.init_params(seed=0),
                          inception.InceptionConfig(image_size=75))
    env["inception"] = root / "inception.npz"
    os.makedirs(root / "refs")
    for i in range(4):      # reference "real" images (any size: resized to the samples'; 4 = batch: one compilation)
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8)).save(root / "refs" / f"{i}.png")
    env["refs"] = root / "refs"
    # 3) the main sweep
    env["main_text"] = sweep_text(env, "out", clip=q(env["clip"]), inception=q(env["inception"]),
                                  reference_images=q(env["refs"])) + METHODS
    lines = []
    env["table"] = sweep.main(write(root / "main" / "sweep.toml", env["main_text"]), progress=False,
                              echo=lines.append)
    env["out"], env["lines"] = root / "main" / "out", lines
    return env


# ----------------------------------------------------------------------------- running

def test_sweep_writes_every_output(env):
    out, table = env["out"], env["table"]
    assert list(table["cells"]) == CELLS and table["missing"] == []
    for cid in CELLS:
        rec = json.load(open(out / "cells" / f"{cid}.json"))
        assert set(rec["metrics"]) == {"memorized", "generic", "all"} and rec["metrics"]["all"]["count"] == 4
        assert rec["settings"]["model"].startswith("sd:") and rec["settings"]["steps"] == STEPS
        assert rec["chunk"] == 4 and rec["seconds"] > 0
        z = np.load(out / "cells" / f"{cid}.npz")
        chex.assert_shape(z["x"], (4, 64, 64, 3))                 # decoded images, not latents
        assert z["x"].dtype == np.uint8
        assert list(z["kinds"]) == ["memorized"] * 2 + ["generic"] * 2 and list(z["caption_ids"]) == [0, 0, 1, 1]
        chex.assert_shape(z["sscd_similarity"], (4,))
        emb = sscd.embed_images(sscd.load_params(str(env["sscd"]))[0], z["x"].astype(np.float32) / 127.5 - 1.0,
                                SSCD_CFG)
        # float32 cosines recomputed from the saved uint8 images: ~1e-7 (margin 1%); another image is O(0.1) off
        np.testing.assert_allclose(z["sscd_similarity"], bank_cosines(emb, env["bank_emb"]), atol=1e-5)
        if cid == "AMG":
            for k in ("sigma", "lambda", "gate"):
                chex.assert_shape(z[k], (4, STEPS))
            s = rec["settings"]
            assert (s["detector"], s["base"], s["amg"]["c1"], s["amg"]["c2"], s["amg"]["c3_units"]) == \
                ("sscd", "cfg", 4.0, 3.0, "raw")
            assert (s["amg"]["c3"], s["amg"]["gradient"], s["amg"]["dedup"]) == (5000.0, "cheap", False)
        else:
            assert "sigma" not in z.files and rec["metrics"]["all"]["gate_open_rate"] is None
        grid = np.asarray(Image.open(out / "grids" / f"{cid}.png"))
        assert grid.ndim == 3 and grid.shape[0] > 2 * 64
    assert json.load(open(out / "cells" / "GNI.json"))["settings"]["baseline_params"] == {"std": 0.5, "branches": "both"}
    rows = read_rows(out)
    assert [(r["cell"], r["kind"]) for r in rows] == [(c, k) for c in CELLS for k in ("memorized", "generic", "all")]
    assert rows[0]["frac_copied"] == rows[0]["frac_sscd_above_0.5"] and "nl2_median" not in rows[0]
    md = open(out / "results.md").read()
    assert "| method | SSCD>0.5 memorized / generic | SSCD mean memorized / generic |" in md
    assert "| AMG |" in md and "true renders" not in md and "FID on inception" in md
    res = json.load(open(out / "results.json"))
    assert list(res) == ["_meta"] + CELLS
    for plot in ("similarity", "tradeoff"):
        assert Image.open(out / "plots" / f"{plot}.png").size[0] > 100
    bench = json.load(open(out / "bench.json"))
    assert bench["prompts"] == {"memorized": ["a red cube"], "generic": ["a blue sphere"]} and bench["threshold"] == 0.5
    assert sum(line.startswith("[") for line in env["lines"]) == 3 and "SSCD>0.5" in env["lines"][-2]
    assert any(line.startswith("note:") and "G_dup" in line for line in env["lines"])   # no captions file


def test_per_prompt_csvs_and_intervals_over_prompts(env):
    out = env["out"]
    for cid in CELLS:
        z = np.load(out / "cells" / f"{cid}.npz")
        rows = list(csv.DictReader(open(out / "per_prompt" / f"{cid}.csv")))
        assert [(r["prompt_id"], r["kind"], r["prompt"], r["seeds"]) for r in rows] == \
            [("0", "memorized", "a red cube", "2"), ("1", "generic", "a blue sphere", "2")]
        for r in rows:
            v = z["sscd_similarity"][z["caption_ids"] == int(r["prompt_id"])]
            # float32 values written by Python's repr: exact
            assert float(r["sscd_max"]) == float(v.max()) and float(r["frac_seeds_above_0.5"]) == np.mean(v > 0.5)
            assert np.isclose(float(r["sscd_mean"]), v.astype(np.float64).mean(), rtol=1e-12)
            assert 0.0 <= float(r["clip_score"]) <= 100.0
        m = env["table"]["cells"][cid]["metrics"]["all"]
        for k in ("frac_copied", "sscd_top5pct", "sscd_top1", "sscd_mean", "clip_score"):
            assert m[f"{k}_ci_lo"] <= m[f"{k}_ci_hi"], (cid, k)
        # two prompts: a resample is (0, 0), (0, 1), (1, 0) or (1, 1); the top-1 interval spans the prompts' maxima
        top = sorted(float(r["sscd_max"]) for r in rows)
        assert top[0] - 1e-6 <= m["sscd_top1_ci_lo"] and m["sscd_top1_ci_hi"] <= top[1] + 1e-6
    md = open(out / "results.md").read()
    assert "## all prompts, 95% bootstrap intervals over prompts" in md
    assert "| CFG | 100.0% [100.0%, 100.0%] |" in md
    assert "frac_copied_ci_lo" in read_rows(out)[0]


def test_amg_copies_less_than_cfg(env):
    m = {cid: env["table"]["cells"][cid]["metrics"]["all"] for cid in CELLS}
    cfg, amg = m["CFG"], m["AMG"]
    assert cfg["frac_sscd_above_0.5"] == 1.0 and cfg["sscd_top1"] > 0.9999      # CFG's samples are in the bank
    assert amg["frac_sscd_above_0.5"] <= cfg["frac_sscd_above_0.5"]
    assert amg["sscd_mean"] < cfg["sscd_mean"] - 1e-4                          # (a random tiny SSCD: all ~1)
    assert amg["gate_open_rate"] == 1.0
    sims = {c: np.load(env["out"] / "cells" / f"{c}.npz")["sscd_similarity"] for c in ("CFG", "AMG")}
    assert np.all(sims["AMG"] < sims["CFG"] - 1e-4)                           # every sample moved off its copy
    print("SSCD mean CFG / AMG / GNI:", cfg["sscd_mean"], amg["sscd_mean"], m["GNI"]["sscd_mean"])
    # same seeds and prompts as the first CFG run: the same images
    assert np.array_equal(np.load(env["out"] / "cells" / "CFG.npz")["x"], env["pre"].samples)


def test_optional_metrics_appear_when_configured(env):
    for cid in CELLS:
        for kind, r in env["table"]["cells"][cid]["metrics"].items():
            assert 0.0 <= r["clip_score"] <= 100.0, (cid, kind)
            assert np.isfinite(r["fd"]) and r["fd"] >= 0.0, (cid, kind)
    assert env["table"]["fd_features"] == "inception"
    pre = env["pre"].metrics["all"]                                         # no clip / inception configured
    assert "clip_score" not in pre and np.isnan(pre["fd"]) and pre["count"] == 4
    assert "clip_score" in read_rows(env["out"])[0]
    print("FID (all) CFG / AMG:", env["table"]["cells"]["CFG"]["metrics"]["all"]["fd"],
          env["table"]["cells"]["AMG"]["metrics"]["all"]["fd"])


def test_resume_skips_finished_cells(env, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(env["out"], out)
    path = write(tmp_path / "sweep.toml", env["main_text"])

    def nothing(*a, **k):
        raise AssertionError("a finished sweep must not load the model or sample")

    monkeypatch.setattr(sweep.StableDiffusionBackend, "_setup", nothing)
    monkeypatch.setattr(runs, "sample_sharded", nothing)
    lines = []
    sweep.main(path, progress=False, echo=lines.append)
    assert sum("done before, skipped" in line for line in lines) == 3
    assert read_rows(out) == read_rows(env["out"])
    from amg_jax.apps import cli

    assert cli.main(["sweep", path, "--no-progress"]) == 0                 # `amg sweep` on it: nothing to do
    # a lost cell is the only one sampled again (one batch of 4 seeds), with the same images
    monkeypatch.undo()
    calls = []
    real = runs.sample_sharded
    monkeypatch.setattr(runs, "sample_sharded", lambda *a, **k: calls.append(1) or real(*a, **k))
    kept = os.stat(out / "cells" / "AMG.json").st_mtime_ns
    os.remove(out / "cells" / "CFG.json")
    sweep.main(path, progress=False, echo=lambda *a: None)
    assert len(calls) == 1 and os.stat(out / "cells" / "AMG.json").st_mtime_ns == kept
    assert np.array_equal(np.load(out / "cells" / "CFG.npz")["x"], np.load(env["out"] / "cells" / "CFG.npz")["x"])


# ----------------------------------------------------------------------------- config

BAD = [
    (dict(bank=None), "sweep.bank is missing"),
    (dict(sscd='"/no/sscd.npz"'), "sweep.sscd '/no/sscd.npz' does not exist"),
    (dict(prompts_file='"missing.txt"'), "sweep.prompts_file 'missing.txt' does not exist"),
    (dict(prompts_file="{empty}"), "holds no prompts"),
    (dict(dtype='"float8"'), "sweep.dtype must be one of"),
    (dict(batch=0), "sweep.batch must be an integer >= 1"),
    (dict(chunk=4), "sweep.chunk is not a sweep key for Stable Diffusion models"),
    (dict(kinds='["rare"]'), "sweep.kinds 'rare' is not a kind of"),
    (dict(prompts_file="{badjson}"), "line 2 is not valid JSON"),
    (dict(bank="{sscd}"), "is not a reference bank"),
    (dict(bank="{pixbank}"), "is a 'pixel' bank"),
    (dict(model='"sd:/no/model"'), "sweep.model 'sd:/no/model': no Stable Diffusion directory"),
    (dict(height=60), "sweep.height must be a positive multiple of 8"),
    (dict(height=72), "sweep.height 72 is not a multiple of 16"),
    (dict(inception="{inception}"), "sweep.reference_images is missing"),
    (dict(reference_images="{refs}"), "sweep.inception is missing"),
    (dict(clip='"./no-clip"'), "sweep.clip './no-clip': no CLIP directory"),
    (dict(extra='\n[[method]]\nname = "A"\nguidance = "amg"\ndetector = "sscd"\n'),
     "method 'A': detector 'sscd': on Stable Diffusion AMG's detector is SSCD"),
    (dict(extra='\n[[method]]\nname = "A"\nguidance = "amg"\namg = { lambda_max = 1.5 }\n'),
     "method 'A': amg.lambda_max=1.5 lies outside"),
]


@pytest.mark.parametrize("keys, message", BAD, ids=[b[1][:40] for b in BAD])
def test_malformed_sd_configs_name_the_key_and_write_nothing(env, tmp_path, monkeypatch, keys, message):
    files = dict(empty=write(tmp_path / "in" / "empty.txt", "\n  \n"), sscd=env["sscd"], inception=env["inception"],
                 refs=env["refs"], badjson=write(tmp_path / "in" / "bad.jsonl", '{"prompt": "a"}\n{prompt}\n'))
    files["pixbank"] = save_bank(str(tmp_path / "in" / "pix.npz"), build_bank(np.zeros((2, 4, 4, 3), np.float32)
                                                                               + np.arange(2)[:, None, None, None]))
    keys = dict(keys)
    extra = keys.pop("extra", ONE)
    keys = {k: (q(files[v[1:-1]]) if isinstance(v, str) and v.startswith("{") and not v.startswith("{ ") else v)
            for k, v in keys.items()}
    path = write(tmp_path / "sweep.toml", sweep_text(env, "out", extra=extra, **keys))
    monkeypatch.setattr(sweep_runner, "make_backend", lambda *a, **k: pytest.fail("no backend for a bad config"))
    with pytest.raises(ValueError) as e:
        sweep.main(path, progress=False, echo=lambda *a: None)
    assert message in str(e.value), str(e.value)
    assert sorted(os.listdir(tmp_path)) == ["in", "sweep.toml"]


def test_read_prompts_formats(tmp_path):
    txt = write(tmp_path / "p.txt", "a cat\n\n  a dog  \n")
    assert sweep.read_prompts(txt) == [("a cat", "prompts"), ("a dog", "prompts")]
    jl = write(tmp_path / "p.jsonl", '{"prompt": "x", "kind": "k1"}\n{"prompt": "y"}\n')
    assert sweep.read_prompts(jl) == [("x", "k1"), ("y", "prompts")]
    with pytest.raises(ValueError, match="line 1: kind must be"):
        sweep.read_prompts(write(tmp_path / "b.jsonl", '{"prompt": "x", "kind": "all"}\n'))


def test_prompts_per_kind_kinds_and_a_hub_id(env, tmp_path):
    p = write(tmp_path / "p.jsonl",
              "".join(json.dumps({"prompt": f"p{i}", "kind": "ab"[i % 2]}) + "\n" for i in range(6)))
    c = sweep.load_config(write(tmp_path / "s.toml", sweep_text(env, "out", extra=ONE, prompts_file=q(p),
                                                                 kinds='["b", "a"]', prompts_per_kind=2)))
    assert (c.sd.prompts, c.sd.prompt_kinds, c.kinds) == (("p0", "p1", "p2", "p3"), ("a", "b", "a", "b"), ("b", "a"))
    assert (c.chunk, c.scale, c.sampler, c.sd.dtype) == (4, 7.5, "ddim", "float32")
    s = sweep.cell_settings(c, c.cells[0])
    assert s["num_prompts"] == 4 and s["sscd"].startswith("sha256:") and s["scale"] == 7.5
    hub = sweep.load_config(write(tmp_path / "h.toml", sweep_text(env, "out", extra=ONE,
                                                                  model='"sd:CompVis/stable-diffusion-v1-4"')))
    assert hub.sd.source == "CompVis/stable-diffusion-v1-4"


# ----------------------------------------------------------------------------- shipped configs

def shipped(name: str, env, tmp_path, **files):
    """The shipped config with the user's files replaced by the test's tiny ones."""
    with open(os.path.join(CONFIGS, name), "rb") as f:
        data = tomllib.load(f)
    data["sweep"].update({k: str(v) for k, v in files.items()})
    data["sweep"]["prompts_file"] = os.path.join(CONFIGS, data["sweep"]["prompts_file"])
    return sweep.parse_config(data, str(tmp_path / name))


def test_shipped_sd_configs(env, tmp_path):
    for name in ("sd_v14_amg.toml", "sd_v14_basin.toml"):
        with pytest.raises(ValueError, match=r"sweep\.sscd .* does not exist"):     # the user's files are missing
            sweep.load_config(os.path.join(CONFIGS, name))
    c = shipped("sd_v14_amg.toml", env, tmp_path, sscd=env["sscd"], bank=env["bank"], clip=env["clip"],
                inception=env["inception"], reference_images=env["refs"])
    assert c.model == "sd:CompVis/stable-diffusion-v1-4" and c.sd.source == "CompVis/stable-diffusion-v1-4"
    assert (c.sampler, c.steps, c.scale) == ("ddim", 50, 7.5) and len(c.sd.prompts) >= 1
    assert c.methods == ["CFG", "GNI", "RT", "CWR", "RNA", "AMG"]
    amg = sweep.cell_settings(c, c.cells[-1])
    assert (amg["amg"]["c1"], amg["amg"]["c2"], amg["amg"]["c3"], amg["amg"]["c3_units"]) == (4.0, 3.0, 100.0, "raw")
    assert [x.baseline for x in c.cells[1:5]] == ["gni", "rt", "cwr", "rna"]
    b = shipped("sd_v14_basin.toml", env, tmp_path, sscd=env["sscd"], bank=env["bank"])
    assert (b.sampler, b.steps, b.scale) == ("dpm++2m", 50, 7.5)
    assert [x.guidance for x in b.cells] == ["cfg", "stp", "dtp", "og", "og_dtp"]


def test_end_to_end_from_a_prompt_list_to_the_table(env, tmp_path, capsys):
    """A memorized-prompt list (Wen et al.'s format) whose training images a 127.0.0.1 server holds:
    amg index fetch -> amg index build (the tiny SSCD) -> amg sweep on that list -> the per-prompt
    CSV and the table with intervals. The training images are CFG's own samples, so CFG copies."""
    import functools
    import http.server
    import threading

    from amg_jax.apps import cli

    site = tmp_path / "site"
    site.mkdir()
    x = env["pre"].samples                                   # [4, 64, 64, 3] uint8: prompts 0, 0, 1, 1
    for i in (0, 2):
        Image.fromarray(x[i]).save(site / f"train{i}.png")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        plist = tmp_path / "memorized.jsonl"
        plist.write_text("".join(json.dumps({"caption": p["prompt"], "index": 100 + i, "url": f"{url}/train{2 * i}.png"})
                                 + "\n" for i, p in enumerate(PROMPTS)))
        imgs, bank = tmp_path / "train", tmp_path / "bank.npz"
        assert cli.main(["index", "fetch", str(plist), "--out", str(imgs), "--no-progress"]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert sorted(os.listdir(imgs)) == ["100.png", "101.png", "captions.jsonl", "fetch_report.json"]
    assert cli.main(["index", "build", str(imgs), "--out", str(bank), "--embedder", f"sscd:{env['sscd']}",
                     "--no-progress"]) == 0
    capsys.readouterr()
    text = sweep_text(env, "out", prompts_file=q(plist), bank=q(bank)) + ONE
    table = sweep.main(write(tmp_path / "e2e" / "sweep.toml", text), progress=False, echo=lambda *a: None)
    out = tmp_path / "e2e" / "out"
    rows = list(csv.DictReader(open(out / "per_prompt" / "CFG.csv")))
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in PROMPTS] and all(r["kind"] == "prompts" for r in rows)
    z = np.load(out / "cells" / "CFG.npz")
    assert [float(r["sscd_max"]) for r in rows] == [float(z["sscd_similarity"][2 * i: 2 * i + 2].max()) for i in (0, 1)]
    m = table["cells"]["CFG"]["metrics"]["all"]
    assert m["frac_copied_ci_lo"] <= m["frac_copied"] <= m["frac_copied_ci_hi"]
    md = open(out / "results.md").read()
    assert "95% bootstrap intervals over prompts" in md and "| CFG |" in md
