"""FID Inception-v3 in Flax against a plain-PyTorch copy of pytorch-fid's FIDInceptionV3
(torchvision Inception3 key names, random weights and BN running statistics, eval mode):
features through the resize path, the resize alone, the converter, params files, errors, FID."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from amg_jax.evaluation import metrics
from amg_jax.evaluation import inception as inc

IN_SIZE = 48            # 2 images of 48x48, resized to 80x80 in both implementations (one compilation)
NET_SIZE = 80
CFG = inc.InceptionConfig(image_size=NET_SIZE)


# --------------------------------------------------------------------------------------------
# the PyTorch reference: pytorch-fid's FIDInceptionV3 in plain torch (torchvision is not needed)
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _torch_classes():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    def avg(x):
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
            self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
            self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

        def forward(self, x):
            return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                              self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              self.branch_pool(avg(x))], 1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                              F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionC(nn.Module):
        def __init__(self, cin, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            bd = x
            for i in range(1, 6):
                bd = getattr(self, f"branch7x7dbl_{i}")(bd)
            return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(avg(x))], 1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class FIDInceptionE(nn.Module):
        """E_1 (max_pool=False: average pool, padding not counted) / E_2 (max_pool=True)."""

        def __init__(self, cin, max_pool):
            super().__init__()
            self.max_pool = max_pool
            self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
            self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
            self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

        def forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg(x)
            return torch.cat([self.branch1x1(x), b3, bd, self.branch_pool(pool)], 1)

    class FIDInceptionV3(nn.Module):
        """torchvision Inception3(num_classes=1008, aux_logits=False) with pytorch-fid's patched
        blocks; ``forward`` is pytorch-fid's InceptionV3 (resize, normalise, blocks 0-3)."""

        def __init__(self):
            super().__init__()
            self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
            self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
            self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
            self.Mixed_5b = FIDInceptionA(192, pool_features=32)
            self.Mixed_5c = FIDInceptionA(256, pool_features=64)
            self.Mixed_5d = FIDInceptionA(288, pool_features=64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
            self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
            self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
            self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
            self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(2048, 1008)

        def forward(self, inp, size=299):
            """``inp`` [B, 3, H, W] in [0, 1] -> pool3 [B, 2048] (pytorch-fid's block 3 output)."""
            x = F.interpolate(inp, size=(size, size), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
                         "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b",
                         "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"):
                x = getattr(self, name)(x)
            return x.flatten(1)

    return FIDInceptionV3


def _torch_model(seed=0):
    """The reference in eval mode: He-normal conv weights, non-trivial BN affine and running stats."""
    import torch

    torch.manual_seed(seed)
    model = _torch_classes()()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                fan_in = m.weight[0].numel()
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5)
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.6, 1.4)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture(scope="module")
def torch_ref():
    """(torch model, converted variables)."""
    model = _torch_model()
    return model, inc.convert_state_dict(model.state_dict())


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (7, IN_SIZE, IN_SIZE, 3)).astype(np.float32)


def _torch_features(model, x_nhwc, size):
    import torch

    with torch.no_grad():
        inp = (torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))) + 1) / 2
        return model(inp, size=size).numpy()


# --------------------------------------------------------------------------------------------
# architecture and parameters
# --------------------------------------------------------------------------------------------

def test_expected_shapes_match_flax_init():
    shapes = jax.eval_shape(lambda: inc.InceptionV3(CFG).init(jax.random.PRNGKey(0), jnp.zeros((1, 80, 80, 3))))
    got = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(shapes).items()}
    assert got == inc.expected_shapes()
    assert len(inc.conv_specs()) == 94
    p = inc.init_params(3)
    inc.check_params(p)
    n = sum(int(np.size(v)) for v in jax.tree.leaves(p["params"]))
    assert n == 21_785_568            # torchvision Inception3 without fc / AuxLogits


def test_config_validation():
    assert inc.InceptionConfig().image_size == (299, 299)
    assert inc.InceptionConfig(image_size=[80, 96]).image_size == (80, 96)
    assert inc.InceptionConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="at least 75x75"):
        inc.InceptionConfig(image_size=64)
    with pytest.raises(ValueError, match="dtype"):
        inc.InceptionConfig(dtype="int32")
    with pytest.raises(ValueError, match="unknown fields"):
        inc.InceptionConfig.from_dict({"image_size": 299, "width": 3})
    with pytest.raises(ValueError, match="below Inception-v3's smallest input"):
        inc.preprocess(jnp.zeros((1, 60, 60, 3)), None)
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
        inc.preprocess(jnp.zeros((1, 80, 80)), None)
    p = inc.init_params(0)
    with pytest.raises(ValueError, match="below 75x75"):
        inc.compute_features(p, np.zeros((2, 60, 60, 3)), inc.InceptionConfig(image_size=None))
    with pytest.raises(ValueError, match="N >= 2"):
        inc.fid(p, np.zeros((1, 80, 80, 3)), np.zeros((3, 80, 80, 3)), CFG)


