"""Every kind of image input we promise to handle: decoded right, or refused with a clear ImageLoadError.

All images are generated here with PIL; the decompression bombs are hand-written headers claiming huge sizes.
"""

from __future__ import annotations

import io
import json
import os
import resource
import struct
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from captioner import Captioner, ImageLoadError
from captioner import images as images_module
from captioner.cli import main
from captioner.images import SUPPORTED_FORMATS, open_image
from captioner.models.encoder import build_encoder

RED, GREEN, BLUE, WHITE = (220, 20, 20), (20, 200, 20), (20, 20, 220), (255, 255, 255)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def quadrant_image(size=(64, 48), mode="RGB") -> Image.Image:
    """Blue with a red top-left quadrant, so flips and rotations are visible."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 2, size[1] // 2))
    return image.convert(mode)


def close_to(pixel, expected, tol=12) -> bool:
    return all(abs(a - b) <= tol for a, b in zip(pixel, expected, strict=True))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height RGBA pixels (4 bytes each) over a few KB of zlib data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1_000_000, 9)  # ~1 KB that inflates to 1 MB of zero rows
    chunks = png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def gif_bomb(width: int = 65535, height: int = 65535) -> bytes:
    """A GIF whose logical screen and single frame claim width x height pixels."""
    return (b"GIF89a" + struct.pack("<HHBBB", width, height, 0, 0, 0)
            + b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x08\x02\x4c\x01\x00\x3b")


def psd_1x1() -> bytes:
    """A minimal 1x1 RGB Photoshop file, which PIL can read but we do not accept."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 1, 1, 8, 3)
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + bytes([200, 10, 10])


# --- files that decode --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", SUPPORTED_FORMATS)
def test_every_supported_format_decodes_to_rgb(fmt):
    data = encode(quadrant_image(), fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    image = open_image(data)
    assert image.mode == "RGB" and image.size == (64, 48)
    assert close_to(image.getpixel((5, 5)), RED, 30) and close_to(image.getpixel((60, 44)), BLUE, 30)


def test_png_with_alpha_is_flattened_over_white():
    image = Image.new("RGBA", (4, 1), (*RED, 255))
    image.putpixel((1, 0), (*RED, 0))
    image.putpixel((2, 0), (0, 0, 0, 128))
    out = open_image(encode(image, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == RED and out.getpixel((1, 0)) == WHITE
    assert close_to(out.getpixel((2, 0)), (127, 127, 127), 2)


def test_palette_png_with_and_without_transparency():
    palette = Image.new("P", (3, 1))
    palette.putpalette([*RED, *GREEN, *BLUE])
    palette.putdata([0, 1, 2])
    assert [open_image(encode(palette, "PNG")).getpixel((x, 0)) for x in range(3)] == [RED, GREEN, BLUE]
    transparent = open_image(encode(palette, "PNG", transparency=1))
    assert [transparent.getpixel((x, 0)) for x in range(3)] == [RED, WHITE, BLUE]


def test_transparent_colour_in_grayscale_and_rgb_png_becomes_white():
    assert open_image(encode(Image.new("L", (2, 2), 0), "PNG", transparency=0)).getpixel((0, 0)) == WHITE
    rgb = encode(Image.new("RGB", (2, 2), RED), "PNG", transparency=RED)
    assert open_image(rgb).getpixel((0, 0)) == WHITE


def test_16_bit_png_is_scaled_not_clipped():
    image = Image.new("I;16", (4, 1))
    image.putdata([0, 1000, 40000, 65535])
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # really a 16-bit file
    out = open_image(data)
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [0, 3, 156, 255]
    assert all(len(set(out.getpixel((x, 0)))) == 1 for x in range(4))  # still gray


def test_cmyk_jpeg_becomes_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = open_image(data)
    assert out.mode == "RGB" and close_to(out.getpixel((8, 8)), (255, 0, 0), 8)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_grayscale_becomes_three_equal_channels(fmt):
    out = open_image(encode(Image.new("L", (8, 8), 90), fmt))
    assert out.mode == "RGB" and close_to(out.getpixel((4, 4)), (90, 90, 90), 2)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF", "MPO"])
def test_animated_and_multi_frame_files_give_the_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (16, 16), colour) for colour in (RED, GREEN, BLUE)]
    path = tmp_path / f"anim.{fmt.lower()}"
    timing = {"duration": 50} if fmt != "TIFF" else {}
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], **timing)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    out = open_image(path)
    assert out.mode == "RGB" and close_to(out.getpixel((8, 8)), RED, 20)


