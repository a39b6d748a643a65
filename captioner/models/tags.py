"""What the encoder itself recognises: its ImageNet classifier run on the grid features the captioner computes.

EfficientNet's weights keep the ImageNet head (`trunk.model.classifier`, 1280 -> 1000) that captioning never runs.
`TagHead` applies it to the (B, N, D) features of the caption's own forward pass, so tags cost a pooled matrix
product, not a second pass. With `model.encoder_head` the encoder stops before its last 1x1 convolution; the
classifier was trained on the output of the ORIGINAL convolution (`Encoder.head`), not on the decoder's fine-tuned
copy, so the original is the one used here.

The 1,000 class names are read from the label files timm bundles (`timm/data/_info`), found without importing timm:
`import timm` costs seconds of start-up, and tags are optional.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn

from captioner.models.encoder import Encoder

IMAGENET_CLASSES = 1000
_SYNSETS = "imagenet_synsets.txt"  # the 1,000 ImageNet-1k WordNet ids, in the classifier's (sorted) order
_LEMMAS = "imagenet_synset_to_lemma.txt"  # "n07873807<TAB>pizza, pizza pie" per line, for all of ImageNet-22k


class TagError(ValueError):
    """Tags cannot be computed: this encoder keeps no ImageNet classifier, or the label files are missing."""


def timm_info_dir() -> Path:
    """timm's folder of dataset label files (what `timm.data.ImageNetInfo` reads), located without importing timm."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise TagError("tags need the ImageNet class names that the package 'timm' ships (pip install timm)")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "_info"
    if not (folder / _SYNSETS).is_file() or not (folder / _LEMMAS).is_file():
        raise TagError(f"the installed timm has no ImageNet label files in {folder}")
    return folder


@functools.cache
def imagenet_labels() -> tuple[str, ...]:
    """The 1,000 ImageNet-1k class names in classifier order, short and readable: the first of each class's
    WordNet lemmas ("pizza" for "pizza, pizza pie"), as `ImageNetInfo.index_to_description` gives them in full."""
    folder = timm_info_dir()
    synsets = [line.strip() for line in (folder / _SYNSETS).read_text(encoding="utf-8").splitlines() if line.strip()]
    lemmas = {}
    for line in (folder / _LEMMAS).read_text(encoding="utf-8").splitlines():
        synset, _, lemma = line.partition("\t")
        lemmas[synset.strip()] = lemma.strip()
    if len(synsets) != IMAGENET_CLASSES:
        raise TagError(f"{folder / _SYNSETS}: {len(synsets)} classes, expected {IMAGENET_CLASSES}")
    return tuple(lemmas.get(s, s).split(",")[0].strip() or s for s in synsets)


def imagenet_classifier(encoder: Encoder) -> nn.Linear:
    """The ImageNet classifier kept in an EfficientNet encoder's trunk (`encoder.trunk.model.classifier`).

    Raises:
        TagError: the encoder has none (resnet50 drops its fc layer), or it does not fit the features.
    """
    classifier = getattr(getattr(encoder.trunk, "model", None), "classifier", None)
    pooled = encoder.head.out_features if encoder.head is not None else encoder.feature_dim
    if not isinstance(classifier, nn.Linear) or classifier.out_features != IMAGENET_CLASSES:
        raise TagError(f"this model's encoder ({encoder.name}) has no ImageNet classifier, so it gives no tags")
    if classifier.in_features != pooled:
        raise TagError(f"{encoder.name}'s classifier takes {classifier.in_features}-d features, its pooled "
                       f"features are {pooled}-d")
    return classifier


class TagHead(nn.Module):
    """(B, N, D) encoder grid features -> (B, 1000) ImageNet logits: timm's `forward_head` on the features.

    Headless encoders (D = 320 or 352, the last stage's width): the original 1x1 head (folded with its batch
    norm) and ReLU6 per cell first, then the average over cells; otherwise (D = 1280, already after the head's
    ReLU6) the average alone. Runs in fp32 on fp32 copies of the weights, whatever precision made the features.
    """

    def __init__(self, classifier: nn.Linear, head: nn.Linear | None = None, labels: tuple[str, ...] = ()):
        """`labels`: the class names, one per classifier output (`imagenet_labels()`); empty for logits only."""
        super().__init__()
        if labels and len(labels) != classifier.out_features:
            raise TagError(f"{len(labels)} labels for a classifier of {classifier.out_features} classes")
        self.labels = labels
        self.head = copy.deepcopy(head).float() if head is not None else None
        self.classifier = copy.deepcopy(classifier).float()
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_encoder(cls, encoder: Encoder) -> TagHead:
        """The tag head of `encoder`: its classifier, and its original head when the trunk was cut before it.

        Raises:
            TagError: the encoder keeps no ImageNet classifier, or timm's label files are not installed.
        """
        return cls(imagenet_classifier(encoder), encoder.head, imagenet_labels())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()  # (B, N, D)
        if self.head is not None:
            x = torch.clamp(self.head(x), 0.0, 6.0)  # (B, N, 1280): conv_head + bn2 + ReLU6, per cell
        return self.classifier(x.mean(dim=1))  # (B, 1000)

    @torch.inference_mode()
    def top(self, features: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The k most probable classes per image: (B, k) softmax probabilities, descending, and (B, k) indices."""
        probs = torch.softmax(self(features), dim=-1)  # (B, 1000)
        return probs.topk(min(k, probs.shape[-1]), dim=-1)

    def tags(self, features: torch.Tensor, k: int) -> list[list[tuple[str, float]]]:
        """Per image, its k most probable (label, probability) pairs, most probable first."""
        probs, index = self.top(features, k)  # (B, k) each
        return [[(self.labels[i], p) for i, p in zip(row_index, row_probs)]
                for row_index, row_probs in zip(index.tolist(), probs.tolist())]
