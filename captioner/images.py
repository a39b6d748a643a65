"""Turning whatever the user hands us (a path, bytes, a PIL image) into an RGB PIL image, or a clear error.

Every failure is an `ImageLoadError` naming the source and the reason, so a batch can skip one bad file and
keep the rest. Only the formats in `SUPPORTED_FORMATS` are decoded; the pixel count is checked from the header
before any pixels are decoded (decompression-bomb guard), and so are the length of a side and the aspect ratio
(a thin strip of few pixels makes the antialiased resize allocate gigabytes); the image is fully decoded here,
so a truncated file fails here and not later in preprocessing. Large JPEGs are decoded at reduced size with PIL's
draft mode: the encoder only needs its input size (288x288 for the shipped model).

Damaged JPEGs that libjpeg decodes without an error (a file cut short with an end-of-image marker appended, a
frame header patched to a larger size) are refused too, by the checks of `captioner.jpeg_damage`.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from PIL import Image, JpegImagePlugin, UnidentifiedImageError

from captioner.image_modes import ModeError, to_rgb
from captioner.jpeg_damage import (
    JPEG_FORMATS,
    MAX_CHECKED_BYTES,
    JpegDamage,
    JpegLayout,
    check_layout,
    check_scan,
)
from captioner.path_kind import file_problem, path_kind

ImageInput = str | os.PathLike | Image.Image | bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
"""PIL formats we decode (JPEG includes the multi-picture MPO of some cameras); anything else is refused."""
MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused before decoding (decompression-bomb guard)."""
MAX_SIDE = 30_000
"""Images with a side longer than this are refused before decoding. Photos stay far below it (a 200-megapixel phone
sensor is 16,320 px wide, a phone panorama about 16,000 to 20,000, and WebP cannot exceed 16,383); a stitched
panorama beyond it is over `MAX_PIXELS` anyway unless it is a thin strip. Why refuse: the antialiased bicubic
resize to the encoder's square needs memory in proportion to the long side times the output size (measured: 270 MB
for 1 x 300,000 pixels, about 300,000 x 288 x 3 bytes; a 116 KB PNG of 1 x 60,000,000, under `MAX_PIXELS`, asked
for 40 GB). At the limits (30,000 x 300) decoding and resizing took 0.1 s and about 100 MB."""
MAX_ASPECT = 100
"""Images whose long side is more than this many times the short one are refused before decoding. A 360-degree
panorama is about 2:1 to 10:1; squashed to the encoder's square a 100:1 strip is smeared beyond recognition, so
its caption would mean nothing, and a small aspect bound also bounds the resize's cost (`MAX_SIDE`)."""

_ORIENTATION = 0x0112  # EXIF tag
_T = Image.Transpose
# EXIF orientation -> transposition, as in ImageOps.exif_transpose (which would cost an extra copy).
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
              6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_BOMB = "image too large, refused as a possible decompression bomb"


