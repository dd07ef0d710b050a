"""Sampling over 4 (simulated CPU) devices gives the images of one device (``samplers.sample``):
jit over a mesh (padded batches, a sharded reference bank, a 1-device mesh) and the pmap path
in plain and diffusers' replicated / sharded layouts; bad inputs fail before compilation.

Every compiled program is shared through module-scoped fixtures (a handful of compilations)."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.jax_utils import replicate
from flax.training.common_utils import shard
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from amg_jax import index, sharding
from amg_jax.data import testbed as tb
from amg_jax.data.bank import bank_from_testbed
from amg_jax.guidance import CFG, make_guidance
from amg_jax.guidance.amg import make_amg
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.samplers import SamplerConfig, initial_noise, keys_from_seeds, sample
from amg_jax.similarity.pixel import pixel_detector

TINY = tb.TestbedConfig(seed=1, image_size=8, shapes=("circle", "cross"), colours=("red", "blue"),
                        backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=3,
                        n_duplicated=1, duplicate_count=3, n_generic=1, generic_images=3)
DDIM = SamplerConfig("ddim", 4)
# Batch 8 on one device vs 2 per device: XLA blocks the empirical denoiser's matmul against the
# training images differently (~1e-7 relative), and its softmax over logits of |x - z|^2 / 2(1 - ab)
# (up to ~1e3-1e4) turns that into ~1e-6 relative in x0 (measured 2e-6, margin 0.16 at the old 1e-5;
# the testbed's partial memorizer saw 10x more on another CPU). 1e-4 leaves ~60x; a wrong row,
# key or padding is off by O(1), and every AMG gate is >= 0.05 from its threshold.
TOL = dict(atol=1e-4, rtol=1e-4)
# AMG with the pixel-cosine detector: smooth in x0_hat, so the comparison is well conditioned
# (nL2's gradient at an exact copy of a training image, where the empirical denoiser's samples
# end, is the direction of a float-rounding-sized vector and differs with any change of layout).
AMG_DET = dict(kind="cosine")
AMG_KW = dict(lambda_min=0.8, lambda_max=0.95, gradient="cheap")


def assert_same(a, b, **tol):
    """x0, trace and first-pass trace equal (NaN == NaN, as in a probe pass' first step)."""
    chex.assert_trees_all_close(a, b, **(tol or TOL))


@pytest.fixture(scope="module")
def tiny():
    bed = tb.make_testbed(TINY)
    den = empirical_denoiser(bed.images, bed.labels, num_conditions=bed.num_captions)
    bank = bank_from_testbed(bed)
    cond = lambda b: jnp.asarray(np.arange(b) % bed.num_captions, jnp.int32)   # noqa: E731
    return den, bank, cond


@pytest.fixture(scope="module")
def mesh4():
    assert jax.device_count() == 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    return sharding.make_mesh()


@pytest.fixture(scope="module")
def two_pass(tiny):
    """OG+DTP (a two-pass guidance: probe pass, then the real one) on one device, batch 8."""
    den, _, cond = tiny
    g = make_guidance("og_dtp", scale=3.0)
    ref = sample(den, g, DDIM, keys_from_seeds(range(8)), cond(8))
    assert ref.first_pass_trace is not None
    return g, ref


@pytest.fixture(scope="module")
def amg(tiny):
    den, bank, cond = tiny
    g = make_amg(CFG(scale=3.0), pixel_detector(bank, **AMG_DET), **AMG_KW)
    ref6 = sample(den, g, DDIM, keys_from_seeds(range(6)), cond(6))
    gate = np.asarray(ref6.trace["gate"])
    assert gate.any() and not gate.all(), "the gate should open on some steps only"
    return g, ref6


# ----------------------------------------------------------------------------- jit over a mesh


def test_four_devices_equal_one_device_and_outputs_are_batch_sharded(tiny, mesh4, two_pass):
    den, _, cond = tiny
    g, ref = two_pass
    res = sharding.sample_sharded(den, g, DDIM, keys_from_seeds(range(8)), cond(8), mesh=mesh4)
    assert_same(res, ref)
    want = NamedSharding(mesh4, P("batch"))
    for leaf in jax.tree.leaves(res):                  # x0, trace and first-pass trace
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), leaf.sharding
    # a padded batch (6 -> 8) reuses the same compiled program: one compilation per shapes
    fn = sharding.sharded_sample_fn(mesh4)
    compiled = fn._cache_size()
    res6 = sharding.sample_sharded(den, g, DDIM, keys_from_seeds(range(6)), cond(6), mesh=mesh4)
    assert fn._cache_size() == compiled
    chex.assert_shape(res6.x0, (6,) + den.sample_shape)
    assert_same(res6, jax.tree.map(lambda a: a[:6], ref))


