"""The OpenVINO encoder backend (`captioner.runtime.openvino_runtime`, `FastEncoder(..., backend="openvino")`)
against the reference encoder and ONNX Runtime, with the real EfficientNet-Lite0 weights.

Where the CPU has no AVX-512, OpenVINO ignores the bf16 inference-precision hint and runs fp32 (with AVX-512 but no
BF16 it emulates bf16): the bounds below hold either way; the check that bf16 rounding happened runs only where
bf16 is native. The tolerances
are stated in `tests/test_speed_paths.py`'s docstring; measured values (2-core AMX Xeon, one thread) are beside
each bound.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from captioner import Captioner
from captioner.config import DecodeConfig, ModelConfig
from captioner.models.checkpoint import new_model
from captioner.models.encoder import build_encoder
from captioner.models.vocab import Vocabulary
from captioner.runtime import cache, int8, onnx_runtime, openvino_runtime
from captioner.runtime import fast as fast_module
from captioner.runtime.choice import cpu_has_bf16, cpu_has_vnni
from captioner.runtime.fast import FastEncoder, export_onnx
from captioner.runtime.fused_decoder import FusedAttentionDecoder
from tests import test_speed_paths as speed_paths
from tests.test_speed_paths import SCENES, _captions, scene

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")

pytestmark = pytest.mark.filterwarnings("ignore:this CPU has no native bf16:RuntimeWarning")

# test_speed_paths' fixtures: one intra-op thread (OpenVINO takes torch's count when the runner is built), the
# Lite0 encoder, and the pixels of its two scene sets
one_thread, encoder, pixels = speed_paths.one_thread, speed_paths.encoder, speed_paths.pixels


@pytest.fixture(scope="module")
def small_encoder():
    """96-pixel inputs: for the cache and error tests, where only the plumbing matters."""
    return build_encoder("efficientnet_lite0", image_size=96)


@pytest.fixture(scope="module")
def reference(encoder, pixels) -> dict[int, torch.Tensor]:
    with torch.no_grad():
        return {seed: encoder(x) for seed, x in pixels.items()}


@pytest.fixture(scope="module")
def openvino_bf16(encoder) -> FastEncoder:
    fast = FastEncoder(encoder, "bf16", backend="openvino")
    assert (fast.backend, fast.precision) == ("openvino", "bf16")
    return fast


@pytest.fixture(scope="module")
def bf16_features(openvino_bf16, pixels) -> dict[int, torch.Tensor]:
    return {seed: openvino_bf16(x).clone() for seed, x in pixels.items()}


@pytest.fixture(scope="module")
def int8_calibration(encoder, pixels, tmp_path_factory):
    """Ranges of the first scene set, as in `tests/test_speed_paths.py`."""
    calibration = tmp_path_factory.mktemp("int8-openvino") / "model.int8.json"
    assert int8.calibrate(export_onnx(encoder), [pixels[0][:8].numpy(), pixels[0][8:].numpy()],
                          encoder.cache_key(), calibration) == 16
    return calibration


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1)).min().item()


def test_openvino_bf16_features_within_tolerance(bf16_features, reference):
    for seed in (0, 1):  # measured: relative 0.058 and 0.066, cosine >= 0.9958 and 0.9930
        ref, fast = reference[seed], bf16_features[seed]
        assert fast.shape == ref.shape == (16, 49, 1280) and fast.dtype == torch.float32
        assert _relative(fast, ref) <= 0.1
        assert _min_cosine(fast, ref) >= 0.99
        if cpu_has_bf16():  # it did run in bf16 (elsewhere OpenVINO keeps fp32: the reference's features)
            assert _relative(fast, ref) > 1e-3


def test_openvino_output_shape_and_chunking(encoder, openvino_bf16, bf16_features, pixels):
    """Chunks of 3 (a last chunk of 2), and single images (the model compiled for one image), give the features of the
    default chunks of 8 (measured: identical)."""
    chunked = FastEncoder(encoder, "bf16", backend="openvino", chunk_size=3)
    whole = chunked(pixels[0][:5])
    assert whole.shape == (5, 49, 1280) and whole.dtype == torch.float32
    # bf16 kernels may differ by batch size on other CPUs: a few bf16 roundings, far below a scene's 100%
    assert _relative(whole, bf16_features[0][:5]) <= 1e-2
    alone = torch.cat([openvino_bf16(x.unsqueeze(0)) for x in pixels[0][:5]])
    assert _relative(alone, bf16_features[0][:5]) <= 1e-2
    assert _relative(chunked(pixels[1]), bf16_features[1]) <= 1e-2
    with pytest.raises(ValueError, match="224"):
        openvino_bf16(torch.zeros(1, 3, 200, 200))


def _uint8(pixels: torch.Tensor) -> torch.Tensor:
    """The uint8 images that `Preprocess.normalize` (mean = std = 0.5) turned into `pixels`."""
    return ((pixels * 0.5 + 0.5) * 255).round().to(torch.uint8)


def test_uint8_pixels_are_normalised_in_the_graph_to_the_same_features(openvino_bf16, bf16_features, pixels):
    """The uint8 graph normalises as `Preprocess.normalize` does (measured: identical features under AMX bf16;
    at most 3.6e-7 apart in f32)."""
    raw = _uint8(pixels[1])
    assert torch.equal(openvino_bf16.preprocess.normalize(raw), pixels[1])  # the right uint8 images
    got = openvino_bf16(raw)
    assert got.shape == (16, 49, 1280) and got.dtype == torch.float32
    assert _relative(got, bf16_features[1]) <= 1e-3


@pytest.mark.parametrize("vnni", [True, False], ids=["vnni", "no-vnni"])
def test_openvino_int8_matches_onnxruntime_int8(encoder, pixels, int8_calibration, vnni):
    """The same QDQ model (8-bit weights with VNNI, 7-bit without), run by both: measured relative 0.064 and 0.065
    (8 bits), 0.063 and 0.067 (7 bits), cosine >= 0.994; two different scenes are about 100% apart."""
    if not cpu_has_vnni():
        pytest.skip("OpenVINO's int8 encoder is chosen only on CPUs with VNNI; it was not measured on others")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("captioner.runtime.fast.cpu_has_vnni", lambda: vnni)
        onnxruntime = FastEncoder(encoder, "int8", backend="onnxruntime", calibration=int8_calibration)
        openvino = FastEncoder(encoder, "int8", backend="openvino", calibration=int8_calibration)
    assert (openvino.backend, openvino.precision) == ("openvino", "int8")
    for seed in (0, 1):  # 1: scenes the calibration never saw
        a, b = openvino(pixels[seed]), onnxruntime(pixels[seed])
        assert a.shape == b.shape == (16, 49, 1280) and a.dtype == torch.float32
        assert _relative(a, b) <= 0.15
        assert _min_cosine(a, b) >= 0.98


def test_concurrent_calls_get_the_sequential_results(openvino_bf16, pixels):
    """One infer request behind a lock: two threads calling the same encoder at once each get their own images'
    features, as one after the other would."""
    groups = list(pixels[1].split(4))
    expected = [openvino_bf16(g) for g in groups]
    barrier = threading.Barrier(2, timeout=60)

    def call(i: int) -> torch.Tensor:
        barrier.wait()  # both threads enter the encoder together
        return openvino_bf16(groups[i % len(groups)])

    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(call, range(4 * len(groups))))
    for i, features in enumerate(got):
        assert torch.equal(features, expected[i % len(groups)]), i


@pytest.fixture(scope="module")
def tiny_onnx() -> tuple[bytes, torch.nn.Module]:
    """A 3 -> 4 channel 3x3 convolution at 16 pixels: the runner's plumbing without a network's cost."""
    conv = torch.nn.Conv2d(3, 4, 3, padding=1).eval()
    torch.nn.init.normal_(conv.weight, generator=torch.Generator().manual_seed(0))
    return onnx_runtime.export(conv, 16), conv


def test_runner_without_pixels_refuses_uint8_and_names_why(tiny_onnx):
    model, conv = tiny_onnx
    run = openvino_runtime.runner(model, "f32", threads=1)
    x = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(run(x), conv(x), atol=1e-5)
    with pytest.raises(ValueError, match="normalised float images, not uint8"):
        run(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))


def test_one_image_runs_a_model_compiled_for_one_image(tiny_onnx, monkeypatch):
    """A single image runs on a model with a static batch of 1 (faster kernels: `openvino_runtime.runner`),
    compiled once at its first use; batches keep the dynamic model; both give the layer's output."""
    import openvino as ov

    shapes = []
    compile_model = ov.Core.compile_model

    def recording(core, graph, *args):
        shapes.append(str(graph.input(0).get_partial_shape()))
        return compile_model(core, graph, *args)

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    model, conv = tiny_onnx
    run = openvino_runtime.runner(model, "f32", threads=1)
    x = torch.rand(3, 3, 16, 16)
    with torch.no_grad():
        expected = conv(x)
    assert torch.allclose(run(x), expected, atol=1e-5)
    assert shapes == ["[?,3,16,16]"]
    for i in (0, 2, 1):
        assert torch.allclose(run(x[i:i + 1]), expected[i:i + 1], atol=1e-5)
    assert shapes == ["[?,3,16,16]", "[1,3,16,16]"]  # compiled once, then reused
    assert torch.allclose(run(x[:2]), expected[:2], atol=1e-5) and len(shapes) == 2


