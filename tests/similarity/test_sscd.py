"""SSCD in Flax against a plain-PyTorch SSCD of the same architecture (Classy Vision key layout, as
in the official ``sscd_disc_mixup.torchscript.pt``; random weights and BN running statistics,
eval mode): embeddings, the TorchScript converter, params files, errors, the detector."""
import dataclasses
import functools
import math
from collections import OrderedDict

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amg_jax.similarity import sscd
from amg_jax.similarity.embedding import EmbeddingDetector

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

SMALL = sscd.SSCDConfig(stage_sizes=(2, 1, 1), width=8, image_size=32, gem_p=4.0)
R50_IMAGE = 64            # ResNet-50 check: 2 images of 72x72 resized to 64x64


# --------------------------------------------------------------------------------------------
# the PyTorch reference (plain torch; torchvision is not needed)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch_modules():
    import torch
    from torch import nn
    from torch.nn import functional as F

    def conv(cin, cout, k, stride=1):
        return nn.Conv2d(cin, cout, kernel_size=k, stride=stride, padding=k // 2, bias=False)

    class GlobalGeMPool2d(nn.Module):
        def __init__(self, pooling_param: float):
            super().__init__()
            self.pooling_param = pooling_param

        def forward(self, x):
            n, c, h, w = x.size()
            x = x.reshape(n, c, h * w)
            return x.clamp(min=1e-6).pow(self.pooling_param).mean(dim=2).pow(1.0 / self.pooling_param)

    class L2Norm(nn.Module):
        def forward(self, x):
            return F.normalize(x)

    class GenericLayer(nn.Module):
        """Classy Vision's BottleneckLayer (stride on the 3x3 conv)."""

        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            mid = cout // 4
            self.convolutional_block = nn.Sequential(
                conv(cin, mid, 1), nn.BatchNorm2d(mid), nn.ReLU(),
                conv(mid, mid, 3, stride), nn.BatchNorm2d(mid), nn.ReLU(), conv(mid, cout, 1))
            self.bn = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

        def forward(self, x):
            residual = x if self.downsample is None else self.downsample(x)
            return self.relu(self.bn(self.convolutional_block(x)) + residual)

    class InitialBlock(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self._module = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                         nn.MaxPool2d(3, 2, 1))

        def forward(self, x):
            return self._module(x)

    class ResNeXt(nn.Module):
        def __init__(self, stage_sizes, width: int):
            super().__init__()
            self.initial_block = InitialBlock(width)
            stages, cin = [], width
            for s, n in enumerate(stage_sizes):
                out = width * 2 ** s * 4
                blocks = OrderedDict()
                for i in range(n):
                    blocks[f"block{s}-{i}"] = GenericLayer(cin, out, 2 if (s > 0 and i == 0) else 1)
                    cin = out
                stages.append(nn.Sequential(blocks))
            self.blocks = nn.Sequential(*stages)

        def forward(self, x):
            return self.blocks(self.initial_block(x))

    class Model(nn.Module):
        """sscd.models.model.Model with a CV_* backbone."""

        def __init__(self, cfg: sscd.SSCDConfig):
            super().__init__()
            self.backbone = ResNeXt(cfg.stage_sizes, cfg.width)
            self.embeddings = nn.Sequential(GlobalGeMPool2d(cfg.gem_p), nn.Linear(cfg.trunk_dim, cfg.embed_dim),
                                            L2Norm())

        def forward(self, x):
            return self.embeddings(self.backbone(x))

    class TVBottleneck(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            mid = cout // 4
            self.conv1, self.bn1 = conv(cin, mid, 1), nn.BatchNorm2d(mid)
            self.conv2, self.bn2 = conv(mid, mid, 3, stride), nn.BatchNorm2d(mid)
            self.conv3, self.bn3 = conv(mid, cout, 1), nn.BatchNorm2d(cout)
            self.relu = nn.ReLU()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

        def forward(self, x):
            r = x if self.downsample is None else self.downsample(x)
            y = self.relu(self.bn1(self.conv1(x)))
            y = self.relu(self.bn2(self.conv2(y)))
            return self.relu(self.bn3(self.conv3(y)) + r)

    class TVModel(nn.Module):
        """SSCD's TV_* variant: torchvision resnet with GeM as avgpool and fc -> embed_dim."""

        def __init__(self, cfg: sscd.SSCDConfig):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, cfg.width, 7, 2, 3, bias=False), nn.BatchNorm2d(cfg.width)
            self.relu, self.maxpool = nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            cin = cfg.width
            for s, n in enumerate(cfg.stage_sizes):
                out = cfg.width * 2 ** s * 4
                layers = []
                for i in range(n):
                    layers.append(TVBottleneck(cin, out, 2 if (s > 0 and i == 0) else 1))
                    cin = out
                setattr(self, f"layer{s + 1}", nn.Sequential(*layers))
            self.n_stages = len(cfg.stage_sizes)
            self.avgpool = GlobalGeMPool2d(cfg.gem_p)
            self.fc = nn.Linear(cfg.trunk_dim, cfg.embed_dim)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            for s in range(self.n_stages):
                x = getattr(self, f"layer{s + 1}")(x)
            return F.normalize(self.fc(self.avgpool(x)))

    return torch, nn, F, Model, TVModel


def _randomize(model, seed: int):
    """Random weights and non-trivial BN running statistics; eval mode."""
    torch, nn, *_ = _torch_modules()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(1.0 / fan_in))
            elif isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(0.2 * torch.randn(c, generator=g))
                m.running_mean.copy_(0.3 * torch.randn(c, generator=g))
                m.running_var.copy_(0.5 + 1.5 * torch.rand(c, generator=g))
            elif isinstance(m, nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) / math.sqrt(m.in_features))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