def test_padded_amg_with_sharded_bank_equals_one_device(tiny, mesh4, amg):
    """AMG whose bank is sharded along its rows (axis "bank") inside the batch-sharded program,
    batch 6 on 4 devices (padded with copies of the last row), equals batch 6 on one device
    with the unsharded bank: the batch-level gate included."""
    den, bank, cond = tiny
    _, ref6 = amg
    sbank = index.shard_bank(bank)
    assert sbank.sharded and len(sbank.rows.sharding.device_set) == 4
    g = make_amg(CFG(scale=3.0), pixel_detector(sbank, **AMG_DET), **AMG_KW)
    res = sharding.sample_sharded(den, g, DDIM, keys_from_seeds(range(6)), cond(6), mesh=mesh4)
    chex.assert_shape(res.x0, (6,) + den.sample_shape)
    chex.assert_shape(res.trace["gate"], (6, DDIM.num_steps))
    assert_same(res, ref6)
    # on a mesh of other devices the bank is re-sharded over them (here: one device)
    mesh1 = sharding.make_mesh(jax.devices()[:1])
    placed = sharding.place_guidance(g, mesh1).detector.bank
    assert placed.mesh.devices.size == 1 and placed.rows.sharding.device_set == {jax.devices()[0]}
    np.testing.assert_array_equal(np.asarray(placed.rows), np.asarray(bank.rows))   # moved, not computed: exact
    assert sharding.place_guidance(g, mesh4).detector.bank.rows is sbank.rows    # already in place


def test_one_device_mesh_with_x_T(tiny, two_pass):
    den, _, cond = tiny
    g, ref = two_pass
    keys = keys_from_seeds(range(6))
    x_T = initial_noise(keys, den.sample_shape)       # the noise sample() draws from these keys
    mesh1 = sharding.make_mesh(jax.devices()[:1])
    res = sharding.sample_sharded(den, g, DDIM, keys, cond(6), x_T=x_T, mesh=mesh1)
    assert res.x0.sharding.device_set == {jax.devices()[0]}
    assert_same(res, jax.tree.map(lambda a: a[:6], ref))


# ----------------------------------------------------------------------------- pmap


def test_pmap_plain_and_replicated_layouts_equal_sample(tiny, two_pass):
    den, _, cond = tiny
    g, ref = two_pass
    # plain inputs, batch 6: padded to 8, split [4, 2] here
    plain = sharding.sample_pmap(den, g, DDIM, keys_from_seeds(range(6)), cond(6))
    chex.assert_shape(plain.x0, (6,) + den.sample_shape)
    assert_same(plain, jax.tree.map(lambda a: a[:6], ref))
    # diffusers' Flax layout: replicated params, sharded keys / cond (the same compiled program)
    p_den = den.replace(params=replicate(den.params))
    assert sharding.is_replicated(p_den.params) and not sharding.is_replicated(den.params)
    res = sharding.sample_pmap(p_den, g, DDIM, shard(keys_from_seeds(range(8))), shard(cond(8)), sharded=True)
    chex.assert_shape(res.x0, (8,) + den.sample_shape)
    assert_same(res, ref)


# ----------------------------------------------------------------------------- errors


def _never_traced(params, x, t, cond):
    raise AssertionError("the denoiser was traced: validation must come before compilation")


@pytest.fixture(scope="module")
def untraceable(tiny):
    den, _, _ = tiny
    return den.replace(eps_fn=_never_traced)


