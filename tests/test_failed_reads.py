"""failed_reads: the leftovers of a failed orbax restore are dropped, nothing else is."""
import os
import shutil
import subprocess
import sys
import textwrap
import types

from amg_jax import failed_reads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unraisable(exc_factory, where: str):
    """An UnraisableHookArgs-like record of the exception ``exc_factory()`` raised inside a function named ``where``."""
    ns = {}
    exec(f"def {where}(f):\n    raise f()\n", ns)
    try:
        ns[where](exc_factory)
    except BaseException as e:     # noqa: BLE001
        return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__, err_msg=None,
                                     object=None)


def test_only_the_closed_loop_leftover_is_dropped(monkeypatch):
    leftover = _unraisable(lambda: RuntimeError("Event loop is closed"), "call_soon_threadsafe")
    others = [_unraisable(lambda: RuntimeError("Event loop is closed"), "somewhere_else"),
              _unraisable(lambda: RuntimeError("something else"), "call_soon_threadsafe"),
              _unraisable(lambda: ValueError("Event loop is closed"), "call_soon_threadsafe")]
    assert failed_reads.is_closed_loop_leftover(leftover)
    assert not any(failed_reads.is_closed_loop_leftover(u) for u in others)
    seen = []
    hook = seen.append
    monkeypatch.setattr(sys, "unraisablehook", hook)
    failed_reads.quiet_failed_reads()
    failed_reads.quiet_failed_reads()             # once: not wrapped twice
    assert sys.unraisablehook.previous is hook
    for u in [leftover] + others:
        sys.unraisablehook(u)
    assert seen == others


def test_a_truncated_model_fails_with_one_clear_error_and_no_leftovers(tmp_path):
    """Loading a shipped model whose largest weights file is cut short: the error names the
    params folder, and stderr carries none of orbax's 'Event loop is closed' tracebacks (before
    failed_reads there were 8, one per array read in flight)."""
    d = tmp_path / "text"
    shutil.copytree(os.path.join(REPO, "checkpoints", "text"), d)
    files = [os.path.join(r, f) for r, _, fs in os.walk(d / "params") for f in fs]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 3)
    code = textwrap.dedent(f"""
        import gc
        from amg_jax.models import zoo
        try:
            zoo.load_model({str(d)!r})
        except ValueError as e:
            print("ERROR", e)
        gc.collect()
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"ERROR {d}/params: the weights" in res.stdout
    assert "Event loop is closed" not in res.stderr and "Traceback" not in res.stderr, res.stderr[-2000:]
