"""Model backends: ``bench_record() -> dict`` and ``run_cell(cell, settings) -> CellRun``;
``TestbedBackend`` for the workbench models, ``StableDiffusionBackend`` for "sd:PATH_OR_HUB_ID"."""
from __future__ import annotations

import functools
import os
import time
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from amg_jax import images as img
from amg_jax import sd_guidance as sg
from amg_jax import sharding, workbench
from amg_jax.apps.sweep.config import BENCH_FORMAT, SD_PREFIX, SSCD_STRICT, SSCD_THRESHOLD, Cell, SweepConfig
from amg_jax.apps.sweep.settings import _jsonable, bench_settings
from amg_jax.index import load_bank
from amg_jax.index_build import list_images, load_captions, load_image, sharded_embedder
from amg_jax.metrics import frechet_distance, similarity_report
from amg_jax.models import stable_diffusion as sdm
from amg_jax.models.stable_diffusion import encode_prompts, load_stable_diffusion, sd_sampler_config
from amg_jax.prompt_baselines import EMBEDDING_BASELINES, apply_baseline, gni_rows
from amg_jax.samplers import SamplerConfig, keys_from_seeds
from amg_jax.sd_guidance import latent_decoder
from amg_jax.sharding import make_mesh
from amg_jax.similarity import clip, inception, sscd
from amg_jax.similarity.clip import clip_score
from amg_jax.similarity.inception import compute_features, span_projection
from amg_jax.workbench import DEFAULT_SCALE, method_guidance, model_kind, resolve_testbed, sample_in_chunks


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
    """The workbench models (trained UNets, empirical, mixture) on the sweep's bench; the model,
    bank and bench are built on first use (a sweep whose cells are all done builds nothing)."""

    def __init__(self, config: SweepConfig, *, echo=print):
        self.config, self.echo = config, echo
        self._ready = False

    def _setup(self):
        if self._ready:
            return
        c = self.config
        self.bed = workbench.build_testbed(resolve_testbed(c.testbed, [c.model]))
        self.denoiser = workbench.build_model(c.model, self.bed)
        self.bank = workbench.model_bank(c.model, self.bed)
        self.bench = workbench.prepare_bench(self.bed, c.prompts_per_kind, c.samples_per_prompt, c.seed, c.kinds,
                                             conditioning=model_kind(c.model),
                                             evaluator=workbench.bench_evaluator(self.bed))
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
        fn = getattr(workbench, "baseline_conditions", None)
        if fn is None:
            raise ValueError("baselines need workbench.baseline_conditions")
        return fn(self.config.model, self.bed, self.bench, cell.baseline, dict(cell.baseline_params), self.config.seed)

    def run_cell(self, cell: Cell, settings: dict) -> CellRun:
        """Sample the cell on the bench's seeds and measure it (as experiments/trained_models.py)."""
        self._setup()
        b = self.bench
        den, cond = self._conditions(cell)
        scale = settings["scale"] if settings["scale"] is not None else DEFAULT_SCALE
        # under a prompt baseline the text UNet takes token conditions: y_N is the neighbour caption's tokens
        conds = (workbench.caption_conditions(self.config.model, self.bed)
                 if cell.baseline and cell.guidance == "amg" else None)
        g = method_guidance(cell.guidance, scale, bed=self.bed, bank=self.bank, base=settings["base"] or "cfg",
                            detector=settings["detector"] or "nl2", amg=settings["amg"], neighbour_conds=conds)
        t0 = time.time()
        res = sample_in_chunks(den, g, SamplerConfig(cell.sampler, num_steps=cell.steps), b.keys, cond,
                               self.config.chunk, sharded=jax.device_count() > 1)   # seeds over all devices
        x = np.asarray(res.x0)
        seconds = time.time() - t0
        if not np.all(np.isfinite(x)):
            self.echo(f"warning: {cell.id}: {int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())} samples "
                      "are not finite; clipped to [-1e3, 1e3] for the metrics")
        m = b.measure(np.clip(np.nan_to_num(x, nan=0.0), -1e3, 1e3))
        trace = {k: np.asarray(v) for k, v in res.trace.items()}
        for kind, r in m.items():
            sel = np.ones(len(x), bool) if kind == "all" else b.kinds == kind
            r["count"] = int(sel.sum())
            r["gate_open_rate"] = float(trace["gate"][sel].mean()) if "gate" in trace else None
            if "fallback" in trace:
                r["fallback_rate"] = float(trace["fallback"][sel].mean())
            if "transition" in trace:
                r["transition_mean"] = float(np.mean(trace["transition"][sel][:, -1]))
        return CellRun(metrics=m, samples=x, kinds=np.asarray(b.kinds), caption_ids=np.asarray(b.caption_ids),
                       trace={k: trace[k] for k in ("sigma", "lambda", "gate") if k in trace}, seconds=seconds)


