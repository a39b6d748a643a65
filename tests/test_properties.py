"""Property-based tests: the tokenizer, the vocabulary JSON round trip and the image loader on random bytes.

Only the documented error types ever come out: `tokenize` raises only TypeError (for a non-str),
`Vocabulary.from_json` only ValueError (for any str), `open_image` only ImageLoadError (for any bytes).
"""

from __future__ import annotations

import functools
import io
import json
import string
import tempfile
import unicodedata
from pathlib import Path
from unittest import mock

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from captioner import images as images_module
from captioner.images import ImageLoadError, open_image
from captioner.models.vocab import SPECIALS, Vocabulary, tokenize

FAST = settings(max_examples=60, deadline=None, database=None)
IMAGES = settings(max_examples=120, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Captions in the wild: letters of several scripts, digits, apostrophes, punctuation, spaces; or any text.
CAPTION_CHARS = string.ascii_letters + string.digits + " '.,!?-_\t\néÉßİüñ日本語дом"
caption_text = st.text(st.sampled_from(CAPTION_CHARS)) | st.text()
words = st.text(min_size=1, max_size=12).filter(lambda w: w not in SPECIALS)


# --- tokenizer ----------------------------------------------------------------------------------------------

@FAST
@given(caption_text)
@example("A dog's ball, the DOG'S ball!")
@example("'quoted' _under_scored_ x''y")
@example("İstanbul cafe\u0301 \u0301x")  # "İ".lower() is "i" + a combining dot
@example("\U0001f468\u200d\U0001f469")  # emoji joined by a zero-width joiner: no token
def test_tokens_are_non_empty_words_without_spaces_or_punctuation(text):
    tokens = tokenize(text)
    assert all(isinstance(t, str) and t for t in tokens)
    for token in tokens:
        assert token in text.lower()
        assert not any(c.isspace() for c in token)
        # A letter or digit first, then also inner apostrophes, combining marks ("cafe\u0301"), connectors
        # and joiners. "Cn": newer than Python's Unicode tables; the regex module knows it as a letter.
        assert token[0].isalnum() or unicodedata.category(token[0]) == "Cn"
        assert token[-1] != "'"
        assert all(c.isalnum() or c == "'" or unicodedata.category(c) in ("Mn", "Mc", "Me", "Pc", "Cf", "Cn")
                   for c in token)


@FAST
@given(caption_text)
def test_tokenizing_the_joined_tokens_changes_nothing(text):
    tokens = tokenize(text)
    assert tokenize(" ".join(tokens)) == tokens


@FAST
@given(st.none() | st.integers() | st.floats() | st.binary() | st.lists(st.text())
       | st.dictionaries(st.text(), st.text()))
def test_tokenize_rejects_non_strings_with_type_error_only(value):
    try:
        tokenize(value)
    except TypeError as exc:
        assert type(value).__name__ in str(exc)
    else:
        raise AssertionError(f"tokenize accepted {value!r}")


# --- vocabulary ---------------------------------------------------------------------------------------------

vocabularies = st.lists(words, unique=True, max_size=30).map(lambda ws: Vocabulary([*SPECIALS, *ws]))


@FAST
@given(vocabularies)
def test_vocabulary_json_and_file_round_trip(vocab):
    again = Vocabulary.from_json(vocab.to_json())
    assert again == vocab and again.stoi == vocab.stoi
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vocab.json"
        vocab.save(path)
        assert Vocabulary.load(path) == vocab


@FAST
@given(st.lists(caption_text, max_size=8), st.integers(1, 3), caption_text)
def test_built_vocabulary_encodes_and_decodes_back_to_the_tokens(captions, min_count, text):
    vocab = Vocabulary.build(captions, min_count=min_count)
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    ids = vocab.encode(text)
    assert ids[0] == vocab.start_id and ids[-1] == vocab.end_id
    assert vocab.decode(ids) == [t if t in vocab.stoi else "<unk>" for t in tokenize(text)]
    assert len(vocab.encode(text, max_length=2)) <= 4


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20)
itos_documents = st.lists(st.sampled_from(SPECIALS) | words | json_values, max_size=8).map(
    lambda itos: json.dumps({"itos": itos}))
specials_then_junk = st.lists(st.sampled_from(SPECIALS) | words | json_values, max_size=6).map(
    lambda rest: json.dumps({"itos": [*SPECIALS, *rest]}))


