"""Helpers shared by the CLI hardening tests (``tests/`` is on ``sys.path``: pyproject's pytest
``pythonpath``)."""
import os

from amg_jax.apps import cli


def listing(path) -> list:
    """Every file and folder under ``path`` (relative), sorted."""
    return sorted(os.path.relpath(os.path.join(r, n), path) for r, ds, fs in os.walk(path) for n in ds + fs)


def run_cli(argv, capsys) -> tuple[int, str]:
    """(exit code, stderr) of ``amg argv`` in-process; fails on any exception but SystemExit."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_clean_error(code, err, message, prog: str | None = None) -> None:
    """Exit 2, no traceback, and exactly one line saying ``error: ... message ...`` (after the usage);
    with ``prog`` (e.g. "amg eval") that line starts ``amg eval: error: `` and the usage names it too,
    as argparse words its own errors of a subcommand."""
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
    assert message in errors[0], err
    if prog is not None:
        assert errors[0].startswith(f"{prog}: error: "), err
        assert err.startswith(f"usage: {prog} "), err
