"""Checkpoint references (local folder or Hub id) and lazy, one-shard-at-a-time tensor access."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CsuloraError
from ..subspace import displacement, squared_norm
from .layouts import Source, Target, resolve
from .tensorfile import Header, TensorInfo, TensorReader, read_header

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class CheckpointRef:
    """What the user named: a local folder, or a Hub repository ``org/name[@revision]``."""

    spec: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def same_as(self, other: CheckpointRef) -> bool:
        if self.path is not None or other.path is not None:
            return self.path == other.path
        return self.repo_id.lower() == other.repo_id.lower() and (self.revision or "main") == (
            other.revision or "main"
        )

    def __str__(self) -> str:
        return self.spec


def parse_ref(spec: str) -> CheckpointRef:
    """A local folder when the path exists, else a Hub id ``org/name[@revision]``."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CsuloraError(f"{spec}: a checkpoint must be a folder (with {SINGLE} or {INDEX}), not a file")
        return CheckpointRef(spec=spec, path=path.resolve())
    repo, _, revision = spec.partition("@")
    if spec.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(repo) or (_ and not revision):
        raise CsuloraError(f"{spec}: no such folder, and not a Hub id of the form org/name[@revision]")
    return CheckpointRef(spec=spec, repo_id=repo, revision=revision or None)


def public_name(spec: str) -> str:
    """What a published file may say of a checkpoint or folder: a Hub id ``org/name[@revision]`` as it is, a local
    path by its last component (a card must not show the user's directory layout)."""
    path = Path(spec).expanduser()
    if not spec.startswith((".", "/", "~")) and _HUB_ID.fullmatch(spec.partition("@")[0]) and not path.exists():
        return spec
    return path.name or spec


@contextlib.contextmanager
def _hub_errors(ref: CheckpointRef) -> Iterator[None]:
    """Turn huggingface_hub failures into one line that says what to do."""
    from huggingface_hub import errors

    name = f"{ref.repo_id}" + (f"@{ref.revision}" if ref.revision else "")
    try:
        yield
    except errors.GatedRepoError as e:
        raise CsuloraError(f"{name}: gated repository; accept its terms on the Hub and set HF_TOKEN") from e
    except errors.RevisionNotFoundError as e:
        raise CsuloraError(f"{name}: revision not found; check the part after '@'") from e
    except errors.RepositoryNotFoundError as e:
        raise CsuloraError(f"{name}: repository not found (or private: set HF_TOKEN); check the id") from e
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled) as e:
        raise CsuloraError(
            f"{name}: not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE or no network); "
            "download it first or pass a local folder"
        ) from e
    except errors.HfHubHTTPError as e:
        raise CsuloraError(f"{name}: Hub request failed ({e.__class__.__name__}); retry or pass a local folder") from e


