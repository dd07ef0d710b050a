"""Weights of a diffusers-layout component folder -> the params of amg_jax's own Flax modules.

- ``weight_files(folder, names)``: which file a component loads: Flax ``.msgpack``, PyTorch
  ``.safetensors`` (also sharded through ``*.safetensors.index.json``, and ``*.fp16.safetensors``
  variants when they are all there is) or ``.bin``.
- ``read_state(path) -> {name: np.ndarray}``: a ``.safetensors`` file read directly (its header and
  raw buffer; bfloat16 through ``ml_dtypes``; no torch), a ``.bin`` through ``torch.load`` (the one
  use of torch), a ``.msgpack`` through ``flax.serialization``.
- ``to_params(state, expected, where, aliases)``: PyTorch names / layouts -> the module's tree
  (``a.0.b.weight`` -> ``a_0/b/kernel`` as diffusers' Flax modules name them, or ``a/0/b/kernel`` as
  transformers' do: whichever the module has), linear weights transposed, convolutions OIHW -> HWIO,
  1x1-conv attention weights of old VAE checkpoints squeezed; a bare parameter (no ``.weight`` /
  ``.bias``, e.g. CLIP's ``logit_scale``) maps to the leaf of its own name. A weight of the wrong shape, or one
  the module needs and the file lacks, raises ValueError naming the file and the weight: the sign of
  another architecture, or of a config that does not match its weights.
"""
from __future__ import annotations

import json
import os
import re
import struct
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
# buffers PyTorch files carry that are no weights
IGNORED = re.compile(r"(^|\.)(position_ids|num_batches_tracked)$")


def _safetensors_dtype(code: str, path: str):
    if code == "BF16":
        import ml_dtypes        # installed with jax
        return ml_dtypes.bfloat16
    if code not in SAFETENSORS_DTYPES:
        raise ValueError(f"{path}: tensor dtype {code!r} is not supported")
    return SAFETENSORS_DTYPES[code]


