"""A generic diffusion training loop: eps-prediction MSE, optax AdamW, EMA, orbax checkpoints.

``train(model, images, cond, config, workdir)`` trains any ``TrainableModel`` (``init``,
``eps_fn``, ``config_dict``) on ``images [N, H, W, C]`` in [-1, 1] with integer condition ids
``cond [N]`` (or ``None``: unconditional), data parallel over all devices, and resumes from the
latest checkpoint in ``workdir``. ``load_params(workdir, model)`` restores the (EMA) params for
inference. The workdir holds::

    train_meta.json         model config, train config, schedule, data shape (checked on resume / load)
    losses.jsonl            {"step": i, "loss": l} per update i = 0, 1, ... (the loss computed at step i;
                            null where it was NaN / inf)
    checkpoint_files.json   size + sha256 of every file of every finished checkpoint
    checkpoints/<step>/     orbax: params, ema_params, opt_state (StandardSave), progress (JSON:
                            step and every loss so far)

Before a checkpoint is restored (resume or ``load_params``) its files are checked against
``checkpoint_files.json``, so a deleted, truncated or altered file is reported as "checkpoint
step k is unreadable" together with the newest older intact step, even where orbax would
not notice; a step without a recorded table (the last one of a killed run, until it is
resumed) relies on orbax's own read errors.

**Loss**: t ~ Uniform{0..T-1}, noise ~ N(0, I), x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) noise,
``mean((eps_fn(params, x_t, t, c) - noise)^2)``, where ``c`` is the image's condition replaced by
-1 (the null condition of classifier-free guidance) with probability ``cond_dropout``. A model
with ``prediction == "v"`` is trained on ``mean((output_fn(...) - v)^2)``, v = sqrt(ab_t) noise -
sqrt(1 - ab_t) x0 (its ``eps_fn`` converts v to eps with the same schedule).

**Randomness and resume**: the params are initialised from ``fold_in(key(seed), 0)``; update
``s`` draws t, noise and the dropout mask from ``split(fold_in(fold_in(key(seed), 1), s), 3)``; the
batch of update ``s`` is the slice ``[s B, (s + 1) B)`` of the endless sequence of epochs,
epoch ``e`` being the permutation ``fold_in(fold_in(key(seed), 2), e)`` of the N images (every
image is seen once per epoch). All of it is a function of (seed, s), so a run resumed from a
checkpoint at step k repeats an uninterrupted run's updates k, k+1, ... exactly.

**Optimiser**: ``clip_by_global_norm(grad_clip)`` (off when None / 0), then ``optax.adamw``
with weight decay ``weight_decay`` and the learning rate ``learning_rate * min(1, (n+1) /
warmup_steps)`` at update n: a linear warm-up, then constant. The schedule does not depend on
``steps``, so ``steps`` may be raised to continue a finished run.

**EMA**: ``ema <- d ema + (1 - d) params`` after every update, with the usual warm-up
``d = min(ema_decay, (1 + n) / (10 + n))`` at update n (so a short run's EMA is not dominated
by the initialisation); ``ema_decay = 0`` makes the EMA equal the params.

``cond_dropout`` and ``ema_decay`` enter the compiled update as traced scalars; the update and
the initial state are compiled once per (model, optimiser fields, schedule, mesh) per process.

**Devices**: one 1-D mesh (axis "data") over all devices; the images are replicated, each
batch is gathered on device and constrained to ``NamedSharding(mesh, P("data"))``, params and
optimiser state are replicated, and the update is one ``jax.jit`` with the state donated.
``batch_size`` must be divisible by the device count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm
import optax
import orbax.checkpoint as ocp
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from amg_jax.checks import is_int
from amg_jax.failed_reads import quiet_failed_reads
from amg_jax.jsonio import json_safe, read_json, write_json
from amg_jax.schedules import Schedule

Array = jax.Array

META_FILE = "train_meta.json"
LOSSES_FILE = "losses.jsonl"
FILES_FILE = "checkpoint_files.json"
TIME_FILE = "train_time.json"        # {"step", "seconds"}: training time summed over the calls
CHECKPOINT_DIR = "checkpoints"
FORMAT = "amg_jax.train"
FORMAT_VERSION = 1
DATA_AXIS = "data"

# fold_in constants separating the random streams drawn from key(seed).
INIT_STREAM = 0      # model.init
STEP_STREAM = 1      # per-update t, noise, dropout mask: fold_in(., step)
DATA_STREAM = 2      # per-epoch permutations: fold_in(., epoch)

# TrainConfig fields that do not change the numbers of a run: they may differ on resume.
RESUMABLE_FIELDS = ("steps", "checkpoint_every", "keep", "log_every")


# ----------------------------------------------------------------------------- config and types


def _is_real(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters (hashable). Invalid values raise ValueError naming the field.

    steps:            total number of updates.
    batch_size:       global batch (divisible by the device count).
    learning_rate:    AdamW peak learning rate.
    warmup_steps:     linear warm-up length (0 = none), then the rate stays constant.
    weight_decay:     AdamW decoupled weight decay.
    grad_clip:        global-norm gradient clipping threshold; None or 0 = off.
    ema_decay:        EMA decay in [0, 1) (with the (1 + n) / (10 + n) warm-up, see the module doc).
    cond_dropout:     probability in [0, 1] that a training condition is replaced by -1.
    seed:             the run's seed (init, batches, t, noise, dropout).
    checkpoint_every: a checkpoint every this many updates (and always at the end).
    keep:             checkpoints kept on disk (orbax max_to_keep).
    log_every:        loss logged to losses.jsonl / the progress bar every this many updates.
    """

    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1
    seed: int = 0
    checkpoint_every: int = 500
    keep: int = 2
    log_every: int = 50

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "keep", "log_every"):
            v = getattr(self, name)
            if not is_int(v) or v < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {v!r}")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            raise ValueError(f"TrainConfig.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not is_int(self.seed):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not _is_real(self.learning_rate) or not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"TrainConfig.learning_rate must be a finite number > 0, got {self.learning_rate!r}")
        if not _is_real(self.weight_decay) or not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"TrainConfig.weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (not _is_real(self.grad_clip)
                                           or not (math.isfinite(self.grad_clip) and self.grad_clip >= 0)):
            raise ValueError(f"TrainConfig.grad_clip must be a finite number >= 0 or None, got {self.grad_clip!r}")
        if not _is_real(self.ema_decay) or not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not _is_real(self.cond_dropout) or not 0.0 <= self.cond_dropout <= 1.0:
            raise ValueError(f"TrainConfig.cond_dropout must be in [0, 1], got {self.cond_dropout!r}")


