"""The feature cache: what it stores is the reference encoder's output, and stale entries are never reused."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from PIL import Image

from captioner.data.feature_store import FeatureStore
from captioner.data.features import FeatureCache, _digest
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
    before = cache.load([path]).tensor()
    write_images(tmp_path / "images", 1, seed=1)  # same name, new pixels
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert not cache.is_cached(path)
    cache.extract([path], progress=False)
    assert not torch.equal(cache.load([path]).tensor(), before)

    other = build_encoder("efficientnet_lite0")
    other.preprocess = dataclasses.replace(other.preprocess, size=192)  # another preprocessing, another folder
    assert FeatureCache(tmp_path / "cache", other).folder != cache.folder


def test_features_cached_before_pytorch_resizing_are_not_reused(encoder, tmp_path):
    """Caches keyed by the encoder alone hold features of PIL's resizing (within 2 levels, not the same)."""
    [path] = write_images(tmp_path / "images", 1)
    old = FeatureStore(tmp_path / "cache" / _digest(encoder.cache_key()))
    writer = old.writer(1)
    writer.add([FeatureCache.key_for(path)], np.zeros((1, 49, 1280), dtype=np.float16))
    writer.close()
    assert FeatureCache.key_for(path) in old.index()
    cache = FeatureCache(tmp_path / "cache", encoder)
    assert not cache.is_cached(path)
    cache.extract([path], progress=False)
    assert cache.load([path]).tensor().abs().sum() > 0  # computed, not the stale zeros


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
    plain, mirrored = (FeatureCache(tmp_path / "cache", encoder),
                       FeatureCache(tmp_path / "cache", encoder, mirrored=True))
    assert mirrored.folder != plain.folder
    plain.extract(paths, progress=False)
    assert not mirrored.is_cached(paths[0])  # the plain entries never stand in for the mirrored ones
    mirrored.extract(paths, progress=False)
    prep = encoder.preprocess
    with torch.inference_mode():
        reference = encoder(torch.stack([prep(open_image(p, prep.size).transpose(Image.FLIP_LEFT_RIGHT))
                                         for p in paths]))
    assert torch.allclose(mirrored.load(paths).float(), reference, atol=2e-2, rtol=1e-2)
    assert not torch.allclose(plain.load(paths).float(), reference, atol=2e-2, rtol=1e-2)


