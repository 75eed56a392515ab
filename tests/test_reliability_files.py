"""Untrusted files: lying safetensors headers, pickles, path traversal, symlinks (issue 6).

Every bad file gives exit 2 and one line naming the file, no traceback, no output folder, and no
allocation proportional to what the header claims."""

from __future__ import annotations

import json
import os
import pickle
import struct
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csulora.errors import CsuloraError
from csulora.io.tensorfile import read_header
from csulora.synthetic import write_adapter, write_pair
from tests.conftest import assert_one_line_error, run_cli

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (8, 16)}
A_KEY = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> dict[str, Path]:
    return write_pair(tmp_path_factory.mktemp("pair"), SHAPES)


@pytest.fixture
def adapter(tmp_path) -> Path:
    return write_adapter(tmp_path / "adapter", SHAPES)


def sanitize(adapter: Path, pair, out: Path, *extra: str):
    return run_cli(
        "sanitize", "--adapter", adapter, "--aligned", pair["aligned"], "--base", pair["base"], "-o", out, "-q", *extra,
        in_process=True,
    )


def split_file(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join_file(path: Path, header: dict | bytes, payload: bytes) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + payload)


def _entry(h: dict, key: str = A_KEY) -> dict:
    return h[key]


def _first_two(h: dict) -> tuple[str, str]:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][0])
    return names[0], names[1]


# (name, how the file is damaged, words the message must contain)
LIES = {
    "huge_header_length": (lambda h, d: (struct.pack("<Q", 2**63), None), "header length"),
    "header_length_past_end": (lambda h, d: ("len+1", None), "header length"),
    "not_json": (lambda h, d: (b"{this is not json" + b" " * 7, d), "unreadable safetensors header"),
    "json_array": (lambda h, d: (b"[1, 2, 3]" + b" " * 7, d), "unreadable safetensors header"),
    "bad_utf8": (lambda h, d: (b'{"\xff\xfe": 1}', d), "unreadable safetensors header"),
    "empty_header": (lambda h, d: (b"", d), "unreadable safetensors header"),
    "offsets_past_end": (
        lambda h, d: (_set(h, A_KEY, data_offsets=[len(d) - 4, len(d) + 60]), d), "invalid entry"),
    "dtype_shape_mismatch": (lambda h, d: (_set(h, A_KEY, shape=[4, 17]), d), "invalid entry"),
    "dtype_size_mismatch": (lambda h, d: (_set(h, A_KEY, dtype="F16"), d), "invalid entry"),
    "float_offsets": (lambda h, d: (_set(h, A_KEY, data_offsets=[0.0, 256.0]), d), "invalid entry"),
    "negative_shape": (lambda h, d: (_set(h, A_KEY, shape=[-4, -16]), d), "invalid entry"),
    "bool_shape": (lambda h, d: (_set(h, A_KEY, shape=[True, 64]), d), "invalid entry"),
    "huge_shape": (lambda h, d: (_set(h, A_KEY, shape=[2**40, 2**40]), d), "invalid entry"),
    "missing_offsets": (lambda h, d: (_drop(h, A_KEY, "data_offsets"), d), "invalid entry"),
    "entry_not_object": (lambda h, d: ({**h, A_KEY: 7}, d), "invalid entry"),
    "overlapping_offsets": (lambda h, d: (_overlap(h), d), "overlaps another tensor"),
    "gap_between_tensors": (lambda h, d: (_shift_all(h, 4), b"\0" * 4 + d), "leaves a gap"),
    "trailing_bytes": (lambda h, d: (h, d + b"\0" * 16), "trailing bytes"),
    "truncated_data": (lambda h, d: (h, d[:-16]), "past the end of the file"),
    "metadata_not_strings": (lambda h, d: ({**h, "__metadata__": {"format": ["pt"]}}, d), "__metadata__"),
    "metadata_list": (lambda h, d: ({**h, "__metadata__": ["a", "b"]}, d), "__metadata__"),
    "duplicate_tensor_name": (lambda h, d: (_duplicate(h), d), "unreadable safetensors header"),
    "unknown_dtype": (lambda h, d: (_set(h, A_KEY, dtype="F128"), d), "unreadable"),
}  # fmt: skip


def _set(h: dict, key: str, **fields) -> dict:
    return {**h, key: {**h[key], **fields}}


def _drop(h: dict, key: str, field: str) -> dict:
    return {**h, key: {k: v for k, v in h[key].items() if k != field}}


def _overlap(h: dict) -> dict:
    """The second tensor starts inside the first: two tensors alias the same bytes."""
    first, second = _first_two(h)
    start, end = h[second]["data_offsets"]
    return _set(h, second, data_offsets=[start - 4, end - 4])


def _shift_all(h: dict, by: int) -> dict:
    return {k: (v if k == "__metadata__" else {**v, "data_offsets": [o + by for o in v["data_offsets"]]})
            for k, v in h.items()}  # fmt: skip


def _duplicate(h: dict) -> bytes:
    raw = json.dumps(h)
    entry = json.dumps(h[A_KEY])
    return (raw[:-1] + f', "{A_KEY}": {entry}}}').encode()


