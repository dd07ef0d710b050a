"""amg_jax.train: loss goes down, resume == uninterrupted (also after a real SIGKILL), load_params
errors, validation, determinism, condition dropout. A tiny conv net on 16 8x8x3 images, 4 CPU devices."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax import train as tr
from amg_jax.train import TrainConfig, load_params, train

NUM_CLASSES = 4
N = 16
CONFIG = TrainConfig(steps=12, batch_size=8, learning_rate=3e-3, warmup_steps=2, ema_decay=0.9,
                     cond_dropout=0.2, seed=0, checkpoint_every=4, keep=2, log_every=4)


def quiet(*_):
    pass


class _Net(nn.Module):
    num_classes: int
    features: int

    @nn.compact
    def __call__(self, x, t, c):
        freqs = jnp.exp(-jnp.arange(4) * 2.0)
        ang = t.astype(jnp.float32)[:, None] * freqs[None, :]
        temb = nn.Dense(self.features)(jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1))
        cemb = nn.Embed(self.num_classes + 1, self.features)(jnp.where(c < 0, self.num_classes, c))
        h = nn.Conv(self.features, (3, 3))(x) + (temb + cemb)[:, None, None, :]
        h = nn.Conv(self.features, (3, 3))(nn.silu(h))
        return nn.Conv(x.shape[-1], (3, 3))(nn.silu(h))


class ToyModel:
    """A TrainableModel: two 3x3 convs + time and condition embeddings (-1 -> the last row)."""

    def __init__(self, features: int = 8, num_classes: int = NUM_CLASSES):
        self.name = "toy"
        self.net = _Net(num_classes, features)
        self.features, self.num_classes = features, num_classes

    def init(self, rng):
        z = jnp.zeros((1,), jnp.int32)
        return self.net.init(rng, jnp.zeros((1, 8, 8, 3)), z, z)["params"]

    def eps_fn(self, params, x_t, t, cond):
        return self.net.apply({"params": params}, x_t, t, cond)

    def config_dict(self):
        return {"kind": "toy", "features": self.features, "num_classes": self.num_classes}


MODEL = ToyModel()


def dataset():
    rng = np.random.default_rng(0)
    cond = np.arange(N, dtype=np.int32) % NUM_CLASSES
    colors = rng.uniform(-0.8, 0.8, (NUM_CLASSES, 1, 1, 3))
    images = colors[cond] + 0.1 * rng.standard_normal((N, 8, 8, 3))
    return np.clip(images, -1, 1).astype(np.float32), cond


IMAGES, COND = dataset()


def run(workdir, config=CONFIG, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("echo", quiet)
    return train(MODEL, IMAGES, COND, config, str(workdir), **kw)


# Resumed / extended runs repeat the same compiled step on the same restored state: bit-identical
# here (every margin 0). 1e-5 allows a resumed process compiled for another ISA (the SIGKILL child
# sets its own XLA_FLAGS); a resume that lost the optimizer state, EMA or RNG is off by >1e-3.
def assert_tree_close(a, b, rtol=1e-5, atol=1e-7):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    """The uninterrupted reference run: (workdir, TrainResult)."""
    d = tmp_path_factory.mktemp("run_a")
    return d, run(d)


# ----------------------------------------------------------------------------- training


def test_loss_decreases_and_files(tmp_path, run_a):
    res = run(tmp_path, dataclasses.replace(CONFIG, steps=60, checkpoint_every=30))
    assert res.step == 60 and res.losses.shape == (60,) and np.all(np.isfinite(res.losses))
    assert res.losses[-10:].mean() < res.losses[:10].mean()
    # the first 12 updates are those of the 12-step reference run (steps does not change them)
    np.testing.assert_allclose(res.losses[:12], run_a[1].losses, rtol=1e-5)
    meta = json.loads((tmp_path / "train_meta.json").read_text())
    assert meta["model"] == MODEL.config_dict() and meta["data"]["shape"] == [N, 8, 8, 3]
    assert meta["train"]["steps"] == 60
    lines = [json.loads(s) for s in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(60))
    np.testing.assert_allclose([r["loss"] for r in lines], res.losses, rtol=1e-6)   # float32 losses through JSON
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["30", "60"]


def test_resume_equals_uninterrupted(tmp_path, run_a):
    _, a = run_a
    b1 = run(tmp_path, stop_after=4)
    assert b1.step == 4 and b1.losses.shape == (4,)
    assert os.path.isdir(tmp_path / "checkpoints" / "4")
    msgs = []
    b = run(tmp_path, echo=msgs.append)
    assert any("resuming from the checkpoint at step 4" in m for m in msgs)
    assert b.step == 12 and b.losses.shape == (12,)
    np.testing.assert_allclose(b.losses[4:], a.losses[4:], rtol=1e-5)     # resumed: see assert_tree_close
    np.testing.assert_allclose(b.losses[:4], b1.losses, rtol=0)          # read back from losses.jsonl: exact
    assert_tree_close(b.params, a.params)
    assert_tree_close(b.ema_params, a.ema_params)
    # the training time sums over the two calls (train_time.json); a no-op call adds nothing.
    # train_time.json keeps 0.01 s: the sums are off by <= 0.005 s on any machine (margin <= 0.25).
    assert np.isclose(b.total_seconds, b1.seconds + b.seconds, rtol=1e-3, atol=0.02)
    assert json.loads((tmp_path / "train_time.json").read_text())["step"] == 12
    # a finished run returns at once, with the same numbers; the EMA differs from the params
    again = run(tmp_path)
    assert np.isclose(again.total_seconds, b.total_seconds, atol=0.02)
    assert again.step == 12 and np.array_equal(again.losses, b.losses)
    assert_tree_close(again.ema_params, b.ema_params, rtol=0, atol=0)
    assert not np.allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(a.ema_params)[0])
    # load_params gives the final (EMA) params
    assert_tree_close(load_params(tmp_path, MODEL), a.ema_params)
    assert_tree_close(load_params(tmp_path, MODEL, ema=False), a.params)


def test_raising_steps_continues_a_finished_run(tmp_path, run_a):
    d = tmp_path / "w"
    shutil.copytree(run_a[0], d)
    res = run(d, dataclasses.replace(CONFIG, steps=16))
    assert res.step == 16
    np.testing.assert_allclose(res.losses[:12], run_a[1].losses, rtol=0)
    assert sorted(os.listdir(d / "checkpoints")) == ["12", "16"]


def _child(workdir):
    """Run in a subprocess by test_resume_after_sigkill: trains slowly (the echo sleeps)."""
    cfg = dataclasses.replace(CONFIG, log_every=1)
    run(workdir, cfg, echo=lambda *_: time.sleep(0.25))


def test_resume_after_sigkill(tmp_path, run_a):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    code = (f"import runpy; runpy.run_path({os.path.abspath(__file__)!r}, run_name='child')"
            f"['_child']({str(tmp_path)!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=os.path.dirname(os.path.dirname(__file__)))
    ckpt = tmp_path / "checkpoints"
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
                break
            if proc.poll() is not None:
                pytest.fail(f"the child exited ({proc.returncode}) before a checkpoint: "
                            f"{proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.02)
        else:
            pytest.fail("no checkpoint within 120 s")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    msgs = []
    res = run(tmp_path, echo=msgs.append)
    m = [re.search(r"resuming from the checkpoint at step (\d+)", s) for s in msgs]
    saved = [int(x.group(1)) for x in m if x]
    assert saved and saved[0] in (4, 8), msgs
    assert res.step == 12
    lines = [json.loads(s) for s in (tmp_path / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(12))      # the child's lines past its checkpoint are gone
    a = run_a[1]
    np.testing.assert_allclose(res.losses, a.losses, rtol=1e-5)
    assert_tree_close(res.params, a.params)
    assert_tree_close(res.ema_params, a.ema_params)


# ----------------------------------------------------------------------------- load_params errors


def test_load_params_errors(tmp_path, run_a):
    src, a = run_a
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_params(tmp_path / "nope", MODEL)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_params(tmp_path / "empty", MODEL)
    with pytest.raises(ValueError, match=r"different model config.*features: 8 -> 16"):
        load_params(src, ToyModel(features=16))
    with pytest.raises(ValueError, match=r"no checkpoint at step 5.*\[8, 12\]"):
        load_params(src, MODEL, step=5)
    older = load_params(src, MODEL, step=8)
    assert not np.allclose(jax.tree.leaves(older)[0], jax.tree.leaves(a.ema_params)[0])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")   # orbax, after a failed read
@pytest.mark.parametrize("damage", ["delete_metadata", "empty_data", "delete_progress",
                                    "no_table_empty_manifest"])
def test_load_params_corrupted(tmp_path, run_a, damage):
    d = _copy(run_a[0], tmp_path / "w")
    step_dir = d / "checkpoints" / "12"
    if damage == "delete_metadata":       # orbax alone would not notice: caught by the file table
        os.remove(step_dir / "ema_params" / "_METADATA")
    elif damage == "empty_data":
        data = [p for p in (step_dir / "ema_params").rglob("*") if p.is_file() and p.parent.name == "d"]
        max(data, key=lambda p: p.stat().st_size).write_bytes(b"")
    elif damage == "delete_progress":
        os.remove(step_dir / "progress" / "metadata")
    else:                                  # no recorded table: orbax itself fails
        os.remove(d / "checkpoint_files.json")
        (step_dir / "ema_params" / "manifest.ocdbt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"checkpoint step 12 .* is unreadable.*Step 8 is intact: load it "
                                         r"with step=8"):
        load_params(d, MODEL)
    assert_tree_close(load_params(d, MODEL, step=8), load_params(run_a[0], MODEL, step=8), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"step 12 .* is unreadable.*Step 8 is intact: delete .*12"):
        run(d, dataclasses.replace(CONFIG, steps=16))


def test_load_params_no_intact_checkpoint(tmp_path, run_a):
    d = _copy(run_a[0], tmp_path / "w")
    for s in ("8", "12"):
        os.remove(d / "checkpoints" / s / "ema_params" / "_METADATA")
    with pytest.raises(ValueError, match=r"step 12 .* unreadable.*No older intact checkpoint"):
        load_params(d, MODEL)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", 1.5), ("batch_size", 0), ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("warmup_steps", -1), ("weight_decay", -0.1), ("grad_clip", -1.0), ("ema_decay", 1.0),
    ("ema_decay", -0.1), ("cond_dropout", 1.5), ("seed", 0.5), ("checkpoint_every", 0), ("keep", 0),
    ("log_every", 0), ("steps", True),
])
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}"):
        TrainConfig(**{field: value})


def test_config_accepts_grad_clip_off():
    assert TrainConfig(grad_clip=None).grad_clip is None
    assert TrainConfig(grad_clip=0).grad_clip == 0


def test_input_validation(tmp_path):
    assert jax.device_count() == 4
    with pytest.raises(ValueError, match=r"batch_size=6 is not divisible by the number of devices \(4\)"):
        run(tmp_path, dataclasses.replace(CONFIG, batch_size=6))
    bad = [
        (IMAGES[0], COND, "4-D"),
        (IMAGES[:0], COND[:0], "empty"),
        (np.where(np.arange(N)[:, None, None, None] == 3, np.nan, IMAGES), COND, "NaN"),
        ((IMAGES * 100).astype(np.int32), COND, "float"),
        (IMAGES, COND[:-1], r"cond must have shape \[N\]"),
        (IMAGES, COND - 1, ">= 0"),
        (IMAGES, COND.astype(np.float32), "integer"),
    ]
    for images, cond, msg in bad:
        with pytest.raises(ValueError, match=msg):
            train(MODEL, images, cond, CONFIG, str(tmp_path), progress=False, echo=quiet)
    with pytest.raises(ValueError, match="stop_after"):
        run(tmp_path, stop_after=0)
    assert not (tmp_path / "checkpoints").exists()


def test_resume_mismatch(tmp_path, run_a):
    d = _copy(run_a[0], tmp_path / "w")
    with pytest.raises(ValueError, match=r"TrainConfig \(learning_rate: 0.003 -> 0.001\)"):
        run(d, dataclasses.replace(CONFIG, learning_rate=1e-3))
    with pytest.raises(ValueError, match=r"model config \(features: 8 -> 16\)"):
        train(ToyModel(features=16), IMAGES, COND, CONFIG, str(d), progress=False, echo=quiet)
    with pytest.raises(ValueError, match=r"data shape \(\[16, 8, 8, 3\] -> \[8, 8, 8, 3\]\)"):
        train(MODEL, IMAGES[:8], COND[:8], CONFIG, str(d), progress=False, echo=quiet)
    with pytest.raises(ValueError, match=r"beyond the requested stop_after=4"):
        run(d, stop_after=4)


# ----------------------------------------------------------------------------- determinism


def test_determinism(tmp_path, run_a):
    same = run(tmp_path / "same", progress=True)          # also exercises the progress bar
    np.testing.assert_array_equal(same.losses, run_a[1].losses)
    other = run(tmp_path / "other", dataclasses.replace(CONFIG, seed=1))
    assert not np.allclose(other.losses, run_a[1].losses)


def test_batches_cover_each_epoch():
    key = jax.random.key(3)
    steps = jnp.arange(8)
    idx = np.asarray(jax.jit(jax.vmap(lambda s: tr.batch_indices(key, s, 6, 16)))(steps)).reshape(-1)
    for e in range(3):                                                     # 48 rows = 3 epochs
        assert sorted(idx[16 * e:16 * (e + 1)]) == list(range(16))
    big = np.asarray(jax.jit(lambda s: tr.batch_indices(key, s, 40, 16))(5))                # B > N
    assert big.shape == (40,) and big.min() >= 0 and big.max() < 16


# ----------------------------------------------------------------------------- condition dropout


def _embedding_change(res, seed=0):
    init = tr.init_state(MODEL, dataclasses.replace(CONFIG, seed=seed))
    before = np.asarray(init.params["Embed_0"]["embedding"])
    after = np.asarray(res.params["Embed_0"]["embedding"])
    return np.abs(after - before).max(axis=1)          # per row; the last row is the null condition


def test_cond_dropout_one_sees_only_null(tmp_path):
    cfg = dataclasses.replace(CONFIG, steps=3, cond_dropout=1.0)
    change = _embedding_change(run(tmp_path / "drop1", cfg))
    assert np.all(change[:NUM_CLASSES] == 0) and change[NUM_CLASSES] > 0
    # unconditional data (cond=None): likewise only the null row is trained
    res = train(MODEL, IMAGES, None, dataclasses.replace(CONFIG, steps=3), str(tmp_path / "uncond"),
                progress=False, echo=quiet)
    change = _embedding_change(res)
    assert np.all(change[:NUM_CLASSES] == 0) and change[NUM_CLASSES] > 0
    # no dropout: the null row is never used
    cfg = dataclasses.replace(CONFIG, steps=3, cond_dropout=0.0)
    change = _embedding_change(run(tmp_path / "drop0", cfg))
    assert np.all(change[:NUM_CLASSES] > 0) and change[NUM_CLASSES] == 0



def test_losses_file_is_strict_json(tmp_path):
    """A diverged update's NaN / inf loss is written as null (NaN is not JSON)."""
    import json

    from amg_jax import train

    path = tmp_path / "losses.jsonl"
    train._write_losses(str(path), [0.5, float("nan"), float("inf")], mode="w")

    def refuse(name):
        raise ValueError(f"not JSON: {name}")

    rows = [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]
    assert rows == [{"step": 0, "loss": 0.5}, {"step": 1, "loss": None}, {"step": 2, "loss": None}]