def test_an_interrupted_extraction_keeps_its_flushed_rows_and_continues(encoder, tmp_path, monkeypatch):
    paths = write_images(tmp_path / "images", 5)
    cache = FeatureCache(tmp_path / "cache", encoder, flush_every=2)
    compute, calls = cache._compute, []

    def crash_on_third_batch(x):
        calls.append(len(x))
        if len(calls) == 3:
            raise KeyboardInterrupt  # the process dies mid-extraction
        return compute(x)

    monkeypatch.setattr(cache, "_compute", crash_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        cache.extract(paths, batch_size=1, progress=False)
    assert [cache.is_cached(p) for p in paths] == [True, True, False, False, False]

    calls.clear()
    resumed = FeatureCache(tmp_path / "cache", encoder)
    monkeypatch.setattr(resumed, "_compute", lambda x: calls.append(len(x)) or compute(x))
    assert resumed.extract(paths, batch_size=1, progress=False) == []
    assert calls == [1, 1, 1]  # only the three rows the crash lost
    fresh = FeatureCache(tmp_path / "fresh", encoder)
    fresh.extract(paths, progress=False)
    assert torch.allclose(resumed.load(paths).float(), fresh.load(paths).float(), atol=1e-3)


def test_a_truncated_store_file_is_named_and_recomputed(encoder, tmp_path, capsys):
    paths = write_images(tmp_path / "images", 3)
    cache = FeatureCache(tmp_path / "cache", encoder)
    cache.extract(paths, progress=False)
    before = cache.load(paths).tensor()
    [shard] = cache.folder.glob("shard-*.npy")
    with open(shard, "r+b") as fh:
        fh.truncate(shard.stat().st_size // 2)
    cache.store.close()

    again = FeatureCache(tmp_path / "cache", encoder)
    assert not again.is_cached(paths[0])
    assert str(shard) in capsys.readouterr().err
    assert again.extract(paths, progress=False) == []
    assert torch.allclose(again.load(paths).float(), before.float(), atol=1e-3)


def test_an_index_nested_too_deeply_is_a_damaged_file_and_recomputed(encoder, tmp_path, capsys):
    """json's C scanner raised RecursionError, which ended training with a traceback."""
    paths = write_images(tmp_path / "images", 2)
    cache = FeatureCache(tmp_path / "cache", encoder)
    cache.extract(paths, progress=False)
    cache.store.close()
    [index] = cache.folder.glob("shard-*.index.json")
    index.write_text("[" * 200_000 + "]" * 200_000)

    again = FeatureCache(tmp_path / "cache", encoder)
    assert not again.is_cached(paths[0])
    assert "is damaged" in capsys.readouterr().err
    assert again.extract(paths, progress=False) == []


def test_old_per_image_caches_are_read_into_the_store_and_damaged_ones_recomputed(encoder, tmp_path, capsys):
    paths = write_images(tmp_path / "images", 3)
    fresh = FeatureCache(tmp_path / "fresh", encoder)
    fresh.extract(paths, progress=False)
    grids = fresh.load(paths).tensor().numpy()
    cache = FeatureCache(tmp_path / "cache", encoder)
    for path, grid in zip(paths, grids):  # the old layout: one .npy per image
        np.save(cache.path_for(path), grid + np.float16(1))
    cache.path_for(paths[2]).write_bytes(cache.path_for(paths[2]).read_bytes()[:100])  # truncated
    assert cache.extract(paths, progress=False) == []
    err = capsys.readouterr().err
    assert "old cache layout" in err and str(cache.path_for(paths[2])) in err
    loaded = cache.load(paths).tensor().numpy()
    assert np.array_equal(loaded[:2], grids[:2] + np.float16(1))  # read, not recomputed
    assert np.allclose(loaded[2], grids[2], atol=1e-3)  # recomputed


def test_rows_are_read_from_disk_not_held_in_memory(encoder, tmp_path):
    paths = write_images(tmp_path / "images", 4)
    cache = FeatureCache(tmp_path / "cache", encoder)
    cache.extract(paths, batch_size=3, progress=False)
    view = cache.load(paths)
    assert not any(isinstance(v, (np.ndarray, torch.Tensor)) and v.size > 1000 for v in vars(view).values())
    assert torch.equal(view[[3, 0]], torch.stack([view.tensor()[3], view.tensor()[0]]))
    assert torch.equal(view[1:3].tensor(), view.tensor()[1:3]) and view[torch.tensor([2])].shape == (1, 49, 1280)


def test_a_shard_of_another_row_shape_written_before_stamps_is_named_and_recomputed(encoder, tmp_path, capsys):
    paths = write_images(tmp_path / "images", 2)
    cache = FeatureCache(tmp_path / "cache", encoder)
    old = FeatureStore(cache.folder).writer(2)  # no stamp: a shard from before stamps, of another encoder's rows
    old.add([cache.key_for(p) for p in paths], np.ones((2, 4, 8), dtype=np.float16))
    old.close()
    cache = FeatureCache(tmp_path / "cache", encoder)
    assert not cache.is_cached(paths[0])  # was: taken as cached, then (4, 8) rows or a StoreError traceback
    assert "rows of shape (4, 8)" in capsys.readouterr().err
    assert cache.extract(paths, progress=False) == []
    assert tuple(cache.load(paths).shape) == (2, *cache.row_shape)


_KILLED_WRITER = """
import os, signal, sys
import numpy as np
from captioner.data.feature_store import FeatureStore
writer = FeatureStore(sys.argv[1], flush_every=100).writer(8)
writer.add(["a", "b"], np.ones((2, 3, 4), dtype=np.float16))  # rows on disk, never indexed
writer.index_path.with_suffix(f".{os.getpid()}.tmp").write_text('{"rows": {"a"')  # a flush cut short
os.kill(os.getpid(), signal.SIGKILL)
"""


def killed_pid(names: list[str]) -> int:
    """The pid in the killed writer's shard name (`shard-<time>-<pid>-<host>.npy`)."""
    return int(next(n for n in names if n.endswith(".npy")).split(".")[0].split("-")[2])


def test_files_a_killed_extraction_left_are_removed_but_a_running_ones_are_kept(tmp_path, capsys):
    import subprocess
    import sys

    folder = tmp_path / "store"
    killed = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(folder)])
    assert killed.returncode == -9
    left = sorted(p.name for p in folder.iterdir())
    assert sorted(name.rsplit(".", 1)[1] for name in left) == ["npy", "tmp"], left
    other_host = folder / "shard-1-999999999-0000beef.npy"  # a rank on another machine sharing the folder
    other_host.write_bytes(b"")
    for name in left:  # the temporary index is removed once it is older than a live one ever is
        os.utime(folder / name, (1e9, 1e9))
    store = FeatureStore(folder, flush_every=100)
    # A live writer whose pid this process cannot see (another PID namespace, a container): it holds its lock.
    from captioner.data.feature_store import ShardWriter, _host_tag

    unseen = ShardWriter(folder / f"shard-2-{killed_pid(left)}-{_host_tag()}", 4, 100)
    unseen.add(["u"], np.ones((1, 3, 4), dtype=np.float16))
    running = store.writer(4)  # a new extraction starts: it removes what the killed one left
    assert "removed 2 file(s) an interrupted extraction left" in capsys.readouterr().err
    assert not any((folder / name).exists() for name in left) and other_host.exists()
    assert unseen.array_path.exists()  # was deleted under it: its pid runs no process that this one can see
    unseen.close()

    running.add(["c"], np.ones((1, 3, 4), dtype=np.float16))  # this process's own, before its first flush
    assert store.sweep() == [] and running.array_path.exists()
    running.close()
    assert set(store.index()) == {"c", "u"}


def test_an_old_layout_file_of_another_shape_is_recomputed_not_a_traceback(encoder, tmp_path, capsys):
    paths = write_images(tmp_path / "images", 1)
    cache = FeatureCache(tmp_path / "cache", encoder)
    np.save(cache.path_for(paths[0]), np.ones((4, 8), dtype=np.float16))  # was a broadcasting ValueError
    assert cache.extract(paths, progress=False) == []
    assert "found float16 (4, 8)" in capsys.readouterr().err
    assert tuple(cache.load(paths).shape) == (1, *cache.row_shape)