def test_runner_compiles_the_float_graph_at_first_use_from_several_threads(tiny_onnx):
    """With `pixels`, uint8's graph is compiled at once and the float graph at its first call; threads that
    ask for both at the same moment each get the result of their own input, as one after the other would."""
    model, conv = tiny_onnx
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    run = openvino_runtime.runner(model, "f32", threads=1, pixels=(mean, std))
    raw = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    floats = (raw.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = conv(floats)
    barrier = threading.Barrier(4, timeout=60)

    def call(i: int) -> torch.Tensor:
        barrier.wait()
        return run(raw if i % 2 else floats)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(call, range(4)))
    for features in got:
        assert torch.allclose(features, expected, atol=1e-4)


def test_bf16_reads_the_fp32_onnx_file(tmp_path, monkeypatch, small_encoder):
    """The bf16 OpenVINO encoder runs the fp32 graph: after the fp32 ONNX Runtime encoder it exports nothing and
    writes nothing, it reads the one cached `encoder-fp32-*.onnx`."""
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))
    x = torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    fp32 = FastEncoder(small_encoder, "fp32", backend="onnxruntime")(x)
    [written] = (tmp_path / "cache").glob("encoder-fp32-*.onnx")
    data = written.read_bytes()

    def no_export(encoder):
        raise AssertionError("exported the encoder again")

    monkeypatch.setattr("captioner.runtime.fast.export_onnx", no_export)
    with pytest.raises(AssertionError, match="exported the encoder again"):  # the patch bites on a miss
        FastEncoder(small_encoder, "bf16", backend="openvino", disk_cache=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="captioner cache")  # a hit, not a rebuild
        bf16 = FastEncoder(small_encoder, "bf16", backend="openvino")(x)
    assert list((tmp_path / "cache").glob("*.onnx")) == [written] and written.read_bytes() == data
    assert bf16.shape == fp32.shape == (3, 9, 1280) and _relative(bf16, fp32) <= 0.1


