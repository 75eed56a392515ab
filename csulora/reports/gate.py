"""The publishing gate of ``csulora audit``: thresholds on the report, their violations, the audit document.

What each threshold compares is defined in docs/audit.md; every value is a "before" value (the adapter
as it is), taken from the same report ``sanitize`` writes.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from ..errors import CsuloraError, GateFailed
from ..io.adapters import OUTSIDE_METHOD
from .report import SCHEMA_VERSION, ModuleRow, Report

NAMED = 5  # modules named per violation in the one-line message


@dataclass(frozen=True)
class Thresholds:
    max_off_energy: float | None = None  # adapter total ρ_O = Σ e_O / Σ ‖ΔW‖²
    max_layer_off_energy: float | None = None  # each module's ρ_O
    min_safe_lora_score: float | None = None  # each module's Safe LoRA score
    min_erosion: float | None = None  # adapter erosion coefficient Σ⟨ΔW, D_k⟩ / Σ‖D_k‖² (§5b)
    fail_on_kept: bool = False  # any tensor kept as trained, differing from the aligned one, a method could correct

    def validate(self) -> None:
        for name in ("max_off_energy", "max_layer_off_energy"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
                raise CsuloraError(f"--{name.replace('_', '-')} must be a fraction in [0, 1], got {value}")
        score = self.min_safe_lora_score
        if score is not None and not (math.isfinite(score) and -1 <= score <= 1):
            raise CsuloraError(f"--min-safe-lora-score must be in [-1, 1], got {score}")
        if self.min_erosion is not None and not math.isfinite(self.min_erosion):
            raise CsuloraError(f"--min-erosion must be a finite number (e.g. -0.1), got {self.min_erosion}")


def _counts(m: ModuleRow) -> bool:
    """Modules a per-module threshold looks at: a nonzero update (a zero one changes nothing)."""
    return m.update_norm > 0


def violations(report: Report, limits: Thresholds) -> list[dict]:
    """Every threshold the report exceeds, with the modules responsible (worst first)."""
    adapter = report.subject[1]
    found = []
    if limits.max_off_energy is not None:
        value = report.totals()["off_energy_before"]
        if value > limits.max_off_energy:
            # each module's contribution e_O / Σ‖ΔW‖²: these add up to the adapter's value
            total = sum(m.update_norm**2 for m in report.modules)
            share = {m.module: m.off_before * m.update_norm**2 / total for m in report.modules}
            worst = sorted((m for m in report.modules if share[m.module] > 0), key=lambda m: -share[m.module])
            found.append(_violation(adapter, "max_off_energy", limits.max_off_energy, value, worst, share))
    if limits.max_layer_off_energy is not None:
        over = [m for m in report.modules if _counts(m) and m.off_before > limits.max_layer_off_energy]
        if over:
            over.sort(key=lambda m: -m.off_before)
            found.append(_violation(adapter, "max_layer_off_energy", limits.max_layer_off_energy,
                                    over[0].off_before, over))  # fmt: skip
    if limits.min_safe_lora_score is not None:
        under = [
            m for m in report.modules
            if _counts(m) and m.displacement_norm > 0 and m.safe_lora_score < limits.min_safe_lora_score
        ]  # fmt: skip
        if under:
            under.sort(key=lambda m: m.safe_lora_score)
            found.append(_violation(adapter, "min_safe_lora_score", limits.min_safe_lora_score,
                                    under[0].safe_lora_score, under))  # fmt: skip
    if limits.min_erosion is not None:
        value = report.totals()["erosion_before"]
        if value < limits.min_erosion:
            share = report.erosion_shares()  # each module's contribution: these add up to the adapter's value
            worst = sorted((m for m in report.modules if share[m.module] < 0), key=lambda m: share[m.module])
            found.append(_violation(adapter, "min_erosion", limits.min_erosion, value, worst, share))
    kept = [k for k in report.unsanitized() if k.kind != OUTSIDE_METHOD]  # what sanitize could have corrected
    if limits.fail_on_kept and kept:
        found.append({"adapter": adapter, "threshold": "fail_on_kept", "limit": 0, "value": len(kept),
                      "modules": [{"module": k.key, "value": 1.0, "reason": k.reason} for k in kept]})  # fmt: skip
    return found


def _violation(
    adapter: str, threshold: str, limit: float, value: float, modules: list[ModuleRow], share: dict | None = None
) -> dict:
    """``modules[i].value``: the module's contribution (total threshold), ρ_O, or its Safe LoRA score."""

    def module_value(m: ModuleRow) -> float:
        if share is not None:
            return share[m.module]
        return m.safe_lora_score if threshold == "min_safe_lora_score" else m.off_before

    return {
        "adapter": adapter,
        "threshold": threshold,
        "limit": limit,
        "value": value,
        "modules": [{"module": m.module, "value": module_value(m)} for m in modules],
    }


def audit_document(reports: list[Report], limits: Thresholds) -> dict:
    """What ``audit --json`` prints: the verdict, the violations, and each adapter's full report."""
    found = [v for r in reports for v in violations(r, limits)]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "audit",
        "passed": not found,
        "thresholds": asdict(limits),
        "violations": found,
        "reports": [r.to_dict() for r in reports],
    }


def describe(v: dict) -> str:
    """One violation in words: which adapter, which threshold, which modules."""
    if "message" in v:  # the behavioural gate (refusal_gate.py) says its own
        return v["message"]
    signed = v["threshold"] in ("min_safe_lora_score", "min_erosion")
    fmt = (lambda x: f"{x:+.3f}") if signed else (lambda x: f"{100 * x:.1f}%")
    mods = ", ".join(f"{m['module']} ({fmt(m['value'])})" for m in v["modules"][:NAMED])
    more = f" and {len(v['modules']) - NAMED} more" if len(v["modules"]) > NAMED else ""
    if v["threshold"] == "fail_on_kept":
        kept = ", ".join(f"{m['module']} ({m['reason']})" for m in v["modules"][:NAMED])
        return f"{v['adapter']}: {v['value']} tensor(s) kept as trained, not sanitized: {kept}{more}"
    if v["threshold"] == "max_off_energy":
        head = f"off-subspace energy {fmt(v['value'])} > {fmt(v['limit'])}; largest shares: "
    elif v["threshold"] == "max_layer_off_energy":
        head = f"{len(v['modules'])} module(s) with off-subspace energy > {fmt(v['limit'])}: "
    elif v["threshold"] == "min_erosion":
        head = (f"erosion coefficient {fmt(v['value'])} < {fmt(v['limit'])} (the update turns the aligned "
                "directions back); largest shares: ")  # fmt: skip
    else:
        head = f"{len(v['modules'])} module(s) with Safe LoRA score < {fmt(v['limit'])}: "
    return f"{v['adapter']}: {head}{mods}{more}"


def enforce(document: dict) -> None:
    """Raise ``GateFailed`` (exit 1) naming every adapter and module over a threshold."""
    if not document["passed"]:
        raise GateFailed("audit: " + "; ".join(describe(v) for v in document["violations"]))
