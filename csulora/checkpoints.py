"""Checkpoint references (local folder or Hub id) and lazy, one-shard-at-a-time tensor access."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CsuloraError
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
    """A safetensors checkpoint (single file or shards), validated up front, read lazily."""

    def __init__(self, ref: CheckpointRef, folder: Path, weight_map: dict[str, str], revision: str | None):
        self.ref, self.folder, self.weight_map, self.revision = ref, folder, weight_map, revision
        self._headers: dict[str, Header] = {}
        self._identities: dict[str, str] = {}
        self._reader = TensorReader()

    @classmethod
    def open(cls, ref: CheckpointRef, needed: list[str]) -> Checkpoint:
        """Locate the checkpoint (downloading only the shards that hold ``needed``) and check it has them."""
        if ref.path is not None:
            ckpt = cls(ref, ref.path, _local_weight_map(ref.path), None)
        else:
            ckpt = _open_hub(ref, needed)
        missing = [k for k in needed if k not in ckpt.weight_map]
        if missing:
            raise CsuloraError(
                f"{ref}: has no tensor {missing[0]!r} (and {len(missing) - 1} more) that the adapter targets; "
                "is this the model the adapter was trained on?"
            )
        for shard in sorted({ckpt.weight_map[k] for k in needed}):
            header = ckpt.header(shard)
            absent = [k for k in needed if ckpt.weight_map[k] == shard and k not in header.tensors]
            if absent:
                raise CsuloraError(f"{ckpt.folder / shard}: lacks {absent[0]!r}, which {INDEX} places there")
        return ckpt

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

    def fingerprint(self) -> str:
        """sha256 over the revision and the identities of the opened shards (no full-file hashing)."""
        h = hashlib.sha256((self.revision or "").encode())
        for shard in sorted(self._headers):
            h.update(f"{shard}:{self.shard_identity(shard)}\n".encode())
        return h.hexdigest()

    def close(self) -> None:
        self._reader.close()


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
    raise CsuloraError(
        f"{folder}: no {SINGLE} or {INDEX}; csulora reads safetensors checkpoints (convert .bin weights first)"
    )


def _open_hub(ref: CheckpointRef, needed: list[str]) -> Checkpoint:
    from huggingface_hub import errors, hf_hub_download, snapshot_download

    with _hub_errors(ref):
        try:
            index = Path(hf_hub_download(ref.repo_id, INDEX, revision=ref.revision))
            weight_map = _local_weight_map(index.parent)
            files = [INDEX, *sorted({weight_map[k] for k in needed if k in weight_map})]
        except errors.EntryNotFoundError:
            files = [SINGLE]
        folder = Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=["config.json", *files]))
    return Checkpoint(ref, folder, _local_weight_map(folder), folder.name)


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