@functools.lru_cache(maxsize=None)
def _torch_model(config: sscd.SSCDConfig, seed: int = 0):
    torch, _, _, Model, _ = _torch_modules()
    torch.manual_seed(seed)
    return _randomize(Model(config), seed)


def _images(n: int, size: int, seed: int) -> np.ndarray:
    """Smooth-ish random images in [-1, 1] [n, size, size, 3]."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, size // 4, size // 4, 3)).astype(np.float32)
    x = np.repeat(np.repeat(x, 4, axis=1), 4, axis=2)
    return np.clip(x + 0.3 * rng.normal(size=x.shape).astype(np.float32), -1, 1)


def _torch_embed(model, x: np.ndarray, size) -> np.ndarray:
    """The official preprocessing in torch on [-1, 1] NHWC floats, then the model."""
    torch, _, F, *_ = _torch_modules()
    t = (torch.from_numpy(x).permute(0, 3, 1, 2) + 1) / 2
    if tuple(t.shape[2:]) != tuple(size):
        t = F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    t = (t - torch.tensor(sscd.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(sscd.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return model(t).numpy()


@functools.lru_cache(maxsize=None)
def _jit_embed(config: sscd.SSCDConfig):
    return jax.jit(sscd.make_embed_fn(config))


@pytest.fixture(scope="module")
def small():
    """(torch model, Flax variables converted from it in memory, images [4, 40, 40, 3]) for SMALL."""
    model = _torch_model(SMALL)
    return model, sscd.convert_torchscript(model, SMALL), _images(4, 40, seed=1)


@pytest.fixture(scope="module")
def small_embeddings(small):
    _, variables, x = small
    return np.asarray(_jit_embed(SMALL)(variables, jnp.asarray(x)))


# --------------------------------------------------------------------------------------------
# (a) parity with PyTorch
# --------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_resnet50_matches_torch():
    """Full ResNet-50 depth (stages [3, 4, 6, 3], width 64, 2048 -> 512) on 2 images 72 -> 64."""
    cfg = dataclasses.replace(sscd.DEFAULT_CONFIG, image_size=R50_IMAGE)
    model = _torch_model(cfg, seed=5)
    variables, inferred = sscd.convert_torchscript(model, return_config=True)
    assert inferred == dataclasses.replace(cfg, image_size=sscd.DEFAULT_CONFIG.image_size)
    x = _images(2, 72, seed=2)
    want = _torch_embed(model, x, (R50_IMAGE, R50_IMAGE))
    got = np.asarray(_jit_embed(cfg)(variables, jnp.asarray(x)))
    chex.assert_shape(got, (2, 512))
    err = np.abs(got - want).max()
    print(f"ResNet-50 Flax vs torch max abs diff on 512-d embeddings: {err:.2e}")
    # float32 through 50 layers, XLA vs torch kernels: measured 1.4e-7 (1.2e-7 with AVX and another
    # BLAS kernel) on normalised embeddings; 1e-4 is loose, a wrong layout or BN is off by >1e-2
    assert err < 1e-4
    assert np.abs(want[0] - want[1]).max() > 1e-2            # the images give different embeddings


@pytest.mark.torch
def test_small_matches_torch(small, small_embeddings):
    model, _, x = small
    want = _torch_embed(model, x, (32, 32))
    np.testing.assert_allclose(small_embeddings, want, atol=1e-5)   # float32 Flax vs torch: 7e-8 measured
    assert np.abs(want[:, None] - want[None]).max() > 1e-2


@pytest.mark.torch
def test_preprocess_matches_torch_interpolate():
    torch, _, F, *_ = _torch_modules()
    x = np.random.default_rng(0).uniform(-1, 1, (2, 37, 53, 3)).astype(np.float32)
    assert sscd.resize_shape(37, 53, None) == (37, 53)
    for size, hw in [(20, (20, 28)), ((64, 40), (64, 40))]:
        assert sscd.resize_shape(37, 53, size) == hw
        got = np.asarray(sscd.preprocess(jnp.asarray(x), size))
        t = (torch.from_numpy(x).permute(0, 3, 1, 2) + 1) / 2
        t = F.interpolate(t, size=hw, mode="bilinear", antialias=True, align_corners=False)
        t = (t - torch.tensor(sscd.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(sscd.IMAGENET_STD).view(1, 3, 1, 1)
        # antialiased bilinear at non-dyadic scales (37 -> 20, 53 -> 28, ...): the filter centres differ
        # by an ulp (3.8e-6 below 64) between torch and XLA, times the filter slope and |dx| / std (~9)
        # that is up to ~2e-5 (measured 8.3e-7, margin 0.08 at the old 1e-5). atol 1e-4; antialias or
        # align_corners wrong is off by >1e-1.
        np.testing.assert_allclose(got, t.permute(0, 2, 3, 1).numpy(), atol=1e-4)
    assert sscd.resize_shape(300, 200, 288) == (432, 288)     # torchvision Resize(int): short side


# --------------------------------------------------------------------------------------------
# (b) TorchScript file -> Flax, layouts, params files
# --------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_torchscript_file_round_trip(small, tmp_path):
    torch = _torch_modules()[0]
    model, variables, x = small
    path = tmp_path / "sscd_small.torchscript.pt"
    torch.jit.script(model).save(str(path))
    conv, cfg = sscd.convert_torchscript(str(path), return_config=True)
    assert cfg == dataclasses.replace(SMALL, image_size=sscd.DEFAULT_CONFIG.image_size)   # gem_p read off the file
    chex.assert_trees_all_equal(conv, variables)
    chex.assert_trees_all_equal_shapes_and_dtypes(conv, sscd.init_params(SMALL))
    flax_tree = jax.eval_shape(sscd.SSCD(SMALL).init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    chex.assert_trees_all_equal_shapes_and_dtypes(conv, flax_tree)            # the plan is the module's tree
    np.testing.assert_allclose(np.asarray(_jit_embed(SMALL)(conv, jnp.asarray(x))), _torch_embed(model, x, (32, 32)),
                               atol=1e-5)       # as test_small_matches_torch: 7e-8 measured
    # convert_file -> load_params
    out = tmp_path / "sscd_small.npz"
    summary = sscd.convert_file(path, out)
    assert "Classy Vision" in summary and "[2, 1, 1]" in summary and str(out) in summary
    loaded, lcfg = sscd.load_params(out)
    assert lcfg == cfg
    chex.assert_trees_all_equal(loaded, variables)


@pytest.mark.torch
def test_save_load_params_round_trip(small, tmp_path):
    _, variables, _ = small
    path = sscd.save_params(tmp_path / "p.npz", jax.tree.map(jnp.asarray, variables), SMALL)
    loaded, cfg = sscd.load_params(path)
    assert cfg == SMALL and isinstance(cfg.image_size, int)
    chex.assert_trees_all_equal(loaded, variables)
    fixed = dataclasses.replace(SMALL, image_size=(32, 48), dtype="bfloat16")
    sscd.save_params(tmp_path / "q.npz", variables, fixed)
    assert sscd.load_params(tmp_path / "q.npz")[1] == fixed


@pytest.mark.torch
def test_torchvision_layout_converts_to_the_same_params(small):
    torch, nn, _, _, TVModel = _torch_modules()
    model, variables, x = small
    tv = TVModel(SMALL).eval()
    src = [v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in tv.state_dict() if not k.endswith("num_batches_tracked")]
    assert len(src) == len(dst)
    tv.load_state_dict(dict(zip(dst, src)), strict=False)
    assert "layer1.0.conv1.weight" in dst and "fc.weight" in dst
    # the same torch ops on the same weights in two module layouts: exact here, 1e-6 is loose
    np.testing.assert_allclose(_torch_embed(tv, x, (32, 32)), _torch_embed(model, x, (32, 32)), atol=1e-6)
    conv, cfg = sscd.convert_torchscript(tv.state_dict(), return_config=True)
    assert cfg.stage_sizes == SMALL.stage_sizes and cfg.width == SMALL.width
    assert cfg.gem_p == 3.0                                   # a state dict does not store p: the default
    chex.assert_trees_all_equal(conv, variables)


# --------------------------------------------------------------------------------------------
# (c) errors
# --------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_converter_errors(small, tmp_path):
    torch = _torch_modules()[0]
    model, _, _ = small
    with pytest.raises(FileNotFoundError, match="no such file"):
        sscd.convert_torchscript(tmp_path / "missing.pt")
    path = tmp_path / "m.pt"
    torch.jit.script(model).save(str(path))
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="trunc.pt.*complete"):
        sscd.convert_torchscript(tmp_path / "trunc.pt")
    sd = model.state_dict()
    with pytest.raises(ValueError, match=r"unmatched key 'backbone\.initial_block\._module\.0\.weight'"
                                         r".*\(64, 3, 7, 7\)"):
        sscd.convert_torchscript(sd, sscd.DEFAULT_CONFIG)             # width 8 vs 64
    deeper = dataclasses.replace(SMALL, stage_sizes=(2, 2, 1))
    with pytest.raises(ValueError, match=r"unmatched key 'backbone\.blocks\.2\.block2-0\.convolutional_block\.0"
                                         r"\.weight'.*stage1_block1/conv1"):
        sscd.convert_torchscript(sd, deeper)
    no_head = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("embeddings"))
    with pytest.raises(ValueError, match=r"ends after 'backbone\.blocks\.2\.block2-0\.downsample\.1'.*missing proj"):
        sscd.convert_torchscript(no_head, SMALL)
    with pytest.raises(ValueError, match=r"ends after 'backbone\.blocks\.2\.block2-0\.downsample\.1': "
                                         r"expected the Linear"):
        sscd.convert_torchscript(no_head)
    extra = OrderedDict(sd)
    extra["head.weight"], extra["head.bias"] = torch.ones(10, 512), torch.ones(10)
    with pytest.raises(ValueError, match=r"unmatched key 'head\.weight' \(linear \(10, 512\)\) after the last layer"):
        sscd.convert_torchscript(extra, SMALL)
    extra = OrderedDict(sd)
    extra["head.scale"] = torch.ones(())
    with pytest.raises(ValueError, match="unmatched key 'head.scale'"):
        sscd.convert_torchscript(extra)
    no_bn = OrderedDict((k, v) for k, v in sd.items() if ".block1-0.convolutional_block.4." not in k)
    with pytest.raises(ValueError, match=r"unmatched key 'backbone\.blocks\.1\.block1-0\.convolutional_block\.6"
                                         r"\.weight'.*bn layer inside a bottleneck"):
        sscd.convert_torchscript(no_bn)
    with pytest.raises(ValueError, match="expected a file path, a torch module or a state dict"):
        sscd.convert_torchscript(3)


@pytest.mark.torch
def test_params_file_errors(small, tmp_path):
    _, variables, _ = small
    with pytest.raises(FileNotFoundError, match="no such SSCD params file"):
        sscd.load_params(tmp_path / "none.npz")
    path = sscd.save_params(tmp_path / "p.npz", variables, SMALL)
    data = open(path, "rb").read()
    (tmp_path / "t.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="t.npz.*truncated or corrupt"):
        sscd.load_params(tmp_path / "t.npz")
    np.savez(tmp_path / "plain.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="no '__config__'"):
        sscd.load_params(tmp_path / "plain.npz")
    # a file whose arrays do not match its own config
    z = dict(np.load(path))
    z["params/stage1_block0/conv2/kernel"] = np.zeros((3, 3, 16, 17), np.float32)
    np.savez(tmp_path / "bad.npz", **z)
    with pytest.raises(ValueError, match=r"'params/stage1_block0/conv2/kernel' has shape \(3, 3, 16, 17\)"):
        sscd.load_params(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="save_params: variable 'params/stem_conv/kernel' has shape"):
        sscd.save_params(tmp_path / "x.npz", variables, sscd.DEFAULT_CONFIG)
    with pytest.raises(ValueError, match="sscd_detector: variable 'params/stem_conv/kernel'"):
        sscd.sscd_detector(variables, np.eye(2, 512, dtype=np.float32))


def test_config_validation():
    with pytest.raises(ValueError, match="stage_sizes"):
        sscd.SSCDConfig(stage_sizes=(3, 0))
    with pytest.raises(ValueError, match="image_size"):
        sscd.SSCDConfig(image_size=(32,))
    with pytest.raises(ValueError, match="dtype"):
        sscd.SSCDConfig(dtype="int32")
    cfg = sscd.SSCDConfig(stage_sizes=[1, 1], image_size=[32, 40])
    assert cfg.stage_sizes == (1, 1) and cfg.image_size == (32, 40) and cfg.trunk_dim == 512
    back = sscd.SSCDConfig.from_dict(cfg.to_dict())
    assert back == cfg and hash(back) == hash(cfg)
    with pytest.raises(ValueError, match="unknown fields"):
        sscd.SSCDConfig.from_dict({"depth": 50})
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        sscd.preprocess(jnp.zeros((2, 8, 8)))


# --------------------------------------------------------------------------------------------
# (d) embed_fn, (e) detector
# --------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_embed_fn_shape_and_norm(small_embeddings):
    f = sscd.make_embed_fn(SMALL)
    assert f is sscd.make_embed_fn(dataclasses.replace(SMALL)) and sscd.embed_fn is sscd.make_embed_fn()
    chex.assert_shape(small_embeddings, (4, 512))
    np.testing.assert_allclose(np.linalg.norm(small_embeddings, axis=1), 1.0, rtol=1e-5)   # float32: ~1e-7


@pytest.mark.torch
def test_sscd_detector_and_gradient(small, small_embeddings):
    """A bank of 6 images (embedded in batches of 4, as the fixture's images); a query equal to
    bank row 3 gets sigma ~1 and index 3; sigma has a finite, nonzero gradient in the input."""
    _, variables, x = small
    refs = np.concatenate([x, _images(2, 40, seed=7)])
    labels = np.arange(6, dtype=np.int32) + 10
    bank_e = sscd.embed_images(variables, refs, SMALL, batch_size=4)   # 2 batches, the last one padded
    np.testing.assert_allclose(bank_e[:4], small_embeddings, atol=1e-6)   # the same [4, ...] program: exact
    det = sscd.sscd_detector(variables, bank_e, labels, config=SMALL, thresholds=(0.4, 0.5))
    assert isinstance(det, EmbeddingDetector) and det.embed_fn is sscd.make_embed_fn(SMALL)
    assert det.default_thresholds == (0.4, 0.5) and det.size == 6
    q = np.stack([refs[3], _images(1, 40, seed=99)[0]])

    def total(d, z):
        out = d(z)
        return out.sigma.sum(), out

    (_, out), g = jax.jit(jax.value_and_grad(total, argnums=1, has_aux=True))(det, jnp.asarray(q))
    assert int(out.index[0]) == 3 and int(out.label[0]) == 13
    assert float(out.sigma[0]) > 1 - 1e-5 and float(out.sigma[1]) < float(out.sigma[0])
    chex.assert_shape(g, q.shape)
    chex.assert_tree_all_finite(g)
    assert float(jnp.abs(g[1]).max()) > 0