@functools.lru_cache(maxsize=1)
def _load_sd(source: str, dtype: str):
    """The last Stable Diffusion loaded (one per process): a second sweep on the same model in a
    notebook reuses its weights and compiled functions."""
    return load_stable_diffusion(source, dtype=dtype)


@functools.lru_cache(maxsize=None)
def _clipped_decoder(decode):
    """jit of ``sd_guidance.latent_decoder``'s ``decode`` clipped to [-1, 1] (= ``StableDiffusion.decode``),
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
        rows = np.asarray(self.bank.rows, np.float32)[:self.bank.size]
        self.bank_rows = rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
        self.bank_source = np.asarray(self.bank.source_index)[:self.bank.size]
        self.embed = sharded_embedder(sscd.make_embed_fn(self.sscd_config), self.sscd_params)
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
        return encode_prompts(self.sd, prompts)

    def _amg_parts(self):
        """AMG's SSCD detector through the VAE and its G_dup conditions (the bank's captions)."""
        if self._amg is None:
            det = sg.latent_detector(self.sd, "sscd", (self.sscd_params, self.sscd_config), self.bank)
            bank = self.config.sd.bank          # a damaged captions file raises (naming it); a missing one: no G_dup
            captions = load_captions(bank) if os.path.isfile(bank + ".captions.json") else []
            conds = sg.bank_conditions(self.sd, captions) if captions else None
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
        g = sg.method_guidance(cell.guidance, scale, detector=det, neighbour_conds=conds,
                               base=settings["base"] or "cfg", amg=dict(cell.amg))
        sampler = sd_sampler_config(self.sd, cell.steps, cell.sampler)
        cond_of = self._conditions(cell)
        n, b = len(self.prompts), c.chunk
        out = {k: [] for k in ("x", "sim", "nn", "clip", "feats", "trace")}
        seconds, bad = 0.0, 0
        for lo in range(0, n, b):
            idx = np.minimum(np.arange(lo, lo + b), n - 1)          # the last batch padded with its last seed
            m = min(b, n - lo)
            t0 = time.time()
            res = sharding.sample_sharded(self.den, g, sampler, self.keys[idx], cond_of(idx))
            pix = np.asarray(self.decode(res.x0))                   # [b, H, W, 3] in [-1, 1], on all devices
            seconds += time.time() - t0
            finite = np.isfinite(pix).reshape(b, -1).all(axis=1)
            bad += int(np.sum(~finite[:m]))
            u8 = img.to_uint8(np.nan_to_num(pix, nan=0.0))
            x = u8.astype(np.float32) / 127.5 - 1.0                 # the stored image is what is measured
            e = self.embed(x)
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
            sims = e @ self.bank_rows.T
            out["x"].append(u8[:m])
            out["sim"].append(np.max(sims, axis=1)[:m])
            out["nn"].append(self.bank_source[np.argmax(sims, axis=1)][:m])
            if self.clip is not None:
                out["clip"].append(np.asarray(clip_score(self.clip, x, [self.prompts[i] for i in idx]))[:m])
            if self.inception is not None:
                out["feats"].append(compute_features(self.inception[0], x, self.inception[1], batch_size=b)[:m])
            out["trace"].append({k: np.asarray(v)[:m] for k, v in res.trace.items()})
        if bad:
            self.echo(f"warning: {cell.id}: {bad} samples are not finite; their NaN pixels are stored as 0 (gray)")
        cat = {k: np.concatenate(v) for k, v in out.items() if v and k != "trace"}
        trace = {k: np.concatenate([t[k] for t in out["trace"]]) for k in out["trace"][0]}
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
            r["gate_open_rate"] = float(trace["gate"][sel].mean()) if "gate" in trace else None
            if "fallback" in trace:
                r["fallback_rate"] = float(trace["fallback"][sel].mean())
            if "transition" in trace:
                r["transition_mean"] = float(np.mean(trace["transition"][sel][:, -1]))
            metrics[kind] = r
        kept = {k: trace[k] for k in ("sigma", "lambda", "gate") if k in trace}
        kept.update(sscd_similarity=cat["sim"], sscd_nearest=cat["nn"])
        return CellRun(metrics=metrics, samples=cat["x"], kinds=self.kinds, caption_ids=self.caption_ids,
                       trace=kept, seconds=seconds)


def make_backend(config: SweepConfig, *, echo=print):
    """The backend of the sweep's model (raises for one that cannot run)."""
    cls = StableDiffusionBackend if config.model.startswith(SD_PREFIX) else TestbedBackend
    return cls(config, echo=echo)