class ImageLoadError(ValueError):
    """An image could not be read; `source` names it and the message says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def describe(item: ImageInput, index: int | None = None) -> str:
    """Human-readable name of an input, used in errors and output records; never raises, whatever `item` is."""
    if isinstance(item, str):
        return item
    if isinstance(item, os.PathLike):
        try:  # the path itself, which a custom path object's str() may not be (its repr, say)
            return os.fsdecode(os.fspath(item))
        except Exception:  # noqa: BLE001 - a broken __fspath__ is reported by open_image, under this name
            return f"<{type(item).__name__} #{index}>" if index is not None else f"<{type(item).__name__}>"
    name = getattr(item, "filename", None) if isinstance(item, Image.Image) else None
    if name:
        return str(name)
    kind = "PIL image" if isinstance(item, Image.Image) else type(item).__name__
    return f"<{kind} #{index}>" if index is not None else f"<{kind}>"


def open_image(item: ImageInput, target_size: int = 224, source: str | None = None) -> Image.Image:
    """Decode `item` into a fully loaded 8-bit RGB image, upright as its EXIF orientation says.

    Palette and alpha images are flattened over white, 16-bit images scaled to 8 bits, CMYK and grayscale
    converted, and animated files give their first frame. The result holds no open file handle.

    Args:
        item: a file path, the file's bytes, or a PIL image. A PIL image is taken as it is (its current frame,
            no reduced-size JPEG decoding) and is never modified, though a lazily opened one gets loaded.
        target_size: the size the caller will resize to; JPEGs much larger are decoded at reduced scale.
        source: name used in errors (defaults to the path).

    Raises:
        ImageLoadError: the only exception raised, for any input: missing, empty, truncated or corrupt, not an
            image, a format outside `SUPPORTED_FORMATS`, more than `MAX_PIXELS` pixels, a side over `MAX_SIDE`,
            an aspect ratio over `MAX_ASPECT`, a path object whose `__fspath__` fails, or an unreadable buffer.
    """
    source = source or describe(item)
    if isinstance(item, Image.Image):
        return _decode(item, target_size, source, owned=False)
    data: bytes | None = None  # a JPEG's bytes, for its layout check
    if isinstance(item, memoryview):
        item = _buffer_bytes(item, source)
    if isinstance(item, (bytes, bytearray)):
        if not len(item):
            raise ImageLoadError(source, "empty data (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(item)
        data = item if isinstance(item, bytes) else None
    elif isinstance(item, (str, os.PathLike)):
        fp = _as_path(item, source)
        try:
            problem = file_problem(fp, missing="file not found", folder="is a directory, not an image",
                                   unreachable="cannot read file ({})")
            if problem:  # a FIFO would block the read for good, /dev/zero never end
                raise ImageLoadError(source, problem)
            if fp.stat().st_size == 0:
                raise ImageLoadError(source, "empty file (0 bytes)")
            with open(fp, "rb") as fh:  # a JPEG is read whole, once: its layout is checked from the bytes
                if fh.read(3) == b"\xff\xd8\xff" and fp.stat().st_size <= MAX_CHECKED_BYTES:
                    fh.seek(0)
                    data = fh.read()
                    fp = io.BytesIO(data)
        except OSError as exc:  # permission denied, name too long, ...
            raise ImageLoadError(source, f"cannot read file ({exc})") from exc
    else:
        raise ImageLoadError(source, f"unsupported input type {type(item).__name__}")
    with _open(fp, source) as image:
        jpeg = None
        if image.format in JPEG_FORMATS and isinstance(fp, io.BytesIO):
            try:
                jpeg = check_layout(data if data is not None else fp.getvalue())
            except JpegDamage as exc:
                raise ImageLoadError(source, str(exc)) from None
        rgb = _decode(image, target_size, source, owned=True, jpeg=jpeg)
        # Closing `image` invalidates its pixels, so never hand it out itself.
        return image.copy() if rgb is image else rgb


def _as_path(item: str | os.PathLike, source: str) -> Path:
    """The path `item` names. `os.fspath` may give bytes (a library that works in bytes paths): they are decoded as
    the OS does (`os.fsdecode`), which `Path` refused with a TypeError that escaped `on_error="skip"`."""
    try:
        return Path(os.fsdecode(os.fspath(item)))
    except Exception as exc:  # noqa: BLE001 - __fspath__ is the caller's code: it may raise, or return an int
        raise ImageLoadError(source, f"cannot use as a file path ({type(exc).__name__}: {exc})") from exc


def _buffer_bytes(view: memoryview, source: str) -> bytes:
    """A memoryview's bytes: a strided or multi-dimensional view is copied in order (`io.BytesIO` raised
    BufferError for it), and a released one is an ImageLoadError."""
    try:
        return view.tobytes()
    except ValueError as exc:  # "operation forbidden on released memoryview object"
        raise ImageLoadError(source, f"cannot read the buffer ({exc})") from exc


def _open(fp: io.BytesIO | Path, source: str) -> Image.Image:
    """Parse the header only: format and size are known, no pixels are decoded yet."""
    try:
        image = Image.open(fp, formats=SUPPORTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise ImageLoadError(source, _unidentified_reason(fp)) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # PIL's own guard (Image.MAX_IMAGE_PIXELS); the warning is an exception only under -W error.
        raise ImageLoadError(source, f"{_BOMB} ({exc})") from exc
    except Exception as exc:  # PIL plugins raise many types on malformed headers
        raise ImageLoadError(source, f"cannot read image header ({type(exc).__name__}: {exc})") from exc
    try:
        _check_size(image, source)
    except ImageLoadError:
        image.close()
        raise
    return image


def _unidentified_reason(fp: io.BytesIO | Path) -> str:
    """Why PIL could not open a file: a format we refuse (named), or not an image at all."""
    supported = ", ".join(SUPPORTED_FORMATS)
    try:
        if isinstance(fp, io.BytesIO):
            fp.seek(0)
        with Image.open(fp) as other:  # header only; closed without decoding
            name = other.format
    except Exception:  # noqa: BLE001 - anything here just means "not an image"
        name = None
    if name:
        return f"unsupported image format {name} (supported: {supported})"
    return f"not a recognised image format (supported: {supported})"


def _check_size(image: Image.Image, source: str) -> None:
    """Refuse, from the header's size alone, what would exhaust memory or time in decoding or resizing."""
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(source, f"{_BOMB} ({width}x{height} pixels; limit {MAX_PIXELS})")
    if width < 1 or height < 1:
        raise ImageLoadError(source, f"image has no pixels ({width}x{height})")
    long, short = max(width, height), min(width, height)
    if long > MAX_SIDE:
        raise ImageLoadError(source, f"image side too long ({width}x{height} pixels; limit {MAX_SIDE} per side)")
    if long > MAX_ASPECT * short:
        raise ImageLoadError(source, f"aspect ratio too extreme ({width}x{height} pixels, {long / short:.0f}:1; "
                                     f"limit {MAX_ASPECT}:1)")


