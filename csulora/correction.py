"""Decomposition of a LoRA update and its closed-form corrections (DESIGN.md §3–§5).

Pure functions over tensors. Conventions: ``A`` is ``(r, d_in)``, ``B`` is ``(d_out, r)``,
``U`` is ``(d_out, k)`` and ``V`` is ``(d_in, k)`` with orthonormal columns, so that
``P = U Uᵀ`` and ``Q = V Vᵀ``. No ``d × d`` matrix is ever formed: ``P·X = U (Uᵀ X)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .subspace import squared_norm

COMPONENTS = ("F", "H_in", "H_out", "O")


def project_out(U: Tensor, X: Tensor) -> Tensor:
    """Output-side projection (§2): ``P·X = U (Uᵀ X)``."""
    return U @ (U.T @ X)


def project_in(X: Tensor, V: Tensor) -> Tensor:
    """Input-side projection (§2): ``X·Q = (X V) Vᵀ``."""
    return (X @ V) @ V.T


@dataclass(frozen=True)
class Split:
    """The factors of the decomposition (§3): ``B1 = P·sB``, ``B2 = sB − B1``, ``A1 = A·Q``, ``A2 = A − A1``."""

    B1: Tensor
    B2: Tensor
    A1: Tensor
    A2: Tensor


def split(A: Tensor, sB: Tensor, U: Tensor, V: Tensor) -> Split:
    """Decomposition (§3) of ``ΔW = sB·A`` into in-subspace and leaving factors on each side."""
    B1 = project_out(U, sB)
    A1 = project_in(A, V)
    return Split(B1=B1, B2=sB - B1, A1=A1, A2=A - A1)


def product_energy(B: Tensor, A: Tensor) -> float:
    """Gram energy (§3): ``‖B A‖_F² = tr(BᵀB · AAᵀ)``, from ``r × r`` matrices only."""
    return float(((B.T @ B) * (A @ A.T)).sum())


def component_energies(sp: Split) -> dict[str, float]:
    """Component energies (§3): ``e_F = ‖B1A1‖², e_Hin = ‖B1A2‖², e_Hout = ‖B2A1‖², e_O = ‖B2A2‖²``, each
    ``tr(BᵢᵀBᵢ · AⱼAⱼᵀ)``: the four ``r × r`` Grams are formed once each (they are the cost: ``d × r²``)."""
    G_B1, G_B2, G_A1, G_A2 = sp.B1.T @ sp.B1, sp.B2.T @ sp.B2, sp.A1 @ sp.A1.T, sp.A2 @ sp.A2.T
    return {
        "F": float((G_B1 * G_A1).sum()),
        "H_in": float((G_B1 * G_A2).sum()),
        "H_out": float((G_B2 * G_A1).sum()),
        "O": float((G_B2 * G_A2).sum()),
    }


def relative_energies(energies: dict[str, float], total: float | None = None) -> dict[str, float]:
    """Relative energies (§3): ``ρ_c = e_c / ‖ΔW‖_F²`` (all zero for a zero update). ``total`` defaults to
    the sum of ``energies``; pass the input's ``‖ΔW‖_F²`` to express a corrected update's energies."""
    total = sum(energies.values()) if total is None else total
    return {c: (e / total if total > 0 else 0.0) for c, e in energies.items()}


def shrink(lam: float, rho: float) -> float:
    """``1 / (1 + λρ)``, with its limit as ``λ → ∞``: 0, or 1 where ``ρ = 0`` (nothing to attenuate)."""
    if math.isinf(lam):
        return 1.0 if rho == 0 else 0.0
    return 1.0 / (1.0 + lam * rho)


def attenuation(rho: dict[str, float], lam: float) -> tuple[float, float]:
    """Attenuation factors (§4): ``γ_out = 1/(1 + λ(ρ_Hout + ρ_O))``, ``γ_in = 1/(1 + λ(ρ_Hin + ρ_O))``."""
    return shrink(lam, rho["H_out"] + rho["O"]), shrink(lam, rho["H_in"] + rho["O"])


def factored_update(
    A: Tensor, B: Tensor, U: Tensor, V: Tensor, gamma_out: float, gamma_in: float
) -> tuple[Tensor, Tensor]:
    """Closest safe update, factored form (§4): ``B' = (P + γ_out P⊥) B``, ``A' = A (Q + γ_in Q⊥)``.

    Written as ``γ X + (1 − γ) Proj(X)``; a side with ``γ = 1`` is returned untouched, so
    ``λ = 0`` gives the input bit for bit.
    """
    B_new = B if gamma_out == 1.0 else gamma_out * B + (1.0 - gamma_out) * project_out(U, B)
    A_new = A if gamma_in == 1.0 else gamma_in * A + (1.0 - gamma_in) * project_in(A, V)
    return A_new, B_new


def safe_lora_cosine(CB: Tensor, B: Tensor, A: Tensor) -> float:
    """Safe LoRA score (§5) given ``C·B``: ``cos(vec(C B A), vec(B A))`` from ``r × r`` Grams.

    The LoRA scaling and the scale of ``C`` cancel. Returns 0 when either product is zero.
    """
    CB, B, A = CB.double(), B.double(), A.double()
    G_A = A @ A.T  # the r × r Gram the three traces share
    inner = float(((CB.T @ B) * G_A).sum())
    norms = float(((CB.T @ CB) * G_A).sum()) * float(((B.T @ B) * G_A).sum())
    return inner / norms**0.5 if norms > 0 else 0.0


def safe_lora_score(A: Tensor, B: Tensor, D: Tensor) -> float:
    """Safe LoRA score (§5) with ``C = D Dᵀ / ‖D‖_F``, applied as ``D (Dᵀ B) / ‖D‖_F``; 0 when ``D = 0``."""
    if not torch.any(D):
        return 0.0
    return safe_lora_cosine(safe_lora_project(B, D), B, A)


def safe_lora_score_subspace(A: Tensor, B: Tensor, U: Tensor, S: Tensor) -> float:
    """Safe LoRA score (§5) from the cached subspace: ``C`` replaced by its rank-k truncation
    ``C_k = U_k Σ_k² U_kᵀ / ‖D‖_F`` (``D Dᵀ = U Σ² Uᵀ``), so that ``D`` need not be read.

    Exact when ``k`` reaches the rank of ``D``; otherwise an approximation that keeps the directions
    holding most of ``C`` (its weights are ``σ²``). The cosine ignores ``C``'s scale. 0 for an empty subspace.
    """
    if S.numel() == 0:
        return 0.0
    U, S, B = U.double(), S.double(), B.double()
    return safe_lora_cosine(U @ ((S**2)[:, None] * (U.T @ B)), B, A)


def block_attenuation(rho: dict[str, float], lam: float) -> tuple[float, float]:
    """Block-form factors (§4): ``γ_H = 1/(1 + λ(ρ_Hin + ρ_Hout))``, ``γ_O = 1/(1 + λ ρ_O)``."""
    return shrink(lam, rho["H_in"] + rho["H_out"]), shrink(lam, rho["O"])


def block_update(sp: Split, gamma_h: float, gamma_o: float) -> tuple[Tensor, Tensor]:
    """Closest safe update, block form (§4): ``X = F + γ_H H + γ_O O`` as rank-``2r`` factors.

    ``B' = [B1 | B2]`` ``(d_out, 2r)`` and ``A' = [A1 + γ_H A2 ; γ_H A1 + γ_O A2]`` ``(2r, d_in)``, so that
    ``B'A' = B1A1 + γ_H (B1A2 + B2A1) + γ_O B2A2``. The scaling ``s`` is already in ``B1``, ``B2``: the
    written adapter must give this module scale 1.
    """
    B_new = torch.cat([sp.B1, sp.B2], dim=1)
    A_new = torch.cat([sp.A1 + gamma_h * sp.A2, gamma_h * sp.A1 + gamma_o * sp.A2], dim=0)
    return A_new, B_new


def safe_lora_project(B: Tensor, D: Tensor, total: float | None = None) -> Tensor:
    """Safe LoRA projection (§5): ``C·B = D (Dᵀ B) / ‖D‖_F``, without forming ``C = D Dᵀ / ‖D‖_F``.

    ``‖D‖_F = √total`` with ``total = ‖D‖_F²`` from the one-pass float64 sum (``squared_norm``; taken here when not
    given): a float32 norm of a whole layer errs by up to 1e-3. The products run in the wider of the two dtypes."""
    total = squared_norm(D) if total is None else total
    dtype = torch.promote_types(D.dtype, B.dtype)
    D = D.to(dtype)
    return D @ (D.T @ B.to(dtype)) / math.sqrt(total)


# ---------------------------------------------------------------- re-alignment (§5b)


def realign_strength(lam: float) -> float:
    """Re-alignment strength (§5b): ``c = λ / (1 + λ)``; ``λ = ∞`` gives ``c = 1``."""
    return 1.0 if math.isinf(lam) else lam / (1.0 + lam)


def subspace_block(A: Tensor, sB: Tensor, U: Tensor, V: Tensor) -> Tensor:
    """The in-subspace block (§5b): ``M = (U_kᵀ sB)(A V_k)`` ``(k × k)``, so that ``F = U_k M V_kᵀ``."""
    return (U.T @ sB) @ (A @ V)


def erosion(M: Tensor, S: Tensor) -> float:
    """Erosion coefficient (§5b): ``e = ⟨ΔW, D_k⟩ / ‖D_k‖² = Σ_i σ_i M_ii / Σ_i σ_i²`` (0 for an empty
    subspace). Negative: the update turns the aligned directions back."""
    S = S.to(M.dtype)
    norm = float((S * S).sum())
    return float((S * torch.diagonal(M)).sum()) / norm if norm > 0 else 0.0


def realign_shift(M: Tensor, S: Tensor, c: float, beta: float) -> Tensor:
    """Re-alignment (§5b): ``Z = c (β Σ_k − M)``, so that ``X* = ΔW + U_k Z V_kᵀ = ΔW − c (F − β D_k)``."""
    return c * (beta * torch.diag(S.to(M.dtype)) - M)


def shift_block_factors(A: Tensor, sB: Tensor, U: Tensor, V: Tensor, Z: Tensor) -> tuple[Tensor, Tensor]:
    """Block form of ``X = ΔW + U_k Z V_kᵀ`` (re-alignment §5b, RESTA §5d), exact at rank ``r + k`` (module scale 1),
    in blocks that do not cancel: ``X = (P⊥ sB) A + U_k Y`` with ``Y = (U_kᵀ sB) A + Z V_kᵀ`` (``k × d_in``), so
    ``B' = [sB − U_k U_kᵀ sB | U_k]``, ``A' = [A ; Y]``.

    The same product as the spec's ``B' = [sB | U_k Z]``, ``A' = [A ; V_kᵀ]``. But where ``X`` is small against
    ``ΔW`` (re-alignment erasing ``F`` from an update that lies mostly in the subspace, RESTA adding ``γ D_k`` to an
    update along ``−D_k``) the spec's two blocks cancel, and rounding each to bf16 cost several % of ``X``. Here the
    in-subspace rows are summed in float64 before the cast, and the first block leaves the subspace."""
    UtB = U.T @ sB
    return torch.cat([A, UtB @ A + Z @ V.T], dim=0), torch.cat([sB - U @ UtB, U], dim=1)


def best_rank(A: Tensor, B: Tensor, r: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``r`` approximation of ``B A`` (Eckart–Young, §5b factored form) from the factors alone.

    Thin QR ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``; SVD ``R_b R_aᵀ = Ũ Σ̃ Ṽᵀ``; keep the top ``r``, balanced:
    ``B_r = Q_b Ũ_r Σ̃_r^½``, ``A_r = Σ̃_r^½ Ṽ_rᵀ Q_aᵀ``. Returns them and the dropped energy ``Σ_{i>r} σ̃_i²``.
    Fewer than ``r`` singular values (tiny layers) are padded with zero rank-one terms.
    """
    Qb, Rb = torch.linalg.qr(B)
    Qa, Ra = torch.linalg.qr(A.T)
    Ut, St, Vth = torch.linalg.svd(Rb @ Ra.T, full_matrices=False)
    keep = min(r, St.numel())
    root = St[:keep].sqrt()
    B_r = (Qb @ Ut[:, :keep]) * root
    A_r = root[:, None] * (Vth[:keep] @ Qa.T)
    if keep < r:
        B_r = torch.cat([B_r, B_r.new_zeros(B_r.shape[0], r - keep)], dim=1)
        A_r = torch.cat([A_r, A_r.new_zeros(r - keep, A_r.shape[1])], dim=0)
    return A_r, B_r, float((St[keep:] ** 2).sum())


