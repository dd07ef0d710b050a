"""`amg bench` (amg_jax.apps.bench): report structure, ratios, errors — never speed (speed is measured by
the bench itself, not asserted in unit tests).

Every part runs in the ``tiny`` setting on one tiny random SD written once for the module. XLA's
optimisations are switched off for this module (``jax_disable_most_optimizations``): the AMG
loops' CPU compilations take 2-3x less time, and no test looks at how fast anything runs.
"""
import json
import math

import jax
import numpy as np
import pytest

from amg_jax.apps import bench
from amg_jax.models import sd_tiny
from amg_jax.models import stable_diffusion as sdm

pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """One tiny SD for every part (``main(sd=...)``; ``sd_path`` would load it again each time)."""
    return sdm.load_stable_diffusion(sd_tiny.write_tiny_sd(tmp_path_factory.mktemp("bench") / "tiny-sd", seed=0))


def run(tmp_path, sd, part):
    lines = []
    report = bench.main(tmp_path / "out", tiny=True, parts=[part], sd=sd, echo=lines.append)
    return report, lines


def check_report(report, out_dir, parts):
    """bench.json equals the returned report; machine, settings and every part's rows are well formed."""
    on_disk = json.loads((out_dir / "bench.json").read_text())
    assert on_disk == report
    assert report["format"] == bench.FORMAT and report["version"] == bench.FORMAT_VERSION
    m = report["machine"]
    assert m["device_count"] == len(jax.devices()) == len(m["device_kinds"])
    assert m["cpu_count"] >= 1 and m["platform"] == jax.devices()[0].platform
    assert {"jax", "flax", "diffusers"} <= set(m["versions"]) and m["versions"]["jax"] == jax.__version__
    assert report["settings"]["parts"] == list(parts) and report["settings"]["tiny"] is True
    assert list(report["parts"]) == list(parts)
    md = (out_dir / "bench.md").read_text()
    for name in parts:
        part = report["parts"][name]
        assert "error" not in part, part.get("error")
        assert part["rows"] and part["met"] in (True, False, None)
        assert part["wall_s"] > 0 and "peak_memory_bytes" in part
        for row in part["rows"]:
            assert isinstance(row["ratio"], float) and math.isfinite(row["ratio"]) and row["ratio"] > 0, row
            assert row["seconds"] > 0 and row["first_call_s"] > 0, row
        groups = {r.get("group") for r in part["rows"]}
        assert sum(1 for r in part["rows"] if r.get("reference")) == len(groups)   # one reference per table / group
        assert f"## {name}:" in md and bench.TARGETS[name] in md
        header = "| " + " | ".join(c[0] for c in bench._COLUMNS[name]) + " |"
        assert header in md
        table = md.split(header)[1].split("\n\n")[0].strip().splitlines()
        assert len(table) == 1 + len(part["rows"])                        # separator + one line per row
    assert ("n/a" in md) == (bench.peak_memory_bytes() is None)


def test_bad_arguments_raise_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown part 'bogus'"):
        bench.main(tmp_path / "x", parts=["amg", "bogus"])
    with pytest.raises(ValueError, match="unknown part 'nope'"):
        bench.main(tmp_path / "x", parts="search,nope")
    with pytest.raises(ValueError, match="sd_size must be one of"):
        bench.main(tmp_path / "x", sd_size="2.1")
    with pytest.raises(ValueError, match="batch must be an integer >= 1"):
        bench.main(tmp_path / "x", batch=0)
    with pytest.raises(ValueError, match="sd_path .* is not a directory"):
        bench.main(tmp_path / "x", sd_path=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="sd must be a loaded StableDiffusion"):
        bench.main(tmp_path / "x", sd="runwayml/stable-diffusion-v1-5")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench.main(tmp_path / "x", dtype="float64")
    with pytest.raises(ValueError, match="attention implementation must be one of"):
        bench.main(tmp_path / "x", attention="flash")
    assert not (tmp_path / "x").exists()
    assert bench.parse_parts(None) == bench.PARTS
    assert bench.parse_parts("search, amg,search") == ("search", "amg")


def test_settings():
    q = bench.settings(quick=True, sd_size="1.5")
    assert q.sd_size == "tiny" and max(q.bank_sizes) <= 10_000 and q.steps <= 4 and q.batch <= 4
    full = bench.settings(sd_size="1.5", batch=6)
    assert full.sd_size == "1.5" and full.bank_sizes[-1] == 1_000_000 and full.device_batch % 4 == 0


