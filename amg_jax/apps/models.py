"""The model registry: one ``ModelSpec`` per model, looked up once where the flag is parsed.

A model is a value, not a name: its spec holds what differs between models (the kind of
conditioning, the guidance AMG wraps, AMG's detector, its guidance scale and AMG settings, the
testbed it runs on, how to build its denoiser and its reference bank). ``model_spec(name)`` is
the one place a name is read: a testbed model of ``MODELS`` (``register_model``), or
``"sd:PATH_OR_HUB_ID"`` (Stable Diffusion, ``StableDiffusionSpec``). Nothing else branches on a
model's name.

The testbeds the models run on are named here too (``TESTBEDS``: ``default``, ``small``,
``unet``), with the trained checkpoints' folder (``checkpoints_dir``).
"""
from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Any, Callable

import jax.numpy as jnp
import numpy as np

from amg_jax.data import testbed as tb
from amg_jax.data.bank import bank_from_testbed
from amg_jax.evaluation.evalnet import load_evaluator
from amg_jax.guidance import build_method
from amg_jax.models import stable_diffusion as sdm
from amg_jax.models.base import WithNull
from amg_jax.models.empirical import empirical_denoiser
from amg_jax.models.mixture import fit_mixture
from amg_jax.sd_amg import SD_AMG
from amg_jax.models.text import CaptionTokenizer
from amg_jax.models.unet import token_denoiser
from amg_jax.models.zoo import load_model, read_card
from amg_jax.prompt_baselines import EMBEDDING_BASELINES, PROMPT_BASELINES, apply_baseline
from amg_jax.similarity.pixel import pixel_detector

SD_PREFIX = "sd:"
DEFAULT_SCALE = 7.5           # the papers' guidance scale

# ----------------------------------------------------------------------------- testbeds

# A 16x16 testbed with 12 captions: a quick look (and the test suite's runs).
SMALL_TESTBED = dict(seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"),
                     backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=6,
                     n_duplicated=2, duplicate_count=6, n_generic=2, generic_images=8)

# The trained UNets' testbed: the default captions and images at 16x16 (a 2-core CPU trains a
# UNet there to memorization in minutes; at 32x32 a 16-channel UNet was still blurry after
# 2500 steps / 27 minutes).
UNET_TESTBED = dict(image_size=16)
_TESTBED_CONFIGS = {"default": {}, "small": SMALL_TESTBED, "unet": UNET_TESTBED}
TESTBEDS = tuple(_TESTBED_CONFIGS)


def testbed_config(name: str) -> tb.TestbedConfig:
    """The config of a named testbed (``TESTBEDS``)."""
    if name not in _TESTBED_CONFIGS:
        raise ValueError(f"unknown testbed {name!r}; choose one of {list(TESTBEDS)}")
    return tb.TestbedConfig(**_TESTBED_CONFIGS[name])


def build_testbed(name: str) -> tb.Testbed:
    """A named testbed: ``default`` (32x32, 62 captions), ``small`` (16x16, 12 captions) or
    ``unet`` (the default captions at 16x16: the trained UNets' testbed)."""
    return tb.make_testbed(testbed_config(name))


def checkpoints_dir() -> str:
    """Where the trained models live: ``$AMG_CHECKPOINTS``, else the repository's ``checkpoints/``."""
    return os.path.abspath(os.environ.get("AMG_CHECKPOINTS") or os.path.join(     # cwd-independent (and cache keys)
        os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "checkpoints"))


@functools.lru_cache(maxsize=4)
def _load_checkpoint(path: str):
    return load_model(path)


@functools.lru_cache(maxsize=4)
def _load_evaluator(path: str):
    return load_evaluator(path)


EVALNET = "evalnet"


def bench_evaluator(bed: tb.Testbed):
    """The shipped evaluation network (``checkpoints/evalnet``) when it was trained on ``bed``'s
    testbed config, else None (FD is then measured on pooled pixels and alignment with the
    nearest-mean attribute classifier)."""
    path = os.path.join(checkpoints_dir(), EVALNET)
    if not os.path.isdir(path):
        return None
    ev = _load_evaluator(path)
    return ev if ev.config == bed.config else None


_BANKS: dict = {}


