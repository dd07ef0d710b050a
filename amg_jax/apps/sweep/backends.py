"""Model backends: ``bench_record() -> dict`` and ``run_cell(cell, settings) -> CellRun``;
``TestbedBackend`` for the testbed's models, ``StableDiffusionBackend`` for "sd:PATH_OR_HUB_ID".
Both sample through ``runs.run_method`` and build guidances through the model's spec."""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from amg_jax import images as img
from amg_jax.apps.models import (StableDiffusionSpec, baseline_conditions, bench_evaluator, build_testbed,
                                 caption_conditions, get_model, is_sd, resolve_testbed)
from amg_jax.apps.runs import for_metrics, run_method
from amg_jax.apps.sweep.config import BENCH_FORMAT, CI_BOOT, SSCD_STRICT, SSCD_THRESHOLD, Cell, SweepConfig
from amg_jax.apps.sweep.settings import _jsonable, bench_settings, screen_of
from amg_jax.evaluation.protocol import prepare_bench
from amg_jax.index import load_bank
from amg_jax.index_build import has_captions, list_images, load_captions, load_image, nearest_in_bank, sharded_embedder
from amg_jax.evaluation.metrics import frechet_distance, similarity_report
from amg_jax.evaluation.prompt_stats import aggregate_cis
from amg_jax.models import stable_diffusion as sdm
from amg_jax.sd_amg import bank_conditions, latent_decoder, latent_detector
from amg_jax.prompt_baselines import EMBEDDING_BASELINES, apply_baseline, gni_rows
from amg_jax.samplers import SamplerConfig, keys_from_seeds
from amg_jax.sharding import make_mesh
from amg_jax.evaluation import inception
from amg_jax.similarity import clip, sscd
from amg_jax.similarity.clip import clip_score
from amg_jax.evaluation.inception import compute_features, span_projection


class CellRun(NamedTuple):
    """What a backend returns for one cell: ``metrics`` {kind: {...}} (and "all"), ``samples``
    [B, H, W, C], ``kinds`` / ``caption_ids`` [B], ``trace`` {name: [B, N]} (may be empty)."""

    metrics: dict
    samples: np.ndarray
    kinds: np.ndarray
    caption_ids: np.ndarray
    trace: dict
    seconds: float


