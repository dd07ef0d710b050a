"""A learned evaluation network for the testbed: the FID / CLIP-score analogue.

``EvalNet`` is a small CNN trained to name the six attributes of a testbed render (one linear
head per attribute on a ``feature_dim`` feature layer). A trained one, wrapped in an
``Evaluator``, plays two roles:

- **alignment** (the CLIP-score analogue): ``classify`` / ``consistent`` / ``alignment`` mirror
  ``tb.AttributeClassifier`` and can replace it; ``accuracy`` is its score on held-out fresh
  renders (compare alignment scores with it, not with 1);
- **Fréchet distance** (the FID analogue): ``features`` are the feature layer (the pool3 of
  Inception's role) and ``frechet(x, y)`` is ``metrics.frechet_distance`` on them.

The input gets two coordinate channels (x, y in [-1, 1]) before the first conv, so that the
globally average-pooled features can still tell where the shape is (the position attribute).

``train_evalnet`` trains on fresh renders of uniformly random full combinations drawn on the
fly (every batch is new data, so there is no over-fitting to a training set). A trained
evaluator is a directory (``save_evaluator`` / ``load_evaluator``)::

    evalnet.json   format, version, EvalNetConfig, testbed config, accuracy, training settings
    params.npz     the params, flattened ("params/Conv_0/kernel", ...)

``evaluator_for(testbed_config, path)`` loads one and checks it was trained for that testbed.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import time
import zipfile
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from amg_jax.evaluation import metrics
from amg_jax.data import testbed as tb
from amg_jax.jsonio import read_json, write_atomic, write_json

FORMAT = "amg_jax.evalnet"
VERSION = 1
CARD = "evalnet.json"
PARAMS = "params.npz"


# ----------------------------------------------------------------------------- the network


@dataclasses.dataclass(frozen=True)
class EvalNetConfig:
    """Architecture of the evaluation network (hashable, JSON-able via ``dataclasses.asdict``).

    image_size:       x is [B, image_size, image_size, 3].
    vocabulary_sizes: values per attribute (order ``tb.ATTRIBUTES``), one head each.
    channels:         width of the full-resolution stem; channel_mult: width multiplier of each
                      stride-2 level (each halves the resolution).
    feature_dim:      size of the feature layer (the Fréchet-distance features).
    num_groups:       GroupNorm groups (must divide every width).
    """

    image_size: int = 32
    vocabulary_sizes: tuple = (4, 5, 2, 4, 3, 3)
    channels: int = 16
    channel_mult: tuple = (1, 2, 2)
    feature_dim: int = 64
    num_groups: int = 8

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"EvalNetConfig.{field} {msg}")

        def is_int(v):
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for field, lo in (("image_size", 8), ("channels", 1), ("feature_dim", 1), ("num_groups", 1)):
            v = getattr(self, field)
            if not is_int(v) or v < lo:
                fail(field, f"must be an integer >= {lo}, got {v!r}")
        for field in ("vocabulary_sizes", "channel_mult"):
            v = getattr(self, field)
            if isinstance(v, str) or not isinstance(v, (tuple, list)) or not all(is_int(s) and s >= 1 for s in v):
                fail(field, f"must be a tuple of integers >= 1, got {v!r}")
            object.__setattr__(self, field, tuple(int(s) for s in v))
        if len(self.vocabulary_sizes) != len(tb.ATTRIBUTES):
            fail("vocabulary_sizes", f"must have one size per attribute {tb.ATTRIBUTES}, got {self.vocabulary_sizes}")
        if not self.channel_mult:
            fail("channel_mult", "must name at least one level")
        bad = [self.channels * m for m in (1,) + self.channel_mult if (self.channels * m) % self.num_groups]
        if bad:
            fail("num_groups", f"= {self.num_groups} must divide every width, not {bad}")

    @classmethod
    def for_testbed(cls, config: tb.TestbedConfig, **overrides) -> "EvalNetConfig":
        """The config for a testbed's image size and vocabularies (keyword overrides for the rest)."""
        return cls(image_size=config.image_size, vocabulary_sizes=config.vocabulary_sizes, **overrides)


