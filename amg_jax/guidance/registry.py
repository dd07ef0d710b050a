"""The method registry (score_sde's ``register_predictor`` / ``get_predictor`` shape): method
names -> guidance builders, one table for the testbed and Stable Diffusion alike.

A builder is ``(scale, *, base, detector, neighbour_conds, amg) -> guidance``; ``build_method``
looks one up by name. A new method is one ``@register_method("name")``. A screen
(``guidance.screen``) goes in front of AMG's bank search, or gates a basin method's switch
(``ScreenedGuidance``: plain CFG on the samples it does not flag).
"""
from __future__ import annotations

from typing import Callable

from amg_jax.guidance.amg import make_amg
from amg_jax.guidance.cfg import CFG, DynamicTransition, OppositeDynamic, OppositeGuidance, StaticTransition, Unguided
from amg_jax.guidance.screen import ScreenedGuidance

# The methods a screen can gate without a bank (a switch to plain CFG where it does not flag).
SCREENABLE_BASIN = ("stp", "dtp", "og")

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
                 amg: dict | None = None, screen=None, screen_threshold: float | None = None):
    """The guidance of method ``name`` at guidance scale ``scale`` (the papers' defaults otherwise).
    ``"amg"`` wraps the ``base`` method with ``detector`` and the ``amg`` settings (AMGConfig fields);
    ``neighbour_conds`` is y_N per bank label, a pytree [C, ...] (None: the label id is the condition).
    ``screen`` / ``screen_threshold``: AMG's screen in front of the bank search; for STP / DTP / OG
    the screen gates the switch (plain CFG at ``scale`` where it does not flag)."""
    builder = get_method(name)
    if screen is None:
        if screen_threshold is not None:
            raise ValueError(f"method {name!r}: screen_threshold is set but there is no screen")
        return builder(scale, base=base, detector=detector, neighbour_conds=neighbour_conds, amg=amg)
    if screen_threshold is None:
        raise ValueError(f"method {name!r}: the screen needs its calibrated threshold (screen_threshold)")
    if name == "amg":
        return builder(scale, base=base, detector=detector, neighbour_conds=neighbour_conds,
                       amg={**dict(amg or {}), "screen": screen, "screen_threshold": float(screen_threshold)})
    if name not in SCREENABLE_BASIN:
        raise ValueError(f"method {name!r} has nothing to gate with a screen; a screen gates AMG's bank search "
                         f"or the switch of {list(SCREENABLE_BASIN)}")
    return ScreenedGuidance(builder(scale), CFG(scale=scale), screen, float(screen_threshold))


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
    settings = dict(amg or {})
    if detector is None and settings.get("screen") is None:
        raise ValueError("method 'amg' needs a detector (e.g. a pixel detector over the training set's bank), "
                         "or a screen to gate despecification without one")
    return make_amg(build_method(base, scale), detector, neighbour_conds=neighbour_conds, **settings)


METHODS = tuple(_METHODS)


__all__ = ["GUIDANCES", "METHODS", "SCREENABLE_BASIN", "build_method", "get_method", "register_method"]
