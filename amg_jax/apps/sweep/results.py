"""A sweep's results from its cell records: the table (``build_results``), results.csv / .md /
.json, and ``write_results`` (the tables, grids and plots)."""
from __future__ import annotations

import csv
import io
import json
import os

from amg_jax import images as img
from amg_jax.apps.sweep.cells import _load_samples
from amg_jax.apps.models import is_sd
from amg_jax.apps.sweep.config import SSCD_THRESHOLD, SweepConfig
from amg_jax.apps.sweep.plots import cell_grid, plot_similarity_cells, plot_tradeoff
from amg_jax.evaluation.prompt_stats import prompt_csv, prompt_rows
from amg_jax.jsonio import write_atomic, write_json

# CSV columns after the cell's settings and grid: these metrics first, then any others sorted.
METRIC_COLUMNS = ("count", "frac_copied", "frac_nl2_below_1.4", "nl2_median", "nl2_top5pct", "nl2_top1", "fd",
                  "alignment", "frac_out_of_range", "gate_open_rate")
SETTING_COLUMNS = ("guidance", "base", "detector", "baseline", "scale", "sampler", "steps")
# ... for Stable Diffusion: frac_copied = frac_sscd_above_0.5, fd = FID (NaN without inception)
SD_METRIC_COLUMNS = ("count", "frac_copied", "frac_sscd_above_0.5", "frac_sscd_above_0.4", "sscd_mean",
                     "sscd_median", "sscd_top5pct", "sscd_top1", "fd", "clip_score", "gate_open_rate")


def build_results(config: SweepConfig, bench: dict, records: dict) -> dict:
    """The results table from the bench and cell records: ``rows`` (one per cell and kind, the
    CSV's), ``cells`` {id: record}, ``truth`` (the true renders' metrics) and the bench facts."""
    cells = [c for c in config.cells if c.id in records]
    columns = SD_METRIC_COLUMNS if is_sd(config.model) else METRIC_COLUMNS
    axes = list(dict.fromkeys(a for c in cells for a, _ in c.grid if a not in SETTING_COLUMNS))
    extra = sorted({k for c in cells for r in records[c.id]["metrics"].values() for k in r} - set(columns))
    rows = []
    for c in cells:
        rec = records[c.id]
        s = rec["settings"]
        for kind, r in rec["metrics"].items():
            row = {"cell": c.id, "method": c.method}
            row.update({k: s.get(k) for k in SETTING_COLUMNS})
            for key in ("amg", "baseline_params"):          # the full settings, as compact JSON
                row[key] = json.dumps(s[key], sort_keys=True) if s.get(key) else None
            row.update({a: dict(c.grid).get(a) for a in axes})
            row["kind"] = kind
            row.update({k: r.get(k) for k in columns + tuple(extra)})
            row["seconds"] = rec.get("seconds")
            rows.append(row)
    return {"name": config.name, "model": config.model, "out": config.out, "threshold": bench.get("threshold"),
            "fd_features": bench.get("fd_features"), "prompts": bench.get("prompts"), "truth": bench.get("truth"),
            "cells": {c.id: records[c.id] for c in cells}, "rows": rows,
            "missing": [c.id for c in config.cells if c.id not in records]}


def results_csv(table: dict) -> str:
    """The rows as CSV text (floats at full precision; None, a metric that is not defined or does
    not apply (``null`` in the cell files), as empty; a NaN of an older cell file as ``nan``)."""
    rows = table["rows"]
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


def _pct(v) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def _fd(v) -> str:
    return "-" if v is None or v != v else (f"{v:.2f}" if abs(v) < 1e4 else f"{v:.1e}")


