"""The comparison protocol: prompts, conditions, references and metrics for text, class and unconditional models."""
import numpy as np
import pytest

from amg_jax.apps.models import build_testbed
from amg_jax.data import testbed as tb
from amg_jax.evaluation import protocol


@pytest.fixture(scope="module")
def bed():
    return build_testbed("small")


@pytest.mark.parametrize("conditioning", ["text", "class", "uncond"])
def test_bench_shapes_per_conditioning(bed, conditioning):
    b = protocol.prepare_bench(bed, 1, 3, 0, conditioning=conditioning)
    n = len(b.caption_ids)
    assert b.constraints.shape == (n, 6) and b.kinds.shape == (n,) and len(b.keys) == n
    assert b.reference.shape == (4 * n, 16, 16, 3) and b.truth.shape == (n, 16, 16, 3)
    assert len(b.examples) == len(b.prompt_ids) == n // 3
    if conditioning == "text":
        assert set(b.kinds) == {"specific", "duplicated", "generic"}
        np.testing.assert_array_equal(np.asarray(b.cond), b.caption_ids)
        np.testing.assert_array_equal(b.constraints, bed.constraints[b.caption_ids])
    elif conditioning == "class":
        shapes = bed.config.vocabulary("shape")
        assert list(b.prompts) == list(shapes) and n == 3 * len(shapes)
        a = tb.ATTRIBUTES.index("shape")
        np.testing.assert_array_equal(b.constraints[:, a], np.asarray(b.cond))
        assert (np.delete(b.constraints, a, axis=1) == -1).all()
        # the references of a class show that class
        ref_kinds = np.repeat(b.kinds, 4)
        pred = b.classifier.classify(b.reference)[:, a]
        for c, name in enumerate(shapes):
            assert np.mean(pred[ref_kinds == name] == c) > 0.6
    else:
        assert (np.asarray(b.cond) == -1).all() and set(b.kinds) == {"uncond"} and n == 3 * 3
        assert (b.constraints == -1).all()
    m = b.measure(b.truth)
    assert "all" in m and np.isfinite(m["all"]["fd"])
    assert np.isnan(m["all"]["alignment"]) == (conditioning == "uncond")


def test_bench_alignment_tells_right_from_wrong_class(bed):
    b = protocol.prepare_bench(bed, 1, 8, 0, conditioning="class")
    right = b.measure(b.truth)["all"]["alignment"]
    wrong = protocol.measure(b.truth, b.constraints[::-1].copy(), b.kinds, bed, b.threshold, b.classifier,
                             b.reference)["all"]["alignment"]
    assert right > 0.8 and wrong < 0.5


def test_bad_conditioning_is_named(bed):
    with pytest.raises(ValueError, match="conditioning must be"):
        protocol.prepare_bench(bed, 1, 2, 0, conditioning="pixels")
