"""CLIP embeddings, detector and score on a tiny random-weight CLIP written into tmp_path
(nothing is downloaded), checked against transformers' own Flax and PyTorch CLIP."""
import json
import os
import shutil
import warnings

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.similarity import clip

B = 4


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return clip.write_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")), seed=0)


@pytest.fixture(scope="module")
def bundle(tiny_dir):
    return clip.load_clip(tiny_dir)


def _images(n, seed, shape=(32, 32)):
    """Smooth random images [n, H, W, 3] in [-1, 1] (a few random low-frequency waves)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(0, 1, shape[0]), np.linspace(0, 1, shape[1]), indexing="ij")
    out = []
    for _ in range(n):
        f, p = rng.uniform(1, 6, (3, 2)), rng.uniform(0, 6, (3,))
        out.append(np.stack([np.sin(f[c, 0] * yy + f[c, 1] * xx + p[c]) for c in range(3)], -1))
    return np.asarray(out, np.float32)


def test_written_directory_and_bundle(tiny_dir, bundle):
    for f in ("config.json", "flax_model.msgpack", "vocab.json", "merges.txt", "preprocessor_config.json"):
        assert os.path.isfile(os.path.join(tiny_dir, f)), f
    assert (bundle.image_size, bundle.resize_size, bundle.max_length, bundle.embed_dim) == (32, 32, 16, 16)
    assert bundle.dtype == "float32" and bundle.mean == pytest.approx(clip.OPENAI_CLIP_MEAN)
    assert set(bundle.vision_params) == {"vision_model", "visual_projection", "logit_scale"}
    tok = bundle.tokenizer
    ids = tok("a red circle")["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == bundle.config.text_config.eos_token_id
    assert tok.eos_token_id == max(tok.get_vocab().values())          # as in CLIP: the end token has the top id
    assert tok.tokenize("a red circle") == ["a</w>", "red</w>", "circle</w>"]   # the learnt merges make words
    assert tok.unk_token_id not in tok("Zebra #7, ☃!", add_special_tokens=False)["input_ids"]   # byte level
    # the same config gives the same (stable) embed_fn object: a static jit key
    assert clip.load_clip(tiny_dir).embed_fn is bundle.embed_fn is clip.clip_embed_fn(bundle)


def test_embedding_shapes_and_norms(bundle):
    x = _images(B, 0)
    e = clip.clip_image_embed(bundle, x)
    chex.assert_shape(e, (B, 16))
    # float32 norms of normalised 16-d embeddings: ~1e-7 (margins ~1%); raw / |raw| is the same
    # computation as normalize=True (exact), and the bucketed batch of 3 runs the same compiled
    # program on the same rows (exact): 1e-6 is loose. A missing normalisation is off by O(1).
    chex.assert_trees_all_close(jnp.linalg.norm(e, axis=-1), jnp.ones(B), atol=1e-5)
    raw = clip.clip_image_embed(bundle, x, normalize=False)
    np.testing.assert_allclose(np.asarray(raw / jnp.linalg.norm(raw, axis=-1, keepdims=True)), np.asarray(e),
                               atol=1e-6)
    assert not np.allclose(np.linalg.norm(np.asarray(raw), axis=-1), 1.0)
    # the batch is padded to a bucket: a smaller batch gives the same rows (and reuses the compilation)
    np.testing.assert_allclose(np.asarray(clip.clip_image_embed(bundle, x[:3])), np.asarray(e[:3]), atol=1e-6)
    t = clip.clip_text_embed(bundle, ["a red circle", "a blue square on a gray background", ""])
    chex.assert_shape(t, (3, 16))
    chex.assert_trees_all_close(jnp.linalg.norm(t, axis=-1), jnp.ones(3), atol=1e-5)
    assert float(t[0] @ t[1]) < 0.999                                  # different prompts differ


def test_preprocess_matches_clip_image_processor(tiny_dir, bundle):
    from transformers import CLIPImageProcessor

    proc = CLIPImageProcessor.from_pretrained(tiny_dir)
    for shape in [(32, 32), (48, 40), (24, 20)]:                     # identity, downscale, upscale
        u8 = np.round((_images(2, 3, shape) + 1) * 127.5).astype(np.uint8)
        ref = proc(images=list(u8), return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)
        ours = np.asarray(clip.clip_preprocess(u8 / 127.5 - 1, bundle.resize_size, bundle.mean, bundle.std,
                                               crop_size=bundle.image_size))
        chex.assert_shape(ours, (2, 32, 32, 3))
        # differences: PIL's uint8 rounding and kernel details (documented); exact without a resize
        tol = 1e-5 if shape == (32, 32) else 0.05
        assert np.abs(ours - ref).max() < tol, (shape, np.abs(ours - ref).max())
    g = _images(1, 4)[..., :1]                                          # grayscale -> RGB, as convert_rgb
    np.testing.assert_array_equal(np.asarray(clip.clip_preprocess(g, 32, bundle.mean, bundle.std)),
                                  np.asarray(clip.clip_preprocess(np.repeat(g, 3, -1), 32, bundle.mean, bundle.std)))
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        clip.clip_preprocess(np.zeros((32, 32, 3)), 32, bundle.mean, bundle.std)
    with pytest.raises(ValueError, match="crop_size"):
        clip.clip_preprocess(np.zeros((1, 32, 32, 3)), 32, bundle.mean, bundle.std, crop_size=40)


def test_detector_finds_bank_image_and_is_differentiable(bundle):
    bank_images = _images(B, 10)
    labels = np.arange(B, dtype=np.int32) + 100
    det = clip.clip_detector(bundle, bank_images, labels)
    assert det.size == B and det.sigma_range == (-1.0, 1.0) and det.embed_fn is bundle.embed_fn
    # queries: bank image 3, a fresh image, and two images next to bank image 1
    x = np.concatenate([bank_images[3:4], _images(1, 11), bank_images[1:2] + 0.05 * _images(2, 12)])

    def total(z):
        d = det(z)
        return d.sigma.sum(), d

    (_, out), g = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(x))
    assert int(out.index[0]) == 3 and int(out.label[0]) == 103
    assert float(out.sigma[0]) == pytest.approx(1.0, abs=1e-5)          # float32 cosine of a copy: 1.2e-7
    assert -1.0 <= float(out.sigma[1]) < 0.9999
    assert out.index[2:].tolist() == [1, 1] and np.all(np.asarray(out.sigma[2:]) < 1.0)
    # d sigma / d x0_hat: finite everywhere, nonzero next to a bank image
    chex.assert_shape(g, x.shape)
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g[2:]).max()) > 0
    # the same detector from precomputed embeddings: equal treedef (static embed_fn), so one jit
    # compilation serves both; the bank rows agree
    det2 = clip.clip_detector(bundle, clip.clip_image_embed(bundle, bank_images), labels)
    assert jax.tree.structure(det2) == jax.tree.structure(det)
    np.testing.assert_allclose(np.asarray(det2.bank.rows), np.asarray(det.bank.rows), atol=1e-6)   # same embedding call
    assert clip.clip_detector(bundle, det.bank, thresholds=(0.8, 0.95)).default_thresholds == (0.8, 0.95)
    with pytest.raises(ValueError, match="dim"):
        clip.clip_detector(bundle, np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="images"):
        clip.clip_detector(bundle, np.zeros((3, 4, 4), np.float32))


def test_clip_score_matches_flax_clip_call(tiny_dir, bundle):
    from transformers import FlaxCLIPModel

    x = _images(B, 20)
    prompts = ["a red circle", "a blue square", "a photo of a cat", "striped green triangle"]
    score = np.asarray(clip.clip_score(bundle, x, prompts))
    chex.assert_shape(score, (B,))
    assert np.all((score >= 0) & (score <= 100))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, params = FlaxCLIPModel.from_pretrained(tiny_dir, _do_init=False)
    ids, mask = clip.tokenize(bundle, prompts)
    px = clip.clip_preprocess(x, bundle.resize_size, bundle.mean, bundle.std).transpose(0, 3, 1, 2)   # NCHW
    call = jax.jit(lambda p, i, v, m: model(input_ids=i, pixel_values=v, attention_mask=m, params=p).logits_per_image)
    cos = np.diag(np.asarray(call(params, ids, px, mask))) / float(np.exp(params["logit_scale"]))
    # float32, two implementations of the same CLIP (ours vs transformers' Flax call), score = 100 cos:
    # measured 4e-6 of 1e-3. A string prompt is broadcast to B prompts: the same computation (exact).
    np.testing.assert_allclose(score, 100 * np.maximum(cos, 0), atol=1e-3)
    # one prompt for every image; a count mismatch is an error
    np.testing.assert_allclose(np.asarray(clip.clip_score(bundle, x, prompts[0])),
                               np.asarray(clip.clip_score(bundle, x, prompts[:1] * B)), atol=1e-5)
    with pytest.raises(ValueError, match="4 images but 3 prompts"):
        clip.clip_score(bundle, x, prompts[:3])


def test_overlong_prompt_is_truncated_with_a_warning(bundle):
    long = " ".join(["red"] * 30)
    with pytest.warns(UserWarning, match="truncated"):
        ids, mask = clip.tokenize(bundle, ["a red circle", long])
    chex.assert_shape(ids, (2, 16))
    assert ids[1, 0] == bundle.tokenizer.bos_token_id and ids[1, -1] == bundle.tokenizer.eos_token_id
    assert mask[1].all() and mask[0].sum() == 5
    with pytest.warns(UserWarning, match="1 prompt"):
        t = clip.clip_text_embed(bundle, [long, "a red circle", "x"])
    chex.assert_shape(t, (3, 16))
    chex.assert_tree_all_finite(t)
    with pytest.raises(ValueError, match="non-empty list of strings"):
        clip.tokenize(bundle, [])


def test_load_errors(tmp_path, tiny_dir):
    with pytest.raises(ValueError, match="does not exist"):
        clip.load_clip(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="is a file"):
        clip.load_clip(os.path.join(tiny_dir, "config.json"))
    with pytest.raises(ValueError, match="no config.json"):
        clip.load_clip(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="not a CLIP config.*'bert'"):
        clip.load_clip(str(tmp_path))
    d = tmp_path / "partial"
    d.mkdir()
    shutil.copy(os.path.join(tiny_dir, "config.json"), d)
    with pytest.raises(ValueError, match="no weights"):
        clip.load_clip(str(d))
    shutil.copy(os.path.join(tiny_dir, "flax_model.msgpack"), d)
    with pytest.raises(ValueError, match="vocab.json"):
        clip.load_clip(str(d))
    with pytest.raises(ValueError, match="dtype"):
        clip.load_clip(tiny_dir, dtype="int8")


@pytest.mark.torch
def test_torch_clip_parity(tiny_dir, bundle):
    """transformers' PyTorch CLIPModel with the same (Flax-saved) weights gives the same embeddings.
    (``CLIPModel.from_pretrained(..., from_flax=True)`` leaves the params on the meta device in
    transformers 4.57, so the msgpack is loaded with transformers' own Flax -> PyTorch converter.)"""
    import flax.serialization
    import torch
    from transformers import CLIPConfig, CLIPModel
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    with open(os.path.join(tiny_dir, "flax_model.msgpack"), "rb") as f:
        state = flax.serialization.msgpack_restore(f.read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = load_flax_weights_in_pytorch_model(CLIPModel(CLIPConfig.from_pretrained(tiny_dir)), state).eval()
    x = _images(B, 30)
    px = np.asarray(clip.clip_preprocess(x, bundle.resize_size, bundle.mean, bundle.std))
    prompts = ["a red circle", "a blue square on a gray background", "", "a photo of a striped dog"]
    ids, mask = clip.tokenize(bundle, prompts)
    with torch.no_grad():
        ti = tm.get_image_features(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).numpy()
        tt = tm.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                  attention_mask=torch.from_numpy(mask).long()).numpy()
    # float32 Flax vs PyTorch (other conv / attention kernels) on |embedding| ~ 1: measured ~1e-6
    # (margins ~1%), atol 1e-4 leaves ~100x; a wrong weight mapping is off by >1e-2.
    np.testing.assert_allclose(np.asarray(clip.clip_image_embed(bundle, x, normalize=False)), ti, atol=1e-4)
    np.testing.assert_allclose(np.asarray(clip.clip_text_embed(bundle, prompts, normalize=False)), tt, atol=1e-4)
    tin = ti / np.linalg.norm(ti, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(clip.clip_image_embed(bundle, x)), tin, atol=1e-4)


@pytest.mark.torch
def test_pytorch_safetensors_clip_loads_into_our_model(tmp_path, tiny_dir):
    """A CLIP as the hub publishes it (transformers' PyTorch CLIPModel, ``model.safetensors``, here with
    OpenCLIP's exact GELU) loads into amg_jax's ClipModel by name (read without torch) and embeds as
    transformers' PyTorch model does: the bare ``class_embedding`` / ``logit_scale`` parameters, the
    patch conv (OIHW -> HWIO) and the transposed linears all map."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    cfg = json.load(open(os.path.join(tiny_dir, "config.json")))
    cfg["vision_config"]["hidden_act"] = cfg["text_config"]["hidden_act"] = "gelu"
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm = CLIPModel(CLIPConfig(**{k: v for k, v in cfg.items() if k != "transformers_version"})).eval()
        with torch.no_grad():
            tm.vision_model.embeddings.class_embedding.normal_()      # transformers' init hides a bad mapping
            tm.vision_model.embeddings.position_embedding.weight.normal_(std=0.1)
            tm.logit_scale.fill_(1.5)
    d = tmp_path / "pt_clip"
    tm.save_pretrained(d, safe_serialization=True)
    for f in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json",
              "preprocessor_config.json"):
        shutil.copy(os.path.join(tiny_dir, f), d)
    assert sorted(p.name for p in d.iterdir() if "model" in p.name) == ["model.safetensors"]
    b = clip.load_clip(str(d))
    assert float(b.params["logit_scale"]) == pytest.approx(1.5)
    x = _images(B, 40)
    prompts = ["a red circle", "a blue square on a gray background", "", "a photo of a striped dog"]
    px = np.asarray(clip.clip_preprocess(x, b.resize_size, b.mean, b.std))
    ids, mask = clip.tokenize(b, prompts)
    with torch.no_grad():
        ti = tm.get_image_features(pixel_values=torch.from_numpy(px.transpose(0, 3, 1, 2).copy())).numpy()
        tt = tm.get_text_features(input_ids=torch.from_numpy(ids).long(),
                                  attention_mask=torch.from_numpy(mask).long()).numpy()
    # float32 Flax vs PyTorch (other conv / attention kernels) on |embedding| ~ 1: ~1e-6, atol 1e-4 leaves
    # ~100x; a wrong mapping (an untransposed kernel, a lost class token) is off by >1e-2
    assert np.abs(ti).max() > 0.1 and np.abs(tt).max() > 0.1
    np.testing.assert_allclose(np.asarray(clip.clip_image_embed(b, x, normalize=False)), ti, atol=1e-4)
    np.testing.assert_allclose(np.asarray(clip.clip_text_embed(b, prompts, normalize=False)), tt, atol=1e-4)


def test_weights_of_another_size_are_named(tmp_path, tiny_dir):
    d = tmp_path / "other"
    shutil.copytree(tiny_dir, d)
    cfg = json.load(open(d / "config.json"))
    cfg["projection_dim"] = 24                          # the weights' projections are 16 wide
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"flax_model.msgpack.*visual_projection|flax_model.msgpack.*text_projection"):
        clip.load_clip(str(d))
    cfg["projection_dim"] = 16
    cfg["vision_config"]["patch_size"] = 5              # 32 is not a multiple of 5
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="patch_size"):
        clip.load_clip(str(d))
    with pytest.raises(ValueError, match="attention"):
        clip.load_clip(tiny_dir, attention="flash")


def test_embedding_imports_no_transformers_flax_model(tiny_dir):
    """In a fresh interpreter: load the CLIP, embed images and text, score; no transformers Flax model
    module (nor diffusers' Flax) is imported."""
    import subprocess
    import sys

    code = f"""
import sys
import numpy as np
from amg_jax.similarity import clip
b = clip.load_clip({tiny_dir!r})
x = np.zeros((2, 32, 32, 3), np.float32)
clip.clip_score(b, x, ["a red circle", "a cat"]).block_until_ready()
clip.clip_detector(b, x)(x).sigma.block_until_ready()
bad = sorted(m for m in sys.modules if "modeling_flax" in m or (m.startswith("diffusers.models") and "flax" in m))
print("FLAX_MODULES", bad)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, XLA_FLAGS=""))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "FLAX_MODULES []" in out.stdout, out.stdout[-2000:]
