"""The disk cache of built fast encoders (`captioner.runtime.cache`): a hit gives the features of a fresh build,
damage is rebuilt, and the key follows the weights."""

from __future__ import annotations

import warnings

import pytest
import torch

from captioner.models.encoder import build_encoder
from captioner.runtime import cache
from captioner.runtime.fast import FastEncoder

pytest.importorskip("onnxruntime")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("efficientnet_lite0", image_size=96)


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path / "a"))
    assert cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CAPTIONER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "captioner"


def test_hit_gives_the_features_of_a_fresh_build(folder, encoder, pixels):
    fresh = FastEncoder(encoder, "fp32", disk_cache=False)(pixels)
    first = FastEncoder(encoder, "fp32")(pixels)  # builds and writes
    [written] = folder.glob("encoder-fp32-*.onnx")
    stamp = written.stat().st_mtime_ns
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = FastEncoder(encoder, "fp32")(pixels)  # reads
    assert list(folder.glob("*.onnx")) == [written] and written.read_bytes().startswith(cache.MAGIC)
    assert written.stat().st_mtime_ns >= stamp
    assert torch.equal(first, fresh) and torch.equal(second, fresh)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "flipped", "valid-checksum-not-onnx"])
def test_damaged_file_is_rebuilt(folder, encoder, pixels, damage):
    expected = FastEncoder(encoder, "fp32")(pixels)
    [path] = folder.glob("*.onnx")
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not a model" * 100)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    else:  # passes the checksum, but ONNX Runtime cannot read it
        cache.write(path, b"not an onnx graph")
    with pytest.warns(RuntimeWarning, match="building it again"):
        rebuilt = FastEncoder(encoder, "fp32")(pixels)
    assert torch.equal(rebuilt, expected)
    assert cache.read(path) == data[len(cache.MAGIC) + 32:]  # written again, whole


def test_unwritable_folder_builds_in_memory(tmp_path, monkeypatch, encoder, pixels):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    monkeypatch.setenv("CAPTIONER_CACHE_DIR", str(blocker / "cache"))
    assert FastEncoder(encoder, "fp32")(pixels).shape == (2, 9, 1280)


def test_key_changes_with_the_weights(encoder):
    other = build_encoder("efficientnet_lite0", image_size=96)
    assert cache.weights_digest(other.trunk) == cache.weights_digest(encoder.trunk)
    with torch.no_grad():
        other.trunk.model.conv_stem.weight[0, 0, 0, 0] += 1e-6
    assert cache.weights_digest(other.trunk) != cache.weights_digest(encoder.trunk)
    assert cache.key("a", 1) == cache.key("a", 1) != cache.key("a", 2)


def test_changed_weights_miss_the_cache(folder, encoder, pixels):
    FastEncoder(encoder, "fp32")(pixels)
    other = build_encoder("efficientnet_lite0", image_size=96)
    with torch.no_grad():
        other.trunk.model.conv_stem.weight.mul_(0.5)
    changed = FastEncoder(other, "fp32")(pixels)
    assert len(list(folder.glob("*.onnx"))) == 2
    with torch.no_grad():
        assert torch.allclose(changed, other(pixels), atol=1e-3)


def test_old_files_are_pruned(folder):
    for i in range(cache.KEEP + 3):
        assert cache.write(cache.path_for("encoder-fp32", f"{i:040d}"), b"x")
    assert len(list(folder.glob("*.onnx"))) == cache.KEEP


def test_cache_entry_that_is_a_fifo_or_a_folder_is_built_again_without_blocking(folder):
    import os

    folder.mkdir()
    fifo, directory = cache.path_for("encoder-fp32", "f" * 40), cache.path_for("encoder-fp32", "d" * 40)
    os.mkfifo(fifo)  # reading it would wait for a writer for good
    directory.mkdir()
    for path in (fifo, directory):
        with pytest.warns(RuntimeWarning, match="not a regular file"):
            assert cache.read(path) is None
    assert cache.read(cache.path_for("encoder-fp32", "0" * 40)) is None  # absent: no warning


def test_pruning_never_removes_onnx_files_the_cache_did_not_write(folder):
    """CAPTIONER_CACHE_DIR may be a folder of the user's own models: pruning by `*.onnx` deleted the oldest."""
    import os

    folder.mkdir(parents=True, exist_ok=True)
    own = [folder / f"model{i}.onnx" for i in range(cache.KEEP + 2)]
    for i, path in enumerate(own):
        path.write_bytes(b"an onnx model of the user's")
        os.utime(path, (1e9 + i, 1e9 + i))  # older than anything the cache writes
    for i in range(cache.KEEP + 3):
        assert cache.write(cache.path_for("encoder-fp32", f"{i:040d}"), b"x")
    assert all(path.exists() for path in own)
    assert len([p for p in folder.glob("encoder-*.onnx")]) == cache.KEEP
