"""The subspace cache: keys, invalidation, corruption recovery, determinism of cold and warm runs,
concurrent writers; the fingerprints behind the keys; the reader that feeds them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import csulora.cache as cache_mod
from csulora.api import Settings, audit, precompute_subspaces, sanitize
from csulora.cache import SubspaceCache, SubspaceSource, default_cache_dir
from csulora.cli import app
from csulora.io.checkpoints import Checkpoint, parse_ref
from csulora.io.tensorfile import TensorReader
from csulora.synthetic import SIZES, write_adapter, write_pair
from tests.conftest import REPO

TINY = SIZES["tiny"]
MODULES = len(TINY.linear())  # 14


@pytest.fixture
def pair(tmp_path):
    paths = write_pair(tmp_path / "pair", TINY, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=40_000)
    paths["adapter"] = write_adapter(tmp_path / "adapter", TINY, str(paths["aligned"]), r=4, alpha=8, a_std=None,
                                     b_std=0.01)  # fmt: skip
    return paths


def _source(tmp_path, name="cache") -> SubspaceSource:
    return SubspaceSource.open(tmp_path / name)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CSULORA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "a"
    monkeypatch.delenv("CSULORA_CACHE")
    assert default_cache_dir() == tmp_path / "x" / "csulora"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "csulora"


def test_fingerprints_tell_base_from_aligned(pair):
    """Base and aligned of one architecture have identical headers: the identity must still differ."""
    key = "model.layers.0.self_attn.q_proj.weight"
    base, aligned = (Checkpoint.open(parse_ref(str(pair[k])), [key]) for k in ("base", "aligned"))
    shard = base.weight_map[key]
    assert base.header(shard).digest == aligned.header(shard).digest  # what the old fingerprint hashed
    assert base.tensor_fingerprint(key) != aligned.tensor_fingerprint(key)
    assert base.fingerprint() != aligned.fingerprint()


def test_cold_warm_and_uncached_runs_give_identical_outputs(pair, tmp_path):
    source = _source(tmp_path)
    cold = sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "cold", subspaces=source)
    assert (source.computed, source.loaded) == (MODULES, 0)
    warm_source = _source(tmp_path)
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "warm", subspaces=warm_source)
    assert (warm_source.computed, warm_source.loaded) == (0, MODULES)
    uncached = SubspaceSource.open(enabled=False)
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "none", subspaces=uncached)
    for name in ("adapter_model.safetensors", "csulora_report.json", "csulora_report.md"):
        cold_bytes = (tmp_path / "cold" / name).read_bytes()
        assert cold_bytes == (tmp_path / "warm" / name).read_bytes() == (tmp_path / "none" / name).read_bytes(), name
    assert "approximate" in json.loads((tmp_path / "cold" / "csulora_report.json").read_text())["safe_lora_score_basis"]
    assert any(m.k > 0 for m in cold.report.modules)


def test_warm_run_reads_no_checkpoint_tensor(pair, tmp_path, monkeypatch):
    source = _source(tmp_path)
    audit(pair["adapter"], str(pair["aligned"]), subspaces=source)

    def refuse(self, key):
        raise AssertionError(f"read {key} although the cache holds its subspace")

    monkeypatch.setattr(Checkpoint, "get", refuse)
    audit(pair["adapter"], str(pair["aligned"]), subspaces=_source(tmp_path))


def test_different_settings_miss(pair, tmp_path):
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "a", subspaces=_source(tmp_path))
    for settings in [Settings(seed=1), Settings(subspace_energy=0.7), Settings(subspace_rank=3),
                     Settings(max_subspace_rank=2), Settings(exact_svd=True)]:  # fmt: skip
        source = _source(tmp_path)
        audit(pair["adapter"], str(pair["aligned"]), settings=settings, subspaces=source)
        assert (source.computed, source.loaded) == (MODULES, 0), settings
    # λ does not change a subspace: a hit
    source = _source(tmp_path)
    audit(pair["adapter"], str(pair["aligned"]), settings=Settings(lam=3.0), subspaces=source)
    assert (source.computed, source.loaded) == (0, MODULES)


def test_changed_checkpoint_invalidates(pair, tmp_path):
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "before", subspaces=_source(tmp_path))
    index = json.loads((pair["aligned"] / "model.safetensors.index.json").read_text())["weight_map"]
    key = "model.layers.1.mlp.down_proj.weight"
    shard = pair["aligned"] / index[key]
    tensors = load_file(shard)
    tensors[key] = tensors[key] + 0.01 * torch.randn_like(tensors[key])  # same names, shapes, dtypes: same header
    save_file(tensors, str(shard), metadata={"format": "pt"})
    in_shard = sum(index[f"{m}.weight"] == index[key] for m in TINY.linear())
    source = _source(tmp_path)
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "after", subspaces=source)
    assert (source.computed, source.loaded) == (in_shard, MODULES - in_shard)
    before = json.loads((tmp_path / "before" / "csulora_report.json").read_text())
    after = json.loads((tmp_path / "after" / "csulora_report.json").read_text())
    norms = [{m["module"]: m["displacement_norm"] for m in r["modules"]} for r in (before, after)]
    assert norms[0]["model.layers.1.mlp.down_proj"] != norms[1]["model.layers.1.mlp.down_proj"]
    # a copy elsewhere (other path) or a touched file (other mtime) is not trusted either
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    source = _source(tmp_path)
    audit(pair["adapter"], str(pair["aligned"]), subspaces=source)
    assert source.computed == in_shard


def test_corrupt_entries_are_recomputed(pair, tmp_path):
    source = _source(tmp_path)
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "clean", subspaces=source)
    entries = sorted(source.cache.root.rglob("*.safetensors"))
    assert len(entries) == MODULES
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    raw = bytearray(entries[1].read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the data: only the checksum sees it
    entries[1].write_bytes(bytes(raw))
    entries[2].write_text("not a safetensors file")
    t = load_file(entries[3])  # a sound file under the wrong name (a key collision or a copy)
    save_file(t, str(entries[3]), metadata=load_file_meta(entries[4]))
    source = _source(tmp_path)
    sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "recovered", subspaces=source)
    assert (source.computed, source.loaded, source.cache.corrupt) == (4, MODULES - 4, 4)
    for name in ("adapter_model.safetensors", "csulora_report.json"):
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "recovered" / name).read_bytes()
    source = _source(tmp_path)  # rewritten: all sound again
    audit(pair["adapter"], str(pair["aligned"]), subspaces=source)
    assert (source.loaded, source.cache.corrupt) == (MODULES, 0)


def load_file_meta(path):
    reader = TensorReader()
    reader.get(path, "S")
    return reader.metadata()


def test_unwritable_cache_is_not_fatal(pair, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    source = SubspaceSource.open(blocker / "cache")  # a folder below a file cannot be created
    result = sanitize(pair["adapter"], str(pair["aligned"]), output=tmp_path / "out", subspaces=source)
    assert result.output.is_dir() and source.computed == MODULES and source.cache.write_errors


def test_subspace_command_precomputes_for_later_runs(pair, tmp_path):
    cache = tmp_path / "shared"
    args = ["subspace", "--aligned", str(pair["aligned"]), "--base", str(pair["base"]), "--modules", "q_proj,down_proj"]
    result = CliRunner().invoke(app, [*args, "--cache-dir", str(cache), "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(list(cache.rglob("*.safetensors"))) == 2 * TINY.layers
    assert "4 computed" in result.output
    rows = precompute_subspaces(str(pair["aligned"]), str(pair["base"]), subspaces=SubspaceSource.open(cache))
    assert len(rows) == MODULES and sum(r.cached for r in rows) == 2 * TINY.layers
    source = SubspaceSource.open(cache)
    audit(pair["adapter"], str(pair["aligned"]), subspaces=source)
    assert (source.computed, source.loaded) == (0, MODULES)


def test_concurrent_writers_leave_a_sound_cache(pair, tmp_path):
    """Two processes computing the same entries at once: every entry whole, no temp file left."""
    cache = tmp_path / "shared"
    cmd = [sys.executable, "-m", "csulora", "subspace", "--aligned", str(pair["aligned"]), "--base",
           str(pair["base"]), "--cache-dir", str(cache), "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    assert sorted(p.name for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")) == []
    source = SubspaceSource.open(cache)
    audit(pair["adapter"], str(pair["aligned"]), subspaces=source)
    assert (source.loaded, source.cache.corrupt) == (MODULES, 0)


def test_cli_no_cache_and_cache_dir(pair, tmp_path):
    cache = tmp_path / "c"
    args = ["audit", "--adapter", str(pair["adapter"]), "--aligned", str(pair["aligned"]), "--cache-dir", str(cache)]
    result = CliRunner().invoke(app, [*args, "--no-cache", "--quiet"])
    assert result.exit_code == 0, result.output
    assert not cache.exists()
    result = CliRunner().invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert len(list(cache.rglob("*.safetensors"))) == MODULES


def test_svd_counted_once_per_module(pair, tmp_path, monkeypatch):
    calls = []
    real = cache_mod.safety_subspace
    monkeypatch.setattr(cache_mod, "safety_subspace", lambda D, **kw: calls.append(D.shape) or real(D, **kw))
    for _ in range(3):
        audit(pair["adapter"], str(pair["aligned"]), subspaces=_source(tmp_path))
    assert len(calls) == MODULES


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_match_cpu(pair, tmp_path):
    """The SVD and projections run on the GPU; results equal the CPU path within float tolerance."""
    ref = audit(pair["adapter"], str(pair["aligned"]), settings=Settings(device="cpu"),
                subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    other = audit(pair["adapter"], str(pair["aligned"]), settings=Settings(device="cuda"),
                  subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    for a, b in zip(ref.report.modules, other.report.modules, strict=True):
        assert a.k == b.k
        assert b.gamma_in == pytest.approx(a.gamma_in, rel=1e-4)
        assert b.gamma_out == pytest.approx(a.gamma_out, rel=1e-4)
        assert b.safe_lora_score == pytest.approx(a.safe_lora_score, abs=1e-4)


def test_device_auto_picks_cuda_only_when_present():
    assert Settings(device="auto").torch_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert Settings(device="cpu").torch_device().type == "cpu"


def test_reader_matches_safetensors(tmp_path):
    tensors = {
        "bf16": torch.randn(7, 5).bfloat16(), "f16": torch.randn(3).half(), "f32": torch.randn(2, 3, 4),
        "i64": torch.arange(6), "bool": torch.tensor([True, False]), "empty": torch.zeros(0, 4),
    }  # fmt: skip
    save_file(tensors, str(tmp_path / "t.safetensors"))
    reader = TensorReader()
    for name, t in load_file(tmp_path / "t.safetensors").items():
        got = reader.get(tmp_path / "t.safetensors", name)
        assert got.dtype == t.dtype and torch.equal(got, t), name
    reader.close()


def test_cache_entry_layout(pair, tmp_path):
    source = _source(tmp_path)
    audit(pair["adapter"], str(pair["aligned"]), subspaces=source)
    entry = next(source.cache.root.rglob("*.safetensors"))
    meta = load_file_meta(entry)
    assert meta["key"] == entry.stem and set(load_file(entry)) == {"U", "S", "V"}
    assert float(meta["captured_energy"]) <= float(meta["total_energy"])
    assert SubspaceCache(source.cache.root).load(meta["key"], (1, 1)) is None  # wrong shape: not trusted
