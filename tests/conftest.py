"""Shared fixtures and helpers: a tiny random Llama pair saved by transformers (sharded), adapters made by
PEFT, a runner for the real ``csulora`` command and checks of its output. Synthetic pairs and adapters
written without transformers come from ``csulora.synthetic``."""

from __future__ import annotations

import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# What every sanitize output folder holds: the adapter, its config, the card and the report in three renderings.
OUTPUT_FILES = [
    "README.md", "adapter_config.json", "adapter_model.safetensors", "csulora_report.html", "csulora_report.json",
    "csulora_report.md",
]  # fmt: skip
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(autouse=True)
def _private_subspace_cache(tmp_path_factory, monkeypatch):
    """Runs (in-process and ``run_cli`` subprocesses) use a cache of the test session, never ~/.cache."""
    monkeypatch.setenv("CSULORA_CACHE", str(tmp_path_factory.getbasetemp() / "csulora-cache"))


def tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip


def load_llama(path: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory) -> dict[str, Path]:
    """Base and aligned tiny Llamas (GQA: 2 KV heads), float32, saved sharded with an index; the aligned
    one is the base plus a rank-4 displacement on every linear layer, and its card names the base."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    paths = {"base": root / "llama-tiny", "aligned": root / "llama-tiny-chat"}
    model.save_pretrained(paths["base"], max_shard_size="100KB")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in TARGETS:
                d_out, d_in = module.weight.shape
                module.weight += 0.05 * torch.randn(d_out, 4, generator=g) @ torch.randn(4, d_in, generator=g)
    model.save_pretrained(paths["aligned"], max_shard_size="100KB")
    (paths["aligned"] / "README.md").write_text(f"---\nbase_model: {paths['base']}\nlicense: mit\n---\n# chat\n")
    assert (paths["base"] / "model.safetensors.index.json").is_file(), "fixture must be sharded"
    return paths


def make_peft_adapter(folder: Path, aligned: Path, seed: int = 0, **lora_kwargs) -> Path:
    """A PEFT LoRA adapter on the aligned model with random nonzero A and B (``init_lora_weights=False``)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    kwargs = {"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **lora_kwargs}
    model = get_peft_model(load_llama(aligned), LoraConfig(**kwargs))
    with torch.no_grad():  # PEFT's random init leaves B small; make the update clearly visible
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def peft_adapter(tmp_path, llama_pair) -> Path:
    return make_peft_adapter(tmp_path / "adapter", llama_pair["aligned"])


def run_cli(
    *args: str | Path, cwd: Path | None = None, env: dict | None = None, in_process: bool = False
) -> subprocess.CompletedProcess:
    """The real command: in a subprocess importing this checkout's package (its own argv, environment and
    streams, as a user runs it), or ``in_process`` with typer's runner, fast enough for property tests.
    Either way a ``CompletedProcess``; an unexpected exception in process ends ``stderr`` as a traceback."""
    args = [str(a) for a in args]
    if in_process:
        return _run_in_process(args, cwd, env)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "csulora", *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=300
    )


def _run_in_process(args: list[str], cwd: Path | None, env: dict | None) -> subprocess.CompletedProcess:
    from typer.testing import CliRunner

    from csulora.cli import app

    before = Path.cwd()
    os.chdir(cwd or before)
    try:
        result = CliRunner().invoke(app, args, env=env)
    finally:
        os.chdir(before)
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "".join(traceback.format_exception(*result.exc_info))
    return subprocess.CompletedProcess(["csulora", *args], result.exit_code, result.stdout, stderr)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2 with exactly one non-empty stderr line starting with ``error:``, naming each needle."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, relative path → bytes: for byte-for-byte comparisons of outputs."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