@pytest.mark.parametrize("damage", ["garbage", "valid-checksum-not-onnx"])  # all: test_runtime_cache
def test_damaged_file_is_rebuilt_for_openvino(tmp_path, monkeypatch, small_encoder, damage):
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    expected = FastEncoder(small_encoder, "bf16", backend="openvino")(x)
    [path] = (tmp_path / "cache").glob("*.onnx")
    assert path.name.startswith("encoder-fp32-")
    data = path.read_bytes()
    if damage == "garbage":  # fails the checksum
        path.write_bytes(b"\x00not a model" * 100)
    else:  # passes the checksum, but OpenVINO cannot read it
        cache.write(path, b"not an onnx graph")
    with pytest.warns(RuntimeWarning, match="building it again"):
        rebuilt = FastEncoder(small_encoder, "bf16", backend="openvino")(x)
    assert torch.equal(rebuilt, expected)
    assert path.read_bytes() == data  # written again, whole


def test_openvino_backend_needs_openvino(monkeypatch, small_encoder):
    monkeypatch.setattr("captioner.runtime.openvino_runtime.available", lambda: False)
    with pytest.raises(ValueError, match=r"the openvino encoder needs OpenVINO \(pip install openvino\)"):
        FastEncoder(small_encoder, "bf16", backend="openvino")
    with pytest.raises(ValueError, match="needs OpenVINO"):
        FastEncoder(small_encoder, "fp32", backend="openvino")
    # "auto" falls back: TorchScript for bf16 (ONNX Runtime has no bf16 convolutions).
    assert FastEncoder(small_encoder, "bf16", script=False).backend == "torchscript"


