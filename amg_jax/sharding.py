"""Sampling over every device: one ``Mesh``, the batch of seeds sharded along it, params replicated.

Two entry points run the same pure ``samplers.sample_loop`` (so they give the images
``samplers.sample`` gives on one device):

- ``sample_sharded``: ``jax.jit`` with ``in_shardings`` / ``out_shardings`` over a 1-D mesh
  (``make_mesh``: all devices, axis ``"batch"``; on several hosts ``jax.devices()`` is global,
  see ``maybe_initialize_distributed``). keys / cond / x_T are split along the batch axis,
  the denoiser and the guidance are replicated, except a reference bank already sharded
  with ``index.shard_bank``, which stays sharded along its rows (axis ``"bank"`` over the
  same devices) and is searched per shard inside the same program. The jitted function is
  built once per mesh and compiled once per (shapes, configs).
- ``sample_pmap``: ``jax.pmap`` for users of diffusers' Flax pipeline, who hold
  ``flax.jax_utils.replicate``-d params and ``flax.training.common_utils.shard``-ed inputs
  (``sharded=True``); plain inputs (``sharded=False``) are split over the local devices here.

A batch that does not divide the device count is padded (pad, do not fail) by repeating
its last seed / condition / x_T row, and the padding is cut off the result. Samples are
independent of each other, except AMG's batch-level gate (``lax.cond`` on "any sample in
the batch has its gate open"), which only decides whether the expensive terms are
computed: copies of the last row do not change that decision, and under ``sample_sharded``
the "any" is over the whole global batch, as in ``samplers.sample``.
"""
from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax.jax_utils import replicate
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from amg_jax import samplers
from amg_jax.index import ReferenceBank, shard_bank, unshard_bank
from amg_jax.mesh import BATCH_AXIS, make_mesh
from amg_jax.samplers import SampleResult, SamplerConfig, jit_guidance, sample_entry

Array = jax.Array

# ----------------------------------------------------------------------------- devices

# Multi-host launchers this module recognises, and the variables that say "several processes".
DISTRIBUTED_ENV = {
    "explicit": ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"),
    "slurm": ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"),
    "ompi": ("OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE"),
    "tpu": ("TPU_WORKER_HOSTNAMES",),
}


def distributed_env(environ: Mapping[str, str] | None = None) -> dict | None:
    """The keyword arguments for ``jax.distributed.initialize`` that ``environ`` (default
    ``os.environ``) asks for, or None when it describes a single process:

    - ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0) with ``JAX_NUM_PROCESSES`` > 1 and
      ``JAX_PROCESS_ID``: passed explicitly (any cluster, e.g. Kubernetes);
    - SLURM (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_PROCID``, ``SLURM_LOCALID`` and
      ``SLURM_NTASKS`` > 1), Open MPI's ``mpirun`` (``OMPI_MCA_orte_hnp_uri`` with
      ``OMPI_COMM_WORLD_SIZE`` > 1), a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` naming more
      than one host): ``{}``, JAX detects the rest itself.
    """
    env = os.environ if environ is None else environ

    def count(name: str) -> int:
        try:
            return int(env.get(name, "1"))
        except ValueError:
            raise ValueError(f"distributed set-up: {name}={env.get(name)!r} is not an integer") from None

    if env.get("JAX_COORDINATOR_ADDRESS"):
        n = count("JAX_NUM_PROCESSES")
        if n <= 1:
            return None
        if "JAX_PROCESS_ID" not in env:
            raise ValueError("distributed set-up: JAX_COORDINATOR_ADDRESS and JAX_NUM_PROCESSES are set but "
                             "JAX_PROCESS_ID (this process' rank, 0 .. JAX_NUM_PROCESSES - 1) is not")
        pid = count("JAX_PROCESS_ID")
        if not 0 <= pid < n:
            raise ValueError(f"distributed set-up: JAX_PROCESS_ID={pid} is outside 0 .. {n - 1}")
        return {"coordinator_address": env["JAX_COORDINATOR_ADDRESS"], "num_processes": n, "process_id": pid}
    if all(v in env for v in DISTRIBUTED_ENV["slurm"]) and count("SLURM_NTASKS") > 1:
        return {}
    if all(v in env for v in DISTRIBUTED_ENV["ompi"]) and count("OMPI_COMM_WORLD_SIZE") > 1:
        return {}
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return {}
    return None


