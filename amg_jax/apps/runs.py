"""One run of one method: every command's sampling goes through ``run_method``.

``run_method`` samples a guidance over a batch of seeds in chunks (the last one padded with its
last seed and cut, so one compilation serves all), on one device or sharded over all of them,
decodes each chunk when asked, counts and reports samples that are not finite, hands each chunk
to the caller (``per_batch`` for measurements made chunk by chunk, ``on_batch`` to write files as
they come), and summarises the trace (gate-open rate, fallback rate, DTP's transition step) per
prompt kind beside the caller's metrics. demo, eval, both sweep backends and ``amg sample`` call it.
"""
from __future__ import annotations

import time
from typing import Callable, NamedTuple

import jax
import numpy as np

from amg_jax.apps.models import TESTBEDS
from amg_jax.samplers import SAMPLERS, sample
from amg_jax.sharding import sample_sharded

CLIP = 1e3       # non-finite samples are measured as nan -> 0, clipped to [-CLIP, CLIP]


class Run(NamedTuple):
    """What ``run_method`` returns; arrays are [B, ...] in the order of the keys.

    x:       the samples as drawn (decoded when a decoder was given; may hold non-finite values).
    trace:   {name: [B, N]} the guidance's per-step trace (host arrays).
    finite:  [B] bool, which samples are finite.
    seconds: time spent sampling (and decoding).
    extra:   {name: [B, ...]} what ``per_batch`` returned, concatenated over the chunks.
    metrics: {kind: {...}} the caller's ``measure`` with the trace summaries, or None."""

    x: np.ndarray
    trace: dict
    finite: np.ndarray
    seconds: float
    extra: dict
    metrics: dict | None


def for_metrics(x: np.ndarray) -> np.ndarray:
    """``x`` with NaN -> 0 and values clipped to [-1e3, 1e3]: a diverged sample is measured (as far
    from everything), not dropped."""
    return np.clip(np.nan_to_num(np.asarray(x), nan=0.0), -CLIP, CLIP)


def trace_summary(trace: dict, kinds: np.ndarray | None = None) -> dict:
    """Per kind of ``kinds`` [B] (and "all"): ``count``, ``gate_open_rate`` (share of steps with
    AMG's gate open, None for a guidance without one), ``fallback_rate``, ``transition_mean``
    (DTP's transition step at the last step) and ``screen_flag_rate`` (share of samples a screen
    flagged by the last step; its flag is latched) where the trace has them; trace {name: [B, N]}."""
    n = len(next(iter(trace.values()))) if trace else (0 if kinds is None else len(kinds))
    kinds = np.full(n, "all") if kinds is None else np.asarray(kinds)
    out = {}
    for kind in list(dict.fromkeys(kinds.tolist())) + ["all"]:
        sel = np.ones(len(kinds), bool) if kind == "all" else kinds == kind
        r = {"count": int(sel.sum()),
             "gate_open_rate": float(np.mean(trace["gate"][sel])) if "gate" in trace else None}
        if "fallback" in trace:
            r["fallback_rate"] = float(np.mean(trace["fallback"][sel]))
        if "flagged" in trace:
            r["screen_flag_rate"] = float(np.mean(np.asarray(trace["flagged"])[sel][:, -1]))
        if "transition" in trace:
            r["transition_mean"] = float(np.mean(np.asarray(trace["transition"])[sel][:, -1]))
        out[kind] = r
    return out


def check_run_fields(config, fail) -> None:
    """Validate the fields a demo / eval config shares (testbed, sampler, prompts_per_kind,
    samples_per_prompt, steps, scale); ``fail(field, message)`` raises."""
    for field, allowed in (("testbed", TESTBEDS + ("auto",)), ("sampler", SAMPLERS)):
        if getattr(config, field) not in allowed:
            fail(field, f"must be one of {list(allowed)}, got {getattr(config, field)!r}")
    for field in ("prompts_per_kind", "samples_per_prompt", "steps"):
        v = getattr(config, field)
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            fail(field, f"must be an integer >= 1, got {v!r}")
    if config.scale is not None and not np.isfinite(config.scale):
        fail("scale", f"must be a finite number (or None: the model's default), got {config.scale!r}")


def _rows(cond, idx: np.ndarray):
    return cond(idx) if callable(cond) else (None if cond is None else jax.tree.map(lambda a: a[idx], cond))


