"""The procedural testbed: determinism, shapes, the three memorization knobs, true renders, copy criterion."""
import dataclasses

import numpy as np
import pytest

from amg_jax.data import testbed as tb

CFG = tb.TestbedConfig(seed=3, image_size=16, n_specific=8, n_duplicated=3, duplicate_count=5, n_generic=3,
                       generic_images=10)


@pytest.fixture(scope="module")
def bed():
    return tb.make_testbed(CFG)


@pytest.fixture(scope="module")
def classifier(bed):
    return tb.attribute_classifier(bed, renders_per_combination=6, rng=0, holdout=300)


def test_deterministic_in_the_seed(bed):
    again = tb.make_testbed(CFG)
    np.testing.assert_array_equal(bed.images, again.images)
    np.testing.assert_array_equal(bed.labels, again.labels)
    np.testing.assert_array_equal(bed.source, again.source)
    assert bed.captions == again.captions
    other = tb.make_testbed(dataclasses.replace(CFG, seed=4))
    assert other.captions != bed.captions or not np.array_equal(other.images, bed.images)
    # renders are deterministic in the rng
    a = tb.fresh_renders(bed, 0, 4, rng=7)
    np.testing.assert_array_equal(a, tb.fresh_renders(bed, 0, 4, rng=7))


def test_shapes_dtypes_and_ranges(bed):
    n = CFG.n_specific + CFG.n_duplicated * CFG.duplicate_count + CFG.n_generic * CFG.generic_images
    u = CFG.n_specific + CFG.n_duplicated + CFG.n_generic * CFG.generic_images
    assert bed.images.shape == (n, 16, 16, 3) and bed.images.dtype == np.float32
    assert bed.images.min() >= -1.0 and bed.images.max() <= 1.0
    assert bed.labels.shape == (n,) and bed.labels.dtype == np.int32
    assert bed.source.shape == (n,) and bed.unique_index.shape == (u,)
    assert bed.attributes.shape == (n, 6) and bed.constraints.shape == (bed.num_captions, 6)
    assert all(v.shape[0] == n for v in bed.nuisance.values())
    assert bed.num_captions == CFG.n_specific + CFG.n_duplicated + CFG.n_generic
    assert len(set(bed.captions)) == bed.num_captions
    assert np.all(bed.labels < bed.num_captions) and np.all(bed.labels >= 0)
    # the images are the renders of their attributes and nuisance (the same NumPy render on 5 rows:
    # exact here, 1e-6 allows SIMD remainder loops; a wrong attribute or nuisance is off by O(1))
    np.testing.assert_allclose(tb.render_images(CFG, bed.attributes[:5], {k: v[:5] for k, v in bed.nuisance.items()}),
                               bed.images[:5], atol=1e-6)
    assert bed.images[0].std() > 0.05


def test_duplicated_images(bed):
    by = tb.prompts_by_kind(bed)
    counts = bed.duplicate_counts
    for c in by["duplicated"]:
        us = np.flatnonzero(bed.unique_labels == c)
        assert len(us) == 1
        assert counts[us[0]] == CFG.duplicate_count
        rows = np.flatnonzero(bed.source == us[0])
        assert len(rows) == CFG.duplicate_count and np.all(bed.labels[rows] == c)
        for r in rows:                                          # exact pixel copies
            np.testing.assert_array_equal(bed.images[r], bed.images[rows[0]])
    others = np.isin(bed.unique_labels, by["duplicated"], invert=True)
    assert np.all(counts[others] == 1)
    # distinct unique images are distinct
    flat = bed.unique_images.reshape(len(bed.unique_index), -1)
    assert len(np.unique(flat.round(5), axis=0)) == len(flat)


def test_specific_captions_match_exactly_one_training_image(bed):
    by = tb.prompts_by_kind(bed)
    assert len(by["specific"]) == CFG.n_specific
    for c in np.concatenate([by["specific"], by["duplicated"]]):
        assert np.all(bed.constraints[c] >= 0), "a full caption names every attribute"
        assert bed.caption_kind[c] in ("specific", "duplicated")
        assert np.sum(bed.unique_labels == c) == 1
        # no other unique training image has the caption's attributes
        assert np.sum(tb.consistent(bed.unique_attributes, bed.constraints[c])) == 1
        combos, probs = tb.full_captions(bed, c)
        assert combos.shape == (1, 6) and probs.tolist() == [1.0]
        np.testing.assert_array_equal(combos[0], bed.constraints[c])


