"""The loader's value ranges, size limits and path objects: 32-bit and float gray scaled by their actual range,
thin strips refused from the header before they reach the resize, bytes paths opened.

All images are generated here with PIL and kept small; the huge sizes are hand-written PNG headers that are
never decoded (a 1 x 60,000,000 image through the resize would try to allocate 40 GB).
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from captioner import Captioner, ImageLoadError
from captioner import images as images_module
from captioner.cli import main
from captioner.images import MAX_ASPECT, MAX_SIDE, describe, open_image
from captioner.models.encoder import build_encoder

GREEN = (20, 200, 20)


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def gray_row(out: Image.Image) -> list[int]:
    """The red channel of the first row; asserts the image is still gray (three equal channels)."""
    pixels = np.asarray(out)
    assert out.mode == "RGB" and (pixels == pixels[..., :1]).all()
    return pixels[0, :, 0].tolist()


def row_image(values: list, dtype) -> Image.Image:
    """A one-row image of `values` ("I" for int32, "F" for float32)."""
    return Image.fromarray(np.array([values], dtype=dtype))


def png_header(width: int, height: int) -> bytes:
    """A PNG claiming width x height gray pixels with almost no data: only a size check can refuse it cleanly."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000))
            + chunk(b"IEND", b""))


@pytest.fixture
def no_decoding(monkeypatch) -> list:
    """Records every decode (`images._load`); a test asserts it stays empty, i.e. the refusal came first."""
    calls: list = []
    real = images_module._load
    monkeypatch.setattr(images_module, "_load", lambda image, *args: calls.append(image.size) or real(image, *args))
    return calls


@pytest.fixture
def captioner(tiny_model) -> Captioner:
    return Captioner(tiny_model, build_encoder("efficientnet_lite0", pretrained=False))


class BytesPath:
    """An os.PathLike whose __fspath__ returns bytes, as a library working in bytes paths may hand over."""

    def __init__(self, path):
        self.path = path

    def __fspath__(self):
        return self.path


class BrokenPath:
    def __fspath__(self):
        raise RuntimeError("no path today")


# --- 32-bit integer and float gray ---------------------------------------------------------------------------

