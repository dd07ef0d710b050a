"""The bench report: ``bench.json`` (JSON-safe) and ``bench.md`` (the tables)."""
from __future__ import annotations

from amg_jax.apps.bench.config import RATIO_MEANING, TARGETS
from amg_jax.jsonio import json_safe

def _clean(v):
    """JSON-safe, as ``bench.json`` is written (``jsonio.json_safe``: numpy scalars to Python,
    non-finite floats to None = ``null``, "not measured", since NaN is not JSON; tuples to
    lists), keys as strings; the markdown and the returned report read the same values."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return json_safe(v)


def _fmt(v, spec: str = ".3g") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0%}"


_COLUMNS = {
    "pipeline": [("run", "name", str), ("s / batch", "seconds", _fmt), ("s / image", "s_per_image", _fmt),
                 ("images/s", "images_per_s", _fmt), ("x pipeline", "ratio", lambda v: f"{v:.2f}x"),
                 ("compile s", "compile_s", lambda v: f"{v:.1f}")],
    "kernels": [("run", "name", str), ("s / batch", "seconds", _fmt), ("images/s", "images_per_s", _fmt),
                ("x float32 xla", "ratio", lambda v: f"{v:.2f}x"), ("compile s", "compile_s", lambda v: f"{v:.1f}"),
                ("peak GiB", "peak_memory_bytes", lambda v: f"{v / 2**30:.2f}"),
                ("max |px diff|", "max_abs_diff_vs_reference", lambda v: f"{v:.1e}")],
    "amg": [("model / detector", "group", str), ("run", "name", str), ("s", "seconds", _fmt),
            ("x CFG", "ratio", lambda v: f"{v:.2f}x"), ("compile s", "compile_s", lambda v: f"{v:.1f}"),
            ("gate open", "gate_open", _pct), ("steps any open", "steps_any_open", _pct),
            ("GFLOP", "gflops", _fmt)],
    "search": [("run", "name", str), ("ms / call", "ms", lambda v: f"{v:.3f}"),
               ("x denoiser call", "ratio", lambda v: f"{v:.3g}"), ("agrees with exact", "agrees_with_exact", _pct),
               ("compile s", "compile_s", lambda v: f"{v:.1f}")],
    "devices": [("run", "name", str), ("images/s", "images_per_s", _fmt),
                ("per device", "images_per_s_per_device", _fmt), ("x 1 device", "ratio", lambda v: f"{v:.2f}x"),
                ("compile s", "compile_s", lambda v: f"{v:.1f}")],
}


def _met_text(met) -> str:
    return {True: "met", False: "NOT met", None: "not evaluated in this run"}[met]


def markdown(report: dict) -> str:
    """bench.md: the machine, then per part its target (met or not), a table and notes."""
    m, st = report["machine"], report["settings"]
    kinds = sorted(set(m["device_kinds"]))
    v = m["versions"]
    out = ["# amg bench", "",
           f"{report['created']} · {m['device_count']} x {', '.join(kinds)} ({m['platform']})"
           + (" — simulated devices sharing the CPU" if m["simulated_devices"] else "")
           + f" · {m['cpu_count']} CPUs · jax {v['jax']}, flax {v['flax']}, diffusers {v['diffusers']}", "",
           f"Settings: {'tiny' if st['tiny'] else 'quick' if st['quick'] else 'full'} · SD {st['sd_size']}"
           f"{' (' + st['sd_path'] + ')' if st['sd_path'] else ''} · DDIM {st['steps']} steps, batch {st['batch']} · "
           f"median of {st['repeats']} after a warm-up call. Every ratio is against a reference measured in this "
           f"run.", ""]
    for name, part in report["parts"].items():
        out += [f"## {name}: {part.get('title', '')}", ""]
        if "error" in part:
            state = ("incomplete" if part.get("incomplete") else
                     "stopped" if part["error"].startswith("interrupted") else "failed")
            out += [f"**{state}**: {part['error']}", ""]
            if not part.get("rows"):
                continue
            out += [f"The {len(part['rows'])} rows it finished (ratio: {RATIO_MEANING[name]}):", ""]
        else:
            verdict = "" if name == "devices" else f" — **{_met_text(part.get('met'))}**"
            out += [f"Target: {TARGETS[name]}{verdict}. Measured: {part.get('headline', '')}.", "",
                    f"Ratio: {RATIO_MEANING[name]}.", ""]
        cols = _COLUMNS[name]
        out.append("| " + " | ".join(c[0] for c in cols) + " |")
        out.append("|" + "---|" * len(cols))
        for row in part["rows"]:
            cells = []
            for _, key, f in cols:
                val = row.get(key)
                cells.append("-" if val is None else f(val))
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        extra = []
        for ref, d in (part.get("max_abs_diff_by_reference") or {}).items():
            extra.append(f"same latents, max |[0, 1] pixel difference| ours vs diffusers' {ref} pipeline: {d:.2e}")
        if "max_abs_diff" in part and "max_abs_diff_by_reference" not in part and part["max_abs_diff"] is not None:
            extra.append(f"same latents, max |pixel difference| ours vs pipeline: {part['max_abs_diff']:.2e}")
        mem = part.get("peak_memory_bytes")
        extra.append("peak device memory so far: " + ("n/a (not reported by this backend)" if mem is None
                                                      else f"{mem / 2 ** 30:.2f} GiB"))
        extra.append(f"part wall time: {part.get('wall_s', 0):.1f} s")
        out += [f"- {x}" for x in extra + list(part.get("notes", []))] + [""]
    return "\n".join(out)
