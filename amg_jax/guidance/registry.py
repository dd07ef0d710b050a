"""The method registry (score_sde's ``register_predictor`` / ``get_predictor`` shape): method
names -> guidance builders, one table for the testbed and Stable Diffusion alike.

A builder is ``(scale, *, base, detector, neighbour_conds, amg) -> guidance``; ``build_method``
looks one up by name. A new method is one ``@register_method("name")``.
"""
from __future__ import annotations

from typing import Callable

from amg_jax.guidance.amg import make_amg
from amg_jax.guidance.cfg import CFG, DynamicTransition, OppositeDynamic, OppositeGuidance, StaticTransition, Unguided

# The guidance classes by name (``make_guidance``'s table).
GUIDANCES = {
    "none": Unguided,
    "cfg": CFG,
    "stp": StaticTransition,
    "dtp": DynamicTransition,
    "og": OppositeGuidance,
    "og_dtp": OppositeDynamic,
}

_METHODS: dict[str, Callable] = {}


def register_method(name: str):
    """Decorator: register ``builder(scale, *, base, detector, neighbour_conds, amg)`` as method ``name``."""
    def register(builder: Callable) -> Callable:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered already")
        _METHODS[name] = builder
        return builder
    return register


def get_method(name: str) -> Callable:
    """The builder of method ``name``."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {list(_METHODS)}")
    return _METHODS[name]


def build_method(name: str, scale: float, *, base: str = "cfg", detector=None, neighbour_conds=None,
                 amg: dict | None = None):
    """The guidance of method ``name`` at guidance scale ``scale`` (the papers' defaults otherwise).
    ``"amg"`` wraps the ``base`` method with ``detector`` and the ``amg`` settings (AMGConfig fields);
    ``neighbour_conds`` is y_N per bank label, a pytree [C, ...] (None: the label id is the condition)."""
    return get_method(name)(scale, base=base, detector=detector, neighbour_conds=neighbour_conds, amg=amg)


def _plain(name: str, **fixed):
    def build(scale, **_):
        return GUIDANCES[name](**fixed) if name == "none" else GUIDANCES[name](scale=scale, **fixed)
    return build


for _name in ("none", "cfg", "stp", "dtp", "og"):
    register_method(_name)(_plain(_name))


@register_method("og_dtp")
def _og_dtp(scale, **_):
    """OG+DTP: opposite guidance at -scale while probing (as the reference code does)."""
    return OppositeDynamic(scale=scale, early_scale=-scale)


@register_method("amg")
def _amg(scale, *, base="cfg", detector=None, neighbour_conds=None, amg=None):
    """AMG around the ``base`` method."""
    if detector is None:
        raise ValueError("method 'amg' needs a detector (e.g. a pixel detector over the training set's bank)")
    return make_amg(build_method(base, scale), detector, neighbour_conds=neighbour_conds, **dict(amg or {}))


METHODS = tuple(_METHODS)


__all__ = ["GUIDANCES", "METHODS", "build_method", "get_method", "register_method"]
