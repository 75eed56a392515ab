"""Hub references: only config, index and the shards holding targeted tensors are fetched, and cache keys
use the content hashes that name the blobs behind a snapshot's symlinks. huggingface_hub is replaced by a
fake that serves a local "remote" into a real cache layout (blobs/ + snapshots/<commit>/ symlinks)."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import errors

from csulora.api import audit
from csulora.cache import SubspaceSource
from csulora.io.checkpoints import Checkpoint, parse_ref
from csulora.synthetic import SIZES, write_adapter, write_pair

TINY = SIZES["tiny"]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self, remotes: dict[str, Path], cache: Path):
        self.remotes, self.cache = remotes, cache
        self.fetched: dict[str, set[str]] = {repo: set() for repo in remotes}
        self.patterns: list[list[str]] = []

    def _snapshot(self, repo_id: str) -> Path:
        return self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT

    def _fetch(self, repo_id: str, filename: str) -> Path:
        data = (self.remotes[repo_id] / filename).read_bytes()
        blob = self.cache / f"models--{repo_id.replace('/', '--')}" / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = self._snapshot(repo_id) / filename
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():
            os.symlink(os.path.relpath(blob, link.parent), link)
        self.fetched[repo_id].add(filename)
        return link

    def hf_hub_download(self, repo_id, filename, revision=None, **kwargs):
        if not (self.remotes[repo_id] / filename).is_file():
            raise errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(self._fetch(repo_id, filename))

    def snapshot_download(self, repo_id, revision=None, allow_patterns=None, **kwargs):
        self.patterns.append(list(allow_patterns))
        for f in sorted(os.listdir(self.remotes[repo_id])):
            if any(fnmatch.fnmatch(f, p) for p in allow_patterns):
                self._fetch(repo_id, f)
        return str(self._snapshot(repo_id))


@pytest.fixture
def hub(tmp_path, monkeypatch):
    pair = write_pair(tmp_path / "remote", TINY, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=20_000)
    fake = FakeHub({"org/base": pair["base"], "org/aligned": pair["aligned"]}, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.chdir(tmp_path)  # "org/aligned" must not name a local folder
    return fake, pair


def test_only_shards_with_targeted_tensors_are_fetched(hub, tmp_path):
    fake, pair = hub
    adapter = write_adapter(tmp_path / "adapter", TINY, "org/aligned", r=4, alpha=8, a_std=None, b_std=0.01,
                            targets=("self_attn.q_proj",))  # fmt: skip
    source = SubspaceSource.open(tmp_path / "cache")
    result = audit(adapter, "org/aligned", base="org/base", subspaces=source)
    assert len(result.report.modules) == TINY.layers
    weight_map = json.loads((pair["aligned"] / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {weight_map[f"model.layers.{i}.self_attn.q_proj.weight"] for i in range(TINY.layers)}
    all_shards = set(weight_map.values())
    assert needed < all_shards, "the fixture must leave some shards unneeded"
    for repo in ("org/base", "org/aligned"):
        shards = {f for f in fake.fetched[repo] if f.endswith(".safetensors")}
        assert shards == needed, repo
    assert all(set(p) == {"config.json", "model.safetensors.index.json", *needed} for p in fake.patterns)


def test_hub_fingerprint_is_the_blob_content_hash(hub, tmp_path):
    fake, pair = hub
    key = "model.layers.0.self_attn.q_proj.weight"
    ckpt = Checkpoint.open(parse_ref("org/aligned"), [key])
    shard = ckpt.weight_map[key]
    sha = hashlib.sha256((pair["aligned"] / shard).read_bytes()).hexdigest()
    assert ckpt.shard_identity(shard).startswith(f"blob {sha} ")
    assert ckpt.revision == COMMIT
    base = Checkpoint.open(parse_ref("org/base"), [key])
    assert base.tensor_fingerprint(key) != ckpt.tensor_fingerprint(key)