class EvalNet(nn.Module):
    """x [B, H, W, 3] -> (features [B, feature_dim], logits: tuple of 6 [B, V_a])."""

    config: EvalNetConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        b, h, w, _ = x.shape
        gy, gx = jnp.meshgrid(jnp.linspace(-1.0, 1.0, h), jnp.linspace(-1.0, 1.0, w), indexing="ij")
        coords = jnp.broadcast_to(jnp.stack([gx, gy], -1)[None].astype(x.dtype), (b, h, w, 2))
        x = jnp.concatenate([x, coords], axis=-1)

        def block(x, width, stride):
            x = nn.Conv(width, (3, 3), strides=(stride, stride))(x)
            return nn.silu(nn.GroupNorm(num_groups=cfg.num_groups)(x))

        x = block(x, cfg.channels, 1)
        for m in cfg.channel_mult:
            x = block(x, cfg.channels * m, 2)
            x = block(x, cfg.channels * m, 1)
        features = nn.Dense(cfg.feature_dim, name="features")(x.mean(axis=(1, 2)))
        logits = tuple(nn.Dense(v, name=f"head_{a}")(features)
                       for a, v in zip(tb.ATTRIBUTES, cfg.vocabulary_sizes))
        return features, logits


def init_params(net: EvalNetConfig, key):
    """The initial variables {"params": ...} of ``EvalNet(net)``."""
    h = net.image_size
    return EvalNet(net).init(key, jnp.zeros((1, h, h, 3), jnp.float32))


@functools.lru_cache(maxsize=None)
def _forward(net: EvalNetConfig):
    """One jitted (params, x) -> (features [B, D] float32, attributes [B, 6] int32) per config."""
    model = EvalNet(net)

    @jax.jit
    def f(params, x):
        feats, logits = model.apply(params, x)
        return feats.astype(jnp.float32), jnp.stack([jnp.argmax(l, -1) for l in logits], -1).astype(jnp.int32)

    return f


# ----------------------------------------------------------------------------- the evaluator