# --------------------------------------------------------------------------------------------
# against PyTorch
# --------------------------------------------------------------------------------------------

@pytest.mark.torch
def test_features_match_torch(torch_ref, images):
    """pytorch-fid's path ([0, 1] -> resize -> 2x-1 -> blocks) vs ours ([-1, 1] -> resize -> network),
    48x48 images resized to 80x80."""
    model, variables = torch_ref
    x = images[:2]
    want = _torch_features(model, x, NET_SIZE)
    got = inc.compute_features(variables, x, CFG, batch_size=2)
    assert got.shape == want.shape == (2, inc.FEATURE_DIM)
    scale = float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    print(f"\nInception features vs torch: max abs diff {err:.2e}, max |feature| {scale:.3f}, "
          f"relative {err / scale:.2e}")
    assert scale > 0.1 and np.std(want) > 1e-2          # non-trivial features
    # float32 through the network, XLA vs torch kernels: measured 1.2e-6 relative (the same with AVX
    # and another BLAS kernel), 1e-4 leaves ~80x; a wrong layer or weight layout is off by >1e-2.
    assert err <= 1e-4 * max(1.0, scale)


@pytest.mark.torch
@pytest.mark.parametrize("src,dst", [((37, 50), (80, 80)), ((150, 120), (80, 96)), ((80, 80), (80, 80))])
def test_resize_matches_torch(src, dst):
    """Up- and downsampling: torch F.interpolate(bilinear, align_corners=False) as pytorch-fid."""
    import torch
    from torch.nn import functional as F

    x = np.random.default_rng(1).uniform(-1, 1, (2,) + src + (3,)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x.transpose(0, 3, 1, 2)), size=dst, mode="bilinear",
                         align_corners=False).numpy().transpose(0, 2, 3, 1)
    got = np.asarray(inc.preprocess(jnp.asarray(x), dst))
    assert got.shape == want.shape
    # The source coordinates (dst + 0.5) * scale - 0.5 differ by an ulp (3.8e-6 below 64) between torch
    # and XLA where the scale is not a power of 2 (37 / 80): times a neighbour difference <= 2 that is
    # <= 7.6e-6 (measured 3.2e-6, margin 0.32 at the old 1e-5). atol 1e-4 leaves >10x over the bound;
    # align_corners or antialias wrong is off by >1e-2.
    np.testing.assert_allclose(got, want, atol=1e-4)


# --------------------------------------------------------------------------------------------
# converter
# --------------------------------------------------------------------------------------------

