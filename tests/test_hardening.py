"""Hardening of runs: settings that make the guidance diverge (a clear warning naming the setting,
the samples still returned), interrupted `amg sample` / `amg index build` runs (finished batches
kept, a re-run continues and ends with the uninterrupted result), batches that do not divide by
the device count (4 simulated) or the prompt count, and determinism (the same command twice gives
the same files; 1 vs 4 devices the same samples).

`amg sample` runs here on a stand-in for Stable Diffusion (the perfect memorizer of a tiny testbed
behind the same loader functions): its batching, writing and resume logic is the same, at a
fraction of the cost (the real model: tests/apps/test_sample.py). Interrupted sweeps and training:
tests/apps/test_sweep.py, tests/test_train.py."""
import json
import os
import textwrap
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from amg_jax import index, index_build, sharding
from amg_jax.apps import cli
from amg_jax.apps import runs, sweep
from amg_jax.apps.sweep import backends as sweep_backends
from amg_jax.data import testbed as tb
from amg_jax.data.bank import bank_from_testbed
from amg_jax.guidance import CFG
from amg_jax.guidance.amg import make_amg
from amg_jax.models import stable_diffusion as sdm
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.samplers import SamplerConfig, initial_noise, keys_from_seeds, nonfinite_samples_message, sample
from amg_jax.similarity.pixel import pixel_detector

TINY = tb.TestbedConfig(seed=1, image_size=8, shapes=("circle", "cross"), colours=("red", "blue"),
                        backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=3,
                        n_duplicated=1, duplicate_count=3, n_generic=1, generic_images=3)
DDIM = SamplerConfig("ddim", 3)


@pytest.fixture(scope="module")
def tiny():
    bed = tb.make_testbed(TINY)
    den = empirical_denoiser(bed.images, bed.labels, num_conditions=bed.num_captions)
    return bed, den, bank_from_testbed(bed)


def cond(n, bed):
    return jnp.asarray(np.arange(n) % bed.num_captions, jnp.int32)


# ----------------------------------------------------------------------------- diverging guidance


def test_a_huge_cfg_scale_warns_naming_the_scale_and_returns_the_samples(tiny):
    bed, den, _ = tiny
    for run in (lambda g, k, c: sample(den, g, DDIM, k, c),
                lambda g, k, c: sharding.sample_sharded(den, g, DDIM, k, c)):
        with pytest.warns(RuntimeWarning, match=r"2 of 2 samples are NaN/inf.*lower its strength: CFG\(scale=1e\+30\)"):
            res = run(CFG(scale=1e30), keys_from_seeds([0, 1]), cond(2, bed))      # 2 seeds on 4 devices: padded
            jax.effects_barrier()          # the warning arrives when the computation completes
        chex.assert_shape(res.x0, (2,) + den.sample_shape)
    # finite but far beyond any image (CFG 1e10 ends near 1e17 here): the same message
    msg = nonfinite_samples_message(jnp.array([[0.5, -1.0], [3e6, 0.0]]), CFG(scale=1e10))
    assert "1 of 2 samples are NaN/inf or beyond +-1e+06 (samples [1])" in msg and "CFG(scale=1e+10)" in msg
    assert nonfinite_samples_message(jnp.ones((2, 3)), CFG(scale=1e10)) is None