@dataclasses.dataclass(frozen=True, eq=False)
class Evaluator:
    """A trained ``EvalNet`` (``train_evalnet`` / ``load_evaluator``); a drop-in for
    ``tb.AttributeClassifier`` plus learned Fréchet-distance features.

    net:      the ``EvalNetConfig``; params: its variables {"params": ...}.
    config:   the ``tb.TestbedConfig`` it was trained on (the field name matches AttributeClassifier).
    accuracy: {attribute: accuracy on held-out fresh renders, "all": all six right}.
    training: the training settings and seconds (None when unknown).
    """

    net: EvalNetConfig
    config: tb.TestbedConfig
    params: Any
    accuracy: dict
    training: dict | None = None

    def _check(self, images) -> np.ndarray:
        h = self.net.image_size
        if np.ndim(images) != 4 or tuple(np.shape(images)[1:]) != (h, h, 3):
            raise ValueError(f"images must have shape [B, {h}, {h}, 3], got {np.shape(images)}")
        return np.asarray(images, np.float32)

    def _outputs(self, images, chunk: int) -> tuple[np.ndarray, np.ndarray]:
        """(features [B, D] float32, attributes [B, 6] int32), in chunks padded to one of few sizes
        (``chunk`` or a power of two below it) so the network compiles once per size."""
        x = self._check(images)
        n = x.shape[0]
        chunk = max(1, int(chunk))
        f = _forward(self.net)
        feats = np.empty((n, self.net.feature_dim), np.float32)
        attrs = np.empty((n, 6), np.int32)
        for lo in range(0, n, chunk):
            part = x[lo:lo + chunk]
            m = len(part)
            size = chunk if m == chunk else min(chunk, 1 << (m - 1).bit_length())
            if size > m:
                part = np.concatenate([part, np.zeros((size - m,) + part.shape[1:], np.float32)])
            fb, ab = f(self.params, jnp.asarray(part))
            feats[lo:lo + m], attrs[lo:lo + m] = np.asarray(fb)[:m], np.asarray(ab)[:m]
        return feats, attrs

    def features(self, images, *, chunk: int = 256) -> np.ndarray:
        """[B, feature_dim] float32 the feature layer of each image."""
        return self._outputs(images, chunk)[0]

    def classify(self, images, *, chunk: int = 256) -> np.ndarray:
        """[B, 6] int32 the predicted attribute values (argmax of each head)."""
        return self._outputs(images, chunk)[1]

    def consistent(self, images, constraints) -> np.ndarray:
        """bool [B]: is the predicted combination of each image consistent with ``constraints``
        ([6] for all, or [B, 6] per image; -1 = unnamed)?"""
        return tb.consistent(self.classify(images), np.asarray(constraints))

    def alignment(self, images, testbed: tb.Testbed, caption_ids) -> np.ndarray:
        """bool [B]: image b is consistent with caption ``caption_ids[b]`` (an int broadcasts)."""
        ids = np.broadcast_to(np.asarray(caption_ids, np.int64), (np.shape(images)[0],))
        return self.consistent(images, testbed.constraints[ids])

    def frechet(self, x, y) -> float:
        """Fréchet distance between two image sets on this network's features (the FID analogue)."""
        return metrics.frechet_distance(self.features(x), self.features(y))


def _measure_accuracy(ev: Evaluator, n: int, rng: np.random.Generator) -> dict:
    cfg = ev.config
    a = rng.integers(np.asarray(cfg.vocabulary_sizes), size=(int(n), 6)).astype(np.int32)
    p = ev.classify(tb.render(cfg, a, rng))
    acc = {name: float(np.mean(p[:, i] == a[:, i])) for i, name in enumerate(tb.ATTRIBUTES)}
    acc["all"] = float(np.mean(np.all(p == a, axis=1)))
    return acc


# ----------------------------------------------------------------------------- training