def test_pipeline_part(tmp_path, sd):
    report, lines = run(tmp_path, sd, "pipeline")
    check_report(report, tmp_path / "out", ["pipeline"])
    part = report["parts"]["pipeline"]
    assert [r["name"].split(" ")[0] for r in part["rows"]] == ["amg_jax:", "amg_jax:", "diffusers"]
    assert part["rows"][-1]["ratio"] == 1.0
    for r in part["rows"]:
        np.testing.assert_allclose(r["s_per_image"] * part["batch"], r["seconds"], rtol=1e-9)   # float64: 1 ulp
    # both sides sampled the same latents with the same model: the same images (float32 Flax UNet
    # steps in two programs: 1.3e-6 measured on [0, 1] pixels; a different latent or step is >1e-2 off)
    assert part["max_abs_diff"] < 1e-3
    assert any("[pipeline]" in x for x in lines)


def test_kernels_part(tmp_path, sd):
    report, lines = run(tmp_path, sd, "kernels")
    check_report(report, tmp_path / "out", ["kernels"])
    part = report["parts"]["kernels"]
    platform = jax.default_backend()
    assert [(r["dtype"], r["attention"]) for r in part["rows"]] == bench.kernel_rows(platform)
    ref = part["rows"][0]
    assert ref["reference"] and ref["ratio"] == 1.0 and ref["max_abs_diff_vs_reference"] == 0.0
    # bfloat16 weights and activations over 2 DDIM steps of the tiny UNet + VAE: ~1e-2 on [0, 1]
    # pixels (8 mantissa bits); far above float32 round-off, far below a wrong model (~0.3)
    bf16 = part["rows"][1]
    assert 0.0 < bf16["max_abs_diff_vs_reference"] < 0.1, bf16
    assert ("no fused kernel" in part["headline"]) == (platform != "gpu")
    assert sum("[kernels]" in x for x in lines) == len(part["rows"])


def test_pipeline_target():
    """At least as fast as the Flax pipeline; 1.3x only where a fused kernel exists (GPU, 16-bit)."""
    from types import SimpleNamespace

    assert bench.pipeline_target(SimpleNamespace(dtype="float32")) == 1.0
    on_gpu = jax.default_backend() == "gpu"
    assert bench.pipeline_target(SimpleNamespace(dtype="bfloat16")) == (1.3 if on_gpu else 1.0)


def test_amg_part(tmp_path, sd):
    report, _ = run(tmp_path, sd, "amg")
    check_report(report, tmp_path / "out", ["amg"])
    part = report["parts"]["amg"]
    groups = list(dict.fromkeys(r["group"] for r in part["rows"]))
    assert len(groups) == 2 and groups[0].startswith("unet-text") and "through the VAE" in groups[1]
    for g in groups:
        rows = {r["name"]: r for r in part["rows"] if r["group"] == g}
        assert rows["plain CFG"]["ratio"] == 1.0 and "gate_open" not in rows["plain CFG"]
        assert rows[bench.SPE_ONLY]["gate_open"] == 0.0 and rows[bench.SPE_ONLY]["steps_any_open"] == 0.0
    assert part["met"] is None and part["notes"][0].startswith("tiny setting")


def test_search_part(tmp_path, sd):
    report, _ = run(tmp_path, sd, "search")
    check_report(report, tmp_path / "out", ["search"])
    part = report["parts"]["search"]
    banks = [(r["bank_rows"], r["approx"]) for r in part["rows"]]
    assert banks == [(None, None), (1000, False), (1000, True)]
    assert 0.0 <= part["rows"][-1]["agrees_with_exact"] <= 1.0
    if jax.devices()[0].platform == "cpu":
        assert part["met"] is None                                    # the target is for a 1M bank on a GPU


def test_random_bank_search_finds_a_planted_row():
    from amg_jax.index import search

    bank = bench.random_bank(500, 16, seed=1)
    # float32 normalised rows and cosines of a row with itself: a few ulps (margins <= 1.8%)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(bank.rows), axis=1), 1.0, rtol=1e-5)
    vals, idx = search(bank, bank.rows[np.array([7, 300])] * 3.0, 1, metric="cosine")
    np.testing.assert_array_equal(np.asarray(idx)[:, 0], [7, 300])
    np.testing.assert_allclose(np.asarray(vals)[:, 0], 1.0, atol=1e-5)


