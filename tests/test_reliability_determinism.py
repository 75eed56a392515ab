"""Same inputs and options, same bytes (issue 6): across runs, processes (hash-map order) and torch
thread counts. The output folder holds no timings."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import torch
from safetensors.torch import load_file

from csulora import sanitize
from csulora.api import Settings
from csulora.synthetic import module_names, write_adapter, write_pair
from tests.conftest import OUTPUT_FILES as FILES
from tests.conftest import REPO, folder_bytes

RUN = """
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from csulora.cli import app
sys.argv = ["csulora", *sys.argv[2:]]
app()
"""


def run_with_threads(threads: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", RUN, str(threads), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_same_bytes_across_processes_and_thread_counts(tmp_path):
    """Default (randomized, seeded) SVD on 256 × 384 layers, where MKL's LAPACK and ATen's reductions
    would round differently with 1 and 2 threads if the math were not pinned (determinism.py)."""
    shapes = {n: (256, 384) for n in module_names(2)}
    pair = write_pair(tmp_path / "pair", shapes)
    adapter = write_adapter(tmp_path / "adapter", shapes, r=16)
    out = tmp_path / "out"
    args = ["sanitize", "--adapter", adapter, "--aligned", pair["aligned"], "--base", pair["base"], "-o", out,
            "-q", "--force", "--subspace-energy", "0.9"]  # fmt: skip
    seen = []
    for threads in (1, 2):
        result = run_with_threads(threads, *args)
        assert result.returncode == 0, result.stderr
        seen.append(folder_bytes(out))
    assert sorted(seen[0]) == FILES, "the output folder holds exactly these files (no timings)"
    assert seen[0] == seen[1]
    report = json.loads(seen[0]["csulora_report.json"])
    assert all(0 < m["k"] < 256 for m in report["modules"]), "the randomized path was exercised"


def test_same_bytes_in_process_on_a_peft_adapter(peft_adapter, llama_pair, tmp_path):
    for out in ("a", "b"):
        sanitize(peft_adapter, str(llama_pair["aligned"]), str(llama_pair["base"]), tmp_path / "outs" / out,
                 settings=Settings(subspace_energy=0.6))  # fmt: skip
        os.replace(tmp_path / "outs" / out, tmp_path / out)  # same -o path, so the card's command line matches
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert a == b and sorted(a) == FILES


def test_safetensors_header_is_canonical(tmp_path):
    """Tensors in name order with contiguous offsets; metadata keys sorted; no timing in the metadata."""
    shapes = {n: (24, 16) for n in module_names(2)}
    pair = write_pair(tmp_path / "pair", shapes)
    adapter = write_adapter(tmp_path / "adapter", shapes)
    sanitize(adapter, str(pair["aligned"]), str(pair["base"]), tmp_path / "out")
    data = (tmp_path / "out" / "adapter_model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0
    header = json.loads(data[8 : 8 + n])
    names = list(header)
    assert names[0] == "__metadata__" and names[1:] == sorted(names[1:])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert not any("time" in k or k.endswith("_s") for k in header["__metadata__"])
    offsets = [header[k]["data_offsets"] for k in names[1:]]
    assert offsets[0][0] == 0 and all(a[1] == b[0] for a, b in zip(offsets, offsets[1:], strict=False))
    assert offsets[-1][1] == len(data) - 8 - n
    report = json.loads((tmp_path / "out" / "csulora_report.json").read_text())
    assert "timings" not in report and not any(k.endswith("_s") for k in report)


def test_deterministic_writer_output_loads_in_peft(peft_adapter, llama_pair, tmp_path):
    """The hand-written (sorted) safetensors file loads in PEFT with no missing or unexpected LoRA keys."""
    from conftest import load_llama
    from peft import PeftModel

    sanitize(peft_adapter, str(llama_pair["aligned"]), str(llama_pair["base"]), tmp_path / "out")
    model = PeftModel.from_pretrained(load_llama(llama_pair["aligned"]), peft_adapter)
    result = model.load_adapter(tmp_path / "out", adapter_name="sanitized")
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    written = load_file(tmp_path / "out" / "adapter_model.safetensors")
    loaded = {k: v for k, v in model.state_dict().items() if ".sanitized." in k}
    assert len(loaded) == len(written)
    for key, value in written.items():
        assert torch.equal(loaded[key.replace(".weight", ".sanitized.weight")], value), key