def test_sample_returns_before_its_samples_are_computed_and_warns_when_they_are(tiny):
    """``sample`` / ``sample_sharded`` read nothing back to the host (the divergence check runs on
    the device, its warning comes from a callback): on an input still being computed they return
    at once, unsynced, so a loop over batches keeps the device busy; the warning arrives once the
    samples are computed (``jax.effects_barrier`` waits for it). The old check read the flags back
    and returned only when the samples were done. On a GPU / TPU the transfer guard also catches
    a read-back; on CPU arrays are host memory and it never fires (measured), hence ``is_ready``."""
    bed, den, _ = tiny
    keys, c = keys_from_seeds([0, 1]), cond(2, bed)
    x_T = initial_noise(keys, den.sample_shape)
    busy = jax.jit(lambda x, n: x + 0.0 * jax.lax.fori_loop(0, n, lambda i, m: jnp.tanh(m @ m), 0.5 * jnp.eye(256)).sum())
    for run in (lambda x: sample(den, CFG(scale=1e30), DDIM, keys, c, x_T=x),
                lambda x: sharding.sample_sharded(den, CFG(scale=1e30), DDIM, keys, c, x_T=x)):
        with pytest.warns(RuntimeWarning):                  # compile everything first
            run(busy(x_T, 1))
            jax.effects_barrier()
        # ~0.3-1.5 s of device work before x_T exists (measured 0.8 s for 400 iterations on 2 loaded
        # cores): sample's host work (checks, a cached dispatch) takes milliseconds, >= 100x less
        pending = busy(x_T, 1000)
        with pytest.warns(RuntimeWarning, match=r"2 of 2 samples are NaN/inf.*CFG\(scale=1e\+30\)"):
            with jax.transfer_guard_device_to_host("disallow"):
                res = run(pending)
            assert not res.x0.is_ready()                    # returned while the device still works
            jax.effects_barrier()
        chex.assert_shape(res.x0, (2,) + den.sample_shape)          # the samples are still returned


