"""What a run or a redraw writes: the json (one row per line), the Markdown report, the plots, and the
summary the terminal gets."""

from __future__ import annotations

import json
from pathlib import Path

from .analysis import analyse, method_defaults
from .plots import plot_summary, plot_world
from .render import markdown


def dump(result: dict, path: Path) -> None:
    """The json with one row per line (diffable, small)."""
    head = {k: v for k, v in result.items() if k != "rows"}
    text = json.dumps(head, indent=1, ensure_ascii=False)
    rows = ",\n".join("  " + json.dumps(r, separators=(",", ":"), ensure_ascii=False) for r in result["rows"])
    path.write_text(text[:-2] + ',\n "rows": [\n' + rows + "\n ]\n}\n")


def write_outputs(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    result["info"]["stem"] = out.name
    analysis = analyse(result)
    result["analysis"] = _round4(analysis)
    block, notes = method_defaults(result, analysis)
    result["recommended_method_defaults"] = {"python": block, "notes": notes}
    out.parent.mkdir(parents=True, exist_ok=True)
    dump(result, out.with_suffix(".json"))
    out.with_suffix(".md").write_text(markdown(result, analysis))
    for w in result["worlds"]:
        plot_world(result, analysis, w, out.parent / f"{out.name}_{w}.png")
    plot_summary(result, analysis, out.with_suffix(".png"))


def _round4(x):
    if isinstance(x, float):
        return round(x, 4)
    if isinstance(x, dict):
        return {k: _round4(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round4(v) for v in x]
    return x


def summary(result: dict) -> str:
    """What the terminal gets: the front scores, LOWO, the decision and the recommended defaults."""
    md = markdown(result, analyse(result))
    start = md.index("## Front scores")
    end = md.index("\n## World ")
    return md[start:end]
