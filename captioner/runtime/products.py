"""The decoder's weight products for CPU inference: fp32 or bf16, through oneDNN's linear on a weight
prepared once (`Product`), fp32 on weights kept in fp16 where that is exact (`fp16_weight_linear`), and a bf16
projection with its activation inside the product (`ActivatedProduct`).

Why bf16 is offered for the decoder (`captioner.runtime.fused_decoder`): its matrix products are small (one
row per beam) and bound by arithmetic, not memory, and on CPUs with native bf16 (AVX512-BF16 or AMX) PyTorch
multiplies bf16 four times faster than fp32 (measured here: 830 against 195 GFLOP/s for a (96 x 512) by
(512 x 2816) product). The products read bf16 copies of the weights and round their inputs to bf16, accumulate in
fp32, and round their outputs to bf16 (PyTorch's CPU product has no fp32 output for bf16 inputs); everything
between the products (biases, attention softmax, the LSTM nonlinearities, the state, the final log-softmax) stays
fp32, as do the two small products of the attention itself (the energies' score over the attention units, and the
weighted sum of the grid features). The one exception is a projection layer whose output only feeds another
product (the tuned encoder head): its bias (rounded to bf16) and activation run inside its product, which writes
bf16 (`ActivatedProduct`).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Products = Literal["fp32", "bf16"]
PRODUCT_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}

LINEAR_ROWS_HINT = 64
"""Rows oneDNN's linear is prepared for: hints from 3 to 192 ran 3 to 192 rows at the same speed."""


