"""fp32 products on weights kept in fp16 (`captioner.runtime.products.fp16_weight_linear`): only where every
weight is an fp16 value, the same products as fp32 to fp32 rounding, and the fused decoder's step products use
them for the shipped models, giving the reference decoder's captions."""

from __future__ import annotations

import types

import pytest
import torch

from captioner.config import ModelConfig
from captioner.decoding import beam_search
from captioner.models.checkpoint import load_model, new_model
from captioner.models.shipped import shipped_path
from captioner.models.vocab import Vocabulary
from captioner.runtime.fused_decoder import FACTORISED_IMAGES, FusedAttentionDecoder
from captioner.runtime.products import Product, fp16_weight_linear

STEP_PRODUCTS = ("hidden", "context", "out", "readout_hidden", "readout_context")
INIT_PRODUCTS = ("keys", "initial")

if "fbgemm" not in torch.backends.quantized.supported_engines:
    pytest.skip("PyTorch has no FBGEMM here (it needs an x86 CPU with AVX2): oneDNN's fp32 products run",
                allow_module_level=True)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fp16_values(*shape: int) -> torch.Tensor:
    return torch.randn(*shape).half().float()


@pytest.mark.parametrize("rows", [1, 3, 64, 200])
def test_fp16_weights_give_the_fp32_product(rows):
    torch.manual_seed(rows)
    x, w, b, base = torch.randn(rows, 512), _fp16_values(512, 96), torch.randn(96), torch.randn(rows, 96)
    product = Product(w, b, fp16_weights=True)
    assert product._fp16 is not None and product._linear is None
    y = product(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 96)
    exact = torch.addmm(b.double(), x.double(), w.double())
    assert _relative(y, exact) <= 1e-6  # fp32 arithmetic on the same weights: no bf16 rounding
    assert _relative(product(x, base), torch.addmm(base, x, w)) <= 1e-6  # a base replaces the bias
    assert _relative(Product(w, fp16_weights=True)(x), torch.mm(x, w)) <= 1e-6
    out = torch.full((rows, 96), float("nan"))
    assert product(x, base, out=out).data_ptr() == out.data_ptr() and torch.equal(out, product(x, base))
    wide = torch.randn(rows, 1024)  # strided input rows
    assert _relative(product(wide[:, ::2]), torch.addmm(b, wide[:, ::2], w)) <= 1e-6
    batched = product(x.view(1, rows, 512))
    assert batched.shape == (1, rows, 96) and torch.equal(batched[0], y)


@pytest.mark.parametrize("value", [0.1, float("nan"), float("inf"), 70000.0, 1e-8])
def test_weights_fp16_cannot_hold_keep_the_fp32_product(value):
    """0.1 is no fp16 value; NaN and inf are refused; 70,000 overflows fp16 and 1e-8 underflows it."""
    w = _fp16_values(64, 40)
    w[3, 7] = value
    assert fp16_weight_linear(w) is None
    product = Product(w, fp16_weights=True)
    assert product._fp16 is None
    if value == 0.1:
        x = torch.randn(5, 64)
        assert _relative(product(x), torch.mm(x, w)) <= 1e-6


def test_fp16_storage_is_asked_for_and_fp32_only():
    w = _fp16_values(64, 40)
    assert Product(w)._fp16 is None  # not asked: oneDNN's product, as for init's products
    assert Product(w, dtype=torch.bfloat16, fp16_weights=True)._fp16 is None  # bf16 products round anyway


@pytest.mark.parametrize("failure", ["raises", "wrong-product", "missing"])
def test_an_fp16_product_pytorch_gets_wrong_is_never_used(monkeypatch, failure):
    def raises(*args):
        raise RuntimeError("fbgemm: unsupported")

    linear = torch.ops.quantized.linear_dynamic_fp16
    if failure == "raises":
        monkeypatch.setattr(torch.ops.quantized, "linear_prepack_fp16", raises)
    elif failure == "wrong-product":
        monkeypatch.setattr(torch.ops.quantized, "linear_dynamic_fp16", lambda x, packed: 1.01 * linear(x, packed))
    else:
        monkeypatch.setattr(torch.ops, "quantized", types.SimpleNamespace())  # a PyTorch built without them
    w, b = _fp16_values(64, 40), torch.randn(40)
    assert fp16_weight_linear(w) is None
    product = Product(w, b, fp16_weights=True)
    x = torch.randn(5, 64)
    assert product._fp16 is None and _relative(product(x), torch.addmm(b, x, w)) <= 1e-6


