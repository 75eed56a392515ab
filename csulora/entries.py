"""The one on-disk format of a module's safety subspace (DESIGN.md §11), shared by the cache and by packs.

An *entry* is three float32 tensors ``<name>U`` ``(d_out, k)``, ``<name>S`` ``(k,)``, ``<name>V`` ``(d_in, k)`` in a
safetensors file, with ``<name>key``, ``<name>checksum`` (sha256 of the three tensors' bytes), ``<name>total_energy``
(``‖D‖_F²``) and ``<name>captured_energy`` in its header metadata. A cache file holds one entry with the empty
name; a pack shard holds many, each named ``<module>/``. ``write_entries`` is the one writer (bytes that depend
only on the content) and ``read_entry`` the one reader, which checks every part of an entry before trusting it.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from pathlib import Path

import torch

from .errors import CsuloraError
from .io.tensorfile import TensorReader, save_sorted
from .precision import all_finite
from .subspace import Subspace

TENSORS = ("U", "S", "V")
MEMO_BYTES = 512 * 2**20  # checked entries a process keeps for a batch (an 8B pack at k = 8 is 85 MB)


class BadEntry(Exception):
    """An entry that fails a check; the message says which."""


def checksum(U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> str:
    """sha256 over the bytes of ``U``, ``S``, ``V`` in that order."""
    h = hashlib.sha256()
    for t in (U, S, V):
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stored(sub: Subspace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return tuple(t.detach().to("cpu", torch.float32).contiguous() for t in (sub.U, sub.S, sub.V))


def entry_record(sub: Subspace) -> dict:
    """What a manifest repeats of an entry: ``k``, the two energies (exact ``repr``) and the checksum."""
    return {"k": sub.k, "total_energy": repr(float(sub.total_energy)),
            "captured_energy": repr(float(sub.captured_energy)), "checksum": checksum(*_stored(sub))}  # fmt: skip


def write_entries(path: Path, entries: dict[str, tuple[str, Subspace]], metadata: dict[str, str]) -> None:
    """Write ``{name: (key, subspace)}`` and file-level ``metadata`` to ``path`` (the caller makes it atomic)."""
    tensors: dict[str, torch.Tensor] = {}
    meta = dict(metadata)
    for name, (key, sub) in entries.items():
        U, S, V = _stored(sub)
        tensors.update({f"{name}U": U, f"{name}S": S, f"{name}V": V})
        meta.update({f"{name}key": key, f"{name}checksum": checksum(U, S, V),
                     f"{name}total_energy": repr(float(sub.total_energy)),
                     f"{name}captured_energy": repr(float(sub.captured_energy))})  # fmt: skip
    save_sorted(tensors, path, meta)


def read_entry(reader: TensorReader, path: Path, name: str, key: str, shape: tuple[int, int]) -> Subspace:
    """The entry ``name`` of ``path`` whose key must be ``key`` and whose weight has ``shape`` (``d_out, d_in``);
    ``BadEntry`` when anything disagrees: key, dtype, shapes, checksum, non-finite values, energies."""
    try:
        U, S, V = (reader.get(path, f"{name}{t}") for t in TENSORS)
        meta = reader.metadata()
        total, captured = float(meta[f"{name}total_energy"]), float(meta[f"{name}captured_energy"])
        stored_key, stored_sum = meta[f"{name}key"], meta[f"{name}checksum"]
    except (CsuloraError, KeyError, ValueError, RuntimeError) as e:
        raise BadEntry(f"unreadable ({' '.join(str(e).split()) or type(e).__name__})") from e
    if stored_key != key:
        raise BadEntry("its key does not match its sources and settings")
    if not all(t.dtype == torch.float32 for t in (U, S, V)):
        raise BadEntry("not float32")
    d_out, d_in = shape
    if S.ndim != 1 or U.shape != (d_out, S.numel()) or V.shape != (d_in, S.numel()):
        raise BadEntry(f"shapes U {list(U.shape)}, S {list(S.shape)}, V {list(V.shape)} do not fit a weight of "
                       f"{[d_out, d_in]}")  # fmt: skip
    if checksum(U, S, V) != stored_sum:
        raise BadEntry("checksum mismatch (changed tensor bytes)")
    if not all(all_finite(t) for t in (U, S, V)):
        raise BadEntry("non-finite values")
    if not (math.isfinite(total) and 0 <= captured <= total * (1 + 1e-6)):
        raise BadEntry("impossible energies")
    return Subspace(U=U, S=S, V=V, total_energy=total, captured_energy=captured)


class Memo:
    """Entries already read and checked, kept in memory for the next run of a batch: a folder of adapters over one
    pair reads and checksums each entry once. Bounded by ``limit`` bytes, least recently used dropped first."""

    def __init__(self, limit: int = MEMO_BYTES):
        self.limit, self.size = limit, 0
        self._entries: OrderedDict[str, Subspace] = OrderedDict()
        self._lock = threading.Lock()  # module workers share it

    def get(self, key: str) -> Subspace | None:
        with self._lock:
            sub = self._entries.get(key)
            if sub is not None:
                self._entries.move_to_end(key)
            return sub

    def put(self, key: str, sub: Subspace) -> None:
        size = _nbytes(sub)
        if size > self.limit or sub.U.device.type != "cpu":
            return
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = sub
            self.size += size
            while self.size > self.limit:
                _, old = self._entries.popitem(last=False)
                self.size -= _nbytes(old)


def _nbytes(sub: Subspace) -> int:
    return sum(t.numel() * t.element_size() for t in (sub.U, sub.S, sub.V))