def test_unknown_backend_lists_the_backends(small_encoder):
    with pytest.raises(ValueError, match=r"unknown backend 'tensorrt'; choose auto, onnxruntime, openvino, "
                                         r"torchscript"):
        FastEncoder(small_encoder, "fp32", backend="tensorrt")
    with pytest.raises(ValueError, match="the onnxruntime backend runs fp32 and int8, not bf16"):
        FastEncoder(small_encoder, "bf16", backend="onnxruntime")


@pytest.fixture
def openvino_for_bf16(monkeypatch):
    """`Captioner` has no backend argument: make "auto" pick OpenVINO for the bf16 encoder on any CPU."""
    choose = fast_module.default_backend
    monkeypatch.setattr("captioner.runtime.fast.default_backend", lambda precision, flags=None: (
        "openvino" if precision == "bf16" else choose(precision, flags)))


@pytest.fixture(scope="module")
def fitted(reference):
    """A small decoder fitted to name each scene of the first set (as `tests/test_speed_paths.py`'s `fitted`)."""
    vocab = Vocabulary.build([f"a {c} {s}" for c, s in SCENES], min_count=1)
    torch.manual_seed(0)
    cfg = ModelConfig(embed_dim=16, hidden_dim=32, attention_dim=16, feature_dim=32, dropout=0.0,
                      feature_dropout=0.0)
    model = new_model(cfg, vocab, 1280, DecodeConfig(beam_size=3, max_length=6))
    captions = torch.tensor([vocab.encode(f"a {c} {s}") for c, s in SCENES])
    optimiser = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)
    model.decoder.train()
    for _ in range(120):
        logits = model.decoder(reference[0], captions).padded()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), captions[:, 1:].flatten())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.decoder.eval()
    return model


def test_fitted_decoder_captions_from_openvino_bf16_features(fitted, reference, bf16_features):
    """Measured: the bf16 products on OpenVINO bf16 features give the reference caption on 16 of 16 unseen
    scenes."""
    vocab = fitted.vocab
    ref = [" ".join(vocab.decode(h.tokens)) for h in _captions(fitted.decoder, reference[1], vocab)]
    assert sum(r == f"a {c} {s}" for r, (c, s) in zip(ref, SCENES)) >= 12  # it did learn the scenes
    bf16 = [" ".join(vocab.decode(h.tokens))
            for h in _captions(FusedAttentionDecoder(fitted.decoder, "bf16"), bf16_features[1], vocab)]
    assert sum(a == b for a, b in zip(ref, bf16)) >= 15


