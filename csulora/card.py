"""The model card (``README.md``) of a sanitized adapter or model: YAML front matter, the command, a summary."""

from __future__ import annotations

import json

from .report import Report, kept_words, pack_words, pct, rank_warning
from .settings import DEFAULT_METHOD, METHOD_NOTES


def model_card(report: Report, base_model: str | None, command: str, form_words: str) -> str:
    """``form_words``: how the result is written (an adapter's method says it: ``Method.form_words``)."""
    kind, path = report.subject
    front = ["---"]
    if base_model:
        front.append(f"base_model: {json.dumps(base_model)}")
    tags = ["library_name: peft", "tags:", "- lora", "- peft"] if kind == "adapter" else ["library_name: transformers",
                                                                                          "tags:"]  # fmt: skip
    front += [*tags, "- csulora", "- safety", "---"]
    t = report.totals()
    body = [
        "",
        "# Sanitized LoRA adapter" if kind == "adapter" else "# Sanitized model",
        "",
        *([kept_words(report), ""] if report.kept else []),
        f"This {kind} is `{path}` after {report.description}, made with "
        f"csulora {report.tool_version}. The safety subspace of each layer was estimated from "
        f"`{report.inputs['aligned']['ref']}` − `{report.inputs['base']['ref']}`; {form_words}",
        "",
        *_method_note(report),
        *([f"Subspaces: {pack_words(report)}.", ""] if pack_words(report) else []),
        *([f"> **Warning:** {rank_warning(report)}", ""] if report.rank_changed else []),
        "```",
        command,
        "```",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| energy leaving the safety subspace | {pct(t['leaving_energy_before'])} | "
        f"{pct(t['leaving_energy_after'])} |",
        f"| off-subspace energy (both sides) | {pct(t['off_energy_before'])} | {pct(t['off_energy_after'])} |",
        f"| erosion coefficient ⟨ΔW, D_k⟩/‖D_k‖² (negative: turns alignment back) | {t['erosion_before']:+.3f} | "
        f"{t['erosion_after']:+.3f} |",
        f"| update norm | 1.000 | {t['retained_norm']:.3f} |",
        "",
        "Per-module details: `csulora_report.md`, `csulora_report.json` and `csulora_report.html` (a picture).",
    ]
    return "\n".join(front + body) + "\n"


def _method_note(report: Report) -> list[str]:
    """Which method ran and why, and where the paper's method stands (docs/defaults.md)."""
    chosen = "csulora's default method" if report.method == DEFAULT_METHOD else f"`--method {report.method}`"
    return [f"Method: {chosen}. {METHOD_NOTES.get(report.method, '')}".rstrip(), ""]
