"""Dense reference formulas of DESIGN.md, written as plainly as possible: explicit d×d projectors,
float64, exact SVD. Fine for the tiny matrices of the tests; the product never does this."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

PREFIX = "base_model.model."


def projectors(D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``P = U_k U_kᵀ``, ``Q = V_k V_kᵀ`` from the exact SVD of ``D``."""
    U, _, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return U[:, :k] @ U[:, :k].T, Vh[:k].T @ Vh[:k]


def components(dW: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> dict[str, torch.Tensor]:
    """§3: F = PΔWQ, H_in = PΔWQ⊥, H_out = P⊥ΔWQ, O = P⊥ΔWQ⊥."""
    dW = dW.double()
    Pp, Qp = torch.eye(P.shape[0], dtype=P.dtype) - P, torch.eye(Q.shape[0], dtype=Q.dtype) - Q
    return {"F": P @ dW @ Q, "H_in": P @ dW @ Qp, "H_out": Pp @ dW @ Q, "O": Pp @ dW @ Qp}


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
    c = components(dW, P, Q)
    total = sum(float((x**2).sum()) for x in c.values())
    rho = {name: float((x**2).sum()) / total for name, x in c.items()}
    H = c["H_in"] + c["H_out"]
    return c["F"] + H / (1 + lam * (rho["H_in"] + rho["H_out"])) + c["O"] / (1 + lam * rho["O"])


def safe_lora_matrix(D: torch.Tensor) -> torch.Tensor:
    """§5: C = D Dᵀ / ‖D‖_F, formed densely."""
    D = D.double()
    return D @ D.T / torch.linalg.norm(D)


def safe_lora_score(dW: torch.Tensor, D: torch.Tensor) -> float:
    """§5: cos(vec(C ΔW), vec(ΔW)) (the LoRA scaling cancels)."""
    dW = dW.double()
    CdW = safe_lora_matrix(D) @ dW
    return float((CdW * dW).sum() / (torch.linalg.norm(CdW) * torch.linalg.norm(dW)))


def truncated(D: torch.Tensor, k: int) -> torch.Tensor:
    """``D_k = U_k Σ_k V_kᵀ``, the rank-k truncation of ``D`` (exact SVD)."""
    U, S, Vh = torch.linalg.svd(D.double(), full_matrices=False)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def realign_delta(dW: torch.Tensor, D: torch.Tensor, k: int, lam: float, beta: float) -> torch.Tensor:
    """§5b: X* = ΔW − c (F − β D_k), c = λ/(1+λ) (1 at λ = ∞), with dense projectors."""
    P, Q = projectors(D, k)
    c = 1.0 if lam == float("inf") else lam / (1 + lam)
    dW = dW.double()
    return dW - c * (P @ dW @ Q - beta * truncated(D, k))


def erosion(dW: torch.Tensor, D: torch.Tensor, k: int) -> float:
    """§5b: e = ⟨ΔW, D_k⟩ / ‖D_k‖²."""
    Dk = truncated(D, k)
    return float((dW.double() * Dk).sum() / (Dk * Dk).sum())


def best_rank(X: torch.Tensor, r: int) -> torch.Tensor:
    """Eckart–Young: the best rank-r approximation of X (exact SVD)."""
    U, S, Vh = torch.linalg.svd(X.double(), full_matrices=False)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


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