def test_bf16_captioner_on_openvino(openvino_for_bf16, encoder, fitted, tiny_model):
    """End to end: precision "bf16" runs the OpenVINO encoder and bf16 decoder products, and captions as fp32
    does. Measured on the unseen scenes: the fitted model 16 of 16 captions the same, the random tiny model 16
    (15 on the first scene set)."""
    images = [scene(c, s, 1) for c, s in SCENES]
    for model in (fitted, tiny_model):
        bf16 = Captioner(model, encoder, precision="bf16")
        results = bf16.caption(images, beam_size=3)
        fast_encoder, decoder = bf16._fast.get()
        assert (fast_encoder.backend, fast_encoder.precision, decoder.products) == ("openvino", "bf16", "bf16")
        assert len(results) == 16 and all(isinstance(r.text, str) and r.text.strip() for r in results)
        fp32 = Captioner(model, encoder, precision="fp32").caption(images, beam_size=3)
        assert sum(a.text == b.text for a, b in zip(results, fp32)) >= 15


@pytest.mark.parametrize("chunk_size", [0, -3])
@pytest.mark.parametrize("backend", ["onnxruntime", "openvino", "torchscript"])
def test_a_chunk_size_below_one_is_refused(small_encoder, backend, chunk_size):
    """0 or a negative size used to fail only at the first call, inside torch's split; now it fails at once."""
    precision = "fp32" if backend != "openvino" else "bf16"
    with pytest.raises(ValueError, match=f"chunk_size must be >= 1, got {chunk_size}"):
        FastEncoder(small_encoder, precision, backend=backend, chunk_size=chunk_size, script=False)


_SIGINT_AFTER_TWO_MODELS = """
import gc, os, signal, sys
import torch
from captioner.models.encoder import build_encoder
from captioner.runtime import openvino_runtime
from captioner.runtime.fast import export_onnx

encoder = build_encoder("efficientnet_lite0", image_size=96)
model, pixels = export_onnx(encoder), (encoder.preprocess.mean, encoder.preprocess.std)
first = openvino_runtime.runner(model, "f32", pixels=pixels)
second = openvino_runtime.runner(model, "f32", pixels=pixels)
first(torch.zeros(1, 3, 96, 96, dtype=torch.uint8))
del first  # freed before the model built after it
gc.collect()
junk = [bytearray(20000) for _ in range(500)]  # the freed memory used again, as a running program does
del second
gc.collect()
try:
    os.kill(os.getpid(), signal.SIGINT)
except KeyboardInterrupt:
    sys.exit(7)
"""


@pytest.mark.parametrize("faulthandler", [False, True])
def test_ctrl_c_after_two_models_freed_out_of_order_is_a_keyboard_interrupt(tmp_path, faulthandler):
    """Compiling an OpenVINO model put an alternate signal stack of its own on the thread, and freeing it put back
    the one it had found: two models freed in another order left the thread on a freed stack, and the next
    Ctrl-C was a segmentation fault in Python's handler (exit -11) instead of a KeyboardInterrupt."""
    script = tmp_path / "sigint.py"
    script.write_text(_SIGINT_AFTER_TWO_MODELS)
    done = subprocess.run([sys.executable, *(["-X", "faulthandler"] if faulthandler else []), str(script)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 7, done.stderr[-2000:]


def test_building_a_model_keeps_the_threads_signal_stack(small_encoder):
    """The in-process half of the test above: the thread's alternate signal stack is the same before and after a
    model is built (under pytest, faulthandler's)."""
    import ctypes

    stack = openvino_runtime._SignalStack
    libc = ctypes.CDLL(None, use_errno=True)

    def current() -> tuple:
        now = stack()
        assert libc.sigaltstack(None, ctypes.byref(now)) == 0
        return now.ss_sp, now.ss_size, now.ss_flags

    before = current()
    pixels = (small_encoder.preprocess.mean, small_encoder.preprocess.std)
    run = openvino_runtime.runner(export_onnx(small_encoder), "f32", pixels=pixels)
    run(torch.zeros(1, 3, 96, 96))  # the float graph, compiled at its first use
    assert current() == before
