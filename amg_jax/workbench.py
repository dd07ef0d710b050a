"""The testbed bench shared by `amg demo` and `amg eval`: models, prompts, seeds, references, metrics.

A ``Bench`` fixes everything a comparison must hold equal across methods: the prompts
(``prompts_per_kind`` of each kind), the seeds (the same keys for every method), the fresh
true renders FD is measured against, the calibrated copy threshold and the alignment
classifier. ``measure`` turns samples into the per-kind metrics both commands report.
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax import metrics
from amg_jax.data import testbed as tb
from amg_jax.guidance import make_guidance
from amg_jax.models.base import WithNull
from amg_jax.samplers import keys_from_seeds

# The trained testbed UNets shipped in checkpoints/ (``amg_jax.models.zoo``) and their kinds.
TRAINED = {"unet-text": "text", "unet-class": "class", "unet-uncond": "uncond"}
MODELS = tuple(TRAINED) + ("empirical", "mixture")
TESTBEDS = ("default", "small", "unet")

# A 16x16 testbed with 12 captions: a quick look (and the test suite's runs).
SMALL_TESTBED = dict(seed=1, image_size=16, shapes=("circle", "cross"), colours=("red", "blue"),
                     backgrounds=("black", "gray"), textures=("plain", "striped"), n_specific=6,
                     n_duplicated=2, duplicate_count=6, n_generic=2, generic_images=8)

# The trained UNets' testbed: the default captions and images at 16x16 (a 2-core CPU trains a
# UNet there to memorization in minutes; at 32x32 a 16-channel UNet was still blurry after
# 2500 steps / 27 minutes).
UNET_TESTBED = dict(image_size=16)
_TESTBED_CONFIGS = {"default": {}, "small": SMALL_TESTBED, "unet": UNET_TESTBED}


def testbed_config(name: str) -> tb.TestbedConfig:
    """The config of a named testbed (``TESTBEDS``)."""
    if name not in _TESTBED_CONFIGS:
        raise ValueError(f"unknown testbed {name!r}; choose one of {list(TESTBEDS)}")
    return tb.TestbedConfig(**_TESTBED_CONFIGS[name])


def resolve_testbed(name: str, models) -> str:
    """``"auto"`` -> the testbed of the bench's models: ``unet`` when any is a trained UNet, else
    ``default``; any other name is returned as it is."""
    if name != "auto":
        return name
    return "unet" if any(m in TRAINED for m in models) else "default"


def build_testbed(name: str) -> tb.Testbed:
    """The bench's testbed: ``default`` (32x32, 62 captions), ``small`` (16x16, 12 captions) or
    ``unet`` (the default captions at 16x16: the trained UNets' testbed)."""
    return tb.make_testbed(testbed_config(name))


def checkpoints_dir() -> str:
    """Where the trained models live: ``$AMG_CHECKPOINTS``, else the repository's ``checkpoints/``."""
    return os.path.abspath(os.environ.get("AMG_CHECKPOINTS") or os.path.join(     # cwd-independent (and cache keys)
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints"))


def model_kind(name: str) -> str:
    """The conditioning of a bench model: "text" (caption ids), "class" (the shape) or "uncond"."""
    return TRAINED.get(name, "text")


@functools.lru_cache(maxsize=4)
def _load_trained(path: str):
    from amg_jax.models.zoo import load_model

    return load_model(path)


def load_trained(name: str, bed: tb.Testbed | None = None):
    """The shipped model ``name`` (a ``zoo.LoadedModel``), checked to be trained on ``bed``."""
    path = os.path.join(checkpoints_dir(), TRAINED[name])
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model {name!r}: no checkpoint directory {path} (train and export it with "
                                f"`amg train --kind {TRAINED[name]} --out {path}`, or set AMG_CHECKPOINTS)")
    lm = _load_trained(path)
    if bed is not None and lm.bed.config != bed.config:
        import dataclasses

        a, b = dataclasses.asdict(lm.bed.config), dataclasses.asdict(bed.config)
        diff = sorted(k for k in a if a[k] != b[k])
        raise ValueError(f"model {name!r} was trained on another testbed than the bench's (differs in {diff}); "
                         "use the testbed it was trained on (--testbed auto)")
    return lm


def build_model(name: str, bed: tb.Testbed):
    """The denoiser of a bench model on ``bed``: a trained UNet of ``TRAINED`` (loaded from
    ``checkpoints_dir()``), or the ``empirical`` (perfect) / ``mixture`` (partial) memorizer."""
    if name in TRAINED:
        return load_trained(name, bed).denoiser
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


EVALNET = "evalnet"


def bench_evaluator(bed: tb.Testbed):
    """The shipped evaluation network (``checkpoints/evalnet``) when it was trained on ``bed``'s
    testbed config, else None (the bench then measures FD on pooled pixels and alignment with
    the nearest-mean attribute classifier)."""
    path = os.path.join(checkpoints_dir(), EVALNET)
    if not os.path.isdir(path):
        return None
    ev = _load_evaluator(path)
    return ev if ev.config == bed.config else None


@functools.lru_cache(maxsize=4)
def _load_evaluator(path: str):
    from amg_jax.models.evalnet import load_evaluator

    return load_evaluator(path)


DEFAULT_SCALE = 7.5


def model_scale(name: str, scale: float | None = None) -> float:
    """The guidance scale to run model ``name`` at: ``scale`` when given, else a trained model's
    card ``guidance_scale`` (the scale it was measured at), else 7.5 (the papers')."""
    if scale is not None:
        return float(scale)
    if name in TRAINED:
        return float(load_trained(name).card.get("guidance_scale", DEFAULT_SCALE))
    return DEFAULT_SCALE


# AMG's settings per model, under the user's (AMGConfig's defaults for the rest). The partial
# memorizer takes the library defaults (full gradient, data-scaled c3 = 0.25); the perfect one needs
# the cheap gradient and a large c3 (METHODS.md pitfall 5: its x0_hat is locally constant, so the
# full gradient is ~0 inside a basin); the trained UNets c3 = 1 (the "AMG" rows of the README's
# trained-model tables). Class and unconditional models have no prompt to despecify or deduplicate:
# dissimilarity alone, as the paper. Measured: README, "AMG on the testbed".
MODEL_AMG = {"empirical": {"gradient": "cheap", "c3": 10000.0}, "mixture": {},
             "unet-text": {"c3": 1.0},
             "unet-class": {"c3": 1.0, "despecify": False, "dedup": False},
             "unet-uncond": {"c3": 1.0, "despecify": False, "dedup": False}}


def model_amg(name: str, amg: dict | None = None) -> dict:
    """AMG's settings for model ``name``: ``MODEL_AMG[name]`` updated by ``amg`` (the user's)."""
    return {**MODEL_AMG.get(name, {}), **dict(amg or {})}


def model_base(name: str) -> str:
    """The guidance AMG wraps for model ``name``: CFG, or the unguided sampler for an
    unconditional model (it has no condition to guide towards)."""
    return "none" if model_kind(name) == "uncond" else "cfg"


def model_detector(name: str) -> str:
    """AMG's pixel detector for model ``name``: the distance gate ("nl2-bank") for the trained
    UNets, Carlini's nL2 ("nl2") for the closed-form models. Measured (README, "AMG and the
    basin methods on the trained models"): on the trained UNets a copy of an image with close
    neighbours of its own has a larger nL2 than its distance implies and the nL2 gate stays shut
    (text model: 8.5% copies with nL2, 1.3% with the distance gate, same FD); the closed-form
    models' settings were measured with nL2."""
    return "nl2-bank" if name in TRAINED else "nl2"


def baseline_conditions(name: str, bed: tb.Testbed, bench, baseline: str, params: dict | None = None,
                        seed: int = 0):
    """The Somepalli et al. (2023) mitigation ``baseline`` ("gni" | "rt" | "cwr" | "rna") on the
    bench's prompts for model ``name``: ``(denoiser, cond)`` to sample in place of
    ``(build_model(name, bed), bench.cond)``. The text UNet is re-exposed on token conditions
    (``unet.token_denoiser``): rt / cwr / rna edit each sample's caption (words drawn from the
    model's vocabulary; a word it does not know, e.g. a number, becomes <unk>) and re-tokenize
    it, gni adds N(0, std^2) noise to its text embedding (on both CFG branches, as the reference:
    a ``WithNull`` condition, unless ``params`` say branches="cond"). Each sample gets its own stream
    (``apply_baseline``'s per-prompt streams), seeded by ``seed``. Only text models have a
    prompt to mitigate."""
    from amg_jax.models.text import CaptionTokenizer
    from amg_jax.models.unet import token_denoiser
    from amg_jax.prompt_baselines import EMBEDDING_BASELINES, PROMPT_BASELINES, apply_baseline

    if baseline not in PROMPT_BASELINES:
        raise ValueError(f"unknown prompt baseline {baseline!r}; choose from {sorted(PROMPT_BASELINES)}")
    if name not in TRAINED or model_kind(name) != "text":
        raise ValueError(f"prompt baseline {baseline!r} needs a model with a text encoder (unet-text, or Stable "
                         f"Diffusion), not {name!r}")
    lm = load_trained(name, bed)
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


def caption_conditions(name: str, bed: tb.Testbed) -> dict:
    """Each training caption of text model ``name`` as a condition of its token denoiser
    (``unet.token_denoiser``): ``{"tokens": [C, L], "noise": zeros [C, L, D]}``, row c = caption c.
    AMG's ``neighbour_conds`` under a prompt baseline: y_N = the neighbour's caption, clean."""
    lm = load_trained(name, bed)
    c = lm.model.config
    tokens = jnp.asarray(lm.model.tokens, jnp.int32)
    return {"tokens": tokens, "noise": jnp.zeros(tokens.shape + (c.text_dim,), jnp.float32)}


def model_bank(name: str, bed: tb.Testbed):
    """The reference bank AMG searches for bench model ``name``: a trained model's own (labels =
    its condition ids), else the testbed's calibrated pixel bank (labels = caption ids)."""
    return load_trained(name, bed).bank if name in TRAINED else _calibrated_bank(bed)


def method_guidance(name: str, scale: float, *, bed: tb.Testbed | None = None, base: str = "cfg",
                    detector: str = "nl2", amg: dict | None = None, bank=None, neighbour_conds=None):
    """The guidance of a method name at guidance scale ``scale`` (papers' defaults otherwise;
    OG+DTP's early scale is -scale, as the reference code does). ``"amg"`` wraps the ``base``
    method with a pixel ``detector`` over ``bank`` (default: ``bed``'s calibrated bank of its
    training images) and ``amg`` settings; ``neighbour_conds`` (None: the label id is the
    condition) is y_N per bank label for a denoiser on other conditions (``caption_conditions``)."""
    if name == "amg":
        from amg_jax.guidance.amg import make_amg
        from amg_jax.similarity.pixel import pixel_detector

        if bank is None and bed is None:
            raise ValueError("method 'amg' needs the testbed (or the bank) its detector searches")
        kind, _, norm = detector.partition("-")          # "nl2", "cosine", "nl2-bank"
        det = pixel_detector(_calibrated_bank(bed) if bank is None else bank, kind=kind,
                             **({"normalize": norm} if norm else {}))
        return make_amg(method_guidance(base, scale), det, neighbour_conds=neighbour_conds, **(amg or {}))
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


def measure(x: np.ndarray, constraints: np.ndarray, kinds: np.ndarray, bed: tb.Testbed, threshold: float,
            classifier, reference: np.ndarray, *, evaluator=None, align: bool = True) -> dict:
    """Per-kind (and "all") metrics of samples x [B, H, W, 3] asked to show ``constraints`` [B, 6]
    (-1 = unnamed), grouped by ``kinds`` [B]; ``reference`` [B', H, W, 3] fresh true renders of
    the same prompts, in the same kind order. FD is the evaluation network's (``evaluator``)
    when given, else pooled pixels'; ``align=False`` (nothing asked) reports alignment as NaN."""
    pool = max(1, bed.config.image_size // 8)
    ref_kinds = np.repeat(kinds, len(reference) // len(x))
    judge = evaluator if evaluator is not None else classifier
    ok = judge.consistent(x, constraints) if align else np.full(len(x), np.nan)
    feats = ref_feats = None
    if evaluator is not None:
        feats, ref_feats = evaluator.features(x), evaluator.features(reference)
    out = {}
    for kind in list(dict.fromkeys(kinds.tolist())) + ["all"]:
        sel = np.ones(len(x), bool) if kind == "all" else kinds == kind
        rsel = np.ones(len(reference), bool) if kind == "all" else ref_kinds == kind
        r = metrics.memorization_report(x[sel], bed.images, threshold=threshold)
        r["alignment"] = float(np.mean(ok[sel]))
        if sel.sum() < 2:
            r["fd"] = float("nan")
        elif feats is not None:
            r["fd"] = metrics.frechet_distance(feats[sel], ref_feats[rsel])
        else:
            r["fd"] = metrics.pixel_frechet(x[sel], reference[rsel], pool=pool)
        out[kind] = r
    return out


def sample_in_chunks(denoiser, guidance, sampler, keys, cond, chunk: int | None = None, *, sharded: bool = False):
    """``samplers.sample`` over ``keys`` [B] in chunks of ``chunk`` seeds (the last one padded and
    cut), concatenated: the same samples (each seed is independent), but AMG's batch-level gate
    skips its gradient for a chunk whose samples are all far from the training set, where one
    batch of B would pay for it at almost every step. One compilation for all chunks.
    ``sharded``: each chunk's seeds are split over all devices (``sharding.sample_sharded``)."""
    from amg_jax.samplers import SampleResult
    from amg_jax.samplers import sample as _sample

    if sharded:
        from amg_jax.sharding import sample_sharded as sample
    else:
        sample = _sample
    b = int(keys.shape[0])
    if not chunk or chunk >= b:
        return sample(denoiser, guidance, sampler, keys, cond)
    parts = []
    for lo in range(0, b, chunk):
        idx = np.minimum(np.arange(lo, lo + chunk), b - 1)          # pad the last chunk with its last seed
        c = None if cond is None else jax.tree.map(lambda a: a[idx], cond)
        r = sample(denoiser, guidance, sampler, keys[idx], c)
        n = min(chunk, b - lo)
        parts.append(jax.tree.map(lambda a: np.asarray(a)[:n], (r.x0, r.trace, r.first_pass_trace)))
    cat = lambda *xs: np.concatenate(xs, axis=0)  # noqa: E731
    x0 = cat(*[p[0] for p in parts])
    trace = jax.tree.map(cat, *[p[1] for p in parts])
    first = None if parts[0][2] is None else jax.tree.map(cat, *[p[2] for p in parts])
    return SampleResult(x0, trace, first)


def check_run_fields(config, fail) -> None:
    """Validate the fields a demo / eval config shares (testbed, sampler, prompts_per_kind,
    samples_per_prompt, steps, scale); ``fail(field, message)`` raises."""
    from amg_jax.samplers import SAMPLERS

    for field, allowed in (("testbed", TESTBEDS + ("auto",)), ("sampler", SAMPLERS)):
        if getattr(config, field) not in allowed:
            fail(field, f"must be one of {list(allowed)}, got {getattr(config, field)!r}")
    for field in ("prompts_per_kind", "samples_per_prompt", "steps"):
        v = getattr(config, field)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            fail(field, f"must be an integer >= 1, got {v!r}")
    if config.scale is not None and not np.isfinite(config.scale):
        fail("scale", f"must be a finite number (or None: the model's default), got {config.scale!r}")


class Bench(NamedTuple):
    """Prompts, seeds and references of one comparison (``prepare_bench``); arrays are [B] unless noted.

    A prompt is a caption id (text models), a class id (the shape; class models) or -1 (the
    unconditional models' pseudo-prompts, each a group of seeds)."""

    bed: tb.Testbed
    threshold: float                  # calibrated copy distance
    classifier: tb.AttributeClassifier
    prompts: dict                     # {kind: prompt ids}
    caption_ids: np.ndarray           # [B] prompt-major: samples_per_prompt per prompt (the prompt ids)
    kinds: np.ndarray                 # [B] the kind of each sample's prompt
    keys: jax.Array                   # [B] PRNG keys (the same for every method)
    cond: jax.Array                   # [B] int32 condition ids (-1 = null: unconditional models)
    reference: np.ndarray             # [4B, H, W, 3] fresh true renders of the same prompts (FD)
    truth: np.ndarray                 # [B, H, W, 3] other fresh true renders: the "true renders" row
    samples_per_prompt: int
    constraints: np.ndarray | None = None   # [B, 6] what each sample is asked to show (-1 = unnamed)
    conditioning: str = "text"        # "text" | "class" | "uncond"
    examples: np.ndarray | None = None      # [P, H, W, 3] a training image per prompt (grids)
    evaluator: object = None          # the evaluation network (FD features, alignment), if any

    @property
    def kinds_order(self) -> list:
        return list(self.prompts)

    @property
    def prompt_ids(self) -> np.ndarray:
        return np.concatenate([self.prompts[k] for k in self.prompts])

    def measure(self, x: np.ndarray) -> dict:
        """Per-kind metrics of samples x [B, H, W, 3] drawn for this bench's prompts."""
        return measure(x, self.constraints, self.kinds, self.bed, self.threshold, self.classifier, self.reference,
                       evaluator=self.evaluator, align=self.conditioning != "uncond")


def _renders_of(bed: tb.Testbed, pool: np.ndarray, n: int, rng) -> np.ndarray:
    """n fresh renders of the attribute combinations of training images drawn from ``pool`` (indices)."""
    return tb.render(bed.config, bed.attributes[rng.choice(pool, size=n)], rng)


def prepare_bench(bed: tb.Testbed, prompts_per_kind: int, samples_per_prompt: int, seed: int,
                  kinds=tb.KINDS, *, conditioning: str = "text", evaluator=None) -> Bench:
    """Choose the prompts, the seeds and the references; calibrate the copy threshold.

    ``conditioning="text"``: ``prompts_per_kind`` captions of each of ``kinds``, references are
    fresh renders of the same captions. ``"class"``: every class (the shape attribute) is a prompt
    of its own kind (its name); ``"uncond"``: ``prompts_per_kind * len(kinds)`` pseudo-prompts of
    kind "uncond". For both, references are fresh renders of the training images' attribute
    combinations (of that class): the distribution the model was trained on."""
    if conditioning not in ("text", "class", "uncond"):
        raise ValueError(f"conditioning must be 'text', 'class' or 'uncond', got {conditioning!r}")
    threshold = tb.calibrate_copy_threshold(bed, rng=seed)
    classifier = tb.attribute_classifier(bed, rng=seed)
    s = int(samples_per_prompt)
    rng = np.random.default_rng(seed + 1)
    a_shape = tb.ATTRIBUTES.index("shape")
    if conditioning == "text":
        prompts = {k: v for k, v in choose_prompts(bed, prompts_per_kind, seed).items() if k in kinds}
        if not prompts:
            raise ValueError(f"the testbed has no prompts of kinds {list(kinds)}")
        prompt_ids = np.concatenate([prompts[k] for k in prompts])
        prompt_kinds = np.concatenate([[k] * len(prompts[k]) for k in prompts])
        reference = np.concatenate([tb.fresh_renders(bed, c, 4 * s, rng) for c in prompt_ids])
        truth = np.concatenate([tb.fresh_renders(bed, c, s, rng) for c in prompt_ids])
        constraints = bed.constraints[np.repeat(prompt_ids, s)]
        examples = np.stack([bed.images[np.flatnonzero(bed.labels == c)[0]] for c in prompt_ids])
        cond = jnp.asarray(np.repeat(prompt_ids, s), jnp.int32)
    elif conditioning == "class":
        names = bed.config.vocabulary("shape")
        prompt_ids = np.arange(len(names), dtype=np.int32)
        prompts = {names[c]: prompt_ids[c:c + 1] for c in prompt_ids}
        prompt_kinds = np.asarray(names)
        pools = [np.flatnonzero(bed.attributes[:, a_shape] == c) for c in prompt_ids]
        reference = np.concatenate([_renders_of(bed, p, 4 * s, rng) for p in pools])
        truth = np.concatenate([_renders_of(bed, p, s, rng) for p in pools])
        constraints = np.full((len(prompt_ids) * s, len(tb.ATTRIBUTES)), -1, np.int64)
        constraints[:, a_shape] = np.repeat(prompt_ids, s)
        examples = np.stack([bed.images[p[0]] for p in pools])
        cond = jnp.asarray(np.repeat(prompt_ids, s), jnp.int32)
    else:
        n = int(prompts_per_kind) * len(tuple(kinds))
        prompt_ids = np.full(n, -1, np.int32)
        prompts = {"uncond": prompt_ids}
        prompt_kinds = np.asarray(["uncond"] * n)
        everything = np.arange(len(bed.images))
        reference = _renders_of(bed, everything, 4 * s * n, rng)
        truth = _renders_of(bed, everything, s * n, rng)
        constraints = np.full((n * s, len(tb.ATTRIBUTES)), -1, np.int64)
        examples = bed.images[np.random.default_rng(seed).choice(bed.unique_index, size=n, replace=False)]
        cond = jnp.full((n * s,), -1, jnp.int32)          # the null condition (an unconditional model ignores it)
    caption_ids = np.repeat(prompt_ids, s)
    return Bench(bed=bed, threshold=threshold, classifier=classifier, prompts=prompts, caption_ids=caption_ids,
                 kinds=np.repeat(prompt_kinds, s),
                 keys=keys_from_seeds(seed * 1_000_003 + np.arange(len(caption_ids))),
                 cond=cond, reference=reference, truth=truth, samples_per_prompt=s,
                 constraints=constraints, conditioning=conditioning, examples=examples, evaluator=evaluator)


__all__ = ["Bench", "check_run_fields", "MODELS", "SMALL_TESTBED", "TESTBEDS", "TRAINED", "build_model",
           "bench_evaluator", "build_testbed", "checkpoints_dir", "resolve_testbed", "testbed_config", "UNET_TESTBED", "choose_prompts", "load_trained", "measure", "method_guidance",
           "MODEL_AMG", "baseline_conditions", "caption_conditions", "model_amg", "model_bank", "model_base", "model_detector", "model_kind", "model_scale", "sample_in_chunks", "prepare_bench"]
