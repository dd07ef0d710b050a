"""The evaluation network: shapes, classify / alignment, Fréchet features, save / load and its errors."""
import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.data import testbed as tb
from amg_jax.evaluation.evalnet import (CARD, PARAMS, EvalNet, EvalNetConfig, Evaluator, evaluator_for, init_params,
                                    load_evaluator, save_evaluator, train_evalnet)

CFG = tb.TestbedConfig(seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"),
                       backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=6,
                       n_duplicated=2, duplicate_count=6, n_generic=2, generic_images=8)
NET = EvalNetConfig.for_testbed(CFG, channels=16, channel_mult=(1, 2), feature_dim=16, num_groups=4)


@pytest.fixture(scope="module")
def evaluator():
    return train_evalnet(CFG, steps=700, batch_size=32, learning_rate=5e-3, net=NET, holdout=256, seed=0)


@pytest.fixture(scope="module")
def bed():
    return tb.make_testbed(CFG)


@pytest.fixture(scope="module")
def saved(evaluator, tmp_path_factory):
    return save_evaluator(str(tmp_path_factory.mktemp("evalnet") / "ev"), evaluator)


def renders(n, seed, constraint=None):
    r = np.random.default_rng(seed)
    a = tb.sample_attributes(CFG, np.full(6, -1) if constraint is None else constraint, n, r)
    return tb.render(CFG, a, r), a


def test_network_shapes(evaluator):
    x = jnp.zeros((3, 16, 16, 3))
    feats, logits = EvalNet(NET).apply(evaluator.params, x)
    chex.assert_shape(feats, (3, NET.feature_dim))
    assert len(logits) == len(tb.ATTRIBUTES)
    chex.assert_shape(list(logits), [(3, v) for v in CFG.vocabulary_sizes])
    chex.assert_tree_all_finite((feats, logits))


def test_config_errors():
    with pytest.raises(ValueError, match="num_groups"):
        EvalNetConfig(channels=12, num_groups=8)
    with pytest.raises(ValueError, match="vocabulary_sizes"):
        EvalNetConfig(vocabulary_sizes=(2, 2))
    with pytest.raises(ValueError, match="channels"):
        EvalNetConfig(channels=0)
    with pytest.raises(ValueError, match="net: EvalNetConfig image_size"):
        train_evalnet(CFG, steps=1, net=EvalNetConfig())
    with pytest.raises(ValueError, match="steps"):
        train_evalnet(CFG, steps=0, net=NET)


def test_accuracy_measured(evaluator):
    assert set(evaluator.accuracy) == set(tb.ATTRIBUTES) | {"all"}
    assert all(0.0 <= v <= 1.0 for v in evaluator.accuracy.values())
    # colour and background are easy even for a tiny net after a few steps
    assert evaluator.accuracy["colour"] > 0.9 and evaluator.accuracy["background"] > 0.9


def test_classify_and_alignment(evaluator, bed):
    x, a = renders(64, 3)
    pred = evaluator.classify(x)
    chex.assert_shape(pred, (64, 6))
    assert pred.dtype == np.int32
    assert np.all((pred >= 0) & (pred < np.asarray(CFG.vocabulary_sizes)))
    np.testing.assert_array_equal(evaluator.consistent(x, a), np.all(pred == a, axis=1))

    r = np.random.default_rng(4)
    ids = np.repeat(np.arange(bed.num_captions), 8)
    true = np.concatenate([tb.fresh_renders(bed, c, 8, r) for c in range(bed.num_captions)])
    combos = tb.all_combinations(CFG)
    other = []
    for c in ids:      # a random full combination that does NOT satisfy caption c
        bad = combos[~tb.consistent(combos, bed.constraints[c])]
        other.append(bad[r.integers(len(bad))])
    wrong = tb.render(CFG, np.asarray(other), r)
    al_true, al_wrong = evaluator.alignment(true, bed, ids), evaluator.alignment(wrong, bed, ids)
    chex.assert_shape([al_true, al_wrong], (len(ids),))
    assert al_true.dtype == bool
    assert al_true.mean() > 0.6 and al_true.mean() > al_wrong.mean() + 0.4, (al_true.mean(), al_wrong.mean())
    # an int caption id broadcasts
    chex.assert_shape(evaluator.alignment(true[:5], bed, 0), (5,))


