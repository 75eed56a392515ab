"""The correction of one module by each method: CSULoRA's factored and block forms (DESIGN.md §4) and
Safe LoRA (§5).

Each works on one module while its subspace (and, for Safe LoRA, its displacement ``D``) is in memory;
what needs every module (Safe LoRA's selection, the block form's config) runs once afterwards.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from .adapters import Adapter, LoraModule, cast_back, pattern_value
from .correction import (
    attenuation,
    block_attenuation,
    block_energies,
    block_update,
    component_energies,
    corrected_energies,
    factored_update,
    relative_energies,
    split,
)
from .errors import CsuloraError
from .report import ModuleRow
from .subspace import Subspace

METHODS = ("csulora", "safe-lora")
FORMS = ("factored", "block")


def _row(module: LoraModule, sub: Subspace, energies: dict[str, float], score: float, **fields) -> ModuleRow:
    total = sum(energies.values())
    notes = (["empty subspace"] if sub.k == 0 else []) + (["zero update"] if total == 0 else [])
    return ModuleRow(
        module=module.name,
        shape=[module.B.shape[0], module.A.shape[1]],
        rank=module.rank,
        scaling=module.scaling,
        k=sub.k,
        captured=sub.captured_fraction,
        displacement_norm=math.sqrt(sub.total_energy),
        update_norm=math.sqrt(total),
        rho=relative_energies(energies),
        safe_lora_score=score,
        notes=notes,
        **fields,
    )


def _in_float64(module: LoraModule, sub: Subspace) -> tuple[torch.Tensor, ...]:
    """``A``, ``B``, ``U``, ``V`` in float64 on the subspace's device: all arithmetic on factors is done wide."""
    device = sub.U.device
    return module.A.to(device, torch.float64), module.B.to(device, torch.float64), sub.U.double(), sub.V.double()


def factored_module(
    module: LoraModule, sub: Subspace, lam: float, score: float
) -> tuple[ModuleRow, torch.Tensor, torch.Tensor]:
    """Factored form (§4) of one module: rank, scaling and config kept; a side with ``γ = 1`` is returned as is."""
    A, B, U, V = _in_float64(module, sub)
    energies = component_energies(split(A, module.scaling * B, U, V))
    gamma_out, gamma_in = attenuation(relative_energies(energies), lam)
    A_new, B_new = factored_update(A, B, U, V, gamma_out, gamma_in)
    row = _row(
        module, sub, energies, score, gamma_in=gamma_in, gamma_out=gamma_out,
        rho_after=relative_energies(corrected_energies(energies, gamma_out, gamma_in), sum(energies.values())),
    )  # fmt: skip
    A_out = module.A if gamma_in == 1.0 else cast_back(A_new, module.A.dtype, module.key("A"))
    B_out = module.B if gamma_out == 1.0 else cast_back(B_new, module.B.dtype, module.key("B"))
    return row, A_out, B_out


def block_module(
    module: LoraModule, sub: Subspace, lam: float, score: float
) -> tuple[ModuleRow, torch.Tensor, torch.Tensor]:
    """Block form (§4) of one module: rank-``2r`` factors with the scaling folded into ``B'`` (scale 1)."""
    A, B, U, V = _in_float64(module, sub)
    sp = split(A, module.scaling * B, U, V)
    energies = component_energies(sp)
    gamma_h, gamma_o = block_attenuation(relative_energies(energies), lam)
    A_new, B_new = block_update(sp, gamma_h, gamma_o)
    row = _row(
        module, sub, energies, score,
        gamma_in=gamma_h, gamma_out=gamma_h, gamma_off=gamma_o, rank_after=2 * module.rank,
        rho_after=relative_energies(block_energies(energies, gamma_h, gamma_o), sum(energies.values())),
    )  # fmt: skip
    return row, cast_back(A_new, module.A.dtype, module.key("A")), cast_back(B_new, module.B.dtype, module.key("B"))


def block_config(adapter: Adapter, rows: list[ModuleRow]) -> dict:
    """``adapter_config.json`` for the block form: every module gets rank ``2 r_m`` and scale exactly 1.

    Global ``r`` and ``lora_alpha`` become ``2r`` and rsLoRA is turned off (``α/r = 1``). Modules whose rank
    differs from the global one get exact-name entries in ``rank_pattern`` and the same in ``alpha_pattern``,
    so their scale is ``2r_m / 2r_m = 1`` whatever the order PEFT tries the keys in. The input's own patterns
    and rsLoRA are folded into ``B'`` already.
    """
    config = dict(adapter.config)
    r = 2 * int(config["r"])
    ranks = {row.module: row.output_rank for row in rows}
    patterns = {re.escape(name): rank for name, rank in sorted(ranks.items()) if rank != r}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=patterns, alpha_pattern=dict(patterns))
    for name, rank in ranks.items():  # a name that is a dotted suffix of another could make keys collide
        if pattern_value(patterns, name, r) != rank:
            raise CsuloraError(
                f"{adapter.path}: module {name} cannot be given its own rank in rank_pattern (its name matches "
                "another module's key); use --form factored"
            )
    return config


@dataclass
class SafeLoraCandidate:
    """What Safe LoRA would make of one module: ``B ← C B`` and the energies of the result."""

    B: torch.Tensor
    rho_after: dict[str, float]


def safe_lora_candidate(
    module: LoraModule, sub: Subspace, CB: torch.Tensor, update_norm: float
) -> SafeLoraCandidate:
    """What ``B ← C·B`` (§5) makes of the module: the new factor, and the components of ``s·C·B·A`` in the
    CSULoRA subspace (§3) relative to the input's ``‖ΔW‖² = update_norm²``."""
    A, _, U, V = _in_float64(module, sub)
    after = component_energies(split(A, module.scaling * CB.double(), U, V))
    B_new = cast_back(CB, module.B.dtype, module.key("B"))
    return SafeLoraCandidate(B=B_new, rho_after=relative_energies(after, update_norm**2))


def safe_lora_selection(scores: dict[str, float], threshold: float, top_n: int | None) -> list[str]:
    """Safe LoRA's rule (§5): modules with score ``≤ τ``, or the ``n`` lowest-scoring (ties by name); sorted."""
    if top_n is not None:
        return sorted(sorted(scores, key=lambda name: (scores[name], name))[:top_n])
    return sorted(name for name, score in scores.items() if score <= threshold)


def apply_safe_lora(
    rows: dict[str, ModuleRow],
    tensors: dict[str, torch.Tensor],
    candidates: dict[str, tuple[str, SafeLoraCandidate]],
    threshold: float,
    top_n: int | None,
) -> None:
    """Replace ``B`` by ``C B`` in the selected modules; ``candidates`` maps module name to (B key, candidate)."""
    scores = {name: rows[name].safe_lora_score for name in candidates}
    for name in safe_lora_selection(scores, threshold, top_n):
        key, cand = candidates[name]
        tensors[key] = cand.B
        rows[name].rho_after = cand.rho_after
        rows[name].safe_lora_projected = True
        rows[name].notes.append("Safe LoRA projection B ← C·B")
