"""The ``--screen auto|none|NAME`` choice, and the calibrated screens stored with a model or a bank.

A calibrated screen is a JSON file ``{"name", "settings", "threshold", ...}``: ``screen.json`` in
a trained testbed model's folder (written by ``experiments/detection.py --store``) or
``BANK.screen.json`` beside a Stable Diffusion bank (``write_screen(bank_screen_path(bank))``),
like the copy threshold is stored with its bank. (Not in the model card: a calibration measured
on the model decides no sample of a run without a screen, so it stays out of the checkpoint's
weights digest that fingerprints the sweeps' cells.) ``resolve_screen`` turns the user's choice into
``(screen, threshold)`` before anything is loaded or compiled:

- ``auto``: the calibrated screen in front of AMG's bank search where the model / bank has one
  (basin methods keep their every-sample switch), else none;
- ``none``: no screen (every-step AMG, the papers' setting);
- ``NAME`` (``guidance.screen.SCREENS``): that screen, at ``--screen-threshold`` or at the
  calibrated threshold when the stored screen is the same one; for AMG, and for STP / DTP / OG
  (the screen then gates their switch: plain CFG where it does not flag).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

from amg_jax.guidance.registry import SCREENABLE_BASIN
from amg_jax.guidance.screen import SCREENS, get_screen
from amg_jax.jsonio import read_json, write_json

SCREEN_CHOICES = ("auto", "none") + SCREENS
SCREEN_SUFFIX = ".screen.json"
MODEL_SCREEN = "screen.json"


@dataclasses.dataclass(frozen=True)
class CalibratedScreen:
    """A screen with its calibrated threshold; ``source`` says where it was read."""

    name: str
    settings: tuple          # ((field, value), ...)
    threshold: float
    source: str = ""

    def build(self):
        return get_screen(self.name, **dict(self.settings))


def _calibrated(d, source: str) -> CalibratedScreen:
    if not isinstance(d, dict) or not {"name", "threshold"} <= set(d):
        raise ValueError(f"{source}: a calibrated screen needs 'name' and 'threshold', got {d!r}")
    thr = d["threshold"]
    if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not np.isfinite(thr):
        raise ValueError(f"{source}: screen threshold must be a finite number, got {thr!r}")
    settings = d.get("settings") or {}
    if not isinstance(settings, dict):
        raise ValueError(f"{source}: screen settings must be an object, got {settings!r}")
    c = CalibratedScreen(str(d["name"]), tuple(sorted(settings.items())), float(thr), source)
    try:
        c.build()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    return c


def bank_screen_path(bank_path: str) -> str:
    """``BANK.screen.json`` beside ``bank_path`` (its ``.npz`` suffix dropped)."""
    root = bank_path[:-4] if bank_path.endswith(".npz") else bank_path
    return root + SCREEN_SUFFIX


def model_screen_path(model_dir: str) -> str:
    """``screen.json`` in a trained model's folder."""
    return os.path.join(model_dir, MODEL_SCREEN)


def write_screen(path: str, name: str, threshold: float, settings: dict | None = None, **info) -> str:
    """Store a calibrated screen at ``path`` (``info``: recall, prompts, command, ...)."""
    _calibrated({"name": name, "threshold": threshold, "settings": settings or {}}, path)     # validate
    write_json(path, {"name": name, "settings": settings or {}, "threshold": float(threshold), **info}, indent=1)
    return path


def read_screen(path: str | None) -> CalibratedScreen | None:
    """The calibrated screen stored at ``path``, or None where there is none."""
    if not path or not os.path.isfile(path):
        return None
    return _calibrated(read_json(path, "calibrated screen"), path)


def read_bank_screen(bank_path: str | None) -> CalibratedScreen | None:
    """The calibrated screen stored beside the bank ``bank_path``, or None."""
    return read_screen(bank_screen_path(bank_path)) if bank_path else None


def model_screen(spec) -> CalibratedScreen | None:
    """The calibrated screen stored in a trained testbed model's folder, or None (also for the
    closed-form models, which have no folder)."""
    return read_screen(model_screen_path(spec.path)) if getattr(spec, "trained", False) else None


def check_screen_choice(choice: str, threshold, fail) -> None:
    """Validate ``--screen`` / ``--screen-threshold``; ``fail(field, message)`` raises."""
    if choice not in SCREEN_CHOICES:
        fail("screen", f"must be one of {list(SCREEN_CHOICES)}, got {choice!r}")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            fail("screen_threshold", f"must be a finite number, got {threshold!r}")
        if choice in ("auto", "none"):
            fail("screen_threshold", f"needs --screen NAME (one of {list(SCREENS)}), got --screen {choice}")


def resolve_screen(choice: str, calibrated: CalibratedScreen | None, threshold: float | None, method: str,
                   where: str) -> tuple:
    """``(screen, threshold)`` for ``method``, or ``(None, None)`` (see the module docstring)."""
    if choice == "none":
        return None, None
    if choice == "auto":
        if calibrated is None or method != "amg":
            return None, None
        return calibrated.build(), calibrated.threshold
    if method != "amg" and method not in SCREENABLE_BASIN:
        raise ValueError(f"{where}: --screen {choice} gates AMG's bank search or the switch of "
                         f"{list(SCREENABLE_BASIN)}; method {method!r} has nothing to gate")
    if threshold is not None:
        same = calibrated is not None and calibrated.name == choice
        return get_screen(choice, **(dict(calibrated.settings) if same else {})), float(threshold)
    if calibrated is not None and calibrated.name == choice:
        return calibrated.build(), calibrated.threshold
    have = f"the stored screen is {calibrated.name!r} ({calibrated.source})" if calibrated else "none is stored"
    raise ValueError(f"{where}: screen {choice!r} has no calibrated threshold here ({have}); pass "
                     "--screen-threshold, or calibrate it (experiments/detection.py --store)")


__all__ = ["CalibratedScreen", "MODEL_SCREEN", "SCREEN_CHOICES", "SCREEN_SUFFIX", "bank_screen_path",
           "check_screen_choice", "model_screen", "model_screen_path", "read_bank_screen", "read_screen",
           "resolve_screen", "write_screen"]
