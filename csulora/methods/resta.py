"""RESTA, the safety-vector baseline (Bhardwaj et al., ACL 2024; DESIGN.md §5d): add ``γ`` times the
displacement back. Our ``D`` stands in for their vector from a shadow unalignment.

Full weights: ``X = ΔW + γ D`` (``D`` itself is read). Adapters: ``X = ΔW + γ D_k`` (the cacheable rank-``k``
truncation), ``block`` exact at rank ``r + k``, ``factored`` its best rank-``r`` approximation, as in §5b.
"""

from __future__ import annotations

import torch

from ..adapters import LoraModule
from ..correction import (
    best_rank,
    component_energies,
    dense_energies,
    dense_split,
    realign_block_factors,
    resta_dense,
    resta_shift,
    safe_lora_score_dense,
    safe_lora_score_subspace,
    split,
)
from ..settings import Settings
from ..subspace import Subspace
from .base import Corrected, DenseUpdate, Method, after, dense_after, dense_row, in_float64, module_row, written


class Resta(Method):
    name = "resta"
    grid = ("gamma",)
    forms = ("factored", "block")
    dense_reads_displacement = True  # a full weight gets γ·D itself, not its truncation
    verb = "shifted by γ·D_k"

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        A, B, U, V = in_float64(module, sub)
        sB = module.scaling * B
        score = safe_lora_score_subspace(A, B, U, sub.S)
        energies = component_energies(split(A, sB, U, V))
        total = sum(energies.values())
        block, gamma = settings.form == "block", settings.gamma
        fields = {"gamma_resta": gamma}
        if gamma == 0.0 or (sub.k == 0 and not block):  # X = ΔW: the input bit for bit
            return Corrected(module_row(module, sub, A, sB, score, energies, truncation_loss=None if block else 0.0,
                                        **fields), module.A, module.B)  # fmt: skip
        A_new, B_new = realign_block_factors(A, sB, U, V, resta_shift(sub.S.double(), gamma))
        if block:
            row = module_row(module, sub, A, sB, score, energies, rank_after=module.rank + sub.k,
                             **after(sub, A_new, B_new, total), **fields)  # fmt: skip
            return Corrected(row, *written(module, A_new, B_new))
        A_new, B_new, dropped = best_rank(A_new, B_new, module.rank)
        row = module_row(module, sub, A, sB, score, energies, truncation_loss=dropped / total if total else 0.0,
                         **after(sub, A_new, B_new, total), **fields)  # fmt: skip
        return Corrected(row, *written(module, A_new, B_new / module.scaling))

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """``X = ΔW + γ D`` exactly, whatever ``--form``."""
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        fields: dict = {"gamma_resta": settings.gamma}
        X = None
        if settings.gamma > 0.0 and D is not None:
            X = resta_dense(update.dW, D, settings.gamma)
            fields.update(dense_after(sub, X, sum(energies.values())))
        row = dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), energies, **fields)
        return Corrected(row, W=update.written(X))

    def form_words(self, rank_changed: bool) -> str:
        if rank_changed:
            return "it is written exactly, at rank r + k: the LoRA ranks and `adapter_config.json` changed."
        return ("it is written as its best rank-r approximation, so tensor names, shapes, dtypes and "
                "`adapter_config.json` are unchanged and it loads wherever the input did.")

    def words(self, settings: dict, form: str) -> str:
        return (f"the RESTA safety vector ({form} form, γ = {settings['gamma']:g}: γ times the aligned displacement "
                "added to the update; D_k, its rank-k part, on LoRA factors)")


METHOD = Resta()
