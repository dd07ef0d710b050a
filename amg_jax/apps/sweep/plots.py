"""A sweep's pictures: a grid of each cell's samples, AMG's similarity vs gate threshold per
step, memorized fraction vs FD per cell."""
from __future__ import annotations

import numpy as np

from amg_jax import images as img
from amg_jax.apps.models import is_sd
from amg_jax.apps.report import draw_similarity, pyplot, savefig


def cell_grid(z: dict, *, per_kind: int = 8, label: str = "") -> np.ndarray:
    """uint8 grid of a cell's samples: a row per prompt kind, its first ``per_kind`` samples."""
    x = np.asarray(z["x"])
    x = x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else np.nan_to_num(x.astype(np.float32), nan=0.0)
    if x.shape[1] > 256:                        # Stable Diffusion's 512 px: 2x2 (or more) mean-pooled
        f = -(-x.shape[1] // 256)
        h, w = x.shape[1] // f * f, x.shape[2] // f * f
        x = x[:, :h, :w].reshape(x.shape[0], h // f, f, w // f, f, x.shape[3]).mean(axis=(2, 4))
    kinds = list(dict.fromkeys(z["kinds"].tolist()))
    ncol = min(per_kind, max(int(np.sum(z["kinds"] == k)) for k in kinds))
    blank = np.ones(x.shape[1:], np.float32)
    rows = []
    for k in kinds:
        sel = x[z["kinds"] == k][:ncol]
        rows += list(sel) + [blank] * (ncol - len(sel))
    size = x.shape[1]
    up = max(1, 64 // size)
    grid = img.image_grid(np.stack(rows), ncol=ncol, upscale=up)
    return img.label_rows(grid, kinds, cell=size * up, header=label or None)


def plot_similarity_cells(traces: dict, path: str, *, max_samples: int = 8) -> str:
    """AMG's similarity sigma_t of a few samples vs the gate threshold lambda_t over the steps,
    a panel per cell (``traces`` {label: {"sigma", "lambda", "gate"} [B, N]}): evaluate.plot_similarity
    side by side."""
    plt = pyplot()
    n = len(traces)
    ncol = min(3, n)
    nrow = -(-n // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.5 * ncol, 3.2 * nrow), dpi=100, squeeze=False)
    for ax, (label, t) in zip(axes.ravel(), traces.items()):
        draw_similarity(ax, t, max_samples=max_samples, fontsize=8)
        ax.set_title(label, fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    return savefig(fig, path)


def plot_tradeoff(table: dict, path: str) -> str:
    """Memorized fraction vs FD over all prompts, a labelled point per cell (and the true renders)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=100)
    pts = [(rec["label"], rec["metrics"]["all"]) for rec in table["cells"].values()]
    truth = (table["truth"] or {}).get("all")
    xkey, xlabel = "fd", f"FD (all prompts, {table['fd_features']}; lower is better)"
    if is_sd(table["model"]):
        xlabel = "FID (all prompts, Inception; lower is better)"
        if (not any(r.get("fd") is not None and np.isfinite(r["fd"]) for _, r in pts)
                and any("clip_score" in r for _, r in pts)):
            xkey, xlabel = "clip_score", "CLIP score (all prompts; higher is better)"
    xs = []
    for i, (label, r) in enumerate(pts + ([("true renders", truth)] if truth else [])):
        fd, copied = r.get(xkey), r.get("frac_copied")
        if fd is None or copied is None or not (np.isfinite(fd) and np.isfinite(copied)):
            continue
        xs.append(fd)
        marker = "*" if label == "true renders" else "o"
        ax.scatter([fd], [100 * copied], marker=marker, s=60 if marker == "*" else 25,
                   color="k" if marker == "*" else None)
        ax.annotate(label, (fd, 100 * copied), fontsize=7, xytext=(3, 3 - 10 * (i % 3)),   # staggered: close
                    textcoords="offset points")                                          # points stay legible
    if xs and min(xs) > 0 and max(xs) / min(xs) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("memorized (% copied; lower is better)" if xkey == "fd" and not is_sd(table["model"])
                  else f"memorized (% SSCD > {table['threshold']:g}; lower is better)")
    ax.set_title(f"{table['name']}: {table['model']}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return savefig(fig, path)
