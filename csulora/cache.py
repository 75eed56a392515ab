"""The subspace cache: each module's safety subspace (DESIGN.md §2) computed once and kept on disk.

An entry (the format of ``entries.py``, which packs share) holds ``U_k``, ``S_k``, ``V_k`` (float32) with
``‖D‖_F²`` and the captured energy in its header metadata, named by a key over both checkpoints' tensor fingerprints,
the module, its orientation and every setting that changes the numbers. Entries are written to a temp file
and moved into place with ``os.replace``, so processes sharing a cache see a whole entry or none; an
entry that fails any check (header, key, shapes, checksum, finite values) is recomputed and rewritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .determinism import fixed_threads
from .entries import BadEntry, Memo, read_entry, write_entries
from .io.checkpoints import CheckpointPair
from .io.layouts import Target
from .io.outputs import replace_file
from .io.tensorfile import TensorReader
from .subspace import FIRST_GUESS, NITER, OVERSAMPLE, Subspace, safety_subspace

CACHE_FORMAT = 2  # 2: keyed by module targets (experts, fused layouts, orientation); entries: entries.py


def default_cache_dir() -> Path:
    """``$CSULORA_CACHE``, else ``$XDG_CACHE_HOME/csulora``, else ``~/.cache/csulora``."""
    if os.environ.get("CSULORA_CACHE"):
        return Path(os.environ["CSULORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "csulora"
    return Path.home() / ".cache" / "csulora"


@dataclass(frozen=True)
class SubspaceParams:
    """Everything besides the two weights that determines a subspace."""

    rank: int | None
    energy: float
    max_rank: int
    exact: bool
    seed: int

    def to_dict(self) -> dict:
        return {
            "rank": self.rank, "energy": self.energy, "max_rank": self.max_rank, "exact": self.exact,
            "seed": self.seed,
            "algorithm": f"halko rsvd oversample={OVERSAMPLE} niter={NITER} first={FIRST_GUESS}",
        }  # fmt: skip


def entry_key(pair: CheckpointPair, target: Target, params: SubspaceParams) -> str:
    """sha256 over the cache format, both weights' fingerprints, the module, its orientation and the settings."""
    payload = {
        "format": CACHE_FORMAT,
        **pair.fingerprint(target),
        "module": target.id,
        "transposed": target.transposed,
        **params.to_dict(),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class SubspaceCache:
    """A folder of entries ``<root>/<key[:2]>/<key>.safetensors``, each one entry of ``entries.py`` (the format
    packs use too) with the empty name."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.corrupt = 0  # entries found damaged (then recomputed and rewritten)
        self.write_errors: list[str] = []

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str, shape: tuple[int, int]) -> Subspace | None:
        """The entry for ``key`` if present and sound; ``None`` when absent or damaged."""
        path = self.path(key)
        if not path.is_file():
            return None
        reader = TensorReader()
        try:
            return read_entry(reader, path, "", key, shape)
        except BadEntry:
            self.corrupt += 1
            return None
        finally:
            reader.close()

    def store(self, key: str, sub: Subspace, device: str) -> None:
        """Write the entry atomically; a cache that cannot be written is reported, never fatal."""
        path = self.path(key)
        meta = {"format": str(CACHE_FORMAT), "device": device}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, lambda tmp: write_entries(tmp, {"": (key, sub)}, meta))
        except OSError as e:
            self.write_errors.append(f"{path}: {e.strerror or e}")


@dataclass
class SubspaceSource:
    """Where each module's subspace comes from: the cache when it holds a sound entry, else the SVD of ``D``
    (then stored). One source can serve many runs (a batch); its counters say what happened."""

    cache: SubspaceCache | None
    computed: int = 0
    loaded: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # workers count concurrently
    _memo: Memo = field(default_factory=Memo, repr=False)  # entries already checked, for the batch's next adapter

    def _count(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    @classmethod
    def open(cls, cache_dir: str | Path | None = None, enabled: bool = True) -> SubspaceSource:
        return cls(SubspaceCache(Path(cache_dir) if cache_dir else default_cache_dir()) if enabled else None)

    def get(
        self, pair: CheckpointPair, target: Target, params: SubspaceParams, device: torch.device,
        displacement: tuple[torch.Tensor, float] | None = None, aligned: torch.Tensor | None = None,
    ) -> tuple[Subspace, bool]:
        """The subspace of one module on ``device``, and whether it came from the cache. ``displacement``: the
        module's ``(D, ‖D‖²)`` when the caller has read it already (a missing entry then costs no second read);
        ``aligned``: its aligned weight, likewise (``CheckpointPair.displacement``)."""
        shape = pair.aligned.shape(pair.sources(target)[0])
        shape = shape[::-1] if target.transposed else shape
        key = entry_key(pair, target, params) if self.cache else None
        sub = (self._memo.get(key) or self.cache.load(key, shape)) if self.cache else None
        if sub is not None:
            self._memo.put(key, sub)
            self._count("loaded")
            return Subspace(sub.U.to(device), sub.S.to(device), sub.V.to(device), sub.total_energy,
                            sub.captured_energy), True  # fmt: skip
        if displacement is None:
            sub = compute_subspace(pair, target, params, device, aligned)
        else:
            with fixed_threads():
                sub = subspace_of(*displacement, params)
        self._count("computed")
        if self.cache:
            self.cache.store(key, sub, device.type)
            self._memo.put(key, sub)
        return sub, False


class Held:
    """A source whose subspaces, once served, are kept for the rest of one run: the size rule's two passes over an
    adapter's modules (api.py) read or compute each once, and the source's counters count it once. At k = 8 an 8B
    model's subspaces are 85 MB."""

    def __init__(self, source: SubspaceSource):
        self.source, self.subs = source, {}

    def get(self, pair: CheckpointPair, target: Target, params: SubspaceParams, device: torch.device,
            displacement=None, aligned=None) -> tuple[Subspace, bool]:  # fmt: skip
        held = self.subs.get(target)
        if held is not None:
            return held
        self.subs[target] = found = self.source.get(pair, target, params, device, displacement, aligned)
        return found


def compute_subspace(
    pair: CheckpointPair, target: Target, params: SubspaceParams, device: torch.device,
    aligned: torch.Tensor | None = None,
) -> Subspace:
    """Read one module's two weights (the aligned one unless given), form ``D`` on ``device``, take its safety
    subspace, free ``D``."""
    with fixed_threads():  # the same bytes whatever the thread count (determinism.py), cached or not
        D, total = pair.displacement(target, device, aligned)
        sub = subspace_of(D, total, params)
        del D
    return sub


def subspace_of(D: torch.Tensor, total: float, params: SubspaceParams) -> Subspace:
    """The safety subspace (§2) of ``D`` (``‖D‖² = total``) with ``params``, its factors contiguous (to store)."""
    sub = safety_subspace(D, rank=params.rank, energy=params.energy, max_rank=params.max_rank, exact=params.exact,
                          seed=params.seed, total=total)  # fmt: skip
    return Subspace(sub.U.contiguous(), sub.S.contiguous(), sub.V.contiguous(), sub.total_energy,
                    sub.captured_energy)  # fmt: skip
