"""Subspace packs (DESIGN.md §11): a pack of a shipped world serves sanitize/audit/sweep byte-identically to the
checkpoints (realign, csulora, resta; experts and DoRA), refuses what it cannot serve, and every kind of
tampering is bad input with nothing written; ``subspace verify`` catches a forged pack; from the Hub only the
manifest and the shards holding the adapter's modules are fetched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub
import jsonschema
import pytest
import torch
from safetensors import safe_open

from csulora import pack as pack_module
from csulora.api import audit, sanitize
from csulora.cache import SubspaceSource
from csulora.entries import write_entries
from csulora.io.tensorfile import TensorReader
from csulora.pack import MANIFEST, PackSource, _digest, build_pack
from csulora.settings import Settings
from csulora.subspace import Subspace
from csulora.synthetic import SIZES, write_adapter, write_pair
from csulora.world import world_dir
from tests.conftest import REPO, assert_one_line_error, folder_bytes
from tests.conftest import run_cli as _run_cli
from tests.test_hub import FakeHub


def run_cli(*args):
    return _run_cli(*args, in_process=True)


def _world(name: str) -> Path:
    return world_dir(name)


@pytest.fixture(scope="module")
def packs(tmp_path_factory) -> dict[str, Path]:
    """A rank-8 pack of the tiny and the moe world, built without the cache."""
    root = tmp_path_factory.mktemp("packs")
    found = {}
    for name in ("tiny", "moe"):
        w = _world(name)
        build_pack(str(w / "llama-world-chat"), str(w / "llama-world"), root / name, settings=Settings(subspace_rank=8),
                   subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
        found[name] = root / name
    return found


CASES = [("tiny", "adv-r8-all-s0"), ("tiny", "adv-r8-all-dora-s0"), ("tiny", "adv-r4-attn-s0"),
         ("moe", "adv-r8-all-linear-s0")]  # fmt: skip


@pytest.mark.parametrize(("world", "adapter"), CASES)
@pytest.mark.parametrize("method", ["realign", "csulora", "resta"])
def test_pack_output_is_byte_identical_to_checkpoints(packs, tmp_path, world, adapter, method):
    w = _world(world)
    settings = Settings(method=method, subspace_rank=8)
    path = w / "adapters" / adapter
    sanitize(path, str(w / "llama-world-chat"), str(w / "llama-world"), tmp_path / "ckpt", settings=settings,
             subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    source = PackSource.open(str(packs[world]))
    sanitize(path, None, None, tmp_path / "pack", settings=Settings(method=method), subspaces=source)
    assert source.loaded > 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (tmp_path / "pack" / name).read_bytes(), name
    a, b = (json.loads((tmp_path / d / "csulora_report.json").read_text()) for d in ("ckpt", "pack"))
    assert a["modules"] == b["modules"] and a["totals"] == b["totals"] and a["settings"] == b["settings"]
    assert any(m["kind"] == "expert" for m in a["modules"]) == (world == "moe")
    jsonschema.validate(b, json.loads((REPO / "csulora" / "report.schema.json").read_text()))
    pack = b["inputs"]["subspace"]
    assert pack["ref"] == str(packs[world]) and len(pack["manifest_sha256"]) == 64
    assert "subspace" not in a["inputs"]
    for name in ("csulora_report.md", "csulora_report.html", "README.md"):
        text = (tmp_path / "pack" / name).read_text()
        assert pack["manifest_sha256"] in text and "computed from D_k" in text, name


def test_pack_is_reproducible_and_shares_the_cache_format(tmp_path):
    w = _world("tiny")
    cache = SubspaceSource.open(tmp_path / "cache")
    args = (str(w / "llama-world-chat"), str(w / "llama-world"))
    first = build_pack(*args, tmp_path / "a", settings=Settings(subspace_rank=8), subspaces=cache)
    before = folder_bytes(tmp_path / "a")
    second = build_pack(*args, tmp_path / "a", settings=Settings(subspace_rank=8), subspaces=cache, force=True)
    assert (first.computed, second.loaded) == (first.modules, first.modules)  # the second came from the cache
    assert folder_bytes(tmp_path / "a") == before
    manifest = json.loads((tmp_path / "a" / MANIFEST).read_text())
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: csulora" in card and f"base_model: {json.dumps(args[0])}" in card
    assert manifest["settings"]["rank"] == 8 and manifest["aligned"]["ref"] == args[0]
    assert all(s["aligned"].startswith("sha256:") and s["aligned"] != s["base"] for s in manifest["sources"].values())
    # a cache entry and a pack entry hold the same tensors under the same names, prefixed by the module in a pack
    module = manifest["modules"][0]
    entry = next((tmp_path / "cache").rglob("*.safetensors"))
    with safe_open(entry, "pt") as f:
        cache_names = set(f.keys())
    with safe_open(tmp_path / "a" / module["shard"], "pt") as f:
        pack_names = {k.removeprefix(module["id"] + "/") for k in f.keys() if k.startswith(module["id"] + "/")}
    assert cache_names == pack_names == {"U", "S", "V"}


def test_narrowed_pack_and_refusals(packs, tmp_path):
    w = _world("tiny")
    attn = tmp_path / "attn"
    r = run_cli("subspace", "--aligned", w / "llama-world-chat", "--base", w / "llama-world", "--modules",
                "q_proj,v_proj", "--subspace-rank", "8", "-o", attn, "--no-cache")  # fmt: skip
    assert r.returncode == 0, r.stderr
    modules = json.loads((attn / MANIFEST).read_text())["modules"]
    assert {m["id"].split(".")[-2] for m in modules} == {"q_proj", "v_proj"}
    adapter, out = w / "adapters" / "adv-r8-all-s0", tmp_path / "out"
    pack = str(packs["tiny"])
    cases = [
        (("--subspace", attn), ("the pack has no module for", "mlp")),  # a target the pack lacks
        (("--subspace", pack, "--method", "safe-lora"), ("safe-lora", "whole displacement D")),
        (("--subspace", pack, "--subspace-rank", "4"), ("serves rank 8", "not rank 4")),
        (("--subspace", pack, "--exact-svd"), ("serves rank 8", "exact SVD")),
        (("--subspace", pack, "--aligned", w / "llama-world-chat"), ("replaces --aligned",)),
    ]
    for extra, needles in cases:
        r = run_cli("sanitize", "--adapter", adapter, "-o", out, *extra)
        assert_one_line_error(r, *needles)
        assert not out.exists()
    r = run_cli("sanitize", "--model", w / "full" / "full-harmful-s0", "--subspace", pack, "-o", out)
    assert_one_line_error(r, "--model needs the aligned weights")
    r = run_cli("sweep", "--adapter", adapter, "--subspace", pack, "--method", "safe-lora", "-o", out)
    assert_one_line_error(r, "safe-lora")
    r = run_cli("sanitize", "--adapter", w / "adapters" / "adv-r8-attn-head-s0", "--subspace", pack, "-o", out)
    assert_one_line_error(r, "saves full weights", "lm_head")
    assert not out.exists()


def test_adapter_of_another_model_needs_the_override(packs, tmp_path):
    w = _world("tiny")
    other = tmp_path / "other"
    shutil.copytree(w / "adapters" / "adv-r8-all-s0", other)
    config = json.loads((other / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "meta-llama/Llama-3.2-1B-Instruct"
    (other / "adapter_config.json").write_text(json.dumps(config))
    r = run_cli("audit", "--adapter", other, "--subspace", packs["tiny"])
    assert_one_line_error(r, "meta-llama/Llama-3.2-1B-Instruct", "llama-world-chat", "--accept-pack-mismatch")
    r = run_cli("audit", "--adapter", other, "--subspace", packs["tiny"], "--accept-pack-mismatch", "-q")
    assert r.returncode == 0, r.stderr


def _copy(pack: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "pack"
    shutil.copytree(pack, dst)
    return dst


def _rewrite_manifest(pack: Path, change) -> None:
    manifest = json.loads((pack / MANIFEST).read_text())
    change(manifest)
    manifest["content_digest"] = _digest(manifest)  # a consistent forgery, not a damaged file
    (pack / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _entries(shard: Path) -> tuple[dict[str, tuple[str, Subspace]], dict[str, str]]:
    """A pack shard's entries and its file metadata, read back (to forge a changed one)."""
    reader = TensorReader()
    with safe_open(shard, "pt") as f:
        names = sorted({k.rpartition("/")[0] for k in f.keys()})
        meta = f.metadata()
    entries = {}
    for n in names:
        U, S, V = (reader.get(shard, f"{n}/{t}") for t in "USV")
        entries[f"{n}/"] = (meta[f"{n}/key"], Subspace(U, S, V, float(meta[f"{n}/total_energy"]),
                                                        float(meta[f"{n}/captured_energy"])))  # fmt: skip
    reader.close()
    return entries, {k: v for k, v in meta.items() if "/" not in k}


