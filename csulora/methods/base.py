"""The interface every method implements, and what they share: the report row, float64 factors, dense
updates, the block-form config.

``api.py`` streams the modules one at a time and calls ``correct`` (a LoRA module: factors) or
``correct_dense`` (a full weight: ``ΔW = W − W_a``, DESIGN.md §6b, §10) while that module's subspace (and, for
a method with ``reads_displacement``, its displacement ``D``) is in memory; ``finish`` then sees every module
once (Safe LoRA's selection needs every score). Adding a method is one new module here with a ``Method``
subclass, listed in ``methods/__init__.py``, and its defaults in ``settings.METHOD_DEFAULTS``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ..correction import (
    DenseSplit,
    best_rank,
    component_energies,
    dense_energies,
    dense_split,
    erosion,
    product_energy,
    relative_energies,
    safe_lora_score_dense,
    safe_lora_score_subspace,
    shift_block_factors,
    split,
    subspace_block,
)
from ..errors import CsuloraError
from ..io.adapters import Adapter, DenseModule, LoraModule, pattern_value
from ..precision import WRITE_LOSS_ULPS, cast_back, wide_dtype, widen, write_loss_limit
from ..reports.report import CORRECTION_LOST_LIMIT, ModuleRow
from ..settings import Settings
from ..subspace import Subspace, squared_norm


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

    def before(self, module: LoraModule, sub: Subspace, D: torch.Tensor | None) -> Corrected:
        """The module as it is, no method run (``audit --before-only``): the report row's "before" values, the
        decomposition (§3), the erosion (§5b) and the Safe LoRA score (§5) from the subspace, as ``correct`` has
        them."""
        A, B, U, _ = in_float64(module, sub)
        return Corrected(module_row(module, sub, A, module.scaling * B, safe_lora_score_subspace(A, B, U, sub.S)))

    def before_dense(self, update: DenseUpdate, sub: Subspace, D: torch.Tensor | None) -> Corrected:
        """``before`` for a dense update (§6b)."""
        sub = update.subspace(sub)
        sp = dense_split(update.dW, sub.U, sub.V)
        return Corrected(dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), dense_energies(sp)))

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
            none = None if block else 0.0
            row = module_row(module, sub, A, sB, score, energies, truncation_loss=none, truncation_energy=none,
                             **fields)  # fmt: skip
            return Corrected(row, module.A, module.B)
        A_new, B_new = shift_block_factors(A, sB, U, V, Z)  # exact, rank r + k, scale 1
        if block:
            row = module_row(module, sub, A, sB, score, energies, rank_after=module.rank + sub.k, **fields)
            return Corrected(row, *write(module, sub, A_new, B_new, 1.0, row))
        A_new, B_new, dropped = best_rank(A_new, B_new, module.rank)
        # ‖X* − X_r‖² / ‖ΔW‖², undefined for a zero update: then only the absolute truncation_energy says it
        row = module_row(module, sub, A, sB, score, energies, truncation_loss=dropped / total if total else None,
                         truncation_energy=dropped, **fields)  # fmt: skip
        if not total:
            row.notes.append("zero update: truncation loss in absolute terms only (truncation_energy)")
        # the config's scaling is kept
        return Corrected(row, *write(module, sub, A_new, B_new / module.scaling, module.scaling, row))

    def correct_dense(
        self, update: DenseUpdate, sub: Subspace, settings: Settings, D: torch.Tensor | None
    ) -> Corrected:
        """The exact form on a full weight, whatever ``--form`` (DESIGN.md §6b): ``X`` from ``dense_shift``."""
        sub = update.subspace(sub)
        sp = dense_split(update.dW, sub.U, sub.V)
        energies = dense_energies(sp)
        X = self.dense_shift(sp, sub, settings, D)
        row = dense_row(update, sub, sp, safe_lora_score_dense(sp, sub.S), energies, **self.fields(settings))
        return Corrected(row, W=update.write(X, sub, row))

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
    """A dense module ready for its method: ``ΔW = W − W_a`` in float32 (float64 when either weight is) on the
    subspace's device, with ``W_a`` (same dtype and device) and the module (its saved weight ``W``, as read)."""

    module: DenseModule
    W_a: torch.Tensor
    dW: torch.Tensor

    @classmethod
    def of(cls, module: DenseModule, W_a: torch.Tensor, device: torch.device) -> DenseUpdate:
        W_a, W = widen(W_a).to(device), widen(module.W).to(device)
        dtype = wide_dtype(W_a, W)  # float64 checkpoints stay float64 (§10: float32 or wider)
        W_a = W_a.to(dtype)
        return cls(module, W_a, W.to(dtype).sub_(W_a))

    def subspace(self, sub: Subspace) -> Subspace:
        """``sub`` in the dtype of ``ΔW`` (a cached float32 subspace against a float64 checkpoint)."""
        dtype = self.dW.dtype
        if sub.U.dtype == dtype:
            return sub
        return dataclasses.replace(sub, U=sub.U.to(dtype), S=sub.S.to(dtype), V=sub.V.to(dtype))

    def write(self, X: torch.Tensor | None, sub: Subspace, row: ModuleRow) -> torch.Tensor:
        """The weight to write: ``W_a + X`` cast once to the saved dtype (``None``: the saved weight itself); the
        row gets what is measured on the weight as written (``measure_dense``)."""
        if X is None:
            return self.module.W
        W = cast_back(self.W_a + X, self.module.W.dtype, self.module.key)
        set_after(row, measure_dense(self, sub, X, W))
        return W