def damage(path: Path, lie: str) -> None:
    header, payload = split_file(path)
    how, _ = LIES[lie]
    new_header, new_payload = how(header, payload)
    if new_payload is None:  # a lie about the length prefix itself
        raw = json.dumps(header).encode()
        prefix = struct.pack("<Q", len(raw) + len(payload) + 1) if new_header == "len+1" else new_header
        path.write_bytes(prefix + raw + payload)
    else:
        join_file(path, new_header, new_payload)


@pytest.mark.parametrize("lie", sorted(LIES))
def test_lying_adapter_header_exits_2_with_one_line(lie, adapter, pair, tmp_path):
    weights = adapter / "adapter_model.safetensors"
    damage(weights, lie)
    before = weights.read_bytes()
    result = sanitize(adapter, pair, tmp_path / "out")
    assert_one_line_error(result, str(weights), LIES[lie][1])
    assert not (tmp_path / "out").exists() and weights.read_bytes() == before


@pytest.mark.parametrize("lie", ["offsets_past_end", "overlapping_offsets", "huge_header_length", "not_json"])
def test_lying_checkpoint_header_exits_2(lie, adapter, pair, tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes((pair["base"] / "model.safetensors").read_bytes())
    A_key = "model.layers.0.self_attn.q_proj.weight"
    header, payload = split_file(base / "model.safetensors")
    how, words = LIES[lie]
    if lie in ("offsets_past_end", "overlapping_offsets"):
        fixed = {"offsets_past_end": lambda h: _set(h, A_key, data_offsets=[len(payload) - 4, len(payload) + 8]),
                 "overlapping_offsets": _overlap}[lie]  # fmt: skip
        join_file(base / "model.safetensors", fixed(header), payload)
    else:
        damage(base / "model.safetensors", lie)
    result = run_cli("sanitize", "--adapter", adapter, "--aligned", pair["aligned"], "--base", base,
                     "-o", tmp_path / "out", "-q", in_process=True)  # fmt: skip
    assert_one_line_error(result, str(base / "model.safetensors"), words)
    assert not (tmp_path / "out").exists()


def test_lying_header_allocates_nothing_large(tmp_path):
    """A sparse 300 MB file whose prefix claims a 200 MB header (over the 100 MB limit), and one that
    claims 2^63 bytes: refused from the first 8 bytes, with a peak Python allocation under 1 MB."""
    sparse = tmp_path / "sparse.safetensors"
    with open(sparse, "wb") as f:
        f.write(struct.pack("<Q", 200 * 2**20))
        f.truncate(300 * 2**20)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 2**63) + b"{}")
    claimed = tmp_path / "claimed.safetensors"  # header ok, claims a 2^80-element tensor
    join_file(claimed, {"t": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 2**82]}}, b"")
    for path in (sparse, huge, claimed):
        tracemalloc.start()
        with pytest.raises(CsuloraError, match="safetensors|invalid entry"):
            read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 2**20, (path.name, peak)


def test_valid_file_passes_the_stricter_checks(adapter):
    """The checks are not too strict: files written by safetensors itself (and by csulora) pass."""
    header = read_header(adapter / "adapter_model.safetensors")
    assert set(header.tensors) == set(load_file(adapter / "adapter_model.safetensors"))


class Payload:
    """Unpickling this would create a marker file (a harmless stand-in for arbitrary code)."""

    marker: str = ""

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _pickled_adapter(tmp_path: Path, how: str) -> tuple[Path, Path]:
    folder = write_adapter(tmp_path / "pickled", SHAPES)
    marker = tmp_path / "PWNED"
    Payload.marker = str(marker)
    state = dict(load_file(folder / "adapter_model.safetensors"))
    state["evil"] = Payload()
    (folder / "adapter_model.safetensors").unlink()
    if how == "torch.save":
        torch.save(state, folder / "adapter_model.bin")
    else:  # a bare pickle stream, the legacy non-zip format
        (folder / "adapter_model.bin").write_bytes(pickle.dumps(Payload(), protocol=2))
    return folder, marker


@pytest.mark.parametrize("how", ["torch.save", "raw pickle"])
def test_malicious_pickle_never_runs_even_when_trusted(how, pair, tmp_path):
    folder, marker = _pickled_adapter(tmp_path, how)
    refused = sanitize(folder, pair, tmp_path / "out")
    assert_one_line_error(refused, "adapter_model.bin", "--trust-pickle")
    trusted = sanitize(folder, pair, tmp_path / "out", "--trust-pickle")
    assert_one_line_error(trusted, "adapter_model.bin", "weights-only")
    assert not marker.exists(), "the pickle's __reduce__ ran"
    assert not (tmp_path / "out").exists()
    # the payload is live: plain pickle.load would have run it
    if how == "raw pickle":
        pickle.loads((folder / "adapter_model.bin").read_bytes())
        assert marker.exists()