@runtime_checkable
class TrainableModel(Protocol):
    """What ``train`` / ``load_params`` need from a model."""

    name: str

    def init(self, rng: Array) -> Any:
        """Fresh params pytree."""
        ...

    def eps_fn(self, params: Any, x_t: Array, t: Array, cond: Array) -> Array:
        """eps [B,H,W,C] for x_t [B,H,W,C], t [B] int32, cond [B] int32 (-1 = unconditional)."""
        ...

    def config_dict(self) -> dict:
        """JSON-able description of the architecture (checked on resume and load)."""
        ...


@struct.dataclass
class TrainState:
    """Everything an update changes: ``step`` (int32 scalar, updates done), params, their EMA,
    the optax state."""

    step: Array
    params: Any
    ema_params: Any
    opt_state: Any


class TrainResult(NamedTuple):
    """params / ema_params (on the default device), step (updates done), losses [step] float32
    (losses[i] = loss of update i, including those of earlier, resumed runs), seconds (this call),
    total_seconds (summed over the calls that trained up to ``step``, from ``train_time.json``)."""

    params: Any
    ema_params: Any
    step: int
    losses: np.ndarray
    seconds: float
    total_seconds: float = float("nan")


# ----------------------------------------------------------------------------- pure pieces


def data_mesh() -> Mesh:
    """The 1-D mesh over all devices, axis "data"."""
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping (unless off) then AdamW with linear warm-up, then a constant rate."""
    lr, warm = float(config.learning_rate), int(config.warmup_steps)
    if warm > 0:
        def learning_rate(count):
            return lr * jnp.minimum(1.0, (count + 1) / warm)
    else:
        learning_rate = lr
    adamw = optax.adamw(learning_rate, weight_decay=float(config.weight_decay))
    if config.grad_clip:
        return optax.chain(optax.clip_by_global_norm(float(config.grad_clip)), adamw)
    return optax.chain(optax.identity(), adamw)


def ema_decay_at(ema_decay: float, step: Array) -> Array:
    """EMA decay used at update ``step``: min(ema_decay, (1 + step) / (10 + step))."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.asarray(ema_decay, jnp.float32), (1.0 + step) / (10.0 + step))


def batch_indices(data_key: Array, step: Array, batch_size: int, num_examples: int) -> Array:
    """Rows [B] int32 of update ``step``: positions ``[step B, (step + 1) B)`` of the endless
    sequence of epochs, epoch ``e`` = ``permutation(fold_in(data_key, e), N)``."""
    b, n = int(batch_size), int(num_examples)
    step = jnp.asarray(step, jnp.int32)
    # step * B = e0 * N + off, without forming step * B (int32 overflow on long runs).
    q, r = step // n, step % n
    e0 = q * b + (r * b) // n
    off = (r * b) % n
    span = b // n + 2                                   # epochs the slice can touch
    perms = jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(data_key, e), n))(
        e0 + jnp.arange(span, dtype=jnp.int32))
    return jax.lax.dynamic_slice(perms.reshape(-1), (off,), (b,)).astype(jnp.int32)


