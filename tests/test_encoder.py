import pytest
import torch
from PIL import Image

from captioner.models.encoder import (
    EncoderError,
    _read_state_dict,
    build_encoder,
    efficientnet_lite0_weights_path,
)


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


def test_unknown_encoder_lists_the_valid_ones():
    with pytest.raises(EncoderError, match="efficientnet_lite0, resnet50"):
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

    from captioner.models.encoder import EfficientNetLite0

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
            "print(sorted(m for m in ('timm', 'torchvision', 'torch._dynamo', 'sympy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