# ---------------------------------------------------------------- dense updates (§6b, §10)


@dataclass(frozen=True)
class DenseSplit:
    """A dense update ``ΔW`` seen from the subspace: ``UᵀΔW`` ``(k, d_in)``, ``ΔW V`` ``(d_out, k)`` and
    ``M = UᵀΔW V`` ``(k, k)``, so that ``PΔW = U (UᵀΔW)``, ``ΔWQ = (ΔW V) Vᵀ`` and ``F = U M Vᵀ``; and ``‖ΔW‖²``."""

    dW: Tensor
    UtW: Tensor
    WV: Tensor
    M: Tensor
    total: float


def dense_split(dW: Tensor, U: Tensor, V: Tensor) -> DenseSplit:
    """Decomposition (§3) of a dense ``ΔW`` by its products with ``U`` and ``V``: no ``d × d`` matrix. ``‖ΔW‖²``
    is taken once here, in the one-pass way of ``‖D‖²`` (the energies and the score both need it)."""
    UtW = U.T @ dW
    return DenseSplit(dW=dW, UtW=UtW, WV=dW @ V, M=UtW @ V, total=squared_norm(dW))


def dense_energies(sp: DenseSplit) -> dict[str, float]:
    """Component energies (§3) of a dense update: ``e_F = ‖M‖²``, ``e_Hin = ‖UᵀΔW‖² − e_F``,
    ``e_Hout = ‖ΔW V‖² − e_F``, ``e_O = ‖ΔW‖² − ‖UᵀΔW‖² − ‖ΔW V‖² + e_F`` (orthogonality), clamped at 0."""

    def sq(x: Tensor) -> float:
        return float(torch.linalg.vector_norm(x, dtype=torch.float64) ** 2)

    total, pw, wq, f = sp.total, sq(sp.UtW), sq(sp.WV), sq(sp.M)
    return {"F": f, "H_in": max(pw - f, 0.0), "H_out": max(wq - f, 0.0), "O": max(total - pw - wq + f, 0.0)}


