"""``csulora_report.html``: one self-contained page (inline CSS and SVG, no script, no network) with a
per-layer stacked bar chart of the relative energies before and after, the attenuation factors, and the
per-module table under it."""

from __future__ import annotations

import re
from html import escape

from ..correction import COMPONENTS
from .report import (
    Report,
    _subspace_words,
    _summary_lines,
    cells,
    columns,
    expert_layer,
    grouped,
    provenance_words,
    rank_warning,
)

COLORS = {"F": "#2f855a", "H_in": "#d4a017", "H_out": "#e07b24", "O": "#c53030"}
LABELS = {"F": "F (fully aligned)", "H_in": "H_in (input side leaves)", "H_out": "H_out (output side leaves)",
          "O": "O (off-subspace)"}  # fmt: skip
FACTORS = {  # the factor applied to H_in, H_out, O: column titles per form
    "factored": (("γ_in", "on H_in"), ("γ_out", "on H_out"), ("γ_in·γ_out", "on O")),
    "block": (("γ_H", "on H_in"), ("γ_H", "on H_out"), ("γ_O", "on O")),
    "exact": (("γ_H", "on H_in"), ("γ_H", "on H_out"), ("γ_O", "on O")),  # a full model: the exact (block) form
    "safe-lora": (("score", "Safe LoRA"), ("lora_B", "written"), ("", "")),
    "realign": (("c", "on F − βD_k"), ("erosion", "before"), ("erosion", "after")),
    "resta": (("γ", "× D_k added"), ("erosion", "before"), ("erosion", "after")),
}

# CHAR_W: the advance of one character of the 12 px monospace labels, with room to spare (DejaVu Sans Mono and
# Menlo are 0.60 em = 7.2 px); an estimate below the font's cut long module names at the left edge
ROW_H, BAR_H, BAR_W, FACTOR_W, GAP, CHAR_W, TOP = 30, 10, 460, 70, 56, 7.6, 34


