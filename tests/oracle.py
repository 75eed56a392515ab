"""Dense reference formulas of DESIGN.md for the older tests: the spec's formulas come from tests/reference64.py
(explicit d×d projectors, float64, exact SVD, nothing shared with the product); this module adds §4's factored
form written on the matrix, and readers of written adapters and checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.reference64 import (
    best_rank,
    components,
    csulora_block,
    erosion,
    projectors,
    realign,
    safe_lora_matrix,
    safe_lora_score,
    truncated,
)

PREFIX = "base_model.model."
__all__ = ["best_rank", "block_delta", "components", "displacement", "erosion", "expected_delta", "factored_delta",
           "load_factors", "projectors", "realign_delta", "safe_lora_matrix", "safe_lora_score", "truncated"]


def factored_delta(dW: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, lam: float) -> torch.Tensor:
    """§4: ΔW' = F + γ_in H_in + γ_out H_out + γ_in γ_out O."""
    c = components(dW, P, Q)
    total = sum(float((x**2).sum()) for x in c.values())
    rho = {name: float((x**2).sum()) / total for name, x in c.items()}
    g_out = 1 / (1 + lam * (rho["H_out"] + rho["O"]))
    g_in = 1 / (1 + lam * (rho["H_in"] + rho["O"]))
    return c["F"] + g_in * c["H_in"] + g_out * c["H_out"] + g_in * g_out * c["O"]


def block_delta(dW: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, lam: float) -> torch.Tensor:
    """§4, block form: X = F + H/(1 + λρ_H) + O/(1 + λρ_O), H = H_in + H_out."""
    return csulora_block(dW, P, Q, lam)


def realign_delta(dW: torch.Tensor, D: torch.Tensor, k: int, lam: float, beta: float) -> torch.Tensor:
    """§5b: X* = ΔW − c (F − β D_k), c = λ/(1+λ) (1 at λ = ∞), with dense projectors."""
    return realign(dW, D, k, lam, beta)


def expected_delta(A, B, scaling: float, D: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """The oracle ``ΔW'`` (§4) from dense projectors of the exact rank-``k`` subspace."""
    P, Q = projectors(D, k)
    return factored_delta(scaling * B.double() @ A.double(), P, Q, lam)


def load_factors(folder: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module: (A, B)}`` as float64, from an adapter folder's safetensors file."""
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    names = sorted({k[len(PREFIX) : -len(".lora_A.weight")] for k in tensors})
    return {
        n: (tensors[f"{PREFIX}{n}.lora_A.weight"].double(), tensors[f"{PREFIX}{n}.lora_B.weight"].double())
        for n in names
    }


def displacement(pair: dict[str, Path], name: str) -> torch.Tensor:
    """``D = W_a − W_b`` of a single-file pair exactly as the product computes it (float32)."""
    a = load_file(str(pair["aligned"] / "model.safetensors"))[f"{name}.weight"]
    b = load_file(str(pair["base"] / "model.safetensors"))[f"{name}.weight"]
    return a.float() - b.float()