def results_markdown(table: dict) -> str:
    """A markdown table per kind group (each kind side by side, then all prompts), one row per
    cell after the true renders, the columns of experiments/table_md.py (Stable Diffusion:
    ``sd_results_markdown``)."""
    if is_sd(table["model"]):
        return sd_results_markdown(table)
    truth = table["truth"] or {}
    kinds = [k for k in truth if k != "all"]
    rows = [("true renders", truth)] + [(rec["label"], rec["metrics"]) for rec in table["cells"].values()]
    parts = [f"# sweep {table['name']}: {table['model']}\n"]
    parts += _kind_tables(
        kinds, rows,
        lambda ks: f"| method | copied {ks} | nL2<1.4 {ks} | FD {ks} | align {ks} | out of range | gate open |",
        lambda label, per, overall: (
            f"| {label} | {per('frac_copied', _pct)} | {per('frac_nl2_below_1.4', _pct)} | "
            f"{per('fd', _fd)} | {per('alignment', _pct)} | "
            f"{_pct(overall.get('frac_out_of_range'))} | {_pct(overall.get('gate_open_rate'))} |"))
    counts = {k: truth[k].get("count") for k in kinds} if truth else {}
    settings = {(s["sampler"], s["steps"], s["scale"]) for s in (r["settings"] for r in table["cells"].values())}
    parts.append(f"{table['model']}: samples per kind {counts}, copy threshold {table['threshold']:.3f}, FD on "
                 f"{table['fd_features']}; sampler / steps / scale: "
                 + ", ".join(f"{a} {b} {_scale_text(c)}" for a, b, c in sorted(settings, key=str))
                 + (f"\n\nnot done: {', '.join(table['missing'])}" if table["missing"] else ""))
    return "\n".join(parts) + "\n"


def _scale_text(scale) -> str:
    """A cell's guidance scale for a table footer ("unguided" for a model sampled without guidance)."""
    return "unguided" if scale is None else str(scale)


def _kind_tables(kinds: list, rows: list, header, line) -> list:
    """The markdown tables of a results page: one over the prompt kinds (when there are several),
    one over all prompts. ``rows``: (label, metrics by kind); ``header(ks)`` the header line for
    the kinds' label ``ks`` ("a / b"); ``line(label, per, overall)`` one row, ``per(key, fmt)``
    giving the kinds' values of ``key`` joined by " / ", ``overall`` the "all" metrics."""
    groups = [(kinds, "per prompt kind")] if len(kinds) > 1 else []
    tables = []
    for group, title in groups + [(["all"], "all prompts")]:
        head = header(" / ".join(group))
        out = [f"## {title}\n", head, "|" + "---|" * (head.count("|") - 1)]
        for label, m in rows:
            per = lambda key, f, m=m: " / ".join(f(m.get(k, {}).get(key)) for k in group)  # noqa: E731
            out.append(line(label, per, m.get("all", {})))
        tables.append("\n".join(out) + "\n")
    return tables


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None or v != v else format(v, fmt)


def _with_ci(m: dict, key: str, fmt) -> str:
    lo, hi = m.get(f"{key}_ci_lo"), m.get(f"{key}_ci_hi")
    v = fmt(m.get(key))
    return v if lo is None or hi is None else f"{v} [{fmt(lo)}, {fmt(hi)}]"


def _ci_table(rows: list, t: str) -> str:
    """All prompts, each aggregate with its 95% bootstrap interval over prompts ("-" for cells run
    before the intervals existed)."""
    out = ["## all prompts, 95% bootstrap intervals over prompts\n",
           f"| method | SSCD>{t} | SSCD top-5% | SSCD top-1 | CLIP score |", "|---|---|---|---|---|"]
    for label, m in rows:
        a = m.get("all", {})
        out.append(f"| {label} | {_with_ci(a, 'frac_copied', _pct)} | {_with_ci(a, 'sscd_top5pct', _num)} | "
                   f"{_with_ci(a, 'sscd_top1', _num)} | {_with_ci(a, 'clip_score', lambda v: _num(v, '.2f'))} |")
    return "\n".join(out) + "\n"


def prompt_tables(config: SweepConfig, table: dict) -> dict:
    """{cell id: per-prompt CSV text} of a Stable Diffusion sweep, from the cells' stored SSCD."""
    out = {}
    for cid in table["cells"]:
        z = _load_samples(table["out"], cid)
        if "sscd_similarity" not in z:
            continue
        rows = prompt_rows(z["sscd_similarity"], z["caption_ids"], config.sd.prompts, z["kinds"],
                           threshold=SSCD_THRESHOLD, clip=z.get("clip_score"))
        out[cid] = prompt_csv(rows, SSCD_THRESHOLD)
    return out


