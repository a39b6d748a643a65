"""Turning whatever the user hands us (a path, bytes, a PIL image) into an RGB PIL image, or a clear error.

Every failure is an `ImageLoadError` naming the source and the reason, so a batch can skip one bad file and
keep the rest. Only the formats in `SUPPORTED_FORMATS` are decoded; the pixel count is checked from the header
before any pixels are decoded (decompression-bomb guard); the image is fully decoded here, so a truncated file
fails here and not later in preprocessing. Large JPEGs are decoded at reduced size with PIL's draft mode: the
encoder only needs its input size (288x288 for the shipped model).

Damaged JPEGs that libjpeg decodes without an error are refused too. When a scan's entropy-coded data ends early
at a marker (a file cut short with an end-of-image marker appended, or a frame header patched to a larger size),
libjpeg only warns, which PIL does not pass on, and fills the rest of the image with all-zero blocks: exact grey
(128, 128, 128). Three checks, none of which can refuse a complete file (see `_check_jpeg_layout` and
`_check_jpeg_scan`): the frame's size against the least scan data any complete encoding needs; a scan for every
colour component; and, when the last block is exactly the fill colour (or a progressive file lacks scans), a
second decode with filler bytes put before the end marker, whose pixels differ only if the decoder ran out of
data.
"""

from __future__ import annotations

import io
import os
import re
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, JpegImagePlugin, UnidentifiedImageError

ImageInput = str | os.PathLike | Image.Image | bytes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")
"""PIL formats we decode (JPEG includes the multi-picture MPO of some cameras); anything else is refused."""
MAX_PIXELS = 64_000_000
"""Images above this many pixels are refused before decoding (decompression-bomb guard)."""

