"""Safe LoRA, the baseline (Hsu et al., 2024; DESIGN.md §5): ``B ← C B`` with ``C = D Dᵀ / ‖D‖_F`` in the
modules whose score ``cos(vec(C B A), vec(B A))`` is ``≤ τ``, or in the ``n`` lowest-scoring ones.

``C B = D (Dᵀ B) / ‖D‖_F`` needs ``D`` itself, so this method reads it (no cache) and its score is exact.
"""

from __future__ import annotations

import torch

from ..adapters import LoraModule
from ..correction import cosine, dense_energies, dense_split, safe_lora_cosine, safe_lora_project
from ..precision import cast_back
from ..settings import Settings
from ..subspace import Subspace
from .base import Corrected, DenseUpdate, Method, after, dense_after, dense_row, in_float64, module_row


class SafeLora(Method):
    name = "safe-lora"
    grid = ("threshold",)
    reads_displacement = True
    dense_reads_displacement = True
    verb = "projected"

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        A, B, _, _ = in_float64(module, sub)
        B_in = module.B.to(sub.U.device)
        CB = safe_lora_project(B_in, D) if sub.total_energy else None  # C is undefined where D = 0
        score = safe_lora_cosine(CB, B_in, A) if CB is not None else 0.0
        row = module_row(module, sub, A, module.scaling * B, score)  # unchanged until finish() selects it
        if CB is None:
            return Corrected(row, module.A, module.B)
        # what B ← C·B would make of the module, measured now while the subspace is in memory
        candidate = after(sub, A, module.scaling * CB.double(), row.update_norm**2)
        return Corrected(row, module.A, module.B, pending=(cast_back(CB, module.B.dtype, module.key("B")), candidate))

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """``ΔW ← C ΔW = D (Dᵀ ΔW) / ‖D‖_F`` when selected; the score ``cos(vec(C ΔW), vec(ΔW))`` is exact."""
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        CdW = safe_lora_project(update.dW, D) if sub.total_energy else None
        score = cosine(CdW, update.dW) if CdW is not None else 0.0
        row = dense_row(update, sub, sp, score, energies)
        if CdW is None:
            return Corrected(row, W=update.written(None))
        candidate = dense_after(sub, CdW, row.update_norm**2)
        return Corrected(row, W=update.written(None), pending=(update.written(CdW), candidate))

    def finish(self, results: dict[str, Corrected], settings: Settings) -> None:
        scores = {name: res.row.safe_lora_score for name, res in results.items() if res.pending is not None}
        for name in selection(scores, settings.threshold, settings.top_n):
            res = results[name]
            projected, measured = res.pending
            if res.W is not None:
                res.W = projected
            else:
                res.B = projected
            res.row.rho_after, res.row.erosion_after = measured["rho_after"], measured["erosion_after"]
            res.row.safe_lora_projected = True
            res.row.notes.append("Safe LoRA projection " + ("ΔW ← C·ΔW" if res.W is not None else "B ← C·B"))
        for res in results.values():
            res.pending = None

    def words(self, settings: dict, form: str) -> str:
        rule = f"the {settings['top_n']} lowest-scoring modules" if settings.get("top_n") else (
            f"score ≤ {settings.get('threshold')}")  # fmt: skip
        return f"the Safe LoRA projection (B ← C·B for {rule})"


def selection(scores: dict[str, float], threshold: float, top_n: int | None) -> list[str]:
    """Safe LoRA's rule (§5): modules with score ``≤ τ``, or the ``n`` lowest-scoring (ties by name); sorted."""
    if top_n is not None:
        return sorted(sorted(scores, key=lambda name: (scores[name], name))[:top_n])
    return sorted(name for name, score in scores.items() if score <= threshold)


METHOD = SafeLora()
