"""The disk cache of what the fast paths build once: exported ONNX encoder graphs and their int8 versions.

Building the fp32 ONNX trunk (a torch.onnx export) took about a second at every start, and quantising it to int8
another; both are pure functions of the trunk's weights, the input size, the library versions and (for int8's
7- or 8-bit weights) the CPU, so they are built once and kept in a folder:

    $CAPTIONER_CACHE_DIR, else $XDG_CACHE_HOME/captioner, else ~/.cache/captioner

Each file is named by a hash of everything it depends on (`key`), so a change of weights, versions or CPU gives a
new name and the old file is simply not read again. Files are written atomically (temp file + rename) and carry
a checksum of their contents: a truncated or damaged file is reported with a warning and built again, never
trusted. Where the folder cannot be made or written, the model is built in memory as before.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from captioner.models.checkpoint import atomic_write_bytes

MAGIC = b"captioner-cache-1\n"
KEEP = 8
"""Built models kept in the folder: the least recently used beyond these are removed after each write."""
_DIGEST = 32  # bytes of blake2b over the payload, stored after MAGIC


def cache_dir() -> Path:
    """Where built models are kept: `$CAPTIONER_CACHE_DIR`, else `$XDG_CACHE_HOME/captioner`, else
    `~/.cache/captioner`."""
    if os.environ.get("CAPTIONER_CACHE_DIR"):
        return Path(os.environ["CAPTIONER_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "captioner"


def weights_digest(module: nn.Module) -> str:
    """A hash of `module`'s state (every tensor's name, dtype, shape and values), about 30 ms for the encoder."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)  # (n,): 0-d tensors cannot be viewed as bytes
        h.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def library_versions() -> str:
    """The versions that shape a built model: torch (the exporter), onnxruntime (its optimiser and quantiser),
    onnx, and captioner itself."""
    from importlib import metadata

    found = []
    for package in ("torch", "onnxruntime", "onnx", "captioner"):
        try:
            found.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package}=none")
    return ",".join(found)


def key(*parts: object) -> str:
    """The cache key of a built model: a hash of `parts` (weights digest, sizes, precision, CPU flags...) and
    of `library_versions()`."""
    text = "\n".join([library_versions(), *map(str, parts)])
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _pack(payload: bytes) -> bytes:
    return MAGIC + hashlib.blake2b(payload, digest_size=_DIGEST).digest() + payload


def _unpack(data: bytes) -> bytes | None:
    """The payload of a cache file, or None when it is not one or its checksum does not match."""
    head = len(MAGIC) + _DIGEST
    if len(data) < head or not data.startswith(MAGIC):
        return None
    payload = data[head:]
    if hashlib.blake2b(payload, digest_size=_DIGEST).digest() != data[len(MAGIC):head]:
        return None
    return payload


def path_for(kind: str, cache_key: str, folder: Path | None = None) -> Path:
    """The file of one built model, e.g. `encoder-fp32-<key>.onnx`."""
    return (folder or cache_dir()) / f"{kind}-{cache_key}.onnx"


def read(path: Path) -> bytes | None:
    """A cached payload, or None when it is absent, unreadable or damaged (damage is warned about).

    Only a regular file is read: a FIFO of that name blocked the read (and so the model's load) for good."""
    try:
        if path.exists() and not path.is_file():
            warnings.warn(f"captioner cache: {path} is not a regular file; building it again", RuntimeWarning,
                          stacklevel=3)
            return None
        data = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        warnings.warn(f"captioner cache: cannot read {path} ({exc}); building it again", RuntimeWarning,
                      stacklevel=3)
        return None
    payload = _unpack(data)
    if payload is None:
        warnings.warn(f"captioner cache: {path} is damaged; building it again", RuntimeWarning, stacklevel=3)
        return None
    try:
        os.utime(path)  # its last use, for `_prune`
    except OSError:
        pass
    return payload


def write(path: Path, payload: bytes) -> bool:
    """Store `payload` atomically; False (and nothing written) where the folder cannot be made or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, _pack(payload))
    except OSError:
        return False  # a read-only home or a full disk: the caller keeps the model in memory
    _prune(path.parent)
    return True


def _prune(folder: Path, keep: int = KEEP) -> None:
    """Remove all but the `keep` most recently used built models (each is 5-20 MB).

    Only files this cache wrote (they start with `MAGIC`) are counted or removed: CAPTIONER_CACHE_DIR may name a
    folder that also holds the user's own .onnx models, and pruning by name alone deleted them."""
    try:
        files = sorted((f for f in folder.glob("*.onnx") if _written_here(f)), key=lambda p: p.stat().st_mtime,
                       reverse=True)
        for old in files[keep:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass  # another process pruning at the same time, or a folder we may not list


def _written_here(path: Path) -> bool:
    """Whether `path` is a regular file that begins as this cache's files do."""
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def load_or_build(kind: str, cache_key: str, build: Callable[[], bytes],
                  use: Callable[[bytes], object]) -> object:
    """`use(model)` for the cached model of `kind` and `cache_key`, else for `build()` (then cached).

    A cached file that reads back but that `use` rejects (an exception) is treated as damaged: warned about,
    built again and overwritten.
    """
    path = path_for(kind, cache_key)
    payload = read(path)
    if payload is not None:
        try:
            return use(payload)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the file, building again fixes it
            warnings.warn(f"captioner cache: {path} could not be used ({exc}); building it again",
                          RuntimeWarning, stacklevel=2)
    payload = build()
    result = use(payload)
    write(path, payload)
    return result
