"""RESTA, the safety-vector baseline (Bhardwaj et al., ACL 2024; DESIGN.md §5d): add ``γ`` times the
displacement back. Our ``D`` stands in for their vector from a shadow unalignment.

Full weights: ``X = ΔW + γ D`` (``D`` itself is read). Adapters: ``X = ΔW + γ D_k`` (the cacheable rank-``k``
truncation), ``block`` exact at rank ``r + k``, ``factored`` its best rank-``r`` approximation, as in §5b.
"""

from __future__ import annotations

import torch

from ..correction import DenseSplit, resta_dense, resta_shift
from ..settings import Settings
from ..subspace import Subspace
from .base import ShiftMethod


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

    def dense_shift(
        self, sp: DenseSplit, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> torch.Tensor | None:
        """``X = ΔW + γ D`` exactly (§5d)."""
        return resta_dense(sp.dW, D, settings.gamma) if settings.gamma > 0.0 and D is not None else None

    def words(self, settings: dict, form: str) -> str:
        return (f"the RESTA safety vector ({form} form, γ = {settings['gamma']:g}: γ times the aligned displacement "
                "added to the update; D_k, its rank-k part, on LoRA factors)")


METHOD = Resta()
