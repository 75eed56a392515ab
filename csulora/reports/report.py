"""The report model and its renderers: JSON, Markdown, the rich terminal table, the model card."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields

from rich import box
from rich.table import Table

from ..correction import COMPONENTS
from ..io.adapters import Kept

SCHEMA_VERSION = 3  # 2: module kinds (experts, dense), kept tensors; 3: "after" shares of the written update
CORRECTION_LOST_LIMIT = 0.1  # a full weight losing more than this share of its correction in the cast is reported


def safe_lora_score_basis(method: str) -> str:
    """How the Safe LoRA score was computed: from ``D`` itself under ``--method safe-lora`` (which reads it
    anyway), else from the (possibly cached) subspace, so that cold and warm runs agree (docs/scale.md)."""
    if method == "safe-lora":
        return "exact: C = D Dᵀ / ‖D‖_F"
    return "approximate: C_k = U_k Σ_k² U_kᵀ / ‖D‖_F, the rank-k truncation of C = D Dᵀ / ‖D‖_F"


def size_words(rule: dict) -> str:
    """The size rule's choice of the default's λ and β (``methods.realign.by_size``), in one line."""
    if rule["value"] is None:
        measured = "‖ΔW‖/‖D_8‖ undefined (empty subspace)"
    else:
        measured = f"‖ΔW‖/‖D_8‖ = {rule['value']:.2f} {'≤' if rule['strong'] else '>'} {rule['threshold']:g}"
    lam = "∞" if rule["lambda"] == "inf" else f"{rule['lambda']:g}"
    return f"size rule: {measured}, so λ = {lam}, β = {rule['beta']:g} (docs/defaults.md)"


def pack_words(report: Report) -> str | None:
    """Which subspace pack served the run (DESIGN.md §11), and what it means for the fields that would need the
    whole ``D``; ``None`` when the run read the checkpoints."""
    pack = report.inputs.get("subspace")
    if not pack:
        return None
    return (f"subspaces from the pack {pack['ref']}" + (f"@{pack['revision']}" if pack.get("revision") else "")
            + f" (manifest sha256 {pack['manifest_sha256']}); fields that would need the whole D (the Safe LoRA "
            "score) are computed from D_k")


@dataclass
class ModuleRow:
    """What happened to one adapted module. ``rho``: the input's energies as fractions of its ``‖ΔW‖_F²``;
    ``rho_after``: the *written* update's energies as fractions of its own ``‖ΔW'‖_F²`` (what ``audit`` of the
    written adapter reports as ``rho``); ``energy_after``: the same energies in absolute units, so that the share
    of the input is ``energy_after / update_norm²`` (``input_share_after``). Every "after" value is measured on
    the tensors as written, after the cast to the adapter's dtype."""

    module: str
    shape: list[int]  # [d_out, d_in]
    rank: int | None  # None: a dense module (a full weight)
    scaling: float | None
    k: int  # subspace rank
    captured: float  # fraction of ‖D‖_F² in P D Q
    displacement_norm: float  # ‖D‖_F
    subspace_norm: float  # ‖D_k‖_F = ‖Σ_k‖: the displacement kept in the subspace
    update_norm: float  # ‖ΔW‖_F
    rho: dict[str, float]  # ρ_F, ρ_H_in, ρ_H_out, ρ_O of the input (all 0 for a zero update, noted)
    safe_lora_score: float
    erosion: float  # e = ⟨ΔW, D_k⟩ / ‖D_k‖² (§5b); negative: the update turns the aligned directions back
    gamma_in: float = 1.0
    gamma_out: float = 1.0
    rho_after: dict[str, float] = field(default_factory=dict)  # the written update's own shares (energy_after)
    erosion_after: float | None = None  # None: unchanged (= erosion)
    energy_after: dict[str, float] = field(default_factory=dict)  # ‖c‖² of the written update; empty: unchanged
    notes: list[str] = field(default_factory=list)
    rank_after: int | None = None  # rank written (block form: 2r); None: unchanged
    gamma_off: float | None = None  # factor on O (block form: γ_O); None: γ_in γ_out (factored form)
    safe_lora_projected: bool = False  # Safe LoRA replaced B by C·B in this module
    c: float | None = None  # realign: c = λ/(1+λ)
    beta: float | None = None  # realign: target β·D_k of the in-subspace block
    truncation_loss: float | None = None  # realign, resta, factored: ‖X* − X_r‖² / ‖ΔW‖² (None where ‖ΔW‖ = 0)
    gamma_resta: float | None = None  # resta: γ
    kind: str = "linear"  # linear | embedding | parameter | expert | dense (adapters.LoraModule.kind)
    truncation_energy: float | None = None  # realign, resta, factored: ‖X* − X_r‖², absolute (defined at ΔW = 0)
    write_error: float = 0.0  # ‖X_written − X‖_F / ‖X‖_F: what the cast to the dtype cost the written update
    correction_lost: float | None = None  # dense: ‖X_written − X‖_F / ‖X − ΔW‖_F, the correction the cast lost
    correction_norm: float | None = None  # dense: ‖X − ΔW‖_F, the correction the method meant to write
    k_requested: int | None = None  # the k the subspace rule asked for, when the numerical-rank cut lowered it

    def __post_init__(self) -> None:
        if not self.energy_after:
            self.energy_after = {c: self.rho[c] * self.update_norm**2 for c in COMPONENTS}
            self.rho_after = self.rho_after or dict(self.rho)
        if not self.rho_after:
            total = sum(self.energy_after.values())
            self.rho_after = {c: (e / total if total > 0 else 0.0) for c, e in self.energy_after.items()}
        if self.erosion_after is None:
            self.erosion_after = self.erosion

    @property
    def output_rank(self) -> int | None:
        return self.rank if self.rank_after is None else self.rank_after

    @property
    def off_factor(self) -> float:
        return self.gamma_in * self.gamma_out if self.gamma_off is None else self.gamma_off

    @property
    def update_norm_after(self) -> float:
        """``‖ΔW'‖_F`` of the written update."""
        return math.sqrt(sum(self.energy_after.values()))

    @property
    def retained(self) -> float | None:
        """``‖ΔW'‖_F / ‖ΔW‖_F``: 1 where both are 0, None where only the input is (``update_norm_after`` says)."""
        if self.update_norm > 0:
            return self.update_norm_after / self.update_norm
        return 1.0 if self.update_norm_after == 0 else None

    @property
    def input_share_after(self) -> dict[str, float]:
        """The written update's energies as fractions of the *input's* ``‖ΔW‖_F²`` (0 for a zero input)."""
        total = self.update_norm**2
        return {c: (e / total if total > 0 else 0.0) for c, e in self.energy_after.items()}

    @property
    def off_before(self) -> float:
        return self.rho["O"]

    @property
    def off_after(self) -> float:
        return self.rho_after["O"]

    @property
    def leaving_before(self) -> float:
        """Energy outside the fully aligned part: ``ρ_Hin + ρ_Hout + ρ_O``."""
        return self.rho["H_in"] + self.rho["H_out"] + self.rho["O"]

    @property
    def leaving_after(self) -> float:
        return self.rho_after["H_in"] + self.rho_after["H_out"] + self.rho_after["O"]

    def to_dict(self) -> dict:
        # asdict's deep copy, one level deep: the fields are numbers, strings, and lists or dicts of them
        d = {f.name: _copied(getattr(self, f.name)) for f in fields(self)}
        d.update(
            rank_after=self.output_rank,
            gamma_off=self.off_factor,
            retained_norm=self.retained,
            update_norm_after=self.update_norm_after,
            off_energy_before=self.off_before,
            off_energy_after=self.off_after,
            leaving_energy_before=self.leaving_before,
            leaving_energy_after=self.leaving_after,
        )
        return d