def onednn_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` (K, N), fp32 or bf16, as oneDNN's linear takes it ((N, K), reordered once), or None where
    PyTorch's oneDNN linear is missing or refuses it (then `torch.mm` runs the product).

    Why, in bf16: `torch.mm` on bf16 sets up oneDNN's product anew at every call. Through oneDNN's linear with
    the weight prepared once, the decoder's products ran 1.3-3x faster on a 2-core AMX Xeon (a (3 x 512) by
    (512 x 2816) product: 148 against 44 us; (192 x 512): 352 against 244 us). Both accumulate in fp32 and round
    the output to bf16, but for some row counts oneDNN picks a kernel that sums in another order, so a result may
    differ from `torch.mm`'s in the last bf16 bit (the general model's dev scores moved by at most 0.0001 BLEU-4).

    Why, in fp32: `torch.addmm` (MKL's sgemm) repacks the weight at every call, which dominates a beam's few
    rows. On a 2-core Zen 4 EPYC (2026-12-07) a (3 x 512) by (512 x 2656) product took 68-72 against 275 us,
    (3 x 512) by (512 x 2755) 91 against 426 us, and with 192 rows 2.5 against 3.2 ms; single-image beam search
    of the general model 17-22 against 33-43 ms. oneDNN sums in another order than MKL (results about 1e-6
    relative apart), yet all 1,150 dev captions of the general model (Flickr8k and coco_small) and their
    scores stayed the same to every digit.
    """
    ops = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise")):
        return None
    try:
        packed = ops._reorder_linear_weight(weight.t().contiguous(), LINEAR_ROWS_HINT)
        probe = torch.randn(3, weight.size(0), generator=torch.Generator().manual_seed(0)).to(weight.dtype)
        if not torch.allclose(ops._linear_pointwise(probe, packed, None, "none", [], "").float(),
                              torch.mm(probe, weight).float(), rtol=1e-2, atol=1e-2):
            return None  # not the product it should be: never trust it
    except (RuntimeError, TypeError, AttributeError):
        return None
    return packed


def fp16_weight_linear(weight: torch.Tensor) -> object | None:
    """`weight` (K, N), fp32, packed for FBGEMM's product of fp16 weights with fp32 inputs (each weight widened to
    fp32 inside the product, sums in fp32), or None where a weight is not exactly an fp16 value, or where PyTorch
    lacks the product, refuses it or gets it wrong.

    Why: one image's beam search multiplies 3 rows by the step's weights (about 17 MB in fp32) at every step, and
    those weights do not stay in cache from one step to the next, so the products are bound by reading them.
    Shipped models are stored in fp16 (`scripts/ship_model.py`), so their weights are fp16 values: kept in fp16
    they are read at half the bytes and multiply as the same numbers, fp32 arithmetic throughout (not bf16's
    rounding of inputs, weights and outputs). On a 2-core Zen 4 EPYC (2026-12-07) the general model's one-image
    p50 went from 31.7 to 25.0 ms, 40 captions of 40 the same. A weight of a model trained here and not shipped
    (fp32 values) is not fp16-exact and keeps oneDNN's fp32 product.
    """
    ops = torch.ops.quantized
    if not (hasattr(ops, "linear_prepack_fp16") and hasattr(ops, "linear_dynamic_fp16")):
        return None
    weight = weight.detach().float()
    if not torch.equal(weight.half().float(), weight):  # also refuses NaN, inf and fp16's overflow or underflow
        return None
    try:
        packed = ops.linear_prepack_fp16(weight.t().contiguous(), None)
        probe = torch.randn(3, weight.size(0), generator=torch.Generator().manual_seed(0))
        if not torch.allclose(ops.linear_dynamic_fp16(probe, packed), torch.mm(probe, weight), rtol=1e-4, atol=1e-4):
            return None  # not the product it should be: never trust it
    except (RuntimeError, TypeError, AttributeError):
        return None
    return packed


class Product:
    """`base + x @ weight` with fp32 operands, or with bf16 inputs (see the module docstring); always fp32 out.
    Both run through oneDNN's linear on a weight prepared once where PyTorch has it (`onednn_linear`).

    `weight` is (K, N) (already transposed), `bias` (N,) is the default `base`. `fp16_weights`: an fp32 product
    whose weights are all fp16 values keeps them in fp16 (`fp16_weight_linear`), for products bound by reading
    their weights. Inference only: oneDNN's linear has no backward, and its prepared weight cannot be copied or
    pickled (build a Product again instead).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float32,
                 fp16_weights: bool = False):
        self.dtype = dtype
        self.weight = weight.detach().float().contiguous().to(dtype)
        self.bias = bias.detach().float().contiguous() if bias is not None else None
        self._fp16 = fp16_weight_linear(self.weight) if fp16_weights and dtype == torch.float32 else None
        self._linear = onednn_linear(self.weight) if self._fp16 is None else None

    @classmethod
    def of(cls, linear: nn.Linear, dtype: torch.dtype = torch.float32, scale: float = 1.0,
           fp16_weights: bool = False) -> Product:
        """The product of an `nn.Linear` (its weight and bias times `scale`, exact for a power of two)."""
        bias = linear.bias * scale if linear.bias is not None else None
        return cls(linear.weight.t() * scale, bias, dtype, fp16_weights)

    def __call__(self, x: torch.Tensor, base: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """(..., K) -> (..., N); `base` (broadcastable to (M, N)) replaces the bias when given; `out`, a
        contiguous (..., N) fp32 tensor, receives the result (written in place by `torch.addmm`, copied there
        from oneDNN's linear, which has no `out`)."""
        base = self.bias if base is None else base
        flat = x.reshape(-1, x.size(-1))
        flat_out = out.view(-1, out.size(-1)) if out is not None else None
        fp32 = self.dtype == torch.float32
        if self._fp16 is not None:  # fp32 out; the base is added below
            y = torch.ops.quantized.linear_dynamic_fp16(flat.contiguous(), self._fp16)
        elif self._linear is not None:
            # In fp32 a dense (N,) base is oneDNN's bias, added inside the product (oneDNN reads its bias as N
            # contiguous values: no strides, no broadcasting); any other base is added below.
            inner = fp32 and base is not None and base.dim() == 1 and base.numel() == self.weight.size(1)
            y = torch.ops.mkldnn._linear_pointwise(flat.to(self.dtype), self._linear,
                                                   base.contiguous() if inner else None, "none", [], "")
            base = None if inner else base
        elif fp32:
            y = torch.mm(flat, self.weight, out=flat_out) if base is None else torch.addmm(
                base, flat, self.weight, out=flat_out)
            return y.view(*x.shape[:-1], y.size(-1))
        else:
            y = torch.mm(flat.to(self.dtype), self.weight)
        # One op: a bf16 product is widened exactly (an fp32 one is kept), then added in fp32 (as
        # .float().add_(base) would).
        if base is None:
            y = y.float() if flat_out is None else flat_out.copy_(y)
        else:
            y = torch.add(base, y, out=flat_out)
        return y.view(*x.shape[:-1], y.size(-1))


class ActivatedProduct:
    """act(x @ weight + bias), bf16 in and out, in one call of oneDNN's linear (bias, rounded to bf16, and
    activation inside): for a projection layer whose output only feeds another bf16 product.

    Why: the tuned encoder head (352 -> 1280, ReLU6) as a `Product` wrote fp32, then added the bias, clamped and
    rounded to bf16 for the next product: three more passes over its wide output. One call took 315 against 820 us
    for 8 images' (648 x 352) by (352 x 1280) on the 2-core AMX Xeon (2026-12-04), and is nearer the exact result
    (relative L2 distance from float64 0.0047 against 0.0055: one rounding of the output instead of two).
    """

    ACTIVATIONS = {nn.ReLU: ("relu", []), nn.ReLU6: ("hardtanh", [0.0, 6.0])}
    """The activations oneDNN applies inside the product: (its name, its scalars)."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None, activation: tuple[str, list[float]]):
        self._linear, self.bias, (self.name, self.scalars) = packed, bias, activation

    @classmethod
    def of(cls, linear: nn.Linear, activation: nn.Module) -> ActivatedProduct | None:
        """`activation(linear(x))` where oneDNN's linear is usable and knows the activation, else None."""
        kind = cls.ACTIVATIONS.get(type(activation))
        if kind is None:
            return None
        packed = onednn_linear(linear.weight.detach().float().t().contiguous().to(torch.bfloat16))
        if packed is None:
            return None
        bias = linear.bias.detach().to(torch.bfloat16) if linear.bias is not None else None
        fused = cls(packed, bias, kind)
        probe = 4 * torch.randn(3, linear.in_features, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                exact = activation(linear(probe))
                if (fused(probe).float() - exact).norm() <= 2e-2 * exact.norm():
                    return fused
        except (RuntimeError, TypeError):
            pass
        return None  # oneDNN refused the activation or got it wrong: never trust it

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1)).to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(flat, self._linear, self.bias, self.name, self.scalars, "")
        return y.view(*x.shape[:-1], y.size(-1))
