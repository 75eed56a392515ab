"""RESTA, the safety-vector baseline (Bhardwaj et al., ACL 2024; DESIGN.md §5d): add ``γ`` times the
displacement back. Our ``D`` stands in for their vector from a shadow unalignment.

Full weights: ``X = ΔW + γ D`` (``D`` itself is read). Adapters: ``X = ΔW + γ D_k`` (the cacheable rank-``k``
truncation), ``block`` exact at rank ``r + k``, ``factored`` its best rank-``r`` approximation, as in §5b.
"""

from __future__ import annotations

import torch

from ..correction import dense_energies, dense_split, resta_dense, resta_shift, safe_lora_score_dense
from ..settings import Settings
from ..subspace import Subspace
from .base import Corrected, DenseUpdate, ShiftMethod, dense_after, dense_row


class Resta(ShiftMethod):
    name = "resta"
    grid = ("gamma",)
    dense_reads_displacement = True  # a full weight gets γ·D itself, not its truncation
    verb = "shifted by γ·D_k"

    def shift(self, M: torch.Tensor, S: torch.Tensor, settings: Settings) -> torch.Tensor | None:
        """``Z = γ Σ_k``; none at ``γ = 0``, so that the input is written bit for bit."""
        return resta_shift(S, settings.gamma) if settings.gamma > 0.0 else None

    def fields(self, settings: Settings) -> dict:
        return {"gamma_resta": settings.gamma}

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """``X = ΔW + γ D`` exactly, whatever ``--form``."""
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        fields = self.fields(settings)
        X = resta_dense(update.dW, D, settings.gamma) if settings.gamma > 0.0 and D is not None else None
        if X is not None:
            fields.update(dense_after(sub, X, sum(energies.values())))
        row = dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), energies, **fields)
        return Corrected(row, W=update.written(X))

    def words(self, settings: dict, form: str) -> str:
        return (f"the RESTA safety vector ({form} form, γ = {settings['gamma']:g}: γ times the aligned displacement "
                "added to the update; D_k, its rank-k part, on LoRA factors)")


METHOD = Resta()
