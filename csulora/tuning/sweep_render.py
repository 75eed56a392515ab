"""The pictures of a sweep: ``OUT/sweep.html`` (one self-contained page: inline SVG, no script, no network) and
``OUT/front.png`` (matplotlib, when installed): one metric of every point against another, the rules as dashed
lines, the picked point ringed, and a table of every point."""

from __future__ import annotations

import math
from html import escape

from ..reports.report_html import CSS
from .sweep_result import SweepResult, candidates, measured, require_measured, shown

PALETTE = ("#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#4a5568")
W, H, PAD_L, PAD_R, PAD_T, PAD_B, INSET = 640, 420, 64, 24, 24, 52, 10
TOTALS = ("retained_norm", "leaving_energy_after", "erosion_after")  # report totals worth a column
LABELS = {"retained_norm": "retained", "leaving_energy_after": "leaving after", "erosion_after": "erosion after"}


def axes(result: SweepResult, plot: tuple[str, str] | None = None) -> tuple[str, str] | None:
    """``(x, y)``: ``--plot`` when given; else y is the maximized metric (or the first measured one) and x the first
    rule's metric, or the next measured one, or the retained norm. ``None`` when nothing was measured."""
    ok = [p for p in result.points if p["status"] == "ok"]
    if plot is not None and ok:
        require_measured(ok, list(plot), "--plot")
        return plot
    names = shown(ok) or measured(ok)
    if not names:
        return None
    y = result.maximize if result.maximize in names else names[0]
    others = [r.metric for r in result.rules if r.metric != y] + [m for m in names if m != y] + ["retained_norm"]
    return others[0], y


def write_pictures(result: SweepResult, plot: tuple[str, str] | None = None) -> list[str]:
    """Write ``sweep.html`` always and ``front.png`` when there are metrics and matplotlib; returns notes."""
    chosen = axes(result, plot)
    notes = []
    (result.out / "sweep.html").write_text(to_html(result, chosen))
    if chosen is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            notes.append("front.png not drawn: it needs matplotlib (pip install 'csulora[eval]'); see sweep.html")
        else:
            _png(result, chosen)
    return notes


def _series(result: SweepResult, chosen: tuple[str, str]) -> dict[str, list[tuple[float, float, dict]]]:
    x, y = chosen
    series: dict[str, list] = {}
    for p in result.points:
        values = candidates(p)
        if p["status"] == "ok" and x in values and y in values:
            series.setdefault(p["method"], []).append((values[x], values[y], p))
    return series