def _flip_byte(pack: Path, m: dict) -> None:
    shard = pack / m["shard"]
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x10  # the last tensor's bytes; the header and manifest are unchanged
    shard.write_bytes(bytes(raw))


def _lying_header(pack: Path, m: dict) -> None:
    entries, meta = _entries(pack / m["shard"])
    key, sub = entries[m["id"] + "/"]
    entries[m["id"] + "/"] = (key, Subspace(sub.U, sub.S, sub.V, sub.total_energy * 4, sub.captured_energy))
    write_entries(pack / m["shard"], entries, meta)


def _edit_manifest(pack: Path, m: dict) -> None:
    text = (pack / MANIFEST).read_text()
    (pack / MANIFEST).write_text(text.replace(m["total_energy"], repr(float(m["total_energy"]) / 2), 1))


def _missing_shard(pack: Path, m: dict) -> None:
    (pack / m["shard"]).unlink()


def _forged_fingerprint(pack: Path, m: dict) -> None:
    """The manifest claims other source tensors (and re-seals its digest): the entry's key no longer fits it."""
    _rewrite_manifest(pack, lambda man: man["sources"][m["sources"][0]].update(aligned="sha256:" + "0" * 64))


@pytest.mark.parametrize(("tamper", "needles"), [
    (_flip_byte, ("checksum mismatch",)),
    (_lying_header, ("header disagrees with the manifest",)),
    (_edit_manifest, ("edited or damaged",)),
    (_missing_shard, ("shard of the pack is missing",)),
    (_forged_fingerprint, ("key does not match",)),
])  # fmt: skip
def test_tampered_pack_is_refused_and_nothing_written(packs, tmp_path, tamper, needles):
    pack = _copy(packs["tiny"], tmp_path)
    modules = json.loads((pack / MANIFEST).read_text())["modules"]
    m = next(x for x in modules if x["id"].endswith("layers.1.self_attn.v_proj.weight"))
    tamper(pack, m)
    out = tmp_path / "out"
    r = run_cli("sanitize", "--adapter", _world("tiny") / "adapters" / "adv-r8-all-s0", "--subspace", pack, "-o", out)
    assert_one_line_error(r, *needles)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_verify_catches_a_forged_pack_and_another_pair(packs, tmp_path):
    w = _world("tiny")
    pair = ("--aligned", w / "llama-world-chat", "--base", w / "llama-world")
    r = run_cli("subspace", "verify", packs["tiny"], *pair, "--modules", "all")
    assert r.returncode == 0 and "21 module(s)" in r.stdout and "21 byte for byte" in r.stdout, r.stderr
    # a forgery that passes every checksum: one module's subspace replaced, the pack re-sealed
    pack = _copy(packs["tiny"], tmp_path)
    manifest = json.loads((pack / MANIFEST).read_text())
    m = next(x for x in manifest["modules"] if x["id"].endswith("layers.0.mlp.up_proj.weight"))
    entries, meta = _entries(pack / m["shard"])
    key, sub = entries[m["id"] + "/"]
    forged = Subspace(torch.roll(sub.U, 1, 0), sub.S, sub.V, sub.total_energy, sub.captured_energy)
    entries[m["id"] + "/"] = (key, forged)
    write_entries(pack / m["shard"], entries, meta)
    _rewrite_manifest(pack, lambda man: next(x for x in man["modules"] if x["id"] == m["id"]).update(
        pack_module.entry_record(forged)))  # fmt: skip
    r = run_cli("audit", "--adapter", w / "adapters" / "adv-r8-all-s0", "--subspace", pack, "-q")
    assert r.returncode == 0, "the forgery is consistent: only verify can tell"
    r = run_cli("subspace", "verify", pack, *pair, "--modules", "all")
    assert r.returncode == 1 and "layers.0.mlp.up_proj" in r.stderr and "1 of 21" in r.stderr, r.stderr
    # a pack checked against another pair
    wide = _world("wide")
    r = run_cli("subspace", "verify", packs["tiny"], "--aligned", wide / "llama-world-chat", "--base",
                wide / "llama-world", "--modules", "2")  # fmt: skip
    assert r.returncode == 2 and "other checkpoints" in r.stderr, r.stderr


