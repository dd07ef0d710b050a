"""Files written atomically; JSON read with clear errors (metrics, cards, metadata, tokenizers, banks).

``write_json`` writes to a temporary file in the same directory, fsyncs and ``os.replace``s it,
so a reader (or a run killed mid-write) never sees half a file, and writes every non-finite
float (NaN, +-inf) as ``null`` (``json_safe``): Python's ``NaN`` / ``Infinity`` are not JSON (a
strict parser, ``jq`` or a browser rejects the file), and in a metrics file such a value means
"not defined here", e.g. the Frechet distance of a group of fewer than 2 samples or the
alignment of an unconditional model. ``read_json`` raises ``FileNotFoundError`` for a missing
file and ``ValueError`` naming the file for one that is not valid JSON.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping

from amg_jax.checks import unknown_fields


def write_atomic(path: str, write, *, binary: bool = False) -> str:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync, then ``os.replace`` it onto
    ``path`` (so nobody sees half a file); the temporary file is removed on failure."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def json_safe(obj):
    """``obj`` as strict JSON can hold it: every non-finite float (NaN, +-inf) becomes None
    (``null``: "not defined", see the module docstring), numpy scalars and arrays become Python
    numbers and lists, tuples lists; other values are returned as they are."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if type(obj).__module__ == "numpy":           # np.float32 / np.int64 / np.bool_ / np.ndarray
        return json_safe(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_json(path: str, obj, *, indent: int | None = 1) -> str:
    """Write ``obj`` as JSON to ``path`` atomically; returns ``path``. NaN / inf are written as
    ``null`` (``json_safe``; NaN is not JSON), and ``allow_nan=False`` makes sure none slips through."""
    obj = json_safe(obj)
    return write_atomic(path, lambda f: json.dump(obj, f, indent=indent, allow_nan=False))


def read_json(path: str, what: str = "file"):
    """The JSON value in ``path``; ``what`` names the file in errors (e.g. "tokenizer file")."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {path} is unreadable: {e}") from None


__all__ = ["json_safe", "read_json", "write_atomic", "write_json"]


def dataclass_to_json(obj) -> dict:
    """A (frozen) config dataclass as a JSON-able dict: tuples become lists."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(obj).items()}


def dataclass_from_json(cls, d):
    """``cls(**d)`` for a dict written by ``dataclass_to_json``: lists become tuples; a non-mapping
    or unknown fields raise ValueError naming them (the config's own checks run in ``cls``)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{cls.__name__}.from_dict: expected a mapping, got {type(d).__name__}")
    unknown, known = unknown_fields(cls, d)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown} (known: {known})")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
