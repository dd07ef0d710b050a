"""Test set-up: 4 simulated CPU devices (must be set before JAX initialises), quiet libraries."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pytest  # noqa: E402

# A small testbed (16x16, 12 captions) and its partial memorizer, shared by every module
# that needs a model which partly generalizes (fitting takes a few seconds).
SMALL_TESTBED = dict(seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"),
                     backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=6,
                     n_duplicated=2, duplicate_count=6, n_generic=2, generic_images=8)


@pytest.fixture(scope="session")
def small_mixture():
    """(testbed, partial-memorizer Denoiser) on SMALL_TESTBED."""
    from amg_jax.data import testbed as tb
    from amg_jax.models import mixture as mx

    bed = tb.make_testbed(tb.TestbedConfig(**SMALL_TESTBED))
    return bed, mx.fit_mixture(bed, renders_per_component=12, rank=6, rng=0)
