"""The model card (``README.md``) of a sanitized adapter or model: YAML front matter, the command, a summary."""

from __future__ import annotations

import json
import re
import shlex

from ..io.checkpoints import public_name
from ..settings import DEFAULT_METHOD, METHOD_NOTES
from .report import Report, kept_words, pack_words, pct, provenance_words, rank_warning, ratio, size_words

# A local absolute path in a command line (``/…``, ``~/…``), alone or after ``--option=``; not a URL's ``//``.
_LOCAL_PATH = re.compile(r"(?<![\w.:/~-])(?:~|/)[^\s'\"]*")


def model_card(report: Report, base_model: str | None, command: str, form_words: str) -> str:
    """The card of a sanitized adapter or model. ``base_model``: what the result loads on (an adapter's
    ``base_model_name_or_path``; for a full model, the aligned model it is a fine-tune of); ``form_words``: how the
    result is written (an adapter's method says it: ``Method.form_words``). The card is meant to be published: it
    names local checkpoints and folders by their folder name, never by their path."""
    kind, path = report.subject
    front = ["---"]
    if base_model:
        front.append(f"base_model: {json.dumps(public_name(base_model))}")
    tags = ["library_name: peft", "tags:", "- lora", "- peft"] if kind == "adapter" else ["library_name: transformers",
                                                                                          "tags:"]  # fmt: skip
    front += [*tags, "- csulora", "- safety", "---"]
    t = report.totals()
    body = [
        "",
        "# Sanitized LoRA adapter" if kind == "adapter" else "# Sanitized model",
        "",
        *([kept_words(report), ""] if report.kept else []),
        f"This {kind} is `{public_name(path)}` after {report.description}, made with "
        f"csulora {report.tool_version}. The safety subspace of each layer was estimated from aligned − base: "
        f"{provenance_words(report, public_name)}; {form_words}",
        "",
        *_method_note(report),
        *([f"λ and β were chosen by the default's {size_words(report.size_rule)}; `--lambda` or `--beta` fixes "
             "them.", ""] if report.size_rule else []),
        *_calibration_note(report.calibration),
        *([f"Subspaces: {pack_words(report)}.", ""] if pack_words(report) else []),
        *([f"> **Warning:** {rank_warning(report)}", ""] if report.rank_changed else []),
        "```",
        public_command(command),
        "```",
        "",
        "| | before | after |",
        "|---|---|---|",
        f"| energy leaving the safety subspace | {pct(t['leaving_energy_before'])} | "
        f"{pct(t['leaving_energy_after'])} |",
        f"| off-subspace energy (both sides) | {pct(t['off_energy_before'])} | {pct(t['off_energy_after'])} |",
        f"| erosion coefficient ⟨ΔW, D_k⟩/‖D_k‖² (negative: turns alignment back) | {t['erosion_before']:+.3f} | "
        f"{t['erosion_after']:+.3f} |",
        f"| update norm | 1.000 | {ratio(t['retained_norm'])} |",
        "",
        "Per-module details: `csulora_report.md`, `csulora_report.json` and `csulora_report.html` (a picture).",
    ]
    return "\n".join(front + body) + "\n"


def public_command(command: str) -> str:
    """The command with every local absolute path replaced by its last component (``/home/me/run/out`` → ``out``):
    word by word for a shell command line (paths with spaces), else (an API call) by pattern."""

    def name(path: str) -> str:
        return path.rstrip("/").rsplit("/", 1)[-1] or path

    def word(w: str) -> str:
        option, eq, value = w.partition("=") if w.startswith("--") else ("", "", w)
        return option + eq + (name(value) if value.startswith(("/", "~")) else value)

    if command.startswith("csulora "):
        try:
            return shlex.join(word(w) for w in shlex.split(command))
        except ValueError:
            pass
    return _LOCAL_PATH.sub(lambda m: name(m[0]), command)


def _method_note(report: Report) -> list[str]:
    """Which method ran and why, and where the paper's method stands (docs/defaults.md)."""
    chosen = "csulora's default method" if report.method == DEFAULT_METHOD else f"`--method {report.method}`"
    return [f"Method: {chosen}. {METHOD_NOTES.get(report.method, '')}".rstrip(), ""]


def _calibration_note(block: dict | None) -> list[str]:
    """What ``--calibrate`` measured, on which prompts, and what it chose (the report's ``calibration``)."""
    if not block or not block.get("choice"):
        return []
    choice = block["choice"]
    picked = next(c for c in block["candidates"] if c["id"] == choice["id"])
    ref = block["references"]
    sets = ", ".join(f"{v['n']} {k} prompts (`{v['source']}`, sha256 {v['sha256'][:12]}…)"
                     for k, v in block["prompts"].items())  # fmt: skip
    general = "" if picked.get("general") is None else f", general agreement {picked['general']:.2f}"
    measured_with = f" The fine-tuned model: {block['input']['loading']}." if block.get("input") else ""
    lines = [
        f"Calibrated: the setting `{choice['id']}` was picked among {len(block['candidates'])} measured candidates "
        f"of a {len(block['ladder'])}-rung ladder ({block['search']}) by the rule: {block['rule']['words']}. "
        f"Measured on {sets}, greedy: refusal {picked['refusal']:.2f} (aligned model {ref['aligned']['refusal']:.2f}, "
        f"fine-tuned {ref['fine_tuned']['refusal']:.2f}), kept {picked['kept']:.2f} of the fine-tune's behaviour"
        f"{general}.{measured_with} These are measurements on those prompts, not a guarantee (docs/calibration.md).",
        "",
    ]
    if choice.get("flagged"):
        lines += ["> **Warning:** no candidate reached the refusal target; this is the most refusal with kept ≥ "
                  f"{block['rule']['kept_min']:g}.", ""]  # fmt: skip
    return lines