@FAST
@given(st.text() | json_values.map(json.dumps) | itos_documents | specials_then_junk)
@example("[" * 100_000)  # deeper than json's recursion limit
@example('{"itos": ["<pad>", "<start>", "<end>", "<unk>", "\\ud800"]}')  # a lone surrogate could not be saved
@example('{"itos": ["<pad>", "<start>", "<end>", "<unk>", "a", "a"]}')
@example('{"itos": ["<pad>", "<start>", "<end>", "<unk>", 1]}')
@example('{"itos": 7}')
def test_vocabulary_from_json_raises_only_value_error(text):
    try:
        vocab = Vocabulary.from_json(text)
    except ValueError:
        return
    assert vocab.itos[:4] == list(SPECIALS)
    assert Vocabulary.from_json(vocab.to_json()) == vocab
    with tempfile.TemporaryDirectory() as tmp:
        vocab.save(Path(tmp) / "vocab.json")


# --- image loader -------------------------------------------------------------------------------------------

@functools.cache
def valid_images() -> dict[str, bytes]:
    """One small valid file per supported format and a few variants (alpha, palette, 16-bit, CMYK, EXIF)."""
    base = Image.new("RGB", (12, 8), (200, 40, 40))
    base.paste((10, 10, 220), (0, 0, 6, 4))
    exif = Image.Exif()
    exif[0x0112] = 6
    variants = {
        "jpeg": (base, "JPEG", {}),
        "jpeg_exif": (base, "JPEG", {"exif": exif}),
        "jpeg_cmyk": (base.convert("CMYK"), "JPEG", {}),
        "jpeg_progressive": (base, "JPEG", {"progressive": True}),
        "png": (base, "PNG", {}),
        "png_rgba": (base.convert("RGBA"), "PNG", {}),
        "png_palette": (base.convert("P"), "PNG", {"transparency": 0}),
        "png_16": (base.convert("I;16"), "PNG", {}),
        "gif": (base, "GIF", {"save_all": True, "append_images": [base.rotate(90)]}),
        "webp": (base, "WEBP", {}),
        "bmp": (base, "BMP", {}),
        "tiff": (base, "TIFF", {"compression": "tiff_lzw"}),
    }
    out = {}
    for name, (image, fmt, kwargs) in variants.items():
        buffer = io.BytesIO()
        image.save(buffer, fmt, **kwargs)
        out[name] = buffer.getvalue()
    return out


MAGIC = [b"\xff\xd8\xff\xe0", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"GIF87a", b"RIFF\x00\x00\x00\x00WEBPVP8 ",
         b"BM", b"II*\x00", b"MM\x00*", b"8BPS\x00\x01", b"%!PS-Adobe-3.0 EPSF-3.0\n", b"\x00\x00\x01\x00",
         b"P6\n"]
"""Starts of JPEG, PNG, GIF, WebP, BMP, TIFF, and of PSD, EPS, ICO and PPM, which we refuse."""


@st.composite
def damaged_images(draw) -> bytes:
    """A valid small image with some bytes overwritten, inserted or cut off."""
    data = bytearray(valid_images()[draw(st.sampled_from(sorted(valid_images())))])
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        position = draw(st.integers(0, len(data)))
        data[position:position] = draw(st.binary(min_size=1, max_size=16))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


random_bytes = st.binary(max_size=512)
magic_then_noise = st.builds(bytes.__add__, st.sampled_from(MAGIC), st.binary(max_size=512))
GIF_HEADER = b"GIF87a" + bytes(7) + b",\x00\x01" + bytes(5) + b"\x01\x00\x00\x00,"


@IMAGES
@given(random_bytes | magic_then_noise | damaged_images())
@example(GIF_HEADER)  # PIL raises struct.error
@example(GIF_HEADER + bytes(8) + b"\x80\x00")  # PIL raises IndexError
def test_open_image_on_random_bytes_raises_only_image_load_error(data):
    # A small pixel limit keeps random headers from claiming (and allocating) tens of megapixels.
    with mock.patch.object(images_module, "MAX_PIXELS", 1_000_000):
        try:
            image = open_image(data, source="fuzz")
        except ImageLoadError as exc:
            assert exc.source == "fuzz" and str(exc).startswith("fuzz: ") and exc.reason
            return
    assert image.mode == "RGB" and image.size[0] * image.size[1] <= 1_000_000
    image.getpixel((0, 0))  # loaded, usable


def test_every_undamaged_variant_opens():
    for name, data in valid_images().items():
        image = open_image(data)
        assert image.mode == "RGB" and sorted(image.size) == [8, 12], name
