"""The reference bank: the rows a detector searches (images or embeddings), exact or approximate
top-k, sharded over devices, saved as one ``.npz``.

A ``ReferenceBank`` is a pytree: its arrays are traced leaves (pass it, or a detector holding it,
into ``jit`` as an argument), its metadata is static::

    rows         [M, D] float32  flattened images / embeddings (deduplicated by default)
    sq_norms     [M]    float32  |row|^2 (+inf on padding rows of a sharded bank)
    labels       [M]    int32    caption / class id of each row, -1 = unlabelled
    source_index [M]    int32    row in the array the user passed (first occurrence of a
                                 duplicated one); -1 on padding rows
    sample_shape, kind ("pixel" | "embedding"), knn_scale, copy_threshold, dedup, normalized,
    num_rows (M without padding), mesh (None, or the 1-D mesh the rows are sharded over)

``knn_scale`` (``m``) is the median over bank rows of the mean direct L2 distance to their
``k`` (default 50) nearest OTHER rows: the typical k-NN mean distance, the distance scale a
data-scaled ``c3`` needs (README pitfall 4). ``copy_threshold`` is the calibrated copy
distance (README, "Design notes"), stored with the bank.

**Deduplication is on by default** (README pitfall 2): exact duplicates put zero
distances into nL2's k-NN mean. Duplicates keep the first occurrence (and its label).

**Search** (``search``): candidates are chosen with one matmul + ``lax.top_k`` (or
``lax.approx_max_k``), a few more than ``k``; their values are then recomputed directly from
the chosen rows (``||q - z||`` or ``q.z / (|q| |z|)``) and re-ranked, so values and gradients
w.r.t. the query are exact (README pitfall 1: never differentiate ``|a|^2 - 2ab + |b|^2``).
On a sharded bank (``shard_bank``) each device computes its local top candidates in a
``jax.shard_map``, the candidates are all-gathered and merged, and each device contributes the
chosen rows it holds (a masked ``psum``): the result equals the unsharded search exactly.
"""
from __future__ import annotations

import functools
import json
import os
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from amg_jax.jsonio import write_atomic
from amg_jax.mesh import BANK_AXIS, make_mesh

Array = jax.Array

KINDS = ("pixel", "embedding")
METRICS = ("l2", "cosine")
FORMAT = "amg_jax.ReferenceBank"
FORMAT_VERSION = 1

_ARRAYS = ("rows", "sq_norms", "labels", "source_index")      # a bank's traced leaves
_HIGHEST = jax.lax.Precision.HIGHEST
_EXTRA_CANDIDATES = 3     # candidates beyond k, re-ranked by the direct value (float32 near-ties)


# ----------------------------------------------------------------------------- small helpers

def flatten(x: Array) -> Array:
    """[B, ...] -> [B, D] (float32)."""
    x = jnp.asarray(x)
    if x.ndim < 1:
        raise ValueError("expected a batch [B, ...], got a scalar")
    return x.reshape(x.shape[0], -1).astype(jnp.float32)


def _sqrt0(s: Array) -> Array:
    """sqrt with gradient 0 (not NaN) at 0."""
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


def safe_norm(v: Array, axis: int = -1) -> Array:
    """Euclidean norm along ``axis`` whose gradient is 0 (not NaN) where the norm is 0:
    ``[..., D] -> [...]`` for the default ``axis=-1``."""
    return _sqrt0(jnp.sum(jnp.square(v), axis=axis))


def row_norm(v: Array) -> Array:
    """``safe_norm`` over the last axis computed as a dot product ([..., D] -> [...]): XLA
    compiles it the same way whatever produced ``v``, so a sharded bank gives bitwise the
    same distances as an unsharded one."""
    return _sqrt0(jnp.einsum("...d,...d->...", v, v, precision=_HIGHEST))


def squared_norms(rows: Array) -> Array:
    """|z|^2 per row: [M, ...] -> [M]."""
    r = flatten(rows)
    return jnp.sum(jnp.square(r), axis=-1)


