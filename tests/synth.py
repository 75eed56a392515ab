"""Small hand-written safetensors checkpoints and PEFT-format adapters for the reliability tests.

Faster than the transformers/PEFT fixtures of conftest.py and free in shapes, dtypes and configs,
which the property tests need. The files follow PEFT_FORMAT.md exactly (keys, config, header metadata).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests import oracle

PREFIX = "base_model.model."


def module_names(n_layers: int, kinds=("q_proj", "v_proj")) -> list[str]:
    return [f"model.layers.{i}.self_attn.{kind}" for i in range(n_layers) for kind in kinds]


def write_pair(root: Path, shapes: dict[str, tuple[int, int]], seed: int = 0, decay: float = 1.5) -> dict[str, Path]:
    """Base and aligned single-file checkpoints; each displacement has singular values ``0.1·decay^-i``
    (clear gaps, so the exact subspace is well defined at every rank)."""
    g = torch.Generator().manual_seed(seed)
    base, aligned = {}, {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        W = torch.randn(d_out, d_in, generator=g)
        m = min(d_out, d_in)
        U, _ = torch.linalg.qr(torch.randn(d_out, m, generator=g, dtype=torch.float64))
        V, _ = torch.linalg.qr(torch.randn(d_in, m, generator=g, dtype=torch.float64))
        S = 0.1 * decay ** -torch.arange(m, dtype=torch.float64)
        base[f"{name}.weight"] = W
        aligned[f"{name}.weight"] = (W.double() + (U * S) @ V.T).float()
    paths = {"base": root / "base", "aligned": root / "aligned"}
    for kind, tensors in (("base", base), ("aligned", aligned)):
        paths[kind].mkdir(parents=True)
        save_file(tensors, str(paths[kind] / "model.safetensors"), metadata={"format": "pt"})
        (paths[kind] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return paths


def write_adapter(
    folder: Path,
    shapes: dict[str, tuple[int, int]],
    ranks: dict[str, int] | int = 4,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    scale_b: float = 1.0,
    **config,
) -> Path:
    """A PEFT LoRA adapter folder: ``lora_A`` ``(r, d_in)``, ``lora_B`` ``(d_out, r)``, nonzero B."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in sorted(shapes.items()):
        r = ranks if isinstance(ranks, int) else ranks[name]
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g).to(dtype)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = (scale_b * torch.randn(d_out, r, generator=g)).to(dtype)
    cfg = {
        "peft_type": "LORA", "r": ranks if isinstance(ranks, int) else 4, "lora_alpha": 8,
        "target_modules": sorted({n.split(".")[-1] for n in shapes}), "base_model_name_or_path": "base",
        "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}, "fan_in_fan_out": False, **config,
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True))
    return folder


def load_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` as float64, from an adapter folder's safetensors file."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    names = sorted({k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors})
    return {
        n: (tensors[f"{PREFIX}{n}.lora_A.weight"].double(), tensors[f"{PREFIX}{n}.lora_B.weight"].double())
        for n in names
    }


def displacement(pair: dict[str, Path], name: str) -> torch.Tensor:
    """``D = W_a − W_b`` exactly as the product computes it (float32), for the oracle."""
    a = load_file(str(pair["aligned"] / "model.safetensors"))[f"{name}.weight"]
    b = load_file(str(pair["base"] / "model.safetensors"))[f"{name}.weight"]
    return a.float() - b.float()


def expected_delta(A, B, scaling: float, D: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """The oracle ``ΔW'`` (DESIGN.md §4) from dense projectors of the exact rank-``k`` subspace."""
    P, Q = oracle.projectors(D, k)
    return oracle.factored_delta(scaling * B.double() @ A.double(), P, Q, lam)


def cli(*args: str):
    """The ``csulora`` command in-process (typer's runner): fast enough for property tests.
    Returns the click ``Result`` (``exit_code``, ``stdout``, ``stderr``)."""
    from typer.testing import CliRunner

    from csulora.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2 with exactly one non-empty stderr line starting with ``error:``, naming each needle."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
