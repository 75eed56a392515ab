"""Re-alignment (DESIGN.md §5b), beyond the paper: act on the fully aligned block ``F = P ΔW Q`` itself.

``X* = argmin ‖X − ΔW‖² + λ ‖P X Q − β D_k‖² = ΔW − c (F − β D_k)``, ``c = λ/(1+λ)``: the in-subspace part
of the update is pulled toward ``β D_k`` (``β = 0``: erased softly) and ``H_in``, ``H_out``, ``O`` are kept.
``block`` writes it exactly at rank ``r + k``; ``factored`` writes its best rank-``r`` approximation.
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
    realign_dense,
    realign_shift,
    realign_strength,
    safe_lora_score_dense,
    safe_lora_score_subspace,
    split,
    subspace_block,
)
from ..settings import Settings
from ..subspace import Subspace
from .base import (
    Corrected,
    DenseUpdate,
    Method,
    after,
    dense_after,
    dense_row,
    in_float64,
    lambda_words,
    module_row,
    written,
)


class Realign(Method):
    name = "realign"
    grid = ("lam", "beta")
    forms = ("factored", "block")
    infinite_lambda = True  # c = 1: F replaced by β D_k

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        A, B, U, V = in_float64(module, sub)
        sB = module.scaling * B
        score = safe_lora_score_subspace(A, B, U, sub.S)
        energies = component_energies(split(A, sB, U, V))
        total = sum(energies.values())
        c = realign_strength(settings.lam)
        fields = {"c": c, "beta": settings.beta}
        block = settings.form == "block"
        if c == 0.0 or (sub.k == 0 and not block):  # X* = ΔW: the input bit for bit
            truncation = None if block else 0.0
            return Corrected(module_row(module, sub, A, sB, score, energies, truncation_loss=truncation, **fields),
                             module.A, module.B)  # fmt: skip
        Z = realign_shift(subspace_block(A, sB, U, V), sub.S.double(), c, settings.beta)
        A_new, B_new = realign_block_factors(A, sB, U, V, Z)  # exact, rank r + k, scale 1
        if block:
            row = module_row(module, sub, A, sB, score, energies, rank_after=module.rank + sub.k,
                             **after(sub, A_new, B_new, total), **fields)  # fmt: skip
            return Corrected(row, *written(module, A_new, B_new))
        A_new, B_new, dropped = best_rank(A_new, B_new, module.rank)
        row = module_row(module, sub, A, sB, score, energies, truncation_loss=dropped / total if total else 0.0,
                         **after(sub, A_new, B_new, total), **fields)  # fmt: skip
        return Corrected(row, *written(module, A_new, B_new / module.scaling))  # the config's scaling is kept

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """``X* = ΔW + U_k Z V_kᵀ`` exactly (§5b), whatever ``--form``."""
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        c = realign_strength(settings.lam)
        fields = {"c": c, "beta": settings.beta}
        X = None
        if c > 0.0 and sub.k > 0:
            Z = realign_shift(sp.M.double(), sub.S.double(), c, settings.beta).to(sp.M.dtype)
            X = realign_dense(update.dW, sub.U, sub.V, Z)
            fields.update(dense_after(sub, X, sum(energies.values())))
        row = dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), energies, **fields)
        return Corrected(row, W=update.written(X))

    def form_words(self, rank_changed: bool) -> str:
        if rank_changed:
            return "it is written exactly, at rank r + k: the LoRA ranks and `adapter_config.json` changed."
        return ("it is written as its best rank-r approximation, so tensor names, shapes, dtypes and "
                "`adapter_config.json` are unchanged and it loads wherever the input did.")

    def words(self, settings: dict, form: str) -> str:
        return (f"re-alignment ({form} form, λ = {lambda_words(settings['lambda'])}, β = {settings['beta']:g}: the "
                "in-subspace part of the update pulled toward β·D_k, the rest kept)")  # fmt: skip


METHOD = Realign()
