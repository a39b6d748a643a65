"""Any PIL mode to 8-bit RGB: palette, alpha, 16-bit, 32-bit integer and float gray, CMYK.

Why a module of its own: which values a mode's pixels take is a question apart from reading files
(`captioner.images`), and its rules (the value range of a 32-bit image, NaN pixels) are read and changed together.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")
_WIDE_GRAY = ("I", "F")
"""32-bit integer and float gray, scaled by their values' range (`_wide_to_l`): "I" is what a 32-bit TIFF and
`convert("I")` give (Pillow opens a 16-bit PNG as "I;16"; an older one opened it as "I", still scaled right)."""
_POINT_MODES = ("I;16", "I")
"""The 16-bit modes PIL's `point` takes; the byte-order variants (a big-endian TIFF opens as "I;16B") are
converted to "I" first, which keeps their values: `point` refused them ("not supported for this mode")."""


class ModeError(ValueError):
    """The pixels cannot become a picture (every pixel of a float image is NaN or infinite)."""


def to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, alpha, 16-bit, 32-bit, float, CMYK, grayscale) to 8-bit RGB; transparency over
    white."""
    if image.mode in _WIDE_GRAY:
        image = _wide_to_l(image)
    if image.mode in _SIXTEEN_BIT:
        image = image if image.mode in _POINT_MODES else image.convert("I")
        image = image.point(lambda v: v * (1 / 256)).convert("L")  # 0..65535 -> 0..255, not clipped at 255
    if image.mode == "La":
        # Premultiplied luminance (gray * alpha / 255): PIL converts it to nothing but "LA", and that
        # conversion un-premultiplies it, so it is flattened over white below as "LA" is. ("La" to "RGBA"
        # failed: "conversion from La to L not supported".) A pixel of alpha 0 holds no gray, and is white.
        image = image.convert("LA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa") or "transparency" in image.info:  # alpha, or tRNS
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba)
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


def _wide_to_l(image: Image.Image) -> Image.Image:
    """32-bit integer ("I") or float ("F") gray -> "L", by the range its values actually use: the mode alone does
    not say (a 32-bit TIFF of 8-bit data, `convert("I")` of a photo; floats of 0..1 or of 0..255).

    Float NaN and infinite pixels count as 0 (the "no data" of a float raster, say); an image with no finite
    pixel at all is a ModeError (the loader's ImageLoadError), not a black picture captioned as if it were one.
    """
    if image.mode == "F":
        image = _finite(image)
    low, high = image.getextrema()
    scale, offset = _gray_scale(low, high, floats=image.mode == "F")
    if (scale, offset) != (1, 0):
        image = image.point(lambda v: v * scale + offset)  # affine: PIL runs it in C, keeping the mode
    return image.convert("L")  # truncates toward zero and clips to 0..255


def _gray_scale(low: float, high: float, floats: bool) -> tuple[float, float]:
    """(scale, offset) taking values in low..high to 0..255, before "L" truncates and clips:

    - floats up to 1: normalised intensities, times 255 (negatives clip to 0);
    - high <= 255: 8-bit values, kept (negatives clip to 0, as PIL's convert("L") does);
    - high <= 65535: 16-bit values, divided by 256 as "I;16" is;
    - larger: divided by the maximum, or min/max normalised when there are negative values.
    Floats get 0.5 added, so truncation rounds them.
    """
    half = 0.5 if floats else 0
    if floats and high <= 1:  # a slight undershoot (-0.01 after a filter) clips; it made the image 8-bit, black
        return 255.0, half
    if high <= 255:
        return 1, half
    if high <= 65535:
        return 1 / 256, 0
    if low >= 0:
        return 255 / high, half
    return 255 / (high - low), -low * 255 / (high - low) + half


def _finite(image: Image.Image) -> Image.Image:
    """A float image with its NaN and infinite pixels set to 0 (PIL's extrema are NaN if one pixel is)."""
    pixels = np.array(image, dtype=np.float32)
    bad = ~np.isfinite(pixels)
    if not bad.any():
        return image
    if bad.all():
        raise ModeError("no finite pixel values (every pixel is NaN or infinite)")
    pixels[bad] = 0
    return Image.fromarray(pixels)
