"""What the commands show: method labels, the similarity-vs-threshold plot (the paper's Figure 3)."""
from __future__ import annotations

import os

import numpy as np

from amg_jax.jsonio import write_atomic

METHOD_LABELS = {"none": "unguided", "cfg": "CFG", "stp": "STP", "dtp": "DTP", "og": "OG", "og_dtp": "OG+DTP",
                 "amg": "AMG"}


def method_label(method: str) -> str:
    """The printed name of a method (``METHOD_LABELS``, else the name itself)."""
    return METHOD_LABELS.get(method, method)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only; no display needed)."""
    import matplotlib       # optional heavy dependency: only the commands that draw load it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def savefig(fig, path: str) -> str:
    """Write ``fig`` to ``path`` as a PNG atomically (``jsonio.write_atomic``), close it; returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, lambda f: fig.savefig(f, format="png"), binary=True)
    pyplot().close(fig)
    return path


def draw_similarity(ax, trace: dict, *, max_samples: int = 8, fontsize: int = 8) -> None:
    """Draw sigma_t of the first ``max_samples`` samples (dots where the gate is open) and the
    threshold lambda_t over the steps on a matplotlib axis; ``trace`` {"sigma", "lambda", "gate"} [B, N]."""
    sigma = np.asarray(trace["sigma"], np.float32)[:max_samples]
    lam = np.asarray(trace["lambda"], np.float32)[0]
    gate = np.asarray(trace["gate"], bool)[:max_samples]
    steps = np.arange(sigma.shape[1])
    for i, row in enumerate(sigma):
        line, = ax.plot(steps, row, lw=1, alpha=0.8)
        ax.scatter(steps[gate[i]], row[gate[i]], s=8, color=line.get_color())
    if np.all(np.isfinite(lam)):
        ax.plot(steps, lam, "k--", lw=2, label="threshold lambda_t")
        ax.legend(loc="lower right", fontsize=fontsize - 1)
    ax.set_xlabel("sampling step (dots: gate open)", fontsize=fontsize)
    ax.set_ylabel("similarity sigma_t", fontsize=fontsize)


def plot_similarity(trace: dict, path: str, *, max_samples: int = 8, title: str = "") -> str:
    """The paper's Figure 3: sigma_t of a few samples against the gate threshold lambda_t over steps."""
    fig, ax = pyplot().subplots(figsize=(6, 3.5), dpi=110)
    draw_similarity(ax, trace, max_samples=max_samples, fontsize=8)
    ax.set_title(title or "similarity vs threshold", fontsize=9)
    fig.tight_layout()
    return savefig(fig, path)


__all__ = ["METHOD_LABELS", "draw_similarity", "method_label", "plot_similarity", "pyplot", "savefig"]
