"""Shared fixtures: tiny vocabularies, tiny random models and generated images (no network, no dataset)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from captioner.config import DecodeConfig, ModelConfig
from captioner.models.checkpoint import CaptionModel, new_model, save_model
from captioner.models.vocab import Vocabulary


@pytest.fixture(scope="session", autouse=True)
def private_runtime_cache(tmp_path_factory):
    """Built fast paths go to a cache of the test run's own (subprocesses inherit it), never to ~/.cache."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CAPTIONER_CACHE_DIR", str(tmp_path_factory.mktemp("runtime-cache")))
        yield


@pytest.fixture
def one_thread():
    """One intra-op thread: for tests that check behaviour, not speed, so they stay quick on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


WORDS = "a dog cat runs sits on the grass red blue ball man woman".split()


@pytest.fixture
def vocab() -> Vocabulary:
    return Vocabulary.build([" ".join(WORDS)], min_count=1)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(embed_dim=16, hidden_dim=24, attention_dim=12, feature_dim=20, dropout=0.0,
                       feature_dropout=0.0)


def make_model(vocab: Vocabulary, cfg: ModelConfig, encoder_dim: int = 1280, seed: int = 0) -> CaptionModel:
    torch.manual_seed(seed)
    model = new_model(cfg, vocab, encoder_dim, DecodeConfig(beam_size=3, max_length=8))
    model.decoder.eval()
    return model


@pytest.fixture
def tiny_model(vocab, tiny_cfg) -> CaptionModel:
    return make_model(vocab, tiny_cfg)


@pytest.fixture
def tiny_checkpoint(tmp_path, tiny_model) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model, path)
    return path


def write_images(folder: Path, n: int, size=(64, 48), fmt: str = "JPEG", suffix: str = ".jpg") -> list[Path]:
    """n distinct solid-colour images with a square in a corner."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        image = Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (151 * i) % 256))
        image.paste((255 - (37 * i) % 256, 0, 0), (0, 0, size[0] // 2, size[1] // 2))
        path = folder / f"img_{i:03d}{suffix}"
        image.save(path, fmt)
        paths.append(path)
    return paths