def _decoder(deep_output: bool, fp16: bool):
    torch.manual_seed(3)
    vocab = Vocabulary.build(["a b c d e f g h i j k l m n o p"], min_count=1)
    cfg = ModelConfig(embed_dim=16, hidden_dim=24, attention_dim=12, feature_dim=20, encoder_head=40,
                      dropout=0.0, deep_output=deep_output)
    decoder = new_model(cfg, vocab, 64).decoder.eval()
    if fp16:  # as a shipped model is stored
        with torch.no_grad():
            for p in decoder.parameters():
                p.copy_(p.half().float())
    return decoder, vocab


def _search(decoder, features, vocab):
    return [h[0] for h in beam_search(decoder, features, start_id=vocab.start_id, end_id=vocab.end_id,
                                      beam_size=3, max_length=8, banned_ids=vocab.banned_ids,
                                      return_attention=True)]


@pytest.mark.parametrize("deep_output", [False, True])
@pytest.mark.parametrize("images", [3, FACTORISED_IMAGES])
def test_fused_decoder_on_fp16_weights_gives_the_reference_captions(deep_output, images):
    decoder, vocab = _decoder(deep_output, fp16=True)
    fused = FusedAttentionDecoder(decoder)
    names = [n for n in STEP_PRODUCTS if hasattr(fused, n)]
    assert len(names) == (5 if deep_output else 3)
    assert all(getattr(fused, n)._fp16 is not None for n in names)
    assert all(getattr(fused, n)._fp16 is None for n in INIT_PRODUCTS)
    features = torch.rand(images, 9, 64, generator=torch.Generator().manual_seed(images))
    ref, fast = _search(decoder, features, vocab), _search(fused, features, vocab)
    assert [h.tokens for h in fast] == [h.tokens for h in ref]
    assert [h.score for h in fast] == pytest.approx([h.score for h in ref], abs=1e-4)
    assert all(torch.allclose(a.attention, b.attention, atol=1e-5) for a, b in zip(ref, fast))


def test_decoders_of_fp32_weights_or_bf16_products_keep_their_products():
    """A model trained here (fp32 weights) keeps oneDNN's fp32 products; bf16 products never take fp16 weights."""
    fp32_trained = FusedAttentionDecoder(_decoder(True, fp16=False)[0])
    assert all(getattr(fp32_trained, n)._fp16 is None for n in STEP_PRODUCTS)
    bf16 = FusedAttentionDecoder(_decoder(True, fp16=True)[0], "bf16")
    assert all(getattr(bf16, n)._fp16 is None for n in STEP_PRODUCTS)


@pytest.mark.parametrize("name", ["general", "flickr8k"])
def test_shipped_models_run_their_step_products_on_fp16_weights(name):
    """The shipped weights are stored in fp16, so every step product of their fused decoder is kept in fp16."""
    fused = FusedAttentionDecoder(load_model(shipped_path(name)).decoder.eval())
    assert all(getattr(fused, n)._fp16 is not None for n in STEP_PRODUCTS)


def test_the_benchmark_counts_the_products_kept_in_fp16(monkeypatch):
    """benchmarks/batch_captioning.py's arithmetic limit counts the decoder's FLOPs on torch.mm; a product left
    on FBGEMM is invisible to FlopCounterMode, so fp16 weights must not lower the count."""
    import importlib.util
    from pathlib import Path

    from torch.utils.flop_counter import FlopCounterMode

    from captioner.runtime import products

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "batch_captioning.py"
    spec = importlib.util.spec_from_file_location("batch_captioning", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    decoder, vocab = _decoder(True, fp16=True)
    features = torch.rand(4, 9, 64, generator=torch.Generator().manual_seed(0))
    counts = []
    for kept_in_fp16 in (True, False):
        if not kept_in_fp16:
            monkeypatch.setattr(products, "fp16_weight_linear", lambda weight: None)
        with FlopCounterMode(display=False) as flops:
            _search(bench.countable_decoder(decoder), features, vocab)
        counts.append(flops.get_total_flops())
    assert counts[1] > 0 and counts[0] == counts[1]