def maybe_initialize_distributed(environ: Mapping[str, str] | None = None) -> bool:
    """Call ``jax.distributed.initialize`` when ``environ`` describes several processes
    (``distributed_env``); a no-op on one host, and safe to call again (it initializes once).
    Call it first thing, before any JAX computation. Returns whether the distributed runtime
    is up (then ``jax.devices()``, and so ``make_mesh()``, spans every host)."""
    if jax.distributed.is_initialized():
        return True
    kwargs = distributed_env(environ)
    if kwargs is None:
        return False
    jax.distributed.initialize(**kwargs)
    return True


# ----------------------------------------------------------------------------- helpers


def pad_batch(tree: Any, multiple: int) -> tuple[Any, int]:
    """Pad every leaf [B, ...] of ``tree`` to the next multiple of ``multiple`` rows by repeating
    its last row (typed PRNG keys included); returns (padded tree, B). Leaves must share B >= 1."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return tree, 0
    b = int(np.shape(leaves[0])[0])
    pad = (-b) % int(multiple)
    if pad == 0:
        return tree, b
    idx = np.concatenate([np.arange(b), np.full((pad,), b - 1)])
    return jax.tree.map(lambda a: a[idx], tree), b


@functools.partial(jax.jit, static_argnums=(1,))
def _first_rows(tree, batch: int):
    return jax.tree.map(lambda a: a[:batch], tree)


def _cut(res: SampleResult, batch: int) -> SampleResult:
    """The first ``batch`` rows of every output (a no-op when nothing was padded). Jitted: an
    eager slice of a sharded array waits for its data, which would end the caller's async dispatch."""
    if int(res.x0.shape[0]) == batch:
        return res
    return _first_rows(res, batch)


def _validate(denoiser, guidance, sampler_cfg, keys, cond, x_T, where: str):
    """``samplers.sample``'s checks; returns (keys [B] typed, x_T or None)."""
    return samplers.validate_inputs(denoiser, guidance, sampler_cfg, keys, cond, x_T, where)


def _is_bank(x) -> bool:
    return isinstance(x, ReferenceBank)


def _device_ids(mesh: Mesh) -> tuple:
    return tuple(int(d.id) for d in mesh.devices.flat)


# ----------------------------------------------------------------------------- jit over a mesh


@functools.lru_cache(maxsize=32)
def sharded_sample_fn(mesh: Mesh):
    """The jitted sampling program over the 1-D ``mesh`` (built once per mesh, compiled once per
    shapes / configs): ``fn(denoiser, guidance, sampler_cfg, keys, cond, x_T) -> SampleResult``
    with the denoiser replicated, keys / cond / x_T and every output split along the batch
    axis, and the guidance as placed by the caller (``place_guidance``). B must divide by the
    device count (``sample_sharded`` pads)."""
    axis = mesh.axis_names[0]
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P(axis))
    return jax.jit(sample_entry, static_argnums=(2,),
                   in_shardings=(rep, None, bat, bat, bat), out_shardings=bat)


def place_guidance(guidance, mesh: Mesh):
    """The guidance's arrays replicated over ``mesh``; a ``ReferenceBank`` sharded with
    ``index.shard_bank`` stays sharded along its rows (re-sharded over ``mesh``'s devices, in
    their order, when it lives on other devices)."""
    rep = NamedSharding(mesh, P())
    ids = _device_ids(mesh)

    def place(x):
        if _is_bank(x):
            if x.mesh is None:
                return jax.device_put(x, rep)
            if _device_ids(x.mesh) != ids:
                return shard_bank(x, make_mesh(mesh.devices.reshape(-1), x.mesh.axis_names[0]))
            return x
        return jax.device_put(x, rep)

    return jax.tree.map(place, guidance, is_leaf=_is_bank)


def _check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"sample_sharded: mesh must be a jax.sharding.Mesh (see make_mesh), got {type(mesh).__name__}")
    if len(mesh.axis_names) != 1:
        raise ValueError(f"sample_sharded: mesh must be 1-D (one batch axis), got axes {mesh.axis_names}")
    return mesh


