"""The feature cache: what it stores is the reference encoder's output, and stale entries are never reused."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.features import FeatureCache
from captioner.images import open_image
from captioner.models.encoder import build_encoder


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet_lite0")


def write_images(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 256, (64 + 8 * i, 80, 3), dtype=np.uint8)
        path = folder / f"img{i}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def test_cached_features_are_the_reference_encoders(encoder, tmp_path):
    paths = write_images(tmp_path / "images", 5)
    cache = FeatureCache(tmp_path / "cache", encoder)
    assert cache.extract(paths, batch_size=2, progress=False) == []
    cached = cache.load(paths)
    prep = encoder.preprocess
    with torch.inference_mode():
        reference = encoder(torch.stack([prep(open_image(p, prep.size)) for p in paths]))
    assert cached.dtype == torch.float16 and cached.shape == reference.shape == (5, 49, 1280)
    # Extraction runs the fast fp32 path; it must agree with `Encoder.forward` to fp16 storage precision.
    assert torch.allclose(cached.float(), reference, atol=2e-2, rtol=1e-2)


def test_a_changed_file_or_preprocessing_is_never_served_stale(encoder, tmp_path):
    [path] = write_images(tmp_path / "images", 1)
    cache = FeatureCache(tmp_path / "cache", encoder)
    cache.extract([path], progress=False)
    before = cache.load([path])
    write_images(tmp_path / "images", 1, seed=1)  # same name, new pixels
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not cache.path_for(path).is_file()
    cache.extract([path], progress=False)
    assert not torch.equal(cache.load([path]), before)

    other = build_encoder("efficientnet_lite0")
    other.preprocess = dataclasses.replace(other.preprocess, size=192)  # another preprocessing, another folder
    assert FeatureCache(tmp_path / "cache", other).folder != cache.folder


def test_unreadable_images_are_reported_and_the_rest_stored(encoder, tmp_path):
    good = write_images(tmp_path / "images", 2)
    bad = tmp_path / "images" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    cache = FeatureCache(tmp_path / "cache", encoder)
    failures = cache.extract([good[0], bad, good[1]], progress=False)
    assert [p for p, _ in failures] == [bad] and failures[0][1]
    assert cache.load(good).shape == (2, 49, 1280)


def test_mirrored_features_are_the_encoders_on_the_flipped_image_and_live_apart(encoder, tmp_path):
    paths = write_images(tmp_path / "images", 2)
    plain, mirrored = FeatureCache(tmp_path / "cache", encoder), FeatureCache(tmp_path / "cache", encoder, mirrored=True)
    assert mirrored.folder != plain.folder
    plain.extract(paths, progress=False)
    assert not mirrored.path_for(paths[0]).is_file()  # the plain entries never stand in for the mirrored ones
    mirrored.extract(paths, progress=False)
    prep = encoder.preprocess
    with torch.inference_mode():
        reference = encoder(torch.stack([prep(open_image(p, prep.size).transpose(Image.FLIP_LEFT_RIGHT))
                                         for p in paths]))
    assert torch.allclose(mirrored.load(paths).float(), reference, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(plain.load(paths).float(), reference, atol=2e-2, rtol=1e-2)