def run_method(denoiser, guidance, sampler, keys, cond, *, batch: int | None = None, sharded: bool = False,
               decode: Callable | None = None, store: Callable | None = None, per_batch: Callable | None = None,
               on_batch: Callable | None = None,
               start: int = 0, kinds: np.ndarray | None = None, measure: Callable | None = None,
               label: str = "", nonfinite: str = "clipped to [-1e3, 1e3] for the metrics", echo=print) -> Run:
    """Sample ``guidance`` on ``denoiser`` for ``keys`` [B] and measure the result.

    cond:      pytree [B, ...], or ``cond_of(index [b]) -> pytree [b, ...]`` (conditions built
               chunk by chunk, e.g. re-encoded prompts); sampler: ``samplers.SamplerConfig``.
    batch:     seeds per sampler call (None: all at once); samples do not depend on it, but AMG's
               batch-level gate skips its gradient for a chunk whose samples are all far from the
               training set. ``sharded``: each call's seeds are split over all devices.
    decode:    ``x0 -> x`` per chunk (e.g. the VAE: latents -> pixels), on the devices.
    store:     ``x -> what is kept`` per chunk, after the finiteness check (e.g. uint8 images:
               full-resolution float pixels of thousands of samples do not fit in memory).
    per_batch: ``(x [chunk, ...], index [chunk]) -> {name: [chunk, ...]}`` per chunk (measured as it
               comes; the last chunk padded with its last sample, the padding cut from the result).
    on_batch:  ``(lo, x [b, ...], trace {name: [b, N]}, extra) -> None`` after each chunk (files).
    start:     the first sample to draw (a resumed run: samples before it were done before).
    kinds:     [B] the prompt kind of each sample, for the summaries; ``measure(run) -> {kind:
               {...}}`` the caller's metrics (``run.x`` etc. of the whole batch), to which the trace
               summaries (``trace_summary``) are added.
    """
    keys = jax.numpy.asarray(keys) if not isinstance(keys, jax.Array) else keys
    b = int(keys.shape[0])
    chunk = b - start if not batch or batch >= b - start else int(batch)
    draw = sample_sharded if sharded else sample
    parts, seconds = [], 0.0
    for lo in range(start, b, max(chunk, 1)):
        n = min(chunk, b - lo)
        idx = np.minimum(np.arange(lo, lo + chunk), b - 1)          # the last chunk padded with its last seed
        if lo == 0 and chunk == b:                                  # one call: the arrays as they are
            ks, cs = keys, (cond(np.arange(b)) if callable(cond) else cond)
        else:
            ks, cs = keys[idx], _rows(cond, idx)
        t0 = time.time()
        res = draw(denoiser, guidance, sampler, ks, cs)
        x = np.asarray(res.x0 if decode is None else decode(res.x0))   # [chunk, ...] with the padding
        seconds += time.time() - t0
        fin = (np.isfinite(x[:n].reshape(n, -1)).all(axis=1) if np.issubdtype(x.dtype, np.floating)
               else np.ones(n, bool))
        x = x if store is None else np.asarray(store(x))
        # per_batch sees the padded chunk (one shape for every chunk: one compilation of what it runs)
        extra = {k: np.asarray(v)[:n] for k, v in (per_batch(x, idx) if per_batch else {}).items()}
        x = x[:n]
        trace = {k: np.asarray(v)[:n] for k, v in res.trace.items()}
        if on_batch is not None:
            on_batch(lo, x, trace, extra)
        parts.append((x, trace, extra, fin))
    if not parts:                                                   # every sample was done before
        return Run(np.zeros((0,)), {}, np.zeros(0, bool), 0.0, {}, None)
    cat = lambda *xs: np.concatenate(xs, axis=0)  # noqa: E731
    x = cat(*[p[0] for p in parts])
    trace = {k: cat(*[p[1][k] for p in parts]) for k in parts[0][1]}
    extra = {k: cat(*[p[2][k] for p in parts]) for k in parts[0][2]}
    finite = cat(*[p[3] for p in parts])
    if not finite.all():
        echo(f"warning: {label}: {int((~finite).sum())} samples are not finite; {nonfinite}")
    run = Run(x, trace, finite, seconds, extra, None)
    if measure is None:
        return run
    metrics = measure(run)
    summary = trace_summary(trace, kinds)
    for kind, r in metrics.items():
        r.update(summary[kind])
    return run._replace(metrics=metrics)


__all__ = ["Run", "check_run_fields", "for_metrics", "run_method", "trace_summary"]
