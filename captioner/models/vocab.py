"""Tokenizer and vocabulary.

The tokenizer is NLTK's `RegexpTokenizer`, which needs no downloaded data: lowercase words, digits and English
clitics ("dog's" stays one token), punctuation dropped, the way the COCO evaluation's PTB tokenizer treats it.
Word characters include combining accents ("cafe\u0301" stays one word). NLTK guards every match with a 5 s
timeout; captions are far too short to reach it, and the pattern is linear anyway.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)
MIRRORED_WORDS = (("left", "right"), ("lefthand", "righthand"), ("leftmost", "rightmost"))

# Word characters (regex's \w includes combining marks, connectors and joiners), not starting with one of
# those: a stray accent or the zero-width joiner of an emoji sequence is never a token on its own.
_PART = r"(?![\p{M}\p{Pc}\p{Cf}])[^\W_]+"
_TOKEN = _PART + "(?:'" + _PART + ")?"


@functools.cache
def _tokenizer():
    """NLTK's tokenizer for `_TOKEN`, built at the first use: captioning never tokenizes, and `import nltk`
    was 0.27 s of `captioner caption one.jpg` on a 2-core AVX2 EPYC (`python -X importtime`). Stateless, so
    one instance is shared."""
    from nltk.tokenize import RegexpTokenizer

    return RegexpTokenizer(_TOKEN)


def tokenize(text: str) -> list[str]:
    """Lowercase `text` and split it into word tokens; punctuation is dropped.

    Raises:
        TypeError: `text` is not a str (the only exception raised, NLTK being installed: it is imported at the
            first call).
    """
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a str, got {type(text).__name__}")
    return _tokenizer().tokenize(text.lower())


class Vocabulary:
    """Bidirectional word <-> id map with the four special tokens at ids 0..3."""

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if tuple(words[: len(SPECIALS)]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            raise ValueError("a vocabulary must not repeat words")
        for word in words:
            if not isinstance(word, str):
                raise TypeError(f"vocabulary words must be strings, got {type(word).__name__}")
            try:
                word.encode("utf-8")  # else `save` could not write it
            except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from the JSON escape \ud800
                raise ValueError(f"vocabulary word {word!r} is not valid Unicode text") from exc
        self.itos: list[str] = words
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(words)}

    pad_id, start_id, end_id, unk_id = 0, 1, 2, 3
    banned_ids = (0, 1, 3)
    """Never generated: <pad>, <start>, <unk>."""

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 5) -> Vocabulary:
        """Vocabulary of every word seen at least `min_count` times, most frequent first (ties alphabetical)."""
        counts = Counter(tok for caption in captions for tok in tokenize(caption))
        kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
        return cls([*SPECIALS, *kept])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.itos == other.itos

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Token ids of `text` framed by <start> ... <end>; at most `max_length` words in between."""
        tokens = tokenize(text)
        if max_length is not None:
            tokens = tokens[:max_length]
        return [self.start_id, *(self.stoi.get(t, self.unk_id) for t in tokens), self.end_id]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of `ids`, stopping at <end> and dropping <start> and <pad>."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i in (self.start_id, self.pad_id):
                continue
            words.append(self.itos[i])
        return words

    def mirror_ids(self) -> list[int]:
        """Map from each token id to the id of the word that describes the image mirrored left-right:
        'left' and 'right' (and their '-hand'/'most' forms) trade places, every other word maps to itself."""
        ids = list(range(len(self)))
        for a, b in MIRRORED_WORDS:
            if a in self.stoi and b in self.stoi:
                ids[self.stoi[a]], ids[self.stoi[b]] = self.stoi[b], self.stoi[a]
        return ids

    def to_json(self) -> str:
        """JSON text: {"itos": [...]} (the format `from_json` reads)."""
        return json.dumps({"itos": self.itos}, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        """Inverse of `to_json`.

        Raises:
            ValueError: for any str that is not a valid vocabulary (the only exception raised for a str).
        """
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"vocabulary JSON is malformed: {exc}") from exc
        except RecursionError as exc:  # json's C scanner on deeply nested arrays/objects
            raise ValueError("vocabulary JSON is nested too deeply") from exc
        if not isinstance(data, dict) or not isinstance(data.get("itos"), list):
            raise ValueError('vocabulary JSON must be an object with an "itos" list')
        if not all(isinstance(w, str) for w in data["itos"]):
            raise ValueError("vocabulary words must be strings")
        return cls(data["itos"])

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON."""
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by `save`."""
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
