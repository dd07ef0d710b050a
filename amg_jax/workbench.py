"""The testbed bench shared by `amg demo` and `amg eval`: models, prompts, seeds, references, metrics.

A ``Bench`` fixes everything a comparison must hold equal across methods: the prompts
(``prompts_per_kind`` of each kind), the seeds (the same keys for every method), the fresh
true renders FD is measured against, the calibrated copy threshold and the alignment
classifier. ``measure`` turns samples into the per-kind metrics both commands report.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax import metrics
from amg_jax.data import testbed as tb
from amg_jax.guidance import make_guidance
from amg_jax.samplers import keys_from_seeds

MODELS = ("empirical", "mixture")
TESTBEDS = ("default", "small")

# A 16x16 testbed with 12 captions: a quick look (and the test suite's runs).
SMALL_TESTBED = dict(seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"),
                     backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=6,
                     n_duplicated=2, duplicate_count=6, n_generic=2, generic_images=8)

def build_testbed(name: str) -> tb.Testbed:
    """The bench's testbed: ``default`` (32x32, 62 captions) or ``small`` (16x16, 12 captions)."""
    return tb.make_testbed() if name == "default" else tb.make_testbed(tb.TestbedConfig(**SMALL_TESTBED))


def build_model(name: str, bed: tb.Testbed):
    """The ``empirical`` (perfect) or ``mixture`` (partial) memorizer of ``bed``."""
    if name == "empirical":
        from amg_jax.models.empirical import empirical_denoiser

        return empirical_denoiser(bed.images, bed.labels, condition_names=bed.captions, name="empirical")
    from amg_jax.models.mixture import fit_mixture

    small = bed.config.image_size <= 16
    return fit_mixture(bed, rank=6 if small else 12, renders_per_component=12 if small else 48, rng=0)


_BANKS: dict = {}


def _calibrated_bank(bed: tb.Testbed):
    """The testbed's pixel bank with its calibrated copy threshold (cached per testbed)."""
    from amg_jax.index import bank_from_testbed

    key = id(bed)
    if key not in _BANKS or _BANKS[key][0] is not bed:
        _BANKS[key] = (bed, bank_from_testbed(bed, calibrate=True, rng=0))
    return _BANKS[key][1]


def method_guidance(name: str, scale: float, *, bed: tb.Testbed | None = None, base: str = "cfg",
                    detector: str = "nl2", amg: dict | None = None):
    """The guidance of a method name at guidance scale ``scale`` (papers' defaults otherwise;
    OG+DTP's early scale is -scale, as the reference code does). ``"amg"`` wraps the ``base``
    method with a pixel ``detector`` over ``bed``'s training images and ``amg`` settings."""
    if name == "amg":
        from amg_jax.guidance.amg import make_amg
        from amg_jax.similarity.pixel import pixel_detector

        if bed is None:
            raise ValueError("method 'amg' needs the testbed its detector searches")
        det = pixel_detector(_calibrated_bank(bed), kind=detector)
        return make_amg(method_guidance(base, scale), det, **(amg or {}))
    if name == "none":
        return make_guidance("none")
    if name == "og_dtp":
        return make_guidance("og_dtp", scale=scale, early_scale=-scale)
    return make_guidance(name, scale=scale)


def choose_prompts(bed: tb.Testbed, per_kind: int, seed: int) -> dict:
    """{kind: caption ids [<= per_kind]} drawn without replacement."""
    rng = np.random.default_rng(seed)
    out = {}
    for kind, ids in tb.prompts_by_kind(bed).items():
        if len(ids):
            out[kind] = np.sort(rng.choice(ids, size=min(per_kind, len(ids)), replace=False)).astype(np.int32)
    return out