class TestbedBackend:
    """The testbed's models (trained UNets, empirical, mixture) on the sweep's bench; the model,
    bank and bench are built on first use (a sweep whose cells are all done builds nothing)."""

    def __init__(self, config: SweepConfig, *, echo=print):
        self.config, self.echo = config, echo
        self._ready = False

    def _setup(self):
        if self._ready:
            return
        c = self.config
        self.spec = get_model(c.model)
        self.bed = build_testbed(resolve_testbed(c.testbed, [self.spec]))
        self.denoiser = self.spec.denoiser(self.bed)
        self.bank = self.spec.bank(self.bed)
        self.bench = prepare_bench(self.bed, c.prompts_per_kind, c.samples_per_prompt, c.seed, c.kinds,
                                   conditioning=self.spec.conditioning, evaluator=bench_evaluator(self.bed))
        self._ready = True

    def bench_record(self) -> dict:
        """The bench's prompts, copy threshold, FD features and "true renders" metrics."""
        self._setup()
        b = self.bench
        truth = b.measure(b.truth)
        for kind, r in truth.items():
            r["count"] = int(len(b.kinds) if kind == "all" else np.sum(b.kinds == kind))
        return _jsonable({"format": BENCH_FORMAT, "settings": bench_settings(self.config), "threshold": b.threshold,
                          "fd_features": "evalnet" if b.evaluator is not None else "pooled pixels",
                          "image_size": self.bed.config.image_size, "conditioning": b.conditioning,
                          "prompts": {k: [int(i) for i in v] for k, v in b.prompts.items()}, "truth": truth})

    def _conditions(self, cell: Cell):
        """(denoiser, cond [B]) of a cell: the model's, or a prompt baseline's."""
        if cell.baseline is None:
            return self.denoiser, self.bench.cond
        return baseline_conditions(self.spec, self.bed, self.bench, cell.baseline, dict(cell.baseline_params),
                                   self.config.seed)

    def run_cell(self, cell: Cell, settings: dict) -> CellRun:
        """Sample the cell on the bench's seeds and measure it (as experiments/trained_models.py)."""
        self._setup()
        b = self.bench
        den, cond = self._conditions(cell)
        # under a prompt baseline the text UNet takes token conditions: y_N is the neighbour caption's tokens
        conds = caption_conditions(self.spec, self.bed) if cell.baseline and cell.guidance == "amg" else None
        screen, thr = screen_of(settings)
        g = self.spec.guidance(cell.guidance, self.spec.scale(settings["scale"]), self.bank, base=settings["base"],
                               detector=settings["detector"], amg=settings["amg"], neighbour_conds=conds,
                               screen=screen, screen_threshold=thr)
        run = run_method(den, g, SamplerConfig(cell.sampler, num_steps=cell.steps), b.keys, cond,
                         batch=self.config.chunk, sharded=jax.device_count() > 1,    # seeds over all devices
                         kinds=b.kinds, measure=lambda r: b.measure(for_metrics(r.x)), label=cell.id, echo=self.echo)
        return CellRun(metrics=run.metrics, samples=run.x, kinds=np.asarray(b.kinds),
                       caption_ids=np.asarray(b.caption_ids),
                       trace={k: run.trace[k] for k in ("sigma", "lambda", "gate", "flagged") if k in run.trace},
                       seconds=run.seconds)


@functools.lru_cache(maxsize=1)
def _load_sd(source: str, dtype: str):
    """The last Stable Diffusion loaded (one per process): a second sweep on the same model in a
    notebook reuses its weights and compiled functions."""
    return StableDiffusionSpec(source).load(dtype)


@functools.lru_cache(maxsize=None)
def _clipped_decoder(decode):
    """jit of ``sd_amg.latent_decoder``'s ``decode`` clipped to [-1, 1] (= ``StableDiffusion.decode``),
    to run on latents sharded over the devices with the VAE params replicated there."""
    return jax.jit(lambda params, z: jax.numpy.clip(decode(params, z), -1.0, 1.0))


