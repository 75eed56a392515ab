"""Re-alignment (DESIGN.md §5b), beyond the paper: act on the fully aligned block ``F = P ΔW Q`` itself.

``X* = argmin ‖X − ΔW‖² + λ ‖P X Q − β D_k‖² = ΔW − c (F − β D_k)``, ``c = λ/(1+λ)``: the in-subspace part
of the update is pulled toward ``β D_k`` (``β = 0``: erased softly) and ``H_in``, ``H_out``, ``O`` are kept.
``block`` writes it exactly at rank ``r + k``; ``factored`` writes its best rank-``r`` approximation.
"""

from __future__ import annotations

import torch

from ..correction import DenseSplit, realign_dense, realign_shift, realign_strength
from ..settings import Settings
from ..subspace import Subspace
from .base import ShiftMethod, lambda_words


class Realign(ShiftMethod):
    name = "realign"
    grid = ("lam", "beta")
    infinite_lambda = True  # c = 1: F replaced by β D_k

    def shift(self, M: torch.Tensor, S: torch.Tensor, settings: Settings) -> torch.Tensor | None:
        """``Z = c (β Σ_k − M)``; none at ``c = 0`` (``λ = 0``), so that the input is written bit for bit."""
        c = realign_strength(settings.lam)
        return realign_shift(M, S, c, settings.beta) if c > 0.0 else None

    def fields(self, settings: Settings) -> dict:
        return {"c": realign_strength(settings.lam), "beta": settings.beta}

    def dense_shift(
        self, sp: DenseSplit, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``X* = ΔW + U_k Z V_kᵀ`` exactly (§5b)."""
        Z = self.shift(sp.M.double(), sub.S.double(), settings) if sub.k > 0 else None
        return None if Z is None else realign_dense(sp.dW, sub.U, sub.V, Z.to(sp.M.dtype))

    def words(self, settings: dict, form: str) -> str:
        return (f"re-alignment ({form} form, λ = {lambda_words(settings['lambda'])}, β = {settings['beta']:g}: the "
                "in-subspace part of the update pulled toward β·D_k, the rest kept)")  # fmt: skip


METHOD = Realign()
