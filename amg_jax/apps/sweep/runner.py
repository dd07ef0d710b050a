"""Running a sweep: every cell not done yet (resumable, failures collected in ``SweepError``),
then the results; ``main`` is `amg sweep CONFIG`."""
from __future__ import annotations

import os

import jax
from tqdm.auto import tqdm

from amg_jax.apps.sweep.backends import make_backend
from amg_jax.apps.sweep.cells import _read, _write_cell, cell_status
from amg_jax.apps.sweep.config import CELL_FORMAT, SSCD_THRESHOLD, Cell, SweepConfig, load_config
from amg_jax.apps.sweep.results import _fd, _pct, build_results, write_results
from amg_jax.apps.sweep.settings import _jsonable, bench_settings, cell_settings
from amg_jax.jsonio import write_json


class SweepError(RuntimeError):
    """Some cells failed; every other cell was run and written (``failures``: {cell id: exception})."""

    def __init__(self, message: str, failures: dict):
        super().__init__(message)
        self.failures = failures


def _writer() -> bool:
    return jax.process_index() == 0


def _progress_bar(total: int, enabled: bool):
    return tqdm(total=total, disable=not enabled, unit="cell", dynamic_ncols=True)


def _line(i: int, n: int, cell: Cell, m: dict, seconds: float) -> str:
    r = m["all"]
    gate = r.get("gate_open_rate")
    if "sscd_mean" in r:                        # Stable Diffusion
        clip = r.get("clip_score")
        return (f"[{i}/{n}] {cell.id}: SSCD>{SSCD_THRESHOLD:g} {r['frac_copied']:.1%}  SSCD mean {r['sscd_mean']:.3f}"
                f"  FID {_fd(r['fd'])}" + (f"  CLIP {clip:.2f}" if clip is not None else "")
                + (f"  gate {gate:.1%}" if gate is not None else "") + f"  ({seconds:.1f} s)")
    return (f"[{i}/{n}] {cell.id}: copied {r['frac_copied']:.1%}  nL2<1.4 {r['frac_nl2_below_1.4']:.1%}  "
            f"FD {_fd(r['fd'])}  align {_pct(r['alignment'])}  out {r['frac_out_of_range']:.1%}"
            + (f"  gate {gate:.1%}" if gate is not None else "") + f"  ({seconds:.1f} s)")


def run_sweep(config: SweepConfig, *, progress: bool = True, echo=print) -> dict:
    """Run every cell of ``config`` not done yet, then write the results (the package docstring);
    returns the results table (``build_results``)."""
    writer = _writer()
    say = echo if writer else (lambda *a, **k: None)
    settings = {c.id: cell_settings(config, c) for c in config.cells}
    status = {c.id: cell_status(config.out, c.id, settings[c.id]) for c in config.cells}
    todo = [c for c in config.cells if status[c.id][0] != "done"]
    bench_path = os.path.join(config.out, "bench.json")
    bench = _read(bench_path) if os.path.exists(bench_path) else None
    if not (isinstance(bench, dict) and bench.get("settings") == _jsonable(bench_settings(config))):
        bench = None
    bar = _progress_bar(len(config.cells), progress and writer)
    if progress and writer and echo is print:      # lines above the bar, not through it
        say = bar.write
    n = len(config.cells)
    records, failures = {}, {}
    try:
        backend = make_backend(config, echo=say) if todo or bench is None else None
        say(f"sweep {config.name}: {config.model}, {n} cells ({n - len(todo)} done before) -> {config.out}")
        if bench is None:
            bench = backend.bench_record()
            if writer:
                write_json(bench_path, bench, indent=1)
        for i, cell in enumerate(config.cells, 1):
            state, info = status[cell.id]
            if state == "done":
                records[cell.id] = info
                say(f"[{i}/{n}] {cell.id}: done before, skipped")
                bar.update(1)
                continue
            if state == "stale":
                say(f"warning: [{i}/{n}] {cell.id}: the stored cell has other settings ({', '.join(info)}); re-running")
            bar.set_description(cell.id)
            try:
                run = backend.run_cell(cell, settings[cell.id])
            except Exception as e:          # keep going: the other cells are still worth having
                failures[cell.id] = e
                say(f"[{i}/{n}] {cell.id}: FAILED: {type(e).__name__}: {e}")
                bar.update(1)
                continue
            rec = _jsonable({"format": CELL_FORMAT, "cell": cell.id, "method": cell.method, "label": cell.label,
                             "grid": dict(cell.grid), "settings": settings[cell.id], "metrics": run.metrics,
                             "seconds": round(run.seconds, 3), "chunk": config.chunk})
            if writer:
                _write_cell(config.out, cell, rec, run)
            records[cell.id] = rec
            say(_line(i, n, cell, rec["metrics"], run.seconds))
            bar.update(1)
    finally:
        bar.close()
    table = build_results(config, bench, records)
    if writer:
        paths = write_results(config, bench, records, table)
        say(f"wrote {', '.join(os.path.relpath(p, config.out) for p in paths)} in {config.out}")
    if failures:
        raise SweepError(f"sweep {config.name}: {len(failures)} of {n} cells failed (the others are written; "
                         "re-run to retry them): " + "; ".join(f"{k}: {type(e).__name__}: {e}"
                                                             for k, e in failures.items()), failures)
    return table


def main(config_path, *, progress: bool = True, echo=print) -> dict:
    """`amg sweep CONFIG`: validate the config (before any work), run it, return the results
    table (``build_results``)."""
    return run_sweep(load_config(config_path), progress=progress, echo=echo)
