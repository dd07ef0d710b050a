"""``bench.main``: run the parts, write bench.json and bench.md."""
from __future__ import annotations

import dataclasses
import datetime
import os
import signal
import sys
import tempfile
import threading
import time
from typing import Any, Callable

from amg_jax.apps.bench.amg import part_amg
from amg_jax.apps.bench.devices import part_devices
from amg_jax.apps.bench.kernels import part_kernels
from amg_jax.apps.bench.models import _Shared
from amg_jax.apps.bench.pipeline import part_pipeline
from amg_jax.apps.bench.report import _clean, _met_text, markdown
from amg_jax.apps.bench.search import part_search
from amg_jax.apps.bench.config import (FORMAT, FORMAT_VERSION, RATIO_MEANING, TARGETS, machine, parse_parts,
                                         peak_memory_bytes, settings)
from amg_jax.jsonio import write_atomic, write_json

PART_FUNCTIONS = {"pipeline": part_pipeline, "kernels": part_kernels, "amg": part_amg, "search": part_search, "devices": part_devices}


class BenchInterrupted(BaseException):
    """SIGTERM (``timeout``, a scheduler) during a run: the running part's finished rows are written,
    then the run ends with exit status 143. A BaseException, so no part's ``except Exception`` eats it."""


def _raise_interrupted(signum, frame):
    raise BenchInterrupted(f"interrupted by signal {signum}")


def _on_sigterm():
    """Install ``_raise_interrupted`` for SIGTERM (main thread only; signals go there); returns
    the previous handler to restore, or None where none was installed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_interrupted)



def main(out_dir, *, quick: bool = False, parts=None, echo: Callable[[str], Any] = print, tiny: bool = False,
         sd_size: str = "tiny", sd_path: str | None = None, sd=None, steps: int | None = None,
         batch: int | None = None, repeats: int | None = None, seed: int = 0, dtype: str = "float32",
         attention: str = "auto") -> dict:
    """Run the bench ``parts`` (default all of ``PARTS``) and write ``out_dir/bench.json`` and
    ``out_dir/bench.md``; returns the report (the JSON's content).

    quick:   the tiny SD, 3 steps, batch 4, banks up to 10k (< 2 minutes on 2 CPU cores).
    tiny:    smaller still (2 steps, batch 2, one 1k bank, one repeat): the tests' setting.
    sd_size: "tiny" | "1.5" | "xl" (a random SD-1.5- / SDXL-sized model; only meaningful on an accelerator;
             quick / tiny runs use the tiny one). sd_path: a diffusers SD directory instead;
             sd: an already loaded ``StableDiffusion`` (``load_stable_diffusion``) instead.
    steps / batch / repeats: override the SD runs' DDIM steps, batch and timed repeats.
    dtype / attention: the SD networks' dtype and attention implementation ("auto" | "xla" | "cudnn").
    echo:    progress lines (``print``; ``lambda *_: None`` for silence).
    Everything is validated (ValueError naming the bad part / value) before any work. A part
    that fails is recorded with its error and the rows it finished, and the others still run;
    the files are rewritten after each part and each row a part records (``env.record``), so a
    run stopped by SIGTERM (``timeout``; exit status 143) or killed keeps what it finished.
    """
    names = parse_parts(parts)
    if sd is not None and not hasattr(sd, "unet_params"):
        raise ValueError(f"bench: sd must be a loaded StableDiffusion (load_stable_diffusion), got {type(sd).__name__}")
    s = settings(quick=quick, tiny=tiny, sd_size=sd_size, sd_path=sd_path, steps=steps, batch=batch,
                 repeats=repeats, seed=seed, dtype=dtype, attention=attention)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    report = {"format": FORMAT, "version": FORMAT_VERSION,
              "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "command": " ".join(sys.argv) if sys.argv else "", "machine": machine(),
              "settings": dict(dataclasses.asdict(s), parts=list(names)),
              "targets": {n: TARGETS[n] for n in names}, "ratio_meaning": {n: RATIO_MEANING[n] for n in names},
              "parts": {}}
    if (quick or tiny) and sd_size != "tiny" and sd_path is None:
        echo(f"[bench] note: quick / tiny runs use the tiny SD (sd_size={sd_size!r} ignored)")
    json_path, md_path = os.path.join(out_dir, "bench.json"), os.path.join(out_dir, "bench.md")

    def write():
        clean = _clean(report)
        write_json(json_path, clean)
        write_atomic(md_path, lambda f: f.write(markdown(clean)))

    def stopped(name: str, t0: float, error: str) -> dict:
        """The part that stopped midway: its error and the rows it finished (``env.record``)."""
        return {"title": name, "error": error, "rows": list(env.rows_done), "met": None,
                "wall_s": time.perf_counter() - t0}

    previous = _on_sigterm()
    try:
        with tempfile.TemporaryDirectory(prefix="amg-bench-") as work:
            env = _Shared(s, work, echo, sd)
            for name in names:
                echo(f"[bench] part {name} ...")
                t0 = time.perf_counter()
                env.rows_done = []

                def partial(name=name, t0=t0):
                    report["parts"][name] = dict(stopped(name, t0, "incomplete: the part is still running"),
                                                 incomplete=True)
                    write()

                env.on_row = partial
                try:
                    part = PART_FUNCTIONS[name](env)
                except BenchInterrupted as e:
                    n = len(env.rows_done)
                    report["parts"][name] = stopped(name, t0, f"{e} after {n} row{'' if n == 1 else 's'}")
                    write()
                    echo(f"[bench] part {name} {e}; the rows it finished are in {json_path}")
                    raise SystemExit(128 + signal.SIGTERM) from None
                except Exception as e:     # noqa: BLE001  record it with the rows it finished, keep the other parts
                    part = stopped(name, t0, f"{type(e).__name__}: {e}")
                    echo(f"[bench] part {name} failed: {part['error']}")
                env.on_row = None
                part["wall_s"] = time.perf_counter() - t0
                part["peak_memory_bytes"] = peak_memory_bytes()
                report["parts"][name] = part
                write()
                if "error" not in part:
                    verdict = "" if name == "devices" else f"target {_met_text(part['met'])}: "
                    echo(f"[bench] {name}: {verdict}{part['headline']} ({part['wall_s']:.1f} s)")
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return _clean(report)


__all__ = ["BenchInterrupted", "PART_FUNCTIONS", "main"]