def _svg(result: SweepResult, chosen: tuple[str, str]) -> str:
    x_name, y_name = chosen
    series = _series(result, chosen)
    xs = [x for pts in series.values() for x, _, _ in pts] + [r.value for r in result.rules if r.metric == x_name]
    ys = [y for pts in series.values() for _, y, _ in pts] + [r.value for r in result.rules if r.metric == y_name]
    if not xs or not ys:
        return "<p>No successful point has both metrics.</p>"

    (x0, x1, x_step), (y0, y1, y_step) = nice_span(xs), nice_span(ys)

    def px(v):  # INSET keeps a point on a bound clear of the frame
        return PAD_L + INSET + (v - x0) / (x1 - x0) * (W - PAD_L - PAD_R - 2 * INSET)

    def py(v):
        return H - PAD_B - INSET - (v - y0) / (y1 - y0) * (H - PAD_T - PAD_B - 2 * INSET)

    svg = [f'<svg class="front" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
           f'aria-label="{escape(y_name)} against {escape(x_name)}">',
           f'<rect x="{PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" class="plot"/>']
    for tx in ticks(x0, x1, x_step):
        svg.append(f'<line x1="{px(tx):.1f}" y1="{PAD_T}" x2="{px(tx):.1f}" y2="{H - PAD_B}" class="grid"/>'
                   f'<text x="{px(tx):.1f}" y="{H - PAD_B + 16}" class="tick">{tx:.4g}</text>')
    for ty in ticks(y0, y1, y_step):
        svg.append(f'<line x1="{PAD_L}" y1="{py(ty):.1f}" x2="{W - PAD_R}" y2="{py(ty):.1f}" class="grid"/>'
                   f'<text x="{PAD_L - 6}" y="{py(ty) + 4:.1f}" class="tick end">{ty:.4g}</text>')
    svg.append(f'<text x="{(W + PAD_L - PAD_R) / 2:.0f}" y="{H - 12}" class="axis mid">{escape(x_name)}</text>')
    svg.append(f'<text x="16" y="{(H - PAD_B + PAD_T) / 2:.0f}" class="axis mid" '
               f'transform="rotate(-90 16 {(H - PAD_B + PAD_T) / 2:.0f})">{escape(y_name)}</text>')
    for rule in result.rules:  # where each rule's boundary crosses the plot
        if rule.metric == x_name:
            svg.append(f'<line x1="{px(rule.value):.1f}" y1="{PAD_T}" x2="{px(rule.value):.1f}" y2="{H - PAD_B}" '
                       f'class="rule"><title>{escape(str(rule))}</title></line>')
        elif rule.metric == y_name:
            svg.append(f'<line x1="{PAD_L}" y1="{py(rule.value):.1f}" x2="{W - PAD_R}" y2="{py(rule.value):.1f}" '
                       f'class="rule"><title>{escape(str(rule))}</title></line>')
    for j, pts in enumerate(series.values()):
        color = PALETTE[j % len(PALETTE)]
        for x, y, p in pts:
            svg.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="5" fill="{color}" class="pt"><title>'
                       f'{escape(p["id"])}: {escape(x_name)} {x:.4g}, {escape(y_name)} {y:.4g}</title></circle>')
            if p["id"] == result.picked:  # the label goes inwards, never off the picture
                left = px(x) > (W + PAD_L - PAD_R) / 2
                tx, anchor = (px(x) - 13, "end") if left else (px(x) + 13, "start")
                svg.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="10" class="picked"/>'
                           f'<text x="{tx:.1f}" y="{py(y) + 4:.1f}" class="pick" text-anchor="{anchor}">picked: '
                           f'{escape(p["id"])}</text>')
    svg.append("</svg>")
    legend = "".join(f'<span class="key"><span class="swatch" style="background:{PALETTE[j % len(PALETTE)]}">'
                     f"</span>{escape(m)}</span>" for j, m in enumerate(series))  # fmt: skip
    return "\n".join(svg) + f'<p class="legend">{legend}</p>'


def nice_span(values: list[float]) -> tuple[float, float, float]:
    """Axis bounds on a round step (1, 2 or 5 × 10ⁿ, about five ticks) that hold every value."""
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    raw = (hi - lo) / 5
    step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
    return math.floor(lo / step) * step, math.ceil(hi / step) * step, step


def ticks(lo: float, hi: float, step: float) -> list[float]:
    return [round(lo + i * step, 12) for i in range(int(round((hi - lo) / step)) + 1)]


def _settings_words(settings: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in settings.items())


def _table(result: SweepResult) -> str:
    metrics = shown(result.points)
    head = ["point", "settings", "status", *metrics, *(LABELS[t] for t in TOTALS)]
    rows = []
    for p in result.points:
        totals = p.get("totals") or {}
        cells = [p["id"] + (" ★" if p["id"] == result.picked else ""), _settings_words(p["settings"]), p["status"],
                 *(f"{p['metrics'][m]:.4g}" if m in p["metrics"] else "" for m in metrics),
                 *(f"{totals[t]:.4g}" if totals.get(t) is not None else "" for t in TOTALS)]  # fmt: skip
        title = f' title="{escape(p["message"])}"' if p.get("message") else ""
        rows.append(f"<tr{title}>" + "".join(f"<td>{escape(str(c))}</td>" for c in cells) + "</tr>")
    head_html = "".join(f"<th>{escape(h)}</th>" for h in head)
    return f'<table class="modules points"><thead><tr>{head_html}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


SWEEP_CSS = """
svg.front text { font-size: 11px; fill: #2d3748; } svg.front .tick { text-anchor: middle; fill: #718096; }
svg.front .end { text-anchor: end; } svg.front .axis { font-weight: 600; font-size: 12px; }
svg.front .mid { text-anchor: middle; } svg.front .plot { fill: #fff; stroke: #a0aec0; }
svg.front .grid { stroke: #edf2f7; } svg.front .rule { stroke: #c53030; stroke-dasharray: 5 4; stroke-width: 1.5; }
svg.front .pt { stroke: #fff; stroke-width: 1; } svg.front .picked { fill: none; stroke: #1a202c; stroke-width: 2; }
svg.front .pick { font-weight: 600; paint-order: stroke; stroke: #fff; stroke-width: 4px; stroke-linejoin: round; }
table.points { width: auto; max-width: 100%; font-size: 13px; } table.points td, table.points th { padding: 3px 8px; }
table.points th { white-space: normal; }
"""