class Checkpoint:
    """A safetensors checkpoint (single file or shards), validated up front, read lazily.

    ``open`` reads the weight map (on the Hub: the index only); ``require`` fetches and validates the shards
    that hold given tensors; ``read`` returns one module's weight (a tensor, one expert's slice of a stacked
    one, or per-expert tensors fused as the model fuses them: ``layouts.py``)."""

    def __init__(self, ref: CheckpointRef, folder: Path, weight_map: dict[str, str], revision: str | None):
        self.ref, self.folder, self.weight_map, self.revision = ref, folder, weight_map, revision
        self._headers: dict[str, Header] = {}
        self._identities: dict[str, str] = {}
        self._local = threading.local()  # one reader (one open file) per thread that reads (parallel.py)
        self._readers: list[TensorReader] = []
        self._lock = threading.Lock()

    @property
    def _reader(self) -> TensorReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = TensorReader()
            with self._lock:
                self._readers.append(reader)
        return reader

    @classmethod
    def open(cls, ref: CheckpointRef, needed: list[str] | tuple[str, ...] = ()) -> Checkpoint:
        """Locate the checkpoint and check that it holds ``needed`` (fetching only the shards that do)."""
        ckpt = cls(ref, ref.path, _local_weight_map(ref.path), None) if ref.path is not None else _open_hub(ref)
        ckpt.require(needed)
        return ckpt

    def require(self, needed) -> None:
        """Check that every key of ``needed`` is in the weight map and in the header of its shard (on the Hub,
        fetching the shards that hold them first)."""
        missing = [k for k in needed if k not in self.weight_map]
        if missing:
            raise CsuloraError(
                f"{self.ref}: has no tensor {missing[0]!r} (and {len(missing) - 1} more) that the adapter targets; "
                "is this the model the adapter was trained on?"
            )
        shards = sorted({self.weight_map[k] for k in needed})
        if self.ref.path is None and any(not (self.folder / s).is_file() for s in shards):
            _fetch_hub(self.ref, shards)
        for shard in shards:
            header = self.header(shard)
            absent = [k for k in needed if self.weight_map[k] == shard and k not in header.tensors]
            if absent:
                raise CsuloraError(f"{self.folder / shard}: lacks {absent[0]!r}, which {INDEX} places there")

    def source(self, target: Target) -> Source:
        """The checkpoint tensors that hold ``target`` (``layouts.resolve``); bad input when there are none."""
        found = resolve(target, self.weight_map)
        if found is None:
            raise CsuloraError(f"{self.ref}: has no tensor for {target.id} (the adapter targets it); is this the "
                               "model the adapter was trained on?")  # fmt: skip
        return found

    def config(self) -> dict:
        """``config.json`` of the checkpoint ({} when absent or unreadable: only hints are taken from it)."""
        try:
            config = json.loads((self.folder / "config.json").read_text())
        except (OSError, ValueError):
            return {}
        return config if isinstance(config, dict) else {}

    def shape(self, source: Source) -> tuple[int, ...]:
        """The stored shape of a source's weight (a slice drops the expert axis, fused parts stack on dim 0)."""
        shapes = [self.info(k).shape for k in source.keys]
        if source.index is not None:
            shape = shapes[0]
            if len(shape) != 3 or not 0 <= source.index < shape[0]:
                raise CsuloraError(f"{self.ref}: {source.keys[0]} has shape {list(shape)}, which has no expert "
                                   f"{source.index}; is this the model the adapter was trained on?")  # fmt: skip
            return tuple(shape[1:])
        if len(shapes) > 1:
            if any(len(s) != 2 or s[1:] != shapes[0][1:] for s in shapes):
                raise CsuloraError(f"{self.ref}: {', '.join(source.keys)} cannot be fused (shapes "
                                   f"{[list(s) for s in shapes]}); the checkpoint is damaged")  # fmt: skip
            return (sum(s[0] for s in shapes), *shapes[0][1:])
        return tuple(shapes[0])

    def read(self, source: Source) -> torch.Tensor:
        """A source's weight as stored (one expert at a time: a slice reads only that expert's bytes)."""
        if source.index is not None:
            key = source.keys[0]
            return self._reader.get(self.folder / self.weight_map[key], key, index=source.index)
        parts = [self.get(k) for k in source.keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def header(self, shard: str) -> Header:
        if shard not in self._headers:
            path = self.folder / shard
            if not path.is_file():
                raise CsuloraError(f"{path}: shard listed in {INDEX} is missing; re-download the checkpoint")
            self._headers[shard] = read_header(path)
        return self._headers[shard]

    def info(self, key: str) -> TensorInfo:
        return self.header(self.weight_map[key]).tensors[key]

    def get(self, key: str) -> torch.Tensor:
        """One tensor, read from its shard; the previously open shard is closed first if different."""
        return self._reader.get(self.folder / self.weight_map[key], key)

    def shard_identity(self, shard: str) -> str:
        """What identifies a shard's content without reading it.

        Hub snapshot: the blob behind the snapshot's symlink is named by the file's sha256 (LFS) or git
        hash, a content hash. Local folder: resolved path, size and ``mtime_ns`` (what ``make`` trusts;
        a rewrite changes it), plus the header digest, which alone cannot tell base from aligned.
        """
        if shard not in self._identities:
            header, real = self.header(shard), (self.folder / shard).resolve()
            stat = real.stat()
            who = f"blob {real.name}" if self.ref.path is None else f"file {real} {stat.st_mtime_ns}"
            self._identities[shard] = f"{who} {stat.st_size} {header.digest}"
        return self._identities[shard]

    def tensor_fingerprint(self, key: str) -> str:
        """sha256 of one tensor's name and the identity of the shard holding it (a subspace cache key part)."""
        return hashlib.sha256(f"{key}\n{self.shard_identity(self.weight_map[key])}".encode()).hexdigest()

    def source_fingerprint(self, source: Source) -> str:
        """sha256 over the fingerprints of a source's tensors and its slice."""
        parts = [self.tensor_fingerprint(k) for k in source.keys] + [str(source.index)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def fingerprint(self) -> str:
        """sha256 over the revision and the identities of the opened shards (no full-file hashing)."""
        h = hashlib.sha256((self.revision or "").encode())
        for shard in sorted(self._headers):
            h.update(f"{shard}:{self.shard_identity(shard)}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        with self._lock:
            for reader in self._readers:
                reader.close()


def _local_weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError
        except (ValueError, KeyError, TypeError) as e:
            raise CsuloraError(f"{index}: not a valid index (needs a 'weight_map' of tensor → shard)") from e
        bad = sorted({s for s in weight_map.values() if Path(s).name != s or s in ("", ".", "..")})
        if bad:
            raise CsuloraError(f"{index}: shard name {bad[0]!r} points outside the folder; refusing to read it")
        return weight_map
    single = folder / SINGLE
    if single.is_file():
        return {k: SINGLE for k in read_header(single).tensors}
    refuse_adapter(folder)
    raise CsuloraError(
        f"{folder}: no {SINGLE} or {INDEX}; csulora reads safetensors checkpoints (convert .bin weights first)"
    )


def refuse_adapter(folder: Path, option: str = "") -> None:
    """A LoRA adapter folder given where a model checkpoint belongs (``--aligned``, ``--base``) says so."""
    from .adapters import CONFIG

    if (folder / CONFIG).is_file():
        where = f"{option} {folder}" if option else str(folder)
        raise CsuloraError(f"{where}: is a LoRA adapter ({CONFIG}), not a model checkpoint; pass it as --adapter and "
                           "the safety-aligned model as --aligned")  # fmt: skip


def _open_hub(ref: CheckpointRef) -> Checkpoint:
    """The weight map from the index (the shards come later, as needed); a single-file checkpoint is fetched."""
    from huggingface_hub import errors, hf_hub_download

    with _hub_errors(ref):
        try:
            index = Path(hf_hub_download(ref.repo_id, INDEX, revision=ref.revision))
        except errors.EntryNotFoundError:
            index = None
    folder = _fetch_hub(ref, [SINGLE]) if index is None else index.parent  # the snapshot folder
    return Checkpoint(ref, folder, _local_weight_map(folder), folder.name)


def _fetch_hub(ref: CheckpointRef, files: list[str]) -> Path:
    """Fetch ``config.json``, the index (when there is one) and ``files`` of a Hub checkpoint; its folder."""
    from huggingface_hub import snapshot_download

    with _hub_errors(ref):
        return Path(snapshot_download(ref.repo_id, revision=ref.revision,
                                      allow_patterns=["config.json", INDEX, *files]))  # fmt: skip


def card_base_model(ref: CheckpointRef) -> str | None:
    """The ``base_model:`` of a model card's YAML front matter, or None when there is none."""
    from huggingface_hub import hf_hub_download, metadata_load

    if ref.path is not None:
        card = ref.path / "README.md"
    else:
        try:
            card = Path(hf_hub_download(ref.repo_id, "README.md", revision=ref.revision))
        except Exception:  # no card, or not reachable: the caller asks for --base
            return None
    if not card.is_file():
        return None
    try:
        base = (metadata_load(card) or {}).get("base_model")
    except Exception:  # a card with broken YAML names no base
        return None
    if isinstance(base, list):
        base = base[0] if len(base) == 1 else None
    if not (isinstance(base, str) and base):
        return None
    sibling = ref.path.parent / base if ref.path is not None else None
    if sibling is not None and not Path(base).is_absolute() and sibling.is_dir():
        return str(sibling.resolve())  # a local card may name a folder beside the aligned one
    return base


class CheckpointPair:
    """The aligned and base checkpoints of one model, read side by side, one module's weights at a time."""

    def __init__(self, aligned: Checkpoint, base: Checkpoint):
        self.aligned, self.base = aligned, base
        self._sources: dict[Target, tuple[Source, Source]] = {}

    def prepare(self, targets: list[Target]) -> None:
        """Find every target in both checkpoints (their layouts may differ), fetching each one's shards in one
        go, and check that both hold it with one shape."""
        found = {t: (self.aligned.source(t), self.base.source(t)) for t in targets if t not in self._sources}
        for i, ckpt in enumerate((self.aligned, self.base)):
            ckpt.require(sorted({k for pair in found.values() for k in pair[i].keys}))
        for target, (a, b) in found.items():
            shape_a, shape_b = self.aligned.shape(a), self.base.shape(b)
            if shape_a != shape_b:
                raise CsuloraError(f"{target.id}: aligned {self.aligned.ref} has shape {list(shape_a)} but base "
                                   f"{self.base.ref} has {list(shape_b)}; not one architecture")  # fmt: skip
            self._sources[target] = (a, b)

    def sources(self, target: Target) -> tuple[Source, Source]:
        """Where each checkpoint holds ``target`` (``prepare`` finds it on first use)."""
        if target not in self._sources:
            self.prepare([target])
        return self._sources[target]

    def shard(self, target: Target) -> str:
        """The aligned shard that holds (the first part of) ``target``: the order modules are read in."""
        return self.aligned.weight_map[self.sources(target)[0].keys[0]]

    def fingerprint(self, target: Target) -> dict[str, str]:
        a, b = self.sources(target)
        return {"aligned": self.aligned.source_fingerprint(a), "base": self.base.source_fingerprint(b)}

    def displacement(
        self, target: Target, device: torch.device, aligned: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """``D = W_a − W_b`` of one module on ``device`` in ``nn.Linear`` orientation, and ``‖D‖_F²``; NaN or Inf
        is an error. The norm is the one pass over ``D`` that also finds them (the subspace needs it anyway).
        ``aligned``: ``W_a`` as the caller read it already (the file's orientation; any float dtype), not read
        again."""
        a, b = self.sources(target)
        w_aligned = (self.aligned.read(a) if aligned is None else aligned).to(device)
        w_base = self.base.read(b).to(device)
        D = displacement(w_aligned, w_base)
        total = squared_norm(D)
        if not math.isfinite(total):
            for ckpt, w, source in ((self.aligned, w_aligned, a), (self.base, w_base, b)):
                if not torch.isfinite(w).all():
                    raise CsuloraError(
                        f"{ckpt.folder / ckpt.weight_map[source.keys[0]]}: tensor {target.id} has NaN or Inf values; "
                        "re-download the checkpoint"
                    )
            raise CsuloraError(f"{target.id}: aligned − base overflows float32; are these checkpoints of one model?")
        return (D.T if target.transposed else D), total

    def close(self) -> None:
        self.aligned.close()
        self.base.close()
