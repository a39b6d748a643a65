"""Turning whatever the user hands us (a path, bytes, a PIL image) into an RGB PIL image, or a clear error.

Every failure is an `ImageLoadError` naming the source and the reason, so a batch can skip one bad file and
keep the rest. Large JPEGs are decoded at reduced size with PIL's draft mode: the encoder only needs 224x224.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[str, os.PathLike, Image.Image, bytes]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused before decoding (decompression-bomb guard)."""


class ImageLoadError(ValueError):
    """An image could not be read; `source` names it and the message says why."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def describe(item: ImageInput, index: int | None = None) -> str:
    """Human-readable name of an input, used in errors and output records."""
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    name = getattr(item, "filename", None) if isinstance(item, Image.Image) else None
    if name:
        return str(name)
    kind = "PIL image" if isinstance(item, Image.Image) else type(item).__name__
    return f"<{kind} #{index}>" if index is not None else f"<{kind}>"


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, alpha, 16-bit, CMYK, grayscale) to 8-bit RGB; transparency over white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v * (1 / 256)).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(item: ImageInput, target_size: int = 224, source: str | None = None) -> Image.Image:
    """Decode `item` into an RGB image, upright as its EXIF orientation says.

    Args:
        item: a file path, the file's bytes, or a PIL image.
        target_size: the size the caller will resize to; JPEGs much larger are decoded at reduced scale.
        source: name used in errors (defaults to the path).

    Raises:
        ImageLoadError: missing, empty, truncated, not an image, unsupported, or too many pixels.
    """
    source = source or describe(item)
    if isinstance(item, Image.Image):
        image = item
    elif isinstance(item, (bytes, bytearray)):
        if not item:
            raise ImageLoadError(source, "empty data (0 bytes)")
        image = _open(io.BytesIO(item), source)
    elif isinstance(item, (str, os.PathLike)):
        path = Path(item)
        if not path.exists():
            raise ImageLoadError(source, "file not found")
        if path.is_dir():
            raise ImageLoadError(source, "is a directory, not an image")
        if path.stat().st_size == 0:
            raise ImageLoadError(source, "empty file (0 bytes)")
        image = _open(path, source)
    else:
        raise ImageLoadError(source, f"unsupported input type {type(item).__name__}")
    try:
        width, height = image.size
        if width * height > MAX_PIXELS:
            raise ImageLoadError(source, f"image too large ({width}x{height} pixels; limit {MAX_PIXELS})")
        if image.format == "JPEG" and min(width, height) >= 2 * target_size:
            image.draft("RGB", (target_size, target_size))
        if getattr(image, "is_animated", False):
            image.seek(0)
        image = ImageOps.exif_transpose(image) or image
        return _to_rgb(image)
    except ImageLoadError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(source, f"cannot decode image ({exc})") from exc


def _open(fp, source: str) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(fp)
            width, height = image.size
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(source, f"image too large, refused as a possible decompression bomb ({exc})") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(source, "not a recognised image format") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(source, f"cannot read image ({exc})") from exc
    if width * height > MAX_PIXELS:
        raise ImageLoadError(source, f"image too large ({width}x{height} pixels; limit {MAX_PIXELS})")
    return image


def find_images(paths: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Expand files and directories (searched recursively, sorted) into image paths.

    Explicit files are yielded whatever their extension, so a bad one is reported rather than silently ignored.

    Raises:
        FileNotFoundError: a given path does not exist.
    """
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix.lower() in IMAGE_EXTENSIONS:
                    yield child
        elif path.exists():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
