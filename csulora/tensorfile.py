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

from .errors import CsuloraError

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}  # fmt: skip
_TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int = 0  # byte offsets into the data section (after the header)
    end: int = 0


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    digest: str  # sha256 of the length prefix and header bytes: identifies the file's layout cheaply
    size: int
    data_offset: int = 0  # where the data section starts: 8 + header length


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
        tensors[name] = TensorInfo(dtype=dtype, shape=shape, start=start, end=end)
    digest = hashlib.sha256(prefix + raw).hexdigest()
    return Header(tensors=tensors, metadata=dict(metadata), digest=digest, size=size, data_offset=8 + n)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorReader:
    """Reads tensors one at a time into fresh buffers, keeping at most one file open.

    Plain reads, not a memory map: the touched pages of a mapped shard count as resident memory
    until it is unmapped, so a mapped reader's peak RSS grows with the shard size (measured: 1.1 GB
    after reading one 0.9 GB shard through ``safe_open``); this one holds only the tensor it returns.
    """

    def __init__(self) -> None:
        self._path: Path | None = None
        self._file = None
        self._header: Header | None = None

    def get(self, path: Path, name: str) -> torch.Tensor:
        if self._path != path:
            self.close()
            self._header = read_header(path)
            try:
                self._file = open(path, "rb", buffering=0)
            except OSError as e:
                raise CsuloraError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from e
            self._path = path
        info = self._header.tensors.get(name)
        if info is None:
            raise CsuloraError(f"{path}: has no tensor {name!r}; re-save or re-download it")
        dtype = _TORCH_DTYPES.get(info.dtype)
        if dtype is None:
            raise CsuloraError(f"{path}: tensor {name!r} has dtype {info.dtype}, which csulora cannot read")
        buffer = torch.empty(info.end - info.start, dtype=torch.uint8)
        try:
            self._file.seek(self._header.data_offset + info.start)
            view, done = memoryview(buffer.numpy()), 0
            while done < len(view):  # readinto may return short counts on some file systems
                n = self._file.readinto(view[done:])
                if not n:
                    break
                done += n
        except OSError as e:
            raise CsuloraError(f"{path}: cannot read tensor {name!r} ({e.strerror}); re-download it") from e
        if done != len(view):
            raise CsuloraError(f"{path}: tensor {name!r} is cut short; the file is truncated: re-download it")
        return buffer.view(dtype).reshape(info.shape)

    def metadata(self) -> dict[str, str]:
        """The header metadata of the file last read from."""
        return dict(self._header.metadata) if self._header else {}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self._path, self._header = None, None, None


def sort_metadata(path: Path) -> None:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted.

    The safetensors library keeps metadata in a hash map, so ``save_file`` writes its keys in an order
    that changes from process to process; sorted, identical inputs give byte-identical files. The header
    keeps its length (same content, other order; padded with spaces as the format allows).
    """
    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n), object_pairs_hook=dict)
        metadata = header.pop("__metadata__", None)
        ordered = ({"__metadata__": dict(sorted(metadata.items()))} if metadata else {}) | header
        raw = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(raw) > n:  # cannot happen for a header safetensors wrote; leave the file as it is
            return
        f.seek(8)
        f.write(raw + b" " * (n - len(raw)))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