def test_mode_i_with_8_bit_values_keeps_them_like_pil_convert_l():
    photo = Image.fromarray(np.arange(0, 256, 5, dtype=np.uint8)[None])  # a gray ramp, mode "L"
    as_i = photo.convert("I")
    tiff = encode(as_i, "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "I"  # really a 32-bit file
    for item in (as_i, tiff):
        assert gray_row(open_image(item)) == np.asarray(photo)[0].tolist()  # was all 0 (divided by 256)
    assert gray_row(open_image(row_image([-7, 0, 255], np.int32))) == [0, 0, 255]  # clipped, as convert("L")


def test_mode_i_with_16_bit_values_is_divided_by_256():
    assert gray_row(open_image(row_image([0, 1000, 40000, 65535], np.int32))) == [0, 3, 156, 255]


def test_mode_i_beyond_16_bits_is_scaled_by_its_range():
    top = 2**31 - 1
    assert gray_row(open_image(row_image([0, top // 2, top], np.int32))) == [0, 127, 255]  # by the maximum
    assert gray_row(open_image(row_image([-100_000, 0, 100_000], np.int32))) == [0, 127, 255]  # min/max


def test_mode_f_is_scaled_by_its_range():
    assert gray_row(open_image(row_image([0.0, 0.5, 1.0], np.float32))) == [0, 128, 255]  # was 0, 0, 1
    assert gray_row(open_image(row_image([0.0, 89.6, 255.0], np.float32))) == [0, 90, 255]  # 8-bit, rounded
    assert gray_row(open_image(row_image([0.0, 40000.0, 65535.0], np.float32))) == [0, 156, 255]  # was 0, 255, 255
    assert gray_row(open_image(row_image([-1e6, 0.0, 1e6], np.float32))) == [0, 128, 255]
    tiff = encode(row_image([0.0, 0.25, 1.0], np.float32), "TIFF")
    assert Image.open(io.BytesIO(tiff)).mode == "F" and gray_row(open_image(tiff)) == [0, 64, 255]


def test_mode_f_nan_and_infinite_pixels_count_as_zero_and_give_finite_tensors(captioner):
    nan, inf = float("nan"), float("inf")
    image = row_image([nan, inf, -inf, 0.5, 1.0], np.float32)
    out = open_image(image)
    assert gray_row(out) == [0, 0, 0, 128, 255]  # +inf was white; the range comes from the finite pixels
    assert captioner.encoder.preprocess(out).isfinite().all()


def test_mode_f_without_one_finite_pixel_is_refused():
    with pytest.raises(ImageLoadError, match="no finite pixel values"):
        open_image(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32)))  # was a black picture


# --- sides and aspect ratios, from the header ---------------------------------------------------------------

def test_a_tiny_png_of_1_by_60_million_pixels_is_refused_before_decoding(no_decoding):
    data = png_header(1, 60_000_000)  # under MAX_PIXELS; the resize would allocate 40 GB
    with pytest.raises(ImageLoadError, match=f"side too long \\(1x60000000 pixels; limit {MAX_SIDE} per side\\)"):
        open_image(data, source="tall.png")
    assert no_decoding == []


@pytest.mark.parametrize("size", [(MAX_SIDE + 1, 400), (400, MAX_SIDE + 1)])
def test_a_side_over_the_limit_is_refused_before_decoding(size, no_decoding):
    with pytest.raises(ImageLoadError, match="side too long"):
        open_image(png_header(*size))
    assert no_decoding == []


@pytest.mark.parametrize("size", [(20_000, 2), (2, 20_000), (MAX_ASPECT + 1, 1)])
def test_an_aspect_ratio_over_the_bound_is_refused_before_decoding(size, no_decoding):
    width, height = size
    with pytest.raises(ImageLoadError, match=f"aspect ratio too extreme \\({width}x{height} pixels, "
                                             f"{max(size) // min(size)}:1; limit {MAX_ASPECT}:1\\)"):
        open_image(encode(Image.new("L", size, 128), "PNG"))
    assert no_decoding == []


def test_a_thin_pil_image_is_refused_too():
    with pytest.raises(ImageLoadError, match="aspect ratio too extreme"):
        open_image(Image.new("RGB", (1, 5000)))


def test_images_at_the_limits_decode_and_resize(captioner):
    prep = captioner.encoder.preprocess
    for size in [(MAX_SIDE, MAX_SIDE // MAX_ASPECT), (MAX_ASPECT, 1)]:
        out = prep.to_uint8(open_image(encode(Image.new("L", size, 128), "PNG"), prep.size))
        assert tuple(out.shape) == (3, prep.size, prep.size)


def test_api_skip_reports_a_thin_strip_and_captions_the_rest(captioner):
    good = encode(Image.new("RGB", (64, 64), GREEN), "PNG")
    # A real 1 x 40,000 image: cheap to resize (35 MB), but over the side and aspect limits.
    results = captioner.caption([good, Image.new("L", (1, 40_000), 128), good], on_error="skip")
    assert [r.ok for r in results] == [True, False, True]
    assert "side too long (1x40000 pixels" in results[1].error


def test_cli_writes_an_error_record_for_a_thin_strip_and_exits_1(tmp_path, tiny_checkpoint):
    good, thin = tmp_path / "good.png", tmp_path / "thin.png"
    good.write_bytes(encode(Image.new("RGB", (64, 64), GREEN), "PNG"))
    thin.write_bytes(png_header(1, 60_000_000))
    out = tmp_path / "out.jsonl"
    code = main(["caption", str(good), str(thin), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl",
                 "--output", str(out), "--quiet"])
    records = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert code == 1 and records[str(good)]["caption"] and records[str(good)]["error"] is None
    assert "side too long" in records[str(thin)]["error"] and not records[str(thin)]["caption"]


# --- path objects and buffers -------------------------------------------------------------------------------

def test_a_pathlike_returning_bytes_is_decoded_and_opened(tmp_path):
    path = tmp_path / "g.png"
    path.write_bytes(encode(Image.new("RGB", (8, 8), GREEN), "PNG"))
    item = BytesPath(os.fsencode(path))
    assert describe(item) == str(path)
    assert open_image(item).getpixel((4, 4)) == GREEN
    with pytest.raises(ImageLoadError, match="file not found") as info:
        open_image(BytesPath(os.fsencode(tmp_path / "missing.png")))
    assert info.value.source == str(tmp_path / "missing.png")


@pytest.mark.parametrize("item, reason", [(BytesPath(3), "TypeError"), (BrokenPath(), "RuntimeError: no path today")])
def test_a_path_object_the_loader_cannot_use_is_an_image_load_error(item, reason):
    with pytest.raises(ImageLoadError, match=f"cannot use as a file path \\({reason}") as info:
        open_image(item)
    assert info.value.source == f"<{type(item).__name__}>"


def test_a_strided_memoryview_is_read_in_order():
    data = encode(Image.new("RGB", (8, 8), GREEN), "PNG")
    doubled = bytes(b for byte in data for b in (byte, 0))
    assert open_image(memoryview(doubled)[::2]).getpixel((4, 4)) == GREEN  # was BufferError
    released = memoryview(data)
    released.release()
    with pytest.raises(ImageLoadError, match="cannot read the buffer"):
        open_image(released)


def test_api_skip_reports_a_bad_path_object_and_captions_the_rest(tmp_path, captioner):
    path = tmp_path / "g.png"
    path.write_bytes(encode(Image.new("RGB", (64, 64), GREEN), "PNG"))
    results = captioner.caption([path, BytesPath(os.fsencode(path)), BrokenPath()], on_error="skip")
    assert [r.ok for r in results] == [True, True, False]  # the call raised TypeError for the bytes path
    assert results[1].source == str(path) and results[1].text == results[0].text
    assert "cannot use as a file path" in results[2].error


def test_a_float_image_of_intensities_with_a_slight_undershoot_is_not_black():
    """Floats in 0..1 with one value at -0.01 (after a filter) fell to the 8-bit rule and came out black."""
    from captioner.image_modes import to_rgb

    pixels = np.array([[-0.01, 0.25, 0.5, 1.0]], dtype=np.float32)
    gray = np.array(to_rgb(Image.fromarray(pixels, mode="F")))[0, :, 0]
    assert gray.tolist() == [0, 64, 128, 255]