_ORIENTATION = 0x0112  # EXIF tag
_T = Image.Transpose
# EXIF orientation -> transposition, as in ImageOps.exif_transpose (which would cost an extra copy).
_TRANSPOSE = {2: _T.FLIP_LEFT_RIGHT, 3: _T.ROTATE_180, 4: _T.FLIP_TOP_BOTTOM, 5: _T.TRANSPOSE,
              6: _T.ROTATE_270, 7: _T.TRANSVERSE, 8: _T.ROTATE_90}
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # older Pillow opens 16-bit gray PNGs as "I"
_BOMB = "image too large, refused as a possible decompression bomb"
_INCOMPLETE = "damaged JPEG, incomplete scan data"
_JPEG_FORMATS = ("JPEG", "MPO")
_HUFFMAN_SOF = {0xC0: False, 0xC1: False, 0xC2: True}  # SOF marker -> progressive (Huffman-coded DCT frames)
_FILL = 128  # what libjpeg writes where a scan has no data left: all coefficients zero, i.e. mid-grey
# Filler for the second decode: no 0xFF (it would start a marker), not all zeros (some Huffman tables would read
# zeros as empty blocks again).
_PROBE = bytes((i * 97 + 61) % 255 for i in range(256))
# A marker in entropy-coded data: 0xFF followed by neither a stuffed 0x00 nor a restart marker RST0-7.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")


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
            image, a format outside `SUPPORTED_FORMATS`, or more than `MAX_PIXELS` pixels.
    """
    source = source or describe(item)
    if isinstance(item, Image.Image):
        return _decode(item, target_size, source, owned=False)
    if isinstance(item, (bytes, bytearray, memoryview)):
        if not len(item):
            raise ImageLoadError(source, "empty data (0 bytes)")
        fp: io.BytesIO | Path = io.BytesIO(item)
    elif isinstance(item, (str, os.PathLike)):
        fp = Path(item)
        try:
            if not fp.exists():
                raise ImageLoadError(source, "file not found")
            if fp.is_dir():
                raise ImageLoadError(source, "is a directory, not an image")
            if fp.stat().st_size == 0:
                raise ImageLoadError(source, "empty file (0 bytes)")
            with open(fp, "rb") as fh:  # a JPEG is read whole, once: its layout is checked from the bytes
                if fh.read(3) == b"\xff\xd8\xff":
                    fh.seek(0)
                    fp = io.BytesIO(fh.read())
        except OSError as exc:  # permission denied, name too long, ...
            raise ImageLoadError(source, f"cannot read file ({exc})") from exc
    else:
        raise ImageLoadError(source, f"unsupported input type {type(item).__name__}")
    with _open(fp, source) as image:
        jpeg = None
        if image.format in _JPEG_FORMATS and isinstance(fp, io.BytesIO):
            jpeg = _check_jpeg_layout(fp.getvalue(), source)
        rgb = _decode(image, target_size, source, owned=True, jpeg=jpeg)
        # Closing `image` invalidates its pixels, so never hand it out itself.
        return image.copy() if rgb is image else rgb


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
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageLoadError(source, f"{_BOMB} ({width}x{height} pixels; limit {MAX_PIXELS})")
    if width < 1 or height < 1:
        raise ImageLoadError(source, f"image has no pixels ({width}x{height})")


def _decode(image: Image.Image, target_size: int, source: str, owned: bool,
            jpeg: _JpegLayout | None = None) -> Image.Image:
    """Load the current frame, flatten it to RGB and apply the EXIF orientation.

    A file we opened (`owned`) is on its first frame: later frames are never parsed, so a damaged one does not
    matter. A caller's image is not moved to another frame or shrunk by draft mode. `jpeg` (the layout of a JPEG
    file we opened) enables the incomplete-scan check on the decoded pixels.
    """
    try:
        _check_size(image, source)
        _load(image, target_size, owned)  # the whole image is decoded here, so truncation fails here
        if jpeg is not None:
            _check_jpeg_scan(image, jpeg, target_size, source)
        orientation = _orientation(image)
        rgb = _to_rgb(image)
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


# --- damaged JPEGs that libjpeg decodes without an error --------------------------------------------------------

@dataclass
class _Scan:
    components: tuple[int, ...]  # component ids
    ss: int  # spectral selection start..end (0..63)
    se: int
    ah: int  # successive approximation: previous and current bit position
    al: int


@dataclass
class _JpegLayout:
    data: bytes
    width: int
    height: int
    progressive: bool
    components: dict[int, tuple[int, int]]  # id -> (horizontal, vertical) sampling factors
    scan_start: int  # offset of the first scan's entropy-coded data
    scans: list[_Scan]  # the scan headers, in order: every one if `walked`, else the first (which holds all)
    walked: bool  # the scans were followed to the end of the image
    end: int | None  # if walked: offset of the marker that ends the last scan (the EOI); None: the file is cut
    progression_complete: bool  # progressive: every coefficient of every component refined down to bit 0


def _segments(data: bytes) -> Iterator[tuple[int, int, int]]:
    """(marker, offset of the segment's payload, payload length) up to and including the first SOS."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # TEM, RSTn, SOI: no length
            pos += 2
            continue
        if marker == 0xD9:
            return
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2:
            return
        yield marker, pos + 4, length - 2
        if marker == 0xDA:
            return
        pos += 2 + length


def _parse_scan(data: bytes, at: int, length: int) -> _Scan:
    count = data[at]
    ids = tuple(data[at + 1 + 2 * i] for i in range(count))
    ss, se, a = data[at + 1 + 2 * count: at + 4 + 2 * count]
    return _Scan(ids, ss, se, a >> 4, a & 15)


def _walk_scans(data: bytes, first: _Scan, start: int) -> tuple[list[_Scan], int | None]:
    """Every scan from the first one's entropy-coded data at `start`, and where the last one ends."""
    scans, pos = [first], start
    while True:
        found = _MARKER_IN_SCAN.search(data, pos)
        if found is None:
            return scans, None  # no marker after the data: the file is cut (PIL reports it as truncated)
        marker_at = pos = found.start()  # the first of any fill bytes (0xFF) before the marker
        while True:  # segments between scans (DHT, DRI, COM, APPn, ...) up to the next SOS or the EOI
            if pos + 2 > len(data) or data[pos] != 0xFF:
                return scans, marker_at
            marker = data[pos + 1]
            if marker == 0xD9 or not pos + 4 <= len(data):
                return scans, marker_at
            if marker == 0xFF:
                pos += 1
                continue
            (length,) = struct.unpack_from(">H", data, pos + 2)
            if marker == 0xDA:
                scans.append(_parse_scan(data, pos + 4, length - 2))
                pos += 2 + length
                break
            if length < 2:
                return scans, marker_at
            pos += 2 + length


def _progression_complete(layout_components: Iterable[int], scans: list[_Scan]) -> bool:
    """Whether the scans bring every coefficient of every component down to bit 0 (spec G.1.1.1)."""
    bit = {c: [None] * 64 for c in layout_components}  # lowest bit position received so far
    for scan in scans:
        for c in scan.components:
            levels = bit.get(c)
            if levels is None:
                continue
            for k in range(scan.ss, min(scan.se, 63) + 1):
                if scan.ah == 0 and levels[k] is None or scan.ah and levels[k] == scan.ah:
                    levels[k] = scan.al
    return all(level == 0 for levels in bit.values() for level in levels)


def _jpeg_layout(data: bytes) -> _JpegLayout | None:
    """The frame and scan headers of a Huffman-coded JPEG; None for anything else or an unreadable layout."""
    frame = None
    for marker, at, length in _segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (not DHT, JPG, DAC)
            if marker not in _HUFFMAN_SOF or length < 6:
                return None  # lossless, hierarchical or arithmetic-coded: none of the bounds below hold
            height, width, count = struct.unpack_from(">HHB", data, at + 1)
            if length < 6 + 3 * count or count == 0:
                return None
            sampling = {data[at + 6 + 3 * i]: (data[at + 7 + 3 * i] >> 4, data[at + 7 + 3 * i] & 15)
                        for i in range(count)}
            if height == 0 or any(not (1 <= h <= 4 and 1 <= v <= 4) for h, v in sampling.values()):
                return None  # height from a DNL marker, or sampling factors libjpeg refuses anyway
            frame = (width, height, _HUFFMAN_SOF[marker], sampling)
        elif marker == 0xDA:
            if frame is None or length < 6:
                return None
            width, height, progressive, sampling = frame
            first = _parse_scan(data, at, length)
            start = at + length
            complete_first = not progressive and set(first.components) >= set(sampling)
            # A sequential file whose first scan holds every component needs no walk (the common, cheap case).
            scans, end = ([first], None) if complete_first else _walk_scans(data, first, start)
            return _JpegLayout(data, width, height, progressive, sampling, start, scans, not complete_first, end,
                               progressive and _progression_complete(sampling, scans))
    return None


def _blocks(layout: _JpegLayout) -> int:
    """8x8 blocks of all components, each counted as in a scan of it alone (fewer than in an interleaved scan)."""
    factors = layout.components.values()
    h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
    total = 0
    for h, v in factors:
        columns, rows = -(-layout.width * h // h_max), -(-layout.height * v // v_max)
        total += -(-columns // 8) * -(-rows // 8)
    return total


def _check_jpeg_layout(data: bytes, source: str) -> _JpegLayout | None:
    """Refuse, before decoding, a JPEG whose headers show it cannot be complete; its layout for the pixel check.

    - Size: every block of a sequential scan costs at least 2 bits (a DC and an AC Huffman code, each at least
      1 bit long), every block of a progressive DC scan at least 1 bit. A frame header claiming more blocks than
      the file's bytes after its first scan header could hold is not a complete image.
    - Components: a sequential frame codes every component in some scan and a progressive one starts every
      component with a DC scan (ITU T.81 G.1.1.1); libjpeg fills a missing component with grey.
    """
    try:
        layout = _jpeg_layout(data)
    except (IndexError, ValueError, struct.error):  # a header cut inside a segment: PIL reports it on decoding
        return None
    if layout is None:
        return None
    need = _blocks(layout) * (1 if layout.progressive else 2) // 8  # bytes
    have = len(data) - layout.scan_start  # an overestimate: later scan headers and anything after the EOI count
    if have < need:
        raise ImageLoadError(source, f"{_INCOMPLETE}: the frame header says {layout.width}x{layout.height} "
                                     f"pixels, which need at least {need:,} bytes of scan data, but the file "
                                     f"holds {have:,} (cut short, or a patched header)")
    if layout.walked and layout.end is not None:  # (not walked: the first scan holds every component)
        for c in layout.components:
            if layout.progressive:
                found = any(c in s.components and s.ss == 0 and s.ah == 0 for s in layout.scans)
            else:
                found = any(c in s.components for s in layout.scans)
            if not found:
                raise ImageLoadError(source, f"{_INCOMPLETE}: no scan holds colour component {c} "
                                             f"(the file ends early)")
    return layout


def _check_jpeg_scan(image: Image.Image, layout: _JpegLayout, target_size: int, source: str) -> None:
    """Refuse a decoded JPEG whose last scan ran out of data (libjpeg filled the rest with grey and only warned).

    Cheap test first (on every JPEG): the bottom-right pixel exactly the fill colour, or a progressive file whose
    scans do not refine every coefficient to its last bit. Only then the proof: decode again with filler bytes
    put before the marker that ends the last scan. A decoder that finished its scans never reads them, so a
    complete file (a grey wall, a grey graphic) decodes to the same pixels; one that ran out of data decodes the
    filler into the blocks it had left empty, and the pixels change.
    """
    if not (_last_pixel_is_fill(image) or layout.progressive and not layout.progression_complete):
        return
    try:
        end = layout.end if layout.walked else _walk_scans(layout.data, layout.scans[0], layout.scan_start)[1]
    except (IndexError, ValueError, struct.error):
        return  # scan headers cut short: PIL decoded the file anyway, so it is not refused on a guess
    if end is None:
        return
    probe = layout.data[:end] + _PROBE + layout.data[end:]
    try:
        with Image.open(io.BytesIO(probe), formats=_JPEG_FORMATS) as again:
            _load(again, target_size, owned=True)
            if again.size == image.size and again.tobytes() == image.tobytes():
                return
    except Exception:  # noqa: BLE001 - inconclusive: the file itself decoded, so it is not refused on a guess
        return
    raise ImageLoadError(source, f"{_INCOMPLETE}: the data ends before the image does (a file cut short, or a "
                                 f"patched header); the decoder would show the rest as flat grey or blurred")


def _last_pixel_is_fill(image: Image.Image) -> bool:
    """Whether the bottom-right pixel is exactly the fill colour: where data runs out, the last block is filled.

    One pixel, not the last block: chroma upsampling blends a block's edge rows with the block above, so a grey
    block below an intact one is exact grey only away from that edge.
    """
    pixel = image.getpixel((image.width - 1, image.height - 1))
    if image.mode == "L":
        return pixel == _FILL
    if image.mode == "RGB":
        return pixel == (_FILL, _FILL, _FILL)
    return True  # CMYK (rare): the fill after colour conversion is not fixed, so always take the second decode


def _orientation(image: Image.Image) -> int:
    """EXIF orientation 1..8; a damaged EXIF block is ignored rather than failing a decodable photo."""
    try:
        value = image.getexif().get(_ORIENTATION, 1)
        return value if isinstance(value, int) else 1
    except Exception:  # noqa: BLE001 - getexif parses untrusted bytes
        return 1


def _to_rgb(image: Image.Image) -> Image.Image:
    """Flatten any mode (palette, alpha, 16-bit, CMYK, grayscale) to 8-bit RGB; transparency over white."""
    if image.mode in _SIXTEEN_BIT:
        image = image.point(lambda v: v * (1 / 256)).convert("L")  # 0..65535 -> 0..255, not clipped at 255
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:  # alpha, or tRNS
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", rgba.size, (255, 255, 255))
        flat.paste(rgba, mask=rgba)
        return flat
    return image if image.mode == "RGB" else image.convert("RGB")


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