def diffusion_loss(out_fn, params, x0: Array, t: Array, noise: Array, cond: Array,
                   alphas_cumprod: Array, prediction: str = "eps") -> Array:
    """Prediction MSE (scalar) for x0 [B,...], t [B], noise [B,...], cond [B]: ``out_fn``'s output
    against the noise (``prediction="eps"``) or against v = sqrt(ab) noise - sqrt(1-ab) x0 ("v")."""
    ab = jnp.take(alphas_cumprod, t).reshape((-1,) + (1,) * (x0.ndim - 1))
    x_t = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * noise
    out = out_fn(params, x_t, t, cond).astype(jnp.float32)
    if prediction == "eps":
        target = noise
    elif prediction == "v":
        target = jnp.sqrt(ab) * noise - jnp.sqrt(1.0 - ab) * x0
    else:
        raise ValueError(f"diffusion_loss: prediction must be 'eps' or 'v', got {prediction!r}")
    return jnp.mean(jnp.square(out - target))


def train_step(state: TrainState, images: Array, conds: Array, key: Array, cond_dropout: Array,
               ema_decay: Array, *, eps_fn, tx, alphas_cumprod: Array, batch_size: int,
               mesh: Mesh | None = None, prediction: str = "eps") -> tuple[TrainState, Array]:
    """One update: (state, images [N,...], conds [N] int32, key(seed), cond_dropout, ema_decay)
    -> (state, loss). The two rates are traced scalars (changing them does not recompile).
    ``eps_fn`` is the network output the loss compares with its ``prediction`` target."""
    b, n = int(batch_size), images.shape[0]
    s = state.step
    idx = batch_indices(jax.random.fold_in(key, DATA_STREAM), s, b, n)
    k_t, k_noise, k_drop = jax.random.split(jax.random.fold_in(jax.random.fold_in(key, STEP_STREAM), s), 3)
    t = jax.random.randint(k_t, (b,), 0, alphas_cumprod.shape[0], jnp.int32)
    noise = jax.random.normal(k_noise, (b,) + images.shape[1:], jnp.float32)
    drop = jax.random.uniform(k_drop, (b,)) < cond_dropout
    x0 = jnp.take(images, idx, axis=0)
    c = jnp.where(drop, -1, jnp.take(conds, idx)).astype(jnp.int32)
    if mesh is not None:
        shard = NamedSharding(mesh, P(DATA_AXIS))
        x0, t, noise, c = (jax.lax.with_sharding_constraint(a, shard) for a in (x0, t, noise, c))
    loss, grads = jax.value_and_grad(
        lambda p: diffusion_loss(eps_fn, p, x0, t, noise, c, alphas_cumprod, prediction))(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    d = ema_decay_at(ema_decay, s)
    ema = jax.tree.map(lambda e, p: (d * e + (1.0 - d) * p).astype(e.dtype), state.ema_params, params)
    return TrainState(step=s + 1, params=params, ema_params=ema, opt_state=opt_state), loss


def model_output(model) -> tuple[str, Any]:
    """(prediction, output fn) of a trainable model: its ``output_fn`` against its ``prediction``
    ("eps" or "v") target where it has them, else ``eps_fn`` against the noise."""
    prediction = getattr(model, "prediction", "eps")
    return prediction, (getattr(model, "output_fn", model.eps_fn) if prediction != "eps" else model.eps_fn)


_CACHE: dict = {}


def _cached(kind: str, key: tuple, build):
    """``build()`` memoised on (kind, key) when the key is hashable (at most 32 entries), so that
    repeated ``train`` calls reuse their compilations."""
    try:
        k = (kind,) + key
        hash(k)
    except TypeError:
        return build()
    if k not in _CACHE:
        if len(_CACHE) >= 32:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[k] = build()
    return _CACHE[k]


def _optimizer_spec(config: TrainConfig) -> TrainConfig:
    """``config`` with the fields that do not enter the compiled update set to fixed values."""
    return dataclasses.replace(config, steps=1, seed=0, checkpoint_every=1, keep=1, log_every=1,
                               cond_dropout=0.0, ema_decay=0.0)


def _compiled_step(model, config: TrainConfig, schedule: Schedule, mesh: Mesh):
    """The jitted, sharded, donating update for (model, optimiser config, schedule, mesh):
    ``(state, images, conds, key, cond_dropout, ema_decay) -> (state, loss)``."""
    spec = _optimizer_spec(config)

    def build():
        rep = NamedSharding(mesh, P())
        ab = np.asarray(schedule.alphas_cumprod(), np.float32)
        prediction, out_fn = model_output(model)
        tx = make_optimizer(spec)

        def step(state, images, conds, key, cond_dropout, ema_decay):
            return train_step(state, images, conds, key, cond_dropout, ema_decay, eps_fn=out_fn, tx=tx,
                              alphas_cumprod=jnp.asarray(ab), batch_size=spec.batch_size, mesh=mesh,
                              prediction=prediction)

        return jax.jit(step, in_shardings=(rep,) * 6, out_shardings=(rep, rep), donate_argnums=(0,))

    return _cached("step", (model, spec, schedule, mesh), build)


def init_state(model, config: TrainConfig, *, mesh: Mesh | None = None) -> TrainState:
    """The state ``train`` starts from: params ``model.init(fold_in(key(config.seed), 0))``, an
    equal EMA, a fresh optimiser state, step 0; replicated over ``mesh`` (default: all devices).
    One jit, cached per (model, optimiser config, mesh)."""
    mesh = data_mesh() if mesh is None else mesh
    spec = _optimizer_spec(config)

    def build():
        tx = make_optimizer(spec)

        def init(key):
            params = model.init(jax.random.fold_in(key, INIT_STREAM))
            return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                              ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params))

        return jax.jit(init, out_shardings=NamedSharding(mesh, P()))

    return _cached("init", (model, spec, mesh), build)(jax.random.key(config.seed))


