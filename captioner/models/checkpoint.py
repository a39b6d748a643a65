"""Checkpoints: one `.safetensors` file holding the decoder weights plus JSON metadata in its header.

The metadata carries everything needed to caption (model config, decoding defaults, vocabulary, format version)
and where the model came from (training data, metrics). Loading never unpickles: a pickle-based `.pt`/`.pth`
is refused with an explanation. Writes are atomic (temp file, fsync, rename), so a crash never leaves a
half-written checkpoint behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_dumps

from captioner.config import MAX_WIDTH, DecodeConfig, ModelConfig, config_to_dict, dataclass_from_dict
from captioner.models.decoder import build_decoder
from captioner.models.no_init import NoInit
from captioner.models.vocab import Vocabulary
from captioner.path_kind import CHECKPOINT_WORDS, file_problem

FORMAT = "captioner"
FORMAT_VERSION = 1
MAX_VOCAB = 1_000_000
"""Most words a checkpoint's vocabulary may hold."""


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, of another format, or pickle-based."""


@dataclass
class CaptionModel:
    """A decoder with the vocabulary and config it was trained with."""

    decoder: torch.nn.Module
    vocab: Vocabulary
    model_cfg: ModelConfig
    decode_cfg: DecodeConfig = field(default_factory=DecodeConfig)
    info: dict[str, Any] = field(default_factory=dict)
    """Provenance: training data, recipe, metrics. Free-form JSON."""
    encoder_dim: int = 1280


def new_model(model_cfg: ModelConfig, vocab: Vocabulary, encoder_dim: int,
              decode_cfg: DecodeConfig | None = None) -> CaptionModel:
    """A freshly initialised CaptionModel."""
    decoder = build_decoder(model_cfg, len(vocab), encoder_dim)
    return CaptionModel(decoder, vocab, model_cfg, decode_cfg or DecodeConfig(), {}, encoder_dim)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would make checkpoints private to their writer
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
    """Atomically write tensors and a JSON-serialisable metadata dict as one safetensors file."""
    text = json.dumps(metadata, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name's undecodable bytes (surrogate escapes): kept as \udcxx escapes
        text = json.dumps(metadata)
    header = {"json": text}
    data = safetensors_dumps({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=header)
    atomic_write_bytes(path, data)


def _refuse_pickle(path: Path) -> None:
    with open(path, "rb") as fh:
        head = fh.read(9)
    # A safetensors file starts with its JSON header's length (u64, little-endian), then "{". Its first byte
    # can be 0x80 like a pickle's, so a plausible safetensors start is recognised before the pickle magic.
    if len(head) == 9 and head[8:] == b"{" and int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{path}: this is a pickle-based PyTorch file (torch.save). captioner never unpickles checkpoints "
            "because unpickling can run arbitrary code; use a .safetensors checkpoint written by captioner "
            "(captioner.models.checkpoint.save_model)"
        )


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a safetensors file written by `save_tensors` -> (tensors, metadata).

    Raises:
        CheckpointError: missing, pickle-based, damaged, or without captioner metadata.
    """
    path = Path(path)
    problem = file_problem(path, **CHECKPOINT_WORDS)
    if problem:  # a folder: a run folder instead of its best.safetensors? A FIFO would block the read
        raise CheckpointError(f"{path}: {problem}")
    try:
        _refuse_pickle(path)
    except OSError as exc:  # e.g. no read permission: a reading problem, not the disk-full kind of OSError
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: damaged or not a safetensors file ({exc})") from exc
    try:
        metadata = json.loads(raw["json"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: safetensors file without captioner metadata") from exc
    except ValueError as exc:  # a number of more than 4,300 digits: Python's limit on int conversion
        raise CheckpointError(f"{path}: metadata is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise CheckpointError(f"{path}: metadata is nested too deeply") from exc
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: metadata must be a JSON object, got {type(metadata).__name__}")
    return tensors, metadata


def _non_finite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The first tensor holding a NaN or an infinity, by name; None when every weight is finite."""
    return next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def save_model(model: CaptionModel, path: str | Path, half: bool = False) -> None:
    """Write a CaptionModel (fp16 weights when `half`, for shipping).

    Raises:
        CheckpointError: a weight is NaN or infinite (with `half`: beyond fp16's 65504), so the file would not load.
    """
    state = model.decoder.state_dict()
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    bad = _non_finite(state)
    if bad:
        raise CheckpointError(f"{path}: not written: {bad} holds NaN or infinite weights"
                              + (" in fp16 (values beyond 65504)" if half else ""))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": config_to_dict(model.model_cfg),
        "decode": config_to_dict(model.decode_cfg),
        "encoder_dim": model.encoder_dim,
        "vocab": model.vocab.itos,
        "info": model.info,
    }
    save_tensors(path, state, metadata)


def load_model(path: str | Path) -> CaptionModel:
    """Read a checkpoint written by `save_model`; weights come back as float32.

    Raises:
        CheckpointError: see `load_tensors`; also a wrong format or version, or weights that do not fit.
    """
    tensors, meta = load_tensors(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a captioner model checkpoint (format={meta.get('format')!r})")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format version {meta.get('format_version')} is not supported "
                              f"(this captioner reads version {FORMAT_VERSION})")
    try:
        model_cfg = dataclass_from_dict(ModelConfig, meta["model"], "model")
        decode_cfg = dataclass_from_dict(DecodeConfig, meta["decode"], "decode")
        words = meta["vocab"]
        if not (isinstance(words, list) and 4 <= len(words) <= MAX_VOCAB and all(isinstance(w, str) for w in words)):
            raise ValueError(f"vocab must be a list of 4 to {MAX_VOCAB} strings")
        vocab = Vocabulary(words)
        encoder_dim = meta["encoder_dim"]
        if isinstance(encoder_dim, bool) or not isinstance(encoder_dim, int) or not 1 <= encoder_dim <= MAX_WIDTH:
            raise ValueError(f"encoder_dim must be an integer in 1..{MAX_WIDTH}, got {str(encoder_dim)[:40]}")
        if not isinstance(meta.get("info", {}), dict):
            raise ValueError("info must be a JSON object")
    except (KeyError, ValueError, TypeError) as exc:  # ConfigError is a ValueError
        raise CheckpointError(f"{path}: metadata is incomplete or invalid ({exc})") from exc
    # Shapes only: the stored tensors must fit before anything is allocated.
    with torch.device("meta"), NoInit(constants=True):
        shapes = {k: tuple(v.shape) for k, v in new_model(model_cfg, vocab, encoder_dim, decode_cfg)
                  .decoder.state_dict().items()}
    stored = {k: tuple(v.shape) for k, v in tensors.items()}
    if shapes != stored:
        wrong = sorted(set(shapes) ^ set(stored)) or sorted(k for k in shapes if shapes[k] != stored[k])
        raise CheckpointError(f"{path}: weights do not match the stored config (first differences: "
                              f"{', '.join(wrong[:3])})")
    bad = _non_finite(tensors)
    if bad:  # they captioned: NaN scores, one word repeated, and `Caption.ok` true
        raise CheckpointError(f"{path}: {bad} holds NaN or infinite weights")
    model = new_model(model_cfg, vocab, encoder_dim, decode_cfg)  # drawn: training's random stream as it was
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    try:
        model.decoder.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the stored config ({exc})") from exc
    model.decoder.eval()
    model.info = meta.get("info", {})
    return model
