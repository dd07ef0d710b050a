"""Building a reference bank from an image folder: captions, resume, unreadable images."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from amg_jax.index import load_bank
from amg_jax.index_build import build_index, list_images, load_captions, load_image


def _write_images(folder, n, seed=0, size=12):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    imgs = []
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(os.path.join(folder, f"img_{i:03d}.png"))
        imgs.append(a)
    return imgs


class CountingEmbedder:
    """Mean colour + a few pixel statistics ([b, H, W, 3] -> [b, 6]); counts images embedded."""

    def __init__(self):
        self.seen = 0

    def __call__(self, x):
        self.seen += len(x)
        x = np.asarray(x)
        return np.concatenate([x.mean(axis=(1, 2)), x.std(axis=(1, 2)) + 1.0], axis=1)


def test_build_with_captions_and_sidecars(tmp_path):
    folder = str(tmp_path / "imgs")
    _write_images(folder, 5)
    with open(os.path.join(folder, "captions.jsonl"), "w") as f:
        for i, cap in enumerate(["a cat", "a dog", "a cat", None, "a bird"]):
            if cap is not None:
                f.write(json.dumps({"file": f"img_{i:03d}.png", "caption": cap}) + "\n")
    emb = CountingEmbedder()
    out = str(tmp_path / "bank.npz")
    bank = build_index(folder, emb, out, size=(8, 8), batch=2, progress=False, embedder_name="stats")
    assert emb.seen == 5 and bank.size == 5 and bank.dim == 6
    assert load_bank(out).size == 5
    caps = load_captions(out)
    assert caps == ["a bird", "a cat", "a dog"]
    labels = np.asarray(load_bank(out).labels)
    assert [caps[i] if i >= 0 else None for i in labels] == ["a cat", "a dog", "a cat", None, "a bird"]
    assert not os.path.exists(out + ".partial")
    # sidecar .txt captions when there is no captions file
    folder2 = str(tmp_path / "side")
    _write_images(folder2, 2, seed=1)
    open(os.path.join(folder2, "img_001.txt"), "w").write("  a fish \n")
    build_index(folder2, CountingEmbedder(), str(tmp_path / "b2.npz"), size=(8, 8), progress=False)
    assert load_captions(str(tmp_path / "b2.npz")) == ["a fish"]


def test_pixel_bank_rows_are_the_images(tmp_path):
    folder = str(tmp_path / "imgs")
    imgs = _write_images(folder, 3, size=8)
    bank = build_index(folder, lambda x: x, str(tmp_path / "px.npz"), size=(8, 8), kind="pixel", progress=False)
    assert bank.sample_shape == (8, 8, 3)
    # float32 u / 127.5 - 1 vs float64: <= half an ulp of 1 (6e-8, IEEE rounding on every CPU)
    np.testing.assert_allclose(np.asarray(bank.rows)[0], imgs[0].reshape(-1) / 127.5 - 1.0, atol=1e-6)


def test_unreadable_image_keeps_finished_batches_and_resumes(tmp_path):
    folder = str(tmp_path / "imgs")
    _write_images(folder, 6)
    bad = os.path.join(folder, "img_004.png")
    open(bad, "wb").write(b"not a png")
    out = str(tmp_path / "bank.npz")
    emb = CountingEmbedder()
    with pytest.raises(ValueError, match=r"img_004\.png.*4 images before it are embedded and kept"):
        build_index(folder, emb, out, size=(8, 8), batch=2, progress=False)
    assert emb.seen == 4 and len([f for f in os.listdir(out + ".partial") if f.startswith("batch_")]) == 2
    assert not os.path.exists(out)
    # skip it: only the third batch is embedded again
    emb2 = CountingEmbedder()
    with pytest.warns(UserWarning, match="img_004.png"):
        bank = build_index(folder, emb2, out, size=(8, 8), batch=2, progress=False, skip_bad=True)
    assert emb2.seen == 1 and bank.size == 5
    assert json.load(open(out + ".captions.json"))["skipped"] == ["img_004.png"]


def test_other_settings_start_over(tmp_path):
    folder = str(tmp_path / "imgs")
    _write_images(folder, 3)
    out = str(tmp_path / "bank.npz")
    os.makedirs(out + ".partial")
    json.dump({"key": "something else"}, open(os.path.join(out + ".partial", "meta.json"), "w"))
    np.savez(os.path.join(out + ".partial", "batch_000000.npz"), files=np.array(["x"]), attempted=np.array(["x"]),
             embeddings=np.zeros((1, 6), np.float32))
    emb = CountingEmbedder()
    with pytest.warns(UserWarning, match="other settings"):
        build_index(folder, emb, out, size=(8, 8), batch=4, progress=False)
    assert emb.seen == 3


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        list_images(str(tmp_path / "nope"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ValueError, match="no images"):
        list_images(str(tmp_path / "empty"))
    folder = str(tmp_path / "imgs")
    _write_images(folder, 2)
    with pytest.raises(ValueError, match="batch must be"):
        build_index(folder, CountingEmbedder(), str(tmp_path / "b.npz"), size=(8, 8), batch=0)
    with pytest.raises(ValueError, match="captions file"):
        build_index(folder, CountingEmbedder(), str(tmp_path / "b.npz"), size=(8, 8), captions=str(tmp_path / "c.csv"))
    with pytest.raises(ValueError, match="embedder returned shape"):
        build_index(folder, lambda x: np.zeros((1,)), str(tmp_path / "b.npz"), size=(8, 8), progress=False)
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(str(tmp_path / "missing.png"), (8, 8))


def test_load_image_crops_to_size(tmp_path):
    a = np.zeros((10, 20, 3), np.uint8)
    a[:, 5:15] = 255                                 # a white centre band
    Image.fromarray(a).save(tmp_path / "w.png")
    x = load_image(str(tmp_path / "w.png"), (10, 10))
    assert x.shape == (10, 10, 3) and x.min() >= -1 and x.max() <= 1
    assert x[:, 3:7].mean() > 0.9                     # the centre crop is the band


def test_cli_index_build_with_sscd_and_pixel(tmp_path, capsys):
    """`amg index build` end to end with a tiny SSCD (batches sharded over the 4 test devices)."""
    from amg_jax.apps import cli
    from amg_jax.similarity import sscd

    folder = str(tmp_path / "imgs")
    _write_images(folder, 5, size=16)
    cfg = sscd.SSCDConfig(stage_sizes=(1, 1), width=4, embed_dim=8, image_size=16)
    params = sscd.init_params(cfg, seed=0)
    sscd.save_params(str(tmp_path / "sscd.npz"), params, cfg)
    out = str(tmp_path / "bank.npz")
    assert cli.main(["index", "build", folder, "--out", out, "--embedder", f"sscd:{tmp_path / 'sscd.npz'}",
                     "--batch", "3", "--no-progress"]) == 0
    assert "5 rows of 8" in capsys.readouterr().out
    bank = load_bank(out)
    imgs = np.stack([load_image(os.path.join(folder, f), (16, 16)) for f in list_images(folder)])
    e = sscd.embed_images(params, imgs, cfg)
    # float32 embeddings in batches of 3 (the CLI) vs one batch: ~1e-7 (margin 1%); a wrong row is O(1) off
    np.testing.assert_allclose(np.asarray(bank.rows), e / np.linalg.norm(e, axis=1, keepdims=True), atol=1e-5)
    assert cli.main(["index", "build", folder, "--out", str(tmp_path / "px.npz"), "--size", "8", "8",
                     "--no-progress"]) == 0
    assert load_bank(str(tmp_path / "px.npz")).sample_shape == (8, 8, 3)


@pytest.mark.parametrize("args, message", [
    (["index", "build", "/no/such/dir", "--out", "b.npz"], "is not a directory"),
    (["index", "build", "{folder}", "--out", "b.npz"], "needs --size H W"),
    (["index", "build", "{folder}", "--out", "b.npz", "--embedder", "sscd"], "embedder must be"),
    (["index", "build", "{folder}", "--out", "b.npz", "--embedder", "sscd:/no/file.npz"], "file.npz"),
    (["convert", "sscd", "/no/such.pt", "out.npz"], "does not exist"),
])
def test_cli_bad_index_and_convert_arguments(tmp_path, capsys, args, message):
    from amg_jax.apps import cli

    folder = str(tmp_path / "imgs")
    _write_images(folder, 1)
    with pytest.raises(SystemExit) as e:
        cli.main([a.format(folder=folder) for a in args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.torch
def test_cli_convert_inception_round_trip(tmp_path, capsys):
    """`amg convert inception` on a torch state dict (random weights in torchvision's key names)."""
    import torch

    from amg_jax.apps import cli
    from amg_jax.evaluation import inception

    params = inception.init_params(seed=0)
    sd = {}
    for key, path in inception.torch_key_map().items():
        a = params
        for p in path.split("/"):
            a = a[p]
        a = np.asarray(a)
        sd[key] = torch.from_numpy(np.ascontiguousarray(a.transpose(3, 2, 0, 1) if a.ndim == 4 else a))
    torch.save(sd, tmp_path / "fid.pth")
    assert cli.main(["convert", "inception", str(tmp_path / "fid.pth"), str(tmp_path / "fid.npz")]) == 0
    assert "fid.npz" in capsys.readouterr().out
    loaded, _ = inception.load_params(str(tmp_path / "fid.npz"))
    k = loaded["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]
    np.testing.assert_array_equal(np.asarray(k), np.asarray(params["params"]["Conv2d_1a_3x3"]["conv"]["kernel"]))