def measure_dense(update: DenseUpdate, sub: Subspace, X: torch.Tensor, W: torch.Tensor) -> dict:
    """What a written full weight ``W`` holds: its update ``X_w = W − W_a`` split by the subspace (energies,
    erosion), the cast's error ``‖X_w − X‖ / ‖X‖`` and the share of the correction it lost,
    ``‖X_w − X‖ / ‖X − ΔW‖`` (DESIGN.md §10: a bf16 weight cannot hold a correction much below its ulp)."""
    X_w = widen(W).to(X.device, X.dtype).sub_(update.W_a)
    sp = dense_split(X_w, sub.U, sub.V)
    lost = squared_norm(X_w - X)
    wanted, exact = squared_norm(X - update.dW), squared_norm(X)
    return {
        "energy_after": dense_energies(sp),
        "erosion_after": erosion(sp.M.double(), sub.S.double()),
        "write_error": math.sqrt(lost / exact) if exact > 0 else 0.0,
        "correction_norm": math.sqrt(wanted),
        "correction_lost": math.sqrt(lost / wanted) if wanted > 0 else 0.0,
        "dtype": W.dtype,
    }


def summary_warnings(rows: list[ModuleRow]) -> list[str]:
    """What the per-module numbers say a user must know, one line each: a subspace rank cut below the requested
    ``k``, updates the cast to the dtype lost too much of, full weights the cast lost their correction in."""

    def names(chosen: list[ModuleRow], words) -> str:
        more = f" and {len(chosen) - 5} more" if len(chosen) > 5 else ""
        return ", ".join(words(r) for r in chosen[:5]) + more

    out = []
    cut = [r for r in rows if r.k_requested is not None]
    if cut:
        out.append(f"{len(cut)} module(s): subspace rank cut below the requested k at the numerical rank of D "
                   "(σ_i ≤ max(d_out, d_in)·ε·σ_1, rounding noise): "
                   + names(cut, lambda r: f"{r.module} k = {r.k} of {r.k_requested}"))  # fmt: skip
    lossy = sorted((r for r in rows if any(n.startswith("write loss") for n in r.notes)), key=lambda r: -r.write_error)
    if lossy:
        out.append(f"{len(lossy)} module(s) lost more of their update in the cast to the dtype than "
                   f"{WRITE_LOSS_ULPS} unit roundoffs (at least 1e-4): "
                   + names(lossy, lambda r: f"{r.module} ({r.write_error:.3g})")
                   + "; write loss per module in the report (write_error); convert the input to float32 and rerun "
                   "to avoid it")  # fmt: skip
    lost = sorted((r for r in rows if (r.correction_lost or 0.0) > CORRECTION_LOST_LIMIT),
                  key=lambda r: -(r.correction_lost or 0.0))  # fmt: skip
    if lost:
        known = [r for r in rows if r.correction_lost is not None]
        wanted = sum(r.correction_norm**2 for r in known)
        total = math.sqrt(sum((r.correction_lost * r.correction_norm) ** 2 for r in known) / wanted)
        out.append(f"{len(lost)} full weight(s) lost more than {CORRECTION_LOST_LIMIT:.0%} of their correction "
                   f"‖X − ΔW‖ in the cast to the checkpoint's dtype ({total:.1%} of the correction in total): "
                   + names(lost, lambda r: f"{r.module} ({r.correction_lost:.1%})")
                   + "; the written model is not the sanitized one: convert it to float32 to keep it")  # fmt: skip
    return out


