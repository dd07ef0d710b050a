"""Hardening against damaged files, through the commands a user runs: a trained-model checkpoint
directory (truncated / garbage weights, a card.json that is not JSON or is another model's), a
reference bank (truncated, another format, arrays missing) and its captions file, SSCD / Inception
params files (garbage, another format) and sweep configs (bad values): each gives exit 2 and one
line naming the file, no traceback, and nothing written (the loaders' own messages are tested
with their modules: tests/models/test_zoo.py, tests/test_index.py, tests/similarity/)."""
import json
import os
import shutil

import numpy as np
import pytest

from amg_jax.apps.models import checkpoints_dir
from amg_jax.index import build_bank, save_bank
from amg_jax.similarity import sscd

from cli_checks import assert_clean_error, listing, run_cli

SSCD_CFG = sscd.SSCDConfig(stage_sizes=(1, 1), width=4, embed_dim=8, image_size=32)
# orbax leaves an unraisable "Event loop is closed" after a failed read of damaged weights (collected later)
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _user_dir(path) -> None:
    """A working directory with a folder of images."""
    from PIL import Image

    os.makedirs(path / "imgs")
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(path / "imgs" / f"{i}.png")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny SSCD params file, an 8-d embedding bank of it with captions, a prompts file."""
    d = tmp_path_factory.mktemp("good")
    sscd.save_params(str(d / "sscd.npz"), sscd.init_params(SSCD_CFG, seed=0), SSCD_CFG)
    rows = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    save_bank(str(d / "bank.npz"), build_bank(rows, np.array([0, 1, -1], np.int32), kind="embedding", normalize=True))
    json.dump({"captions": ["a cat", "a dog"]}, open(d / "bank.npz.captions.json", "w"))
    (d / "prompts.txt").write_text("a cat\na dog\n")
    return d


def _damage(path, how: str) -> None:
    """Damage the file ``path`` in place: "truncate" to a third, "garbage" bytes."""
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 3)
    else:
        open(path, "wb").write(b"\x89garbage\x00" * 16)


# ----------------------------------------------------------------------------- trained-model checkpoints


def _weights(model_dir) -> str:
    """The largest file of the checkpoint's params/ (the bulk of the weights)."""
    files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(model_dir, "params")) for f in fs]
    return max(files, key=os.path.getsize)


def _card(model_dir, change):
    p = os.path.join(model_dir, "card.json")
    card = json.load(open(p))
    change(card)
    json.dump(card, open(p, "w"))


DAMAGES = {   # name: (damage the copied checkpoints/text, what the message names)
    "truncated weights": (lambda d: _damage(_weights(d), "truncate"), "text/params: the weights"),
    "garbage weights": (lambda d: [_damage(os.path.join(r, f), "garbage") for r, _, fs in
                                   os.walk(os.path.join(d, "params")) for f in fs], "text/params: the weights"),
    "card not JSON": (lambda d: open(os.path.join(d, "card.json"), "w").write('{"kind": "text",'),
                      "text/card.json is unreadable"),
    "card of another config": (lambda d: _card(d, lambda c: c["unet"].update(channels=8)),
                               "text/params: the weights do not match the card's UNet config"),
    "card of another kind": (lambda d: _card(d, lambda c: c.update(kind="class")), "text/card.json"),
    "truncated bank": (lambda d: _damage(os.path.join(d, "bank.npz"), "truncate"), "text/bank.npz"),
}


@pytest.fixture(scope="module")
def damaged_checkpoints(tmp_path_factory):
    """{damage: a checkpoints root whose text/ model is damaged so}."""
    out = {}
    for name, (damage, _) in DAMAGES.items():
        root = tmp_path_factory.mktemp("ckpt")
        shutil.copytree(os.path.join(checkpoints_dir(), "text"), root / "text")
        damage(str(root / "text"))
        out[name] = str(root)
    return out


@pytest.mark.parametrize("command, damage", [("eval", d) for d in DAMAGES]
                         + [("demo", "truncated weights"), ("demo", "card not JSON")])
def test_damaged_checkpoint_is_named_and_nothing_is_written(damaged_checkpoints, tmp_path, monkeypatch, capsys,
                                                            command, damage):
    root = damaged_checkpoints[damage]
    monkeypatch.setenv("AMG_CHECKPOINTS", root)
    monkeypatch.chdir(tmp_path)
    argv = [command, "--prompts", "1", "--samples", "1", "--steps", "1", "--out", "out"]
    code, err = run_cli(argv + (["--methods", "cfg", "--no-progress"] if command == "demo" else ["--method", "cfg"]),
                        capsys)
    assert_clean_error(code, err, os.path.join(root, DAMAGES[damage][1]))
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- banks, captions, params files


def _bank_variant(d, good, kind: str) -> str:
    """A damaged copy of the good bank (or its captions) in ``d``; returns the bank path."""
    p = str(d / "bank.npz")
    shutil.copy(good / "bank.npz", p)
    shutil.copy(good / "bank.npz.captions.json", p + ".captions.json")
    if kind == "truncated":
        _damage(p, "truncate")
    elif kind == "another format":
        shutil.copy(good / "sscd.npz", p)
    elif kind == "arrays missing":
        with np.load(good / "bank.npz") as z:
            np.savez(p, metadata=z["metadata"], rows=z["rows"])
    elif kind == "captions not JSON":
        open(p + ".captions.json", "w").write("{oops")
    elif kind == "captions without a list":
        json.dump({"captions": "a cat"}, open(p + ".captions.json", "w"))
    return p