def read_safetensors(path: str) -> dict:
    """{name: np.ndarray} of a ``.safetensors`` file (8-byte little-endian header size, a JSON header of
    dtype / shape / data_offsets, then the raw buffer), memory-mapped; ValueError on a damaged file."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ValueError(f"{path}: not a safetensors file (header size {n} > file size {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON: {e})") from e
    buf = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else np.zeros(0, np.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = np.dtype(_safetensors_dtype(info["dtype"], path))
        lo, hi = info["data_offsets"]
        shape = tuple(info["shape"])
        if hi > buf.size or hi - lo != int(np.prod(shape)) * dt.itemsize:
            raise ValueError(f"{path}: tensor {name} is truncated or its offsets do not match its shape {shape}")
        out[name] = np.frombuffer(buf[lo:hi], dtype=dt).reshape(shape)
    return out


def read_state(path: str) -> dict:
    """{name: array} of one weights file (see the module docstring); sharded safetensors through their index."""
    if path.endswith(".index.json"):
        with open(path) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for shard in shards:
            state.update(read_safetensors(os.path.join(os.path.dirname(path), shard)))
        return state
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    if path.endswith(".msgpack"):
        from flax.serialization import msgpack_restore
        with open(path, "rb") as f:
            try:
                tree = msgpack_restore(f.read())
            except Exception as e:     # msgpack raises several kinds
                raise ValueError(f"{path}: not a Flax msgpack file ({type(e).__name__}: {e})") from e
        return {"/".join(k): np.asarray(v) for k, v in flatten_dict(tree).items()}
    import torch        # optional (the torch extra): only to read PyTorch .bin weights
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


def weight_files(folder: str, names) -> str | None:
    """The first of ``names`` present in ``folder`` (``X.safetensors`` also as ``X.safetensors.index.json``
    or ``X.fp16.safetensors``); None when there is none."""
    for name in names:
        cands = [name]
        if name.endswith(".safetensors"):
            stem = name[: -len(".safetensors")]
            cands += [name + ".index.json", stem + ".fp16.safetensors", stem + ".fp16.safetensors.index.json"]
        for c in cands:
            if os.path.isfile(os.path.join(folder, c)):
                return os.path.join(folder, c)
    return None


def _candidates(name: str, aliases: dict) -> list[tuple]:
    parts = name.split(".")
    merged = []
    for p in parts:                     # diffusers' Flax naming: "down_blocks.0" -> "down_blocks_0"
        if p.isdigit() and merged:
            merged[-1] = f"{merged[-1]}_{p}"
        else:
            merged.append(p)
    out = []
    for path in (merged, parts):        # transformers' Flax naming keeps "layers/0"
        path = [aliases.get(p, p) for p in path]
        out.append(tuple(path))
    return out


def to_params(state: dict, expected: dict, where: str, aliases: dict | None = None, dtype=jnp.float32):
    """``state`` ({PyTorch or Flax name: array}) -> params with the tree of ``expected`` (a nested dict of
    ShapeDtypeStructs: ``jax.eval_shape`` of the module's init), cast to ``dtype`` in numpy."""
    aliases = aliases or {}
    want = {k: v for k, v in flatten_dict(expected).items()}
    out, unused = {}, []
    for name, arr in state.items():
        if "/" in name:                 # a Flax file: the tree's own names
            key = tuple(name.split("/"))
            if key in want:
                out[key] = np.asarray(arr)
                if out[key].shape != tuple(want[key].shape):
                    raise ValueError(f"{where}: weight {name!r} has shape {out[key].shape}; the model its "
                                     f"config.json describes needs shape {tuple(want[key].shape)} (the config "
                                     "does not match the weights, or they are another architecture's)")
            else:
                unused.append(name)
            continue
        if IGNORED.search(name):
            continue
        *path, leaf = name.split(".") if name.endswith((".weight", ".bias")) else (name.split(".") + [""])
        arr = np.asarray(arr)
        hit = None
        for cand in _candidates(".".join(path), aliases):
            if not leaf and cand in want:          # a bare parameter (CLIP's class_embedding, logit_scale)
                hit = cand
                break
            for flax_leaf in (("bias",) if leaf == "bias" else ("kernel", "scale", "embedding")):
                if cand + (flax_leaf,) in want:
                    hit = cand + (flax_leaf,)
                    break
            if hit:
                break
        if hit is None:
            unused.append(name)
            continue
        shape = tuple(want[hit].shape)
        if hit[-1] == "kernel":
            if arr.ndim == 4 and len(shape) == 2 and arr.shape[2:] == (1, 1):
                arr = arr[:, :, 0, 0]              # old VAE checkpoints: attention as 1x1 convs
            arr = arr.transpose(2, 3, 1, 0) if arr.ndim == 4 else arr.T
        if arr.shape != shape:
            raise ValueError(f"{where}: weight {name!r} has shape {tuple(np.asarray(state[name]).shape)}; the "
                             f"model its config.json describes needs {'.'.join(hit)} of shape {shape} (the "
                             "config does not match the weights, or they are another architecture's)")
        out[hit] = arr
    missing = sorted(set(want) - set(out))
    if missing:
        raise ValueError(f"{where}: {len(missing)} weights the model its config.json describes needs are not in "
                         f"the file, e.g. {['.'.join(k) for k in missing[:3]]} (weights of another architecture?)")
    if unused:
        warnings.warn(f"{where}: {len(unused)} weights the model does not use were ignored, e.g. {unused[:3]}",
                      UserWarning, stacklevel=3)
    dt = np.dtype(dtype)
    return unflatten_dict({k: jnp.asarray(v.astype(dt) if np.issubdtype(v.dtype, np.floating) or v.dtype.kind == "V"
                                          or str(v.dtype) == "bfloat16" else v) for k, v in out.items()})


def expected_tree(module, *args):
    """The params tree of ``module.init(key, *args)`` as ShapeDtypeStructs (no compilation, no FLOPs)."""
    return jax.eval_shape(lambda k: module.init(k, *args)["params"], jax.random.PRNGKey(0))


__all__ = ["expected_tree", "read_safetensors", "read_state", "to_params", "weight_files"]