def _decode(image: Image.Image, target_size: int, source: str, owned: bool,
            jpeg: JpegLayout | None = None) -> Image.Image:
    """Load the current frame, flatten it to RGB and apply the EXIF orientation.

    A file we opened (`owned`) is on its first frame: later frames are never parsed, so a damaged one does not
    matter. A caller's image is not moved to another frame or shrunk by draft mode. `jpeg` (the layout of a JPEG
    file we opened) enables the incomplete-scan check on the decoded pixels.
    """
    try:
        _check_size(image, source)
        _load(image, target_size, owned)  # the whole image is decoded here, so truncation fails here
        if jpeg is not None:
            try:
                check_scan(image, jpeg, lambda again: _load(again, target_size, owned=True))
            except JpegDamage as exc:
                raise ImageLoadError(source, str(exc)) from None
        orientation = _orientation(image)
        try:
            rgb = to_rgb(image)
        except ModeError as exc:
            raise ImageLoadError(source, str(exc)) from None
        if orientation in _TRANSPOSE:
            rgb = rgb.transpose(_TRANSPOSE[orientation])
        return rgb
    except ImageLoadError:
        raise
    except Exception as exc:  # decoders raise OSError, SyntaxError, struct.error, EOFError, ...
        reason = f"{type(exc).__name__}: {exc}"
        raise ImageLoadError(source, f"corrupt or truncated image data ({reason})") from exc


def _load(image: Image.Image, target_size: int, owned: bool) -> None:
    if owned and isinstance(image, JpegImagePlugin.JpegImageFile) and min(image.size) >= 2 * target_size:
        image.draft("RGB", (target_size, target_size))
    image.load()


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8; a damaged EXIF block is ignored rather than failing a decodable photo."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - getexif parses untrusted bytes
        return 1


def find_images(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Expand files and directories (searched recursively, sorted) into image paths.

    Explicit files are yielded whatever their extension, so a bad one is reported rather than silently ignored.

    Raises:
        FileNotFoundError: a given path does not exist.
    """
    for raw in paths:
        path = Path(raw)
        kind, detail = path_kind(path)
        if kind == "folder":
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS:
                    yield child
        elif kind in ("file", "special"):
            yield path  # open_image names what is wrong with a special file
        else:  # also a name too long to look up, which `is_dir` raised for
            raise FileNotFoundError(f"{path}: " + (detail or "no such file or directory"))