@pytest.mark.parametrize(("orientation", "red_corner"), [(1, (0, 0)), (3, (1, 1)), (6, (1, 0)), (8, (0, 1))])
def test_exif_orientation_is_applied(orientation, red_corner):
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = open_image(encode(quadrant_image((64, 48)), "JPEG", exif=exif, quality=95))
    width, height = out.size
    assert (width, height) == ((64, 48) if orientation in (1, 3) else (48, 64))
    corners = {(cx, cy): out.getpixel((5 + cx * (width - 11), 5 + cy * (height - 11)))
               for cx in (0, 1) for cy in (0, 1)}
    assert [c for c, pixel in corners.items() if close_to(pixel, RED, 40)] == [red_corner]


def test_large_exif_rotated_jpeg_is_decoded_at_reduced_size_and_upright():
    exif = Image.Exif()
    exif[0x0112] = 6
    out = open_image(encode(quadrant_image((1600, 1200)), "JPEG", exif=exif), target_size=224)
    assert out.size == (300, 400)  # 1/4 scale draft, then rotated
    assert close_to(out.getpixel((290, 10)), RED, 40)


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), GREEN).save(path)
    out = open_image(path)
    assert out.size == (1, 1) and out.getpixel((0, 0)) == GREEN


def test_pil_image_input_is_used_as_is_and_not_modified():
    rgba = Image.new("RGBA", (4, 4), (*RED, 0))
    out = open_image(rgba)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == WHITE
    assert rgba.mode == "RGBA" and rgba.getpixel((0, 0)) == (*RED, 0)


def test_result_is_loaded_and_holds_no_file_open(tmp_path):
    path = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in (RED, GREEN)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    out = open_image(path)
    path.unlink()
    assert close_to(out.getpixel((0, 0)), RED, 20)
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) == fds


def test_concurrent_loading_leaves_global_warning_filters_alone():
    # warnings.catch_warnings is not thread-safe, and the API decodes in a thread pool.
    data = encode(quadrant_image((8, 8)), "PNG")
    before = list(warnings.filters)
    with ThreadPoolExecutor(4) as pool:
        assert all(image.size == (8, 8) for image in pool.map(lambda _: open_image(data), range(400)))
    assert warnings.filters == before


# --- files that are refused ---------------------------------------------------------------------------------