def test_devices_part(tmp_path, sd):
    report, _ = run(tmp_path, sd, "devices")
    check_report(report, tmp_path / "out", ["devices"])
    part = report["parts"]["devices"]
    n = len(jax.devices())
    assert [r["devices"] for r in part["rows"]] == [d for d in bench.DEVICE_COUNTS if d <= n]
    assert part["rows"][0]["ratio"] == 1.0
    if report["machine"]["simulated_devices"]:
        assert "simulated devices" in part["notes"][0]


def test_random_sd_builds_in_memory(tmp_path):
    """The in-memory builder behind sd_size="1.5", on the tiny configs (shapes only, nothing compiled)."""
    cfg = sd_tiny.tiny_configs()
    sd = bench.random_sd(str(tmp_path), cfg, source="tiny in memory")
    den = sdm.sd_denoiser(sd)
    assert den.sample_shape == (8, 8, 4) and sd.image_size == 64
    assert sd.null_embedding.shape == (77, cfg["text_encoder"]["hidden_size"])
    x = jax.ShapeDtypeStruct((2,) + den.sample_shape, np.float32)
    t = jax.ShapeDtypeStruct((2,), np.int32)
    c = jax.ShapeDtypeStruct((2, 77, cfg["text_encoder"]["hidden_size"]), np.float32)
    assert jax.eval_shape(den.eps_fn, den.params, x, t, c).shape == (2,) + den.sample_shape
    big = bench.sd15_configs(1000)
    assert big["unet"]["cross_attention_dim"] == big["text_encoder"]["hidden_size"] == 768


def test_random_sdxl_builds_in_memory(tmp_path):
    """random_sd with "text_encoder_2": an SDXL (pooled row appended, zeros as the null condition,
    micro-conditioning from the image size), in bfloat16 with XLA attention; shapes only."""
    cfg = sd_tiny.tiny_configs(variant="sdxl")
    sd = bench.random_sd(str(tmp_path), cfg, source="tiny XL in memory", dtype="bfloat16", attention="xla")
    assert sd.is_sdxl and sd.dtype == "bfloat16" and sd.attention == "xla"
    d = cfg["text_encoder"]["hidden_size"] + cfg["text_encoder_2"]["hidden_size"]
    assert sd.null_embedding.shape == (78, d) and not np.asarray(sd.null_embedding).any()
    den = sdm.sd_denoiser(sd)
    c = sdm.encode_prompts(sd, ["a red cube", "a photo of a cat"])
    assert c.shape == (2, 78, d)
    x = jax.ShapeDtypeStruct((2,) + den.sample_shape, np.float32)
    t = jax.ShapeDtypeStruct((2,), np.int32)
    assert jax.eval_shape(den.eps_fn, den.params, x, t, c).shape == (2,) + den.sample_shape
    xl = bench.sdxl_configs(1000)
    assert xl["unet"]["cross_attention_dim"] == 768 + xl["text_encoder_2"]["hidden_size"] == 2048
    assert xl["unet"]["projection_class_embeddings_input_dim"] == 6 * 256 + xl["text_encoder_2"]["projection_dim"]


def test_components_time_each_part_of_a_step(tmp_path):
    """_components on a linear denoiser over 4x4x1 samples (cheap to compile): one row per part of
    a step, the full gradient included unless asked not to, each relative to the given CFG step time."""
    import jax.numpy as jnp

    from amg_jax import Denoiser, build_bank, pixel_detector

    def eps_fn(p, x, t, c):
        return p * x + 0.01 * c.astype(x.dtype).reshape((-1, 1, 1, 1)) + 1e-4 * t.astype(x.dtype).reshape((-1, 1, 1, 1))

    den = Denoiser(params=jnp.float32(0.5), null_cond=jnp.int32(-1), eps_fn=eps_fn, sample_shape=(4, 4, 1),
                   num_conditions=4)
    rows = np.random.default_rng(0).standard_normal((6, 4, 4, 1)).astype(np.float32)
    det = pixel_detector(build_bank(rows, np.arange(6) % 4))
    env = bench._Shared(bench.settings(tiny=True), str(tmp_path), lambda *_: None)
    cond = jnp.asarray([0, 3], jnp.int32)
    rows = bench._components(env, "g", den, det, cond, cfg_step_s=0.5, scale=2.0)
    assert [r["name"].split(" [")[0] for r in rows] == [
        "component: one denoiser call", "component: one detector call",
        "component: cheap G_sim gradient (detector backward)", "component: full G_sim gradient (CFG call"]
    for r in rows:
        assert r["kind"] == "component" and r["group"] == "g"
        np.testing.assert_allclose(r["ratio"], r["seconds"] / 0.5, rtol=1e-12)   # the same float64 division
    short = bench._components(env, "g", den, det, cond, cfg_step_s=0.5, scale=2.0, full_gradient=False)
    assert len(short) == 3
    # XLA's FLOP counts: the denoiser call [2B = 4] of p * x over 4x4x1 samples is a few dozen FLOPs;
    # the full gradient (forward + backward through it and the detector) counts more than the detector alone
    flops = [r["gflops"] for r in rows]
    assert all(f is not None and f > 0 for f in flops), flops
    assert flops[3] > flops[1]
    np.testing.assert_allclose(bench.flop_bound(rows, "g"), 1 + flops[1] / flops[0], rtol=1e-12)   # same formula
    assert bench.flop_bound(rows, "other") is None


