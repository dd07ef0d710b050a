"""`amg sample`: one method on Stable Diffusion for a few prompts -> images, traces, a report.

    amg sample --model sd:CompVis/stable-diffusion-v1-4 --prompt "a cat" --seeds 4 \
        --method amg --detector sscd:sscd.npz --bank bank.npz --out out/

The model is a ``StableDiffusionSpec`` (``apps.models``), the sampling ``runs.run_method``
(batches of seeds sharded over all devices, written as they finish, resumable).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time

import jax
import numpy as np
from PIL import Image

from amg_jax.apps.models import StableDiffusionSpec, sd_source
from amg_jax.apps.runs import run_method
from amg_jax.apps.screens import check_screen_choice, read_bank_screen, resolve_screen
from amg_jax.guidance import METHODS
from amg_jax.guidance.amg import AMGConfig
from amg_jax.images import to_uint8
from amg_jax.index import load_bank
from amg_jax.apps.sweep.config import CI_BOOT, SSCD_STRICT, SSCD_THRESHOLD
from amg_jax.evaluation.detection import bootstrap_ci
from amg_jax.evaluation.metrics import similarity_report
from amg_jax.evaluation.prompt_stats import aggregate_cis, prompt_csv, prompt_rows
from amg_jax.index_build import has_captions, load_captions, sscd_nearest
from amg_jax.jsonio import write_atomic, write_json
from amg_jax.models import stable_diffusion as sdm
from amg_jax.models.attention import ATTENTION_IMPLEMENTATIONS
from amg_jax.sd_amg import DETECTOR_KINDS, SD_AMG, bank_conditions, latent_detector
from amg_jax.prompt_baselines import EMBEDDING_BASELINES, PROMPT_BASELINES, apply_baseline
from amg_jax.samplers import keys_from_seeds
from amg_jax.similarity import sscd
from amg_jax.similarity.clip import clip_score, load_clip

Array = jax.Array


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
    attention: str = "auto"
    detector: str | None = None
    bank: str | None = None
    amg: tuple = ()
    baseline: str | None = None
    batch: int = 8
    screen: str = "none"
    screen_threshold: float | None = None
    measure: str | None = None          # "sscd:PARAMS.npz": each image's SSCD to --bank, per-prompt stats
    clip: str | None = None             # a CLIP directory / hub id: each image's CLIP score with its prompt

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
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            fail("attention", f"must be one of {list(ATTENTION_IMPLEMENTATIONS)}, got {self.attention!r}")
        check_screen_choice(self.screen, self.screen_threshold, fail)
        bank_free = self.method == "amg" and not self.detector and not self.bank and self.screen not in ("auto", "none")
        if self.method == "amg" and not bank_free:
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
        if self.measure is not None:
            kind, _, weights = self.measure.partition(":")
            if kind != "sscd" or not weights:
                fail("measure", f"must be sscd:PARAMS.npz (amg convert sscd), got {self.measure!r}")
            if not os.path.isfile(weights):
                fail("measure", f"SSCD params file {weights!r} does not exist (make it with amg convert sscd)")
            if not self.bank:
                fail("bank", "--measure needs --bank BANK.npz (amg index build --embedder sscd:PARAMS.npz)")
            if not os.path.isfile(self.bank):
                fail("bank", f"{self.bank!r} does not exist")
        if self.clip is not None and (not isinstance(self.clip, str) or not self.clip
                                      or (os.path.exists(self.clip) and not os.path.isdir(self.clip))):
            fail("clip", f"must be a CLIP directory or hub id (config.json, weights, tokenizer), got {self.clip!r}")
        if self.baseline is not None:
            if self.baseline not in PROMPT_BASELINES:
                fail("baseline", f"must be one of {sorted(PROMPT_BASELINES)}, got {self.baseline!r}")
        AMGConfig(**dict(SD_AMG, **dict(self.amg)))       # raises naming a bad AMG field
        try:
            self.screen_setting()
        except ValueError as e:
            fail("screen", str(e).removeprefix("sample: "))

    def screen_setting(self) -> tuple:
        """(screen, threshold) or (None, None): ``--screen`` resolved against the calibrated screen
        stored beside the bank (``apps.screens``)."""
        return resolve_screen(self.screen, read_bank_screen(self.bank), self.screen_threshold, self.method, "sample")


def _prompts_for(run: SampleRun, sd) -> tuple[list[str], Array]:
    """Every (prompt, seed) pair's prompt and text embedding, with the run's prompt baseline."""
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
    spec = StableDiffusionSpec(sd_source(run.model))
    screen, screen_thr = run.screen_setting()
    if run.method == "amg" and run.detector:     # the bank, SSCD params and captions first: a damaged file fails before the model loads
        kind, _, weights = run.detector.partition(":")
        bank = load_bank(run.bank)
        if kind == "sscd":
            weights = sscd.load_params(weights)
        captions = load_captions(run.bank) if has_captions(run.bank) else []
    measure = sscd_nearest(run.bank, run.measure.partition(":")[2], "sample") if run.measure else None       # a bad bank or SSCD file fails before the model loads
    scorer = load_clip(run.clip) if run.clip else None          # a broken CLIP fails before the model loads
    sd = spec.load(run.dtype, run.attention)
    den = sdm.sd_denoiser(sd, run.height, run.width)
    sampler = sdm.sd_sampler_config(sd, run.steps, run.sampler)
    det = conds = None
    if run.method == "amg" and run.detector:
        det = latent_detector(sd, kind, weights, bank)
        if captions:
            conds = bank_conditions(sd, captions)
        else:
            echo(f"note: {run.bank} has no captions beside it: caption deduplication (G_dup) is off")
    guidance = spec.guidance(run.method, run.scale, detector=det, neighbour_conds=conds, base=run.base,
                             amg=dict(run.amg), screen=screen, screen_threshold=screen_thr)
    prompts, cond = _prompts_for(run, sd)
    seeds = [run.seed + i for _ in run.prompts for i in range(run.seeds)]
    os.makedirs(os.path.join(run.out, "images"), exist_ok=True)
    records, traces, seconds = _finished_batches(run)
    if records:
        echo(f"resuming {run.out}: {len(records)} of {len(prompts)} images were done before")
    t0 = time.time() - seconds
    state = {"report": None}

    def write(lo: int, img, trace: dict, extra: dict) -> None:
        """Save one finished batch (images, then trace and report): an interrupted run keeps it."""
        traces.append(trace)
        for j in range(img.shape[0]):
            name = f"{lo + j:04d}.png"
            Image.fromarray(img[j]).save(os.path.join(run.out, "images", name))
            rec = {"image": f"images/{name}", "prompt": prompts[lo + j], "seed": seeds[lo + j]}
            if "sigma" in trace:
                rec.update(final_similarity=float(trace["sigma"][j, -1]), max_similarity=float(trace["sigma"][j].max()))
            if "gate" in trace:
                rec["gate_open_rate"] = float(trace["gate"][j].mean())
            if "flagged" in trace:
                rec.update(screen_flagged=bool(trace["flagged"][j, -1]), screen_score=float(trace["screen"][j, -1]))
            records.append(rec)
        if measure is not None:            # the stored image is what is measured
            sims, nearest = measure(img)
            for j in range(img.shape[0]):
                records[lo + j].update(sscd=float(sims[j]), sscd_nearest=int(nearest[j]))
        if scorer is not None:             # with the prompt as the user gave it (not a baseline's rewrite)
            given = [run.prompts[(lo + j) // run.seeds] for j in range(img.shape[0])]
            cs = np.asarray(clip_score(scorer, img.astype(np.float32) / 127.5 - 1.0, given))
            for j in range(img.shape[0]):
                records[lo + j]["clip_score"] = float(cs[j])
        state["report"] = _write_outputs(run, traces, records, time.time() - t0,
                                         done=lo + img.shape[0] >= len(prompts))
        if progress:
            echo(f"{len(records)}/{len(prompts)} images ({time.time() - t0:.0f}s)")

    # decode gathers the sharded latents itself; the stored uint8 image is what is kept
    run_method(den, guidance, sampler, keys_from_seeds(seeds), cond, batch=run.batch, sharded=True,
               decode=lambda z: np.asarray(den.decode(z)), store=to_uint8, on_batch=write, start=len(records),
               label=f"sample {run.method}", nonfinite="stored as they decode", echo=echo)
    if state["report"] is None:          # every batch was done before
        state["report"] = _write_outputs(run, traces, records, seconds, done=True)
    return state["report"]


def _summary(run: SampleRun, records: list) -> tuple[dict, str]:
    """(the SSCD aggregates with bootstrap intervals over prompts, the per-prompt CSV) of the
    measured images so far; with ``--clip`` the CLIP score is among both."""
    sims = np.asarray([r["sscd"] for r in records])
    cs = np.asarray([r["clip_score"] for r in records]) if "clip_score" in records[0] else None
    ids = np.arange(len(records)) // run.seeds            # record i is prompt i // seeds
    summary = similarity_report(sims, SSCD_THRESHOLD, SSCD_STRICT, name="sscd")
    if cs is not None:
        summary["clip_score"] = float(cs.mean())
    for k, (lo, hi) in aggregate_cis(sims, ids, threshold=SSCD_THRESHOLD, clip=cs, n_boot=CI_BOOT,
                                     rng=run.seed).items():
        summary[f"{k}_ci"] = [lo, hi]
    summary["prompts"] = int(ids.max()) + 1 if ids.size else 0
    return summary, prompt_csv(prompt_rows(sims, ids, list(run.prompts), threshold=SSCD_THRESHOLD, clip=cs),
                               SSCD_THRESHOLD)


def _clip_summary(run: SampleRun, records: list) -> dict:
    """The mean CLIP score with its bootstrap interval over prompts (``--clip`` without ``--measure``)."""
    cs = np.asarray([r["clip_score"] for r in records], np.float64)
    ids = np.arange(len(records)) // run.seeds
    lo, hi = bootstrap_ci(lambda rows, _: float(np.mean(cs[rows])), ids, n_boot=CI_BOOT, rng=run.seed)
    return {"clip_score": float(cs.mean()), "clip_score_ci": [lo, hi], "prompts": int(ids.max()) + 1}


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
    trace = {k: np.concatenate([t[k] for t in traces]) for k in traces[0]}
    write_atomic(os.path.join(run.out, "trace.npz"), lambda f: np.savez(f, **trace), binary=True)
    report = {"run": _run_dict(run), "samples": records, "seconds": round(seconds, 2), "complete": done}
    if records and "sscd" in records[0]:
        report["sscd"], table = _summary(run, records)
        write_atomic(os.path.join(run.out, "per_prompt.csv"), lambda f: f.write(table))
    elif records and "clip_score" in records[0]:
        report["clip"] = _clip_summary(run, records)
    write_json(os.path.join(run.out, "samples.json"), report)
    return report


__all__ = ["SampleRun", "run_sample"]
