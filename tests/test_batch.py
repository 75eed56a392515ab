"""Batch runs: isolation of failures, subspaces computed once, --shard slices, --skip-existing resumes,
two concurrent batches sharing a cache and an output folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

import csulora.cache as cache_mod
from csulora.batch import find_adapters, is_batch, parse_shard, run_batch, select_shard
from csulora.cache import SubspaceSource
from csulora.cli import app
from csulora.errors import CsuloraError
from csulora.synthetic import SIZES, write_adapter, write_pair
from tests.conftest import REPO

TINY = SIZES["tiny"]
MODULES = len(TINY.linear())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), TINY, spectrum="fine-tune", dtype=torch.bfloat16,
                      shard_bytes=40_000)  # fmt: skip


def _adapters(root, pair, n, corrupt=()):
    for i in range(n):
        folder = write_adapter(root / f"adapter-{i:02d}", TINY, str(pair["aligned"]), r=4, alpha=8, a_std=None,
                               b_std=0.01, seed=i)  # fmt: skip
        if i in corrupt:
            weights = folder / "adapter_model.safetensors"
            weights.write_bytes(weights.read_bytes()[:200])  # truncated
    return root


@pytest.fixture
def svd_calls(monkeypatch):
    calls = []
    real = cache_mod.safety_subspace
    monkeypatch.setattr(cache_mod, "safety_subspace", lambda D, **kw: calls.append(D.shape) or real(D, **kw))
    return calls


def test_twenty_adapters_one_corrupt(pair, tmp_path, svd_calls):
    folder = _adapters(tmp_path / "adapters", pair, 20, corrupt={7})
    outcomes = run_batch([folder], str(pair["aligned"]), None, tmp_path / "out",
                         subspaces=SubspaceSource.open(tmp_path / "cache"))  # fmt: skip
    status = {o.name: o.status for o in outcomes}
    assert sum(s == "ok" for s in status.values()) == 19 and status["adapter-07"] == "failed"
    failed = next(o for o in outcomes if o.status == "failed")
    assert "adapter-07" in failed.message and "re-save" in failed.message
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written == sorted(n for n in status if n != "adapter-07")
    assert all((tmp_path / "out" / n / "adapter_model.safetensors").is_file() for n in written)
    assert len(svd_calls) == MODULES  # subspaces computed once for the whole batch


def test_batch_without_disk_cache_still_computes_once(pair, tmp_path, svd_calls):
    folder = _adapters(tmp_path / "adapters", pair, 3)
    outcomes = run_batch([folder], str(pair["aligned"]), None, tmp_path / "out",
                         subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    assert [o.status for o in outcomes] == ["ok"] * 3 and len(svd_calls) == MODULES


def test_cli_batch_exit_code_and_summary(pair, tmp_path):
    folder = _adapters(tmp_path / "adapters", pair, 3, corrupt={1})
    out = tmp_path / "out"
    args = ["sanitize", "--adapter", str(folder), "--aligned", str(pair["aligned"]), "-o", str(out), "--quiet"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    assert "1 of 3 adapters failed" in result.output and "adapter-01" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["adapter-00", "adapter-02"]
    result = CliRunner().invoke(app, [*args, "--skip-existing", "--json"])  # resume; machine-readable outcomes
    assert result.exit_code == 1
    outcomes = {o["name"]: o for o in json.loads(result.stdout)}
    assert [outcomes[n]["status"] for n in sorted(outcomes)] == ["skipped", "failed", "skipped"]
    # repeated --adapter is a batch too, named by folder
    result = CliRunner().invoke(app, ["sanitize", "--adapter", str(folder / "adapter-00"), "--adapter",
                                      str(folder / "adapter-02"), "--aligned", str(pair["aligned"]),
                                      "-o", str(tmp_path / "two"), "--quiet"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["adapter-00", "adapter-02"]
    report = json.loads((tmp_path / "two" / "adapter-02" / "csulora_report.json").read_text())
    assert report["inputs"]["adapter"]["path"].endswith("adapter-02")


def test_shard_slices_partition_the_batch(pair, tmp_path):
    folder = _adapters(tmp_path / "adapters", pair, 5)
    items = find_adapters([folder])
    slices = [select_shard(items, i, 3) for i in (1, 2, 3)]
    assert sorted(x for s in slices for x in s) == sorted(items)
    assert [len(s) for s in slices] == [2, 2, 1]
    assert select_shard(list(reversed(items)), 2, 3) == slices[1]  # independent of listing order
    cache = SubspaceSource.open(tmp_path / "cache")
    names = []
    for i in (1, 2, 3):
        outcomes = run_batch([folder], str(pair["aligned"]), None, tmp_path / "out", shard=f"{i}/3", subspaces=cache)
        assert [o.name for o in outcomes] == [name for name, _ in slices[i - 1]]
        names += [o.name for o in outcomes if o.status == "ok"]
    assert sorted(names) == sorted(p.name for p in (tmp_path / "out").iterdir()) == [n for n, _ in items]
    for bad in ("0/3", "4/3", "1/0", "a/b", "1"):
        with pytest.raises(CsuloraError, match="--shard"):
            parse_shard(bad)


def test_skip_existing_resumes(pair, tmp_path):
    folder = _adapters(tmp_path / "adapters", pair, 4)
    out = tmp_path / "out"
    cache = SubspaceSource.open(tmp_path / "cache")
    run_batch([folder], str(pair["aligned"]), None, out, subspaces=cache)
    kept = {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in out.iterdir()}
    (out / "adapter-02" / "csulora_report.json").unlink()  # an interrupted or damaged output: redone
    shutil.rmtree(out / "adapter-03")  # never written
    outcomes = run_batch([folder], str(pair["aligned"]), None, out, skip_existing=True, subspaces=cache)
    assert {o.name: o.status for o in outcomes} == {
        "adapter-00": "skipped", "adapter-01": "skipped", "adapter-02": "failed", "adapter-03": "ok",
    }  # fmt: skip
    assert "already exists" in next(o.message for o in outcomes if o.name == "adapter-02")
    for name in ("adapter-00", "adapter-01"):
        assert (out / name / "adapter_model.safetensors").stat().st_mtime_ns == kept[name]
    # without --skip-existing or --force a rerun over existing outputs is one error that names both, before any work
    with pytest.raises(CsuloraError, match="--skip-existing.*--force"):
        run_batch([folder], str(pair["aligned"]), None, out, subspaces=cache)
    outcomes = run_batch([folder], str(pair["aligned"]), None, out, force=True, subspaces=cache)
    assert {o.status for o in outcomes} == {"ok"}
    with pytest.raises(CsuloraError, match="contradict"):
        run_batch([folder], str(pair["aligned"]), None, out, force=True, skip_existing=True, subspaces=cache)


def test_batch_detection_and_names(pair, tmp_path):
    folder = _adapters(tmp_path / "adapters", pair, 2)
    (folder / "notes").mkdir()  # a subfolder without adapter_config.json is not an adapter
    assert is_batch([folder]) and not is_batch([folder / "adapter-00"])
    assert [n for n, _ in find_adapters([folder])] == ["adapter-00", "adapter-01"]
    with pytest.raises(CsuloraError, match="named 'adapter-00'"):
        find_adapters([folder, folder / "adapter-00"])
    with pytest.raises(CsuloraError, match="neither an adapter folder"):
        find_adapters([folder / "notes"])


def test_two_concurrent_batches_share_cache_and_output(pair, tmp_path):
    """Two batch processes on the same adapters, one cache and one output folder: every output is written
    once, whole and correct; the run that loses a race reports it as skipped, not as a failure."""
    folder = _adapters(tmp_path / "adapters", pair, 6)
    out, cache = tmp_path / "out", tmp_path / "cache"
    cmd = [sys.executable, "-m", "csulora", "sanitize", "--adapter", str(folder), "--aligned", str(pair["aligned"]),
           "-o", str(out), "--cache-dir", str(cache), "--skip-existing", "--quiet", "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1] for r in results]
    assert sorted(p.name for p in out.iterdir()) == [f"adapter-{i:02d}" for i in range(6)]  # no temp folders
    serial = tmp_path / "serial"
    run_batch([folder], str(pair["aligned"]), None, serial, subspaces=SubspaceSource.open(tmp_path / "c2"))
    for name in (f"adapter-{i:02d}" for i in range(6)):
        for f in ("adapter_model.safetensors", "csulora_report.json"):
            assert (out / name / f).read_bytes() == (serial / name / f).read_bytes(), (name, f)
    assert not [p for p in cache.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]

