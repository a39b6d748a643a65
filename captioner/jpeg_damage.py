"""Damaged JPEGs that libjpeg decodes without an error: refused from their headers, or proved by a second decode.

When a scan's entropy-coded data ends early at a marker (a file cut short with an end-of-image marker appended,
or a frame header patched to a larger size), libjpeg only warns, which PIL does not pass on, and fills the rest
of the image with all-zero blocks: exact grey (128, 128, 128). Three checks, none of which can refuse a complete
file: the frame's size against the least scan data any complete encoding needs (`check_layout`, before decoding);
a scan for every colour component (also there); and, when the last block is exactly the fill colour (or a
progressive file lacks scans), a second decode with filler bytes put before the end marker, whose pixels differ
only if the decoder ran out of data (`check_scan`). `captioner.images` turns a `JpegDamage` into its
`ImageLoadError`, naming the file.
"""

from __future__ import annotations

import io
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from PIL import Image

INCOMPLETE = "damaged JPEG, incomplete scan data"
MAX_CHECKED_BYTES = 64 * 2**20
"""Larger files skip the layout checks (PIL streams them; libjpeg still reports a file cut without an end marker):
the checks hold the whole file in memory and walk its scans in Python."""
MAX_SCANS = 1000
"""Scan headers followed at most; libjpeg's own progressive files have about ten. More: not checked."""
JPEG_FORMATS = ("JPEG", "MPO")
_HUFFMAN_SOF = {0xC0: False, 0xC1: False, 0xC2: True}  # SOF marker -> progressive (Huffman-coded DCT frames)
_FILL = 128  # what libjpeg writes where a scan has no data left: all coefficients zero, i.e. mid-grey
# Filler for the second decode: no 0xFF (it would start a marker), not all zeros (some Huffman tables would read
# zeros as empty blocks again).
_PROBE = bytes((i * 97 + 61) % 255 for i in range(256))
# A marker in entropy-coded data: 0xFF followed by neither a stuffed 0x00 nor a restart marker RST0-7.
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")


class JpegDamage(ValueError):
    """A JPEG's data cannot be the whole image; the message is the reason."""


@dataclass
class _Scan:
    components: tuple[int, ...]  # component ids
    ss: int  # spectral selection start..end (0..63)
    se: int
    ah: int  # successive approximation: previous and current bit position
    al: int


@dataclass
class JpegLayout:
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
    while len(scans) <= MAX_SCANS:
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
    return scans, None  # too many scans to follow: treated as unknown, so never refused


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


def _jpeg_layout(data: bytes) -> JpegLayout | None:
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
            return JpegLayout(data, width, height, progressive, sampling, start, scans, not complete_first, end,
                               progressive and _progression_complete(sampling, scans))
    return None


def _blocks(layout: JpegLayout) -> int:
    """8x8 blocks of all components, each counted as in a scan of it alone (fewer than in an interleaved scan)."""
    factors = layout.components.values()
    h_max, v_max = max(h for h, _ in factors), max(v for _, v in factors)
    total = 0
    for h, v in factors:
        columns, rows = -(-layout.width * h // h_max), -(-layout.height * v // v_max)
        total += -(-columns // 8) * -(-rows // 8)
    return total


def check_layout(data: bytes) -> JpegLayout | None:
    """Refuse, before decoding, a JPEG whose headers show it cannot be complete; its layout for the pixel check.

    - Size: every block of a sequential scan costs at least 2 bits (a DC and an AC Huffman code, each at least
      1 bit long), every block of a progressive DC scan at least 1 bit. A frame header claiming more blocks than
      the file's bytes after its first scan header could hold is not a complete image.
    - Components: a sequential frame codes every component in some scan and a progressive one starts every
      component with a DC scan (ITU T.81 G.1.1.1); libjpeg fills a missing component with grey.
    """
    if len(data) > MAX_CHECKED_BYTES:
        return None
    try:
        layout = _jpeg_layout(data)
    except (IndexError, ValueError, struct.error):  # a header cut inside a segment: PIL reports it on decoding
        return None
    if layout is None:
        return None
    need = _blocks(layout) * (1 if layout.progressive else 2) // 8  # bytes
    have = len(data) - layout.scan_start  # an overestimate: later scan headers and anything after the EOI count
    if have < need:
        raise JpegDamage(f"{INCOMPLETE}: the frame header says {layout.width}x{layout.height} "
                         f"pixels, which need at least {need:,} bytes of scan data, but the file "
                         f"holds {have:,} (cut short, or a patched header)")
    if layout.walked and layout.end is not None:  # (not walked: the first scan holds every component)
        for c in layout.components:
            if layout.progressive:
                found = any(c in s.components and s.ss == 0 and s.ah == 0 for s in layout.scans)
            else:
                found = any(c in s.components for s in layout.scans)
            if not found:
                raise JpegDamage(f"{INCOMPLETE}: no scan holds colour component {c} "
                                 f"(the file ends early)")
    return layout


def check_scan(image: Image.Image, layout: JpegLayout, reload: Callable[[Image.Image], None]) -> None:
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
        with Image.open(io.BytesIO(probe), formats=JPEG_FORMATS) as again:
            reload(again)
            if again.size == image.size and again.tobytes() == image.tobytes():
                return
    except Exception:  # noqa: BLE001 - inconclusive: the file itself decoded, so it is not refused on a guess
        return
    raise JpegDamage(f"{INCOMPLETE}: the data ends before the image does (a file cut short, or a "
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
