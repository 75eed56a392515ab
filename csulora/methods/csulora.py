"""CSULoRA, the paper's method (DESIGN.md §4): attenuate what leaves the safety subspace, keep ``F`` exactly.

``factored`` (default): ``B' = (P + γ_out P⊥) B``, ``A' = A (Q + γ_in Q⊥)``, rank and config kept.
``block``: the matrix-level problem solved exactly at rank ``2r``.
"""

from __future__ import annotations

import torch

from ..correction import (
    attenuation,
    block_attenuation,
    block_update,
    component_energies,
    dense_block,
    dense_energies,
    dense_split,
    factored_update,
    relative_energies,
    safe_lora_score_dense,
    safe_lora_score_subspace,
    split,
)
from ..io.adapters import LoraModule
from ..settings import Settings
from ..subspace import Subspace
from .base import Corrected, DenseUpdate, Method, dense_row, in_float64, lambda_words, module_row, write


class Csulora(Method):
    name = "csulora"
    forms = ("factored", "block")
    infinite_lambda = True  # λ → ∞ is the two-sided hard projection onto F

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        A, B, U, V = in_float64(module, sub)
        sB = module.scaling * B
        # the score from the subspace, so that cached and computing runs agree (docs/scale.md)
        score = safe_lora_score_subspace(A, B, U, sub.S)
        sp = split(A, sB, U, V)
        energies = component_energies(sp)
        rho = relative_energies(energies)
        if settings.lam == 0:  # both forms: the input bit for bit, its rank and config too (§4)
            return Corrected(module_row(module, sub, A, sB, score, energies), module.A, module.B)
        # "after" values are measured on the factors as written (methods/base.write), not predicted
        if settings.form == "block":
            gamma_h, gamma_o = block_attenuation(rho, settings.lam)
            A_new, B_new = block_update(sp, gamma_h, gamma_o)
            row = module_row(module, sub, A, sB, score, energies, gamma_in=gamma_h, gamma_out=gamma_h,
                             gamma_off=gamma_o, rank_after=2 * module.rank)  # fmt: skip
            return Corrected(row, *write(module, sub, A_new, B_new, 1.0, row))
        gamma_out, gamma_in = attenuation(rho, settings.lam)
        A_new, B_new = factored_update(A, B, U, V, gamma_out, gamma_in)
        row = module_row(module, sub, A, sB, score, energies, gamma_in=gamma_in, gamma_out=gamma_out)
        # a side with γ = 1 comes back as the input tensor itself: λ = 0 writes the input bit for bit
        A_keep, B_keep = module.A if gamma_in == 1.0 else A_new, module.B if gamma_out == 1.0 else B_new
        return Corrected(row, *write(module, sub, A_keep, B_keep, module.scaling, row))

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """The exact (block) form on a dense update, whatever ``--form``: ``X = F + γ_H H + γ_O O``."""
        sub = update.subspace(sub)
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        gamma_h, gamma_o = block_attenuation(relative_energies(energies), settings.lam)
        X = None if gamma_h == gamma_o == 1.0 else dense_block(sp, sub.U, sub.V, gamma_h, gamma_o)
        row = dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), energies, gamma_in=gamma_h,
                        gamma_out=gamma_h, gamma_off=gamma_o)  # fmt: skip
        return Corrected(row, W=update.write(X, sub, row))

    def block_rank(self, ranks: list[int], config: dict) -> int:
        return 2 * int(config["r"])

    def words(self, settings: dict, form: str) -> str:
        return f"CSULoRA (closest safe update, {form} form, λ = {lambda_words(settings['lambda'])})"


METHOD = Csulora()
