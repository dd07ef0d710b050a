"""Hardening of the `amg` command line as a new user meets it: every command with missing or invalid
arguments (wrong types, out-of-range numbers, unknown choices, missing files, outputs that cannot
be written) exits 2 with a one-line message naming the argument, no traceback, and writes nothing;
and the commands work from any working directory (relative outputs land in the cwd, the shipped
checkpoints are found wherever the command runs).

Argument errors already covered elsewhere are not repeated here (tests/test_cli.py: demo / eval,
tests/test_index_build.py: index / convert, tests/apps/test_sample.py: sample,
tests/models/test_zoo.py: train, tests/apps/test_sweep*.py: sweep configs)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from amg_jax.apps import cli
from amg_jax.apps.models import checkpoints_dir
from cli_checks import assert_clean_error, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_dir(path) -> list:
    """A new user's working directory: a file, a folder of images, a binary and a non-UTF-8 file."""
    os.makedirs(path / "imgs")
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path / "imgs" / f"{i}.png")
    (path / "afile").write_text("not a directory")
    (path / "garbage.bin").write_bytes(b"\x00garbage" * 8)
    (path / "nonutf.toml").write_bytes(b"\xff\xfe[sweep]\n")
    (path / "badout.toml").write_text('[sweep]\nmodel = "empirical"\ntestbed = "small"\nprompts_per_kind = 1\n'
                                      'samples_per_prompt = 1\nout = "afile/res"\n\n[[method]]\nname = "CFG"\n'
                                      'guidance = "cfg"\n')
    return sorted(os.listdir(path))