def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.torch
def test_convert_file_layouts(torch_ref, tmp_path):
    """A torch.save'd state dict (with fc and num_batches_tracked), a module, pytorch-fid's
    ``blocks.i.j`` wrapper names and a ``module.`` prefix all convert to the same variables."""
    import torch

    model, variables = torch_ref
    sd = model.state_dict()
    assert any(k.endswith("num_batches_tracked") for k in sd) and "fc.weight" in sd
    assert set(inc.torch_key_map()) == {k for k in sd if not k.startswith("fc.")
                                        and not k.endswith("num_batches_tracked")}
    path = tmp_path / inc.FID_WEIGHTS_FILE
    torch.save(sd, path)
    from_file, ignored = inc.convert_state_dict(str(path), return_ignored=True)
    assert "fc.weight" in ignored and "fc.bias" in ignored
    wrapper_names = {v: k for k, v in inc._WRAPPER_NAMES.items()}
    wrapped = {}
    for k, v in sd.items():
        head = k.split(".")[0]
        if head in wrapper_names:
            wrapped["module." + wrapper_names[head] + k[len(head):]] = v
    for other in (from_file, inc.convert_state_dict(model), inc.convert_state_dict(wrapped)):
        fa, fb = _flat(variables), _flat(other)
        assert fa.keys() == fb.keys()
        for k in fa:
            np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)
    k = "Mixed_6b.branch7x7_2.conv.weight"                      # a (1, 7) kernel: OIHW -> HWIO
    np.testing.assert_array_equal(_flat(variables)["params/Mixed_6b/branch7x7_2/conv/kernel"],
                                  sd[k].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(_flat(variables)["batch_stats/Mixed_7c/branch_pool/bn/var"],
                                  sd["Mixed_7c.branch_pool.bn.running_var"].numpy())
    summary = inc.convert_file(str(path), tmp_path / "inception.npz")
    assert "21.79M params" in summary and "ignored fc" in summary, summary
    loaded, cfg = inc.load_params(tmp_path / "inception.npz")
    assert cfg == inc.DEFAULT_CONFIG


@pytest.mark.torch
def test_convert_errors(torch_ref, tmp_path):
    model, _ = torch_ref
    sd = dict(model.state_dict())
    with pytest.raises(FileNotFoundError, match="pt_inception"):
        inc.convert_state_dict(str(tmp_path / "missing.pth"))
    bad = tmp_path / "corrupt.pth"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="could not read"):
        inc.convert_state_dict(str(bad))
    missing = {k: v for k, v in sd.items() if k != "Mixed_6c.branch7x7dbl_3.bn.running_var"}
    with pytest.raises(ValueError, match=r"missing key 'Mixed_6c\.branch7x7dbl_3\.bn\.running_var'"):
        inc.convert_state_dict(missing)
    wrong = dict(sd, **{"Mixed_5b.branch_pool.conv.weight": sd["Mixed_5c.branch_pool.conv.weight"]})
    with pytest.raises(ValueError, match=r"'Mixed_5b\.branch_pool\.conv\.weight' has shape \(64, 256, 1, 1\).*"
                                         r"expects \(32, 192, 1, 1\)"):
        inc.convert_state_dict(wrong)
    wrong = dict(sd, **{"Mixed_5b.branch_pool.bn.weight": sd["Mixed_5c.branch_pool.bn.weight"]})
    with pytest.raises(ValueError, match=r"'Mixed_5b\.branch_pool\.bn\.weight' has shape \(64,\)"):
        inc.convert_state_dict(wrong)
    with pytest.raises(ValueError, match="unexpected key 'Mixed_8a.conv.weight'"):
        inc.convert_state_dict(dict(sd, **{"Mixed_8a.conv.weight": sd["fc.weight"]}))
    with pytest.raises(ValueError, match="expected a file path"):
        inc.convert_state_dict(42)


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------