def test_features_chunking_and_shape_errors(evaluator):
    x, _ = renders(37, 5)
    f = evaluator.features(x)
    chex.assert_shape(f, (37, NET.feature_dim))
    assert f.dtype == np.float32
    # chunks of 8 vs one batch of 37: other matmul / conv blocking, ~1e-7 (exact here); rows mixed up are O(1) off
    np.testing.assert_allclose(evaluator.features(x, chunk=8), f, rtol=1e-5, atol=1e-5)
    assert evaluator.features(x[:0]).shape == (0, NET.feature_dim)
    for bad in (np.zeros((2, 32, 32, 3)), np.zeros((16, 16, 3)), np.zeros((2, 16, 16, 1))):
        with pytest.raises(ValueError, match=r"images must have shape \[B, 16, 16, 3\]"):
            evaluator.classify(bad)
        with pytest.raises(ValueError, match="images must have shape"):
            evaluator.features(bad)


def test_frechet_separates_distributions(evaluator):
    a, _ = renders(256, 10)
    b, _ = renders(256, 11)
    noise = np.clip(np.random.default_rng(12).normal(0, 0.5, a.shape), -1, 1).astype(np.float32)
    # another attribute distribution: every image red, top left
    skewed, _ = renders(256, 13, np.array([-1, 0, -1, 0, -1, -1]))
    same = evaluator.frechet(a, b)
    assert same >= 0.0
    assert evaluator.frechet(a, noise) > 5 * same
    assert evaluator.frechet(a, skewed) > 3 * same, (same, evaluator.frechet(a, skewed))


def test_save_load_round_trip(evaluator, saved):
    assert sorted(os.listdir(saved)) == sorted([CARD, PARAMS])
    ev = load_evaluator(saved)
    assert isinstance(ev, Evaluator)
    assert ev.net == evaluator.net and ev.config == evaluator.config
    assert ev.accuracy == evaluator.accuracy and ev.training["steps"] == 700
    chex.assert_trees_all_equal(ev.params, jax.device_get(evaluator.params))
    x, _ = renders(20, 6)
    np.testing.assert_array_equal(ev.features(x), evaluator.features(x))   # equal params, the same program: exact
    assert evaluator_for(CFG, saved).net == NET


def _copy(saved, dst):
    import shutil
    shutil.copytree(saved, dst)
    return str(dst)


def test_load_errors(evaluator, saved, tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluator directory .*nowhere does not exist"):
        load_evaluator(str(tmp_path / "nowhere"))

    d = _copy(saved, tmp_path / "nojson")
    os.remove(os.path.join(d, CARD))
    with pytest.raises(FileNotFoundError, match=f"nojson is not an evaluator: it has no {CARD}"):
        load_evaluator(d)

    d = _copy(saved, tmp_path / "badjson")
    with open(os.path.join(d, CARD), "w") as f:
        f.write('{"format": "amg_jax.evalnet", "vers')
    with pytest.raises(ValueError, match=f"badjson/{CARD} is unreadable"):
        load_evaluator(d)

    d = _copy(saved, tmp_path / "otherjson")
    with open(os.path.join(d, CARD), "w") as f:
        f.write('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not an evaluator file"):
        load_evaluator(d)

    d = _copy(saved, tmp_path / "noparams")
    os.remove(os.path.join(d, PARAMS))
    with pytest.raises(FileNotFoundError, match=f"noparams has no {PARAMS}"):
        load_evaluator(d)

    d = _copy(saved, tmp_path / "truncated")
    p = os.path.join(d, PARAMS)
    data = open(p, "rb").read()
    with open(p, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(ValueError, match=f"truncated/{PARAMS}: the weights are unreadable"):
        load_evaluator(d)

    # another network's params under this config's json
    other = dataclasses.replace(NET, feature_dim=8)
    d = str(tmp_path / "mismatch")
    save_evaluator(d, dataclasses.replace(evaluator, params=init_params(other, jax.random.key(1))))
    with pytest.raises(ValueError, match=r"do not match the EvalNetConfig.*features/kernel"):
        load_evaluator(d)


def test_evaluator_for_mismatch_names_field(saved):
    with pytest.raises(ValueError, match=r"differs in: seed \(evaluator 1, given 2\)"):
        evaluator_for(dataclasses.replace(CFG, seed=2), saved)
    with pytest.raises(ValueError, match="colours.*textures"):
        evaluator_for(dataclasses.replace(CFG, colours=("red", "green"), textures=("plain", "dotted")), saved)
