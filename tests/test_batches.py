"""Training batches: every image once per epoch with its captions, and the mirrored-image augmentation."""

import pytest
import torch

from captioner.data.dataset import CaptionSet, encode_captions, iterate_batches
from captioner.models.vocab import Vocabulary

CAPTIONS = ["a dog on the left of a cat", "a cat to the right", "a red ball"]


def _set(images: int, mirrored: bool) -> CaptionSet:
    features = torch.arange(1, images + 1, dtype=torch.float16).view(-1, 1, 1).expand(images, 4, 3).contiguous()
    return CaptionSet([f"img{i}.jpg" for i in range(images)], features, [CAPTIONS] * images,
                      -features if mirrored else None)


def _epoch(data: CaptionSet, vocab: Vocabulary, seed: int = 0):
    encoded = encode_captions(data, vocab, 20)
    generator = torch.Generator().manual_seed(seed)
    for batch in iterate_batches(data, encoded, 5, 3, generator, mirror_ids=vocab.mirror_ids()):
        for row, image in enumerate(batch.images.tolist()):
            captions = [vocab.decode(c) for c in batch.captions[batch.image_index == row].tolist()]
            yield image, float(batch.features[row, 0, 0]), sorted(" ".join(c) for c in captions)


def test_mirror_ids_swap_left_and_right_only():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    ids = vocab.mirror_ids()
    assert vocab.itos[ids[vocab.stoi["left"]]] == "right" and vocab.itos[ids[vocab.stoi["right"]]] == "left"
    assert all(ids[i] == i for i, w in enumerate(vocab.itos) if w not in ("left", "right"))
    assert Vocabulary.build(["a dog"], min_count=1).mirror_ids() == [0, 1, 2, 3, 4, 5]


def test_mirrored_images_come_with_mirrored_captions():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    plain = sorted(CAPTIONS)
    swapped = sorted(c.replace("left", "LEFT").replace("right", "left").replace("LEFT", "right") for c in CAPTIONS)
    seen = []
    for image, value, captions in _epoch(_set(40, mirrored=True), vocab):
        assert abs(value) == image + 1
        assert captions == (swapped if value < 0 else plain)
        seen.append(image)
    assert sorted(seen) == list(range(40))
    flipped = sum(1 for _, value, _ in _epoch(_set(40, mirrored=True), vocab) if value < 0)
    assert 8 <= flipped <= 32  # about half, drawn from the seeded generator


def test_without_mirrored_features_nothing_is_mirrored():
    vocab = Vocabulary.build(CAPTIONS, min_count=1)
    rows = list(_epoch(_set(12, mirrored=False), vocab))
    assert all(value > 0 and captions == sorted(CAPTIONS) for _, value, captions in rows)
    with pytest.raises(ValueError, match="mirror_ids"):
        next(iterate_batches(_set(4, mirrored=True), [[[1, 2]]] * 4, 2, 1, torch.Generator()))