def dense_block(sp: DenseSplit, U: Tensor, V: Tensor, gamma_h: float, gamma_o: float) -> Tensor:
    """Closest safe update, exact (block) form (§4) of a dense ``ΔW``: ``X = F + γ_H H + γ_O O``, written
    ``X = γ_O ΔW + (γ_H − γ_O)(PΔW + ΔWQ) + (1 − 2γ_H + γ_O) F``."""
    X = gamma_o * sp.dW
    X += (gamma_h - gamma_o) * (U @ sp.UtW + sp.WV @ V.T)
    X += (1 - 2 * gamma_h + gamma_o) * (U @ sp.M @ V.T)
    return X


def realign_dense(dW: Tensor, U: Tensor, V: Tensor, Z: Tensor) -> Tensor:
    """Re-alignment (§5b) of a dense ``ΔW``: ``X* = ΔW + U_k Z V_kᵀ`` with ``Z = c (β Σ_k − M)``."""
    return torch.addmm(dW, U @ Z, V.T)  # one d_out × d_in result, not two


def safe_lora_score_dense(sp: DenseSplit, S: Tensor) -> float:
    """Safe LoRA score (§5) of a dense ``ΔW`` from the subspace: ``cos(vec(C_k ΔW), vec(ΔW))`` with
    ``C_k = U Σ² Uᵀ / ‖D‖_F``: ``Σ σ_i² ‖u_iᵀΔW‖² / (‖Σ² UᵀΔW‖ ‖ΔW‖)`` (0 for an empty subspace)."""
    if S.numel() == 0:
        return 0.0
    S2 = (S.double() ** 2)[:, None]
    UtW = sp.UtW.double()
    inner = float((S2 * UtW * UtW).sum())
    norms = float(torch.linalg.vector_norm(S2 * UtW)) * math.sqrt(sp.total)
    return inner / norms if norms > 0 else 0.0


def cosine(X: Tensor, Y: Tensor) -> float:
    """``cos(vec(X), vec(Y))``, 0 when either is zero (the Safe LoRA score of a dense ``ΔW`` with ``X = C ΔW``)."""
    inner = float((X * Y).sum(dtype=torch.float64))
    norms = float(torch.linalg.vector_norm(X, dtype=torch.float64) * torch.linalg.vector_norm(Y, dtype=torch.float64))
    return inner / norms if norms > 0 else 0.0


# ---------------------------------------------------------------- RESTA safety vector (§5d)


def resta_shift(S: Tensor, gamma: float) -> Tensor:
    """RESTA on an adapter (§5d): ``X = ΔW + γ D_k = ΔW + U_k Z V_kᵀ`` with ``Z = γ Σ_k`` (so the block and
    factored forms of §5b write it)."""
    return gamma * torch.diag(S)


def resta_dense(dW: Tensor, D: Tensor, gamma: float) -> Tensor:
    """RESTA on a full weight (§5d): ``X = ΔW + γ D``."""
    return torch.add(dW, D, alpha=gamma)
