"""The testbed's comparison protocol: prompts, seeds, references and the per-kind metrics.

A ``Bench`` fixes everything a comparison must hold equal across methods: the prompts
(``prompts_per_kind`` of each kind), the seeds (the same keys for every method), the fresh
true renders FD is measured against, the calibrated copy threshold and the alignment
classifier. ``measure`` turns samples into the per-kind metrics every command reports.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.evaluation import metrics
from amg_jax.data import testbed as tb
from amg_jax.samplers import keys_from_seeds


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


__all__ = ["Bench", "choose_prompts", "measure", "prepare_bench"]
