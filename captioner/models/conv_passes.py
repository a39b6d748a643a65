"""Rewrites of a frozen convolutional trunk for inference, each keeping the function it computes.

- `fold_batchnorm`: every eval-mode batch norm that follows a convolution is folded into that convolution.
- `static_same_padding`: TensorFlow-style "same" convolutions (ours or timm's) get the constant padding of one
  input size.

Both work in place on a copy that the caller owns (`captioner.runtime.fast.FastEncoder` deep-copies the trunk first);
`tests/test_speed_paths.py` checks that each keeps the trunk's output.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import fx, nn


class Conv2dSame(nn.Conv2d):
    """TensorFlow "same" convolution: the padding is worked out from each input's size (more after than before
    when it is odd), as timm's `Conv2dSame` does; `static_same_padding` makes it constant."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = (same_padding(n, k, s, d) for n, k, s, d in
                  zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation))  # height, width
        x = nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return nn.functional.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def same_padding(size: int, kernel: int, stride: int, dilation: int = 1) -> int:
    """Total TF-"same" padding of one side length (timm's `get_same_padding`)."""
    return max((-(-size // stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class _ConvBNTracer(fx.Tracer):
    """Keeps convolutions (timm's Conv2dSame included) and batch norms (timm's BatchNormAct2d) as single nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or super().is_leaf_module(m, qualname)


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode batch norm that directly follows a convolution into that convolution, in place.

    A timm `BatchNormAct2d` keeps its activation (and dropout) after folding. Returns the number folded.
    """
    graph = _ConvBNTracer().trace(model)
    modules = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.training or bn.running_var is None:
            continue
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if not isinstance(conv, nn.Conv2d) or len(src.users) != 1:
            continue
        scale = bn.running_var.add(bn.eps).rsqrt()
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0.0)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(shift)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias * scale + shift, requires_grad=False)
        after = [m for name in ("drop", "act") if isinstance(m := getattr(bn, name, None), nn.Module)]
        parent, _, name = node.target.rpartition(".")
        setattr(model.get_submodule(parent), name, nn.Sequential(*after) if after else nn.Identity())
        folded += 1
    return folded


@torch.no_grad()
def static_same_padding(model: nn.Module, image_size: int) -> int:
    """Give timm's TF-"same" convolutions the fixed padding of `image_size` inputs, in place; returns how many.

    `Conv2dSame` works out its padding from the input's shape at every call. Exported to ONNX with a dynamic
    batch, that becomes a Shape-Gather-Ceil-...-Pad chain per strided convolution that ONNX Runtime cannot fold
    away, and the run-time Pad keeps it from fusing the padding into the convolution: with the 5 such
    convolutions of EfficientNet-Lite0 at 288x288, the encoder ran at 101-140 images/s against 205-217 with
    constant padding (ONNX Runtime, 2 threads, batches of 8, two measurements; the outputs were the same bit for
    bit). A fast encoder only
    ever sees `image_size` inputs (it checks), so the padding is a constant: the convolution's own when it is
    symmetric, else an explicit `ZeroPad2d` in front (a stride-2 convolution on an even size pads more after
    than before).

    The sizes come from one forward pass of zeros in eval mode (the modules' training flags are restored, so
    batch-norm statistics and the RNG are untouched). The new convolutions hold the old parameters themselves,
    so dtype, device and `requires_grad` stay as they were.
    """
    kinds: tuple[type, ...] = (Conv2dSame,)
    if "timm" in sys.modules:  # a timm-built trunk (tests, benchmarks); never import timm just to look
        from timm.layers import Conv2dSame as TimmConv2dSame

        kinds += (TimmConv2dSame,)
    same_convs = [name for name, m in model.named_modules() if isinstance(m, kinds)]
    if not same_convs:
        return 0
    sizes: dict[str, tuple[int, int]] = {}

    def record(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_: nn.Module, args: tuple) -> None:
            sizes[name] = tuple(args[0].shape[-2:])
        return hook

    hooks = [model.get_submodule(name).register_forward_pre_hook(record(name)) for name in same_convs]
    training = {m: m.training for m in model.modules()}
    first = model.get_submodule(same_convs[0]).weight
    try:
        model.eval()(torch.zeros(1, 3, image_size, image_size, dtype=first.dtype, device=first.device))
    finally:
        for hook in hooks:
            hook.remove()
        for m, flag in training.items():
            m.training = flag
    for name in same_convs:
        same, (height, width) = model.get_submodule(name), sizes[name]
        (kh, kw), (sh, sw), (dh, dw) = same.kernel_size, same.stride, same.dilation
        ph, pw = same_padding(height, kh, sh, dh), same_padding(width, kw, sw, dw)
        symmetric = ph % 2 == 0 and pw % 2 == 0
        # skip_init and then the old parameters: a fresh layer's random initialisation would draw from the
        # global RNG, which training seeds before extracting features (and builds this only on a cold cache).
        conv = nn.utils.skip_init(nn.Conv2d, same.in_channels, same.out_channels, same.kernel_size, same.stride,
                                  (ph // 2, pw // 2) if symmetric else 0, same.dilation, same.groups,
                                  same.bias is not None, device="meta")
        conv.weight, conv.bias = same.weight, same.bias
        conv.train(same.training)
        padded = conv if symmetric else nn.Sequential(
            nn.ZeroPad2d((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)), conv)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, padded)
    return len(same_convs)