def test_generic_captions_are_shared_by_many_images(bed):
    by = tb.prompts_by_kind(bed)
    assert len(by["generic"]) == CFG.n_generic
    sizes = np.asarray(CFG.vocabulary_sizes)
    for c in by["generic"]:
        named = bed.constraints[c] >= 0
        assert 1 <= named.sum() <= 2
        members = bed.unique_labels == c
        assert members.sum() == CFG.generic_images
        assert np.all(tb.consistent(bed.unique_attributes[members], bed.constraints[c]))
        combos, probs = tb.full_captions(bed, c)
        assert len(combos) == np.prod(sizes[~named])
        np.testing.assert_allclose(probs.sum(), 1.0)                 # float64 sum: ~1e-16
        assert np.all(tb.consistent(combos, bed.constraints[c]))
    spec = tb.specificity(bed)
    assert np.all(spec[by["specific"]] == 1.0) and np.all(spec[by["generic"]] < 0.7)
    assert tb.caption_text(CFG, [0, 1, -1, -1, -1, -1]) == f"a {CFG.colours[1]} {CFG.shapes[0]}"


def test_fresh_renders_follow_the_caption(bed, classifier):
    # the classifier is near perfect on colour / position / background at this size
    for name in ("colour", "position", "background"):
        assert classifier.accuracy[name] > 0.95, classifier.accuracy
    rng = np.random.default_rng(0)
    for c in range(bed.num_captions):
        imgs, attrs = tb.fresh_renders(bed, c, 12, rng, return_attributes=True)
        assert imgs.shape == (12, 16, 16, 3) and imgs.dtype == np.float32
        assert np.all(tb.consistent(attrs, bed.constraints[c]))
        pred = classifier.classify(imgs)
        for a in (tb.COLOUR, tb.POSITION, tb.BACKGROUND):
            if bed.constraints[c, a] >= 0:
                assert np.mean(pred[:, a] == bed.constraints[c, a]) >= 0.9
    # unnamed attributes are re-drawn from the prior
    g = tb.prompts_by_kind(bed)["generic"][0]
    _, attrs = tb.fresh_renders(bed, g, 200, rng, return_attributes=True)
    unnamed = np.flatnonzero(bed.constraints[g] < 0)
    assert all(len(np.unique(attrs[:, a])) == CFG.vocabulary_sizes[a] for a in unnamed)
    # two renders of a full caption differ (nuisance), but only a little compared to other captions
    s = tb.prompts_by_kind(bed)["specific"][0]
    x = tb.fresh_renders(bed, s, 2, rng)
    assert np.linalg.norm(x[0] - x[1]) > 0.3
    # the classifier's alignment helper
    ok = classifier.alignment(tb.fresh_renders(bed, s, 8, rng), bed, s)
    assert ok.shape == (8,) and ok.dtype == bool


def test_calibrated_copy_threshold(bed):
    thr = tb.calibrate_copy_threshold(bed, rng=1, n_pairs=2000)
    d = tb.render_pair_distances(bed, None, 2000, rng=2)      # independent pairs
    assert 0.0 < thr < 0.75 * np.median(d)
    assert 0.002 <= np.mean(d < thr) <= 0.03                  # ~1% by design
    # a training image and its own copy are under it; a fresh render of its caption mostly is not
    x = bed.unique_images[:5]
    assert np.all(tb.is_copy(x, bed, thr))
    by = tb.prompts_by_kind(bed)
    fresh = np.concatenate([tb.fresh_renders(bed, c, 20, c) for c in by["specific"]])
    assert np.mean(tb.is_copy(fresh, bed, thr)) < 0.05
    with pytest.raises(ValueError, match="percentile"):
        tb.calibrate_copy_threshold(bed, percentile=0)
    with pytest.raises(ValueError, match="kinds"):
        tb.calibrate_copy_threshold(bed, kinds=("rare",))


@pytest.mark.parametrize("field, value", [
    ("image_size", 4), ("duplicate_count", 1), ("shapes", ("hexagon",)), ("colours", ()),
    ("generic_attributes", (("shape", "colour", "size"),)), ("n_specific", -1), ("colour_noise", -0.1),
    ("generic_images", 1), ("positions", ("top left", "top left")), ("size_jitter", 0.7), ("seed", 1.5),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tb.TestbedConfig(**{field: value})


def test_other_errors(bed):
    with pytest.raises(ValueError, match="caption_id"):
        tb.fresh_renders(bed, bed.num_captions, 2)
    with pytest.raises(ValueError, match="attributes"):
        tb.render(CFG, np.array([[9, 0, 0, 0, 0, 0]]))
    with pytest.raises(ValueError, match="n_specific"):
        tb.TestbedConfig(shapes=("circle",), colours=("red",), sizes=("small",), n_specific=40)
