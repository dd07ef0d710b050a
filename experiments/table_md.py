"""Markdown table of a results JSON written by experiments/trained_models.py.

    python experiments/table_md.py experiments/results/trained_text.json
"""
from __future__ import annotations

import json
import sys


def fmt_pct(v):
    return "-" if v is None or v != v else f"{100 * v:.1f}%"


def table(path: str, overall: bool = False) -> str:
    """One row per run; columns per prompt kind (``overall``: the "all" column only)."""
    res = json.load(open(path))
    meta = res.get("_meta", {})
    rows = {k: v for k, v in res.items() if not k.startswith("_")}
    kinds = ["all"] if overall else [k for k in next(iter(rows.values()))["metrics"] if k != "all"]
    ks = " / ".join(kinds)
    head = (f"| method | copied {ks} | nL2<1.4 {ks} | FD {ks} | align {ks} | out of range | gate open |\n"
            "|---|---|---|---|---|---|---|")
    out = [head]
    for name, r in rows.items():
        m = r["metrics"]
        per = lambda key, f: " / ".join(f(m[k][key]) for k in kinds)  # noqa: E731
        gate = m["all"].get("gate_open_rate")
        out.append(f"| {name} | {per('frac_copied', fmt_pct)} | {per('frac_nl2_below_1.4', fmt_pct)} | "
                   f"{per('fd', lambda v: '-' if v is None else f'{v:.2f}')} | {per('alignment', fmt_pct)} | "
                   f"{fmt_pct(m['all']['frac_out_of_range'])} | {fmt_pct(gate) if gate is not None else '-'} |")
    counted = [r for r in rows.values() if "count" in r["metrics"]["all"]]
    n = {k: counted[0]["metrics"][k]["count"] for k in kinds} if counted else {}
    uncond = meta.get("conditioning") == "uncond" or str(meta.get("model", "")).endswith("uncond")
    guidance = "no guidance (unguided sampler)" if uncond else f"scale {meta.get('scale')}"
    out.append(f"\n{meta.get('model')}: {guidance}, {meta.get('sampler')} {meta.get('steps')}, "
               f"samples per kind {n}, copy threshold {meta.get('threshold', float('nan')):.3f}, "
               f"FD on {meta.get('fd_features')}")
    return "\n".join(out)


if __name__ == "__main__":
    overall = "--all" in sys.argv
    for p in [a for a in sys.argv[1:] if a != "--all"]:
        print(table(p, overall))