def sd_results_markdown(table: dict) -> str:
    """``results_markdown`` of a Stable Diffusion sweep: per kind group, the memorized share
    (SSCD > 0.5) and mean SSCD per kind, then FID, CLIP score and AMG's gate rate over all prompts."""
    prompts = table["prompts"] or {}
    kinds = list(prompts)
    rows = [(rec["label"], rec["metrics"]) for rec in table["cells"].values()]
    parts = [f"# sweep {table['name']}: {table['model']}\n"]
    t = f"{table['threshold']:g}"
    parts += _kind_tables(
        kinds, rows,
        lambda ks: f"| method | SSCD>{t} {ks} | SSCD mean {ks} | FID (all) | CLIP score (all) | gate open |",
        lambda label, per, overall: (
            f"| {label} | {per('frac_copied', _pct)} | {per('sscd_mean', _num)} | {_fd(overall.get('fd'))} | "
            f"{_num(overall.get('clip_score'), '.2f')} | {_pct(overall.get('gate_open_rate'))} |"))
    parts.append(_ci_table(rows, t))
    counts = {k: len(v) for k, v in prompts.items()}
    settings = {(s["sampler"], s["steps"], s["scale"]) for s in (r["settings"] for r in table["cells"].values())}
    per_prompt = next((r["settings"]["samples_per_prompt"] for r in table["cells"].values()), None)
    parts.append(f"{table['model']}: prompts per kind {counts}, {per_prompt} samples per prompt; memorized = SSCD "
                 f"cosine to the nearest bank image > {t}; FID on "
                 f"{table['fd_features'] or '- (no sweep.inception)'}; sampler / steps / scale: "
                 + ", ".join(f"{a} {b} {_scale_text(c)}" for a, b, c in sorted(settings, key=str))
                 + (f"\n\nnot done: {', '.join(table['missing'])}" if table["missing"] else ""))
    return "\n".join(parts) + "\n"


def results_json(table: dict) -> dict:
    """The table in experiments/table_md.py's input format ({"_meta", label: {spec, metrics}})."""
    out = {"_meta": {"model": table["model"], "threshold": table["threshold"], "fd_features": table["fd_features"],
                     "sweep": table["name"]},
           "true renders": {"spec": {}, "metrics": table["truth"]}}
    if table["truth"] is None:                  # Stable Diffusion: no true renders
        del out["true renders"]
    for rec in table["cells"].values():
        out[rec["label"]] = {"spec": rec["settings"], "metrics": rec["metrics"], "cell": rec["cell"]}
    return out


def write_results(config: SweepConfig, bench: dict, records: dict, table: dict | None = None) -> list:
    """Write results.csv / .md / .json, grids/<id>.png and the plots from the cell files; the paths."""
    table = table or build_results(config, bench, records)
    out = config.out
    paths = [write_atomic(os.path.join(out, "results.csv"), lambda f: f.write(results_csv(table))),
             write_atomic(os.path.join(out, "results.md"), lambda f: f.write(results_markdown(table))),
             write_json(os.path.join(out, "results.json"), results_json(table), indent=1)]
    traces = {}
    for cid, rec in table["cells"].items():
        z = _load_samples(out, cid)
        paths.append(img.save_png(os.path.join(out, "grids", cid + ".png"), cell_grid(z, label=rec["label"])))
        if "sigma" in z:
            traces[rec["label"]] = z
    if traces:
        paths.append(plot_similarity_cells(traces, os.path.join(out, "plots", "similarity.png")))
    if table["cells"]:
        paths.append(plot_tradeoff(table, os.path.join(out, "plots", "tradeoff.png")))
    if config.sd is not None:                       # per prompt: max / mean SSCD over its seeds, share above
        for cid, text in prompt_tables(config, table).items():
            paths.append(write_atomic(os.path.join(out, "per_prompt", cid + ".csv"), lambda f, t=text: f.write(t)))
    return paths