def dedup_rows(rows) -> tuple[np.ndarray, np.ndarray]:
    """Remove exact (bitwise-equal) duplicate rows, host side.

    ``rows [M, ...]`` -> ``(unique [M', ...], kept [M'] int32)``: first occurrences in original
    order and their rows in ``rows`` (``unique == rows[kept]``). Not jit-able.
    """
    rows = np.asarray(rows)
    if rows.ndim < 1 or rows.shape[0] == 0:
        raise ValueError(f"dedup: expected a non-empty [M, ...] array, got shape {rows.shape}")
    flat = np.ascontiguousarray(rows.reshape(rows.shape[0], -1))
    _, first = np.unique(flat, axis=0, return_index=True)
    kept = np.sort(first).astype(np.int32)
    return rows[kept], kept


# ----------------------------------------------------------------------------- the bank

@struct.dataclass
class ReferenceBank:
    """Rows a detector searches, with labels and source rows (see the module docstring):
    ``rows [M, D]``, ``sq_norms [M]``, ``labels [M]``, ``source_index [M]`` plus static metadata.
    Build with ``build_bank`` / ``bank_from_testbed`` / ``load_bank``; shard with ``shard_bank``."""

    rows: Array
    sq_norms: Array
    labels: Array
    source_index: Array
    sample_shape: tuple = struct.field(pytree_node=False, default=())
    kind: str = struct.field(pytree_node=False, default="pixel")
    knn_scale: float = struct.field(pytree_node=False, default=float("nan"))
    copy_threshold: float | None = struct.field(pytree_node=False, default=None)
    dedup: bool = struct.field(pytree_node=False, default=True)
    normalized: bool = struct.field(pytree_node=False, default=False)
    num_rows: int = struct.field(pytree_node=False, default=0)
    mesh: Any = struct.field(pytree_node=False, default=None)

    @property
    def size(self) -> int:
        """Number of real rows (without the padding of a sharded bank)."""
        return int(self.num_rows)

    @property
    def dim(self) -> int:
        return int(self.rows.shape[1])

    @property
    def sharded(self) -> bool:
        return self.mesh is not None

    def lookup(self, index: Array) -> tuple[Array, Array]:
        """Bank rows ``index [...]`` -> ``(source_index [...], labels [...])`` (int32)."""
        index = jnp.asarray(index, jnp.int32)
        return jnp.take(self.source_index, index), jnp.take(self.labels, index)


def _fail(where: str, msg: str):
    raise ValueError(f"{where}: {msg}")


def _check_rows(rows, where: str) -> np.ndarray:
    rows = np.asarray(rows)
    if rows.ndim < 2:
        _fail(where, f"rows must be an array [M, ...] with at least 2 dimensions, got shape {rows.shape}")
    if rows.shape[0] == 0:
        _fail(where, "the reference bank is empty (0 rows)")
    if int(np.prod(rows.shape[1:])) == 0:
        _fail(where, f"rows have no values per sample (shape {rows.shape})")
    if not (np.issubdtype(rows.dtype, np.floating) or np.issubdtype(rows.dtype, np.integer)):
        _fail(where, f"rows must be real numbers, got dtype {rows.dtype}")
    rows = rows.astype(np.float32)
    bad = ~np.all(np.isfinite(rows.reshape(rows.shape[0], -1)), axis=1)
    if bad.any():
        _fail(where, f"rows contain NaN or inf ({int(bad.sum())} rows, first row {int(np.flatnonzero(bad)[0])})")
    return rows