class StableDiffusionBackend:
    """Stable Diffusion ("sd:PATH_OR_HUB_ID") on the sweep's prompts: each prompt with
    ``samples_per_prompt`` seeds (its j-th sample has seed ``seed + j``, as ``amg sample``), in
    batches of ``batch`` seeds sharded over all devices (``sharding.sample_sharded``; the last
    batch padded, so one compilation), decoded to uint8 images and measured against the bank
    with SSCD (+ the CLIP score and FID when configured). The model, SSCD, bank and metric
    networks are loaded for the first cell (a sweep whose cells are all done loads nothing)."""

    def __init__(self, config: SweepConfig, *, echo=print):
        if config.sd is None:
            raise ValueError(f"StableDiffusionBackend: sweep model {config.model!r} is not a Stable Diffusion model")
        self.config, self.echo = config, echo
        self.spec = StableDiffusionSpec(config.sd.source)
        self._ready = False
        self._amg = None           # (detector, neighbour conditions): built for the first AMG cell

    def bench_record(self) -> dict:
        """The prompts per kind and the copy criterion (no "true renders" row); loads nothing."""
        c, s = self.config, self.config.sd
        prompts = {k: [p for p, pk in zip(s.prompts, s.prompt_kinds) if pk == k] for k in c.kinds}
        return _jsonable({"format": BENCH_FORMAT, "settings": bench_settings(c), "threshold": SSCD_THRESHOLD,
                          "fd_features": "inception" if s.inception else None, "conditioning": "text",
                          "memorized": f"frac_sscd_above_{SSCD_THRESHOLD:g}", "prompts": prompts, "truth": None})

    def _setup(self):
        if self._ready:
            return
        c, s = self.config, self.config.sd
        self.sd = _load_sd(s.source, s.dtype)
        self.den = sdm.sd_denoiser(self.sd, s.height, s.width)
        self.vae_params = jax.device_put(self.sd.vae_params, NamedSharding(make_mesh(), PartitionSpec()))
        self.decode = functools.partial(_clipped_decoder(latent_decoder(self.sd)), self.vae_params)
        self.sscd_params, self.sscd_config = sscd.load_params(s.sscd)
        self.bank = load_bank(s.bank)
        self.nearest = nearest_in_bank(sharded_embedder(sscd.make_embed_fn(self.sscd_config), self.sscd_params),
                                       self.bank, "the sweep's SSCD")
        per = c.samples_per_prompt
        self.caption_ids = np.repeat(np.arange(len(s.prompts)), per)
        self.prompts = [s.prompts[i] for i in self.caption_ids]
        self.kinds = np.asarray([s.prompt_kinds[i] for i in self.caption_ids])
        self.keys = keys_from_seeds([c.seed + j for _ in s.prompts for j in range(per)])
        self.embeddings = self._encode(list(s.prompts))                          # [P, L, D]
        self.clip = self.inception = self.ref_feats = None
        if s.clip is not None:
            self.clip = clip.load_clip(s.clip)
        if s.inception is not None:
            self.inception = inception.load_params(s.inception)             # (variables, config)
            f = self.sd.vae_factor
            size = (self.den.sample_shape[0] * f, self.den.sample_shape[1] * f)
            refs = np.stack([load_image(os.path.join(s.reference_images, name), size)
                             for name in list_images(s.reference_images)])
            self.ref_feats = inception.compute_features(self.inception[0], refs, self.inception[1],
                                                        batch_size=c.chunk, clip=True)
        self._ready = True

    def _encode(self, prompts: list) -> jax.Array:
        return sdm.encode_prompts(self.sd, prompts)

    def _amg_parts(self):
        """AMG's SSCD detector through the VAE and its G_dup conditions (the bank's captions)."""
        if self._amg is None:
            det = latent_detector(self.sd, "sscd", (self.sscd_params, self.sscd_config), self.bank)
            bank = self.config.sd.bank          # a damaged captions file raises (naming it); a missing one: no G_dup
            captions = load_captions(bank) if has_captions(bank) else []
            conds = bank_conditions(self.sd, captions) if captions else None
            if conds is None:
                self.echo(f"note: {bank} has no captions beside it: AMG's caption deduplication (G_dup) is off")
            self._amg = (det, conds)
        return self._amg

    def _conditions(self, cell: Cell):
        """``cond_of(index [b]) -> [b, L, D]``: the text embeddings of samples ``index``, with the
        cell's prompt baseline, per-sample streams seeded by the sweep's seed as ``apply_baseline``
        (GNI: a ``WithNull`` of both noisy CFG branches, unless branches="cond")."""
        params = dict(cell.baseline_params)
        if cell.baseline is None:
            return lambda idx: self.embeddings[self.caption_ids[idx]]
        if cell.baseline in EMBEDDING_BASELINES:    # row i's streams from the global sample number i (gni_rows)
            null = self.sd.null_embedding
            return lambda idx: gni_rows(self.config.seed, self.embeddings[self.caption_ids[idx]], null=null,
                                        index=np.asarray(idx, np.int32), **params)
        edited = apply_baseline(cell.baseline, self.prompts, self.config.seed, **params)
        return lambda idx: self._encode([edited[i] for i in idx])

    def run_cell(self, cell: Cell, settings: dict) -> CellRun:
        """Sample the cell's prompts x seeds, decode, measure (SSCD to the bank, CLIP score, FID)."""
        self._setup()
        c = self.config
        det, conds = self._amg_parts() if cell.guidance == "amg" else (None, None)
        scale = settings["scale"] if settings["scale"] is not None else c.scale
        screen, thr = screen_of(settings)
        g = self.spec.guidance(cell.guidance, scale, detector=det, neighbour_conds=conds, base=settings["base"],
                               amg=dict(cell.amg), screen=screen, screen_threshold=thr)
        sampler = sdm.sd_sampler_config(self.sd, cell.steps, cell.sampler)

        def measure_batch(u8: np.ndarray, idx: np.ndarray) -> dict:
            """SSCD to the bank (and the CLIP score, Inception features) of a chunk of stored images."""
            x = u8.astype(np.float32) / 127.5 - 1.0                 # the stored image is what is measured
            sim, nn = self.nearest(u8)
            out = {"sim": sim, "nn": nn}
            if self.clip is not None:
                out["clip"] = np.asarray(clip_score(self.clip, x, [self.prompts[i] for i in idx]))
            if self.inception is not None:
                out["feats"] = compute_features(self.inception[0], x, self.inception[1], batch_size=len(idx))
            return out

        run = run_method(self.den, g, sampler, self.keys, self._conditions(cell), batch=c.chunk, sharded=True,
                         decode=self.decode,                        # [b, H, W, 3] in [-1, 1], on all devices
                         store=lambda pix: img.to_uint8(np.nan_to_num(pix, nan=0.0)), per_batch=measure_batch,
                         kinds=self.kinds, measure=lambda r: self._metrics(r.extra), label=cell.id,
                         nonfinite="their NaN pixels are stored as 0 (gray)", echo=self.echo)
        kept = {k: run.trace[k] for k in ("sigma", "lambda", "gate") if k in run.trace}
        kept.update(sscd_similarity=run.extra["sim"], sscd_nearest=run.extra["nn"])
        if "clip" in run.extra:
            kept["clip_score"] = run.extra["clip"]          # per sample: the per-prompt CSV's column
        return CellRun(metrics=run.metrics, samples=run.x, kinds=self.kinds, caption_ids=self.caption_ids,
                       trace=kept, seconds=run.seconds)

    def _metrics(self, cat: dict) -> dict:
        """Per kind (when there are several) and "all": the SSCD report, FID, CLIP score."""
        c, n = self.config, len(self.prompts)
        groups = [(k, self.kinds == k) for k in c.kinds] if len(c.kinds) > 1 else []
        metrics = {}
        for kind, sel in groups + [("all", np.ones(n, bool))]:
            r = similarity_report(cat["sim"][sel], SSCD_THRESHOLD, SSCD_STRICT, name="sscd")
            r["count"] = int(sel.sum())
            r["frac_copied"] = r[f"frac_sscd_above_{SSCD_THRESHOLD:g}"]
            r["fd"] = (frechet_distance(*span_projection(cat["feats"][sel], self.ref_feats))
                       if "feats" in cat and sel.sum() >= 2 else float("nan"))
            if "clip" in cat:
                r["clip_score"] = float(np.mean(cat["clip"][sel]))
            # bootstrap over prompts (a prompt's seeds are not independent): [lo, hi] of each aggregate
            cis = aggregate_cis(cat["sim"][sel], self.caption_ids[sel], threshold=SSCD_THRESHOLD,
                                clip=cat["clip"][sel] if "clip" in cat else None, n_boot=CI_BOOT, rng=c.seed)
            cis["frac_copied"] = cis[f"frac_sscd_above_{SSCD_THRESHOLD:g}"]
            for k, (lo, hi) in cis.items():
                r[f"{k}_ci_lo"], r[f"{k}_ci_hi"] = lo, hi
            metrics[kind] = r
        return metrics


def make_backend(config: SweepConfig, *, echo=print):
    """The backend of the sweep's model (raises for one that cannot run)."""
    cls = StableDiffusionBackend if is_sd(config.model) else TestbedBackend
    return cls(config, echo=echo)
