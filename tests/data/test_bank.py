"""The testbed's reference bank (``data.bank``): its unique training images, labels and copy distance."""
import numpy as np
import pytest

from amg_jax.data import testbed as tb
from amg_jax.data.bank import bank_from_testbed


def test_bank_from_testbed():
    bed = tb.make_testbed(tb.TestbedConfig(
        seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"), backgrounds=("black", "gray"),
        textures=("plain", "striped"), n_specific=6, n_duplicated=2, duplicate_count=6, n_generic=2,
        generic_images=8))
    bank = bank_from_testbed(bed)
    src = np.asarray(bank.source_index)
    np.testing.assert_array_equal(src, np.sort(bed.unique_index))          # first occurrences, in order
    np.testing.assert_array_equal(np.asarray(bank.labels), bed.labels[src])
    np.testing.assert_array_equal(np.asarray(bank.rows), bed.images[src].reshape(len(src), -1))
    assert bank.sample_shape == bed.image_shape and bank.kind == "pixel"
    assert bank.copy_threshold == pytest.approx(tb.calibrate_copy_threshold(bed, rng=0))   # the same call
    assert bank_from_testbed(bed, calibrate=False).copy_threshold is None
