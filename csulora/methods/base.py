"""The interface every method implements, and what they share: the report row, float64 factors, dense
updates, the block-form config.

``api.py`` streams the modules one at a time and calls ``correct`` (a LoRA module: factors) or
``correct_dense`` (a full weight: ``ΔW = W − W_a``, DESIGN.md §6b, §10) while that module's subspace (and, for
a method with ``reads_displacement``, its displacement ``D``) is in memory; ``finish`` then sees every module
once (Safe LoRA's selection needs every score). Adding a method is one new module here with a ``Method``
subclass, listed in ``methods/__init__.py``, and its defaults in ``settings.METHOD_DEFAULTS``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..adapters import Adapter, DenseModule, LoraModule, pattern_value
from ..correction import (
    DenseSplit,
    best_rank,
    component_energies,
    dense_energies,
    dense_split,
    erosion,
    relative_energies,
    safe_lora_score_dense,
    safe_lora_score_subspace,
    shift_block_factors,
    split,
    subspace_block,
)
from ..errors import CsuloraError
from ..precision import cast_back, widen
from ..report import ModuleRow
from ..settings import Settings
from ..subspace import Subspace


@dataclass
class Corrected:
    """One module after its method: the report row and what to write (the input's dtype, on the CPU): the
    factors of a LoRA module, meant for its own scaling (drop-in forms) or for scale 1 (block forms, whose config
    gives every module scale 1), or the full weight ``W`` of a dense one. ``pending`` is what ``finish`` may
    still apply."""

    row: ModuleRow
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    pending: Any = field(default=None, repr=False)
    W: torch.Tensor | None = None


class Method:
    name: str = ""
    forms: tuple[str, ...] = ("factored",)
    reads_displacement: bool = False  # correct() needs D itself, not only its (cacheable) subspace
    dense_reads_displacement: bool = False  # correct_dense() needs D itself
    infinite_lambda: bool = False  # --lambda inf is meaningful
    grid: tuple[str, ...] = ("lam",)  # the Settings fields a sweep varies (--lambdas, --betas, --thresholds)
    verb = "attenuated"  # what the drop-in form did to the parts that leave the subspace (model card)

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        raise NotImplementedError

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """The method's exact form on a dense update (DESIGN.md §6b)."""
        raise NotImplementedError

    def finish(self, results: dict[str, Corrected], settings: Settings) -> None:
        """Whole-adapter step after every module (default: none)."""

    def words(self, settings: dict, form: str) -> str:
        """What was done, for the model card and the reports (``settings`` as the report records them)."""
        return self.name

    def form_words(self, rank_changed: bool) -> str:
        """How the result is written, for the model card."""
        if rank_changed:
            return ("the parts of each layer's update that leave it were attenuated. The block form is exact at "
                    "rank 2r: the LoRA ranks and `adapter_config.json` changed (the scaling is folded into `lora_B`).")
        return (f"the parts of each layer's update that leave it were {self.verb}; tensor names, shapes, dtypes and "
                "`adapter_config.json` are unchanged, so it loads wherever the input did.")

    def block_rank(self, ranks: list[int], config: dict) -> int:
        """The global ``r`` of a block-form config: the most common written rank (ties: the larger)."""
        counts = Counter(ranks)
        return max(counts, key=lambda r: (counts[r], r))


class ShiftMethod(Method):
    """A method whose update is ``X = ΔW + U_k Z V_kᵀ`` (re-alignment §5b, RESTA §5d): ``shift`` gives ``Z`` from
    ``M = U_kᵀ sBA V_k`` and ``Σ_k`` (``None``: ``X = ΔW``). The block form writes ``X`` exactly at rank ``r + k``;
    the factored form its best rank-``r`` approximation, with the truncation loss reported."""

    forms = ("factored", "block")

    def shift(self, M: torch.Tensor, S: torch.Tensor, settings: Settings) -> torch.Tensor | None:
        raise NotImplementedError

    def fields(self, settings: Settings) -> dict:
        """What the report records of the method's settings, per module."""
        return {}

    def correct(self, module: LoraModule, sub: Subspace, settings: Settings, D: torch.Tensor | None) -> Corrected:
        A, B, U, V = in_float64(module, sub)
        sB = module.scaling * B
        score = safe_lora_score_subspace(A, B, U, sub.S)
        energies = component_energies(split(A, sB, U, V))
        total = sum(energies.values())
        block, fields = settings.form == "block", self.fields(settings)
        Z = self.shift(subspace_block(A, sB, U, V), sub.S.double(), settings) if sub.k or block else None
        if Z is None:  # X = ΔW: the input bit for bit
            row = module_row(module, sub, A, sB, score, energies, truncation_loss=None if block else 0.0, **fields)
            return Corrected(row, module.A, module.B)
        A_new, B_new = shift_block_factors(A, sB, U, V, Z)  # exact, rank r + k, scale 1
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
        """The exact form on a full weight, whatever ``--form`` (DESIGN.md §6b): ``X`` from ``dense_shift``."""
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        fields = self.fields(settings)
        X = self.dense_shift(sp, sub, settings, D)
        if X is not None:
            fields.update(dense_after(sub, X, sum(energies.values())))
        row = dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), energies, **fields)
        return Corrected(row, W=update.written(X))

    def dense_shift(
        self, sp: DenseSplit, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The method's ``X`` for the dense update ``sp.dW`` (``None``: ``X = ΔW``, written bit for bit)."""
        raise NotImplementedError

    def form_words(self, rank_changed: bool) -> str:
        if rank_changed:
            return "it is written exactly, at rank r + k: the LoRA ranks and `adapter_config.json` changed."
        return ("it is written as its best rank-r approximation, so tensor names, shapes, dtypes and "
                "`adapter_config.json` are unchanged and it loads wherever the input did.")


@dataclass
class DenseUpdate:
    """A dense module ready for its method: ``ΔW = W − W_a`` in float32 on the subspace's device, with ``W_a``
    (float32, same device) and the module (its saved weight ``W``, as read)."""

    module: DenseModule
    W_a: torch.Tensor
    dW: torch.Tensor

    @classmethod
    def of(cls, module: DenseModule, W_a: torch.Tensor, device: torch.device) -> DenseUpdate:
        W_a = widen(W_a).to(device)
        return cls(module, W_a, widen(module.W).to(device).sub_(W_a))

    def written(self, X: torch.Tensor | None) -> torch.Tensor:
        """The weight to write: ``W_a + X`` cast once to the saved dtype; ``None``: the saved weight itself."""
        if X is None:
            return self.module.W
        return cast_back(self.W_a + X, self.module.W.dtype, self.module.key)


def dense_after(sub: Subspace, X: torch.Tensor, update_energy: float) -> dict[str, float]:
    """``rho_after`` and ``erosion_after`` of a written dense update ``X``, in units of the input's ``‖ΔW‖²``."""
    sp = dense_split(X, sub.U, sub.V)
    return {
        "rho_after": relative_energies(dense_energies(sp), update_energy),
        "erosion_after": erosion(sp.M.double(), sub.S.double()),
    }


def dense_row(update: DenseUpdate, sub: Subspace, sp: DenseSplit, score: float, energies: dict[str, float],
              **fields) -> ModuleRow:  # fmt: skip
    """The report row (§7) of a dense module: as ``module_row``, from the split of its ``ΔW``."""
    total = sum(energies.values())
    notes = (["empty subspace"] if sub.k == 0 else []) + (["zero update"] if total == 0 else [])
    return ModuleRow(
        module=update.module.name, shape=list(update.dW.shape), rank=None, scaling=None, k=sub.k,
        captured=sub.captured_fraction, displacement_norm=math.sqrt(sub.total_energy),
        subspace_norm=float(torch.linalg.vector_norm(sub.S.double())), update_norm=math.sqrt(total),
        rho=relative_energies(energies), erosion=erosion(sp.M.double(), sub.S.double()), safe_lora_score=score,
        notes=notes, kind="dense", **fields,
    )  # fmt: skip


def in_float64(module: LoraModule, sub: Subspace) -> tuple[torch.Tensor, ...]:
    """``A``, ``B``, ``U``, ``V`` in float64 on the subspace's device: all arithmetic on factors is done wide."""
    device = sub.U.device
    return module.A.to(device, torch.float64), module.B.to(device, torch.float64), sub.U.double(), sub.V.double()


def written(module: LoraModule, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Corrected float64 factors cast back to the adapter's dtype (a factor returned as is stays as it is)."""
    A_out = module.A if A is module.A else cast_back(A, module.A.dtype, module.key("A"))
    B_out = module.B if B is module.B else cast_back(B, module.B.dtype, module.key("B"))
    return A_out, B_out


def after(sub: Subspace, A: torch.Tensor, sB: torch.Tensor, update_energy: float) -> dict[str, float]:
    """``rho_after`` and ``erosion_after`` of written factors ``sB·A`` (float64, the subspace's device), in units
    of the input's ``‖ΔW‖²``: measured on what is written, whatever the method."""
    U, V = sub.U.double(), sub.V.double()
    energies = component_energies(split(A, sB, U, V))
    return {
        "rho_after": relative_energies(energies, update_energy),
        "erosion_after": erosion(subspace_block(A, sB, U, V), sub.S.double()),
    }


def module_row(
    module: LoraModule,
    sub: Subspace,
    A: torch.Tensor,
    sB: torch.Tensor,
    score: float,
    energies: dict[str, float] | None = None,
    **fields,
) -> ModuleRow:
    """The report row (§7) common to every method, from the input factors ``sB·A`` (float64) and their
    component ``energies`` when already known; ``fields`` add what the method did (``gamma_*``,
    ``rho_after``, ``erosion_after``, …)."""
    U, V, S = sub.U.double(), sub.V.double(), sub.S.double()
    energies = energies if energies is not None else component_energies(split(A, sB, U, V))
    total = sum(energies.values())
    notes = (["empty subspace"] if sub.k == 0 else []) + (["zero update"] if total == 0 else [])
    notes += ["DoRA: magnitude kept as trained"] if module.dora else []
    return ModuleRow(
        module=module.name,
        kind=module.kind,
        shape=[module.B.shape[0], module.A.shape[1]],
        rank=module.rank,
        scaling=module.scaling,
        k=sub.k,
        captured=sub.captured_fraction,
        displacement_norm=math.sqrt(sub.total_energy),
        subspace_norm=float(torch.linalg.vector_norm(S)),
        update_norm=math.sqrt(total),
        rho=relative_energies(energies),
        erosion=erosion(subspace_block(A, sB, U, V), S),
        safe_lora_score=score,
        notes=notes,
        **fields,
    )


def block_config(adapter: Adapter, ranks: dict[str, int], global_rank: int) -> dict:
    """``adapter_config.json`` for a block form: every module gets its written rank and scale exactly 1.

    ``ranks``: each PEFT layer's written rank, by the name PEFT matches patterns against. Global ``r`` and
    ``lora_alpha`` become ``global_rank`` and rsLoRA is turned off (``α/r = 1``). Layers whose rank differs get
    exact-name entries in ``rank_pattern`` and the same in ``alpha_pattern``, so their scale is ``r_m / r_m = 1``
    whatever the order PEFT tries the keys in. The input's own patterns and rsLoRA are folded into ``B'`` already.
    """
    config = dict(adapter.config)
    r = global_rank
    patterns = {re.escape(name): rank for name, rank in sorted(ranks.items()) if rank != r}
    config.update(r=r, lora_alpha=r, use_rslora=False, rank_pattern=patterns, alpha_pattern=dict(patterns))
    for name, rank in ranks.items():  # a name that is a dotted suffix of another could make keys collide
        if pattern_value(patterns, name, r) != rank:
            raise CsuloraError(
                f"{adapter.path}: module {name} cannot be given its own rank in rank_pattern (its name matches "
                "another module's key); use --form factored"
            )
    return config


def lambda_words(lam: float | str) -> str:
    return "∞" if lam == "inf" else f"{lam:g}"