def _check_labels(labels, m: int, where: str) -> np.ndarray:
    if labels is None:
        return np.full((m,), -1, np.int32)
    labels = np.asarray(labels)
    if labels.shape != (m,):
        _fail(where, f"labels must have shape [M] = ({m},), got {labels.shape}")
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.isfinite(labels)) or np.any(labels != np.round(labels)):
            _fail(where, f"labels must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int32)


def knn_mean_distances(rows, k: int = 50, *, max_rows: int | None = 4096, seed: int = 0,
                       chunk: int = 256) -> np.ndarray:
    """Mean direct L2 distance of bank rows to their ``k`` nearest OTHER rows (host, NumPy).

    ``rows [M, ...]`` -> ``[M'] float64`` for ``M' = min(M, max_rows)`` rows (a seeded random
    subset when the bank is larger; neighbours always come from all ``M`` rows). ``k`` is
    clamped to ``M - 1``; a one-row bank gives ``[nan]``. Candidates by the expanded form in
    float32, values direct in float64.
    """
    r = np.asarray(rows, np.float32).reshape(len(rows), -1)
    m = r.shape[0]
    k = min(int(k), m - 1)
    if k < 1:
        return np.full((1,), np.nan)
    q_idx = np.arange(m)
    if max_rows is not None and m > int(max_rows):
        q_idx = np.sort(np.random.default_rng(seed).choice(m, int(max_rows), replace=False))
    sq = np.sum(r.astype(np.float64) ** 2, axis=1).astype(np.float32)
    c = min(m, k + 1 + _EXTRA_CANDIDATES)
    out = np.empty(len(q_idx), np.float64)
    for lo in range(0, len(q_idx), chunk):
        qi = q_idx[lo:lo + chunk]
        score = 2.0 * (r[qi] @ r.T) - sq[None, :]                          # larger = nearer
        cand = np.argpartition(-score, c - 1, axis=1)[:, :c] if c < m else np.tile(np.arange(m), (len(qi), 1))
        d = np.empty(cand.shape, np.float64)
        step = max(1, 2 ** 21 // (c * r.shape[1]))                          # <= 16 MB of differences
        for s in range(0, len(qi), step):
            diff = r[qi[s:s + step], None, :].astype(np.float64) - r[cand[s:s + step]]
            d[s:s + step] = np.sqrt(np.sum(diff ** 2, axis=-1))
        d[cand == qi[:, None]] = np.inf                                     # not itself
        out[lo:lo + len(qi)] = np.mean(np.sort(d, axis=1)[:, :k], axis=1)
    return out


def build_bank(rows, labels=None, *, kind: str = "pixel", dedup: bool = True, k: int = 50,
               copy_threshold: float | None = None, normalize: bool = False,
               scale_rows: int | None = 4096) -> ReferenceBank:
    """A bank over ``rows [M, ...]`` (images, or embeddings [M, E]) with ``labels [M]`` (or None).

    dedup:          drop exact duplicate rows (default; nL2 needs it, README pitfall 2).
    k:              neighbourhood size of ``knn_scale`` (clamped to M - 1).
    copy_threshold: the calibrated copy distance to store with the bank (or None).
    normalize:      L2-normalise the rows (embedding banks; cosine = dot product).
    scale_rows:     at most this many rows (seeded subset) estimate ``knn_scale``; None = all.
    Raises ValueError on an empty bank, a <2-D array, NaN/inf, bad labels or a bad option.
    """
    where = "build_bank"
    if kind not in KINDS:
        _fail(where, f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        _fail(where, f"k must be an integer >= 1, got {k!r}")
    if copy_threshold is not None and not (np.isfinite(copy_threshold) and copy_threshold >= 0):
        _fail(where, f"copy_threshold must be a finite number >= 0 or None, got {copy_threshold!r}")
    x = _check_rows(rows, where)
    lab = _check_labels(labels, x.shape[0], where)
    kept = np.arange(x.shape[0], dtype=np.int32)
    if dedup:
        x, kept = dedup_rows(x)
        lab = lab[kept]
    sample_shape = tuple(int(s) for s in x.shape[1:])
    flat = x.reshape(x.shape[0], -1)
    if normalize:
        n = np.linalg.norm(flat.astype(np.float64), axis=1)
        if np.any(n == 0):
            _fail(where, f"cannot normalise zero rows (first row {int(kept[np.flatnonzero(n == 0)[0]])})")
        flat = (flat / n[:, None]).astype(np.float32)
    scale = float(np.median(knn_mean_distances(flat, k, max_rows=scale_rows)))
    sq = np.sum(flat.astype(np.float64) ** 2, axis=1).astype(np.float32)
    return ReferenceBank(
        rows=jnp.asarray(flat), sq_norms=jnp.asarray(sq),
        labels=jnp.asarray(lab), source_index=jnp.asarray(kept), sample_shape=sample_shape, kind=kind,
        knn_scale=scale, copy_threshold=None if copy_threshold is None else float(copy_threshold),
        dedup=bool(dedup), normalized=bool(normalize), num_rows=int(flat.shape[0]))


# ----------------------------------------------------------------------------- sharding

def shard_bank(bank: ReferenceBank, mesh: Mesh | None = None) -> ReferenceBank:
    """Place the bank's arrays sharded along M over a 1-D ``mesh`` (default: all devices, axis
    "bank"). M is padded to a multiple of the device count with rows that are never chosen
    (``sq_norms = +inf``, ``source_index = labels = -1``). ``search`` then runs per shard."""
    if mesh is None:
        mesh = make_mesh(axis=BANK_AXIS)
    if len(mesh.axis_names) != 1:
        raise ValueError(f"shard_bank: mesh must be 1-D, got axes {mesh.axis_names}")
    bank = unshard_bank(bank)
    n = int(mesh.devices.size)
    m = bank.size
    pad = (-m) % n
    rows, sq, lab, src = (np.asarray(getattr(bank, name)) for name in _ARRAYS)
    if pad:
        rows = np.concatenate([rows, np.zeros((pad, rows.shape[1]), rows.dtype)])
        sq = np.concatenate([sq, np.full((pad,), np.inf, sq.dtype)])
        lab = np.concatenate([lab, np.full((pad,), -1, lab.dtype)])
        src = np.concatenate([src, np.full((pad,), -1, src.dtype)])
    ax = mesh.axis_names[0]
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))   # noqa: E731
    return bank.replace(rows=put(rows, P(ax, None)), sq_norms=put(sq, P(ax)), labels=put(lab, P(ax)),
                        source_index=put(src, P(ax)), mesh=mesh)


def unshard_bank(bank: ReferenceBank) -> ReferenceBank:
    """The bank without padding, on the default device (a no-op for an unsharded bank)."""
    if bank.mesh is None:
        return bank
    host = {name: jnp.asarray(np.asarray(getattr(bank, name))[:bank.size]) for name in _ARRAYS}
    return bank.replace(**host, mesh=None)


# ----------------------------------------------------------------------------- search

def _scores(q: Array, rows: Array, sq: Array, metric: str) -> Array:
    """Candidate scores [B, M], larger = nearer (no gradient): 2 q.z - |z|^2 or q.z / |z|;
    -inf on padding rows (sq = +inf)."""
    dots = jnp.matmul(jax.lax.stop_gradient(q), rows.T, precision=_HIGHEST)
    if metric == "l2":
        return 2.0 * dots - sq[None, :]
    valid = jnp.isfinite(sq)
    inv = jnp.where(valid, jax.lax.rsqrt(jnp.maximum(jnp.where(valid, sq, 1.0), 1e-24)), 0.0)
    return jnp.where(valid[None, :], dots * inv[None, :], -jnp.inf)


def _top(scores: Array, n: int, approx: bool, recall_target: float) -> tuple[Array, Array]:
    if approx:
        return jax.lax.approx_max_k(scores, n, recall_target=recall_target)
    return jax.lax.top_k(scores, n)


def _direct(q: Array, nbrs: Array, nbr_sq: Array, metric: str) -> Array:
    """Direct values of the query against its candidate rows ``nbrs [B, n, D]`` (squared norms
    ``nbr_sq [B, n]``, constants): ``||q - z||`` or ``q.z / (|q| |z|)`` -> [B, n]. The sums are
    dot products, which XLA compiles the same way whatever produced ``nbrs``: a sharded bank
    gives bitwise the same values as an unsharded one."""
    if metric == "l2":
        return row_norm(q[:, None, :] - nbrs)
    num = jnp.einsum("bd,bnd->bn", q, nbrs, precision=_HIGHEST)
    return num / jnp.maximum(row_norm(q)[:, None] * jnp.sqrt(nbr_sq), 1e-12)


def _finish(q: Array, cand: Array, nbrs: Array, nbr_sq: Array, k: int,
            metric: str) -> tuple[Array, Array, Array]:
    """Direct values of the candidates, re-ranked (l2 ascending, cosine descending), first k:
    ``(values [B, k], index [B, k] int32, rows [B, k, D])``."""
    vals = _direct(q, nbrs, nbr_sq, metric)
    key = jax.lax.stop_gradient(vals if metric == "l2" else -vals)
    order = jnp.argsort(key, axis=-1, stable=True)[:, :k]
    return (jnp.take_along_axis(vals, order, axis=-1), jnp.take_along_axis(cand, order, axis=-1).astype(jnp.int32),
            jnp.take_along_axis(nbrs, order[..., None], axis=1))


@functools.partial(jax.jit, static_argnames=("k", "metric", "approx", "recall_target", "num_candidates"))
def dense_search(q: Array, rows: Array, sq: Array, k: int, *, metric: str = "l2", approx: bool = False,
                 recall_target: float = 0.95, num_candidates: int | None = None) -> tuple[Array, Array]:
    """Search of flat queries ``q [B, D]`` in unsharded ``rows [M, D]`` (``sq [M]``): ``k``
    direct values [B, k] and rows [B, k] int32; ``num_candidates`` (default ``k + 3``) rows are
    chosen by the expanded score and re-ranked by the direct value. ``k <= M`` required."""
    n = min(int(rows.shape[0]), max(int(k), int(num_candidates or k + _EXTRA_CANDIDATES)))
    return _finish(q, *_dense_candidates(q, rows, sq, n, metric, approx, recall_target), k, metric)[:2]


def _dense_candidates(q: Array, rows: Array, sq: Array, n: int, metric: str, approx: bool,
                      recall_target: float) -> tuple[Array, Array, Array]:
    """Top-``n`` candidate rows [B, n] by the expanded score, the rows [B, n, D], their |z|^2 [B, n]."""
    _, cand = _top(_scores(q, rows, sq, metric), n, approx, recall_target)
    return cand, jnp.take(rows, cand, axis=0), jnp.take(sq, cand)


def _sharded_candidates(q: Array, bank: ReferenceBank, n: int, metric: str, approx: bool,
                        recall_target: float) -> tuple[Array, Array, Array]:
    """Global top-``n`` candidate rows [B, n], their rows [B, n, D] and |z|^2 [B, n] of a sharded
    bank: local top candidates per shard, an exact merge, then each shard contributes the rows
    it holds."""
    mesh = bank.mesh
    ax = mesh.axis_names[0]
    m_local = int(bank.rows.shape[0]) // int(mesh.devices.size)
    kl = min(n, m_local)

    def local_top(qq, rows, sq):
        s, i = _top(_scores(qq, rows, sq, metric), kl, approx, recall_target)      # [B, kl] local
        return s, i + jax.lax.axis_index(ax) * m_local

    def local_rows(cand, rows, sq):
        loc = cand - jax.lax.axis_index(ax) * m_local
        mine = (loc >= 0) & (loc < m_local)
        loc = jnp.clip(loc, 0, m_local - 1)
        nbrs = jnp.where(mine[..., None], jnp.take(rows, loc, axis=0), 0.0)
        nsq = jnp.where(mine, jnp.take(sq, loc), 0.0)
        return jax.lax.psum(nbrs, ax), jax.lax.psum(nsq, ax)                      # one owner per row

    q = jax.lax.stop_gradient(q)
    s_all, i_all = jax.shard_map(local_top, mesh=mesh, in_specs=(P(), P(ax, None), P(ax)),
                                 out_specs=(P(None, ax), P(None, ax)))(q, bank.rows, bank.sq_norms)
    _, pos = jax.lax.top_k(s_all, n)                                               # exact merge
    cand = jnp.take_along_axis(i_all, pos, axis=1)                                 # [B, n] bank rows
    nbrs, nsq = jax.shard_map(local_rows, mesh=mesh, in_specs=(P(), P(ax, None), P(ax)),
                              out_specs=(P(), P()))(cand, bank.rows, bank.sq_norms)
    return cand, nbrs, nsq


def check_queries(bank: ReferenceBank, queries, where: str = "search") -> None:
    """ValueError unless ``queries [B, ...]`` has the bank's per-sample size."""
    shape = tuple(np.shape(queries))
    if len(shape) < 2:
        _fail(where, f"queries must be a batch [B, ...] with at least 2 dimensions, got shape {shape}")
    if int(np.prod(shape[1:])) != bank.dim:
        _fail(where, f"queries of shape {shape[1:]} ({int(np.prod(shape[1:]))} values) do not match the "
                     f"bank's sample shape {tuple(bank.sample_shape)} ({bank.dim} values)")


def search(bank: ReferenceBank, queries: Array, k: int, *, metric: str = "l2", approx: bool = False,
           recall_target: float = 0.95) -> tuple[Array, Array]:
    """The ``k`` nearest bank rows of each query (``k`` clamped to the bank size).

    queries [B, ...] (per-sample size = the bank's) -> ``(values [B, k], index [B, k] int32)``:
    l2: ``||q - z||`` ascending; cosine: ``q.z / (|q| |z|)`` descending. Values are computed
    directly from the chosen rows (differentiable in ``queries``). ``index`` are bank rows
    (``bank.lookup(index)`` -> source rows, labels). ``approx=True`` picks candidates with
    ``lax.approx_max_k`` (``recall_target``). A sharded bank is searched per shard.
    """
    return search_rows(bank, queries, k, metric=metric, approx=approx, recall_target=recall_target)[:2]


def search_rows(bank: ReferenceBank, queries: Array, k: int, *, metric: str = "l2", approx: bool = False,
                recall_target: float = 0.95) -> tuple[Array, Array, Array]:
    """``search`` that also returns the chosen rows ``[B, k, D]`` (for detectors)."""
    if metric not in METRICS:
        _fail("search", f"metric must be one of {METRICS}, got {metric!r}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        _fail("search", f"k must be an integer >= 1, got {k!r}")
    if not 0.0 < float(recall_target) <= 1.0:
        _fail("search", f"recall_target must be in (0, 1], got {recall_target!r}")
    check_queries(bank, queries)
    k = min(int(k), bank.size)
    return _search(bank, jnp.asarray(queries), k=k, metric=metric, approx=bool(approx),
                   recall_target=float(recall_target))


@functools.partial(jax.jit, static_argnames=("k", "metric", "approx", "recall_target"))
def _search(bank: ReferenceBank, queries: Array, *, k: int, metric: str, approx: bool,
            recall_target: float) -> tuple[Array, Array, Array]:
    """search_rows after validation (jitted so that eager calls hit the compilation cache)."""
    q = flatten(queries)
    n = min(bank.size, k + _EXTRA_CANDIDATES)
    if bank.mesh is None:
        cand, nbrs, nsq = _dense_candidates(q, bank.rows, bank.sq_norms, n, metric, approx, recall_target)
    else:
        cand, nbrs, nsq = _sharded_candidates(q, bank, n, metric, approx, recall_target)
    return _finish(q, cand, nbrs, nsq, k, metric)


# ----------------------------------------------------------------------------- save / load

def save_bank(path: str, bank: ReferenceBank) -> str:
    """Write ``bank`` (unpadded, without its mesh) to ``path`` as one ``.npz`` (arrays + JSON
    metadata with a format version), atomically (temporary file + ``os.replace``). Returns path."""
    b = unshard_bank(bank)
    meta = {"format": FORMAT, "version": FORMAT_VERSION, "sample_shape": list(b.sample_shape), "kind": b.kind,
            "knn_scale": b.knn_scale, "copy_threshold": b.copy_threshold, "dedup": b.dedup,
            "normalized": b.normalized, "num_rows": b.size}
    arrays = {name: np.asarray(getattr(b, name)) for name in _ARRAYS}
    return write_atomic(os.fspath(path), lambda f: np.savez(f, metadata=np.array(json.dumps(meta)), **arrays),
                        binary=True)


def load_bank(path: str) -> ReferenceBank:
    """Read a bank written by ``save_bank``. Raises ValueError naming ``path`` and the problem
    (missing, not a readable .npz, wrong format/version, missing or mis-shaped arrays)."""
    path = os.fspath(path)
    where = f"load_bank({path!r})"
    if not os.path.isfile(path):
        _fail(where, "no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as err:
        _fail(where, f"not a readable .npz file (truncated or corrupt?): {err}")
    if "metadata" not in data:
        _fail(where, "no 'metadata' entry: not a reference bank file")
    try:
        meta = json.loads(str(data["metadata"]))
    except (json.JSONDecodeError, TypeError) as err:
        _fail(where, f"metadata is not valid JSON: {err}")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else meta
        _fail(where, f"metadata format is {found!r}, expected {FORMAT!r}")
    if meta.get("version") != FORMAT_VERSION:
        _fail(where, f"format version {meta.get('version')!r} is not supported (expected {FORMAT_VERSION})")
    missing = [n for n in _ARRAYS if n not in data] + [f for f in ("sample_shape", "kind", "knn_scale",
                                                                   "num_rows") if f not in meta]
    if missing:
        _fail(where, f"missing entries {missing}")
    rows = data["rows"]
    try:
        shape = tuple(int(s) for s in meta["sample_shape"])
        num = int(meta["num_rows"])
    except (TypeError, ValueError) as err:
        _fail(where, f"metadata sample_shape / num_rows are malformed: {err}")
    if rows.ndim != 2 or rows.shape[0] != num or rows.shape[1] != int(np.prod(shape)):
        _fail(where, f"rows have shape {rows.shape}, expected ({num}, {int(np.prod(shape))}) "
                     f"for {num} rows of sample shape {shape}")
    rows = _check_rows(rows, where)
    m = rows.shape[0]
    for name in ("sq_norms", "labels", "source_index"):
        if data[name].shape != (m,):
            _fail(where, f"{name} has shape {data[name].shape}, expected ({m},)")
    if meta["kind"] not in KINDS:
        _fail(where, f"kind {meta['kind']!r} is not one of {KINDS}")
    return ReferenceBank(
        rows=jnp.asarray(rows), sq_norms=jnp.asarray(data["sq_norms"].astype(np.float32)),
        labels=jnp.asarray(data["labels"].astype(np.int32)),
        source_index=jnp.asarray(data["source_index"].astype(np.int32)), sample_shape=shape, kind=meta["kind"],
        knn_scale=float(meta["knn_scale"]) if meta["knn_scale"] is not None else float("nan"),
        copy_threshold=None if meta.get("copy_threshold") is None else float(meta["copy_threshold"]),
        dedup=bool(meta.get("dedup", True)), normalized=bool(meta.get("normalized", False)), num_rows=m)


__all__ = [
    "KINDS", "METRICS", "ReferenceBank", "build_bank", "check_queries", "dense_search",
    "knn_mean_distances", "load_bank", "save_bank", "search", "search_rows", "shard_bank", "unshard_bank",
]