def sample_sharded(denoiser, guidance, sampler_cfg: SamplerConfig, keys, cond, *, x_T: Array | None = None,
                   mesh: Mesh | None = None) -> SampleResult:
    """``samplers.sample`` over every device of ``mesh`` (default ``make_mesh()``: all devices).

    keys: [B] PRNG keys (or raw uint32 [B, 2]); cond: pytree [B, ...]; x_T: optional [B, *S].
    Validated like ``samplers.sample`` (ValueError before anything is compiled); B is padded
    to a multiple of the device count by repeating the last row, keys / cond / x_T are split
    along the mesh's axis, the denoiser and guidance replicated (a sharded reference bank
    stays sharded), and one jitted program (``sharded_sample_fn``) runs the whole loop.
    Returns ``SampleResult`` with the padding cut off; when B divides the device count the
    outputs stay split along the batch axis (``NamedSharding(mesh, P(axis))``). Nothing is read
    back to the host: the divergence warning arrives as ``samplers.sample``'s does, when the
    computation completes (``jax.effects_barrier()`` waits for it).

    Several hosts: call ``maybe_initialize_distributed()`` first, and the same function with
    the same global keys / cond on every process; the outputs are global arrays (gather them
    with ``jax.experimental.multihost_utils.process_allgather``).
    """
    keys, x_T = _validate(denoiser, guidance, sampler_cfg, keys, cond, x_T, "sample_sharded")
    mesh = _check_mesh(make_mesh() if mesh is None else mesh)
    if jax.local_device_count() > 1 and is_replicated(denoiser.params):
        raise ValueError("sample_sharded: the denoiser's params look replicated for pmap ([devices, ...], one "
                         "copy per device); pass the plain params (they are replicated over the mesh here), "
                         "or use sample_pmap(..., sharded=True)")
    n = int(mesh.devices.size)
    (keys, cond, x_T), batch = pad_batch((keys, cond, x_T), n)
    bat = NamedSharding(mesh, P(mesh.axis_names[0]))
    keys, cond, x_T = jax.device_put((keys, cond, x_T), bat)
    den = jax.device_put(denoiser, NamedSharding(mesh, P()))
    traced = place_guidance(jit_guidance(guidance), mesh)
    res = _cut(sharded_sample_fn(mesh)(den, traced, sampler_cfg, keys, cond, x_T), batch)
    samplers.report_divergence(guidance, res)   # on the devices; warned when computed
    return res


# ----------------------------------------------------------------------------- pmap


def _pmap_entry(params, rest, guidance, sampler_cfg, keys, cond, x_T):
    """One device's share: the denoiser re-assembled from its params and the rest."""
    return sample_entry(rest.replace(params=params), guidance, sampler_cfg, keys, cond, x_T)


# Arguments: params [n, ...] (replicated), denoiser without params, guidance, sampler_cfg (static),
# keys, cond, x_T [n, b, ...]. One program for plain and already-sharded inputs alike.
_pmap_sample = jax.pmap(_pmap_entry, axis_name=BATCH_AXIS, in_axes=(0, None, None, None, 0, 0, 0),
                        static_broadcasted_argnums=(3,))


def is_replicated(tree, n: int | None = None) -> bool:
    """True when every array leaf of ``tree`` is laid out one copy per device along a leading
    axis of size ``n`` (default: the local device count), as ``flax.jax_utils.replicate`` and
    ``jax.device_put_replicated`` make it: a ``jax.Array`` [n, ...] on n devices, one slice each."""
    n = jax.local_device_count() if n is None else int(n)
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return False
    for a in leaves:
        if not isinstance(a, jax.Array) or a.ndim == 0 or a.shape[0] != n:
            return False
        if len(a.sharding.device_set) != n or a.sharding.shard_shape(a.shape)[0] != 1:
            return False
    return True


def _unshard_banks(guidance):
    """pmap has no mesh: a sharded reference bank is gathered (``index.unshard_bank``)."""
    return jax.tree.map(lambda x: unshard_bank(x) if _is_bank(x) else x, guidance, is_leaf=_is_bank)


def _merge_devices(tree, n: int, where: str):
    """Leaves [n, b, ...] -> [n * b, ...]; ValueError when a leaf has no leading device axis n."""
    def merge(a):
        shape = np.shape(a)
        if len(shape) < 2 or shape[0] != n:
            raise ValueError(f"{where}: sharded inputs must be [devices={n}, B / devices, ...] "
                             f"(flax.training.common_utils.shard), got shape {tuple(shape)}")
        return a.reshape((shape[0] * shape[1],) + tuple(shape[2:]))
    return jax.tree.map(merge, tree)