def _natural(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _layer(name: str) -> str:
    """The block a module belongs to: the path up to its first number (``model.layers.3``)."""
    m = re.match(r"(.*?\.\d+)\.", name)
    return m.group(1) if m else ""


def _bar(x: float, y: float, fractions: dict[str, float], scale: float, label: str) -> list[str]:
    parts, left = [], x
    for c in COMPONENTS:
        w = fractions[c] * scale
        if w > 0:
            parts.append(
                f'<rect x="{left:.2f}" y="{y:.2f}" width="{w:.2f}" height="{BAR_H}" fill="{COLORS[c]}">'
                f"<title>{label} {c}: {100 * fractions[c]:.1f}% of the input’s ‖ΔW‖²</title></rect>"
            )
            left += w
    return parts


def _chart(report: Report) -> str:
    modules = sorted(grouped(report.modules), key=lambda m: _natural(m.module))
    longest = max((len(m.module) for m in modules), default=10)
    label_w = min(longest, 60) * CHAR_W + 16
    # the bars are shares of the *input's* ‖ΔW‖², so that the "after" bar shrinks with the update (Safe LoRA's C·B
    # may grow it); the report's rho_after are the written update's own shares
    top = max([1.0] + [sum(m.input_share_after.values()) for m in modules])
    scale = BAR_W / top
    x0 = label_w + 40  # room for the "before/after" words
    fx = x0 + BAR_W + GAP
    factors = FACTORS[report.method if report.method in ("safe-lora", "realign", "resta") else report.form]
    width = fx + len(factors) * FACTOR_W + 8
    height = TOP + ROW_H * len(modules) + 8
    svg = [f'<svg class="chart" width="{width:.0f}" height="{height}" viewBox="0 0 {width:.0f} {height}" '
           'role="img" aria-label="relative energies per module, before and after">']  # fmt: skip
    ticks = [t / 4 for t in range(int(4 * top) + 1)]
    for t in ticks:
        tx = x0 + t * scale
        svg.append(f'<line x1="{tx:.2f}" y1="{TOP - 6}" x2="{tx:.2f}" y2="{height - 8}" class="grid"/>')
        svg.append(f'<text x="{tx:.2f}" y="{TOP - 10}" class="tick">{100 * t:.0f}%</text>')
    svg.append(f'<text x="{x0}" y="12" class="axis">share of the input update’s energy ‖ΔW‖²</text>')
    for j, (name, note) in enumerate(factors):
        cx = fx + j * FACTOR_W + FACTOR_W / 2
        svg.append(f'<text x="{cx:.2f}" y="12" class="axis mid">{name}</text>')
        svg.append(f'<text x="{cx:.2f}" y="{TOP - 10}" class="tick">{note}</text>')
    previous = None
    for i, m in enumerate(modules):
        y = TOP + i * ROW_H
        if previous is not None and _layer(m.module) != previous:
            svg.append(f'<line x1="4" y1="{y - 2}" x2="{width - 4:.0f}" y2="{y - 2}" class="sep"/>')
        previous = _layer(m.module)
        name = m.module if len(m.module) <= 60 else "…" + m.module[-59:]
        svg.append(f'<text x="{label_w - 8:.2f}" y="{y + BAR_H + 4}" class="label"><title>{escape(m.module)}'
                   f"</title>{escape(name)}</text>")  # fmt: skip
        svg.append(f'<text x="{x0 - 6}" y="{y + BAR_H - 1}" class="which">before</text>')
        svg.append(f'<text x="{x0 - 6}" y="{y + 2 * BAR_H + 1}" class="which">after</text>')
        svg += _bar(x0, y + 1, m.rho, scale, f"{escape(m.module)} before")
        svg += _bar(x0, y + BAR_H + 3, m.input_share_after, scale, f"{escape(m.module)} after")
        kept = sum(m.input_share_after.values())  # ‖ΔW'‖² / ‖ΔW‖², so a bar too short to see still reads
        kx = x0 + kept * scale + 4
        svg.append(f'<text x="{kx:.2f}" y="{y + 2 * BAR_H + 1}" class="kept">{100 * kept:.1f}%</text>')
        texts = []
        if report.method == "safe-lora":  # no factors: the score, and whether B was replaced by C·B
            texts = [f"{m.safe_lora_score:+.3f}", "C·B" if m.safe_lora_projected else "B"]
        elif report.method in ("realign", "resta"):  # c or γ, then the erosion coefficient before and after
            first = "" if report.method == "realign" else f"{m.gamma_resta:g}"
            texts = [first, f"{m.erosion:+.3f}", f"{m.erosion_after:+.3f}"]
        for j, text in enumerate(texts):
            if text:
                cx = fx + j * FACTOR_W + FACTOR_W / 2
                svg.append(f'<text x="{cx:.2f}" y="{y + BAR_H + 4}" class="factor mid">{text}</text>')
        bars = [m.c] if report.method == "realign" else [] if texts else [m.gamma_in, m.gamma_out, m.off_factor]
        for j, value in enumerate(bars):
            cx = fx + j * FACTOR_W
            w = (FACTOR_W - 12) * value
            svg.append(f'<rect x="{cx + 6:.2f}" y="{y + 2}" width="{FACTOR_W - 12}" height="6" class="track"/>')
            svg.append(f'<rect x="{cx + 6:.2f}" y="{y + 2}" width="{w:.2f}" height="6" class="gamma"/>')
            svg.append(f'<text x="{cx + FACTOR_W / 2:.2f}" y="{y + 21}" class="factor mid">{value:.3f}</text>')
    svg.append("</svg>")
    return "\n".join(svg)


def _legend() -> str:
    items = "".join(
        f'<span class="key"><span class="swatch" style="background:{COLORS[c]}"></span>{escape(LABELS[c])}</span>'
        for c in COMPONENTS
    )
    return f'<p class="legend">{items}</p>'


def _table(report: Report, modules) -> str:
    head = "".join(f"<th>{escape(c)}</th>" for c in columns(report))
    rows = "".join(
        "<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in cells(report, m)) + "</tr>"
        for m in sorted(modules, key=lambda m: _natural(m.module))
    )
    return f'<table class="modules"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _experts(report: Report) -> str:
    """One folded table per stacked parameter, a row per expert (the main table shows each stack as one row)."""
    layers: dict[str, list] = {}
    for m in report.modules:
        if (layer := expert_layer(m)) is not None:
            layers.setdefault(layer, []).append(m)
    if not layers:
        return ""
    folds = "".join(
        f"<details><summary><code>{escape(layer)}</code>: {len(rows)} experts</summary>"
        f'<div class="scroll">{_table(report, rows)}</div></details>'
        for layer, rows in sorted(layers.items(), key=lambda item: _natural(item[0]))
    )
    return f"<h2>Experts, one row each</h2>{folds}"


def _kept(report: Report) -> str:
    if not report.kept:
        return ""
    rows = "".join(f"<tr><td>{escape(k.key)}</td><td>{escape(str(k.shape))}</td><td>{escape(k.reason)}</td></tr>"
                   for k in report.kept)  # fmt: skip
    return ('<h2>Kept as trained (not sanitized)</h2><table class="modules"><thead><tr><th>tensor</th><th>shape</th>'
            f"<th>why</th></tr></thead><tbody>{rows}</tbody></table>")  # fmt: skip


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1a202c; margin: 24px 32px;
       background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; }
