"""Safetensors files: a validating header reader and a one-tensor-at-a-time reader.

The header is checked before any tensor is touched, so a truncated or lying file fails with
a clear message and no large allocation.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .errors import CsuloraError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    digest: str  # sha256 of the length prefix and header bytes: identifies the file's layout cheaply
    size: int


def read_header(path: Path) -> Header:
    """Read and validate a safetensors header: length, JSON, dtypes, shapes and offsets."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise CsuloraError(f"{path}: not a safetensors file (shorter than 8 bytes); re-save or re-download it")
            (n,) = struct.unpack("<Q", prefix)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise CsuloraError(
                    f"{path}: not a valid safetensors file (header length {n} exceeds the file); "
                    "the file is truncated or of another format: re-save or re-download it"
                )
            raw = f.read(n)
    except OSError as e:
        raise CsuloraError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError) as e:
        raise CsuloraError(f"{path}: unreadable safetensors header; re-save or re-download it") from e
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = 0 <= start <= end <= data_len and all(isinstance(d, int) and d >= 0 for d in shape)
            if ok and dtype in _DTYPE_BYTES:
                ok = (end - start) == _DTYPE_BYTES[dtype] * _numel(shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise CsuloraError(
                f"{path}: tensor {name!r} has an invalid entry (dtype, shape or offsets past the end of the "
                "file); the file is truncated or corrupt: re-save or re-download it"
            )
        tensors[name] = TensorInfo(dtype=dtype, shape=shape)
    digest = hashlib.sha256(prefix + raw).hexdigest()
    return Header(tensors=tensors, metadata=dict(metadata), digest=digest, size=size)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorReader:
    """Reads tensors one at a time, keeping at most one file open (mergekit-style lazy loader)."""

    def __init__(self) -> None:
        self._path: Path | None = None
        self._handle = None

    def get(self, path: Path, name: str) -> torch.Tensor:
        if self._path != path:
            self.close()
            try:
                self._handle = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CsuloraError(f"{path}: cannot open as safetensors ({e}); re-save or re-download it") from e
            self._path = path
        try:
            return self._handle.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CsuloraError(f"{path}: cannot read tensor {name!r} ({e}); re-save or re-download it") from e

    def close(self) -> None:
        self._handle, self._path = None, None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_sorted(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """``safetensors`` file whose bytes depend only on its content (DESIGN.md §7: byte-identical output).

    The library keeps header metadata in a hash map, so its key order (and the file's bytes) changes from
    run to run; the header is rewritten here with sorted keys. Data offsets are relative to the end of
    the header, so the data bytes stay valid as they are.
    """
    data = memoryview(save(tensors, metadata=metadata))
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(bytes(data[8 : 8 + n])), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # keep the data 8-byte aligned, as the library does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.write(data[8 + n :])