def _uncommitted(a):
    """``a`` as an array pmap may place itself: an input committed to one device (e.g. the output
    of an earlier jit) would otherwise be refused by pmap's input sharding check."""
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(np.asarray(jax.random.key_data(a)), impl=jax.random.key_impl(a))
    return np.asarray(a)


def sample_pmap(denoiser, guidance, sampler_cfg: SamplerConfig, keys, cond, *, x_T: Array | None = None,
                sharded: bool = False) -> SampleResult:
    """``samplers.sample`` as a ``jax.pmap`` over the local devices (diffusers' Flax layout).

    ``sharded=False``: plain inputs keys [B], cond [B, ...], x_T [B, *S] and a plain denoiser;
    B is padded to a multiple of the local device count n (last row repeated), split here
    into [n, B / n, ...], and the params replicated (``flax.jax_utils.replicate``).
    ``sharded=True``: the layout of diffusers' ``FlaxStableDiffusionPipeline(..., jit=True)``:
    inputs already split, keys [n, b] (raw uint32 [n, b, 2]; e.g. ``shard(keys_from_seeds(seeds))``),
    cond leaves and x_T [n, b, ...] (``flax.training.common_utils.shard``), and the denoiser's
    params replicated, ``denoiser.replace(params=flax.jax_utils.replicate(denoiser.params))``
    (its other fields, ``null_cond`` included, stay plain). The layout is checked (every
    params leaf [n, ...], every input [n, b, ...]), and params that ``is_replicated`` passed
    with ``sharded=False`` are rejected with a pointer to the flag.

    The guidance is broadcast to every device (a bank sharded by ``shard_bank`` is gathered
    first). Returns ``SampleResult`` with leaves [B, ...] (padding cut off), the same images as
    ``samplers.sample``. AMG's batch-level gate is decided per device here: that changes only
    whether the expensive terms are computed, not the samples; the trace's ``grad_norm`` of a
    gate-closed sample can read 0 where ``sample`` reports the norm computed alongside an open one.
    """
    where = "sample_pmap"
    n = jax.local_device_count()
    if sharded:
        nd = int(np.shape(keys)[0]) if np.ndim(keys) else 0
        if not 1 <= nd <= n:
            raise ValueError(f"{where}: sharded keys must be [devices, B / devices] with at most {n} (local) "
                             f"devices, got shape {tuple(np.shape(keys))}")
        params = jax.tree.leaves(denoiser.params)
        if not params or any(np.ndim(a) == 0 or np.shape(a)[0] != nd for a in params):
            raise ValueError(f"{where}: with sharded=True the denoiser's params must be replicated over the {nd} "
                             "devices: denoiser.replace(params=flax.jax_utils.replicate(denoiser.params))")
        keys, cond, x_T = _merge_devices((keys, cond, x_T), nd, where)
        keys, x_T = _validate(denoiser, guidance, sampler_cfg, keys, cond, x_T, where)
        params, batch = denoiser.params, int(keys.shape[0])
    else:
        if n > 1 and is_replicated(denoiser.params, n):
            raise ValueError(f"{where}: the denoiser's params look replicated ([{n}, ...], one copy per device); "
                             "pass sharded=True with sharded inputs, or the plain params")
        keys, x_T = _validate(denoiser, guidance, sampler_cfg, keys, cond, x_T, where)
        (keys, cond, x_T), batch = pad_batch((keys, cond, x_T), n)
        nd, params = n, replicate(denoiser.params, jax.local_devices()[:n])
    keys, cond, x_T = jax.tree.map(lambda a: _uncommitted(a.reshape((nd, -1) + a.shape[1:])), (keys, cond, x_T))
    traced = _unshard_banks(jit_guidance(guidance))
    out = _pmap_sample(params, denoiser.replace(params=None), traced, sampler_cfg, keys, cond, x_T)
    res = _cut(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), out), batch)
    samplers.report_divergence(guidance, res)   # on the devices; warned when computed
    return res


__all__ = [
    "BATCH_AXIS", "DISTRIBUTED_ENV", "distributed_env", "is_replicated", "make_mesh",
    "maybe_initialize_distributed", "pad_batch", "place_guidance", "sample_pmap", "sample_sharded",
    "sharded_sample_fn",
]