def test_trusted_pickle_with_shared_storage_matches_safetensors(pair, tmp_path):
    """A legit .bin whose tensors are views of one storage (torch.save keeps views): loaded weights-only,
    copied, sanitized exactly like the safetensors original."""
    ref = write_adapter(tmp_path / "ref", SHAPES)
    state = load_file(ref / "adapter_model.safetensors")
    flat = torch.cat([t.reshape(-1) for t in state.values()])
    views, at = {}, 0
    for k, t in state.items():
        views[k] = flat[at : at + t.numel()].view(t.shape)
        at += t.numel()
    binned = tmp_path / "binned"
    binned.mkdir()
    (binned / "adapter_config.json").write_bytes((ref / "adapter_config.json").read_bytes())
    torch.save(views, binned / "adapter_model.bin")
    assert sanitize(ref, pair, tmp_path / "out_ref").returncode == 0
    result = sanitize(binned, pair, tmp_path / "out_bin", "--trust-pickle")
    assert result.returncode == 0, result.stderr
    a, b = (
        load_file(tmp_path / "out_ref" / "adapter_model.safetensors"),
        load_file(tmp_path / "out_bin" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "out_bin" / "adapter_model.bin").exists()


def test_pickled_checkpoint_is_refused(adapter, pair, tmp_path):
    ckpt = tmp_path / "pt-checkpoint"
    ckpt.mkdir()
    torch.save(load_file(pair["base"] / "model.safetensors"), ckpt / "pytorch_model.bin")
    result = run_cli("sanitize", "--adapter", adapter, "--aligned", pair["aligned"], "--base", ckpt,
                     "-o", tmp_path / "out", "-q", "--trust-pickle", in_process=True)  # fmt: skip
    assert_one_line_error(result, str(ckpt), "safetensors", "convert .bin")


@pytest.mark.parametrize("shard", ["../../x.safetensors", "/etc/passwd", "sub/model.safetensors", "..", "."])
def test_index_shard_names_cannot_leave_the_folder(shard, adapter, pair, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    weight_map = {k: "model.safetensors" for k in read_header(pair["base"] / "model.safetensors").tensors}
    weight_map["model.layers.0.self_attn.q_proj.weight"] = shard
    (ckpt / "model.safetensors").write_bytes((pair["base"] / "model.safetensors").read_bytes())
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "x.safetensors").write_bytes((pair["base"] / "model.safetensors").read_bytes())  # the bait
    result = run_cli("sanitize", "--adapter", adapter, "--aligned", pair["aligned"], "--base", ckpt,
                     "-o", tmp_path / "out", "-q", in_process=True)  # fmt: skip
    assert_one_line_error(result, "model.safetensors.index.json", "outside the folder")


@pytest.mark.parametrize("module", ["../../evil", "/abs/evil", "a/../../../b"])
def test_tensor_names_with_paths_write_nothing_outside(module, pair, tmp_path):
    """Tensor and module names are never used as file paths: a traversal name is just an unknown module."""
    folder = tmp_path / "deep" / "adapter"
    write_adapter(folder, SHAPES)
    from safetensors.torch import save_file

    state = load_file(folder / "adapter_model.safetensors")
    save_file({k.replace("model.layers.0.self_attn.q_proj", module): v for k, v in state.items()},
              str(folder / "adapter_model.safetensors"))  # fmt: skip
    before = sorted(p for p in tmp_path.rglob("*"))
    result = sanitize(folder, pair, tmp_path / "deep" / "out")
    assert_one_line_error(result, module)  # an unknown module: not in target_modules, or not in the checkpoint
    assert sorted(p for p in tmp_path.rglob("*")) == before


def test_symlinked_inputs_are_resolved_and_reported(adapter, pair, tmp_path):
    links = tmp_path / "links"
    links.mkdir()
    for name, target in (("adapter", adapter), ("aligned", pair["aligned"]), ("base", pair["base"])):
        (links / name).symlink_to(target, target_is_directory=True)
    result = run_cli("sanitize", "--adapter", links / "adapter", "--aligned", links / "aligned",
                     "--base", links / "base", "-o", tmp_path / "out", "-q", in_process=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    inputs = json.loads((tmp_path / "out" / "csulora_report.json").read_text())["inputs"]
    assert inputs["adapter"]["path"] == str(links / "adapter")
    assert inputs["adapter"]["resolved_path"] == str(adapter.resolve())
    assert inputs["aligned"]["resolved_path"] == str(pair["aligned"].resolve())
    assert inputs["base"]["resolved_path"] == str(pair["base"].resolve())


def test_output_through_a_symlink_is_refused(adapter, pair, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").symlink_to(elsewhere, target_is_directory=True)
    result = sanitize(adapter, pair, tmp_path / "out", "--force")
    assert_one_line_error(result, "not a folder")
    assert list(elsewhere.iterdir()) == []


def test_messages_with_brackets_are_printed_verbatim(pair, tmp_path):
    """A path like ``ad[/red]`` is text, not rich markup: the line is printed as is (it used to crash)."""
    folder = tmp_path / "ad[/red][bold]"
    write_adapter(folder, SHAPES)
    (folder / "adapter_model.safetensors").write_bytes(b"\0" * 4)
    line = assert_one_line_error(sanitize(folder, pair, tmp_path / "out"), "ad[/red][bold]")
    assert "shorter than 8 bytes" in line