def measure(x: np.ndarray, caption_ids: np.ndarray, kinds: np.ndarray, bed: tb.Testbed, threshold: float,
            classifier: tb.AttributeClassifier, reference: np.ndarray) -> dict:
    """Per-kind (and "all") metrics of samples x [B, H, W, 3] for captions [B] of kinds [B];
    ``reference`` [B', H, W, 3] fresh renders of the same captions, in the same kind order."""
    pool = max(1, bed.config.image_size // 8)
    ref_kinds = np.repeat(kinds, len(reference) // len(x))
    align = classifier.alignment(x, bed, caption_ids)
    out = {}
    for kind in list(dict.fromkeys(kinds.tolist())) + ["all"]:
        sel = np.ones(len(x), bool) if kind == "all" else kinds == kind
        rsel = np.ones(len(reference), bool) if kind == "all" else ref_kinds == kind
        r = metrics.memorization_report(x[sel], bed.images, threshold=threshold)
        r["alignment"] = float(np.mean(align[sel]))
        r["fd"] = metrics.pixel_frechet(x[sel], reference[rsel], pool=pool) if sel.sum() >= 2 else float("nan")
        out[kind] = r
    return out



def check_run_fields(config, fail) -> None:
    """Validate the fields a demo / eval config shares (testbed, sampler, prompts_per_kind,
    samples_per_prompt, steps, scale); ``fail(field, message)`` raises."""
    from amg_jax.samplers import SAMPLERS

    for field, allowed in (("testbed", TESTBEDS), ("sampler", SAMPLERS)):
        if getattr(config, field) not in allowed:
            fail(field, f"must be one of {list(allowed)}, got {getattr(config, field)!r}")
    for field in ("prompts_per_kind", "samples_per_prompt", "steps"):
        v = getattr(config, field)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            fail(field, f"must be an integer >= 1, got {v!r}")
    if not np.isfinite(config.scale):
        fail("scale", f"must be a finite number, got {config.scale!r}")


class Bench(NamedTuple):
    """Prompts, seeds and references of one comparison (``prepare_bench``); arrays are [B] unless noted."""

    bed: tb.Testbed
    threshold: float                  # calibrated copy distance
    classifier: tb.AttributeClassifier
    prompts: dict                     # {kind: caption ids}
    caption_ids: np.ndarray           # [B] prompt-major: samples_per_prompt per prompt
    kinds: np.ndarray                 # [B] the kind of each sample's prompt
    keys: jax.Array                   # [B] PRNG keys (the same for every method)
    cond: jax.Array                   # [B] int32 caption ids
    reference: np.ndarray             # [4B, H, W, 3] fresh true renders of the same prompts (FD)
    truth: np.ndarray                 # [B, H, W, 3] other fresh true renders: the "true renders" row
    samples_per_prompt: int

    @property
    def kinds_order(self) -> list:
        return list(self.prompts)

    @property
    def prompt_ids(self) -> np.ndarray:
        return np.concatenate([self.prompts[k] for k in self.prompts])

    def measure(self, x: np.ndarray) -> dict:
        """Per-kind metrics of samples x [B, H, W, 3] drawn for this bench's prompts."""
        return measure(x, self.caption_ids, self.kinds, self.bed, self.threshold, self.classifier, self.reference)


def prepare_bench(bed: tb.Testbed, prompts_per_kind: int, samples_per_prompt: int, seed: int,
                  kinds=tb.KINDS) -> Bench:
    """Choose the prompts of ``kinds``, the seeds and the references; calibrate the copy threshold."""
    threshold = tb.calibrate_copy_threshold(bed, rng=seed)
    classifier = tb.attribute_classifier(bed, rng=seed)
    prompts = {k: v for k, v in choose_prompts(bed, prompts_per_kind, seed).items() if k in kinds}
    if not prompts:
        raise ValueError(f"the testbed has no prompts of kinds {list(kinds)}")
    prompt_ids = np.concatenate([prompts[k] for k in prompts])
    prompt_kinds = np.concatenate([[k] * len(prompts[k]) for k in prompts])
    s = int(samples_per_prompt)
    caption_ids = np.repeat(prompt_ids, s)
    rng = np.random.default_rng(seed + 1)
    reference = np.concatenate([tb.fresh_renders(bed, c, 4 * s, rng) for c in prompt_ids])
    truth = np.concatenate([tb.fresh_renders(bed, c, s, rng) for c in prompt_ids])
    return Bench(bed=bed, threshold=threshold, classifier=classifier, prompts=prompts, caption_ids=caption_ids,
                 kinds=np.repeat(prompt_kinds, s),
                 keys=keys_from_seeds(seed * 1_000_003 + np.arange(len(caption_ids))),
                 cond=jnp.asarray(caption_ids, jnp.int32), reference=reference, truth=truth,
                 samples_per_prompt=s)


__all__ = ["Bench", "check_run_fields", "MODELS", "SMALL_TESTBED", "TESTBEDS", "build_model", "build_testbed", "choose_prompts",
           "measure", "method_guidance", "prepare_bench"]