@dataclass
class Report:
    tool_version: str
    method: str
    form: str
    settings: dict
    inputs: dict
    modules: list[ModuleRow]
    warnings: list[str] = field(default_factory=list)
    description: str = ""  # what the method did, in words (each method says it: methods/)
    kept: list[Kept] = field(default_factory=list)  # saved tensors written back as trained, not sanitized
    calibration: dict | None = None  # sanitize --calibrate: what was measured and chosen (calibrate.py)
    size_rule: dict | None = None  # the default's λ and β chosen by the adapter's size (realign.by_size)
    before_only: bool = False  # audit --before-only: the adapter as it is, no method run, no "after" values

    @property
    def subject(self) -> tuple[str, str]:
        """What was sanitized: ``("adapter", path)`` or ``("model", path)`` (a full fine-tune, DESIGN.md §10)."""
        kind = "model" if "model" in self.inputs else "adapter"
        return kind, self.inputs[kind]["path"]

    @property
    def rank_changed(self) -> bool:
        """Whether the written adapter has other ranks than the input (the block form doubles them)."""
        return any(m.output_rank != m.rank for m in self.modules)

    def totals(self) -> dict:
        """Energies summed over modules (in absolute units), then made relative: "before" values to the input's
        ``Σ‖ΔW‖²``, "after" values to the written adapter's own ``Σ‖ΔW'‖²`` (what ``audit`` of it reports)."""
        energy = {c: sum(m.rho[c] * m.update_norm**2 for m in self.modules) for c in COMPONENTS}
        after = {c: sum(m.energy_after[c] for m in self.modules) for c in COMPONENTS}
        total, total_after = sum(energy.values()), sum(after.values())
        rel = {c: (energy[c] / total if total else 0.0) for c in COMPONENTS}
        rel_after = {c: (after[c] / total_after if total_after else 0.0) for c in COMPONENTS}
        scores = [m.safe_lora_score for m in self.modules]
        errors = [m.write_error for m in self.modules]
        lost = [(m.correction_lost, m.correction_norm) for m in self.modules if m.correction_lost is not None]
        wanted = math.sqrt(sum(n**2 for _, n in lost))
        return {
            "modules": len(self.modules),
            "rho": rel,
            "rho_after": rel_after,
            "retained_norm": math.sqrt(total_after / total) if total else (1.0 if total_after == 0 else None),
            "update_norm_after": math.sqrt(total_after),
            "max_write_error": max(errors) if errors else 0.0,
            "correction_lost": math.sqrt(sum((x * n) ** 2 for x, n in lost)) / wanted if wanted else None,
            "off_energy_before": rel["O"],
            "off_energy_after": rel_after["O"],
            "leaving_energy_before": 1.0 - rel["F"] if total else 0.0,
            "leaving_energy_after": rel_after["H_in"] + rel_after["H_out"] + rel_after["O"] if total_after else 0.0,
            "min_safe_lora_score": min(scores) if scores else None,
            "mean_safe_lora_score": sum(scores) / len(scores) if scores else None,
            "erosion_before": sum(self.erosion_shares().values()),
            "erosion_after": sum(self.erosion_shares("erosion_after").values()),
            "experts": sum(m.kind == "expert" for m in self.modules),
            "dense_modules": sum(m.kind == "dense" for m in self.modules),
            "kept_tensors": len(self.kept),
            "kept_not_identical": len(self.unsanitized()),
        }

    def unsanitized(self) -> list[Kept]:
        """Tensors kept as trained that differ from the aligned model's (what ``audit --fail-on-kept`` fails on)."""
        return [k for k in self.kept if not k.identical]

    def erosion_shares(self, field: str = "erosion") -> dict[str, float]:
        """Each module's share ``e_m ‖D_k,m‖² / Σ‖D_k‖²`` of the adapter's erosion coefficient
        ``Σ⟨ΔW, D_k⟩ / Σ‖D_k‖²`` (the shares add up to it); ``field``: ``erosion`` or ``erosion_after``."""
        weight = sum(m.subspace_norm**2 for m in self.modules)
        return {m.module: getattr(m, field) * m.subspace_norm**2 / weight if weight else 0.0 for m in self.modules}

    def to_dict(self) -> dict:
        d = self._to_dict()
        if self.before_only:  # nothing was run: every "after" value is unknown, not "unchanged"
            d["before_only"] = True
            d["totals"].update(dict.fromkeys(AFTER_TOTALS))
            for row in d["modules"]:
                row.update(dict.fromkeys(AFTER_FIELDS))
        return d

    def _to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "csulora", "version": self.tool_version},
            "method": self.method,
            "form": self.form,
            "rank_changed": self.rank_changed,
            "settings": self.settings,
            "inputs": self.inputs,
            "totals": self.totals(),
            "modules": [m.to_dict() for m in self.modules],
            "kept": [k.to_dict() for k in self.kept],
            "warnings": self.warnings,
            "safe_lora_score_basis": safe_lora_score_basis(self.method),
            **({"calibration": self.calibration} if self.calibration is not None else {}),
            **({"size_rule": self.size_rule} if self.size_rule is not None else {}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"


# What a method's run adds to a report: null under ``audit --before-only``.
AFTER_FIELDS = ("rho_after", "erosion_after", "energy_after", "rank_after", "gamma_in", "gamma_out", "gamma_off",
                "retained_norm", "update_norm_after", "off_energy_after", "leaving_energy_after", "write_error")
AFTER_TOTALS = ("rho_after", "retained_norm", "update_norm_after", "max_write_error", "off_energy_after",
                "leaving_energy_after", "erosion_after")


def _copied(value):
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def expert_layer(m: ModuleRow) -> str | None:
    """``…experts.gate_up_proj`` for the row of expert ``…experts.gate_up_proj[3]``; None for other rows."""
    return m.module.rpartition("[")[0] if m.kind == "expert" else None


def grouped(modules: list[ModuleRow]) -> list[ModuleRow]:
    """The rows as the table and the picture show them: the experts of one stacked parameter merged into one row
    (``merge``), so that a model with 64 experts per layer stays readable; the JSON keeps one row per expert."""
    slots: dict[str, list[ModuleRow]] = {}  # a row's own name, or its expert layer's: rows in first-seen order
    for m in modules:
        slots.setdefault(expert_layer(m) or m.module, []).append(m)
    return [merge(rows) if rows[0].kind == "expert" else rows[0] for rows in slots.values()]


def merge(rows: list[ModuleRow]) -> ModuleRow:
    """One row for a group of experts, weighted as the totals are: energies by ``‖ΔW_e‖²``, erosion by
    ``‖D_k,e‖²``; the factors are means, the Safe LoRA score the lowest, ``k`` the largest."""

    def mean(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return sum(known) / len(known) if known else None

    def weighted(name: str, weights: list[float]) -> dict[str, float]:
        total = sum(weights)
        return {c: sum(getattr(m, name)[c] * w for m, w in zip(rows, weights, strict=True)) / total if total else 0.0
                for c in COMPONENTS}  # fmt: skip

    energy, subspace = [m.update_norm**2 for m in rows], [m.subspace_norm**2 for m in rows]
    dk = sum(subspace)
    first = rows[0]
    return ModuleRow(
        module=f"{expert_layer(first)} ×{len(rows)} experts", kind="experts", shape=first.shape, rank=first.rank,
        scaling=first.scaling, k=max(m.k for m in rows), captured=mean([m.captured for m in rows]),
        displacement_norm=math.sqrt(sum(m.displacement_norm**2 for m in rows)), subspace_norm=math.sqrt(dk),
        update_norm=math.sqrt(sum(energy)), rho=weighted("rho", energy),
        energy_after={c: sum(m.energy_after[c] for m in rows) for c in COMPONENTS},
        safe_lora_score=min(m.safe_lora_score for m in rows),
        erosion=sum(m.erosion * w for m, w in zip(rows, subspace, strict=True)) / dk if dk else 0.0,
        erosion_after=sum(m.erosion_after * w for m, w in zip(rows, subspace, strict=True)) / dk if dk else 0.0,
        gamma_in=mean([m.gamma_in for m in rows]), gamma_out=mean([m.gamma_out for m in rows]),
        gamma_off=mean([m.off_factor for m in rows]), rank_after=max(m.output_rank for m in rows),
        safe_lora_projected=any(m.safe_lora_projected for m in rows), c=mean([m.c for m in rows]),
        beta=first.beta, truncation_loss=mean([m.truncation_loss for m in rows]), gamma_resta=first.gamma_resta,
        notes=sorted({n for m in rows for n in m.notes}), write_error=max(m.write_error for m in rows),
        truncation_energy=_sum([m.truncation_energy for m in rows]),
    )  # fmt: skip


def _sum(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def ratio(x: float | None) -> str:
    """A ratio such as the retained norm; "n/a" where it is undefined (a zero input update)."""
    return "n/a" if x is None else f"{x:.3f}"


def columns(report: Report) -> list[str]:
    """The per-module table's columns: the decomposition, what the method did, what is left."""
    if report.before_only:
        return ["module", "k", "captured", "ρ_F", "ρ_Hin", "ρ_Hout", "ρ_O", "erosion", "SafeLoRA"]
    shifts = {"realign": ["c", "ρ_F after", "trunc. loss"], "resta": ["γ", "ρ_F after", "trunc. loss"]}
    done = shifts.get(report.method, ["γ_in", "γ_out", "off after"])
    return ["module", "k", "captured", "ρ_F", "ρ_Hin", "ρ_Hout", "ρ_O", *done, "retained", "erosion", "SafeLoRA"]


def cells(report: Report, m: ModuleRow) -> list[str]:
    if report.before_only:
        return [m.module, str(m.k), pct(m.captured), *(pct(m.rho[c]) for c in COMPONENTS), f"{m.erosion:+.3f}",
                f"{m.safe_lora_score:+.3f}"]  # fmt: skip
    if report.method in ("realign", "resta"):
        loss = "" if m.truncation_loss is None else pct(m.truncation_loss)
        strength = f"{m.c:.3f}" if report.method == "realign" else f"{m.gamma_resta:g}"
        done = [strength, pct(m.rho_after["F"]), loss]
    elif m.safe_lora_projected:
        done = ["C·B", "C·B", pct(m.off_after)]
    else:
        done = [f"{m.gamma_in:.3f}", f"{m.gamma_out:.3f}", pct(m.off_after)]
    return [
        m.module,
        str(m.k),
        pct(m.captured),
        *(pct(m.rho[c]) for c in COMPONENTS),
        *done,
        ratio(m.retained),
        erosion_words(m.erosion, m.erosion_after),
        f"{m.safe_lora_score:+.3f}",
    ]


def erosion_words(before: float, after: float | None) -> str:
    """``−0.213`` when unchanged, ``−0.213 → +0.050`` when the method moved it."""
    if after is None or f"{after:+.3f}" == f"{before:+.3f}":
        return f"{before:+.3f}"
    return f"{before:+.3f} → {after:+.3f}"


def _kept_markdown(report: Report) -> list[str]:
    if not report.kept:
        return []
    return ["", "## Kept as trained (not sanitized)", "", "| tensor | shape | why |", "|---|---|---|",
            *(f"| `{k.key}` | {k.shape} | {k.reason} |" for k in report.kept)]  # fmt: skip


def kept_words(report: Report) -> str | None:
    """One line on what was written back as trained; None when nothing was."""
    if not report.kept:
        return None
    changed, kinds = len(report.unsanitized()), ", ".join(sorted({k.kind for k in report.kept}))
    return (f"kept as trained (not sanitized): {len(report.kept)} tensor(s) ({kinds}), {changed} differing from "
            "the aligned model: see the report")  # fmt: skip


AFTER_WORDS = ("\"after\" shares are of the written update's own energy, measured on the file as written "
               "(what audit of it reports)")


BEFORE_ONLY_WORDS = "before only: the adapter as it is; no method was run (drop --before-only to see what it does)"


def _summary_lines(report: Report) -> list[str]:
    t = report.totals()
    what = f"modules: {t['modules']}"
    if t["experts"] or t["dense_modules"]:
        what += f" ({t['experts']} experts, {t['dense_modules']} full weights)"
    if report.before_only:
        return [
            what,
            f"energy fully aligned / leaving: {pct(t['rho']['F'])} / {pct(t['leaving_energy_before'])}",
            f"off-subspace energy: {pct(t['off_energy_before'])}",
            f"erosion coefficient ⟨ΔW, D_k⟩/‖D_k‖²: {t['erosion_before']:+.3f}",
            BEFORE_ONLY_WORDS,
            *([kept_words(report)] if report.kept else []),
        ]
    return [
        what,
        f"energy fully aligned / leaving: {pct(t['rho']['F'])} / {pct(t['leaving_energy_before'])} "
        f"→ leaving after: {pct(t['leaving_energy_after'])}",
        f"off-subspace energy: {pct(t['off_energy_before'])} → {pct(t['off_energy_after'])}",
        f"erosion coefficient ⟨ΔW, D_k⟩/‖D_k‖²: {erosion_words(t['erosion_before'], t['erosion_after'])}",
        f"retained update norm: {ratio(t['retained_norm'])}",
        *([size_words(report.size_rule)] if report.size_rule else []),
        AFTER_WORDS,
        *([rank_change_words(report)] if report.rank_changed else []),
        *([kept_words(report)] if report.kept else []),
    ]


def rank_change_words(report: Report) -> str:
    """The rank change of the block form, said once for every renderer."""
    before = sorted({m.rank for m in report.modules if m.rank is not None})
    after = sorted({m.output_rank for m in report.modules if m.rank is not None})
    return f"rank changed: {'/'.join(map(str, before))} → {'/'.join(map(str, after))}"


def to_markdown(report: Report) -> str:
    s = report.settings
    lines = [
        "# csulora report",
        "",
        f"- method: {report.method}, form: {report.form}: {report.description}",
        f"- subspace: {_subspace_words(s)}",
        f"- Safe LoRA score: {safe_lora_score_basis(report.method)}",
        "- {}: `{}`".format(*report.subject),
        f"- {provenance_words(report)}",
        *([f"- {pack_words(report)}"] if pack_words(report) else []),
        *(f"- {line}" for line in _summary_lines(report)),
        "",
        "| " + " | ".join([*columns(report), AFTER_ALL]) + " |",
        "|" + "---|" * (len(columns(report)) + 1),
        *("| " + " | ".join([*cells(report, m), _after_all(m)]) + " |" for m in grouped(report.modules)),
        "",
        *MARKDOWN_LEGEND,
        *_kept_markdown(report),
    ]
    if report.warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in report.warnings)]
    return "\n".join(lines) + "\n"


# The Markdown report is a document, not a terminal: it has every column, all four "after" shares and a legend.
AFTER_ALL = "after: ρ_F / ρ_Hin / ρ_Hout / ρ_O"
MARKDOWN_LEGEND = [
    "**Columns.** `k`: the subspace rank; `captured`: the share of ‖D‖² the rank-k subspace holds; `ρ_F`, `ρ_Hin`, "
    "`ρ_Hout`, `ρ_O`: the shares of the adapter's update ‖ΔW‖² that lie fully in the safety subspace, leave it on the "
    "input side only, on the output side only, or on both (DESIGN §3; they add up to 1); `c` (realign) or `γ` "
    "(resta): the method's strength; `γ_in`, `γ_out` (csulora): the attenuation of each side; `off after`, "
    f"`ρ_F after` and `{AFTER_ALL}`: the same shares of the *written* update's own energy, measured on the file as "
    "written (what `csulora audit` of it reports); `trunc. loss`: the energy the rank-r factored form drops, as a "
    "share of ‖ΔW‖²; `retained`: ‖ΔW'‖/‖ΔW‖; `erosion`: ⟨ΔW, D_k⟩/‖D_k‖² before → after (negative: the update turns "
    "the aligned directions back); `SafeLoRA`: Safe LoRA's cosine score (its basis is named above).",
]


def _after_all(m: ModuleRow) -> str:
    return " / ".join(pct(m.rho_after[c]) for c in COMPONENTS)


def provenance_words(report: Report, name=lambda ref: ref) -> str:
    """Which checkpoint was the aligned one and which the base, where each came from (a flag, the adapter's config,
    the aligned model's card), and what the metadata said of their order (``pair_order.py``): a reviewer can spot a
    swap. ``name``: how a reference is shown (a card shows no local path)."""
    aligned, base = report.inputs["aligned"], report.inputs["base"]
    words = (f"aligned `{name(aligned['ref'])}` (from {aligned.get('source', '--aligned')}), "
             f"base `{name(base['ref'])}` (from {base['source']})")  # fmt: skip
    order = report.inputs.get("pair_order")
    if order:
        words += f"; their order: {order['verdict']}" + (f" ({'; '.join(order['evidence'])})" if order["evidence"]
                                                         else "")  # fmt: skip
    return words


def _subspace_words(s: dict) -> str:
    rule = f"rank {s['subspace_rank']}" if s["subspace_rank"] else f"energy η = {s['subspace_energy']}"
    svd = "exact SVD" if s["exact_svd"] else f"randomized SVD, seed {s['seed']}"
    return f"{rule}, cap {s['max_subspace_rank']}, {svd}"


# The terminal table's default columns (80 columns wide): what is off the subspace, what is left after, how the
# erosion moved, the norm kept. `--wide` shows every column; the JSON, the Markdown and the HTML always have them.
NARROW = ("module", "ρ_O", "ρ_F after", "off after", "retained", "erosion")
NARROW_BEFORE = ("module", "ρ_F", "ρ_O", "erosion", "SafeLoRA")  # audit --before-only: no "after" columns


def to_table(report: Report, title: str | None = None, wide: bool = False) -> Table:
    names = columns(report)
    narrow = NARROW_BEFORE if report.before_only else NARROW
    shown = [i for i, col in enumerate(names) if wide or col in narrow]
    rows = grouped(report.modules)
    modules = [m.module for m in rows]
    prefix = "" if wide else common_prefix(modules)
    lines = _summary_lines(report)
    if prefix:
        lines.append(f"module names under {prefix}; --wide: every column")
    elif not wide:
        lines.append("--wide: every column")
    table = Table(title=title, caption="\n".join(lines), caption_justify="left",
                  box=box.HEAVY_HEAD if wide else None, pad_edge=wide, header_style="bold")  # fmt: skip
    for i in shown:
        table.add_column(names[i], justify="left" if i == 0 else "right", no_wrap=True)
    for m in rows:
        row = cells(report, m)
        if not wide:
            row[0] = row[0].removeprefix(prefix).replace(" experts", "")
            row[names.index("erosion")] = row[names.index("erosion")].replace(" → ", "→")
        table.add_row(*(row[i] for i in shown))
    return table


def common_prefix(names: list[str]) -> str:
    """The leading dotted components every name shares up to its first numbered one (``model.`` of
    ``model.layers.0.mlp``): the part a narrow table leaves out."""
    parts = [n.split(".") for n in names]
    i = 0
    while parts and all(len(p) > i + 2 and p[i] == parts[0][i] and not p[i + 1].isdigit() for p in parts):
        i += 1
    return ".".join(parts[0][:i]) + "." if i else ""


def rank_warning(report: Report) -> str:
    """What a person serving the adapter must know when the block form changed its rank."""
    need = _engine_rank(report)
    advice = f"start it with `--max-lora-rank {need}` or more" if need > 16 else "an engine set lower needs raising"
    return (
        f"{rank_change_words(report)}. Serving engines with a maximum LoRA rank must allow "
        f"{_largest_rank(report)}: vLLM's default `max_lora_rank` is 16; {advice}."
    )


def _largest_rank(report: Report) -> int:
    return max((m.output_rank for m in report.modules if m.rank is not None), default=0)


def _engine_rank(report: Report) -> int:
    """The smallest of vLLM's allowed max_lora_rank values (8, 16, 32, 64, …) that holds every module."""
    need, rank = _largest_rank(report), 8
    while rank < need:
        rank *= 2
    return rank
