"""A float64 reference of DESIGN.md §2–§5d that shares nothing with the product: explicit ``d × d`` projectors
from an exact SVD, each method's closed form written as the spec states it. It imports nothing from
``csulora.correction`` or ``csulora.methods`` (the tests compare those against this).

Fine for the small matrices of the tests; the product never forms a ``d × d`` matrix."""

from __future__ import annotations

import math

import torch

F64 = torch.float64
COMPONENTS = ("F", "H_in", "H_out", "O")


def svd(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(D.to(F64), full_matrices=False)
    return U, S, Vh


def projectors(D: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """§2: ``P = U_k U_kᵀ`` (output side), ``Q = V_k V_kᵀ`` (input side)."""
    U, _, Vh = svd(D)
    return U[:, :k] @ U[:, :k].T, Vh[:k].T @ Vh[:k]


def truncated(D: torch.Tensor, k: int) -> torch.Tensor:
    """§5b: ``D_k = U_k Σ_k V_kᵀ``."""
    U, S, Vh = svd(D)
    return U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]


def components(dW: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> dict[str, torch.Tensor]:
    """§3: ``F = PΔWQ``, ``H_in = PΔWQ⊥``, ``H_out = P⊥ΔWQ``, ``O = P⊥ΔWQ⊥``."""
    dW = dW.to(F64)
    Pp = torch.eye(P.shape[0], dtype=F64) - P
    Qp = torch.eye(Q.shape[0], dtype=F64) - Q
    return {"F": P @ dW @ Q, "H_in": P @ dW @ Qp, "H_out": Pp @ dW @ Q, "O": Pp @ dW @ Qp}


def rho(dW: torch.Tensor, P: torch.Tensor, Q: torch.Tensor) -> dict[str, float]:
    """§3: ``ρ_c = ‖c‖² / ‖ΔW‖²`` (0 for a zero update)."""
    energies = {c: float((x**2).sum()) for c, x in components(dW, P, Q).items()}
    total = sum(energies.values())
    return {c: (e / total if total > 0 else 0.0) for c, e in energies.items()}


def shrink(lam: float, r: float) -> float:
    """``1/(1 + λρ)``; at ``λ = ∞``: 0, or 1 where ``ρ = 0``."""
    if math.isinf(lam):
        return 1.0 if r == 0 else 0.0
    return 1.0 / (1.0 + lam * r)


def csulora_factored(A: torch.Tensor, sB: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, lam: float) -> torch.Tensor:
    """§4 factored form as the spec derives it, on the factors: ``B' = (P + γ_out P⊥) B``,
    ``A' = A (Q + γ_in Q⊥)``, with ``γ_out = 1/(1 + λ(ρ_Hout + ρ_O))``, ``γ_in = 1/(1 + λ(ρ_Hin + ρ_O))``."""
    A, sB = A.to(F64), sB.to(F64)
    r = rho(sB @ A, P, Q)
    g_out, g_in = shrink(lam, r["H_out"] + r["O"]), shrink(lam, r["H_in"] + r["O"])
    Pp, Qp = torch.eye(P.shape[0], dtype=F64) - P, torch.eye(Q.shape[0], dtype=F64) - Q
    return (P + g_out * Pp) @ sB @ A @ (Q + g_in * Qp)


def csulora_block(dW: torch.Tensor, P: torch.Tensor, Q: torch.Tensor, lam: float) -> torch.Tensor:
    """§4 block form: ``X = F + H/(1 + λρ_H) + O/(1 + λρ_O)``, ``H = H_in + H_out``."""
    c, r = components(dW, P, Q), rho(dW, P, Q)
    g_h, g_o = shrink(lam, r["H_in"] + r["H_out"]), shrink(lam, r["O"])
    return c["F"] + g_h * (c["H_in"] + c["H_out"]) + g_o * c["O"]


def safe_lora_matrix(D: torch.Tensor) -> torch.Tensor:
    """§5: ``C = D Dᵀ / ‖D‖_F``."""
    D = D.to(F64)
    return D @ D.T / torch.linalg.norm(D)


def safe_lora_score(dW: torch.Tensor, D: torch.Tensor) -> float:
    """§5: ``cos(vec(C ΔW), vec(ΔW))``."""
    dW = dW.to(F64)
    CdW = safe_lora_matrix(D) @ dW
    return float((CdW * dW).sum() / (torch.linalg.norm(CdW) * torch.linalg.norm(dW)))


def realign(dW: torch.Tensor, D: torch.Tensor, k: int, lam: float, beta: float) -> torch.Tensor:
    """§5b: ``X* = ΔW − c (PΔWQ − β D_k)``, ``c = λ/(1+λ)`` (1 at ``λ = ∞``)."""
    P, Q = projectors(D, k)
    c = 1.0 if math.isinf(lam) else lam / (1.0 + lam)
    dW = dW.to(F64)
    return dW - c * (P @ dW @ Q - beta * truncated(D, k))


def resta(dW: torch.Tensor, D: torch.Tensor, k: int | None, gamma: float) -> torch.Tensor:
    """§5d: ``X = ΔW + γ D_k`` on an adapter, ``X = ΔW + γ D`` on a full weight (``k = None``)."""
    Dk = D.to(F64) if k is None else truncated(D, k)
    return dW.to(F64) + gamma * Dk


def best_rank(X: torch.Tensor, r: int) -> torch.Tensor:
    """§5b factored form: the best rank-``r`` approximation (Eckart–Young)."""
    U, S, Vh = svd(X)
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def erosion(dW: torch.Tensor, D: torch.Tensor, k: int) -> float:
    """§5b: ``e = ⟨ΔW, D_k⟩ / ‖D_k‖²``."""
    Dk = truncated(D, k)
    return float((dW.to(F64) * Dk).sum() / (Dk * Dk).sum())
