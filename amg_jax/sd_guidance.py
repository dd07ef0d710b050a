"""AMG and the basin methods on Stable Diffusion: the latent detector, the bank's captions, sampling.

AMG's detector on SD works on latents: ``x0_hat [B, h, w, 4]`` is decoded by the VAE and embedded
by SSCD (the papers' copy detector) or CLIP, and ``sigma`` is the cosine to the nearest bank row::

    det = latent_detector(sd, "sscd", "sscd.npz", "bank.npz")       # amg index build --embedder sscd:...
    conds = bank_conditions(sd, load_captions("bank.npz"))           # y_N of G_dup, [C, 77, D]
    g = method_guidance(sd, "amg", 7.5, detector=det, neighbour_conds=conds)
    res = sample(sd_denoiser(sd), g, sd_sampler_config(sd, 50), keys, encode_prompts(sd, prompts))

``G_sim`` differentiates through the UNet (full gradient), the VAE decoder and the embedder; the
decoder + embedder run under ``jax.checkpoint`` (``through_decoder``), so the backward pass
recomputes their activations instead of holding them (the decoder's are at full resolution).

Gate defaults on SD (a choice, METHODS.md leaves them open): SSCD ``(0.2, 0.5)`` — the
papers call a sample copied at SSCD > 0.5, and an early, blurry ``x0_hat`` has a low similarity
to everything; CLIP image cosine ``(0.7, 0.9)``. ``c3`` is raw (``c3_units="raw"``, the paper's
100 on SSCD cosine).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from amg_jax.index import ReferenceBank, load_bank
from amg_jax.models import stable_diffusion as sdm
from amg_jax.similarity.embedding import EmbeddingDetector, embedding_detector, through_decoder

Array = jax.Array

DETECTOR_KINDS = ("sscd", "clip")
DEFAULT_THRESHOLDS = {"sscd": (0.2, 0.5), "clip": (0.7, 0.9)}
SD_AMG = {"c1": 4.0, "c2": 3.0, "c3": 100.0, "c3_units": "raw"}       # the papers' SD settings
METHODS = ("none", "cfg", "stp", "dtp", "og", "og_dtp", "amg")


@functools.lru_cache(maxsize=None)
def _decoder(static: Any):
    vae, (_, scaling, dtype) = static.model, static.key

    def decode(vae_params, latents: Array) -> Array:
        """latents [B, h, w, C] -> pixels [B, 8h, 8w, 3] (float32, not clipped: differentiable)."""
        z = (latents.astype(jnp.float32) / scaling).astype(sdm.DTYPES[dtype])
        img = vae.apply({"params": vae_params}, z, method=vae.decode).sample
        return jnp.transpose(img, (0, 2, 3, 1)).astype(jnp.float32)

    return decode


def latent_decoder(sd) -> Any:
    """The VAE decoder of ``sd`` as a stable function ``(vae_params, latents [B, h, w, C]) -> pixels
    [B, H, W, 3]`` (one object per VAE config / scaling / dtype, so jit caches hit)."""
    return _decoder(sdm._Static((sdm._config_key(sd.vae), sd.vae_scaling_factor, sd.dtype), sd.vae))


def _embedder(kind: str, weights):
    """(embed_fn, embed_params) of an SSCD params file / (params, config) or a CLIP dir / bundle."""
    if kind == "sscd":
        from amg_jax.similarity import sscd

        params, config = sscd.load_params(weights) if isinstance(weights, (str, os.PathLike)) else weights
        return sscd.make_embed_fn(config), params
    from amg_jax.similarity import clip

    bundle = clip.load_clip(os.fspath(weights)) if isinstance(weights, (str, os.PathLike)) else weights
    return bundle.embed_fn, bundle.vision_params


def latent_detector(sd, kind: str, weights, bank, *, thresholds: tuple | None = None,
                    remat: bool = True) -> EmbeddingDetector:
    """AMG's detector on SD latents: VAE decode -> ``kind`` ("sscd" | "clip") -> cosine to ``bank``.

    weights: SSCD: a params file from ``amg convert sscd`` or ``(params, SSCDConfig)``; CLIP: a
             model directory / hub id or a ``ClipBundle``.
    bank:    an embedding ``ReferenceBank`` (or its ``.npz`` path, ``amg index build``) of the
             same embedder; thresholds: AMG's default gate (default ``DEFAULT_THRESHOLDS[kind]``).
    """
    if kind not in DETECTOR_KINDS:
        raise ValueError(f"latent detector: kind must be one of {DETECTOR_KINDS}, got {kind!r}")
    if isinstance(bank, (str, os.PathLike)):
        bank = load_bank(os.fspath(bank))
    if not isinstance(bank, ReferenceBank) or bank.kind != "embedding":
        raise ValueError(f"latent detector: the bank must be an embedding bank (amg index build --embedder "
                         f"{kind}:...), got {getattr(bank, 'kind', type(bank).__name__)!r}")
    embed_fn, params = _embedder(kind, weights)
    fn = through_decoder(latent_decoder(sd), embed_fn, remat)
    det = embedding_detector(fn, (sd.vae_params, params), bank,
                             thresholds=DEFAULT_THRESHOLDS[kind] if thresholds is None else thresholds)
    probe = jax.eval_shape(det.embed_fn, det.embed_params,
                           jax.ShapeDtypeStruct((1, 8, 8, sd.latent_channels), jnp.float32))
    if probe.shape[-1] != bank.dim:
        raise ValueError(f"latent detector: the {kind} embedder gives {probe.shape[-1]}-d embeddings, the bank "
                         f"holds {bank.dim}-d rows (built with another embedder?)")
    return det


def bank_conditions(sd, captions: Sequence[str], *, batch: int = 64) -> Array:
    """Text embeddings [C, L, D] of the bank's captions (label id -> condition): AMG's ``y_N`` for
    caption deduplication (``make_amg(..., neighbour_conds=...)``)."""
    captions = list(captions)
    if not captions:
        raise ValueError("bank_conditions: the bank has no captions (caption deduplication needs them)")
    return sdm.encode_prompts(sd, captions, batch=batch)


def method_guidance(method: str, scale: float, *, detector=None, neighbour_conds=None, base: str = "cfg",
                    amg: dict | None = None):
    """The guidance of ``method`` on SD at scale ``scale``; ``"amg"`` wraps ``base`` with
    ``detector`` (``latent_detector``) and ``SD_AMG`` updated by ``amg``. ``neighbour_conds``:
    the bank captions' text embeddings [C, 77, D] (``bank_conditions``); without them caption
    deduplication is off (the bank's labels are no conditions)."""
    from amg_jax.guidance import make_amg, make_guidance

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "amg":
        if method == "none":
            return make_guidance("none")
        if method == "og_dtp":
            return make_guidance("og_dtp", scale=scale, early_scale=-scale)
        return make_guidance(method, scale=scale)
    if detector is None:
        raise ValueError("method 'amg' needs a detector (latent_detector: --detector sscd:PARAMS --bank BANK)")
    settings = dict(SD_AMG, **(amg or {}))
    if neighbour_conds is None:
        settings["dedup"] = False
    return make_amg(method_guidance(base, scale), detector, neighbour_conds=neighbour_conds, **settings)


@dataclasses.dataclass(frozen=True)
class SampleRun:
    """One `amg sample` run on Stable Diffusion (validated before any model is loaded)."""

    model: str
    prompts: tuple
    out: str
    seeds: int = 1
    seed: int = 0
    method: str = "cfg"
    base: str = "cfg"
    scale: float = 7.5
    sampler: str = "ddim"
    steps: int = 50
    height: int | None = None
    width: int | None = None
    dtype: str = "float32"
    detector: str | None = None
    bank: str | None = None
    amg: tuple = ()
    baseline: str | None = None
    batch: int = 8

    def __post_init__(self):
        def fail(field, msg):
            raise ValueError(f"sample: {field} {msg}")

        if not self.prompts or not all(isinstance(p, str) for p in self.prompts):
            fail("prompts", "must be one or more strings (--prompt TEXT)")
        if self.method not in METHODS:
            fail("method", f"must be one of {list(METHODS)}, got {self.method!r}")
        if self.base not in METHODS[:-1]:
            fail("base", f"must be one of {list(METHODS[:-1])}, got {self.base!r}")
        for field in ("seeds", "steps", "batch"):
            v = getattr(self, field)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(field, f"must be an integer >= 1, got {v!r}")
        if self.dtype not in sdm.DTYPES:
            fail("dtype", f"must be one of {list(sdm.DTYPES)}, got {self.dtype!r}")
        if self.method == "amg":
            if not self.detector or self.detector.partition(":")[0] not in DETECTOR_KINDS or ":" not in self.detector:
                fail("detector", f"AMG needs --detector sscd:PARAMS.npz or clip:DIR, got {self.detector!r}")
            kind, _, weights = self.detector.partition(":")
            if kind == "sscd" and not os.path.isfile(weights):
                fail("detector", f"SSCD params file {weights!r} does not exist (make it with amg convert sscd)")
            for field, v in self.amg:
                if field in ("lambda_min", "lambda_max") and not -1.0 < float(v) < 1.0:
                    fail("amg", f"{field}={v} lies outside the {kind} similarity's range (-1, 1): the gate would "
                                "be always or never open")
            if not self.bank:
                fail("bank", "AMG needs --bank BANK.npz (amg index build)")
            if not os.path.isfile(self.bank):
                fail("bank", f"{self.bank!r} does not exist")
        elif self.amg:
            fail("amg", f"AMG settings need --method amg, got method {self.method!r}")
        if self.baseline is not None:
            from amg_jax.prompt_baselines import PROMPT_BASELINES

            if self.baseline not in PROMPT_BASELINES:
                fail("baseline", f"must be one of {sorted(PROMPT_BASELINES)}, got {self.baseline!r}")
        from amg_jax.guidance.amg import AMGConfig

        AMGConfig(**dict(SD_AMG, **dict(self.amg)))       # raises naming a bad AMG field


def _prompts_for(run: SampleRun, sd) -> tuple[list[str], Array]:
    """Every (prompt, seed) pair's prompt and text embedding, with the run's prompt baseline."""
    from amg_jax.prompt_baselines import EMBEDDING_BASELINES, apply_baseline

    prompts = [p for p in run.prompts for _ in range(run.seeds)]
    if run.baseline is not None and run.baseline not in EMBEDDING_BASELINES:
        prompts = list(apply_baseline(run.baseline, prompts, run.seed))
    cond = sdm.encode_prompts(sd, prompts)
    if run.baseline in EMBEDDING_BASELINES:      # row i's noise from fold_in(key(seed), i), as in the sweeps
        # GNI on both CFG branches (the reference): a WithNull whose null half is each row's noisy empty prompt
        cond = apply_baseline(run.baseline, cond, run.seed, null=sd.null_embedding)
    return prompts, cond


def run_sample(run: SampleRun, *, progress: bool = True, echo=print) -> dict:
    """Sample ``run`` and write ``out/images/NNNN.png``, ``out/trace.npz`` ({name: [B, N]}) and
    ``out/samples.json`` (prompt, seed, final similarity and gate rate per image). Batches of
    ``run.batch`` seeds are sharded over all devices; images, trace and report are written after
    each batch, so an interrupted run keeps what it finished, and a re-run with the same settings
    and ``out`` continues after the last finished batch."""
    from PIL import Image

    from amg_jax.images import to_uint8
    from amg_jax.index_build import load_captions
    from amg_jax.samplers import keys_from_seeds
    from amg_jax.sharding import sample_sharded

    path = run.model[3:] if run.model.startswith("sd:") else run.model
    if run.method == "amg":     # the bank, SSCD params and captions first: a damaged file fails before the model loads
        kind, _, weights = run.detector.partition(":")
        bank = load_bank(run.bank)
        if kind == "sscd":
            from amg_jax.similarity import sscd

            weights = sscd.load_params(weights)
        captions = load_captions(run.bank) if os.path.isfile(run.bank + ".captions.json") else []
    sd = sdm.load_stable_diffusion(path, dtype=run.dtype)
    den = sdm.sd_denoiser(sd, run.height, run.width)
    sampler = sdm.sd_sampler_config(sd, run.steps, run.sampler)
    det = conds = None
    if run.method == "amg":
        det = latent_detector(sd, kind, weights, bank)
        if captions:
            conds = bank_conditions(sd, captions)
        else:
            echo(f"note: {run.bank} has no captions beside it: caption deduplication (G_dup) is off")
    guidance = method_guidance(run.method, run.scale, detector=det, neighbour_conds=conds, base=run.base,
                               amg=dict(run.amg))
    prompts, cond = _prompts_for(run, sd)
    seeds = [run.seed + i for _ in run.prompts for i in range(run.seeds)]
    os.makedirs(os.path.join(run.out, "images"), exist_ok=True)
    records, traces, seconds = _finished_batches(run)
    if records:
        echo(f"resuming {run.out}: {len(records)} of {len(prompts)} images were done before")
    t0 = time.time() - seconds
    report = None
    for lo in range(len(records), len(prompts), run.batch):
        sl = slice(lo, lo + run.batch)
        res = sample_sharded(den, guidance, sampler, keys_from_seeds(seeds[sl]), jax.tree.map(lambda a: a[sl], cond))
        img = to_uint8(np.asarray(den.decode(res.x0)))       # decode gathers the sharded latents itself
        trace = {k: np.asarray(v) for k, v in res.trace.items()}
        traces.append(trace)
        for j in range(img.shape[0]):
            name = f"{lo + j:04d}.png"
            Image.fromarray(img[j]).save(os.path.join(run.out, "images", name))
            rec = {"image": f"images/{name}", "prompt": prompts[lo + j], "seed": seeds[lo + j]}
            if "sigma" in trace:
                rec.update(final_similarity=float(trace["sigma"][j, -1]), max_similarity=float(trace["sigma"][j].max()),
                           gate_open_rate=float(trace["gate"][j].mean()))
            records.append(rec)
        report = _write_outputs(run, traces, records, time.time() - t0, done=lo + run.batch >= len(prompts))
        if progress:
            echo(f"{len(records)}/{len(prompts)} images ({time.time() - t0:.0f}s)")
    if report is None:          # every batch was done before
        report = _write_outputs(run, traces, records, seconds, done=True)
    return report


def _run_dict(run: SampleRun) -> dict:
    """``run`` as samples.json holds it (JSON types)."""
    return json.loads(json.dumps(dataclasses.asdict(run)))


def _finished_batches(run: SampleRun) -> tuple[list, list, float]:
    """(records, [trace], seconds) of the whole batches an earlier run with the same settings left
    in ``run.out`` (their images all present); empty when there is none or it is unreadable."""
    try:
        with open(os.path.join(run.out, "samples.json")) as f:
            old = json.load(f)
        if old["run"] != _run_dict(run):
            return [], [], 0.0
        records = list(old["samples"])
        n = len(records) if old.get("complete") else len(records) - len(records) % run.batch
        with np.load(os.path.join(run.out, "trace.npz")) as z:
            trace = {k: z[k][:n] for k in z.files}
        if any(len(v) != n for v in trace.values()) or not all(
                os.path.isfile(os.path.join(run.out, r["image"])) for r in records[:n]):
            return [], [], 0.0
        return records[:n], [trace], float(old.get("seconds", 0.0))
    except Exception:      # noqa: BLE001  missing or damaged earlier outputs: start over
        return [], [], 0.0


def _write_outputs(run: SampleRun, traces: list, records: list, seconds: float, done: bool) -> dict:
    """trace.npz and samples.json for the images so far (atomically; rewritten after each batch)."""
    from amg_jax.jsonio import write_atomic, write_json

    trace = {k: np.concatenate([t[k] for t in traces]) for k in traces[0]}
    write_atomic(os.path.join(run.out, "trace.npz"), lambda f: np.savez(f, **trace), binary=True)
    report = {"run": _run_dict(run), "samples": records, "seconds": round(seconds, 2), "complete": done}
    write_json(os.path.join(run.out, "samples.json"), report)
    return report


__all__ = ["DEFAULT_THRESHOLDS", "DETECTOR_KINDS", "METHODS", "SD_AMG", "SampleRun", "bank_conditions",
           "latent_decoder", "latent_detector", "method_guidance", "run_sample"]