def test_zero_bytes(tmp_path):
    path = tmp_path / "empty.jpg"
    path.touch()
    with pytest.raises(ImageLoadError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        open_image(path)
    with pytest.raises(ImageLoadError, match="empty data"):
        open_image(b"")


@pytest.mark.parametrize("keep", [0.5, 0.95, -1])
def test_truncated_jpeg_is_an_error_not_a_grey_image(tmp_path, keep):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # PIL's default; we rely on it
    data = encode(quadrant_image((800, 600)), "JPEG")
    cut = data[: int(len(data) * keep)] if keep > 0 else data[:keep]
    path = tmp_path / "cut.jpg"
    path.write_bytes(cut)
    for target_size in (224, 1000):  # with and without reduced-size decoding
        with pytest.raises(ImageLoadError, match=r"cut\.jpg: corrupt or truncated"):
            open_image(path, target_size)


def noisy_image(size=(240, 180), seed=0) -> Image.Image:
    """Photo-like: every pixel different, nothing exactly mid-grey."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    waves = np.stack([128 + 90 * np.sin(x / 23 + c) * np.cos(y / 13 - c) for c in range(3)], -1)
    return Image.fromarray(np.clip(waves + rng.normal(0, 16, waves.shape), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("subsampling", [0, 2])  # 4:4:4 and 4:2:0
def test_jpeg_cut_anywhere_with_an_end_marker_is_refused(subsampling):
    """libjpeg decodes these without an error, the missing part as exact grey; all but the last blocks count."""
    data = encode(noisy_image(), "JPEG", quality=90, subsampling=subsampling)
    for keep in [i / 20 for i in range(1, 20)] + [0.98]:
        cut = data[: int(len(data) * keep)] + b"\xff\xd9"
        for target_size in (64, 1000):  # reduced-size (1/2) and full-size decoding
            with pytest.raises(ImageLoadError, match="incomplete scan data"):
                open_image(cut, target_size)


def test_progressive_jpeg_cut_before_its_last_scan_is_refused():
    data = encode(noisy_image(), "JPEG", quality=90, progressive=True)
    for keep in (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5):  # the first scan starts at 1%, the last one at 60%
        with pytest.raises(ImageLoadError, match="incomplete scan data"):
            open_image(data[: int(len(data) * keep)] + b"\xff\xd9")


def test_known_gaps_of_the_damaged_jpeg_checks_are_as_documented():
    """docs/robustness.md lists these as not detected: they decode to a whole, not a grey, picture."""
    baseline = encode(noisy_image(), "JPEG", quality=90)
    progressive = encode(noisy_image(), "JPEG", quality=90, progressive=True)
    # inside the last scan of a progressive file: every block is there, the lower part lacks its last detail bit
    assert open_image(progressive[: int(len(progressive) * 0.9)] + b"\xff\xd9").size == (240, 180)
    # only the last block or so lost: too little grey to tell from a grey corner without a second decode
    assert open_image(baseline[:-12] + b"\xff\xd9").size == (240, 180)


def test_truncated_png_is_an_error():
    data = encode(quadrant_image(), "PNG")
    with pytest.raises(ImageLoadError, match="truncated"):
        open_image(data[: len(data) // 2])


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match=r"notes\.jpg: not a recognised image format"):
        open_image(path)


@pytest.mark.parametrize("fmt", ["ICO", "EPS", "PPM", "TGA", "PSD"])
def test_formats_outside_the_supported_list_are_refused_by_name(fmt):
    data = psd_1x1() if fmt == "PSD" else encode(Image.new("RGB", (16, 16), RED), fmt)
    with Image.open(io.BytesIO(data)) as check:  # PIL itself would open it
        assert check.format == fmt
    with pytest.raises(ImageLoadError, match=f"unsupported image format {fmt} \\(supported: JPEG, PNG"):
        open_image(data)


def test_svg_is_not_an_image_format():
    svg = b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="9" height="9"/></svg>'
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        open_image(svg)


def test_missing_file_directory_and_wrong_type(tmp_path):
    with pytest.raises(ImageLoadError, match="file not found"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="is a directory"):
        open_image(tmp_path)
    with pytest.raises(ImageLoadError, match="unsupported input type int"):
        open_image(42)  # type: ignore[arg-type]


def test_a_fifo_or_a_device_is_refused_as_not_a_regular_file_without_reading_it(tmp_path):
    fifo = tmp_path / "photo.jpg"
    os.mkfifo(fifo)  # opening it to read would block until a writer came: the test would hang
    with pytest.raises(ImageLoadError, match=r"photo\.jpg: not a regular file \(a FIFO\)"):
        open_image(fifo)
    with pytest.raises(ImageLoadError, match=r"/dev/zero: not a regular file \(a character device\)"):
        open_image("/dev/zero")  # was "empty file (0 bytes)"


@pytest.fixture
def decode_spy(monkeypatch) -> list:
    """Records every pixel decode; a bomb must be refused before any."""
    calls = []
    original = ImageFile.ImageFile.load

    def load(self):
        calls.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return calls


BOMBS = {"png_30000": png_bomb(30000, 30000), "png_8001": png_bomb(8001, 8000), "gif_65535": gif_bomb()}


@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.parametrize("pil_guard", [True, False])
def test_decompression_bomb_is_refused_from_the_header(tmp_path, monkeypatch, decode_spy, name, pil_guard):
    if not pil_guard:  # an application may switch PIL's own guard off; ours still holds
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    path = tmp_path / f"{name}.{name[:3]}"
    path.write_bytes(BOMBS[name])
    assert path.stat().st_size < 2000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(ImageLoadError, match=f"{name}.*too large.*decompression bomb"):
        open_image(path)
    assert decode_spy == []
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000


def test_pixel_limit_is_the_module_setting(monkeypatch):
    data = encode(Image.new("RGB", (20, 20)), "PNG")
    monkeypatch.setattr(images_module, "MAX_PIXELS", 399)
    with pytest.raises(ImageLoadError, match=r"decompression bomb \(20x20 pixels; limit 399\)"):
        open_image(data)
    with pytest.raises(ImageLoadError, match="too large"):
        open_image(Image.new("RGB", (20, 20)))


# --- the API and the CLI on a mixed batch -------------------------------------------------------------------

def write_zoo(folder: Path) -> tuple[list[Path], dict[Path, str]]:
    """Good images of every kind we decode, and bad files with (part of) the reason each must report."""
    folder.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    palette = Image.new("P", (16, 16), 1)
    palette.putpalette([*RED, *GREEN])
    good_data = {
        "a_plain.jpg": encode(quadrant_image(), "JPEG"),
        "b_alpha.png": encode(Image.new("RGBA", (16, 16), (*RED, 100)), "PNG"),
        "c_palette.png": encode(palette, "PNG", transparency=0),
        "d_16bit.png": encode(Image.new("I;16", (16, 16), 30000), "PNG"),
        "e_cmyk.jpg": encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG"),
        "f_gray.jpg": encode(Image.new("L", (16, 16), 90), "JPEG"),
        "g_anim.gif": encode(Image.new("RGB", (16, 16), RED), "GIF", save_all=True,
                             append_images=[Image.new("RGB", (16, 16), BLUE)]),
        "h_rotated.jpg": encode(quadrant_image(), "JPEG", exif=exif),
        "i_dot.png": encode(Image.new("RGB", (1, 1), GREEN), "PNG"),
    }
    jpeg = encode(quadrant_image((300, 200)), "JPEG")
    bad_data = {
        "j_empty.jpg": (b"", "empty file"),
        "k_truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated"),
        "l_text.jpg": (b"hello, I am text\n", "not a recognised image format"),
        "m_bomb.png": (png_bomb(30000, 30000), "decompression bomb"),
        "n_icon.png": (encode(Image.new("RGB", (16, 16)), "ICO"), "unsupported image format ICO"),
    }
    good = []
    for name, data in good_data.items():
        (folder / name).write_bytes(data)
        good.append(folder / name)
    bad = {}
    for name, (data, reason) in bad_data.items():
        (folder / name).write_bytes(data)
        bad[folder / name] = reason
    return good, bad


@pytest.fixture
def captioner(tiny_model) -> Captioner:
    return Captioner(tiny_model, build_encoder("efficientnet_lite0", pretrained=False))


def test_api_skip_keeps_going_and_each_failure_carries_its_reason(tmp_path, captioner):
    good, bad = write_zoo(tmp_path)
    mixed = sorted([*good, *bad])
    results = captioner.caption(mixed, batch_size=4, on_error="skip")
    assert [r.source for r in results] == [str(p) for p in mixed]
    for path, result in zip(mixed, results, strict=True):
        if path in bad:
            assert not result.ok and result.text == "" and result.tokens == []
            assert result.error.startswith(f"{path}: ") and bad[path] in result.error
        else:
            assert result.ok and result.text, result.error
    # The failures do not disturb the neighbours: same captions as the good files alone.
    alone = captioner.caption(good, batch_size=4)
    assert [r.text for r in results if r.ok] == [r.text for r in alone]


def test_api_raise_names_the_first_bad_file(tmp_path, captioner):
    good, bad = write_zoo(tmp_path)
    first_bad = min(bad)
    with pytest.raises(ImageLoadError, match=bad[first_bad]) as info:
        captioner.caption(sorted([*good, *bad]), batch_size=4)
    assert info.value.source == str(first_bad)


def test_cli_writes_good_captions_names_failures_and_exits_non_zero(tmp_path, tiny_checkpoint, capsys):
    good, bad = write_zoo(tmp_path / "zoo")
    out = tmp_path / "out.jsonl"
    code = main(["caption", str(tmp_path / "zoo"), "--checkpoint", str(tiny_checkpoint), "--format", "jsonl",
                 "--output", str(out), "--batch-size", "4", "--quiet"])
    assert code == 1
    records = {r["path"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert sorted(records) == sorted(str(p) for p in [*good, *bad])
    assert all(records[str(p)]["caption"] and records[str(p)]["error"] is None for p in good)
    assert all(bad[p] in records[str(p)]["error"] and not records[str(p)]["caption"] for p in bad)
    err = capsys.readouterr().err
    for path, reason in bad.items():
        assert any(str(path) in line and reason in line for line in err.splitlines()), (path, err)
    assert f"{len(bad)} of {len(good) + len(bad)} images failed" in err
