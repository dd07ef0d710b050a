"""Test set-up: 4 simulated CPU devices (must be set before JAX initialises), quiet libraries."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def fast_compiles():
    """XLA's optimisations off for a module (``jax_disable_most_optimizations``): its compilations
    take 2-3x less time; for modules that check plumbing and results, not speed or last-ulp parity.
    Opt in with ``pytestmark = pytest.mark.usefixtures("fast_compiles")``."""
    import jax

    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


@pytest.fixture(scope="session")
def small_mixture():
    """(testbed, partial-memorizer Denoiser) on the demo's small testbed (16x16, 12 captions),
    shared by every module that needs a model which partly generalizes (a few seconds to fit)."""
    from amg_jax.apps.models import build_testbed, get_model

    bed = build_testbed("small")
    return bed, get_model("mixture").denoiser(bed)


@pytest.fixture(scope="session")
def tiny_sd_env(tmp_path_factory):
    """The tiny Stable Diffusion set-up of ``tiny_sd.build_env`` (a random-weight SD, SSCD and a
    bank written by the tests themselves), shared by tests/models/test_sd_amg.py and
    tests/apps/test_sample.py."""
    from tiny_sd import build_env

    return build_env(tmp_path_factory.mktemp("sdg"))