def calibrated_bank(bed: tb.Testbed):
    """The testbed's pixel bank with its calibrated copy threshold (cached per testbed)."""
    key = id(bed)
    if key not in _BANKS or _BANKS[key][0] is not bed:
        _BANKS[key] = (bed, bank_from_testbed(bed, calibrate=True, rng=0))
    return _BANKS[key][1]


# ----------------------------------------------------------------------------- detectors

# AMG's pixel detectors by name: PixelDetectorConfig fields. "nl2-bank" is the distance gate
# (nL2 normalized by the bank's own neighbour distances; ``similarity.pixel``).
DETECTORS = {"nl2": {"kind": "nl2"}, "nl2-bank": {"kind": "nl2", "normalize": "bank"}, "cosine": {"kind": "cosine"}}


def make_detector(name: str, bank):
    """The pixel detector ``name`` (``DETECTORS``) over ``bank``."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; choose one of {list(DETECTORS)}")
    return pixel_detector(bank, **DETECTORS[name])


# ----------------------------------------------------------------------------- testbed models

@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What differs between the testbed's models; ``build`` / ``make_bank`` are ``(spec, bed) ->``
    the denoiser / the reference bank AMG searches."""

    name: str
    conditioning: str                 # "text" (caption ids) | "class" (the shape) | "uncond"
    base: str                         # the guidance AMG wraps: "cfg", or "none" (nothing to guide towards)
    detector: str                     # AMG's detector (``DETECTORS``)
    amg: tuple                        # AMG's settings for this model ((field, value), ...), under the user's
    build: Callable[[Any, tb.Testbed], Any] = dataclasses.field(repr=False)
    make_bank: Callable[[Any, tb.Testbed], Any] = dataclasses.field(repr=False)
    checkpoint: str | None = None     # the trained model's folder under ``checkpoints_dir()``
    testbed: str = "default"          # the testbed ``--testbed auto`` picks for it
    has_text_encoder: bool = False    # a prompt baseline (``prompt_baselines``) needs one to mitigate

    @property
    def trained(self) -> bool:
        return self.checkpoint is not None

    @property
    def path(self) -> str:
        return os.path.join(checkpoints_dir(), self.checkpoint)

    def card(self) -> dict:
        """A trained model's card (read without loading its parameters); {} for the others."""
        return read_card(self.path) if self.trained else {}

    def scale(self, scale: float | None = None) -> float:
        """The guidance scale to run at: ``scale`` when given, else a trained model's card
        ``guidance_scale`` (the scale it was measured at), else 7.5 (the papers')."""
        if scale is not None:
            return float(scale)
        return float(self.card().get("guidance_scale", DEFAULT_SCALE))

    def amg_settings(self, amg: dict | None = None) -> dict:
        """AMG's settings: this model's, updated by ``amg`` (the user's)."""
        return {**dict(self.amg), **dict(amg or {})}

    def load(self, bed: tb.Testbed | None = None):
        """The shipped model (a ``zoo.LoadedModel``), checked to be trained on ``bed``."""
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"model {self.name!r}: no checkpoint directory {self.path} (train and export it "
                                    f"with `amg train --kind {self.checkpoint} --out {self.path}`, or set AMG_CHECKPOINTS)")
        lm = _load_checkpoint(self.path)
        if bed is not None and lm.bed.config != bed.config:
            a, b = dataclasses.asdict(lm.bed.config), dataclasses.asdict(bed.config)
            diff = sorted(k for k in a if a[k] != b[k])
            raise ValueError(f"model {self.name!r} was trained on another testbed than the bench's (differs in {diff}); "
                             "use the testbed it was trained on (--testbed auto)")
        return lm

    def denoiser(self, bed: tb.Testbed):
        return self.build(self, bed)

    def bank(self, bed: tb.Testbed):
        return self.make_bank(self, bed)

    def methods(self, methods) -> list:
        """The methods that apply: an unconditional model has no CFG, so it gets the unguided
        sampler and AMG (G_sim alone) in place of the guidance methods."""
        if self.conditioning != "uncond":
            return list(methods)
        return ["none"] + (["amg"] if "amg" in methods else [])

    def check_method(self, method: str, base: str, where: str) -> None:
        """ValueError when ``method`` / AMG's ``base`` needs a condition this model lacks."""
        if self.conditioning != "uncond":
            return
        if method not in ("none", "amg"):
            raise ValueError(f"{where}: method {method!r} needs a condition; model {self.name!r} is "
                             "unconditional (use --method none or amg)")
        if base != "none":
            raise ValueError(f"{where}: base {base!r} needs a condition; model {self.name!r} is unconditional "
                             "(AMG wraps the unguided sampler: --base none or auto)")

    def guidance(self, method: str, scale: float, bank, *, base: str | None = None, detector: str | None = None,
                 amg: dict | None = None, neighbour_conds=None, screen=None, screen_threshold: float | None = None):
        """The guidance of ``method`` at ``scale``; AMG wraps ``base`` (default the model's) with the
        pixel ``detector`` (default the model's) over ``bank`` and the model's AMG settings under
        ``amg``. ``neighbour_conds`` (None: the label id is the condition) is y_N per bank label.
        ``screen`` / ``screen_threshold``: a screen in front of AMG's bank search (or gating a basin
        method's switch; ``apps.screens.resolve_screen``)."""
        det = make_detector(detector or self.detector, bank) if method == "amg" else None
        return build_method(method, scale, base=base or self.base, detector=det, neighbour_conds=neighbour_conds,
                            amg=self.amg_settings(amg), screen=screen, screen_threshold=screen_threshold)