.meta { color: #4a5568; margin: 0 0 12px; } code { font-size: 13px; }
ul.summary { margin: 8px 0; padding-left: 20px; }
.warn { background: #fffbeb; border: 1px solid #f6ad55; border-radius: 6px; padding: 8px 12px; margin: 12px 0; }
.legend { margin: 4px 0 8px; } .key { margin-right: 18px; white-space: nowrap; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px;
          vertical-align: -1px; }
.scroll { overflow-x: auto; }
svg.chart text { font-size: 11px; fill: #2d3748; }
svg.chart .label { font: 12px ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; text-anchor: end; }
svg.chart .which { text-anchor: end; fill: #718096; font-size: 9px; }
svg.chart .tick { text-anchor: middle; fill: #718096; font-size: 10px; }
svg.chart .axis { font-weight: 600; } svg.chart .mid { text-anchor: middle; }
svg.chart .grid { stroke: #e2e8f0; stroke-width: 1; } svg.chart .sep { stroke: #a0aec0; stroke-dasharray: 3 3; }
svg.chart .track { fill: #edf2f7; } svg.chart .gamma { fill: #4a5568; }
svg.chart .factor { font-size: 10px; } svg.chart .kept { font-size: 9px; fill: #4a5568; }
table.modules { border-collapse: collapse; font-size: 12px; }
table.modules th, table.modules td { border-bottom: 1px solid #e2e8f0; padding: 3px 8px; text-align: right;
                                     white-space: nowrap; }
table.modules th { background: #f7fafc; position: sticky; top: 0; }
table.modules td:first-child, table.modules th:first-child { text-align: left; font-family: ui-monospace, monospace; }
table.modules tbody tr:hover { background: #f7fafc; }
"""


def _code(text: str) -> str:
    """Markdown's `x` as <code>x</code> (on escaped text)."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", text)


def _pack(report: Report) -> str:
    """The subspace pack that served the run (``report.pack_words``), if any."""
    from .report import pack_words  # one import line above stays as it was (merges)

    words = pack_words(report)
    return f"<br>{escape(words)}" if words else ""


def to_html(report: Report) -> str:
    """The report as one self-contained HTML page."""
    s = report.settings
    method = report.description
    warn = ""
    if report.rank_changed:
        warn = f'<p class="warn"><b>Warning:</b> {escape(rank_warning(report)).replace("`", "")}</p>'
    warnings = "".join(f"<li>{escape(w)}</li>" for w in report.warnings)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>csulora report · {escape(report.subject[1])}</title>
<style>{CSS}</style>
</head>
<body>
<h1>csulora report</h1>
<p class="meta">{report.subject[0]} <code>{escape(report.subject[1])}</code>
· {_code(escape(provenance_words(report)))}<br>method: {escape(method)} · subspace:
{escape(_subspace_words(s))} · csulora {escape(report.tool_version)}{_pack(report)}</p>
{warn}
<ul class="summary">{"".join(f"<li>{escape(line)}</li>" for line in _summary_lines(report))}</ul>
<h2>Relative energies per layer, before and after</h2>
{_legend()}
<div class="scroll">
{_chart(report)}
</div>
<h2>Per-module table</h2>
<div class="scroll">{_table(report, grouped(report.modules))}</div>
{_experts(report)}
{_kept(report)}
{f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else ""}
</body>
</html>
"""
