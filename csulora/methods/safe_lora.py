"""Safe LoRA, the baseline (Hsu et al., 2024; DESIGN.md §5): ``B ← C B`` with ``C = D Dᵀ / ‖D‖_F`` in the
modules whose score ``cos(vec(C B A), vec(B A))`` is ``≤ τ``, or in the ``n`` lowest-scoring ones.

``C B = D (Dᵀ B) / ‖D‖_F`` needs ``D`` itself, so this method reads it (no cache) and its score is exact.
"""

from __future__ import annotations

import dataclasses

import torch

from ..correction import cosine, dense_energies, dense_split, safe_lora_cosine, safe_lora_project
from ..io.adapters import LoraModule
from ..reports.report import ModuleRow
from ..settings import Settings
from ..subspace import Subspace
from .base import Corrected, DenseUpdate, Method, dense_row, in_float64, module_row, write


class SafeLora(Method):
    name = "safe-lora"
    grid = ("threshold",)
    reads_displacement = True
    dense_reads_displacement = True
    verb = "projected"

    def _scored(self, module: LoraModule, sub: Subspace, D: torch.Tensor) -> tuple[torch.Tensor | None, ModuleRow]:
        """``C·B`` (``None`` where ``D = 0``) and the module's row with its exact score."""
        A, B, _, _ = in_float64(module, sub)
        B_in = module.B.to(sub.U.device)
        # C is undefined where D = 0; ‖D‖_F² is the subspace's one-pass float64 sum, not a float32 norm
        CB = safe_lora_project(B_in, D, sub.total_energy) if sub.total_energy else None
        score = safe_lora_cosine(CB, B_in, A) if CB is not None else 0.0
        return CB, module_row(module, sub, A, module.scaling * B, score)

    def before(self, module: LoraModule, sub: Subspace, D: torch.Tensor | None) -> Corrected:
        return Corrected(self._scored(module, sub, D)[1])  # the score exact, as this method reports it

    def before_dense(self, update: DenseUpdate, sub: Subspace, D: torch.Tensor | None) -> Corrected:
        return Corrected(self._scored_dense(update, sub, D)[1])

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        CB, row = self._scored(module, sub, D)  # row unchanged until finish() selects the module
        if CB is None:
            return Corrected(row, module.A, module.B)
        # what B ← C·B would write, cast and measured now while the subspace is in memory, on a copy of the row
        candidate = dataclasses.replace(row, notes=list(row.notes))
        A_out, B_out = write(module, sub, module.A, CB, module.scaling, candidate)
        return Corrected(row, module.A, module.B, pending=(A_out, B_out, candidate, len(row.notes)))

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """``ΔW ← C ΔW = D (Dᵀ ΔW) / ‖D‖_F`` when selected; the score ``cos(vec(C ΔW), vec(ΔW))`` is exact."""
        sub = update.subspace(sub)
        CdW, row = self._scored_dense(update, sub, D)
        if CdW is None:
            return Corrected(row, W=update.write(None, sub, row))
        candidate = dataclasses.replace(row, notes=list(row.notes))
        return Corrected(row, W=update.module.W, pending=(None, update.write(CdW, sub, candidate), candidate,
                                                                len(row.notes)))

    def _scored_dense(
        self, update: DenseUpdate, sub: Subspace, D: torch.Tensor
    ) -> tuple[torch.Tensor | None, ModuleRow]:
        """``C ΔW`` (``None`` where ``D = 0``) and the dense module's row with its exact score."""
        sub = update.subspace(sub)
        sp = dense_split(update.dW, sub.U, sub.V)
        CdW = safe_lora_project(update.dW, D.to(update.dW.dtype), sub.total_energy) if sub.total_energy else None
        score = cosine(CdW, update.dW) if CdW is not None else 0.0
        return CdW, dense_row(update, sub, sp, score, dense_energies(sp))

    def finish(self, results: dict[str, Corrected], settings: Settings) -> None:
        scores = {name: res.row.safe_lora_score for name, res in results.items() if res.pending is not None}
        for name in selection(scores, settings.threshold, settings.top_n):
            res = results[name]
            first, second, candidate, noted = res.pending
            if res.W is not None:
                res.W = second
            else:
                res.A, res.B = first, second
            for field in AFTER_FIELDS:  # measured on what B ← C·B writes
                setattr(res.row, field, getattr(candidate, field))
            res.row.notes += candidate.notes[noted:]
            res.row.safe_lora_projected = True
            res.row.notes.append("Safe LoRA projection " + ("ΔW ← C·ΔW" if res.W is not None else "B ← C·B"))
        for res in results.values():
            res.pending = None

    def words(self, settings: dict, form: str) -> str:
        rule = f"the {settings['top_n']} lowest-scoring modules" if settings.get("top_n") else (
            f"score ≤ {settings.get('threshold')}")  # fmt: skip
        return f"the Safe LoRA projection (B ← C·B for {rule})"


AFTER_FIELDS = ("energy_after", "rho_after", "erosion_after", "write_error", "correction_lost", "correction_norm")


def selection(scores: dict[str, float], threshold: float, top_n: int | None) -> list[str]:
    """Safe LoRA's rule (§5): modules with score ``≤ τ``, or the ``n`` lowest-scoring (ties by name); sorted."""
    if top_n is not None:
        return sorted(sorted(scores, key=lambda name: (scores[name], name))[:top_n])
    return sorted(name for name, score in scores.items() if score <= threshold)


METHOD = SafeLora()