SD = ["sample", "--model", "sd:/no/such/sd", "--prompt", "a cat", "--out", "o"]
IDX = ["index", "build", "imgs", "--out", "b.npz"]
BAD_ARGS = [
    (["nope"], "invalid choice: 'nope'"),
    # demo
    (["demo", "--prompts", "0"], "argument --prompts: must be >= 1, got '0'"),
    (["demo", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
    (["demo", "--scale", "inf"], "argument --scale: must be finite"),
    (["demo", "--out", "afile"], "--out 'afile' exists and is not a directory"),
    (["demo", "--out", "afile/sub", "--models", "empirical"], "--out 'afile/sub' cannot be created"),
    # eval
    (["eval", "--model", "unet"], "argument --model: invalid choice: 'unet'"),
    (["eval", "--c1", "x"], "argument --c1: expected a number, got 'x'"),
    (["eval", "--c3", "-5"], "AMGConfig.c3 must be a finite number >= 0"),
    (["eval", "--max-shift", "-1"], "AMGConfig.max_shift must be"),
    (["eval", "--detector", "ssim"], "argument --detector: invalid choice: 'ssim'"),
    (["eval", "--steps", "1e3"], "argument --steps: expected an integer, got '1e3'"),
    (["eval", "--model", "empirical", "--out", "afile"], "--out 'afile' exists and is not a directory"),
    # train
    (["train", "--kind", "pixel", "--workdir", "w"], "argument --kind: invalid choice: 'pixel'"),
    (["train", "--kind", "text", "--workdir", "w", "--steps", "-2"], "argument --steps: must be >= 1"),
    (["train", "--kind", "text", "--workdir", "w", "--lr", "-1"], "TrainConfig.learning_rate"),
    (["train", "--kind", "text", "--workdir", "w", "--warmup", "-1"], "TrainConfig.warmup_steps"),
    (["train", "--kind", "text", "--workdir", "w", "--cond-dropout", "2"], "TrainConfig.cond_dropout"),
    (["train", "--kind", "text", "--workdir", "w", "--channels", "12"],
     "argument --channels: must be a positive multiple of 8"),
    (["train", "--kind", "text", "--workdir", "afile"], "--workdir 'afile' exists and is not a directory"),
    (["train", "--kind", "text", "--workdir", "w", "--out", "afile/x"], "--out 'afile/x' cannot be created"),
    # evalnet
    (["evalnet"], "the following arguments are required: --out"),
    (["evalnet", "--out", "e", "--steps", "0"], "argument --steps: must be >= 1"),
    (["evalnet", "--out", "e", "--lr", "0"], "argument --lr: must be a finite number > 0, got '0'"),
    (["evalnet", "--out", "e", "--testbed", "huge"], "argument --testbed: invalid choice: 'huge'"),
    (["evalnet", "--out", "afile"], "--out 'afile' exists and is not a directory"),     # not after training
    # sample
    (["sample"], "the following arguments are required: --model, --out"),
    (["sample", "--model", "sd:/no/such/sd", "--out", "o"], "one of the arguments --prompt --prompts-file is required"),
    (SD + ["--prompts-file", "p.txt"], "argument --prompts-file: not allowed with argument --prompt"),
    (SD, "Stable Diffusion directory '/no/such/sd' does not exist"),
    (SD + ["--seeds", "0"], "argument --seeds: must be >= 1"),
    (SD + ["--dtype", "float8"], "argument --dtype: invalid choice: 'float8'"),
    (SD + ["--scale", "nan"], "argument --scale: must be finite"),
    (SD + ["--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    (SD[:-1] + ["afile"], "--out 'afile' exists and is not a directory"),
    # index build
    (["index"], "the following arguments are required: WHAT"),
    (["index", "build", "imgs"], "the following arguments are required: --out"),
    (IDX + ["--size", "8"], "argument --size: expected 2 arguments"),
    (IDX + ["--size", "0", "8"], "argument --size: must be >= 1, got '0'"),
    (IDX + ["--batch", "0"], "argument --batch: must be >= 1"),
    (IDX + ["--embedder", "clip:/no/such/dir"], "'/no/such/dir' does not exist"),
    (IDX + ["--embedder", "dino:x"], "embedder must be 'pixel', 'sscd:PARAMS.npz' or 'clip:DIR_OR_HUB_ID'"),
    (IDX + ["--size", "8", "8", "--captions", "/no/caps.jsonl"], "captions file '/no/caps.jsonl' does not exist"),
    (IDX + ["--size", "8", "8", "--captions", "garbage.bin"], "expected a .jsonl or .csv file"),
    (IDX + ["--copy-threshold", "inf"], "argument --copy-threshold: must be finite"),
    (["index", "build", "garbage.bin", "--out", "b.npz", "--size", "8", "8"], "'garbage.bin' is not a directory"),
    (["index", "build", "imgs", "--out", "imgs", "--size", "8", "8"], "--out 'imgs' is a directory"),
    (["index", "build", "imgs", "--out", "afile/b.npz", "--size", "8", "8"], "--out 'afile/b.npz' cannot be created"),
    # convert
    (["convert"], "the following arguments are required: WHAT"),
    (["convert", "sscd"], "the following arguments are required: src, dst"),
    (["convert", "onnx", "a", "b"], "argument WHAT: invalid choice: 'onnx'"),
    (["convert", "inception", "/no/such.pth", "o.npz"], "convert inception: '/no/such.pth' does not exist"),
    (["convert", "sscd", "garbage.bin", "afile/o.npz"], "dst 'afile/o.npz' cannot be created"),
    # sweep (config contents: tests/apps/test_sweep.py, tests/test_hardening_files.py)
    (["sweep"], "the following arguments are required: config"),
    (["sweep", "imgs"], "sweep config imgs is a directory"),
    (["sweep", "nonutf.toml"], "sweep config nonutf.toml is not valid TOML"),
    (["sweep", "badout.toml"], "badout.toml: sweep.out"),          # before any cell is sampled
    # bench
    (["bench", "--parts", "pipeline,gpu"], "unknown part 'gpu'"),
    (["bench", "--steps", "0"], "argument --steps: must be >= 1"),
    (["bench", "--sd-size", "2.1"], "argument --sd-size: invalid choice: '2.1'"),
    (["bench", "--sd", "/no/such/dir", "--parts", "pipeline"], "'/no/such/dir' is not a directory"),
    (["bench", "--out", "afile"], "--out 'afile' exists and is not a directory"),
]


COMMANDS = ("demo", "eval", "train", "evalnet", "convert", "index", "sample", "sweep", "bench")
NESTED = {"convert": ("sscd", "inception"), "index": ("build",)}


def command_prog(argv) -> str:
    """What an error of ``amg argv`` starts with: ``amg`` and the (sub)commands given, e.g.
    ``amg index build``, whether argparse or the command found the error."""
    words = ["amg"]
    if argv and argv[0] in COMMANDS:
        words.append(argv[0])
        if len(argv) > 1 and argv[1] in NESTED.get(argv[0], ()):
            words.append(argv[1])
    return " ".join(words)


@pytest.mark.parametrize("argv, message", BAD_ARGS, ids=[" ".join(a[0])[:60] for a in BAD_ARGS])
def test_bad_arguments_exit_2_with_one_line_and_write_nothing(tmp_path, monkeypatch, capsys, argv, message):
    """Errors found by argparse and after parsing (a bad AMG value, an unwritable --out, a sweep
    config) read alike: ``amg <command>: error: <message>`` after the command's usage, exit 2."""
    before = _user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(argv, capsys)
    assert_clean_error(code, err, message, prog=command_prog(argv))
    assert sorted(os.listdir(tmp_path)) == before


# ----------------------------------------------------------------------------- another working directory


def test_relative_paths_land_in_the_cwd_and_checkpoints_resolve_anywhere(tmp_path, monkeypatch, capsys):
    """From a fresh cwd: relative --out of `amg eval` / `amg index build` land there; the shipped
    checkpoints/ are found (the trained UNet loads, here refused for the wrong testbed); a relative
    AMG_CHECKPOINTS is taken as an absolute path, so a later chdir does not change it."""
    monkeypatch.delenv("AMG_CHECKPOINTS", raising=False)
    _user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["eval", "--model", "empirical", "--testbed", "small", "--method", "cfg", "--kinds", "duplicated",
                     "--prompts", "1", "--samples", "2", "--steps", "2", "--out", "ev"]) == 0
    assert (tmp_path / "ev" / "metrics.json").is_file() and (tmp_path / "ev" / "samples.png").is_file()
    assert cli.main(["index", "build", "imgs", "--out", "banks/px.npz", "--size", "8", "8", "--no-progress"]) == 0
    assert (tmp_path / "banks" / "px.npz").is_file() and (tmp_path / "banks" / "px.npz.captions.json").is_file()
    capsys.readouterr()
    code, err = run_cli(["eval", "--model", "unet-text", "--testbed", "small", "--out", "x"], capsys)
    assert_clean_error(code, err, "model 'unet-text' was trained on another testbed")   # found and loaded
    assert checkpoints_dir() == os.path.join(ROOT, "checkpoints")
    monkeypatch.setenv("AMG_CHECKPOINTS", "mine")
    assert checkpoints_dir() == str(tmp_path / "mine")
    assert not (tmp_path / "x").exists()


def test_console_script_from_another_cwd(tmp_path):
    """The installed `amg` script (a real process) in a fresh cwd: a relative --out lands there;
    a bad argument exits 2 with one line and no traceback."""
    _user_dir(tmp_path)
    amg = os.path.join(os.path.dirname(sys.executable), "amg")
    if not os.path.isfile(amg):         # not installed as a script: the module entry point
        amg = None
    cmd = [amg] if amg else [sys.executable, "-m", "amg_jax.apps.cli"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=ROOT)
    script = (" ".join(cmd) + " index build imgs --out rel/px.npz --size 8 8 --no-progress && "
              + " ".join(cmd) + " index build imgs --out rel/px2.npz --size 0 8")
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "rel" / "px.npz").is_file(), r.stderr[-2000:]
    assert_clean_error(r.returncode, r.stderr, "argument --size: must be >= 1, got '0'")
    assert not (tmp_path / "rel" / "px2.npz").exists()
