"""Guidances: the protocol (``base``), the CFG / attraction-basin family (``cfg``) and
Anti-Memorization Guidance around any of them (``amg``: ``make_amg(base, detector, **config)``).

``make_guidance(name, **fields)`` builds one by name, checking names and fields before
anything is compiled.
"""
from __future__ import annotations

from amg_jax.guidance.amg import AMG, AMGConfig, make_amg
from amg_jax.guidance.base import Guidance, StepContext, eps_uncond_cond, x0_from_eps
from amg_jax.guidance.cfg import (
    CFG,
    DynamicTransition,
    OppositeDynamic,
    OppositeGuidance,
    StaticTransition,
    Unguided,
    first_strict_local_min,
    guided,
)
from amg_jax.checks import unknown_fields
from amg_jax.guidance.registry import GUIDANCES, METHODS, build_method, get_method, register_method

ALIASES = {"unguided": "none", "delayed_cfg": "stp", "static": "stp", "dynamic": "dtp",
           "opposite": "og", "og+dtp": "og_dtp"}


def make_guidance(name: str, **fields):
    """Build a guidance config by name (see ``GUIDANCES``), e.g. ``make_guidance("stp", t_switch=400)``.

    Raises ValueError naming the unknown guidance or field.
    """
    key = ALIASES.get(name.lower(), name.lower())
    if key not in GUIDANCES:
        raise ValueError(f"unknown guidance {name!r}; choose one of {sorted(GUIDANCES)}")
    cls = GUIDANCES[key]
    unknown, known = unknown_fields(cls, fields)
    if unknown:
        raise ValueError(f"guidance {key!r} has no field {unknown[0]!r}; its fields are {known}")
    for k, v in fields.items():
        if k != "fallback_step" and not isinstance(v, (int, float)):
            raise ValueError(f"guidance {key!r}: field {k!r} must be a number, got {v!r}")
    return cls(**fields)


__all__ = [
    "AMG", "AMGConfig", "make_amg", "CFG", "DynamicTransition", "GUIDANCES", "Guidance", "OppositeDynamic", "OppositeGuidance",
    "StaticTransition", "StepContext", "Unguided", "eps_uncond_cond", "first_strict_local_min",
    "guided", "make_guidance", "x0_from_eps", "METHODS", "build_method", "get_method", "register_method",
]