def test_huge_amg_strengths(tiny):
    """c1 and c2 are capped by the base scale (s1 <= w - 1): a finite result without a warning;
    a huge c3 moves x0_hat without bound: a warning naming c3 (each term alone: lighter programs)."""
    bed, den, bank = tiny
    det = pixel_detector(bank, kind="cosine")
    kw = dict(lambda_min=0.8, lambda_max=0.95, gradient="cheap")
    keys, c = keys_from_seeds(range(4)), cond(4, bed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = sample(den, make_amg(CFG(scale=3.0), det, c1=1e30, c2=1e30, dissimilar=False, **kw), DDIM, keys, c)
        jax.effects_barrier()              # a divergence warning would arrive by now
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert np.all(np.abs(np.asarray(res.x0)) < 10) and np.asarray(res.trace["gate"]).any()
    assert np.asarray(res.trace["s1"]).max() <= 2.0 + 1e-6                # capped at w - 1
    with pytest.warns(RuntimeWarning, match=r"lower its strength: AMG\(c1=4, c2=3, c3=1e\+30, base CFG\(scale=3\)\)"):
        sample(den, make_amg(CFG(scale=3.0), det, c3=1e30, despecify=False, dedup=False, **kw), DDIM, keys, c)
        jax.effects_barrier()


def test_neighbour_conds_must_cover_the_bank_labels(tiny):
    """Captions of another bank (fewer rows than its labels) would be clamped silently by jnp.take."""
    bed, _, bank = tiny
    det = pixel_detector(bank, kind="cosine")
    top = int(np.max(np.asarray(bank.labels)))
    with pytest.raises(ValueError, match=rf"labels go up to {top} but neighbour_conds has {top} rows"):
        make_amg(CFG(3.0), det, neighbour_conds=jnp.zeros((top, 4)), lambda_min=0.8, lambda_max=0.95)
    make_amg(CFG(3.0), det, neighbour_conds=jnp.zeros((top + 1, 4)), lambda_min=0.8, lambda_max=0.95)


def test_eval_with_a_huge_scale_finishes_with_a_warning(tmp_path, capsys):
    out = tmp_path / "ev"
    with pytest.warns(RuntimeWarning, match=r"CFG\(scale=1e\+30\)"):
        assert cli.main(["eval", "--model", "empirical", "--testbed", "small", "--method", "cfg", "--scale", "1e30",
                         "--kinds", "duplicated", "--prompts", "1", "--samples", "2", "--steps", "2",
                         "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["metrics"]["all"]["n"] == 2


# ----------------------------------------------------------------------------- `amg sample`: resume, batches


PROMPTS = ["p0", "p1"]


@pytest.fixture(scope="module")
def fake_sd(tiny):
    """`amg sample`'s model loaders replaced by the tiny perfect memorizer (prompt "pK" -> caption K)."""
    _, den, _ = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sdm, "load_stable_diffusion", lambda path, **kw: "fake sd")
        mp.setattr(sdm, "sd_denoiser", lambda sd, height=None, width=None, **kw: den)
        mp.setattr(sdm, "sd_sampler_config", lambda sd, num_steps=50, name="ddim", **kw: SamplerConfig(name, num_steps))
        mp.setattr(sdm, "encode_prompts",
                   lambda sd, prompts, **kw: jnp.asarray([int(p[1:]) for p in prompts], jnp.int32))
        yield den


def sample_cmd(out, batch) -> list:
    return ["sample", "--model", "sd:fake", "--prompt", PROMPTS[0], "--prompt", PROMPTS[1], "--seeds", "3",
            "--steps", "3", "--scale", "3", "--batch", str(batch), "--out", str(out)]


class Calls:
    """Wraps sharding.sample_sharded (as ``runs.run_method`` calls it): counts calls, raises
    KeyboardInterrupt on call ``kill_at``."""

    def __init__(self, kill_at=None):
        self.n, self.kill_at, self.real = 0, kill_at, sharding.sample_sharded

    def __call__(self, *a, **k):
        self.n += 1
        if self.n == self.kill_at:
            raise KeyboardInterrupt("simulated kill")
        return self.real(*a, **k)


def pngs(out) -> np.ndarray:
    names = sorted(os.listdir(out / "images"))
    return np.stack([np.asarray(Image.open(out / "images" / n), np.int16) for n in names])


@pytest.fixture(scope="module")
def full(fake_sd, tmp_path_factory):
    """`amg sample` of 2 prompts x 3 seeds in one batch (6 on 4 devices: padded to 8)."""
    out = tmp_path_factory.mktemp("sample") / "full"
    assert cli.main(sample_cmd(out, 6)) == 0
    return out


def test_sample_twice_gives_the_same_files_and_one_device_the_same_images(full, fake_sd, tmp_path):
    again = tmp_path / "again"
    assert cli.main(sample_cmd(again, 6)) == 0
    for name in ["trace.npz"] + [f"images/{n}" for n in sorted(os.listdir(full / "images"))]:
        assert (again / name).read_bytes() == (full / name).read_bytes(), name
    rep = json.loads((full / "samples.json").read_text())
    assert [(s["prompt"], s["seed"]) for s in rep["samples"]] == [(p, s) for p in PROMPTS for s in range(3)]
    one = sample(fake_sd, CFG(scale=3.0), DDIM, keys_from_seeds([0, 1, 2] * 2), jnp.asarray([0] * 3 + [1] * 3))
    ref = np.round((np.clip(np.asarray(one.x0), -1, 1) + 1) * 127.5)
    assert np.abs(pngs(full) - ref).max() <= 1


def test_interrupted_sample_keeps_finished_batches_and_resumes(full, fake_sd, tmp_path, monkeypatch):
    """Batches of 4 over 2 prompts x 3 seeds (a batch straddles the prompts): killed in the second
    batch, the first batch's images, trace and report are on disk; the re-run samples only the
    second batch and ends with the one-batch run's images; a third run has nothing to do."""
    out = tmp_path / "b4"
    monkeypatch.setattr(runs, "sample_sharded", Calls(kill_at=2))
    with pytest.raises(KeyboardInterrupt):
        cli.main(sample_cmd(out, 4))
    rep = json.loads((out / "samples.json").read_text())
    assert not rep["complete"] and len(rep["samples"]) == 4
    assert sorted(os.listdir(out / "images")) == [f"{i:04d}.png" for i in range(4)]
    assert np.load(out / "trace.npz")["scale"].shape == (4, 3)
    first = (out / "images" / "0000.png").stat().st_mtime_ns
    for expected_calls in (1, 0):
        calls = Calls()
        monkeypatch.setattr(runs, "sample_sharded", calls)
        assert cli.main(sample_cmd(out, 4)) == 0
        assert calls.n == expected_calls
        rep = json.loads((out / "samples.json").read_text())
        assert rep["complete"] and [r["seed"] for r in rep["samples"]] == [0, 1, 2] * 2
        assert (out / "images" / "0000.png").stat().st_mtime_ns == first
        assert np.abs(pngs(out) - pngs(full)).max() <= 1
        np.testing.assert_allclose(np.load(out / "trace.npz")["scale"], np.load(full / "trace.npz")["scale"])
    # other settings in the same folder start over
    calls = Calls()
    monkeypatch.setattr(runs, "sample_sharded", calls)
    assert cli.main(sample_cmd(out, 4)[:-4] + ["--batch", "3", "--out", str(out)]) == 0
    assert calls.n == 2 and np.abs(pngs(out) - pngs(full)).max() <= 1


# ----------------------------------------------------------------------------- `amg index build`: resume


def test_interrupted_index_build_resumes_to_the_uninterrupted_bank(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    real = index_build.image_embedder
    seen = []

    def counting(kill_at=None):
        def make(spec, **kw):
            embed, *rest = real(spec, **kw)

            def run(x):
                seen.append(len(x))
                if len(seen) == kill_at:
                    raise KeyboardInterrupt("simulated kill")
                return embed(x)
            return (run, *rest)
        return make

    cmd = ["index", "build", str(folder), "--size", "8", "8", "--batch", "2", "--no-progress", "--out"]
    assert cli.main(cmd + [str(tmp_path / "ref.npz")]) == 0
    monkeypatch.setattr(cli, "image_embedder", counting(kill_at=2))
    with pytest.raises(KeyboardInterrupt):
        cli.main(cmd + [str(tmp_path / "bank.npz")])
    assert not (tmp_path / "bank.npz").exists()
    kept = sorted(f for f in os.listdir(tmp_path / "bank.npz.partial") if f.startswith("batch_"))
    assert kept == ["batch_000000.npz"]
    seen.clear()
    monkeypatch.setattr(cli, "image_embedder", counting())
    assert cli.main(cmd + [str(tmp_path / "bank.npz")]) == 0
    assert seen == [2, 1]                                     # the first batch was not embedded again
    a, b = index.load_bank(str(tmp_path / "ref.npz")), index.load_bank(str(tmp_path / "bank.npz"))
    np.testing.assert_array_equal(np.asarray(a.rows), np.asarray(b.rows))
    assert not (tmp_path / "bank.npz.partial").exists()


# ----------------------------------------------------------------------------- sweep: devices, padding, repeat


SWEEP = """\
[sweep]
model = "empirical"
testbed = "small"
prompts_per_kind = 1
samples_per_prompt = 3
kinds = ["duplicated", "generic"]
steps = 3
chunk = 4
out = "out"

[[method]]
name = "CFG"
guidance = "cfg"
scale = 3.0
"""


def test_sweep_padded_chunks_on_4_devices_equal_1_device_and_repeat_exactly(tmp_path, monkeypatch):
    """6 seeds in chunks of 4 (the last padded) sharded over 4 devices: the samples of one device,
    and a second run gives the same files."""
    def run(name):
        d = tmp_path / name
        os.makedirs(d)
        (d / "sweep.toml").write_text(textwrap.dedent(SWEEP))
        sweep.main(str(d / "sweep.toml"), progress=False, echo=lambda *a: None)
        z = np.load(d / "out" / "cells" / "CFG.npz")
        rec = json.loads((d / "out" / "cells" / "CFG.json").read_text())
        return z["x"].astype(np.float32), rec["metrics"], (d / "out" / "results.csv").read_text()

    assert jax.device_count() == 4
    x4, m4, csv4 = run("four")
    x4b, m4b, csv4b = run("again")
    np.testing.assert_array_equal(x4b, x4)
    assert m4b == m4
    real = sweep_backends.run_method
    monkeypatch.setattr(sweep_backends, "run_method", lambda *a, **k: real(*a, **dict(k, sharded=False)))
    x1, m1, _ = run("one")
    chex.assert_shape(x1, (6, 16, 16, 3))
    np.testing.assert_allclose(x1, x4, atol=2e-3)             # float16 storage
    assert m1["all"]["frac_copied"] == m4["all"]["frac_copied"]
    np.testing.assert_allclose(m1["all"]["fd"], m4["all"]["fd"], rtol=1e-3)