BANKS = [("truncated", "not a readable .npz file (truncated or corrupt?)"),
         ("another format", "no 'metadata' entry: not a reference bank file"),
         ("arrays missing", "missing entries ['sq_norms', 'labels', 'source_index']"),
         ("captions not JSON", "bank.npz.captions.json is unreadable"),
         ("captions without a list", "bank.npz.captions.json has no 'captions' list of strings")]


@pytest.mark.parametrize("kind, message", BANKS, ids=[b[0] for b in BANKS])
def test_amg_sample_names_a_damaged_bank_before_loading_the_model(good, tmp_path, monkeypatch, capsys, kind, message):
    """The bank, its captions and the SSCD params are read before the (large) model: the error is
    about the damaged file although the model path does not exist either."""
    bank = _bank_variant(tmp_path, good, kind)
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    code, err = run_cli(["sample", "--model", "sd:/no/such/sd", "--prompt", "a cat", "--out", "out", "--guidance",
                         "amg", "--detector", f"sscd:{good / 'sscd.npz'}", "--bank", bank], capsys)
    assert_clean_error(code, err, message)
    assert "bank.npz" in err and listing(tmp_path) == before


@pytest.mark.parametrize("kind, message", [("garbage", "is not a readable .npz file"),
                                           ("another format", "has no '__config__' entry")])
def test_damaged_sscd_params_are_named_by_sample_and_index_build(good, tmp_path, monkeypatch, capsys, kind, message):
    bad = tmp_path / "sscd.npz"
    if kind == "garbage":
        _damage(bad, "garbage")
    else:
        shutil.copy(good / "bank.npz", bad)              # a reference bank passed as SSCD params
    _user_dir(tmp_path)
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    for argv in (["sample", "--model", "sd:/no/such/sd", "--prompt", "a cat", "--out", "out", "--guidance", "amg",
                  "--detector", "sscd:sscd.npz", "--bank", str(good / "bank.npz")],
                 ["index", "build", "imgs", "--out", "b.npz", "--embedder", "sscd:sscd.npz"]):
        code, err = run_cli(argv, capsys)
        assert_clean_error(code, err, message)
        assert "'sscd.npz'" in err, err
    assert listing(tmp_path) == before


def _sd_sweep(d, good, **keys) -> str:
    """An SD sweep config (a hub id as the model: only validated, never loaded) with ``keys`` replaced."""
    s = dict(model='"sd:someone/tiny-sd"', prompts_file=json.dumps(str(good / "prompts.txt")), samples_per_prompt=1,
             sscd=json.dumps(str(good / "sscd.npz")), bank=json.dumps(str(good / "bank.npz")), out='"out"')
    s.update(keys)
    path = d / "sweep.toml"
    path.write_text("[sweep]\n" + "".join(f"{k} = {v}\n" for k, v in s.items())
                    + '\n[[method]]\nname = "CFG"\nguidance = "cfg"\n')
    return str(path)


@pytest.mark.parametrize("key, kind, message", [
    ("sscd", "garbage", "sweep.sscd '{path}' is not a readable .npz file"),
    ("bank", "garbage", "sweep.bank '{path}' is not a readable .npz file"),
    ("bank", "sscd", "sweep.bank '{path}' is not a reference bank"),
    ("inception", "garbage", "sweep.inception '{path}' is not a readable .npz file"),
    ("inception", "sscd", "sweep.inception '{path}' is not an Inception params file"),
    ("steps", "value", "sweep.steps must be an integer >= 1"),
    ("samples_per_prompt", "value", "sweep.samples_per_prompt must be an integer >= 1"),
])
def test_sweep_names_a_damaged_file_or_bad_value(good, tmp_path, capsys, key, kind, message):
    path = tmp_path / f"{key}.npz"
    if kind == "garbage":
        _damage(path, "garbage")
    elif kind == "sscd":
        shutil.copy(good / "sscd.npz", path)
    extra = {key: json.dumps(str(path))} if kind != "value" else {key: '"3"' if key == "steps" else 0.5}
    if key == "inception":
        os.makedirs(tmp_path / "refs")
        extra["reference_images"] = json.dumps(str(tmp_path / "refs"))
    config = _sd_sweep(tmp_path, good, **extra)
    before = listing(tmp_path)
    code, err = run_cli(["sweep", config, "--no-progress"], capsys)
    assert_clean_error(code, err, message.format(path=path))
    assert listing(tmp_path) == before


@pytest.mark.torch
@pytest.mark.parametrize("what", ["sscd", "inception"])
def test_convert_names_a_garbage_weights_file(tmp_path, monkeypatch, capsys, what):
    _damage(tmp_path / "weights.pt", "garbage")
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["convert", what, "weights.pt", "out.npz"], capsys)
    assert_clean_error(code, err, "could not read 'weights.pt'")
    assert os.listdir(tmp_path) == ["weights.pt"]
