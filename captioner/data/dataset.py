"""Training and validation sets on cached features, and the batches the training loop consumes.

Features stay fp16 on disk (`FeatureRows`, a view of the feature store) and a batch reads only its own rows, so
memory does not grow with the dataset; tests may pass an in-memory tensor instead. A batch holds B images and up to
`captions_per_image` of their captions, sorted by length so the decoder can skip finished rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from captioner.data.feature_store import FeatureRows
from captioner.models.vocab import Vocabulary


@dataclass
class CaptionSet:
    """Images (as cached features) with their reference captions."""

    images: list[Path]
    features: torch.Tensor | FeatureRows  # (I, N, D) fp16
    references: list[list[str]]  # raw reference captions per image
    # (I, N, D) fp16 features of the images flipped left-right, if extracted
    mirrored: torch.Tensor | FeatureRows | None = None
    weights: list[float] | None = None
    """Per-image sampling weight (its dataset's `weight`): shown that often per epoch on average; None = all 1."""

    def __len__(self) -> int:
        return len(self.images)

    def ids(self) -> list[str]:
        return [str(p) for p in self.images]

    def subset(self, count: int) -> CaptionSet:
        """The first `count` images (all when count is 0)."""
        if not count or count >= len(self):
            return self
        return CaptionSet(self.images[:count], self.features[:count], self.references[:count],
                          None if self.mirrored is None else self.mirrored[:count],
                          None if self.weights is None else self.weights[:count])

    def to(self, device: torch.device) -> CaptionSet:
        """The same set with its features on `device`."""
        if self.features.device == device:
            return self
        return CaptionSet(self.images, self.features.to(device), self.references,
                          None if self.mirrored is None else self.mirrored.to(device), self.weights)

    def epoch_size(self) -> int:
        """Images shown per epoch on average: the sum of the sampling weights."""
        return len(self) if self.weights is None else max(1, round(sum(self.weights)))


@dataclass
class Batch:
    features: torch.Tensor  # (b, N, D) float32
    captions: torch.Tensor  # (B, T) ids, <start> ... <end> <pad>...
    lengths: torch.Tensor  # (B,) sorted decreasing
    image_index: torch.Tensor  # (B,) row of `features` for each caption
    images: torch.Tensor  # (b,) dataset indices of the images


def encode_captions(data: CaptionSet, vocab: Vocabulary, max_length: int) -> list[list[list[int]]]:
    """Token ids of every reference caption, per image."""
    return [[vocab.encode(c, max_length) for c in caps] for caps in data.references]


def rank_share(order: list[int], rank: int, world: int) -> list[int]:
    """This rank's every world-th item of a permutation all ranks share; the tail is dropped so that every rank
    takes the same number of steps (the distributed sampler)."""
    return order[: len(order) // world * world][rank::world] if world > 1 else order


def epoch_order(data: CaptionSet, generator: torch.Generator) -> list[int]:
    """The images of one epoch in shuffled order. Unweighted: a permutation. Weighted: image i appears
    floor(w_i) times plus once more with probability frac(w_i), so a weight is the expected showings per epoch."""
    if data.weights is None:
        return torch.randperm(len(data), generator=generator).tolist()
    weights = torch.tensor(data.weights, dtype=torch.float64)  # (I,)
    whole = weights.floor()
    counts = whole + (torch.rand(len(data), generator=generator, dtype=torch.float64) < weights - whole)
    if not counts.any():  # weights all below 1 and none drawn: show one image rather than an empty epoch
        counts[torch.randint(len(data), (1,), generator=generator)] = 1
    shown = torch.repeat_interleave(torch.arange(len(data)), counts.long())  # (S,)
    return shown[torch.randperm(len(shown), generator=generator)].tolist()


def iterate_batches(data: CaptionSet, encoded: list[list[list[int]]], batch_size: int, captions_per_image: int,
                    generator: torch.Generator, rank: int = 0, world: int = 1,
                    mirror_ids: Sequence[int] | None = None) -> Iterator[Batch]:
    """Shuffled batches of `batch_size` images; each image brings `captions_per_image` captions.

    The order depends only on `generator`, so a seeded run (and a resumed one) sees the same batches; with
    sampling weights (`CaptionSet.weights`, several datasets) an image is shown as often as its weight says. With
    `world` > 1 every rank draws the same permutation and takes every world-th image from `rank` on (the
    distributed sampler); the tail is dropped so that all ranks take the same number of steps.
    When `data` has mirrored features, each image is shown mirrored with probability 1/2, its captions mapped
    through `mirror_ids` (token id -> id of the mirrored word, see `Vocabulary.mirror_ids`).
    """
    if data.mirrored is not None and mirror_ids is None:
        raise ValueError("mirrored features need mirror_ids to mirror their captions")
    order = epoch_order(data, generator)
    if data.weights is None:
        # Drawn for every image on every rank, so the generator advances identically everywhere.
        by_image = {i: torch.randperm(len(caps), generator=generator)[:captions_per_image].tolist()
                    for i, caps in enumerate(encoded) if len(caps) > captions_per_image}
        picks = [by_image.get(i) for i in order]
        flips = (torch.rand(len(data), generator=generator) < 0.5)[order] if data.mirrored is not None else None
    else:  # an image shown twice gets its own captions and its own flip each time
        picks = [torch.randperm(len(encoded[i]), generator=generator)[:captions_per_image].tolist()
                 if len(encoded[i]) > captions_per_image else None for i in order]
        flips = torch.rand(len(order), generator=generator) < 0.5 if data.mirrored is not None else None
    if flips is None:
        flips = torch.zeros(len(order), dtype=torch.bool)
    positions = rank_share(list(range(len(order))), rank, world)
    for start in range(0, len(positions), batch_size):
        mine = positions[start:start + batch_size]
        chosen = [order[p] for p in mine]
        seqs, owners = [], []
        for row, (p, i) in enumerate(zip(mine, chosen)):
            caps = [encoded[i][j] for j in picks[p]] if picks[p] is not None else encoded[i]
            if flips[p]:
                caps = [[mirror_ids[t] for t in c] for c in caps]
            seqs += caps
            owners += [row] * len(caps)
        lengths = torch.tensor([len(s) for s in seqs])
        lengths, sort = lengths.sort(descending=True)
        captions = torch.zeros(len(seqs), int(lengths[0]), dtype=torch.long)
        for r, j in enumerate(sort.tolist()):
            captions[r, : len(seqs[j])] = torch.tensor(seqs[j])
        features = data.features[chosen]
        if data.mirrored is not None:
            features = torch.where(flips[mine][:, None, None], data.mirrored[chosen], features)
        yield Batch(features=features.float(), captions=captions, lengths=lengths,
                    image_index=torch.tensor(owners)[sort], images=torch.tensor(chosen))