def test_save_load_round_trip_and_errors(tmp_path):
    p = inc.init_params(1)
    cfg = inc.InceptionConfig(image_size=(96, 80), dtype="bfloat16")
    path = inc.save_params(tmp_path / "inc.npz", p, cfg)
    loaded, cfg2 = inc.load_params(path)
    assert cfg2 == cfg
    fa, fb = _flat(p), _flat(loaded)
    assert fa.keys() == fb.keys() and all(np.array_equal(fa[k], fb[k]) for k in fa)

    with pytest.raises(FileNotFoundError, match="amg convert inception"):
        inc.load_params(tmp_path / "nope.npz")
    (tmp_path / "corrupt.npz").write_bytes(open(path, "rb").read()[:1000])
    with pytest.raises(ValueError, match="not a readable .npz"):
        inc.load_params(tmp_path / "corrupt.npz")
    np.savez(tmp_path / "noconfig.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="no '__config__'"):
        inc.load_params(tmp_path / "noconfig.npz")
    flat = {k: np.asarray(v) for k, v in fa.items()}
    flat["__config__"] = np.array('{"format": "amg_jax.inception/1", "config": {"image_size": 299}}')
    short = {k: v for k, v in flat.items() if k != "batch_stats/Mixed_7a/branch3x3_2/bn/mean"}
    np.savez(tmp_path / "short.npz", **short)
    with pytest.raises(ValueError, match="'batch_stats/Mixed_7a/branch3x3_2/bn/mean' is missing"):
        inc.load_params(tmp_path / "short.npz")
    shaped = dict(flat, **{"params/Conv2d_1a_3x3/conv/kernel": np.zeros((3, 3, 3, 16), np.float32)})
    np.savez(tmp_path / "shaped.npz", **shaped)
    with pytest.raises(ValueError, match=r"'params/Conv2d_1a_3x3/conv/kernel' has shape \(3, 3, 3, 16\)"):
        inc.load_params(tmp_path / "shaped.npz")
    other = dict(flat, __config__=np.array('{"format": "amg_jax.sscd/1", "config": {}}'))
    np.savez(tmp_path / "other.npz", **other)
    with pytest.raises(ValueError, match="invalid config"):
        inc.load_params(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="missing"):
        inc.save_params(tmp_path / "x.npz", {"params": {}, "batch_stats": {}})


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------

def _fd_gram(fa, fb):
    """Independent Fréchet distance for N + M << D: tr sqrt(S_a S_b) = the sum of the singular
    values of A B^T / sqrt((N - 1)(M - 1)) with A, B the centred features."""
    a, b = fa - fa.mean(0), fb - fb.mean(0)
    na, nb = len(fa) - 1, len(fb) - 1
    tr = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(na * nb)
    dmu = fa.mean(0) - fb.mean(0)
    return float(dmu @ dmu + (a * a).sum() / na + (b * b).sum() / nb - 2 * tr)


def test_span_projection_is_exact():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(5, 40)) @ rng.normal(size=(40, 40))
    b = rng.normal(size=(7, 40)) @ rng.normal(size=(40, 40)) + 0.3
    pa, pb = inc.span_projection(a, b)
    assert pa.shape == (5, 12) and pb.shape == (7, 12)
    want = _fd_gram(a, b)
    # Two float64 algorithms (sqrtm of 12-d covariances of rank 4 and 6 vs an SVD of the Gram
    # matrix): an eigenvalue that should be 0 comes out ~eps * lambda_max ~ 1e-13 with the sign and
    # size of the BLAS's round-off, and its square root adds ~3e-7 to tr sqrt(S_a S_b): ~1e-9 of
    # the FD (measured 1.0e-9 on another CPU's BLAS, 1.5e-9 with OpenBLAS' Sandybridge kernel, < 1e-12
    # here); the 8 near-null eigenvalues give at most ~2e-8. rel 3e-8 leaves 20x; a wrong projection
    # is off by O(1).
    assert metrics.frechet_distance(pa, pb) == pytest.approx(want, rel=3e-8)
    # The full 40-d computation has 36 such eigenvalues (<= 2.4e-9 of the FD each): measured 2.7e-8
    # (2.9e-8 with the Sandybridge kernel), margin 0.29 at the old 1e-7; rel 3e-7 leaves 10x.
    assert metrics.frechet_distance(a, b) == pytest.approx(want, rel=3e-7)
    big = rng.normal(size=(30, 20))                            # N + M > D: unchanged
    np.testing.assert_array_equal(inc.span_projection(big, big[:12])[1], big[:12])


@pytest.mark.torch
def test_fid_and_batching(torch_ref, images):
    """Batched features (last batch padded) equal per-pair features; fid = the Fréchet distance of
    them. Every call runs the one compiled [2, 48, 48, 3] shape."""
    _, variables = torch_ref
    a, b = images[:5], 0.5 * images[2:]
    fa = inc.compute_features(variables, a, CFG, batch_size=2)
    pairs = np.concatenate([inc.compute_features(variables, a[i:i + 2], CFG, batch_size=2) for i in (0, 2)])
    # the one compiled [2, ...] program on the same pairs: exact (1e-6 is loose). fid vs the Gram
    # formula: float64 on float32 features, ~1e-9 (see test_span_projection_is_exact), 1e-6 is loose;
    # clipping inside makes 3a and clip(3a) the same input: exact.
    np.testing.assert_allclose(fa[:4], pairs, rtol=1e-6, atol=1e-6)
    fb = inc.compute_features(variables, b, CFG, batch_size=2)
    d = inc.fid(variables, a, b, CFG, batch_size=2)
    assert d == pytest.approx(_fd_gram(fa.astype(np.float64), fb.astype(np.float64)), rel=1e-6)
    assert d > 0
    assert abs(inc.fid(variables, a, a, CFG, batch_size=2)) < 1e-6 * d
    # clip=True (default) clips to [-1, 1]: out-of-range pixels do not change the features.
    assert inc.fid(variables, a, 3.0 * a, CFG, batch_size=2) == pytest.approx(
        inc.fid(variables, a, np.clip(3.0 * a, -1, 1), CFG, batch_size=2), rel=1e-6)
    assert inc.fid(variables, a, 3.0 * a, CFG, batch_size=2, clip=False) != pytest.approx(
        inc.fid(variables, a, np.clip(3.0 * a, -1, 1), CFG, batch_size=2), rel=1e-3)