def set_after(row: ModuleRow, fields: dict) -> None:
    """Put measured "after" fields on a row, with ``rho_after`` as the written update's own shares, and a note
    when the cast lost more than ``write_loss_limit`` of the written dtype."""
    dtype = fields.pop("dtype", None)
    for name, value in fields.items():
        setattr(row, name, value)
    row.rho_after = relative_energies(row.energy_after)
    if dtype is not None and row.write_error > write_loss_limit(dtype):
        row.notes.append(f"write loss {row.write_error:.3g} of the update (past {write_loss_limit(dtype):.3g} for "
                         f"{str(dtype).removeprefix('torch.')})")  # fmt: skip
    if row.correction_lost is not None and row.correction_lost > CORRECTION_LOST_LIMIT:
        row.notes.append(f"the cast to {str(dtype).removeprefix('torch.')} lost {row.correction_lost:.1%} of the "
                         "correction")  # fmt: skip


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
    """Corrected factors cast back to the adapter's dtype (a factor returned as is stays as it is)."""
    A_out = module.A if A is module.A else cast_back(A, module.A.dtype, module.key("A"))
    B_out = module.B if B is module.B else cast_back(B, module.B.dtype, module.key("B"))
    return A_out, B_out


def product_error(A_w: torch.Tensor, B_w: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """``‖B_w A_w − B A‖_F / ‖B A‖_F`` (float64 factors) from the Gram of ``[B_w | −B] [A_w ; A]``: nothing of size
    ``d_out × d_in`` is formed. 0 for a zero product."""
    exact = product_energy(B, A)
    diff = product_energy(torch.cat([B_w, -B], dim=1), torch.cat([A_w, A], dim=0))
    return math.sqrt(max(diff, 0.0) / exact) if exact > 0 else 0.0


def balanced(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same product ``B A`` with each rank-one term's factors rescaled by a power of two (exact) so that the
    largest entries of ``B``'s column and ``A``'s row are about equal: the gauge ``B G, G⁻¹ A`` that keeps a
    small product out of fp16's subnormal range on both sides."""
    a, b = A.abs().amax(dim=1), B.abs().amax(dim=0)
    ok = (a > 0) & (b > 0)
    t = torch.where(ok, torch.exp2(torch.round(0.5 * torch.log2(torch.where(ok, a / b, 1.0)))), 1.0)
    return A / t[:, None], B * t


def write(
    module: LoraModule, sub: Subspace, A: torch.Tensor, B: torch.Tensor, scale: float, row: ModuleRow
) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors meant for module scale ``scale`` (float32 or wider, or the module's own tensors, kept as they are)
    cast to the adapter's dtype; ``row`` gets what is measured on them as written. When the cast loses more than
    ``write_loss_limit`` of the product (fp16 underflow), the factors are rescaled against each
    other (``balanced``) and cast again, and the better of the two is written (noted)."""
    if A is module.A and B is module.B:
        return A, B
    device = sub.U.device
    A64, B64 = A.to(device, torch.float64), B.to(device, torch.float64)
    A_out, B_out = written(module, A, B)
    error = product_error(A_out.to(device, torch.float64), B_out.to(device, torch.float64), A64, B64)
    dtype = max(module.A.dtype, module.B.dtype, key=write_loss_limit)
    if error > write_loss_limit(dtype):
        A_b, B_b = balanced(A64, B64)
        A_2, B_2 = cast_back(A_b, module.A.dtype, module.key("A")), cast_back(B_b, module.B.dtype, module.key("B"))
        again = product_error(A_2.to(device, torch.float64), B_2.to(device, torch.float64), A64, B64)
        if again < error:
            row.notes.append(f"factors rescaled against each other before the cast (write loss {error:.2%} → "
                             f"{again:.2%})")  # fmt: skip
            A_out, B_out, error = A_2, B_2, again
    A_w, B_w = A_out.to(device, torch.float64), B_out.to(device, torch.float64)
    U, V = sub.U.double(), sub.V.double()
    sB_w = scale * B_w
    set_after(row, {
        "energy_after": component_energies(split(A_w, sB_w, U, V)),
        "erosion_after": erosion(subspace_block(A_w, sB_w, U, V), sub.S.double()),
        "write_error": error,
        "dtype": dtype,
    })  # fmt: skip
    return A_out, B_out


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
