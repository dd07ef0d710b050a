"""A pytest plugin that measures how close every numerical comparison comes to its tolerance.

Enable with ``-p tolerance_audit`` and ``AMG_TOLERANCE_AUDIT=DIR``: each worker writes
``DIR/<worker>.jsonl``, one line per comparison site that ran, ``{"test", "site", "margin",
"count"}`` where ``margin`` = max over the site's calls of ``max |actual - desired| / (atol +
rtol |desired|)`` (1.0 = exactly at the tolerance; a failure is > 1). Covered:
``np.testing.assert_allclose`` (and through it ``chex.assert_trees_all_close``),
``np.allclose`` / ``np.isclose`` and ``pytest.approx``. Comparing two runs under conditions
that change round-off but not results (BLAS threads, ISA, device count, test order) shows which
tolerances are fragile: ``python tests/tolerance_audit.py DIR_A DIR_B``.

``AMG_TEST_ORDER=reverse`` also runs the collected tests in reverse order.
"""
from __future__ import annotations

import json
import math
import os
import sys
import traceback

import numpy as np
import pytest

_DIR = os.environ.get("AMG_TOLERANCE_AUDIT")
_HERE = os.path.dirname(os.path.abspath(__file__))
_records: dict = {}
_current = {"test": None}


def _site() -> str:
    """file:line of the innermost frame inside tests/ (the assertion that called us)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename.startswith(_HERE) and not frame.filename.endswith("tolerance_audit.py"):
            return f"{os.path.relpath(frame.filename, os.path.dirname(_HERE))}:{frame.lineno}"
    return "?"


def _margin(actual, desired, rtol, atol) -> float:
    try:
        a = np.asarray(actual, dtype=np.float64)
        d = np.asarray(desired, dtype=np.float64)
        a, d = np.broadcast_arrays(a, d)
    except (TypeError, ValueError):
        return float("nan")
    if a.size == 0:
        return 0.0
    both_nan = np.isnan(a) & np.isnan(d)
    same_inf = np.isinf(a) & np.isinf(d) & (np.sign(a) == np.sign(d))
    keep = ~(both_nan | same_inf)
    if not keep.any():
        return 0.0
    err = np.abs(a[keep] - d[keep])
    tol = atol + rtol * np.abs(d[keep])
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(tol > 0, err / tol, np.where(err > 0, np.inf, 0.0))
    return float(np.nanmax(m)) if np.isfinite(m).any() or np.isinf(m).any() else float("nan")


def _record(margin: float) -> None:
    test = _current["test"]
    if test is None or _DIR is None:
        return
    key = (test, _site())
    rec = _records.setdefault(key, {"margin": 0.0, "count": 0})
    rec["count"] += 1
    if not math.isnan(margin):
        rec["margin"] = max(rec["margin"], margin)


def _install() -> None:
    orig_assert = np.testing.assert_allclose
    orig_allclose = np.allclose
    orig_isclose = np.isclose

    def assert_allclose(actual, desired, rtol=1e-07, atol=0, *args, **kw):
        _record(_margin(actual, desired, rtol, atol))
        return orig_assert(actual, desired, rtol, atol, *args, **kw)

    def allclose(a, b, rtol=1e-05, atol=1e-08, *args, **kw):
        _record(_margin(a, b, rtol, atol))
        return orig_allclose(a, b, rtol, atol, *args, **kw)

    def isclose(a, b, rtol=1e-05, atol=1e-08, *args, **kw):
        _record(_margin(a, b, rtol, atol))
        return orig_isclose(a, b, rtol, atol, *args, **kw)

    np.testing.assert_allclose = assert_allclose
    np.allclose = allclose
    np.isclose = isclose

    from _pytest.approx import ApproxScalar

    orig_eq = ApproxScalar.__eq__

    def eq(self, actual):
        try:
            tol = self.tolerance
            err = abs(float(self.expected) - float(actual))
            _record(err / tol if tol > 0 else (math.inf if err > 0 else 0.0))
        except (TypeError, ValueError, OverflowError):
            pass
        return orig_eq(self, actual)

    ApproxScalar.__eq__ = eq


if _DIR is not None:
    _install()


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("AMG_TEST_ORDER") == "reverse":
        items.reverse()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _current["test"] = item.nodeid
    yield
    _current["test"] = None


def _write(rows: list) -> None:
    os.makedirs(_DIR, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    with open(os.path.join(_DIR, f"{worker}.jsonl"), "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def pytest_runtest_logreport(report):
    """After each test: its comparison sites, and its outcome when it failed (written at once, so a
    run that crashes keeps what it measured)."""
    if _DIR is None or report.when != "teardown" and not report.failed:
        return
    if report.failed:
        _write([{"test": report.nodeid, "site": f"<{report.when} failed>", "margin": math.inf, "count": 1,
                 "failed": str(report.longrepr)[-2000:]}])
    if report.when == "teardown":
        rows = [{"test": t, "site": s, **r} for (t, s), r in sorted(_records.items()) if t == report.nodeid]
        for t, s in [(t, s) for (t, s) in _records if t == report.nodeid]:
            del _records[(t, s)]
        _write(rows)


def load(folder: str) -> dict:
    """{(test, site): margin} of one audit folder."""
    out = {}
    for name in os.listdir(folder):
        if name.endswith(".jsonl"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    r = json.loads(line)
                    key = (r["test"], r["site"])
                    if "failed" in r:
                        print(f"FAILED in {folder}: {r['test']} ({r['site']}): ...{r['failed'][-300:]}")
                    out[key] = max(out.get(key, 0.0), r["margin"])
    return out


def main(folders: list[str]) -> None:
    """Print the comparison sites whose margin exceeds 0.1 in any run, worst first."""
    runs = [load(f) for f in folders]
    keys = sorted(set().union(*runs), key=lambda k: -max(r.get(k, 0.0) for r in runs))
    print("margin = max |err| / tolerance (1 = at the tolerance); " + " | ".join(folders))
    for k in keys:
        ms = [r.get(k) for r in runs]
        if max(m or 0.0 for m in ms) < 0.1:
            break
        print(" | ".join("-" if m is None else f"{m:8.3g}" for m in ms), " ", k[1], k[0].split("::")[-1])


if __name__ == "__main__":
    main(sys.argv[1:])