_MODELS: dict = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` to the registry under its name (a new model is one registration)."""
    if spec.name in _MODELS:
        raise ValueError(f"model {spec.name!r} is registered already")
    _MODELS[spec.name] = spec
    return spec


def _trained_denoiser(spec: ModelSpec, bed):
    return spec.load(bed).denoiser


def _trained_bank(spec: ModelSpec, bed):
    return spec.load(bed).bank            # labels = the model's condition ids


def _empirical(spec: ModelSpec, bed):
    return empirical_denoiser(bed.images, bed.labels, condition_names=bed.captions, name="empirical")


def _mixture(spec: ModelSpec, bed):
    small = bed.config.image_size <= 16
    return fit_mixture(bed, rank=6 if small else 12, renders_per_component=12 if small else 48, rng=0)


def _testbed_bank(spec: ModelSpec, bed):
    return calibrated_bank(bed)           # labels = caption ids


# AMG's settings per model (AMGConfig's defaults for the rest). The partial memorizer takes the
# library defaults (full gradient, data-scaled c3 = 0.25); the perfect one needs the cheap gradient
# and a large c3 (its x0_hat is locally constant, so the full gradient is ~0 inside a basin: the
# README's methods section, pitfalls); the trained UNets c3 = 1 (the "AMG" rows of the README's
# trained-model tables). Class and unconditional models have no prompt to despecify or deduplicate:
# dissimilarity alone, as the paper. Detectors: the distance gate ("nl2-bank") for the trained UNets
# (on them a copy of an image with close neighbours of its own has a larger nL2 than its distance
# implies and the nL2 gate stays shut: text model 8.5% copies with nL2, 1.3% with the distance
# gate, same FD), Carlini's nL2 for the closed-form models (their settings were measured with it).
_G_SIM_ONLY = (("despecify", False), ("dedup", False))
for _name, _cond, _amg in (("unet-text", "text", (("c3", 1.0),)), ("unet-class", "class", (("c3", 1.0),) + _G_SIM_ONLY),
                           ("unet-uncond", "uncond", (("c3", 1.0),) + _G_SIM_ONLY)):
    register_model(ModelSpec(name=_name, conditioning=_cond, base="none" if _cond == "uncond" else "cfg",
                             detector="nl2-bank", amg=_amg, build=_trained_denoiser, make_bank=_trained_bank,
                             checkpoint=_cond, testbed="unet", has_text_encoder=_cond == "text"))
register_model(ModelSpec(name="empirical", conditioning="text", base="cfg", detector="nl2",
                         amg=(("gradient", "cheap"), ("c3", 10000.0)), build=_empirical, make_bank=_testbed_bank))
register_model(ModelSpec(name="mixture", conditioning="text", base="cfg", detector="nl2", amg=(),
                         build=_mixture, make_bank=_testbed_bank))
MODELS = tuple(_MODELS)
TRAINED = {name: s.checkpoint for name, s in _MODELS.items() if s.trained}   # name -> checkpoint folder


def get_model(name: str) -> ModelSpec:
    """The testbed model ``name`` (``MODELS``)."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)}")
    return _MODELS[name]


def resolve_testbed(name: str, specs) -> str:
    """``"auto"`` -> the testbed of the models ``specs`` (ModelSpecs or names): ``unet`` when any
    runs there (a trained UNet), else ``default``; any other name is returned as it is."""
    if name != "auto":
        return name
    specs = [get_model(s) if isinstance(s, str) else s for s in specs]
    return "unet" if any(s.testbed == "unet" for s in specs) else "default"


def baseline_conditions(spec: ModelSpec, bed: tb.Testbed, bench, baseline: str, params: dict | None = None,
                        seed: int = 0):
    """The Somepalli et al. (2023) mitigation ``baseline`` ("gni" | "rt" | "cwr" | "rna") on the
    bench's prompts: ``(denoiser, cond)`` to sample in place of ``(spec.denoiser(bed), bench.cond)``.
    The text UNet is re-exposed on token conditions (``unet.token_denoiser``): rt / cwr / rna edit
    each sample's caption (words drawn from the model's vocabulary; a word it does not know, e.g. a
    number, becomes <unk>) and re-tokenize it, gni adds N(0, std^2) noise to its text embedding (on
    both CFG branches, as the reference: a ``WithNull`` condition, unless ``params`` say
    branches="cond"). Each sample gets its own stream (``apply_baseline``'s per-prompt streams),
    seeded by ``seed``. Only text models have a prompt to mitigate."""
    if baseline not in PROMPT_BASELINES:
        raise ValueError(f"unknown prompt baseline {baseline!r}; choose from {sorted(PROMPT_BASELINES)}")
    if not spec.has_text_encoder:
        raise ValueError(f"prompt baseline {baseline!r} needs a model with a text encoder (unet-text, or Stable "
                         f"Diffusion), not {spec.name!r}")
    lm = spec.load(bed)
    tok = CaptionTokenizer.from_dict(lm.card["tokenizer"])
    params = dict(params or {})
    captions = [bed.captions[int(c)] for c in bench.caption_ids]
    c = lm.model.config
    if baseline in EMBEDDING_BASELINES:
        tokens = np.asarray(lm.model.tokens)[np.asarray(bench.caption_ids)]
        zeros = jnp.zeros((len(captions), c.max_tokens, c.text_dim), jnp.float32)
        noise = apply_baseline(baseline, zeros, seed, null=zeros[0], **params)
    else:
        if baseline in ("rt", "cwr"):
            params.setdefault("vocab", list(tok.vocab))
        edited = apply_baseline(baseline, captions, seed, **params)
        with warnings.catch_warnings():          # edits can make captions longer than the model's tokens
            warnings.simplefilter("ignore")
            tokens = tok.encode(edited)
        noise = jnp.zeros((len(captions), c.max_tokens, c.text_dim), jnp.float32)
    den = token_denoiser(lm.model, lm.denoiser.params)
    cond = {"tokens": jnp.asarray(tokens, jnp.int32)}
    if isinstance(noise, WithNull):           # GNI on both CFG branches (the reference): the null caption gets its own
        null_tokens = np.broadcast_to(np.asarray(lm.model.null_tokens, np.int32), tokens.shape)
        return den, WithNull(cond=dict(cond, noise=noise.cond), null={"tokens": jnp.asarray(null_tokens),
                                                                      "noise": noise.null})
    return den, dict(cond, noise=jnp.asarray(noise, jnp.float32))


def caption_conditions(spec: ModelSpec, bed: tb.Testbed) -> dict:
    """Each training caption of a text model as a condition of its token denoiser
    (``unet.token_denoiser``): ``{"tokens": [C, L], "noise": zeros [C, L, D]}``, row c = caption c.
    AMG's ``neighbour_conds`` under a prompt baseline: y_N = the neighbour's caption, clean."""
    lm = spec.load(bed)
    c = lm.model.config
    tokens = jnp.asarray(lm.model.tokens, jnp.int32)
    return {"tokens": tokens, "noise": jnp.zeros(tokens.shape + (c.text_dim,), jnp.float32)}


# ----------------------------------------------------------------------------- Stable Diffusion

@dataclasses.dataclass(frozen=True)
class StableDiffusionSpec:
    """Stable Diffusion from a diffusers folder or hub id (``"sd:PATH_OR_HUB_ID"``): text
    conditioning, CFG as AMG's base, a latent detector (SSCD or CLIP through the VAE) and the
    papers' SD settings (``SD_AMG``)."""

    source: str
    conditioning: str = "text"
    base: str = "cfg"
    detector: str = "sscd"
    amg: tuple = tuple(SD_AMG.items())
    has_text_encoder: bool = True

    @property
    def name(self) -> str:
        return SD_PREFIX + self.source

    def scale(self, scale: float | None = None) -> float:
        return DEFAULT_SCALE if scale is None else float(scale)

    def amg_settings(self, amg: dict | None = None, *, dedup: bool = True) -> dict:
        """``SD_AMG`` updated by ``amg``; without y_N (``dedup=False``: the bank has no captions)
        caption deduplication is off (the bank's labels are no conditions)."""
        settings = {**dict(self.amg), **dict(amg or {})}
        if not dedup:
            settings["dedup"] = False
        return settings

    def load(self, dtype: str = "float32", attention: str = "auto"):
        return sdm.load_stable_diffusion(self.source, dtype=dtype, attention=attention)

    def guidance(self, method: str, scale: float, *, detector=None, neighbour_conds=None, base: str | None = None,
                 amg: dict | None = None, screen=None, screen_threshold: float | None = None):
        """The guidance of ``method`` at ``scale``; ``"amg"`` wraps ``base`` with ``detector``
        (``sd_amg.latent_detector``) and ``SD_AMG`` updated by ``amg``. ``neighbour_conds``: the bank
        captions' text embeddings [C, 77, D] (``sd_amg.bank_conditions``); without them G_dup is off.
        Without a detector AMG needs a ``screen``: it then gates despecification alone (no bank)."""
        if method == "amg" and detector is None and screen is None:
            raise ValueError("method 'amg' needs a detector (latent_detector: --detector sscd:PARAMS --bank BANK), "
                             "or a screen (--screen NAME --screen-threshold T) to gate despecification alone")
        settings = self.amg_settings(amg, dedup=neighbour_conds is not None)
        if method == "amg" and detector is None:   # the defaults' bank terms off; a user's own reach make_amg's error
            settings.update({k: False for k in ("dedup", "dissimilar") if k not in (amg or {})})
        return build_method(method, scale, base=base or self.base, detector=detector, neighbour_conds=neighbour_conds,
                            amg=settings, screen=screen, screen_threshold=screen_threshold)


def is_sd(name: str) -> bool:
    """Whether ``name`` names Stable Diffusion (``"sd:PATH_OR_HUB_ID"``)."""
    return isinstance(name, str) and name.startswith(SD_PREFIX) and len(name) > len(SD_PREFIX)


def sd_source(name: str) -> str:
    """The folder or hub id of ``"sd:SOURCE"`` (a bare path is returned as it is)."""
    return name[len(SD_PREFIX):] if name.startswith(SD_PREFIX) else name


def model_spec(name: str):
    """The spec of model ``name``: a testbed model (``MODELS``) or ``"sd:PATH_OR_HUB_ID"``."""
    if is_sd(name):
        return StableDiffusionSpec(sd_source(name))
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {list(MODELS)} or 'sd:PATH'")
    return _MODELS[name]


__all__ = ["DEFAULT_SCALE", "DETECTORS", "EVALNET", "MODELS", "ModelSpec", "SD_PREFIX", "SMALL_TESTBED",
           "StableDiffusionSpec", "TESTBEDS", "TRAINED", "UNET_TESTBED", "baseline_conditions", "bench_evaluator",
           "build_testbed", "calibrated_bank", "caption_conditions", "checkpoints_dir", "get_model", "is_sd",
           "make_detector", "model_spec", "register_model", "resolve_testbed", "sd_source", "testbed_config"]