@pytest.mark.parametrize("case, message", [
    ("keys_empty", r"sample_sharded: keys is empty"),
    ("cond_batch", r"condition batch 3 does not match the sample batch 2"),
    ("x_T_batch", r"x_T batch 3 does not match the number of keys 2"),
    ("mesh_2d", r"mesh must be 1-D"),
    ("replicated_params", r"sample_sharded: the denoiser's params look replicated"),
    ("pmap_keys_empty", r"sample_pmap: keys is empty"),
    ("pmap_cond_batch", r"condition batch 3 does not match the sample batch 2"),
    ("pmap_params_not_replicated", r"params must be replicated over the 4 devices"),
    ("pmap_params_replicated", r"params look replicated.*sharded=True"),
    ("pmap_cond_not_sharded", r"sharded inputs must be \[devices=4"),
])
def test_bad_inputs_fail_before_compilation(untraceable, case, message):
    den, g = untraceable, CFG(scale=3.0)
    k2, c2 = keys_from_seeds([0, 1]), jnp.array([0, 1], jnp.int32)
    c3 = jnp.array([0, 1, 2], jnp.int32)
    k8, c8 = keys_from_seeds(range(8)), jnp.zeros((8,), jnp.int32)
    calls = {
        "keys_empty": lambda: sharding.sample_sharded(den, g, DDIM, jnp.zeros((0, 2), jnp.uint32), c2),
        "cond_batch": lambda: sharding.sample_sharded(den, g, DDIM, k2, c3),
        "x_T_batch": lambda: sharding.sample_sharded(den, g, DDIM, k2, c2, x_T=jnp.zeros((3, 8, 8, 3))),
        "mesh_2d": lambda: sharding.sample_sharded(
            den, g, DDIM, k2, c2, mesh=Mesh(np.asarray(jax.devices()).reshape(2, 2), ("a", "b"))),
        "replicated_params": lambda: sharding.sample_sharded(
            den.replace(params=replicate(den.params)), g, DDIM, k2, c2),
        "pmap_keys_empty": lambda: sharding.sample_pmap(den, g, DDIM, jnp.zeros((0, 2), jnp.uint32), c2),
        "pmap_cond_batch": lambda: sharding.sample_pmap(den, g, DDIM, k2, c3),
        "pmap_params_not_replicated": lambda: sharding.sample_pmap(den, g, DDIM, shard(k8), shard(c8), sharded=True),
        "pmap_params_replicated": lambda: sharding.sample_pmap(
            den.replace(params=replicate(den.params)), g, DDIM, k8, c8),
        "pmap_cond_not_sharded": lambda: sharding.sample_pmap(
            den.replace(params=replicate(den.params)), g, DDIM, shard(k8), c8, sharded=True),
    }
    with pytest.raises(ValueError, match=message):
        calls[case]()


def test_make_mesh_and_pad_batch():
    mesh = sharding.make_mesh()
    assert mesh.axis_names == ("batch",) and mesh.devices.size == jax.device_count()
    assert sharding.make_mesh(axis="data").axis_names == ("data",)
    with pytest.raises(ValueError, match="no devices"):
        sharding.make_mesh([])
    keys = keys_from_seeds([4, 5, 6])
    (pk, pc), b = sharding.pad_batch((keys, {"y": np.arange(3)}), 4)
    assert b == 3 and pk.shape == (4,)
    np.testing.assert_array_equal(pc["y"], [0, 1, 2, 2])
    np.testing.assert_array_equal(jax.random.key_data(pk[3]), jax.random.key_data(keys[2]))
    assert sharding.pad_batch(keys, 3)[0] is keys


def test_distributed_env_and_idempotent_initialize():
    env = sharding.distributed_env
    assert env({}) is None
    assert env({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "1", "JAX_PROCESS_ID": "0"}) is None
    assert env({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == \
        {"coordinator_address": "h0:1234", "num_processes": 2, "process_id": 1}
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        env({"JAX_COORDINATOR_ADDRESS": "h0:1234", "JAX_NUM_PROCESSES": "2"})
    slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
    assert env({**slurm, "SLURM_NTASKS": "1"}) is None
    assert env({**slurm, "SLURM_NTASKS": "2"}) == {}
    assert env({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}) == {}
    assert env({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
    assert env({"TPU_WORKER_HOSTNAMES": "w0,w1"}) == {}
    assert sharding.maybe_initialize_distributed({}) is False
    assert sharding.maybe_initialize_distributed({}) is False      # safe to call twice