def train_evalnet(config: tb.TestbedConfig, *, steps: int = 1500, batch_size: int = 64,
                  learning_rate: float = 3e-3, weight_decay: float = 1e-4, net: EvalNetConfig | None = None,
                  holdout: int = 1000, seed: int = 0, echo=None) -> Evaluator:
    """Train an ``EvalNet`` on ``config``'s renders and measure its held-out accuracy.

    Every batch is ``batch_size`` fresh renders of uniformly random full combinations (numpy,
    seeded by ``seed``); loss = the sum of the six cross-entropies; AdamW with a warm-up and
    cosine decay of ``learning_rate``. ``net`` defaults to ``EvalNetConfig.for_testbed(config)``.
    ``holdout`` fresh renders (another stream) measure ``accuracy``. ``echo`` (e.g. ``print``)
    gets the loss ten times and a summary.
    """
    if isinstance(config, tb.Testbed):
        config = config.config
    if not isinstance(config, tb.TestbedConfig):
        raise ValueError(f"config must be a TestbedConfig, got {type(config).__name__}")
    for field, v in (("steps", steps), ("batch_size", batch_size), ("holdout", holdout)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < (0 if field == "holdout" else 1):
            raise ValueError(f"{field} must be an integer >= {0 if field == 'holdout' else 1}, got {v!r}")
    for field, v in (("learning_rate", learning_rate), ("weight_decay", weight_decay)):
        if not np.isfinite(v) or v < 0 or (field == "learning_rate" and v == 0):
            raise ValueError(f"{field} must be a finite number {'> 0' if field == 'learning_rate' else '>= 0'}, "
                             f"got {v!r}")
    net = net if net is not None else EvalNetConfig.for_testbed(config)
    if net.image_size != config.image_size or net.vocabulary_sizes != config.vocabulary_sizes:
        raise ValueError(f"net: EvalNetConfig image_size {net.image_size} / vocabulary_sizes {net.vocabulary_sizes} "
                         f"do not match the testbed's {config.image_size} / {config.vocabulary_sizes}")
    model = EvalNet(net)
    warmup = min(100, max(1, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1),
                                                  end_value=learning_rate * 0.02)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
    params = init_params(net, jax.random.key(seed))
    opt_state = opt.init(params)

    def loss_fn(p, x, y):
        _, logits = model.apply(p, x)
        return sum(optax.softmax_cross_entropy_with_integer_labels(l, y[:, i]).mean() for i, l in enumerate(logits))

    @jax.jit
    def step(p, s, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        upd, s = opt.update(g, s, p)
        return optax.apply_updates(p, upd), s, loss

    r = np.random.default_rng([seed, 0])
    sizes = np.asarray(config.vocabulary_sizes)
    t0 = time.perf_counter()
    loss = None
    for i in range(1, steps + 1):
        a = r.integers(sizes, size=(batch_size, 6)).astype(np.int32)
        x = tb.render(config, a, r)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(x), jnp.asarray(a))
        if echo is not None and (i % max(1, steps // 10) == 0 or i == steps):
            echo(f"evalnet: step {i}/{steps} loss {float(loss):.4f}")
    loss = float(loss)
    seconds = time.perf_counter() - t0
    training = {"steps": int(steps), "batch_size": int(batch_size), "learning_rate": float(learning_rate),
                "weight_decay": float(weight_decay), "seed": int(seed), "holdout": int(holdout),
                "final_loss": loss, "seconds": round(seconds, 2)}
    ev = Evaluator(net=net, config=config, params=jax.device_get(params), accuracy={}, training=training)
    if holdout:
        ev.accuracy.update(_measure_accuracy(ev, holdout, np.random.default_rng([seed, 1])))
    if echo is not None:
        echo(f"evalnet: {steps} steps in {seconds:.1f} s, loss {loss:.4g}, held-out accuracy "
             + ", ".join(f"{k} {v:.3f}" for k, v in ev.accuracy.items()))
    return ev


# ----------------------------------------------------------------------------- files


def _tuples(v):
    """JSON lists back to the tuples the frozen configs hold."""
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def save_evaluator(path: str, evaluator: Evaluator) -> str:
    """Write ``evaluator`` to the directory ``path`` (``evalnet.json`` + ``params.npz``); replaces
    an existing one (written beside it first, so a failed save leaves the old one)."""
    path = os.path.abspath(os.fspath(path))
    tmp = path + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    flat = traverse_util.flatten_dict(jax.device_get(evaluator.params), sep="/")
    arrays = {k: np.asarray(v) for k, v in flat.items()}
    write_atomic(os.path.join(tmp, PARAMS), lambda f: np.savez(f, **arrays), binary=True)
    write_json(os.path.join(tmp, CARD), {
        "format": FORMAT, "version": VERSION,
        "net": dataclasses.asdict(evaluator.net), "testbed": dataclasses.asdict(evaluator.config),
        "accuracy": dict(evaluator.accuracy), "training": evaluator.training,
    })
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return path


def load_evaluator(path: str) -> Evaluator:
    """The evaluator saved in the directory ``path``.

    Raises FileNotFoundError for a missing directory, ``evalnet.json`` or ``params.npz``, and
    ValueError (naming the file) for an unreadable / malformed json, truncated or damaged params,
    or params whose names or shapes do not match the json's EvalNetConfig.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"evaluator directory {path} does not exist")
    card_path = os.path.join(path, CARD)
    if not os.path.exists(card_path):
        raise FileNotFoundError(f"{path} is not an evaluator: it has no {CARD}")
    card = read_json(card_path, "evaluator file")
    if not isinstance(card, dict) or card.get("format") != FORMAT:
        got = card.get("format") if isinstance(card, dict) else type(card).__name__
        raise ValueError(f"{card_path} is not an evaluator file (format {got!r}, expected {FORMAT!r})")
    if card.get("version") != VERSION:
        raise ValueError(f"{card_path} has version {card.get('version')!r}; this code reads version {VERSION}")
    for key in ("net", "testbed", "accuracy"):
        if key not in card:
            raise ValueError(f"{card_path} has no {key!r}")
    try:
        net = EvalNetConfig(**{k: _tuples(v) for k, v in card["net"].items()})
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{card_path}: bad net config: {e}") from None
    try:
        config = tb.TestbedConfig(**{k: _tuples(v) for k, v in card["testbed"].items()})
    except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{card_path}: bad testbed config: {e}") from None

    params_path = os.path.join(path, PARAMS)
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{path} has no {PARAMS} (the network's weights)")
    try:
        with np.load(params_path, allow_pickle=False) as z:
            flat = {k: np.asarray(z[k]) for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        raise ValueError(f"{params_path}: the weights are unreadable (truncated or damaged?): "
                         f"{type(e).__name__}: {msg}") from None
    want = {k: tuple(v.shape) for k, v in
            traverse_util.flatten_dict(jax.eval_shape(functools.partial(init_params, net), jax.random.key(0)),
                                        sep="/").items()}
    got = {k: tuple(v.shape) for k, v in flat.items()}
    if want != got:
        bad = ([f"{k} missing" for k in sorted(set(want) - set(got))]
               + [f"{k} unexpected" for k in sorted(set(got) - set(want))]
               + [f"{k}: {got[k]} (config wants {want[k]})" for k in sorted(set(want) & set(got)) if want[k] != got[k]])
        raise ValueError(f"{params_path}: the weights do not match the EvalNetConfig in {CARD} "
                         f"(another network's weights?): " + "; ".join(bad[:3]) + (" ..." if len(bad) > 3 else ""))
    params = traverse_util.unflatten_dict({k: v.astype(np.float32) for k, v in flat.items()}, sep="/")
    return Evaluator(net=net, config=config, params=params, accuracy=dict(card["accuracy"]),
                     training=card.get("training"))


_TRAINED: dict = {}


def evaluator_for(testbed_config, path: str | None = None) -> Evaluator:
    """The evaluator for ``testbed_config`` (a TestbedConfig or Testbed): loaded from ``path``, or,
    when ``path`` is None, trained with ``train_evalnet``'s defaults (once per process and config).

    Raises ValueError when the loaded evaluator was trained on another testbed config, listing
    the differing fields.
    """
    cfg = testbed_config.config if isinstance(testbed_config, tb.Testbed) else testbed_config
    if not isinstance(cfg, tb.TestbedConfig):
        raise ValueError(f"testbed_config must be a TestbedConfig or Testbed, got {type(cfg).__name__}")
    if path is None:
        if cfg not in _TRAINED:
            _TRAINED[cfg] = train_evalnet(cfg)
        return _TRAINED[cfg]
    ev = load_evaluator(path)
    if ev.config != cfg:
        diff = [f"{f.name} (evaluator {getattr(ev.config, f.name)!r}, given {getattr(cfg, f.name)!r})"
                for f in dataclasses.fields(tb.TestbedConfig) if getattr(ev.config, f.name) != getattr(cfg, f.name)]
        raise ValueError(f"the evaluator in {os.path.abspath(path)} was trained on another testbed config; "
                         f"it differs in: " + ", ".join(diff))
    return ev


__all__ = ["CARD", "EvalNet", "EvalNetConfig", "Evaluator", "PARAMS", "evaluator_for", "init_params",
           "load_evaluator", "save_evaluator", "train_evalnet"]