# ----------------------------------------------------------------------------- validation


def _check_model(model, where: str) -> dict:
    """Check the model protocol; return its config dict normalised through JSON."""
    for attr in ("init", "eps_fn", "config_dict"):
        if not callable(getattr(model, attr, None)):
            raise ValueError(f"{where}: the model has no callable {attr!r} (see TrainableModel)")
    if not isinstance(getattr(model, "name", None), str):
        raise ValueError(f"{where}: the model needs a string attribute 'name'")
    cfg = model.config_dict()
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: model.config_dict() must return a dict, got {type(cfg).__name__}")
    try:
        return json.loads(json.dumps(cfg, allow_nan=False))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: model.config_dict() is not JSON-serialisable: {err}") from None


def _check_data(images, cond, where: str) -> tuple[np.ndarray, np.ndarray, bool]:
    """-> (images float32 [N,H,W,C], conds int32 [N] (-1 everywhere when unconditional), conditional)."""
    x = np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"{where}: images must be a 4-D array [N, H, W, C], got shape {x.shape}")
    if x.shape[0] < 1:
        raise ValueError(f"{where}: images is empty (N = 0)")
    if min(x.shape[1:]) < 1:
        raise ValueError(f"{where}: images have an empty dimension: shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"{where}: images must be a float array in [-1, 1], got dtype {x.dtype}")
    x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{where}: images contain NaN or inf")
    if np.abs(x).max() > 1.0 + 1e-3:
        warnings.warn(f"{where}: images range over [{x.min():.3g}, {x.max():.3g}], expected [-1, 1]",
                      stacklevel=3)
    n = x.shape[0]
    if cond is None:
        return x, np.full((n,), -1, np.int32), False
    c = np.asarray(cond)
    if c.shape != (n,):
        raise ValueError(f"{where}: cond must have shape [N] = ({n},), got {c.shape}")
    if not np.issubdtype(c.dtype, np.integer):
        raise ValueError(f"{where}: cond must be integer condition ids, got dtype {c.dtype}")
    if np.any(c < 0):
        raise ValueError(f"{where}: cond ids must be >= 0 (-1 is reserved for the null condition), "
                         f"got {int(c.min())}")
    if np.any(c > np.iinfo(np.int32).max):
        raise ValueError(f"{where}: cond ids must fit in int32")
    return x, c.astype(np.int32), True


def _check_eps_shape(model, images: np.ndarray, where: str) -> None:
    """eps_fn must map [B,H,W,C] to [B,H,W,C] (checked abstractly, nothing is computed)."""
    params = jax.eval_shape(model.init, jax.random.key(0))
    b = 2
    x = jax.ShapeDtypeStruct((b,) + images.shape[1:], jnp.float32)
    i = jax.ShapeDtypeStruct((b,), jnp.int32)
    out = jax.eval_shape(model.eps_fn, params, x, i, i)
    if tuple(getattr(out, "shape", ())) != x.shape:
        raise ValueError(f"{where}: model.eps_fn maps x_t {x.shape} to {getattr(out, 'shape', out)}; "
                         f"it must return eps of the same shape")


def _diff(saved, now, prefix: str = "") -> list[str]:
    """Differences between two JSON values, as 'key: saved -> now' strings (nested keys dotted)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now), key=str):
            name = f"{prefix}.{k}" if prefix else str(k)
            if k not in saved:
                out.append(f"{name}: (absent) -> {now[k]!r}")
            elif k not in now:
                out.append(f"{name}: {saved[k]!r} -> (absent)")
            else:
                out.extend(_diff(saved[k], now[k], name))
        return out
    return [] if saved == now else [f"{prefix or 'value'}: {saved!r} -> {now!r}"]


def _data_sha256(images: np.ndarray, conds: np.ndarray) -> str:
    h = hashlib.sha256(np.ascontiguousarray(images).tobytes())
    h.update(np.ascontiguousarray(conds).tobytes())
    return h.hexdigest()


def _meta(model, model_cfg: dict, config: TrainConfig, schedule: Schedule, images: np.ndarray,
          conds: np.ndarray, conditional: bool) -> dict:
    return {
        "format": FORMAT, "version": FORMAT_VERSION, "model_name": model.name, "model": model_cfg,
        "train": dataclasses.asdict(config), "schedule": dataclasses.asdict(schedule),
        "data": {"shape": list(images.shape), "num_examples": int(images.shape[0]),
                 "conditional": bool(conditional), "sha256": _data_sha256(images, conds)},
        "num_devices": jax.device_count(),
    }


# ----------------------------------------------------------------------------- files


def _write_json_atomic(path: str, obj) -> None:
    write_json(path, obj, indent=1)


def _read_meta(workdir: str, where: str) -> dict:
    path = os.path.join(workdir, META_FILE)
    if not os.path.isfile(path):
        raise ValueError(f"{where}: {workdir!r} has checkpoints but no {META_FILE}: it was not written by "
                         f"amg_jax.train, or the file was deleted")
    meta = read_json(path, f"{where}: metadata file")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where}: {path} is not an amg_jax.train metadata file")
    if meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{where}: {path} has format version {meta.get('version')!r}, "
                         f"expected {FORMAT_VERSION}")
    return meta


def _write_losses(path: str, losses: list[float], start: int = 0, mode: str = "a") -> None:
    with open(path, mode) as f:
        for i, v in enumerate(losses[start:], start):
            # a NaN / inf loss (a diverged update) is written as null: NaN is not JSON
            f.write(json.dumps(json_safe({"step": i, "loss": v}), allow_nan=False) + "\n")


def _file_table(step_dir: str) -> dict:
    """{relative path: [size, sha256]} of every file under ``step_dir``."""
    out = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            p = os.path.join(root, name)
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
            out[os.path.relpath(p, step_dir)] = [os.path.getsize(p), h.hexdigest()]
    return out


def _read_file_tables(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, FILES_FILE)) as f:
            tables = json.load(f)
        return tables if isinstance(tables, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _record_files(workdir: str, steps: list[int], only: list[int] | None = None) -> None:
    """Record the file table of finished checkpoints that have none (or of ``only``); forget
    deleted ones. Call only when no save is in flight."""
    tables = _read_file_tables(workdir)
    keep = {str(s) for s in steps}
    changed = set(tables) - keep
    tables = {k: v for k, v in tables.items() if k in keep}
    for s in steps if only is None else only:
        step_dir = os.path.join(workdir, CHECKPOINT_DIR, str(s))
        if str(s) not in tables and os.path.isdir(step_dir):
            tables[str(s)] = _file_table(step_dir)
            changed.add(str(s))
    if changed:
        _write_json_atomic(os.path.join(workdir, FILES_FILE), tables)


def _check_files(workdir: str, step: int) -> str | None:
    """What is wrong with checkpoint ``step``'s files compared with the recorded table (None if
    nothing, or when no table was recorded)."""
    table = _read_file_tables(workdir).get(str(step))
    if not table:
        return None
    step_dir = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    for rel, (size, digest) in sorted(table.items()):
        p = os.path.join(step_dir, rel)
        if not os.path.isfile(p):
            return f"file {rel} is missing"
        actual = os.path.getsize(p)
        if actual != size:
            return f"file {rel} has {actual} bytes, {size} were written"
    now = _file_table(step_dir)
    for rel, (size, digest) in sorted(table.items()):
        if now[rel][1] != digest:
            return f"file {rel} has changed since it was written (sha256 mismatch)"
    return None


# ----------------------------------------------------------------------------- checkpoints


class CheckpointUnreadable(ValueError):
    """A checkpoint step exists but cannot be restored."""


def _manager(ckpt_dir: str, keep: int | None, *, create: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create, cleanup_tmp_directories=create)
    return ocp.CheckpointManager(ckpt_dir, options=options)


def _abstract(tree, sharding):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _restore(mngr, workdir: str, step: int, items: dict) -> dict:
    """Restore ``items`` ({name: abstract pytree, or None for the JSON progress}) of ``step``;
    raise CheckpointUnreadable describing the problem."""
    problem = _check_files(workdir, step)
    if problem is None:
        quiet_failed_reads()
        args = {name: (ocp.args.JsonRestore() if target is None else ocp.args.StandardRestore(target))
                for name, target in items.items()}
        try:
            restored = mngr.restore(step, args=ocp.args.Composite(**args))
            out = {name: restored[name] for name in items}
        except Exception as err:   # orbax / tensorstore raise many types for damaged files
            problem = f"{type(err).__name__}: {str(err).splitlines()[0][:300] if str(err) else ''}"
            quiet_failed_reads(collect=True)
        else:
            prog = out.get("progress")
            if prog is not None and (not isinstance(prog, dict) or prog.get("step") != step
                                     or len(prog.get("losses", ())) != step):
                problem = "its progress record does not match the step"
            else:
                return out
    raise CheckpointUnreadable(problem)


def _unreadable_message(mngr, workdir: str, step: int, problem: str, items: dict, hint: str) -> str:
    """'checkpoint step k ... is unreadable' plus the newest older intact step, if any."""
    path = os.path.join(workdir, CHECKPOINT_DIR, str(step))
    msg = f"checkpoint step {step} ({path}) is unreadable (truncated or corrupted?): {problem}"
    for older in sorted((s for s in mngr.all_steps() if s < step), reverse=True):
        try:
            _restore(mngr, workdir, older, items)
        except CheckpointUnreadable:
            continue
        return f"{msg}. Step {older} is intact: {hint.format(step=older, bad=path)}"
    return f"{msg}. No older intact checkpoint."


def _save(mngr, step: int, state: TrainState, losses: list[float]) -> None:
    mngr.save(step, force=True, args=ocp.args.Composite(
        params=ocp.args.StandardSave(state.params),
        ema_params=ocp.args.StandardSave(state.ema_params),
        opt_state=ocp.args.StandardSave(state.opt_state),
        progress=ocp.args.JsonSave({"step": int(step), "losses": [float(v) for v in losses]})))


# ----------------------------------------------------------------------------- train


def _on_device0(tree):
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.device_put(tree, dev)


def train(model, images, cond, config: TrainConfig, workdir: str, *, schedule: Schedule = Schedule(),
          progress: bool = True, stop_after: int | None = None, echo=print) -> TrainResult:
    """Train ``model`` on ``images [N,H,W,C]`` (float, [-1, 1]) with ``cond [N]`` int ids >= 0
    (None: unconditional, every condition is -1) for ``config.steps`` updates, checkpointing
    in ``workdir``; resume from its latest checkpoint when there is one.

    stop_after: return after this many updates in total (a checkpoint is written there).
    Raises ValueError on bad inputs, a batch not divisible by the device count, or a workdir
    written for another model config / data shape / TrainConfig (fields other than
    ``steps``, ``checkpoint_every``, ``keep``, ``log_every``) / schedule, or whose latest
    checkpoint is unreadable; warns when resuming with different data of the same shape;
    FloatingPointError when the loss becomes non-finite (nothing is saved past the last good
    checkpoint). ``echo`` gets one-line messages (resume, summary, and the loss every
    ``log_every`` steps when ``progress`` is False).
    """
    t0 = time.perf_counter()
    where = "train"
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{where}: config must be a TrainConfig, got {type(config).__name__}")
    if not isinstance(schedule, Schedule):
        raise ValueError(f"{where}: schedule must be a Schedule, got {type(schedule).__name__}")
    if getattr(model, "schedule", schedule) != schedule:
        raise ValueError(f"{where}: schedule {schedule} differs from the model's own {model.schedule} "
                         "(its eps_fn converts with that one)")
    if stop_after is not None and (not is_int(stop_after) or stop_after < 1):
        raise ValueError(f"{where}: stop_after must be an integer >= 1 or None, got {stop_after!r}")
    model_cfg = _check_model(model, where)
    x, conds, conditional = _check_data(images, cond, where)
    mesh = data_mesh()
    n_dev = int(mesh.devices.size)
    if config.batch_size % n_dev:
        raise ValueError(f"{where}: TrainConfig.batch_size={config.batch_size} is not divisible by the "
                         f"number of devices ({n_dev})")
    _check_eps_shape(model, x, where)
    target = config.steps if stop_after is None else min(config.steps, int(stop_after))

    workdir = os.path.abspath(os.fspath(workdir))
    os.makedirs(workdir, exist_ok=True)
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    meta = _meta(model, model_cfg, config, schedule, x, conds, conditional)
    rep = NamedSharding(mesh, P())
    base_key = jax.random.key(config.seed)
    tx = make_optimizer(config)

    mngr = _manager(ckpt_dir, config.keep, create=True)
    try:
        steps_on_disk = mngr.all_steps()
        if steps_on_disk:
            _check_resume(workdir, meta, where)
            start = max(steps_on_disk)
            if start > target:
                raise ValueError(
                    f"{where}: {workdir!r} already has a checkpoint at step {start}, beyond the requested "
                    f"{'stop_after' if target < config.steps else 'TrainConfig.steps'}={target}")
            abs_params = jax.eval_shape(model.init, jax.random.fold_in(base_key, INIT_STREAM))
            items = {"params": _abstract(abs_params, rep), "ema_params": _abstract(abs_params, rep),
                     "opt_state": _abstract(jax.eval_shape(tx.init, abs_params), rep), "progress": None}
            try:
                r = _restore(mngr, workdir, start, items)
            except CheckpointUnreadable as err:
                raise ValueError(f"{where}: " + _unreadable_message(
                    mngr, workdir, start, str(err), items,
                    "delete {bad} to resume from step {step}")) from None
            _record_files(workdir, steps_on_disk, only=[start])
            losses = [float(v) for v in r["progress"]["losses"]]
            state = TrainState(step=jax.device_put(jnp.int32(start), rep), params=r["params"],
                               ema_params=r["ema_params"], opt_state=r["opt_state"])
            if start < target:
                echo(f"{model.name}: resuming from the checkpoint at step {start} in {workdir}")
            else:
                echo(f"{model.name}: {workdir} already has the checkpoint at step {start}; nothing to train")
        else:
            start, losses = 0, []
            if os.path.exists(os.path.join(workdir, FILES_FILE)):     # stale, from deleted checkpoints
                os.remove(os.path.join(workdir, FILES_FILE))
            state = init_state(model, config, mesh=mesh)
        _write_json_atomic(os.path.join(workdir, META_FILE), meta)
        losses_path = os.path.join(workdir, LOSSES_FILE)
        _write_losses(losses_path, losses, mode="w")

        if start < target:
            state, losses = _run(model, state, losses, start, target, x, conds, base_key, config, schedule,
                                 mesh, mngr, workdir, progress, echo)
        mngr.wait_until_finished()
        _record_files(workdir, mngr.all_steps())
    finally:
        mngr.wait_until_finished()
        mngr.close()
    seconds = time.perf_counter() - t0
    total = _add_time(workdir, start, target, seconds)
    if start < target:
        echo(f"{model.name}: {target - start} steps in {seconds:.1f} s, loss {losses[-1]:.4g} "
             f"(step {target}/{config.steps})")
    return TrainResult(params=_on_device0(state.params), ema_params=_on_device0(state.ema_params),
                       step=int(target), losses=np.asarray(losses, np.float32), seconds=seconds,
                       total_seconds=total)


def _add_time(workdir: str, start: int, target: int, seconds: float) -> float:
    """Sum this call's seconds into ``train_time.json`` (a fresh run, start 0, restarts it); returns
    the total for ``target`` steps (NaN when earlier calls' time is unknown)."""
    path = os.path.join(workdir, TIME_FILE)
    before = 0.0
    if start > 0:
        try:
            with open(path) as f:
                saved = json.load(f)
            before = float(saved["seconds"]) if int(saved["step"]) == start else float("nan")
        except (OSError, ValueError, KeyError, TypeError):
            before = float("nan")
    total = before + (seconds if target > start else 0.0)
    if target > start and math.isfinite(total):
        _write_json_atomic(path, {"step": int(target), "seconds": round(total, 2)})
    return total


def _check_resume(workdir: str, meta: dict, where: str) -> None:
    """ValueError naming what differs between the saved train_meta.json and this run."""
    saved = _read_meta(workdir, where)
    problems = []
    d = _diff(saved.get("model"), meta["model"])
    if d:
        problems.append("model config (" + "; ".join(d) + ")")
    strip = lambda c: {k: v for k, v in (c or {}).items() if k not in RESUMABLE_FIELDS}   # noqa: E731
    d = _diff(strip(saved.get("train")), strip(meta["train"]))
    if d:
        problems.append("TrainConfig (" + "; ".join(d) + ")")
    d = _diff(saved.get("schedule"), meta["schedule"])
    if d:
        problems.append("schedule (" + "; ".join(d) + ")")
    sd, nd = saved.get("data") or {}, meta["data"]
    if sd.get("shape") != nd["shape"]:
        problems.append(f"data shape ({sd.get('shape')} -> {nd['shape']})")
    if sd.get("conditional") != nd["conditional"]:
        problems.append(f"conditional ({sd.get('conditional')} -> {nd['conditional']})")
    if problems:
        raise ValueError(f"{where}: cannot resume from {workdir!r}: it was written for a different "
                         + ", ".join(problems) + "; use another workdir")
    if sd.get("sha256") != nd["sha256"]:
        warnings.warn(f"{where}: resuming {workdir!r} with different images / conditions of the same shape "
                      f"(data sha256 differs)", stacklevel=3)


def _run(model, state, losses, start, target, x, conds, base_key, config, schedule, mesh, mngr, workdir,
         progress, echo):
    """The update loop from ``start`` to ``target`` (checkpoints, loss log, progress bar)."""
    rep = NamedSharding(mesh, P())
    step_fn = _compiled_step(model, config, schedule, mesh)
    images_dev = jax.device_put(x, rep)
    conds_dev = jax.device_put(conds, rep)
    key = jax.device_put(base_key, rep)
    rates = jax.device_put((np.float32(config.cond_dropout), np.float32(config.ema_decay)), rep)
    losses_path = os.path.join(workdir, LOSSES_FILE)
    pending: list = []
    bar = tqdm(total=target, initial=start, disable=not progress, desc=f"train {model.name}",
               unit="step", dynamic_ncols=True)
    try:
        for step in range(start + 1, target + 1):
            state, loss = step_fn(state, images_dev, conds_dev, key, rates[0], rates[1])
            pending.append(loss)
            bar.update(1)
            log = step % config.log_every == 0
            ckpt = step % config.checkpoint_every == 0 or step == target
            if log or ckpt:
                new = [float(v) for v in np.asarray(jax.device_get(pending), np.float32)]
                pending = []
                first = len(losses)
                losses.extend(new)
                bad = [i for i, v in enumerate(new, first) if not math.isfinite(v)]
                if bad:
                    raise FloatingPointError(
                        f"train: the loss became non-finite ({new[bad[0] - first]}) at step {bad[0]}; the last "
                        f"checkpoint is step {mngr.latest_step()}; lower TrainConfig.learning_rate?")
                _write_losses(losses_path, losses, start=first)
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
                if log and not progress:
                    echo(f"{model.name}: step {step}/{config.steps} loss {losses[-1]:.4f}")
            if ckpt:
                mngr.wait_until_finished()
                _record_files(workdir, mngr.all_steps())
                _save(mngr, step, state, losses)
    finally:
        bar.close()
    return state, losses


# ----------------------------------------------------------------------------- load


def load_params(workdir: str, model, *, ema: bool = True, step: int | None = None):
    """The (EMA, unless ``ema=False``) params of the latest (or ``step``'s) checkpoint in
    ``workdir``, on the default device.

    Raises FileNotFoundError when ``workdir`` or its checkpoints are missing, ValueError when
    the checkpoints were written for another ``model.config_dict()`` (naming the differing
    keys), when ``step`` has no checkpoint (listing those there are), or when the checkpoint is
    unreadable (naming the step and the newest older intact one).
    """
    workdir = os.path.abspath(os.fspath(workdir))
    where = f"load_params({workdir!r})"
    model_cfg = _check_model(model, "load_params")
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"{where}: the training directory does not exist")
    ckpt_dir = os.path.join(workdir, CHECKPOINT_DIR)
    steps = sorted(ocp.utils.checkpoint_steps(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
    if not steps:
        raise FileNotFoundError(f"{where}: no checkpoint in the directory (expected {CHECKPOINT_DIR}/<step>/ "
                                f"written by amg_jax.train)")
    meta = _read_meta(workdir, where)
    d = _diff(meta.get("model"), model_cfg)
    if d:
        raise ValueError(f"{where}: the checkpoints were written for a different model config "
                         f"(checkpoint -> this model): " + "; ".join(d))
    if step is None:
        step = steps[-1]
    elif not is_int(step) or step not in steps:
        raise ValueError(f"{where}: no checkpoint at step {step!r}; the directory has steps {steps}")
    step = int(step)
    name = "ema_params" if ema else "params"
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abs_params = jax.eval_shape(model.init, jax.random.key(0))
    items = {name: _abstract(abs_params, dev)}
    mngr = _manager(ckpt_dir, None, create=False)
    try:
        try:
            return _restore(mngr, workdir, step, items)[name]
        except CheckpointUnreadable as err:
            raise ValueError(f"{where}: " + _unreadable_message(
                mngr, workdir, step, str(err), items, "load it with step={step}")) from None
    finally:
        mngr.close()


__all__ = [
    "TrainConfig", "TrainResult", "TrainState", "TrainableModel", "batch_indices", "data_mesh",
    "diffusion_loss", "ema_decay_at", "init_state", "load_params", "make_optimizer", "train", "train_step",
]