def test_sd_open_rows_setting():
    assert not bench.sd_open_rows(bench.settings(quick=True))
    assert not bench.sd_open_rows(bench.settings(tiny=True))
    assert bench.sd_open_rows(bench.settings()) is True                 # tiny SD, full setting
    on_cpu = jax.devices()[0].platform == "cpu"
    assert bench.sd_open_rows(bench.settings(sd_size="1.5")) is (not on_cpu)


def _fake_row(i: int) -> dict:
    return dict(group="g", name=f"row {i}", seconds=0.1 * (i + 1), ratio=1.0 + i, reference=i == 0, first_call_s=0.2)


def test_a_part_stopped_midway_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """Each row a part records is on disk at once; a part that fails keeps its finished rows beside
    the error, and the next part still runs (fake parts: no model is built)."""
    out = tmp_path / "out"
    seen = {}

    def failing(env):
        env.record(_fake_row(0))
        seen["on_disk"] = json.loads((out / "bench.json").read_text())["parts"]["amg"]
        env.record(_fake_row(1))
        raise ValueError("the detector ran out of memory")

    def fine(env):
        return {"title": "t", "rows": [env.record(dict(name="x", ms=1.0, ratio=0.5, seconds=0.001, first_call_s=0.01,
                                                       reference=True))],
                "met": True, "headline": "ok"}

    monkeypatch.setitem(bench.PART_FUNCTIONS, "amg", failing)
    monkeypatch.setitem(bench.PART_FUNCTIONS, "search", fine)
    report = bench.main(out, tiny=True, parts=["amg", "search"], echo=lambda *_: None)
    assert seen["on_disk"]["incomplete"] is True and [r["name"] for r in seen["on_disk"]["rows"]] == ["row 0"]
    amg = report["parts"]["amg"]
    assert amg["error"] == "ValueError: the detector ran out of memory" and "incomplete" not in amg
    assert [r["name"] for r in amg["rows"]] == ["row 0", "row 1"]
    assert report["parts"]["search"]["rows"][0]["name"] == "x" and "error" not in report["parts"]["search"]
    assert json.loads((out / "bench.json").read_text()) == report
    md = (out / "bench.md").read_text()
    assert "**failed**: ValueError: the detector ran out of memory" in md and "| g | row 1 |" in md


def test_sigterm_writes_the_rows_so_far_and_exits_143(tmp_path, monkeypatch):
    """A SIGTERM (what ``timeout`` sends the device check's stages) mid-part: the rows finished are
    written with the reason, the run exits 143, and the previous SIGTERM handler is back."""
    import os
    import signal
    import time

    def slow(env):
        env.record(_fake_row(0))
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(200):         # the handler raises at the next bytecode; never reached 10 s later
            time.sleep(0.05)
        env.record(_fake_row(1))
        return {"title": "t", "rows": env.rows_done, "met": None, "headline": "-"}

    monkeypatch.setitem(bench.PART_FUNCTIONS, "amg", slow)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as e:
        bench.main(tmp_path / "out", tiny=True, parts=["amg", "search"], echo=lambda *_: None)
    assert e.value.code == 143 and signal.getsignal(signal.SIGTERM) is before
    report = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert list(report["parts"]) == ["amg"]
    amg = report["parts"]["amg"]
    assert amg["error"] == f"interrupted by signal {int(signal.SIGTERM)} after 1 row"
    assert [r["name"] for r in amg["rows"]] == ["row 0"]
    assert "**stopped**: interrupted by signal" in (tmp_path / "out" / "bench.md").read_text()