def to_html(result: SweepResult, chosen: tuple[str, str] | None) -> str:
    rules = ", ".join(str(r) for r in result.rules) or "none"
    if result.maximize is None:
        verdict = "no pick asked for"
    elif result.picked:
        verdict = f"picked <b>{escape(result.picked)}</b> (copied to <code>picked/</code>)"
    else:
        verdict = "<b>no point meets every rule</b>"
    ok = sum(p["status"] == "ok" for p in result.points)
    chart = _svg(result, chosen) if chosen else "<p>No metrics: run the sweep with --eval-cmd to draw the front.</p>"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>csulora sweep · {escape(str(result.out))}</title>
<style>{CSS}{SWEEP_CSS}</style>
</head>
<body>
<h1>csulora sweep</h1>
<p class="meta"><code>{escape(str(result.out))}</code> · {len(result.points)} points, {ok} ok · rules: {escape(rules)}
· maximize: {escape(result.maximize or "—")} · {verdict}</p>
<h2>{escape(chosen[1]) + " against " + escape(chosen[0]) if chosen else "Front"}</h2>
<div class="scroll">{chart}</div>
<h2>Every point</h2>
<div class="scroll">{_table(result)}</div>
</body>
</html>
"""


def _png(result: SweepResult, chosen: tuple[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_name, y_name = chosen
    fig, ax = plt.subplots(figsize=(7.5, 5))
    series = _series(result, chosen)
    xs = [x for pts in series.values() for x, _, _ in pts]
    middle = (min(xs) + max(xs)) / 2 if xs else 0.0
    for j, (method, pts) in enumerate(series.items()):  # a marker per method: coinciding points stay visible
        ax.scatter([x for x, _, _ in pts], [y for _, y, _ in pts], s=[70, 50, 40, 30][j % 4], alpha=0.85,
                   marker="osD^v"[j % 5], color=PALETTE[j % len(PALETTE)], label=method, zorder=3)  # fmt: skip
        for x, y, p in pts:
            if p["id"] == result.picked:
                ax.scatter([x], [y], s=300, facecolors="none", edgecolors="black", linewidths=1.8, zorder=4)
                left = x > middle  # the label goes inwards, never off the plot
                # on a white box above the rules' dashed lines, which would otherwise cross it
                ax.annotate(f"picked: {p['id']}", (x, y), xytext=(-12 if left else 12, 12), fontsize=9,
                            textcoords="offset points", ha="right" if left else "left", zorder=5,
                            bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none", "alpha": 0.9})  # fmt: skip
    for rule in result.rules:
        if rule.metric == x_name:
            ax.axvline(rule.value, color="#c53030", ls="--", lw=1.2, label=str(rule))
        elif rule.metric == y_name:
            ax.axhline(rule.value, color="#c53030", ls="--", lw=1.2, label=str(rule))
    ax.set_xlabel(x_name)
    ax.set_ylabel(y_name)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"csulora sweep: {len(result.points)} points" + (f", picked {result.picked}" if result.picked else ""))
    fig.tight_layout()
    # fixed metadata: the same sweep draws the same bytes
    fig.savefig(result.out / "front.png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def sweep_table(result: SweepResult, wide: bool = False):
    """The points as a rich table for the terminal: point, status, metrics; ``wide`` adds what is left of the
    update (the totals; sweep.json and sweep.html always have them)."""
    from rich.table import Table

    metrics = shown(result.points)
    totals_shown = TOTALS if wide else ()
    table = Table(title=f"csulora sweep · {result.out}", caption=None if wide else "--wide: the report's totals too",
                  caption_justify="left")  # fmt: skip
    for col in ("point", "status", *metrics, *(LABELS[t] for t in totals_shown)):
        table.add_column(col, justify="left" if col in ("point", "status") else "right", no_wrap=True)
    for p in result.points:
        totals = p.get("totals") or {}
        style = "green" if p["status"] == "ok" else "red"
        table.add_row(p["id"] + (" ★" if p["id"] == result.picked else ""), f"[{style}]{p['status']}[/{style}]",
                      *(f"{p['metrics'][m]:.4g}" if m in p["metrics"] else "" for m in metrics),
                      *(f"{totals[t]:.4g}" if totals.get(t) is not None else "" for t in totals_shown))  # fmt: skip
    return table
