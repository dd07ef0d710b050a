"""Test set-up: 4 simulated CPU devices (must be set before JAX initialises), quiet libraries."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import socket  # noqa: E402

import pytest  # noqa: E402


def _loopback_only():
    """No test reaches the network beyond 127.0.0.1: an IP socket connecting anywhere else raises
    (the tests' own HTTP servers listen on 127.0.0.1; nothing here may download weights or data)."""
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def allowed(sock, address) -> bool:
        if sock.family not in (socket.AF_INET, socket.AF_INET6):
            return True
        host = str(address[0]) if isinstance(address, tuple) else str(address)
        return host.startswith("127.") or host in ("::1", "localhost")

    def connect(self, address):
        if not allowed(self, address):
            raise ConnectionRefusedError(f"tests may not reach the network beyond 127.0.0.1 (tried {address!r})")
        return real_connect(self, address)

    def connect_ex(self, address):
        if not allowed(self, address):
            raise ConnectionRefusedError(f"tests may not reach the network beyond 127.0.0.1 (tried {address!r})")
        return real_connect_ex(self, address)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex


_loopback_only()


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
    bank written by the tests themselves), shared by tests/test_sd_amg.py and
    tests/apps/test_sample.py."""
    from tiny_sd import build_env

    return build_env(tmp_path_factory.mktemp("sdg"))
