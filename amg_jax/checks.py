"""Small checks shared by every config: the one rule behind each "unknown setting" and "must be
an integer" error, so all commands word and apply them alike."""
from __future__ import annotations

import dataclasses
import math

import numpy as np


def unknown_fields(cls, names) -> tuple[list, list]:
    """(the sorted ``names`` that are not fields of dataclass ``cls``, its sorted field names): the
    one check behind every "unknown setting" error of a config built from keywords or a dict."""
    known = sorted(f.name for f in dataclasses.fields(cls))
    return sorted(set(names) - set(known)), known


def is_int(v) -> bool:
    """A Python or NumPy integer, not a bool (``True`` is an ``int`` in Python)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_number(v) -> bool:
    """A finite Python int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


__all__ = ["is_int", "is_number", "unknown_fields"]