def test_interrupted_write_keeps_the_old_pack(packs, tmp_path, monkeypatch):
    """A run that dies mid-write (here: the second shard fails) leaves the old pack as it was, no temp folder."""
    w = _world("tiny")
    pack = _copy(packs["tiny"], tmp_path)
    before = folder_bytes(pack)
    calls = []

    def failing(path, entries, metadata):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        write_entries(path, entries, metadata)

    monkeypatch.setattr(pack_module, "write_entries", failing)
    with pytest.raises(KeyboardInterrupt):
        build_pack(str(w / "llama-world-chat"), str(w / "llama-world"), pack, settings=Settings(subspace_rank=4),
                   force=True, subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    assert folder_bytes(pack) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pack"]


def test_sweep_from_a_pack(packs, tmp_path):
    w = _world("tiny")
    adapter = w / "adapters" / "adv-r4-attn-s0"
    grid = ("--method", "realign", "--method", "resta", "--lambdas", "1,4", "--gammas", "0.5", "-q")
    r = run_cli("sweep", "--adapter", adapter, "--subspace", packs["tiny"], "-o", tmp_path / "p", *grid)
    assert r.returncode == 0, r.stderr
    r = run_cli("sweep", "--adapter", adapter, "--aligned", w / "llama-world-chat", "--base", w / "llama-world",
                "--subspace-rank", "8", "-o", tmp_path / "c", *grid)  # fmt: skip
    assert r.returncode == 0, r.stderr
    points = [p["id"] for p in json.loads((tmp_path / "p" / "sweep.json").read_text())["points"]]
    assert len(points) == 3
    for point in points:
        files = [tmp_path / d / point / "adapter_model.safetensors" for d in ("p", "c")]
        assert files[0].read_bytes() == files[1].read_bytes(), point
    card = (tmp_path / "p" / points[0] / "README.md").read_text()
    assert "--subspace" in card


def test_hub_pack_fetches_only_the_needed_shards(tmp_path, monkeypatch):
    tiny = SIZES["tiny"]
    pair = write_pair(tmp_path / "remote", tiny, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=20_000)
    remotes = {"org/base": pair["base"], "org/aligned": pair["aligned"], "org/pack": tmp_path / "remote" / "pack"}
    fake = FakeHub(remotes, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.chdir(tmp_path)
    build_pack("org/aligned", "org/base", remotes["org/pack"], settings=Settings(subspace_rank=4),
               subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    manifest = json.loads((remotes["org/pack"] / MANIFEST).read_text())
    assert all(s["aligned"].startswith("lfs-sha256:") for s in manifest["sources"].values())
    assert len(manifest["shards"]) == tiny.layers
    adapter = write_adapter(tmp_path / "adapter", tiny, "org/aligned", r=4, alpha=8, a_std=None, b_std=0.01,
                            targets=("layers.1.self_attn.q_proj",), config={"layers_to_transform": [1]})  # fmt: skip
    fake.fetched = {repo: set() for repo in remotes}
    result = audit(adapter, None, None, subspaces=PackSource.open("org/pack"))
    layer1 = next(m["shard"] for m in manifest["modules"] if ".layers.1." in m["id"])
    assert fake.fetched["org/pack"] == {MANIFEST, layer1}
    assert fake.fetched["org/aligned"] == fake.fetched["org/base"] == set()
    assert len(result.report.modules) == 1 and result.report.inputs["subspace"]["revision"]


BEFORE = ("module", "kind", "shape", "rank", "scaling", "k", "captured", "displacement_norm", "subspace_norm",
          "update_norm", "rho", "erosion", "safe_lora_score", "off_energy_before", "leaving_energy_before")  # fmt: skip


@pytest.mark.parametrize(("world", "adapter"), CASES)
def test_before_only_audit_is_the_full_audits_before_values(packs, world, adapter):
    """``audit --before-only`` runs no method: every "before" value and every gate verdict is the full audit's, bit
    for bit, and every "after" value is null (not "unchanged")."""
    from csulora.reports.gate import Thresholds, violations
    from csulora.reports.report import AFTER_FIELDS, AFTER_TOTALS

    path = _world(world) / "adapters" / adapter
    source = PackSource.open(str(packs[world]))
    full, fast = (audit(path, None, subspaces=source, before_only=b).report for b in (False, True))
    a, b = full.to_dict(), fast.to_dict()
    assert [{k: m[k] for k in BEFORE} for m in a["modules"]] == [{k: m[k] for k in BEFORE} for m in b["modules"]]
    assert {k: v for k, v in a["totals"].items() if k not in AFTER_TOTALS} == \
        {k: v for k, v in b["totals"].items() if k not in AFTER_TOTALS}  # fmt: skip
    assert all(m[k] is None for m in b["modules"] for k in AFTER_FIELDS)
    assert all(b["totals"][k] is None for k in AFTER_TOTALS) and b["before_only"] is True
    assert "before_only" not in a and a["totals"]["erosion_after"] != a["totals"]["erosion_before"]
    t = a["totals"]
    limits = Thresholds(max_off_energy=t["off_energy_before"] / 2, min_erosion=t["erosion_before"] + 0.01,
                        min_safe_lora_score=1.0, max_layer_off_energy=0.0)  # fmt: skip
    assert violations(fast, limits) == violations(full, limits) and len(violations(full, limits)) == 4
    jsonschema.validate(b, json.loads((REPO / "csulora" / "report.schema.json").read_text()))


def test_a_batch_reads_each_pack_entry_once(packs, tmp_path, monkeypatch):
    """The pack's entries are read and checked once a process: the second adapter of a batch reads none, and its
    output is byte-identical to a fresh process's."""
    reads = []
    entry = pack_module.Pack.entry
    monkeypatch.setattr(pack_module.Pack, "entry", lambda self, *a: reads.append(a[1]["id"]) or entry(self, *a))
    adapters = _world("tiny") / "adapters"
    source = PackSource.open(str(packs["tiny"]))
    audit(adapters / "adv-r8-all-s0", None, subspaces=source, before_only=True)
    first = len(reads)
    assert first > 0 and len(set(reads)) == first
    sanitize(adapters / "adv-r8-all-dora-s0", None, None, tmp_path / "batch", subspaces=source)
    assert len(reads) == first  # every module of the second adapter was served from memory
    sanitize(adapters / "adv-r8-all-dora-s0", None, None, tmp_path / "fresh",
             subspaces=PackSource.open(str(packs["tiny"])))  # fmt: skip
    assert len(reads) == 2 * first
    assert folder_bytes(tmp_path / "batch") == folder_bytes(tmp_path / "fresh")


def test_before_only_at_80_columns_and_its_refusals(packs, tmp_path):
    adapter = _world("tiny") / "adapters" / "adv-r8-all-s0"
    r = run_cli("audit", "--adapter", adapter, "--subspace", packs["tiny"], "--before-only", "--min-erosion", "-1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert max(map(len, lines)) <= 80 and "before only" in r.stdout and "audit passed" in r.stdout
    header = next(line for line in lines if "module" in line and "erosion" in line)
    assert "after" not in header and "retained" not in header and "SafeLoRA" in header
    r = run_cli("audit", "--adapter", adapter, "--subspace", packs["tiny"], "--before-only", "--html",
                tmp_path / "r.html")  # fmt: skip
    assert_one_line_error(r, "--html", "--before-only")
    assert not (tmp_path / "r.html").exists()


def test_a_batch_audit_side_by_side_gives_the_reports_of_one_at_a_time(packs, tmp_path):
    """Several adapters are audited side by side (one thread each, after the first): the same document, in the
    same order, as one at a time."""
    folder = tmp_path / "adapters"
    folder.mkdir()
    for name in ("adv-r8-all-s0", "adv-r8-all-dora-s0", "adv-r4-attn-s0"):
        (folder / name).symlink_to(_world("tiny") / "adapters" / name)
    documents = []
    for jobs in ("1", "2"):
        r = run_cli("audit", "--adapter", folder, "--subspace", packs["tiny"], "--json", "-q", "--jobs", jobs)
        assert r.returncode == 0, r.stderr
        documents.append(json.loads(r.stdout))
    assert documents[0] == documents[1] and len(documents[0]["reports"]) == 3


def test_default_pack_of_fused_expert_stacks_serves_their_adapter(tmp_path):
    """transformers' fused MoE checkpoints store each layer's experts as one 3-D parameter without ``.weight``
    (``experts.gate_up_proj``): a pack made without ``--modules`` holds every expert of them (it held only the 2-D
    weights before), and sanitizes an adapter of experts, router and attention byte-identically to the checkpoints;
    ``csulora subspace`` into the cache covers the same modules."""
    shape = SIZES["moe-tiny"]
    pair = write_pair(tmp_path / "pair", shape, spectrum="fine-tune", dtype=torch.bfloat16, shard_bytes=100_000)
    adapter = write_adapter(tmp_path / "adapter", shape, str(pair["aligned"]), r=4, alpha=8, a_std=None, b_std=0.1)
    build_pack(str(pair["aligned"]), str(pair["base"]), tmp_path / "pack", settings=Settings(subspace_rank=8),
               subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    ids = {m["id"] for m in json.loads((tmp_path / "pack" / MANIFEST).read_text())["modules"]}
    for stack in ("gate_up_proj", "down_proj"):
        assert {f"model.layers.1.mlp.experts.{stack}[{e}]" for e in range(shape.experts)} <= ids, sorted(ids)[:8]
    settings = Settings(method="realign", lam=4.0, beta=0.25, subspace_rank=8)
    sanitize(adapter, str(pair["aligned"]), str(pair["base"]), tmp_path / "ckpt", settings=settings,
             subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    sanitize(adapter, None, None, tmp_path / "from-pack", settings=settings,
             subspaces=PackSource.open(str(tmp_path / "pack")))  # fmt: skip
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "ckpt" / name).read_bytes() == (tmp_path / "from-pack" / name).read_bytes(), name
    from csulora.api import precompute_subspaces

    rows = precompute_subspaces(str(pair["aligned"]), str(pair["base"]), settings=settings,
                                subspaces=SubspaceSource.open(tmp_path / "cache"))  # fmt: skip
    assert {r.module for r in rows} == {i.removesuffix(".weight") for i in ids}
